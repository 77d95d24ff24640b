#!/usr/bin/env python3
"""Calibration-based compression through the service, side by side with its calibration-free
baselines in one run, on SmolLM2-135M (imported from its GGUF) and the Debian fortunes text;
and our GPTQ checked against a reference written here in numpy.

  scripts/fetch_transformers.sh                  # the GGUF (PyPI) and the fortunes (Debian)
  WHITTLE_THREADS=2 cargo run --release -- serve &
  /work/pyenv/bin/python scripts/check_calibrated.py [--url …] [--samples 16] [--seq-len 256]
        [--tokens 4096] [--only gptq,prune]

1. Reference check (no download): a small sequential network (64 → 48 → 10, random weights)
   and a tensor dataset of correlated features are uploaded; a `gptq` job (4 bits, group 16)
   quantizes it; the script rebuilds the first layer's Hessian from the calibration rows the
   summary names and runs the GPTQ algorithm of the paper (damping, Cholesky of the inverse,
   lazy blocks, groups found at their first column) in numpy float64, then compares the codes:
   equal except where rounding sits on a tie (reported as the share of equal codes).
2. SmolLM2-135M, the fortunes split into disjoint calibration and held-out documents (seeded):
   int4 and int3 with groups of 64 — round-to-nearest (`uniform`, symmetric, the same grids),
   GPTQ, GPTQ with act_order, AWQ; affine round-to-nearest and HQQ; 50% and 2:4 sparsity —
   magnitude, Wanda, SparseGPT; `--only imatrix`: GGUF q4_k and q3_k with and without the
   importance measured on the calibration text; `--only gptq-gguf`: GPTQ's codes written as
   q4_0 / q4_1 / q5_0 GGUF against the `gguf` method's round-to-nearest of the same type, each
   file read back with llama.cpp's `gguf` package and compared with the job's model; `--only auto`: uniform q4_k against `auto`
   mixed precision at 4.5 bits per weight and at q4_k's size (`--auto-samples` windows of
   `--seq-len`); `--only cost`: GPTQ, AWQ and Wanda on 64 × 512 calibration tokens against
   one evaluation pass over as many tokens (with `--server-pid`, each job's peak RSS)
   (`--cases REGEX` runs some). Each job's
   `eval` compares the output with the input on held-out text (context 512, `--tokens`):
   KL divergence (mean), perplexity, top-1 agreement. Prints a table and the KL ratios.
3. `--only minilm`: all-MiniLM-L6-v2 (`scripts/fetch_data.sh minilm`), int4 group 64 on the
   encoder's linear layers, calibrated on 128 fortunes, evaluated on the 40 held-out sentences
   of scripts/check_minilm_quant.py: embedding cosine to the float model (min, mean).
"""
import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "target", "fixtures")
GGUF = os.path.join(ROOT, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def call(url, method="GET", body=None, content_type="application/json", raw=False):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=7200) as res:
            out = res.read()
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {url} -> {e.code}: {e.read().decode()}")
    return out if raw else json.loads(out or b"null")


def run_job(url, spec):
    started = time.time()
    job = call(f"{url}/v1/jobs", "POST", spec)
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = call(f"{url}/v1/jobs/{job['id']}")
    if job["state"] != "succeeded":
        sys.exit(f"job failed: {json.dumps(job['error'])}")
    return job, call(f"{url}/v1/jobs/{job['id']}/metrics"), time.time() - started


