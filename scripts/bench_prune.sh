#!/usr/bin/env bash
# Global magnitude pruning (90% of 100M f32 weights in 100 tensors, in memory): whittle vs
# PyTorch / numpy peers on the same machine, printed as ratios (peer time / whittle time;
# > 1 means whittle is faster).
#   scripts/bench_prune.sh            (needs `pip install torch numpy`; PYTHON=... to pick one)
# CRATE_DIR runs the cargo bench in another checkout; CARGO_BENCH_ARGS adds cargo flags
# (e.g. `--profile dev` to reuse already-built dev dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
CRATE_DIR=${CRATE_DIR:-.}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
out=$(mktemp -d)
# shellcheck disable=SC2086
(cd "$CRATE_DIR" && cargo bench -j 1 ${CARGO_BENCH_ARGS:-} --bench prune_global 2>/dev/null) | tee "$out/whittle.jsonl"
"$PYTHON" scripts/bench_prune.py --threads "$THREADS" | tee "$out/peers.jsonl"
"$PYTHON" - "$out/whittle.jsonl" "$out/peers.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.startswith("{")]
best = {}
for r in rows:
    best[r["impl"]] = min(best.get(r["impl"], float("inf")), r["seconds"])
peaks = {}
for r in rows:
    peaks[r["impl"]] = max(peaks.get(r["impl"], 0.0), r["extra_over_model"])
w = best["whittle"]
print(f"\nbest of reps, {rows[0]['params']:,} params, sparsity {rows[0]['sparsity']}")
print(f"{'impl':28s} {'seconds':>9s} {'ratio vs whittle':>17s} {'extra mem/model':>16s}")
for name, s in sorted(best.items(), key=lambda kv: kv[1]):
    print(f"{name:28s} {s:9.3f} {s / w:17.2f} {peaks[name]:16.2f}")
PY
