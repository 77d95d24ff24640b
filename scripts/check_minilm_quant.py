#!/usr/bin/env python3
"""Quantize all-MiniLM-L6-v2 through the API and measure sentence-embedding fidelity.

  scripts/fetch_data.sh minilm
  cargo run --release &
  pip install torch transformers safetensors      # the reference implementation of BERT
  python3 scripts/check_minilm_quant.py [--url http://127.0.0.1:8080]

For each quantization job (int8 per-channel, int4 group-64 plain round-to-nearest, int4
group-64 with the error-minimising clipping search, plain or weighted by per-column importance,
symmetric and affine, kmeans-16, nf4) it downloads the dequantized output, runs the model in
PyTorch/transformers (mean pooling + L2 normalisation, as sentence-transformers does) on 24
sentences (set A) and 40 held-out ones (set B) and reports the cosine similarity of each
sentence's embedding to the float model's (min and mean). The importance weights (mean square of
each linear layer's input features) come from 16 other calibration sentences run here in
PyTorch and are uploaded as a safetensors model (`importance.model_id`). The int8 packed
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


# A second, held-out set: the worst sentence of 24 is one sentence, so both sets are reported.
SENTENCES_B = ["I forgot my umbrella at the office.", "The river flooded the village last night.", "Can you recommend a good book about history?",
 "The team celebrated their victory with a parade.", "My laptop battery drains too quickly.", "A young boy is flying a kite on the beach.",
 "The price of gasoline went up again.", "The doctor advised him to get more sleep.", "Birds migrate south for the winter.",
 "The orchestra performed Beethoven's ninth symphony.", "Please turn off the lights when you leave.", "The startup raised ten million dollars in funding.",
 "An elderly woman is knitting a scarf.", "The bridge was closed for repairs.", "Two kids are building a sandcastle.",
 "The password must contain at least eight characters.", "He apologized for being late to the meeting.", "The bakery sells fresh bread every morning.",
 "Volcanoes can erupt without much warning.", "The students are preparing for their final exams.", "A chef is slicing onions in the kitchen.",
 "The invoice is attached to this email.", "Electric cars are becoming more affordable.", "The cat knocked a glass off the table.",
 "We watched the sunset from the hilltop.", "The new law takes effect in January.", "A man is playing a guitar on stage.",
 "The server crashed during the update.", "She adopted a puppy from the shelter.", "The hikers reached the summit before noon.",
 "Interest rates are expected to rise.", "The painting was sold at auction for a record price.", "A woman is slicing a tomato.",
 "The train station is crowded during rush hour.", "He scored the winning goal in the final minute.", "The baby is sleeping peacefully.",
 "Our internet connection keeps dropping.", "The garden is full of blooming roses.", "They signed the contract yesterday afternoon.",
 "A group of people are dancing at a wedding."]

# Calibration text for the importance weights (disjoint from both evaluation sets).
CALIBRATION = ["The quick brown fox jumps over the lazy dog.", "It was the best of times, it was the worst of times.",
       "Machine learning models are trained on large datasets.", "He went to the market to buy apples and oranges.",
       "The conference will be held in Berlin next spring.", "Please remember to water the plants while I am away.",
       "The committee rejected the proposal after a long debate.", "Children were playing football in the park.",
       "The recipe calls for two cups of flour and one egg.", "Scientists discovered a new species of frog in the rainforest.",
       "Traffic was heavy on the highway this morning.", "She wrote a letter to her grandmother.",
       "The museum displays paintings from the Renaissance.", "Our flight was cancelled because of the storm.",
       "Astronomers observed a distant galaxy with the telescope.", "The software update fixed several security bugs."]


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


def embed(model_dir, tok, sentences=SENTENCES):
    model = BertModel.from_pretrained(model_dir).eval()
    enc = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = (out * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=1)


def importance_file(model_dir, tok, path):
    """Per-column importance of every linear layer's weight: the mean square of the input
    feature the column multiplies, over the real tokens of the calibration sentences
    (llama.cpp's importance matrix). Saved as safetensors named like the weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    model = BertModel.from_pretrained(model_dir).eval()
    enc = tok(CALIBRATION, padding=True, truncation=True, return_tensors="pt")
    keep = enc["attention_mask"].reshape(-1).bool()
    stats, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                if x.shape[0] != keep.shape[0]:
                    return  # the pooler (first token only), which sentence embeddings do not use
                x = x[keep]
                stats[name + ".weight"] = (x * x).mean(0).contiguous()
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    missing = [k for k in stats if k not in names]
    if missing:
        sys.exit(f"importance names not in the model file: {missing[:3]}")
    save_file(stats, path)
    return len(stats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--only", help="run only the cases whose label contains this text")
    args = ap.parse_args()
    raw = open(os.path.join(ROOT, "model.safetensors"), "rb").read()
    model = call(f"{args.url}/v1/models?name=all-MiniLM-L6-v2", "POST", raw, "application/octet-stream")
    tok = AutoTokenizer.from_pretrained(ROOT)
    reference = embed(ROOT, tok)
    reference_b = embed(ROOT, tok, SENTENCES_B)
    tmp = tempfile.mkdtemp()
    imp_path = os.path.join(tmp, "importance.safetensors")
    n_imp = importance_file(ROOT, tok, imp_path)
    imp = call(f"{args.url}/v1/models?name=all-MiniLM-L6-v2-importance", "POST", open(imp_path, "rb").read(),
               "application/octet-stream")
    importance = {"model_id": imp["id"]}
    pair = float(reference[0] @ reference[1])
    cases = {
        "int8 per-channel (packed)": {"method": "uniform", "bits": 8, "granularity": "per_channel", "format": "packed"},
        "int4 group-64 symmetric RTN": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64},
        "int4 group-64 symmetric + clipping search": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64, "search": True},
        "int4 group-64 symmetric + importance-weighted search": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64, "importance": importance},
        "int4 group-64 affine RTN": {"method": "uniform", "bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
        "int4 group-64 affine + clipping search": {"method": "uniform", "bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64, "search": True},
        "int4 group-64 affine + importance-weighted search": {"method": "uniform", "bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64, "importance": importance},
        "nf4 group-64": {"method": "nf4", "group_size": 64},
        "kmeans 16 clusters (4 bits, per tensor)": {"method": "kmeans", "clusters": 16, "init": "linear"},
        "int4 group-64 symmetric RTN, embeddings float": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64, "exclude": ["embeddings.*"]},
        "int4 group-64 symmetric + search, embeddings float": {"method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64, "search": True, "exclude": ["embeddings.*"]},
        "int4 group-64 affine + search, embeddings float": {"method": "uniform", "bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64, "search": True, "exclude": ["embeddings.*"]},
        "nf4 group-64, embeddings float": {"method": "nf4", "group_size": 64, "exclude": ["embeddings.*"]},
    }
    report = {"model": "all-MiniLM-L6-v2", "sentences": len(SENTENCES), "sentences_b": len(SENTENCES_B),
              "importance": {"calibration_sentences": len(CALIBRATION), "tensors": n_imp},
              "float_cos(eating food, piece of bread)": round(pair, 4), "results": {}}
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
            cos_b = (embed(d, tok, SENTENCES_B) * reference_b).sum(1)
            m = call(f"{args.url}/v1/jobs/{job['id']}/metrics")
            r = {"min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5),
                 "min_cosine_b": round(float(cos_b.min()), 5), "mean_cosine_b": round(float(cos_b.mean()), 5),
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
