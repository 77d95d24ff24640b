#!/usr/bin/env python3
"""Peers of `cargo bench --bench prune_global`: global magnitude pruning at 90% of
100 tensors of 1000x1000 standard-normal f32 weights (100M parameters), in memory.

One JSON line per (peer, rep) with the wall time of threshold selection + masking:
  torch_global_unstructured  torch.nn.utils.prune.global_unstructured(L1Unstructured)
                             over 100 nn.Linear(1000, 1000) weights
  torch_kthvalue             torch.cat of |w| -> kthvalue -> in-place mask
  torch_topk                 torch.cat of |w| -> topk(k, largest=False) -> in-place mask
  numpy_partition            np.concatenate of |w| -> np.partition -> in-place mask
Memory: ru_maxrss of the whole process (torch's import alone is ~0.5 GB), and
extra_over_model = (peak after - peak before pruning) / model size, the memory the pruning
itself added. Each peer runs in a fresh child process so peers do not inherit peaks.

  python3 scripts/bench_prune.py --threads 2 [--reps 2] [--tensors 100] [--dim 1000]
"""
import argparse
import json
import multiprocessing as mp
import resource
import time


def make_weights(n, dim, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.standard_normal((dim, dim), dtype=np.float32) for _ in range(n)]


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_peer(peer, args, queue):
    import numpy as np

    sparsity = 0.9
    total = args.tensors * args.dim * args.dim
    k = round(sparsity * total)
    model_mib = total * 4 / 2**20
    if peer.startswith("torch"):
        import torch

        torch.set_num_threads(args.threads)
    for rep in range(args.reps):
        arrays = make_weights(args.tensors, args.dim, 42)
        if peer == "torch_global_unstructured":
            import torch.nn.utils.prune as prune

            modules = []
            with torch.no_grad():
                for a in arrays:
                    m = torch.nn.Linear(args.dim, args.dim, bias=False)
                    m.weight.copy_(torch.from_numpy(a))
                    modules.append(m)
            del arrays
            params = [(m, "weight") for m in modules]
            before = peak_mib()
            t0 = time.perf_counter()
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
            seconds = time.perf_counter() - t0
            pruned = int(sum((m.weight == 0).sum().item() for m in modules))
        elif peer in ("torch_kthvalue", "torch_topk"):
            ws = [torch.from_numpy(a) for a in arrays]
            before = peak_mib()
            t0 = time.perf_counter()
            with torch.no_grad():
                flat = torch.cat([w.abs().flatten() for w in ws])
                if peer == "torch_kthvalue":
                    t = flat.kthvalue(k).values
                else:
                    t = torch.topk(flat, k, largest=False, sorted=False).values.max()
                del flat
                for w in ws:
                    w.mul_(w.abs() > t)
            seconds = time.perf_counter() - t0
            pruned = int(sum((w == 0).sum().item() for w in ws))
        elif peer == "numpy_partition":
            before = peak_mib()
            t0 = time.perf_counter()
            flat = np.concatenate([np.abs(a).ravel() for a in arrays])
            t = np.partition(flat, k - 1)[k - 1]
            del flat
            for a in arrays:
                np.multiply(a, np.abs(a) > t, out=a)
            seconds = time.perf_counter() - t0
            pruned = int(sum(int((a == 0).sum()) for a in arrays))
        else:
            raise ValueError(peer)
        queue.put(
            {
                "bench": "prune_global",
                "impl": peer,
                "rep": rep,
                "tensors": args.tensors,
                "params": total,
                "sparsity": sparsity,
                "seconds": seconds,
                "pruned": pruned,
                "model_mib": model_mib,
                "peak_before_mib": before,
                "peak_after_mib": peak_mib(),
                "peak_over_model": peak_mib() / model_mib,
                "extra_over_model": (peak_mib() - before) / model_mib,
                "threads": args.threads,
            }
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--tensors", type=int, default=100)
    p.add_argument("--dim", type=int, default=1000)
    p.add_argument("--peers", default="torch_global_unstructured,torch_kthvalue,torch_topk,numpy_partition")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    for peer in args.peers.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_peer, args=(peer, args, queue))
        proc.start()
        for _ in range(args.reps):
            print(json.dumps(queue.get()), flush=True)
        proc.join()


if __name__ == "__main__":
    main()
