#!/usr/bin/env bash
# The CLI's terminal rendering, checked under a pseudo-terminal (`script` from util-linux):
# `whittle jobs submit --wait` draws a live progress bar (step k/n and op) and ends with the
# summary table. CI runs it after the test suite, with the debug binary the tests built.
#   scripts/check_cli_tty.sh [path/to/whittle]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/whittle}
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
"$bin" serve --bind "127.0.0.1:$port" --data-dir "$dir/data" >"$dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$dir"' EXIT
export WHITTLE_URL="http://127.0.0.1:$port"
for _ in $(seq 50); do curl -sf "$WHITTLE_URL/healthz" >/dev/null && break; sleep 0.1; done

mkdir "$dir/model"
cp tests/fixtures/transformers/tiny-llama/{config.json,tokenizer.json,model.safetensors} "$dir/model/"
model=$("$bin" models upload "$dir/model" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
printf '%s\n' '{"text": "the cat sat on the mat."}' '{"text": "a quick brown fox."}' >"$dir/texts.jsonl"
data=$("$bin" datasets upload "$dir/texts.jsonl" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
cat >"$dir/job.json" <<JSON
{"model_id": "$model", "steps": [{"op": "quantize", "method": "uniform", "bits": 4}],
 "eval": {"dataset_id": "$data", "context": 16}}
JSON
# Under a pseudo-terminal, as a person would run it.
script -qec "$bin jobs submit $dir/job.json --wait" "$dir/tty.log" >/dev/null
screen=$(tr '\r' '\n' <"$dir/tty.log")
fail=0
for want in "step 1/1 quantize" "[=====" "succeeded" "compression ratio" "perplexity" "output model:"; do
    if ! grep -qF -- "$want" <<<"$screen"; then
        echo "missing on the terminal: $want" >&2
        fail=1
    fi
done
[ $fail = 0 ] || { echo "$screen" | tail -30 >&2; exit 1; }
echo "CLI terminal rendering: progress bar, live step, summary table — ok"
