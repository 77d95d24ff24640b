#!/usr/bin/env bash
# Peak server memory while uploading a large safetensors file (default 2.5 GiB).
# Uploads stream to disk with a bounded buffer, so peak RSS must not grow with the file.
#   cargo build --release && scripts/bench_upload_rss.sh [GiB]
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-2.5}
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
python3 - "$work/big.safetensors" "$gib" <<'PY'
import json, struct, sys
path, gib = sys.argv[1], float(sys.argv[2])
n = int(gib * 2**30) // 4
header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
header += b" " * (-len(header) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    f.truncate(8 + len(header) + n * 4)   # sparse zeros: fast to make, real bytes to send
PY
size=$(stat -c %s "$work/big.safetensors")
port=18090
WHITTLE_DATA_DIR="$work/data" WHITTLE_BIND=127.0.0.1:$port WHITTLE_WORKERS=0 RUST_LOG=warn \
    target/release/whittle serve &
server=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
rss_before=$(awk '/VmRSS/ {print $2}' /proc/$server/status)
start=$(date +%s.%N)
status=$(curl -s -o "$work/res.json" -w '%{http_code}' -X POST "http://127.0.0.1:$port/v1/models?name=big" \
    -H "content-type: application/octet-stream" -T "$work/big.safetensors")
end=$(date +%s.%N)
peak=$(awk '/VmHWM/ {print $2}' /proc/$server/status)
echo "{\"file_bytes\": $size, \"status\": $status, \"seconds\": $(echo "$end - $start" | bc), \"rss_before_kib\": $rss_before, \"peak_rss_kib\": $peak}"
