#!/usr/bin/env python3
"""Quantize all-MiniLM-L6-v2 through the API and measure sentence-embedding fidelity.

  scripts/fetch_data.sh minilm
  cargo run --release &
  pip install torch transformers safetensors      # the reference implementation of BERT
  python3 scripts/check_minilm_quant.py [--url http://127.0.0.1:8080]

For each quantization job (int8 per-channel, int4 group-64 plain round-to-nearest, int4
group-64 with the error-minimising clipping search, symmetric and affine, kmeans-16, nf4) it
downloads the dequantized output, runs the model in PyTorch/transformers (mean pooling + L2
normalisation, as sentence-transformers does) on 24 sentences and reports the cosine
similarity of each sentence's embedding to the float model's (min and mean). The int8 packed
artifact is also checked code-for-code against torch.quantize_per_channel
(scripts/check_int8_vs_torch.py).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from transformers import AutoTokenizer, BertModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "target", "fixtures", "minilm")

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The cat sits outside.",
    "The new movie is awesome.", "The new movie is so great.", "I love pasta with tomato sauce.",
    "Quantum computers use qubits instead of bits.", "The stock market fell sharply on Monday.",
    "Please send me the report by Friday.", "Neural networks can be pruned without losing accuracy.",
    "The weather forecast predicts heavy rain tomorrow.", "She plays the piano beautifully.",
    "Our train was delayed by two hours.", "He fixed the bicycle in the garage.",
    "Distillation transfers knowledge from a large model to a small one.",
    "The library opens at nine in the morning.", "A dog is running through the snow.",
]


def call(url, method="GET", body=None, content_type="application/json", raw=False):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req) as res:
            out = res.read()
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {url} -> {e.code}: {e.read().decode()}")
    return out if raw else json.loads(out or b"null")


def run_job(url, spec):
    job = call(f"{url}/v1/jobs", "POST", spec)
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = call(f"{url}/v1/jobs/{job['id']}")
    if job["state"] != "succeeded":
        sys.exit(f"job failed: {job['error']}")
    return job


def embed(model_dir, tok):
    model = BertModel.from_pretrained(model_dir).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = (out * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--only", help="run only the cases whose label contains this text")
    args = ap.parse_args()
    raw = open(os.path.join(ROOT, "model.safetensors"), "rb").read()
    model = call(f"{args.url}/v1/models?name=all-MiniLM-L6-v2", "POST", raw, "application/octet-stream")
    tok = AutoTokenizer.from_pretrained(ROOT)
    reference = embed(ROOT, tok)
    pair = float(reference[0] @ reference[1])
    cases = {
        "int8 per-channel (packed)": {"method": "uniform", "bits": 8, "granularity": "per_channel", "format": "packed"},
        "int4 group-64 symmetric RTN": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64},
        "int4 group-64 symmetric + clipping search": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64, "search": True},
        "int4 group-64 affine RTN": {"method": "uniform", "bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
        "int4 group-64 affine + clipping search": {"method": "uniform", "bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64, "search": True},
        "nf4 group-64": {"method": "nf4", "group_size": 64},
        "kmeans 16 clusters (4 bits, per tensor)": {"method": "kmeans", "clusters": 16, "init": "linear"},
        "int4 group-64 symmetric RTN, embeddings float": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64, "exclude": ["embeddings.*"]},
        "int4 group-64 symmetric + search, embeddings float": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64, "search": True, "exclude": ["embeddings.*"]},
        "int4 group-64 affine + search, embeddings float": {"method": "uniform", "bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64, "search": True, "exclude": ["embeddings.*"]},
        "nf4 group-64, embeddings float": {"method": "nf4", "group_size": 64, "exclude": ["embeddings.*"]},
    }
    report = {"model": "all-MiniLM-L6-v2", "sentences": len(SENTENCES),
              "float_cos(eating food, piece of bread)": round(pair, 4), "results": {}}
    tmp = tempfile.mkdtemp()
    try:
        for label, step in cases.items():
            if args.only and args.only not in label:
                continue
            step = dict(step, op="quantize")
            started = time.time()
            job = run_job(args.url, {"model_id": model["id"], "steps": [step]})
            seconds = time.time() - started
            d = os.path.join(tmp, "q")
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(ROOT, d)
            with open(os.path.join(d, "model.safetensors"), "wb") as f:
                f.write(call(f"{args.url}/v1/models/{job['result']['model_id']}/content", raw=True))
            e = embed(d, tok)
            cos = (e * reference).sum(1)
            m = call(f"{args.url}/v1/jobs/{job['id']}/metrics")
            r = {"min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5),
                 "cos(eating food, piece of bread)": round(float(e[0] @ e[1]), 4),
                 "bits_per_weight": round(m["steps"][0]["summary"]["bits_per_weight"], 3), "job_seconds": round(seconds, 1)}
            if step.get("format") == "packed":
                art = next(a for a in job["result"]["artifacts"] if a["kind"] == "packed")
                p = os.path.join(tmp, "packed.safetensors")
                with open(p, "wb") as f:
                    f.write(call(f"{args.url}/v1/artifacts/{art['id']}/content", raw=True))
                chk = subprocess.run([sys.executable, os.path.join(HERE, "check_int8_vs_torch.py"),
                                      os.path.join(ROOT, "model.safetensors"), p], capture_output=True, text=True)
                r["torch_quantize_per_channel_check"] = chk.stdout.strip().splitlines()[-1] if chk.stdout else chk.stderr
                r["torch_check_passed"] = chk.returncode == 0
            report["results"][label] = r
            print(label, r, file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
