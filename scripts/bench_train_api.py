#!/usr/bin/env python3
"""Training throughput as a user sees it: a `finetune` job's wall time through the API (the
worker reads the dataset, builds the model, trains, writes the output) against a plain PyTorch
loop over the same MNIST files (reading them included), same network, batch 128, AdamW (lr 1e-3,
weight decay 0.01), constant learning rate, no validation, the same number of epochs.

    scripts/fetch_data.sh mnist
    WHITTLE_THREADS=2 target/release/whittle serve --data-dir /tmp/wbench --bind 127.0.0.1:8093 &
    python3 scripts/bench_train_api.py --url http://127.0.0.1:8093 --threads 2 [--rounds 2]

Job wall time is the job's `finished_at − started_at` (claiming and queueing excluded); PyTorch's
is from reading the IDX files to the last optimizer step. Rounds alternate the two; the best of
each is compared. Prints one JSON line per measurement and the ratio (whittle samples/s over
PyTorch's; above 1 is faster).
"""
import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_experiments import LENET, LENET5, call, read, run_job, upload_idx  # noqa: E402

ARCHS = {"lenet-300-100": LENET, "lenet-5": LENET5}


def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def whittle(url, arch, train, epochs):
    model = call(f"{url}/v1/models", "POST", {"name": "bench", "architecture": arch, "init": {"seed": 0}})
    job, _, _ = run_job(url, {"model_id": model["id"], "seed": 0, "steps": [{
        "op": "finetune", "dataset_id": train, "epochs": epochs, "batch_size": 128,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}}]})
    return ts(job["finished_at"]) - ts(job["started_at"])


def pytorch(name, epochs, threads):
    import torch
    from torch import nn
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    images, labels = read("mnist", "train")
    n = int.from_bytes(images[4:8], "big")
    x = torch.frombuffer(bytearray(images[16:]), dtype=torch.uint8).reshape(n, 1, 28, 28).float() / 255.0
    y = torch.frombuffer(bytearray(labels[8:]), dtype=torch.uint8).long()
    if name == "lenet-300-100":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                              nn.Linear(100, 10))
    else:
        model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, 128):
            idx = order[i:i + 128]
            if len(idx) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8093")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="lenet-300-100,lenet-5")
    args = ap.parse_args()
    train = upload_idx(args.url, "mnist-train", *read("mnist", "train"))["id"]
    n = 60000 * args.epochs
    for name in args.models.split(","):
        best = {"whittle": float("inf"), "pytorch": float("inf")}
        for r in range(args.rounds):
            for impl in ("whittle", "pytorch"):
                s = whittle(args.url, ARCHS[name], train, args.epochs) if impl == "whittle" \
                    else pytorch(name, args.epochs, args.threads)
                best[impl] = min(best[impl], s)
                print(json.dumps({"model": name, "impl": impl, "round": r + 1, "epochs": args.epochs,
                                  "seconds": round(s, 2), "samples_per_s": round(n / s)}), flush=True)
        print(json.dumps({"model": name, "ratio_whittle_over_pytorch": round(best["pytorch"] / best["whittle"], 3),
                          "whittle_samples_per_s": round(n / best["whittle"]),
                          "pytorch_samples_per_s": round(n / best["pytorch"])}), flush=True)


if __name__ == "__main__":
    main()
