#!/usr/bin/env python3
"""Compare Whittle's magnitude pruning with PyTorch's on all-MiniLM-L6-v2, through the API.

  scripts/fetch_data.sh minilm
  cargo run --release &
  python3 scripts/check_prune_vs_torch.py [--url http://127.0.0.1:8080] [--sparsity 0.5]

Uploads the model, runs `prune` (magnitude, scope layer) and (scope global) jobs over the
default selection (float tensors with ndim >= 2), downloads the outputs and compares the zero
patterns with `torch.nn.utils.prune.l1_unstructured` (per tensor) and
`torch.nn.utils.prune.global_unstructured` (L1, all selected tensors) on the same weights.
Mask differences can only come from ties (equal |w| at the threshold): the script counts the
differing positions and checks that every one of them sits exactly at the threshold magnitude.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

import torch
import torch.nn.utils.prune as tprune
from safetensors.torch import load, load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "fixtures", "minilm")


def call(url, method="GET", body=None, content_type="application/json", raw=False):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": content_type})
    with urllib.request.urlopen(req) as res:
        out = res.read()
    return out if raw else json.loads(out or b"null")


def run_job(url, spec):
    job = call(f"{url}/v1/jobs", "POST", spec)
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = call(f"{url}/v1/jobs/{job['id']}")
    if job["state"] != "succeeded":
        sys.exit(f"job failed: {job['error']}")
    return job


class Holder(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = torch.nn.Parameter(w.clone())


def compare(name, ours, mask, w):
    ours_kept = ours != 0
    torch_kept = mask.bool()
    diff = (ours_kept != torch_kept)
    n = int(diff.sum())
    ties = True
    if n:
        # Every disagreement must be a weight whose |w| equals the k-th smallest magnitude (a tie
        # PyTorch's topk broke one way and we the other) or an exact zero weight.
        pruned_torch = w.abs()[~torch_kept]
        thr = float(pruned_torch.max()) if pruned_torch.numel() else 0.0
        ties = bool(torch.all((w.abs()[diff] == thr) | (w[diff] == 0)))
    return n, ties


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--model", default=os.path.join(ROOT, "model.safetensors"))
    args = ap.parse_args()
    raw = open(args.model, "rb").read()
    model = call(f"{args.url}/v1/models?name=all-MiniLM-L6-v2", "POST", raw, "application/octet-stream")
    weights = load_file(args.model)
    selected = sorted(k for k, v in weights.items() if v.is_floating_point() and v.dim() >= 2)
    report = {"model": "all-MiniLM-L6-v2", "sparsity": args.sparsity, "tensors": len(selected)}
    for scope in ("layer", "global"):
        started = time.time()
        job = run_job(args.url, {"model_id": model["id"], "steps": [{"op": "prune", "method": "magnitude", "sparsity": args.sparsity, "scope": scope}]})
        seconds = time.time() - started
        out = load(call(f"{args.url}/v1/models/{job['result']['model_id']}/content", raw=True))
        holders = {k: Holder(weights[k]) for k in selected}
        t0 = time.time()
        if scope == "layer":
            for k, h in holders.items():
                tprune.l1_unstructured(h, "weight", amount=args.sparsity)
        else:
            tprune.global_unstructured([(h, "weight") for h in holders.values()], pruning_method=tprune.L1Unstructured, amount=args.sparsity)
        torch_seconds = time.time() - t0
        total_diff, all_ties, total = 0, True, 0
        for k, h in holders.items():
            n, ties = compare(k, out[k], h.weight_mask, weights[k])
            total_diff += n
            all_ties &= ties
            total += weights[k].numel()
        untouched = all(torch.equal(out[k], weights[k]) for k in weights if k not in holders and weights[k].is_floating_point())
        report[scope] = {"weights": total, "mask_differences": total_diff, "all_differences_are_ties": all_ties,
                         "unselected_tensors_unchanged": untouched, "job_seconds": round(seconds, 2),
                         "torch_prune_seconds": round(torch_seconds, 2)}
    print(json.dumps(report, indent=1))
    ok = all(report[s]["all_differences_are_ties"] and report[s]["unselected_tensors_unchanged"] for s in ("layer", "global"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
