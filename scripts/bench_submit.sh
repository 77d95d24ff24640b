#!/bin/bash
# Job-submission throughput on PostgreSQL, workers off, measured by oha (cargo install oha):
# POST /v1/jobs over 32 connections for DUR after a 3 s warm-up; prints requests/s, p50, p99.
# usage: scripts/bench_submit.sh [BIN ...]   (default target/release/whittle; several binaries
#        are run alternately, ROUNDS times, e.g. an older build beside this one)
# env:   DUR (10s), ROUNDS (3), POOL (WHITTLE_DB_POOL_SIZE, 16), CONNECTIONS (32),
#        PG (postgres://postgres@127.0.0.1:5432), PORT (8091)
set -euo pipefail
DUR=${DUR:-10s}; ROUNDS=${ROUNDS:-3}; POOL=${POOL:-16}; C=${CONNECTIONS:-32}
PG=${PG:-postgres://postgres@127.0.0.1:5432}; PORT=${PORT:-8091}
BINS=("$@"); [ ${#BINS[@]} -eq 0 ] && BINS=(target/release/whittle)
command -v oha >/dev/null || { echo "oha not found: cargo install oha" >&2; exit 1; }
DATA=$(mktemp -d); OUT=$(mktemp); trap 'rm -rf "$DATA" "$OUT"' EXIT
one() {
    PGOPTIONS=--client-min-messages=warning psql -q "$PG/postgres" -c "drop database if exists whittle_bench_submit" -c "create database whittle_bench_submit" >/dev/null
    rm -rf "$DATA"/*
    DATABASE_URL=$PG/whittle_bench_submit WHITTLE_WORKERS=0 WHITTLE_DB_POOL_SIZE=$POOL RUST_LOG=warn \
        "$1" serve --data-dir "$DATA" --bind 127.0.0.1:$PORT >"$DATA/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && break; sleep 0.1; done
    local mid
    mid=$(curl -sf http://127.0.0.1:$PORT/v1/models -H 'content-type: application/json' \
        -d '{"name":"bench","architecture":{"kind":"sequential","input_shape":[16],"layers":[{"type":"linear","name":"fc1","in_features":16,"out_features":16}]}}' \
        | python3 -c "import sys,json;print(json.load(sys.stdin)['id'])")
    local body="{\"model_id\":\"$mid\",\"steps\":[{\"op\":\"quantize\",\"method\":\"float\",\"dtype\":\"f16\"}]}"
    local args=(-c "$C" --no-tui -m POST -H 'content-type: application/json' -d "$body" http://127.0.0.1:$PORT/v1/jobs)
    oha -z 3s --output-format quiet "${args[@]}"
    oha -z "$DUR" --output-format json "${args[@]}" >"$OUT"
    kill $pid; wait $pid 2>/dev/null || true
    python3 - "$OUT" "$1" "$POOL" "$C" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d["summary"]; p = d["latencyPercentiles"]
print(json.dumps({"bin": sys.argv[2], "pool": int(sys.argv[3]), "connections": int(sys.argv[4]),
                  "jobs_per_s": round(s["requestsPerSec"], 1), "p50_ms": round(p["p50"] * 1000, 2),
                  "p99_ms": round(p["p99"] * 1000, 2), "status": d.get("statusCodeDistribution")}))
PY
}
for _ in $(seq "$ROUNDS"); do for b in "${BINS[@]}"; do one "$b"; done; done
