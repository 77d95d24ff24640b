#!/usr/bin/env python3
"""all-MiniLM-L6-v2 through the service, checked against Hugging Face transformers (PyTorch).

  scripts/fetch_data.sh minilm
  WHITTLE_THREADS=2 cargo run --release &
  /work/pyenv/bin/python scripts/check_minilm_service.py [--url http://127.0.0.1:8080]

1. Uploads the model folder as it is (one multipart part per file, 1_Pooling/ included).
2. Embeddings: an `evaluate` step with `save_outputs` on 40 held-out sentences; the service's
   sentence embeddings (mean pooling over the attention mask, L2-normalised, as
   sentence-transformers computes them) against transformers' BertModel on the same folder:
   max |Δ| must be <= 1e-4.
3. int8 per channel: a `quantize` job (uniform, 8 bits, per channel, the default selection: the
   blocks' linear layers) with `eval` on the held-out sentences. The service's
   `embedding_cosine.min` must be >= 0.998 and agree within 0.002 with the same figure computed
   here from the downloaded output folder in transformers; the Spearman correlation of pairwise
   similarities is compared too.
"""
import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

import torch
from transformers import AutoTokenizer, BertModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from check_minilm_quant import SENTENCES_B  # noqa: E402  (40 held-out sentences)

FOLDER = os.path.join(HERE, "..", "target", "fixtures", "minilm")


def call(url, method="GET", body=None, content_type="application/json", raw=False):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=3600) as res:
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
    return job, call(f"{url}/v1/jobs/{job['id']}/metrics")


def multipart_folder(folder):
    boundary = "whittle-minilm-boundary"
    body = io.BytesIO()
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{rel}\"\r\n"
                       "Content-Type: application/octet-stream\r\n\r\n".encode())
            body.write(open(path, "rb").read())
            body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def embed(folder, sentences):
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    enc = tok(sentences, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=1)


def spearman(a, b):
    n = a.shape[0]
    iu = torch.triu_indices(n, n, 1)
    sa, sb = (a @ a.T)[iu[0], iu[1]].double(), (b @ b.T)[iu[0], iu[1]].double()
    ra = sa.argsort().argsort().double()
    rb = sb.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    url = ap.parse_args().url
    torch.set_num_threads(2)
    rows, failures = [], []

    def check(what, ok, detail):
        rows.append((what, "ok" if ok else "FAIL", detail))
        if not ok:
            failures.append(what)

    body, ctype = multipart_folder(FOLDER)
    model = call(f"{url}/v1/models?name=all-MiniLM-L6-v2", "POST", body, ctype)
    check("uploaded as a bert folder", model["family"] == "bert", f"{len(model['files'])} files, family {model['family']}")
    jsonl = "".join(json.dumps({"text": s}) + "\n" for s in SENTENCES_B).encode()
    data = call(f"{url}/v1/datasets?name=held-out", "POST", jsonl, "application/jsonl")

    job, _ = run_job(url, {"model_id": model["id"], "steps": [
        {"op": "evaluate", "dataset_id": data["id"], "save_outputs": True}]})
    from safetensors.torch import load
    art = next(a for a in job["result"]["artifacts"] if a["kind"] == "outputs")
    ours = load(call(f"{url}/v1/artifacts/{art['id']}/content", raw=True))["embeddings"]
    theirs = embed(FOLDER, SENTENCES_B)
    d = (ours - theirs).abs().max().item()
    check("embeddings max |Δ| vs transformers <= 1e-4", d <= 1e-4, f"{d:.2e} over {tuple(ours.shape)}")

    job, metrics = run_job(url, {"model_id": model["id"],
                                 "steps": [{"op": "quantize", "method": "uniform", "bits": 8, "granularity": "per_channel"}],
                                 "eval": {"dataset_id": data["id"]}})
    fin = metrics["final"]
    tmp = tempfile.mkdtemp()
    with tarfile.open(fileobj=io.BytesIO(call(f"{url}/v1/models/{job['result']['model_id']}/archive", raw=True))) as t:
        t.extractall(os.path.join(tmp, "q"), filter="data")
    quant = embed(os.path.join(tmp, "q"), SENTENCES_B)
    cos = (quant * theirs).sum(1)
    svc = fin["embedding_cosine"]["min"]
    check("int8 per channel: embedding_cosine.min >= 0.998", svc >= 0.998, f"{svc:.5f} (mean {fin['embedding_cosine']['mean']:.5f})")
    check("… equal to transformers' within 0.002", abs(svc - cos.min().item()) <= 0.002, f"{svc:.5f} vs {cos.min().item():.5f}")
    sp = spearman(theirs, quant)
    check("similarity Spearman within 0.002", abs(fin["similarity_spearman"] - sp) <= 0.002, f"{fin['similarity_spearman']:.5f} vs {sp:.5f}")
    width = max(len(r[0]) for r in rows)
    for what, status, detail in rows:
        print(f"{what:<{width}}  {status:<4}  {detail}")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")


if __name__ == "__main__":
    main()