def safetensors_bytes(tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = arr.tobytes()
        dtype = {np.float32: "F32", np.int64: "I64"}[arr.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(blobs)


def read_safetensors(raw):
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.float32).reshape(info["shape"])
    return out


def gptq_reference(w, h, bits, group, damp=0.01, block=128):
    """GPTQ (Frantar et al. 2022, Algorithm 1 with lazy batches and groups), float64."""
    w = w.astype(np.float64).copy()
    rows, cols = w.shape
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    h += damp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    qmax = 2 ** (bits - 1) - 1
    q = np.zeros_like(w)
    scale = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = np.zeros((rows, i2 - i1))
        for i in range(i1, i2):
            if i % group == 0:
                scale = np.abs(w[:, i:i + group]).max(axis=1) / qmax
            col = w[:, i]
            with np.errstate(divide="ignore", invalid="ignore"):
                codes = np.where(scale > 0, np.clip(np.round(col / scale), -qmax, qmax), 0)
            q[:, i] = codes * scale
            e = (col - q[:, i]) / hinv[i, i]
            w[:, i + 1:i2] -= np.outer(e, hinv[i, i + 1:i2])
            err[:, i - i1] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q


def reference_check(url):
    rng = np.random.default_rng(0)
    n, feats, hidden = 512, 64, 48
    latent = rng.normal(size=(n, 6)) @ rng.normal(size=(6, feats))
    x = (latent + 0.1 * rng.normal(size=(n, feats))).astype(np.float32)
    x[:, ::9] *= 4  # a few loud features
    y = rng.integers(0, 10, size=n).astype(np.int64)
    data = call(f"{url}/v1/datasets?name=gptq-ref", "POST",
                safetensors_bytes({"x": x, "y": y}), "application/octet-stream")
    arch = {"kind": "sequential", "input_shape": [feats], "layers": [
        {"type": "linear", "name": "fc1", "in_features": feats, "out_features": hidden},
        {"type": "relu"},
        {"type": "linear", "name": "fc2", "in_features": hidden, "out_features": 10}]}
    w1 = (rng.normal(size=(hidden, feats)) / 8).astype(np.float32)
    tensors = {"fc1.weight": w1, "fc1.bias": np.zeros(hidden, np.float32),
               "fc2.weight": (rng.normal(size=(10, hidden)) / 7).astype(np.float32),
               "fc2.bias": np.zeros(10, np.float32)}
    raw = safetensors_bytes(tensors)
    # The architecture travels in the safetensors metadata.
    n_h = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n_h])
    header["__metadata__"] = {"whittle.architecture": json.dumps(arch)}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    raw = len(h).to_bytes(8, "little") + h + raw[8 + n_h:]
    model = call(f"{url}/v1/models?name=gptq-ref", "POST", raw, "application/octet-stream")
    job, m, _ = run_job(url, {"model_id": model["id"], "steps": [
        {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 16, "clip": False, "include": ["fc1.weight"],
         "calibration": {"dataset_id": data["id"], "samples": 256, "seed": 7}}]})
    rows = m["steps"][0]["summary"]["calibration"]["indices"]
    xc = x[rows].astype(np.float64)
    hess = 2 * xc.T @ xc / len(rows)
    ours = read_safetensors(call(f"{url}/v1/models/{job['result']['model_id']}/content", raw=True))["fc1.weight"]
    theirs = gptq_reference(w1, hess, 4, 16)
    # Codes: each value divided by its group's step (the same scales on both sides up to
    # float rounding).
    same = np.isclose(ours, theirs, rtol=1e-4, atol=1e-6).mean()
    layer = m["steps"][0]["layers"][0]
    print(f"GPTQ vs numpy reference (fc1 48x64, 4 bits, group 16, 256 rows): "
          f"{same * 100:.2f}% of values equal; output error ours {layer['output_error']:.5f}, "
          f"RTN {layer['output_error_rtn']:.5f}")
    return same


