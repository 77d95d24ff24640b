"""A PostgreSQL restart in the middle of a batch of jobs (the production issue's evidence).

Starts `whittle serve` with one worker on a fresh database, queues a batch of training jobs,
restarts the machine's PostgreSQL while they run, and polls the API throughout: during the
outage requests must answer 503 with `Retry-After` within the acquire timeout (3 s), never
hang; afterwards every job must succeed exactly once (one `succeeded` event, one output model
each). Needs root (pg_ctlcluster); not part of CI, which shares the server with the tests.

    python3 scripts/check_pg_restart.py [path/to/whittle] [jobs]
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug/whittle")
JOBS = int(sys.argv[2]) if len(sys.argv) > 2 else 12
PORT = 20000 + os.getpid() % 20000
URL = f"http://127.0.0.1:{PORT}"
DB = f"whittle_restart_{os.getpid()}"
CLUSTER = os.listdir("/etc/postgresql")[0]


def psql(sql):
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-Atc", sql],
                          check=True, capture_output=True, text=True).stdout.strip()


def call(method, path, body=None, timeout=30):
    req = urllib.request.Request(URL + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def main():
    psql(f"create database {DB}")
    data = tempfile.mkdtemp()
    env = dict(os.environ, DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{DB}", RUST_LOG="warn")
    server = subprocess.Popen([BIN, "serve", "--workers", "1", "--bind", f"127.0.0.1:{PORT}",
                               "--data-dir", data], env=env, stderr=open(os.path.join(data, "server.log"), "w"))
    try:
        for _ in range(100):
            try:
                call("GET", "/healthz")
                break
            except Exception:
                time.sleep(0.1)
        csv = "\n".join(",".join(f"{((i * 7 + j) % 13) / 13 + (i % 3):.3f}" for j in range(32)) + f",{i % 3}"
                        for i in range(3000)).encode()
        req = urllib.request.Request(URL + "/v1/datasets?format=csv&name=toy", data=csv,
                                     headers={"content-type": "text/csv"})
        ds = json.loads(urllib.request.urlopen(req).read())["id"]
        _, _, body = call("POST", "/v1/models", {"architecture": {"kind": "sequential", "input_shape": [32], "layers": [
            {"type": "linear", "name": "fc1", "in_features": 32, "out_features": 128}, {"type": "relu"},
            {"type": "linear", "name": "fc2", "in_features": 128, "out_features": 3}]}})
        model = json.loads(body)["id"]
        jobs = []
        for i in range(JOBS):
            _, _, body = call("POST", "/v1/jobs", {"model_id": model, "seed": i, "steps": [
                {"op": "finetune", "dataset_id": ds, "epochs": 3, "batch_size": 32}]})
            jobs.append(json.loads(body)["id"])

        # Poll the API from another thread through the outage.
        seen, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                t0 = time.time()
                try:
                    status, headers, _ = call("GET", "/v1/jobs?limit=5", timeout=20)
                except Exception as e:  # noqa: BLE001
                    status, headers = f"error {e}", {}
                seen.append((status, headers.get("retry-after"), time.time() - t0))
                time.sleep(0.2)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(2)
        t0 = time.time()
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", CLUSTER, "main", "restart"], check=True)
        print(f"PostgreSQL restarted in {time.time() - t0:.1f} s while jobs ran")
        deadline = time.time() + 300
        while time.time() < deadline:
            states = [json.loads(call("GET", f"/v1/jobs/{j}")[2])["state"] for j in jobs]
            if all(s in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(1)
        stop.set()
        poller.join()
        outage = [s for s in seen if s[0] != 200]
        slowest = max(s[2] for s in seen)
        print(f"{len(seen)} polls: {len(seen) - len(outage)} × 200, outage answers: "
              f"{sorted(set((s[0], s[1]) for s in outage), key=str)}; slowest answer {slowest:.2f} s")
        states = [json.loads(call("GET", f"/v1/jobs/{j}")[2]) for j in jobs]
        succeeded = sum(1 for j in states if j["state"] == "succeeded")
        counts = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", DB, "-Atc",
                                 "select (select count(*) from job_events where kind = 'state' and data like '%\"succeeded\"%'),"
                                 " (select count(*) from models where source_job_id is not null),"
                                 " (select max(attempt) from jobs)"],
                                check=True, capture_output=True, text=True).stdout.strip().split("|")
        print(f"jobs: {succeeded}/{JOBS} succeeded; `succeeded` events {counts[0]}, output models {counts[1]}, "
              f"most attempts of one job {counts[2]}")
        ok = (succeeded == JOBS and int(counts[0]) == JOBS and int(counts[1]) == JOBS and slowest < 5
              and all(s[0] == 503 and s[1] for s in outage))
        print("postgres restart ok" if ok else "postgres restart FAILED")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(30)
        psql(f"drop database if exists {DB} with (force)")


sys.exit(main())
