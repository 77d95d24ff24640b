#!/usr/bin/env python3
"""GGUF exports of a llama model, read by three tools nobody here wrote.

  scripts/fetch_transformers.sh
  WHITTLE_THREADS=2 cargo run --release &
  pip install cmake && pip install llama-cpp-python    # optional: builds llama.cpp (minutes)
  /work/pyenv/bin/python scripts/check_llama_gguf.py [--url …] [--types q8_0,q4_k] [--tokens 2048]

SmolLM2-135M (imported from its GGUF) is quantized by the service with `method: gguf` for each
type, with a job `eval` on the Debian fortunes (context 512) that saves its windows. Each GGUF
artifact is then:
1. read with llama.cpp's `gguf` package (GGUFReader): `general.architecture` llama, the
   hyper-parameters, llama.cpp tensor names, the tokenizer arrays, and the types the summary
   reports (k-quants fall back per tensor where rows of 576 do not split into 256-blocks);
2. loaded by transformers' GGUF reader (`from_pretrained(dir, gguf_file=…)`): its perplexity on
   the service's windows must equal the service's within 1%, and its tokenizer (rebuilt from the
   file's metadata) must give the service's token ids;
3. run by llama.cpp itself through llama-cpp-python when it is installed: perplexity on the same
   token windows within 1% of the service's.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import smollm2_reference as ref  # noqa: E402
from check_smollm2 import call, outputs_of, run_job, windows_of  # noqa: E402


def perplexity(logits_of, windows, begins):
    """Perplexity over the service's scoring: each target once, by the first window predicting it."""
    nll, n, until = 0.0, 0, 0
    for w, begin in zip(windows, begins):
        logp = logits_of(w)
        for t in range(max(until, begin + 1), begin + len(w)):
            nll -= logp[t - 1 - begin, w[t - begin]].item()
            n += 1
        until = begin + len(w)
    return math.exp(nll / n), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--types", default="q8_0,q4_k")
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    url = args.url
    torch.set_num_threads(2)
    rows, failures = [], []

    def check(what, ok, detail):
        rows.append((what, "ok" if ok else "FAIL", detail))
        if not ok:
            failures.append(what)

    gguf_in = open(os.path.join(ref.MODEL_DIR, ref.GGUF_NAME), "rb").read()
    model = call(f"{url}/v1/models?name=smollm2-135m", "POST", gguf_in, "application/octet-stream")
    docs = [d for f in ref.FORTUNE_FILES for d in ref.read_fortunes(os.path.join(ref.FORTUNES_DIR, f))]
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    data = call(f"{url}/v1/datasets?name=fortunes&format=jsonl", "POST", jsonl, "application/jsonl")
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        rows.append(("llama.cpp (llama-cpp-python)", "skip", "not installed: pip install cmake && pip install llama-cpp-python"))

    for ty in args.types.split(","):
        job, metrics = run_job(url, {
            "model_id": model["id"],
            "steps": [{"op": "quantize", "method": "gguf", "type": ty}],
            "eval": {"dataset_id": data["id"], "context": 512, "max_tokens": args.tokens, "save_outputs": True}})
        summary = metrics["steps"][0]["summary"]
        ours = metrics["final"]["perplexity"]
        windows, begins = windows_of(outputs_of(url, job)[-1])
        art = next(a for a in job["result"]["artifacts"] if a["kind"] == "gguf")
        d = tempfile.mkdtemp()
        path = os.path.join(d, f"smollm2-{ty}.gguf")
        with open(path, "wb") as f:
            f.write(call(f"{url}/v1/artifacts/{art['id']}/content", raw=True))

        # 1. llama.cpp's gguf package.
        from gguf import GGUFReader
        r = GGUFReader(path)
        field = lambda k: r.fields[k].contents() if k in r.fields else None
        names = {t.name: t.tensor_type.name.lower() for t in r.tensors}
        want_types = {f["tensor"]: f["type"] for f in summary["fallbacks"]}
        ok = (field("general.architecture") == "llama" and field("llama.block_count") == 30
              and field("llama.attention.head_count_kv") == 3 and len(field("tokenizer.ggml.tokens")) == 49152
              and "blk.29.ffn_down.weight" in names and "output.weight" not in names)
        check(f"{ty}: gguf-py reads llama.cpp's layout", ok,
              f"{len(names)} tensors, arch {field('general.architecture')}, {len(field('tokenizer.ggml.tokens'))} tokens, "
              f"{len(field('tokenizer.ggml.merges'))} merges")
        from collections import Counter
        in_file = Counter(names.values())
        reported = Counter(l["type"] for l in metrics["steps"][0]["layers"])
        check(f"{ty}: tensor types as the step's layers say", in_file == reported,
              f"file {dict(in_file)}; {len(want_types)} fallbacks reported")

        # 2. transformers' GGUF loader and its tokenizer rebuild.
        from transformers import AutoTokenizer, LlamaForCausalLM
        tok = AutoTokenizer.from_pretrained(d, gguf_file=os.path.basename(path))
        text = "\n\n".join(docs)
        ids = tok(text, add_special_tokens=True)["input_ids"][: len(windows[0])]
        check(f"{ty}: transformers' rebuilt tokenizer gives the service's ids", ids == windows[0],
              f"first window of {len(windows[0])} ids")
        started = time.time()
        hf = LlamaForCausalLM.from_pretrained(d, gguf_file=os.path.basename(path), dtype=torch.float32,
                                              attn_implementation="eager").eval()
        with torch.inference_mode():
            theirs, n = perplexity(lambda w: F.log_softmax(hf(input_ids=torch.tensor([w])).logits[0].double(), -1),
                                   windows, begins)
        check(f"{ty}: perplexity = transformers' (gguf_file) within 1%", abs(ours / theirs - 1) < 0.01,
              f"{ours:.4f} vs {theirs:.4f} over {n} tokens ({time.time() - started:.0f} s)")

        # 3. llama.cpp itself.
        if llama_cpp is not None:
            llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=2, verbose=False)

            def run(w):
                llm.reset()
                llm.eval(w)
                return F.log_softmax(torch.tensor(llm.scores[: len(w)]).double(), -1)
            cpp, n = perplexity(run, windows, begins)
            check(f"{ty}: perplexity = llama.cpp's within 1%", abs(ours / cpp - 1) < 0.01,
                  f"{ours:.4f} vs {cpp:.4f} over {n} tokens")

    width = max(len(r[0]) for r in rows)
    for what, status, detail in rows:
        print(f"{what:<{width}}  {status:<4}  {detail}")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")


if __name__ == "__main__":
    main()
