#!/usr/bin/env bash
# GGUF Q8_0 / Q4_0 / Q4_K, file to file, side by side on the same 1 GiB of f32 weights
# (16 × [4096, 4096]): Whittle's writer (the `gguf_quantize` bench's `convert`, 2 threads)
# vs llama.cpp's `llama-quantize` (C, 2 threads, `--pure` so every tensor gets the type).
# Prints wall and CPU seconds per GiB, the ratios, and for the first tensors whether the
# bytes are identical and each file's RMSE against the source (gguf-py dequantizes both).
#
#   LLAMA_QUANTIZE=/path/to/llama-quantize PYTHON=python3 scripts/bench_llama_quantize.sh
#
# llama-quantize is not part of this repository. It builds from the llama.cpp sources inside
# the PyPI sdist of llama-cpp-python (~6 min on 2 cores):
#   pip download --no-deps --no-binary :all: llama-cpp-python   # or fetch the .tar.gz from PyPI
#   tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
#   pip install cmake
#   cmake -B build -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
#   cmake --build build -j2 --target llama-quantize
set -euo pipefail
cd "$(dirname "$0")/.."
LQ=${LLAMA_QUANTIZE:?set LLAMA_QUANTIZE to a llama-quantize binary}
PY=${PYTHON:-python3}
IN=/tmp/whittle-gguf-bench.safetensors
F32=/tmp/whittle-llama-bench.f32.gguf
OURS=/tmp/whittle-llama-bench.ours.gguf
THEIRS=/tmp/whittle-llama-bench.theirs.gguf
trap 'rm -f "$F32" "$OURS" "$OURS.report.json" "$THEIRS"' EXIT
cargo bench --bench gguf_quantize --no-run 2>/dev/null
cargo bench --bench gguf_quantize -- input 2>&1 | grep -v '^ *\(Finished\|Running\)' || true
"$PY" scripts/bench_llama_quantize.py input "$IN" "$F32"
GIB=$(stat -c %s "$IN" | awk '{print $1 / 2^30}')
echo "input: $IN and $F32 ($GIB GiB of f32 each)"
printf '%-5s %22s %22s %18s\n' type "whittle wall/cpu s/GiB" "llama wall/cpu s/GiB" "llama/whittle wall"
for pair in q8_0:Q8_0 q4_0:Q4_0 q4_k:Q4_K_S; do
  ours_t=${pair%%:*}; theirs_t=${pair##*:}
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  cat "$IN" "$F32" > /dev/null   # both inputs in the page cache, as for the other benches
  line=$(cargo bench --bench gguf_quantize -- convert "$IN" "$OURS" "$ours_t" 2>/dev/null | grep ' s wall')
  ow=$(echo "$line" | sed -E 's/.* ([0-9.]+) s wall.*/\1/'); oc=$(echo "$line" | sed -E 's/.* ([0-9.]+) s cpu.*/\1/')
  TIMEFORMAT='%R %U %S'
  { time "$LQ" --pure "$F32" "$THEIRS" "$theirs_t" 2 > /tmp/whittle-lq.log 2>&1; } 2> /tmp/whittle-lq.time
  read -r tw tc < <(awk '{print $1, $2 + $3}' /tmp/whittle-lq.time)
  printf '%-5s %10.2f / %-9.2f %10.2f / %-9.2f %17.2fx\n' "$ours_t" \
    "$(echo "$ow $GIB" | awk '{print $1/$2}')" "$(echo "$oc $GIB" | awk '{print $1/$2}')" \
    "$(echo "$tw $GIB" | awk '{print $1/$2}')" "$(echo "$tc $GIB" | awk '{print $1/$2}')" \
    "$(echo "$tw $ow" | awk '{print $1/$2}')"
  "$PY" scripts/bench_llama_quantize.py compare "$IN" "$OURS" "$THEIRS" 2
  rm -f "$OURS" "$OURS.report.json" "$THEIRS"
done
