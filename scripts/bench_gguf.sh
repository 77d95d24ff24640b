#!/usr/bin/env bash
# GGUF quantization throughput: Whittle's write_gguf (candle's quantizers, rows split over
# 2 threads, file to file) vs llama.cpp's Python package gguf-py (numpy, one thread), on the
# same ~1 GiB f32 safetensors input (BENCH_GIB), as seconds per GiB and ratios.
#   PYTHON=python3 scripts/bench_gguf.sh      (PYTHON must have `pip install gguf numpy`)
# llama.cpp's C `llama-quantize` is compared in scripts/bench_llama_quantize.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
IN=/tmp/whittle-gguf-bench.safetensors
trap 'rm -f "$IN"' EXIT
BENCH_KEEP=1 BENCH_TYPES=${BENCH_TYPES:-q8_0,q4_0,q4_k} cargo bench --bench gguf_quantize 2>/dev/null \
  | tee /tmp/whittle-bench-gguf.txt
"$PY" scripts/bench_gguf_python.py "$IN" q8_0 q4_0 | tee /tmp/whittle-bench-gguf-py.txt
# Wall-clock ratios only mean something on an otherwise idle machine; CPU-second ratios
# (all threads, user + system) are robust to other load.
for t in q8_0 q4_0; do
  ours=$(awk -v t=$t '$1==t {print $2, $3}' /tmp/whittle-bench-gguf.txt)
  theirs=$(awk -v t=$t '$1==t {print $4, $7}' /tmp/whittle-bench-gguf-py.txt)
  if [ -n "$ours" ] && [ -n "$theirs" ]; then
    echo "$t $ours $theirs" | awk '{ printf "%-6s gguf-py / whittle: wall %.2fx, cpu %.2fx (whittle includes the error statistics)\n", $1, $4/$2, $5/$3 }'
  fi
done
rm -f /tmp/whittle-bench-gguf.txt /tmp/whittle-bench-gguf-py.txt
