#!/usr/bin/env bash
# Training throughput, candle engine vs PyTorch, side by side on the same 2 threads, as ratios.
#   scripts/bench_train.sh            (needs `pip install torch`)
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=${THREADS:-2}
cargo bench --bench train_throughput 2>/dev/null | tee /tmp/whittle-bench-train.txt
python3 scripts/bench_train_pytorch.py --threads "$RAYON_NUM_THREADS" | tee /tmp/whittle-bench-torch.txt
