#!/usr/bin/env bash
# The dashboard checked in headless Chromium against a server with a real job (see
# scripts/check_dashboard.mjs). Installs puppeteer-core (pinned) from npm into a temp dir and
# uses the machine's chromium (Debian package; installed when missing).
#   scripts/check_dashboard.sh [path/to/whittle]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/whittle}")
command -v chromium >/dev/null || apt-get install -y chromium >/dev/null
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
# With API keys on (as on any real network): the first key is made on the database.
key=$("$bin" keys create --name dashboard --scope write --tenant dash --data-dir "$dir/data" --output json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
"$bin" serve --workers 0 --auth keys --bind "127.0.0.1:$port" --data-dir "$dir/data" >"$dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; pkill -f "$dir/data" 2>/dev/null; rm -rf "$dir"' EXIT
export WHITTLE_URL="http://127.0.0.1:$port"
for _ in $(seq 50); do curl -sf "$WHITTLE_URL/healthz" >/dev/null && break; sleep 0.1; done
curl() { command curl -H "authorization: Bearer $key" "$@"; }

# A model, a dataset, and a Deep Compression job: train, prune in rounds with retraining,
# share weights through a 16-entry k-means codebook, pack (queued: no worker yet).
model=$(curl -sf "$WHITTLE_URL/v1/models?name=mlp" -H 'content-type: application/json' -d '{"architecture":
  {"kind": "sequential", "input_shape": [64], "layers": [
   {"type": "linear", "name": "fc1", "in_features": 64, "out_features": 256}, {"type": "relu"},
   {"type": "linear", "name": "fc2", "in_features": 256, "out_features": 3}]}, "init": {"seed": 1}}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
python3 - "$dir/data.csv" <<'PY'
import random, sys
random.seed(0)
with open(sys.argv[1], "w") as f:
    for i in range(300):
        y = i % 3
        f.write(",".join(f"{(y - 1) * (j % 3 == y) + random.gauss(0, 0.5):.3f}" for j in range(64)) + f",{y}\n")
PY
data=$(curl -sf "$WHITTLE_URL/v1/datasets?name=toy&format=csv" -H 'content-type: text/csv' --data-binary @"$dir/data.csv" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
job=$(curl -sf "$WHITTLE_URL/v1/jobs" -H 'content-type: application/json' -d "{\"model_id\": \"$model\",
  \"steps\": [{\"op\": \"finetune\", \"dataset_id\": \"$data\", \"epochs\": 8, \"batch_size\": 16},
              {\"op\": \"prune\", \"sparsity\": 0.7, \"schedule\": {\"kind\": \"polynomial\", \"iterations\": 3,
                \"finetune\": {\"dataset_id\": \"$data\", \"epochs\": 2, \"batch_size\": 16}}},
              {\"op\": \"quantize\", \"method\": \"kmeans\", \"clusters\": 16, \"format\": \"packed\"}],
  \"eval\": {\"dataset_id\": \"$data\"}, \"labels\": {\"team\": \"dash\"}}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

npm_dir="$dir/npm"
mkdir -p "$npm_dir"
(cd "$npm_dir" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund puppeteer-core@23.9.0 >/dev/null)
cp scripts/check_dashboard.mjs "$npm_dir/"
worker="\"$bin\" worker --data-dir \"$dir/data\" >\"$dir/worker.log\" 2>&1 &"
mkdir -p target/dashboard
(cd "$npm_dir" && SHOTS="$OLDPWD/target/dashboard" NODE_PATH="$npm_dir/node_modules" node check_dashboard.mjs "$WHITTLE_URL" "$job" "$model" "$worker" "$key") ||
    { tail -n 20 "$dir/server.log" "$dir/worker.log" >&2; exit 1; }
