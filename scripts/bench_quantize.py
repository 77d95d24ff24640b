#!/usr/bin/env python3
"""int8 symmetric per-channel quantization of a [rows, cols] f32 matrix with torch and numpy
(scale = amax/127 per row, codes = round(w / scale) clamped to ±127), printed as JSON lines in
the same shape as `cargo bench --bench quantize_int8`.

usage: bench_quantize.py [--rows 16384] [--cols 16384] [--repeat 5] [--threads 2]
"""
import argparse
import json
import time

import numpy as np
import torch


def best_of(repeat, fn):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0], times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gib = a.rows * a.cols * 4 / 2**30
    rng = np.random.default_rng(42)
    w_np = (rng.random((a.rows, a.cols), dtype=np.float32) + rng.random((a.rows, a.cols), dtype=np.float32) - 1.0) * 0.05
    w_t = torch.from_numpy(w_np)
    zeros = torch.zeros(a.rows, dtype=torch.int64)

    def torch_q():
        scales = w_t.abs().amax(dim=1) / 127.0
        q = torch.quantize_per_channel(w_t, scales.double(), zeros, 0, torch.qint8)
        return q

    def numpy_q():
        scales = np.abs(w_np).max(axis=1) / np.float32(127.0)
        inv = np.float32(1.0) / scales
        codes = np.clip(np.rint(w_np * inv[:, None]), -127, 127).astype(np.int8)
        return codes, scales

    torch_q()
    numpy_q()
    for name, fn in [("torch", torch_q), ("numpy", numpy_q)]:
        best, median = best_of(a.repeat, fn)
        print(json.dumps({"bench": "int8_per_channel_in_memory", "impl": name, "rows": a.rows,
                          "cols": a.cols, "gib": round(gib, 3), "threads": a.threads if name == "torch" else 1,
                          "fresh_output": True, "best_s": round(best, 4), "median_s": round(median, 4)}),
              flush=True)


if __name__ == "__main__":
    main()
