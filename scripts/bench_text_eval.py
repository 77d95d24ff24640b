#!/usr/bin/env python3
"""The PyTorch peer of `cargo bench --bench text_eval`: tokens/s of SmolLM2-135M's forward pass
(transformers, eager attention, f32) over the same windows of the Debian fortunes, on the same
threads. Run the two in turn, several times, and compare medians (the machine drifts):

  scripts/fetch_transformers.sh
  for i in 1 2 3; do
    RAYON_NUM_THREADS=2 BENCH_FORWARD_ONLY=1 BENCH_WINDOWS=8 cargo bench --bench text_eval | grep forward
    /work/pyenv/bin/python scripts/bench_text_eval.py --threads 2 --windows 8
  done
"""
import argparse
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "target", "fixtures")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaForCausalLM
    d = os.path.join(ROOT, "smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = LlamaForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    # As the Rust bench: the five files, fortunes separated by blank lines, documents trimmed
    # and joined by a blank line, tokenized once.
    text = ""
    for f in ["wisdom", "people", "science", "politics", "work"]:
        text += open(os.path.join(ROOT, "fortunes", f), encoding="utf-8").read().replace("\n%\n", "\n\n")
    docs, cur = [], []
    for line in text.split("\n") + [""]:
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur).strip())
            cur = []
    ids = tok("\n\n".join(docs), add_special_tokens=True)["input_ids"]
    c = args.context
    windows = [ids[w * c:(w + 1) * c] for w in range(args.windows)]
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        with torch.inference_mode():
            for w in windows:
                model(input_ids=torch.tensor([w]), use_cache=False).logits.float()
        best = min(best, time.perf_counter() - started)
    print(f"forward: {len(windows) * c / best:.0f} tokens/s ({len(windows)} windows of {c}, PyTorch {torch.__version__})")


if __name__ == "__main__":
    main()
