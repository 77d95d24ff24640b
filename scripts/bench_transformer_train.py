#!/usr/bin/env python3
"""PyTorch peer of benches/transformer_train.rs: tokens/s of a training step of
all-MiniLM-L6-v2 with a new 5-class head (transformers' BertForSequenceClassification:
forward + cross-entropy + backward + AdamW lr 2e-5, train mode with dropout) at batch 16 x 64
tokens on CPU, the same documents tokenized by the folder's tokenizer.

    scripts/fetch_data.sh minilm
    python3 scripts/bench_transformer_train.py --threads 2

The first epoch is a warm-up; the best of the next three is reported, as the candle bench does.
Tokenization is inside the timed loop on both sides.
"""
import argparse
import os
import time

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

BATCH, TOKENS = 16, 64
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=int(os.environ.get("BENCH_BATCHES", 8)))
    ap.add_argument("--folder", default=os.path.join(os.path.dirname(__file__), "..", "target", "fixtures", "minilm"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.folder)
    model = BertForSequenceClassification.from_pretrained(a.folder, num_labels=5)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    docs = [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(TOKENS - 2))
            for i in range(BATCH * a.batches)]
    labels = torch.tensor([i % 5 for i in range(len(docs))])
    print(f"pytorch {torch.__version__} transformer training, all-MiniLM-L6-v2 + 5-class head, "
          f"batch {BATCH} x {TOKENS} tokens, AdamW, threads {a.threads}")
    best = 0.0
    for epoch in range(4):
        order = torch.randperm(len(docs))
        start = time.perf_counter()
        for b in range(a.batches):
            idx = order[b * BATCH:(b + 1) * BATCH]
            enc = tok([docs[i] for i in idx], padding=True, truncation=True, max_length=512,
                      return_tensors="pt")
            assert enc["input_ids"].shape[1] == TOKENS, enc["input_ids"].shape
            out = model(**enc, labels=labels[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        secs = time.perf_counter() - start
        tps = BATCH * a.batches * TOKENS / secs
        print(f"epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: {secs:.2f} s, {tps:.0f} tokens/s, "
              f"{secs / a.batches:.3f} s/step")
        if epoch > 0:
            best = max(best, tps)
    print(f"minilm-train tokens/s {best:.0f}")


if __name__ == "__main__":
    main()
