#!/bin/bash
# Runs the Rust int8 quantization bench and the torch/numpy peers on the same sizes and
# prints the ratios. usage: scripts/bench_quantize.sh [rows] [cols]
# (run from the crate root; builds with CARGO_TARGET_DIR if set, -j 1).
set -euo pipefail
rows=${1:-16384}; cols=${2:-16384}
out=$(mktemp)
WHITTLE_BENCH_ROWS=$rows WHITTLE_BENCH_COLS=$cols cargo bench -j 1 --bench quantize_int8 2>/dev/null | tee "$out"
${PYTHON:-python3} "$(dirname "$0")/bench_quantize.py" --rows "$rows" --cols "$cols" | tee -a "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
mem = [r for r in rows if r["bench"] == "int8_per_channel_in_memory"]
ours = min((r for r in mem if r["impl"] == "whittle" and r["fresh_output"] and r.get("huge_pages")), key=lambda r: r["best_s"])
plain = min((r for r in mem if r["impl"] == "whittle" and r["fresh_output"] and not r.get("huge_pages")), key=lambda r: r["best_s"])
print(f"whittle fresh output without the huge-page advice: {plain['best_s']:.4f} s")
ours_reuse = min((r for r in mem if r["impl"] == "whittle" and not r["fresh_output"]), key=lambda r: r["best_s"])
print(f"whittle best (fresh output, {ours['threads']} threads): {ours['best_s']:.4f} s;"
      f" reused output buffers: {ours_reuse['best_s']:.4f} s")
for r in mem:
    if r["impl"] != "whittle":
        print(f"{r['impl']:>16}: {r['best_s']:.4f} s  = {r['best_s'] / ours['best_s']:.2f}x whittle (fresh output)")
for r in rows:
    if r["bench"] == "file_to_file_int8_packed":
        print(f"file->file packed int8: {r['whittle_best_s']:.3f} s vs cp {r['cp_best_s']:.3f} s ({r['ratio_to_cp']:.2f}x cp)")
PY
rm -f "$out"