def check_gguf_file(url, job):
    """Reads a job's GGUF artifact with llama.cpp's `gguf` package, dequantizes the
    unpermuted tensors with its own decoders and compares them with the job's output model."""
    import gguf
    art = next(a for a in job["result"]["artifacts"] if a["kind"] == "gguf")
    path = "/tmp/whittle-check.gguf"
    open(path, "wb").write(call(f"{url}/v1/artifacts/{art['id']}/content", raw=True))
    reader = gguf.GGUFReader(path)
    ours = read_safetensors(call(f"{url}/v1/models/{job['result']['model_id']}/files/model.safetensors", raw=True))
    worst, checked = 0.0, 0
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[2] not in ("attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            continue
        hf = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[parts[2]]
        mine = ours[f"model.layers.{parts[1]}.{hf}.weight"]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine.shape)
        worst = max(worst, float(np.abs(theirs.astype(np.float32) - mine).max()))
        checked += 1
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return f"gguf reader: {checked} tensors, max |Δ| vs our model {worst:.3g}, types {types}"


def read_fortunes(path):
    docs, cur = [], []
    for line in open(path, encoding="utf-8").read().split("\n"):
        if line == "%":
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    return [d for d in docs if d.strip()]


def smollm2(url, args):
    model = call(f"{url}/v1/models?name=smollm2", "POST", open(GGUF, "rb").read(), "application/octet-stream")
    docs = []
    for f in ["wisdom", "people", "science", "politics", "work"]:
        docs += read_fortunes(os.path.join(ROOT, "fortunes", f))
    random.Random(0).shuffle(docs)
    half = len(docs) // 2
    up = lambda name, ds: call(f"{url}/v1/datasets?name={name}&format=jsonl", "POST",
                               "".join(json.dumps({"text": d}) + "\n" for d in ds).encode(), "application/jsonl")
    calib, held = up("calibration", docs[:half]), up("held-out", docs[half:])
    calibration = {"dataset_id": calib["id"], "samples": args.samples, "seq_len": args.seq_len, "seed": 0}
    ev = {"dataset_id": held["id"], "context": 512, "max_tokens": args.tokens}
    cases = []
    if "gptq" in args.only:
        for bits in (4, 3):
            cases += [
                (f"int{bits} g64 RTN", {"op": "quantize", "method": "uniform", "bits": bits,
                                        "granularity": "per_group", "group_size": 64}),
                # Round-to-nearest with a clipping search weighted by the calibration's Σx² per
                # input column (the Hessian's diagonal: the weighting GPTQ's `clip` uses).
                (f"int{bits} g64 RTN, clip search", {"op": "quantize", "method": "uniform", "bits": bits,
                                                     "granularity": "per_group", "group_size": 64,
                                                     "importance": {"dataset_id": calib["id"],
                                                                    "samples": args.samples}}),
                (f"int{bits} g64 GPTQ", {"op": "quantize", "method": "gptq", "bits": bits, "group_size": 64,
                                         "calibration": calibration}),
                (f"int{bits} g64 GPTQ act_order", {"op": "quantize", "method": "gptq", "bits": bits,
                                                   "group_size": 64, "act_order": True,
                                                   "calibration": calibration}),
                (f"int{bits} g64 GPTQ act_order, full range", {"op": "quantize", "method": "gptq", "bits": bits,
                                                               "group_size": 64, "act_order": True, "clip": False,
                                                               "calibration": calibration}),
                (f"int{bits} g64 AWQ", {"op": "quantize", "method": "awq", "bits": bits, "group_size": 64,
                                        "calibration": calibration}),
                (f"int{bits} g64 RTN affine", {"op": "quantize", "method": "uniform", "bits": bits,
                                               "symmetric": False, "granularity": "per_group",
                                               "group_size": 64}),
                (f"int{bits} g64 HQQ (affine)", {"op": "quantize", "method": "hqq", "bits": bits,
                                                 "group_size": 64}),
                (f"int{bits} g64 GPTQ affine act_order", {"op": "quantize", "method": "gptq", "bits": bits,
                                                          "group_size": 64, "symmetric": False,
                                                          "act_order": True, "calibration": calibration}),
                (f"int{bits} g64 GPTQ affine act_order, full range", {
                    "op": "quantize", "method": "gptq", "bits": bits, "group_size": 64, "symmetric": False,
                    "act_order": True, "clip": False, "calibration": calibration}),
            ]
    if "imatrix" in args.only:
        for ty in ("q4_k", "q3_k"):
            cases += [
                (f"{ty}", {"op": "quantize", "method": "gguf", "type": ty}),
                (f"{ty} + imatrix", {"op": "quantize", "method": "gguf", "type": ty,
                                     "importance": {"dataset_id": calib["id"], "samples": args.samples}}),
            ]
    if "gptq-gguf" in args.only:
        # GPTQ's codes in GGUF blocks against llama.cpp-style round-to-nearest of the same
        # type (the `gguf` method), and the file checked with llama.cpp's own `gguf` reader.
        for ty, bits, sym in (("q4_0", 4, True), ("q4_1", 4, False), ("q5_0", 5, True)):
            cases += [
                (f"{ty} RTN (gguf)", {"op": "quantize", "method": "gguf", "type": ty}),
                (f"{ty} GPTQ act_order", {"op": "quantize", "method": "gptq", "bits": bits, "symmetric": sym,
                                          "act_order": True, "format": "gguf", "calibration": calibration}),
            ]
    if "auto" in args.only:
        # Mixed precision: uniform q4_k (most SmolLM2 rows fall back to q5_0) against `auto`
        # at 4.5 bits per weight and at uniform q4_k's own size, on a small draw (each
        # tensor and choice costs a pass over it).
        auto_cal = {**calibration, "samples": args.auto_samples}
        cands = ["q3_k", "q4_0", "q4_k", "q5_0", "q8_0"]
        cases += [
            ("q4_k", {"op": "quantize", "method": "gguf", "type": "q4_k"}),
            ("q4_k + imatrix", {"op": "quantize", "method": "gguf", "type": "q4_k",
                                "importance": {"dataset_id": calib["id"], "samples": args.auto_samples}}),
            ("auto 4.5 bpw", {"op": "quantize", "method": "auto", "budget": {"bits_per_weight": 4.5},
                              "candidates": cands, "calibration": auto_cal}),
            ("auto = q4_k size", "q4_k"),
        ]
    if "cost" in args.only:
        # Issue 17's cost ratios: each method's calibration time on 64 × 512 tokens against one
        # forward pass over the same number of tokens (an evaluation of the calibration text at
        # context 512: the forward plus the per-token log-softmax, so a generous pass time).
        big = {**calibration, "samples": 64, "seq_len": 512}
        cases += [
            ("cost: forward 32768 tokens", {"op": "evaluate", "dataset_id": calib["id"], "context": 512,
                                            "max_tokens": 64 * 512}),
            ("cost: int4 g64 GPTQ", {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
                                     "calibration": big}),
            ("cost: int4 g64 GPTQ act_order", {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
                                               "act_order": True, "calibration": big}),
            ("cost: int3 g64 GPTQ act_order", {"op": "quantize", "method": "gptq", "bits": 3, "group_size": 64,
                                               "act_order": True, "calibration": big}),
            ("cost: int4 g64 AWQ", {"op": "quantize", "method": "awq", "bits": 4, "group_size": 64,
                                    "calibration": big}),
            ("cost: 50% Wanda", {"op": "prune", "method": "wanda", "sparsity": 0.5, "calibration": big}),
        ]
    if "prune" in args.only:
        for label, target, nm in (("50%", {"sparsity": 0.5}, False), ("2:4", {"n": 2, "m": 4}, True)):
            cases += [
                (f"{label} magnitude", {"op": "prune", "method": "n_m" if nm else "magnitude",
                                        **({} if nm else {"scope": "layer"}), **target}),
                (f"{label} Wanda", {"op": "prune", "method": "wanda", "calibration": calibration, **target}),
                (f"{label} SparseGPT", {"op": "prune", "method": "sparsegpt", "calibration": calibration, **target}),
            ]
    if args.cases:
        import re
        cases = [c for c in cases if re.search(args.cases, c[0])]
    results = {}
    print(f"{'case':46} {'KL mean':>9} {'ppl':>9} {'top-1':>7} {'base ppl':>9} {'job s':>7}")
    sizes, peaks, forward = {}, {}, None
    for label, step in cases:
        if isinstance(step, str):
            # auto with the selected bytes of an earlier case as its budget.
            step = {"op": "quantize", "method": "auto", "budget": {"size_bytes": sizes[step][0]},
                    "candidates": cands, "calibration": auto_cal}
        if args.server_pid:
            # Reset the server's peak resident memory (VmHWM) so each job reads its own.
            open(f"/proc/{args.server_pid}/clear_refs", "w").write("5")
        job, m, secs = run_job(url, {"model_id": model["id"], "eval": ev, "steps": [step]})
        if args.server_pid:
            hwm = [l for l in open(f"/proc/{args.server_pid}/status") if l.startswith("VmHWM")][0]
            peaks[label] = int(hwm.split()[1]) * 1024
        s0 = m["steps"][0]
        if step["op"] == "evaluate":
            fig = s0["summary"]
            forward = fig["tokens"] / fig["tokens_per_second"]
            print(f"{label:46} {fig['tokens']} tokens at {fig['tokens_per_second']:.0f} tokens/s: "
                  f"{forward:.1f} s; peak RSS {peaks.get(label, 0) / 2**20:.0f} MiB", flush=True)
            continue
        if label.startswith("cost:") and forward:
            cal = s0["summary"]["calibration_seconds"]
            print(f"{label:46} calibration {cal:.1f} s = {cal / forward:.2f}× the forward pass; "
                  f"peak RSS {peaks.get(label, 0) / 2**20:.0f} MiB", flush=True)
        fin = m["final"]
        kl = fin["kl_divergence"]["mean"]
        results[label] = kl
        extra = ""
        if step.get("method") in ("gguf", "auto"):
            s0 = m["steps"][0]
            q = [l for l in s0["layers"] if l["type"] not in ("f32", "f16", "bf16", "skipped")]
            nbytes = sum(l["bytes"] for l in q)
            numel = sum(int(np.prod(l["shape"])) for l in q)
            sizes[label] = (nbytes, numel)
            extra = f"  selected {nbytes} B = {8 * nbytes / numel:.3f} bpw, file {s0['summary']['gguf_bytes']} B"
            if step["method"] == "auto":
                su = s0["summary"]
                extra += (f", types {su['types']}, predicted {su['predicted_divergence']:.4f}"
                          f" / measured {su['measured_divergence']:.4f} on calibration, {su['passes']} passes")
        if step.get("method") == "gptq" and step.get("format") == "gguf":
            extra += "  " + check_gguf_file(url, job)
        print(f"{label:46} {kl:9.5f} {fin['perplexity']:9.3f} {fin['top1_agreement']:7.4f} "
              f"{m['baseline']['perplexity']:9.3f} {secs:7.0f}{extra}", flush=True)
    for bits in (4, 3):
        r = results.get(f"int{bits} g64 RTN")
        for v in ("RTN, clip search", "GPTQ", "GPTQ act_order", "GPTQ act_order, full range", "AWQ"):
            g = results.get(f"int{bits} g64 {v}")
            if r and g:
                print(f"int{bits} g64: {v} KL / RTN KL = {g / r:.3f}")
        r = results.get(f"int{bits} g64 RTN affine")
        for v in ("HQQ (affine)", "GPTQ affine act_order", "GPTQ affine act_order, full range"):
            h = results.get(f"int{bits} g64 {v}")
            if r and h:
                print(f"int{bits} g64: {v} KL / affine RTN KL = {h / r:.3f}")
    for ty in ("q4_k", "q3_k"):
        a, b = results.get(ty), results.get(f"{ty} + imatrix")
        if a and b:
            print(f"{ty}: KL with imatrix / without = {b / a:.3f}")
    for ty in ("q4_0", "q4_1", "q5_0"):
        a, b = results.get(f"{ty} RTN (gguf)"), results.get(f"{ty} GPTQ act_order")
        if a and b:
            print(f"{ty}: GPTQ KL / RTN KL = {b / a:.3f}")
    for label in ("auto 4.5 bpw", "auto = q4_k size"):
        a, u = results.get(label), results.get("q4_k")
        if a and u:
            print(f"{label}: KL / uniform q4_k KL = {a / u:.3f}")
    for label in ("50%", "2:4"):
        mag = results.get(f"{label} magnitude")
        for v in ("Wanda", "SparseGPT"):
            k = results.get(f"{label} {v}")
            if mag and k:
                print(f"{label}: {v} KL / magnitude KL = {k / mag:.3f}")


