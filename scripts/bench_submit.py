#!/usr/bin/env python3
"""Job-submission throughput: POST /v1/jobs from a second process, N jobs over C connections.

Start the server first with workers off, so only submission is measured, e.g.
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/whittle_bench WHITTLE_WORKERS=0 \
        target/release/whittle serve
then:  python3 scripts/bench_submit.py --jobs 5000 --connections 8
Standard library only.
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse

ARCH = {"kind": "sequential", "input_shape": [16], "layers": [
    {"type": "linear", "name": "fc1", "in_features": 16, "out_features": 16}]}


def request(conn, method, path, body=None, headers=None):
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"content-type": "application/json", **(headers or {})})
    res = conn.getresponse()
    data = res.read()
    return res.status, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    u = urllib.parse.urlparse(args.url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    status, data = request(conn, "POST", "/v1/models", {"name": "bench", "architecture": ARCH})
    assert status == 201, data
    model_id = json.loads(data)["id"]
    job = {"model_id": model_id, "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}]}

    per_thread = args.jobs // args.connections
    latencies = []
    errors = []
    lock = threading.Lock()

    def worker():
        c = http.client.HTTPConnection(u.hostname, u.port)
        local = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            s, d = request(c, "POST", "/v1/jobs", job)
            local.append(time.perf_counter() - t0)
            if s != 202:
                errors.append((s, d[:200]))
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(args.connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    n = len(latencies)
    print(json.dumps({
        "jobs": n, "connections": args.connections, "errors": len(errors),
        "seconds": round(elapsed, 3), "jobs_per_second": round(n / elapsed, 1),
        "latency_ms_p50": round(latencies[n // 2] * 1000, 2),
        "latency_ms_p99": round(latencies[int(n * 0.99)] * 1000, 2),
    }))
    if errors:
        print("first error:", errors[0])


if __name__ == "__main__":
    main()
