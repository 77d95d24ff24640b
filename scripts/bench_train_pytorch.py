#!/usr/bin/env python3
"""PyTorch peer of benches/train_throughput.rs: training samples/s for LeNet-300-100
(784-300-100-10) and a LeNet-5-style CNN at batch 128 with AdamW (lr 1e-3, weight decay
0.01) on random MNIST-shaped uint8 data scaled to [0, 1], on CPU.

    python3 scripts/bench_train_pytorch.py --threads 2

Each epoch shuffles, slices batches, runs forward + cross-entropy + backward + AdamW step,
exactly the work the candle loop does per batch; the first epoch is a warm-up and the
best of the remaining epochs is reported.
"""
import argparse
import time

import torch
from torch import nn


def lenet_300_100():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


def lenet5():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.batch_size * args.batches
    x_u8 = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    print(f"torch {torch.__version__} training throughput, batch {args.batch_size}, "
          f"AdamW, {torch.get_num_threads()} threads")
    for name, make in [("lenet-300-100", lenet_300_100), ("lenet-5", lenet5)]:
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        times = []
        for _ in range(args.epochs):
            start = time.perf_counter()
            order = torch.randperm(n)
            for b in range(0, n, args.batch_size):
                idx = order[b:b + args.batch_size]
                xb = x_u8[idx].float() / 255.0
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), y[idx])
                loss.backward()
                opt.step()
                loss.item()
            times.append(time.perf_counter() - start)
        best = min(times[1:]) if len(times) > 1 else times[0]
        print(f"{name:14} {n / best:9.0f} samples/s  step {1000 * best / args.batches:6.2f} ms")


if __name__ == "__main__":
    main()