def minilm(url, args):
    """all-MiniLM-L6-v2 (scripts/fetch_data.sh minilm), int4 group 64 on the encoder's linear
    layers, calibrated on fortunes, held-out: the 40 sentences of scripts/check_minilm_quant.py."""
    import io
    from check_minilm_quant import SENTENCES_B
    folder = os.path.join(ROOT, "minilm")
    boundary = "whittle-calibrated-boundary"
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
    model = call(f"{url}/v1/models?name=minilm", "POST", body.getvalue(), f"multipart/form-data; boundary={boundary}")
    docs = []
    for f in ["wisdom", "people", "science", "politics", "work"]:
        docs += read_fortunes(os.path.join(ROOT, "fortunes", f))
    random.Random(0).shuffle(docs)
    up = lambda name, lines: call(f"{url}/v1/datasets?name={name}&format=jsonl", "POST",
                                  "".join(json.dumps({"text": d}) + "\n" for d in lines).encode(), "application/jsonl")
    calib, held = up("calibration", docs[:len(docs) // 2]), up("sentences-b", SENTENCES_B)
    calibration = {"dataset_id": calib["id"], "samples": 128, "seq_len": 128, "seed": 0}
    cases = [
        ("int4 g64 RTN", {"op": "quantize", "method": "uniform", "bits": 4, "granularity": "per_group", "group_size": 64}),
        ("int4 g64 GPTQ", {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 64, "calibration": calibration}),
        ("int4 g64 GPTQ act_order", {"op": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
                                     "act_order": True, "calibration": calibration}),
        ("int4 g64 AWQ", {"op": "quantize", "method": "awq", "bits": 4, "group_size": 64, "calibration": calibration}),
        ("int4 g64 HQQ (affine)", {"op": "quantize", "method": "hqq", "bits": 4, "group_size": 64}),
    ]
    print(f"{'MiniLM case':28} {'cos min':>8} {'cos mean':>9} {'job s':>6}")
    for label, step in cases:
        _, m, secs = run_job(url, {"model_id": model["id"], "eval": {"dataset_id": held["id"]}, "steps": [step]})
        c = m["final"]["embedding_cosine"]
        print(f"{label:46} {c['min']:8.4f} {c['mean']:9.5f} {secs:6.0f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--server-pid", type=int, default=0,
                    help="the server's pid (same machine): report each job's peak RSS")
    ap.add_argument("--auto-samples", type=int, default=2, help="calibration windows of `auto`")
    ap.add_argument("--only", default="reference,gptq,prune")
    ap.add_argument("--cases", default="", help="a regular expression over the case labels")
    args = ap.parse_args()
    args.only = args.only.split(",")
    if "reference" in args.only:
        same = reference_check(args.url)
        if same < 0.99:
            sys.exit("GPTQ differs from the reference")
    if "minilm" in args.only:
        minilm(args.url, args)
    if any(k in args.only for k in ("gptq", "prune", "imatrix", "auto", "gptq-gguf", "cost")):
        smollm2(args.url, args)


if __name__ == "__main__":
    main()
