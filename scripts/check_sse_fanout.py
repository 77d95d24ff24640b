"""1,000 live followers of one job's event stream (the production issue's evidence).

Starts `whittle serve` on a fresh PostgreSQL database, queues a job (no worker: it stays
queued, so every stream stays open), opens N concurrent `GET /v1/jobs/{id}/events` streams,
then measures over a quiet window the database transactions the server makes (from
pg_stat_database: the streams must share one reader, not poll each) and its RSS growth; then
starts a worker so the job runs and checks every follower receives the terminal event; then
reopens N streams on a second queued job and sends SIGTERM: the server must exit within its
grace period with every stream closed.

    python3 scripts/check_sse_fanout.py [path/to/whittle] [followers]
Bounds (issue): ≤ 5 queries/s for all followers, RSS growth ≤ 100 MiB, SIGTERM within grace.
"""
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug/whittle")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
PORT = 20000 + os.getpid() % 20000
URL = f"http://127.0.0.1:{PORT}"
DB = f"whittle_sse_{os.getpid()}"
PG = "postgres://postgres@127.0.0.1:5432"
GRACE = 10


def psql(sql, db="test"):
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-Atc", sql],
                          check=True, capture_output=True, text=True).stdout.strip()


def http(method, path, body=None):
    req = urllib.request.Request(URL + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def commits():
    return int(psql(f"select xact_commit + xact_rollback from pg_stat_database where datname = '{DB}'"))


async def follow(job, until_terminal, opened):
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT, limit=1 << 20)
    writer.write(f"GET /v1/jobs/{job}/events HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    # Open = caught up: the job's history (its `queued` event) has arrived.
    while b"data:" not in await reader.readline():
        pass
    opened.append(1)
    seen_terminal = False
    try:
        while True:
            line = await reader.readline()
            if not line:
                break  # the server closed the stream
            if b'"state":"succeeded"' in line:
                seen_terminal = True
                if until_terminal:
                    break
    finally:
        writer.close()
    return seen_terminal


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    psql(f"create database {DB}")
    data = tempfile.mkdtemp()
    env = dict(os.environ, DATABASE_URL=f"{PG}/{DB}", RUST_LOG="warn")
    server = subprocess.Popen([BIN, "serve", "--workers", "0", "--bind", f"127.0.0.1:{PORT}",
                               "--data-dir", data, "--shutdown-grace-seconds", str(GRACE)],
                              env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                http("GET", "/healthz")
                break
            except Exception:
                time.sleep(0.1)
        model = http("POST", "/v1/models", {"architecture": {"kind": "sequential", "input_shape": [4], "layers": [
            {"type": "linear", "name": "fc1", "in_features": 4, "out_features": 3}]}})
        spec = {"model_id": model["id"], "steps": [{"op": "quantize", "method": "float", "dtype": "f16"}]}
        job = http("POST", "/v1/jobs", spec)["id"]
        rss0 = rss_mib(server.pid)
        opened = []
        t0 = time.time()
        tasks = [asyncio.create_task(follow(job, True, opened)) for _ in range(N)]
        while len(opened) < N:
            await asyncio.sleep(0.1)
            if time.time() - t0 > 60:
                sys.exit(f"only {len(opened)} of {N} streams opened in 60 s")
        print(f"{N} streams open in {time.time() - t0:.1f} s")
        # PostgreSQL publishes a backend's counters up to 10 s after it goes idle: let the
        # catch-up reads of the streams' opening land before the window starts.
        await asyncio.sleep(12)
        c0, w0 = commits(), time.time()
        await asyncio.sleep(20)
        c1, w1 = commits(), time.time()
        qps = (c1 - c0 - 1) / (w1 - w0)  # minus the reading query itself
        rss1 = rss_mib(server.pid)
        print(f"database transactions while {N} follow: {qps:.2f}/s (bound 5); "
              f"RSS {rss0:.0f} → {rss1:.0f} MiB (+{rss1 - rss0:.0f}, bound 100)")
        # A worker runs the job: every follower gets the terminal event.
        worker = subprocess.Popen([BIN, "worker", "--data-dir", data], env=env, stderr=subprocess.DEVNULL)
        t0 = time.time()
        done = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        print(f"job ran: {sum(done)} of {N} followers saw `succeeded` within {time.time() - t0:.1f} s")
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

        # SIGTERM with N streams following a queued job.
        job2 = http("POST", "/v1/jobs", spec)["id"]
        opened = []
        tasks = [asyncio.create_task(follow(job2, False, opened)) for _ in range(N)]
        while len(opened) < N:
            await asyncio.sleep(0.1)
        t0 = time.time()
        server.send_signal(signal.SIGTERM)
        server.wait(GRACE + 20)
        exit_s = time.time() - t0
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        print(f"SIGTERM with {N} open streams: exited in {exit_s:.2f} s (grace {GRACE} s), code {server.returncode}; all streams closed")
        ok = qps <= 5 and rss1 - rss0 <= 100 and sum(done) == N and exit_s <= GRACE and server.returncode == 0
        print("sse fan-out ok" if ok else "sse fan-out FAILED")
        return 0 if ok else 1
    finally:
        if server.poll() is None:
            server.kill()
        psql(f"drop database if exists {DB} with (force)")


sys.exit(asyncio.run(main()))
