#!/usr/bin/env python3
"""Training transformers through the service, on real models and real text, checked against
Hugging Face transformers (PyTorch) and scikit-learn.

  scripts/fetch_data.sh minilm && scripts/fetch_transformers.sh fortunes smollm2
  WHITTLE_THREADS=2 target/release/whittle serve --data-dir /tmp/wt --bind 127.0.0.1:8090 &
  /work/pyenv/bin/python scripts/check_transformer_training.py --url http://127.0.0.1:8090 \
      [--parts classify,distill,smollm2]

classify  The five Debian `fortunes` files wisdom, people, science, politics, work as five
          classes (documents of at most 60 words; 200 per class to train, 100 per class to test,
          seeded, disjoint). all-MiniLM-L6-v2 fine-tuned end to end with a new head through a
          `finetune` job, against logistic regression (scikit-learn, C chosen by 5-fold
          cross-validation on the training set) on its frozen mean-pooled sentence embeddings.
          The job's output folder is loaded by transformers' BertForSequenceClassification,
          whose test accuracy and loss must equal the service's.
distill   MiniLM 6 -> 3 blocks (`from_teacher` 0, 2, 4) distilled on 2,000 other fortunes with
          the `embeddings` loss; held-out embedding cosine to the teacher and Spearman of the
          pairwise similarities, for the copied blocks before training and the student after
          (the step's summary), and recomputed here in transformers from the output folder.
smollm2   SmolLM2-135M-Instruct imported from its GGUF; a 15-block student (every other block)
          distilled on fortunes text for one epoch; perplexity and KL to the teacher on held-out
          documents before and after (the step's summary).
"""
import argparse
import io
import json
import os
import random
import re
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "target", "fixtures")
MINILM = os.path.join(FIXTURES, "minilm")
FORTUNES = os.path.join(FIXTURES, "fortunes")
GGUF = os.path.join(FIXTURES, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
CLASSES = ["wisdom", "people", "science", "politics", "work"]


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
    start = time.time()
    job = call(f"{url}/v1/jobs", "POST", spec)
    last = ""
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(2)
        job = call(f"{url}/v1/jobs/{job['id']}")
        msg = (job.get("progress") or {}).get("message") or ""
        if msg != last:
            print(f"  [{time.time() - start:6.0f} s] {msg}", flush=True)
            last = msg
    if job["state"] != "succeeded":
        sys.exit(f"job failed: {job['error']}")
    print(f"  job took {time.time() - start:.0f} s", flush=True)
    return job, call(f"{url}/v1/jobs/{job['id']}/metrics")


def multipart_folder(folder):
    boundary = "whittle-folder-boundary"
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


def fortunes(name):
    """The documents of one fortunes file (separated by `%` lines), whitespace folded."""
    text = open(os.path.join(FORTUNES, name), encoding="utf-8", errors="replace").read()
    docs = [re.sub(r"\s+", " ", d).strip() for d in re.split(r"^%\s*$", text, flags=re.M)]
    return [d for d in docs if d]


def splits(seed=0):
    """Per class: 200 train and 100 test documents of at most 60 words, seeded; the rest."""
    rng = random.Random(seed)
    train, test, rest = [], [], []
    for label, name in enumerate(CLASSES):
        docs = [d for d in fortunes(name) if len(d.split()) <= 60]
        rng.shuffle(docs)
        train += [(d, label) for d in docs[:200]]
        test += [(d, label) for d in docs[200:300]]
        rest += [(d, label) for d in docs[300:]]
    return train, test, rest


def jsonl(rows, labelled=True):
    return "".join(json.dumps({"text": d, "label": y} if labelled else {"text": d}) + "\n"
                   for d, y in rows).encode()


def embeddings(folder, texts, layers=None):
    from transformers import AutoTokenizer, BertModel
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=512, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1))
    return torch.cat(out)


def spearman(a, b):
    n = a.shape[0]
    iu = torch.triu_indices(n, n, 1)
    sa, sb = (a @ a.T)[iu[0], iu[1]].double(), (b @ b.T)[iu[0], iu[1]].double()
    ra = sa.argsort().argsort().double()
    rb = sb.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def download(url, model_id):
    tmp = tempfile.mkdtemp()
    with tarfile.open(fileobj=io.BytesIO(call(f"{url}/v1/models/{model_id}/archive", raw=True))) as t:
        t.extractall(tmp, filter="data")
    return tmp


class Report:
    def __init__(self):
        self.rows, self.failures = [], []

    def check(self, what, ok, detail):
        self.rows.append((what, "ok" if ok else "FAIL", detail))
        if not ok:
            self.failures.append(what)
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}", flush=True)

    def note(self, what, detail):
        self.rows.append((what, "", detail))
        print(f"     {what}: {detail}", flush=True)


def classify(url, minilm, r, args):
    from sklearn.linear_model import LogisticRegressionCV
    from transformers import AutoTokenizer, BertForSequenceClassification
    train, test, _ = splits()
    x_train = embeddings(MINILM, [d for d, _ in train]).numpy()
    x_test = embeddings(MINILM, [d for d, _ in test]).numpy()
    y_train = np.array([y for _, y in train])
    y_test = np.array([y for _, y in test])
    lr = LogisticRegressionCV(Cs=[0.1, 1, 10, 100], cv=5, max_iter=5000).fit(x_train, y_train)
    frozen = float((lr.predict(x_test) == y_test).mean())
    r.note("logistic regression on frozen MiniLM embeddings", f"test accuracy {frozen:.4f} (C={lr.C_[0]})")

    tr = call(f"{url}/v1/datasets?name=fortunes-train", "POST", jsonl(train), "application/jsonl")
    te = call(f"{url}/v1/datasets?name=fortunes-test", "POST", jsonl(test), "application/jsonl")
    step = {"op": "finetune", "dataset_id": tr["id"], "head": {"num_classes": 5},
            "epochs": args.epochs, "batch_size": 16, "seed": args.seed, "grad_clip": 1.0,
            "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.01},
            "lr_schedule": {"kind": "cosine", "warmup_epochs": 1}}
    if args.head_lr_mult != 1.0:
        # The new head (and pooler) start from scratch: a larger step for them only.
        step["layer_lr"] = {"classifier.*": args.head_lr_mult, "pooler.*": args.head_lr_mult}
    job, m = run_job(url, {"model_id": minilm["id"], "steps": [step], "eval": {"dataset_id": te["id"]}})
    fin = m["final"]
    for e in m["steps"][0]["epochs"]:
        r.note(f"epoch {e['epoch']}", f"train loss {e['train_loss']:.4f}, train accuracy {e['train_accuracy']:.4f}, {e['seconds']:.0f} s")
    acc = fin["accuracy"]
    r.check("fine-tuned MiniLM beats the frozen-embedding baseline by >= 2 points",
            acc >= frozen + 0.02, f"{acc:.4f} vs {frozen:.4f} ({100 * (acc - frozen):+.1f} points)")
    folder = download(url, job["result"]["model_id"])
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = []
        for i in range(0, len(test), 64):
            enc = tok([d for d, _ in test[i:i + 64]], padding=True, truncation=True, max_length=512, return_tensors="pt")
            logits.append(model(**enc).logits)
        logits = torch.cat(logits)
    y = torch.tensor(y_test)
    hf_acc = (logits.argmax(1) == y).float().mean().item()
    hf_loss = torch.nn.functional.cross_entropy(logits, y).item()
    r.check("transformers loads the output folder: same test accuracy", abs(hf_acc - acc) < 1e-6, f"{hf_acc:.4f} vs {acc:.4f}")
    r.check("... and the same test loss (rel 1e-4)", abs(hf_loss - fin["loss"]) <= 1e-4 * hf_loss,
            f"{hf_loss:.6f} vs {fin['loss']:.6f}")


def distill(url, minilm, r, args):
    train, test, rest = splits()
    transfer = [d for d, _ in rest][:2000]
    if len(transfer) < 2000:
        transfer += [d for d, _ in train][:2000 - len(transfer)]
    held = [d for d, _ in test]
    tr = call(f"{url}/v1/datasets?name=fortunes-transfer", "POST", jsonl([(d, 0) for d in transfer], False), "application/jsonl")
    te = call(f"{url}/v1/datasets?name=fortunes-held-out", "POST", jsonl([(d, 0) for d in held], False), "application/jsonl")
    step = {"op": "distill", "dataset_id": tr["id"], "student": {"from_teacher": {"layers": [0, 2, 4]}},
            "loss": args.distill_loss, "epochs": args.distill_epochs, "batch_size": 32,
            "seed": 0, "optimizer": {"name": "adamw", "lr": args.distill_lr},
            "lr_schedule": {"kind": "cosine"}, "validation": {"dataset_id": te["id"]},
            # The same 3 blocks trained without the teacher (unsupervised SimCSE), same budget.
            "baseline": not args.no_baseline}
    if args.distill_loss == "embeddings":
        step["distance"] = "cosine"
    job, m = run_job(url, {"model_id": minilm["id"], "steps": [step], "eval": {"dataset_id": te["id"]}})
    s = m["steps"][0]["summary"]
    u, st = s["untrained"], s["student"]
    r.note("MiniLM 6 -> 3 blocks", f"{s['teacher_parameters']:,} -> {s['student_parameters']:,} parameters, {len(transfer)} transfer documents, {s['epochs_run']} epochs")
    r.note("copied blocks 0, 2, 4 before training",
           f"cosine mean {u['embedding_cosine']['mean']:.4f} min {u['embedding_cosine']['min']:.4f}, Spearman {u['similarity_spearman']:.4f}")
    r.note(f"distilled student ({args.distill_loss} loss)",
           f"cosine mean {st['embedding_cosine']['mean']:.4f} min {st['embedding_cosine']['min']:.4f}, Spearman {st['similarity_spearman']:.4f}")
    b = s.get("baseline")
    if b:
        r.note("the same 3 blocks trained alone (SimCSE, no teacher)",
               f"cosine mean {b['embedding_cosine']['mean']:.4f} min {b['embedding_cosine']['min']:.4f}, Spearman {b['similarity_spearman']:.4f}")
        r.check("the distilled student is closer to the teacher than the one trained alone",
                st["embedding_cosine"]["mean"] > b["embedding_cosine"]["mean"] and st["similarity_spearman"] > b["similarity_spearman"],
                f"cosine {b['embedding_cosine']['mean']:.4f} vs {st['embedding_cosine']['mean']:.4f}, Spearman {b['similarity_spearman']:.4f} vs {st['similarity_spearman']:.4f}")
    r.check("distillation brings the student closer to the teacher",
            st["embedding_cosine"]["mean"] > u["embedding_cosine"]["mean"] and st["similarity_spearman"] > u["similarity_spearman"],
            f"cosine {u['embedding_cosine']['mean']:.4f} -> {st['embedding_cosine']['mean']:.4f}, Spearman {u['similarity_spearman']:.4f} -> {st['similarity_spearman']:.4f}")
    folder = download(url, job["result"]["model_id"])
    theirs = embeddings(folder, held)
    teacher = embeddings(MINILM, held)
    cos = (theirs * teacher).sum(1)
    r.check("transformers reads the 3-block output folder: same cosine (±1e-4)",
            abs(cos.mean().item() - st["embedding_cosine"]["mean"]) <= 1e-4,
            f"{cos.mean().item():.5f} vs {st['embedding_cosine']['mean']:.5f}")
    sp = spearman(teacher, theirs)
    r.check("... and the same Spearman (±1e-3)", abs(sp - st["similarity_spearman"]) <= 1e-3,
            f"{sp:.5f} vs {st['similarity_spearman']:.5f}")


def smollm2(url, r, args):
    train, test, rest = splits()
    transfer = [d for d, _ in rest][:args.smollm2_docs]
    held = [d for d, _ in test][:200]
    model = call(f"{url}/v1/models?name=smollm2-135m", "POST", open(GGUF, "rb").read(), "application/octet-stream")
    tr = call(f"{url}/v1/datasets?name=fortunes-lm", "POST", "\n\n".join(transfer).encode(), "text/plain")
    te = call(f"{url}/v1/datasets?name=fortunes-lm-held-out", "POST", "\n\n".join(held).encode(), "text/plain")
    layers = list(range(0, 30, 2))
    step = {"op": "distill", "dataset_id": tr["id"], "student": {"from_teacher": {"layers": layers}},
            "epochs": 1, "batch_size": 8, "alpha": 1.0, "temperature": 1.0, "seed": 0,
            "optimizer": {"name": "adamw", "lr": args.smollm2_lr}, "lr_schedule": {"kind": "cosine"}}
    job, m = run_job(url, {"model_id": model["id"], "steps": [step],
                           "eval": {"dataset_id": te["id"], "context": 128, "max_tokens": 8192}})
    s = m["steps"][0]["summary"]
    u, st = s["untrained"], s["student"]
    r.note("SmolLM2-135M teacher on held-out fortunes", f"perplexity {m['baseline']['perplexity']:.2f}")
    r.note("15 copied blocks before training", f"perplexity {u['perplexity']:.2f}, KL mean {u['kl_divergence']['mean']:.4f}, top-1 agreement {u['top1_agreement']:.4f}")
    r.note("after one epoch of distillation", f"perplexity {st['perplexity']:.2f}, KL mean {st['kl_divergence']['mean']:.4f}, top-1 agreement {st['top1_agreement']:.4f}")
    r.check("distillation lowers the student's KL to the teacher",
            st["kl_divergence"]["mean"] < u["kl_divergence"]["mean"],
            f"{u['kl_divergence']['mean']:.4f} -> {st['kl_divergence']['mean']:.4f} ({len(transfer)} documents, {s['parameter_ratio']:.2f}x fewer parameters)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--parts", default="classify,distill,smollm2")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning (head, shuffles, dropout)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr-mult", type=float, default=10.0, help="learning-rate multiplier of the new classifier and pooler (layer_lr)")
    ap.add_argument("--distill-epochs", type=int, default=4)
    ap.add_argument("--distill-lr", type=float, default=2e-4)
    ap.add_argument("--distill-loss", choices=["embeddings", "hidden"], default="embeddings")
    ap.add_argument("--no-baseline", action="store_true", help="skip the teacher-free (SimCSE) baseline of the distillation")
    ap.add_argument("--smollm2-docs", type=int, default=600)
    ap.add_argument("--smollm2-lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    parts = args.parts.split(",")
    r = Report()
    minilm = None
    if "classify" in parts or "distill" in parts:
        body, ctype = multipart_folder(MINILM)
        minilm = call(f"{args.url}/v1/models?name=all-MiniLM-L6-v2", "POST", body, ctype)
    if "classify" in parts:
        classify(args.url, minilm, r, args)
    if "distill" in parts:
        distill(args.url, minilm, r, args)
    if "smollm2" in parts:
        smollm2(args.url, r, args)
    print()
    width = max(len(row[0]) for row in r.rows)
    for what, status, detail in r.rows:
        print(f"{what:<{width}}  {status:<4}  {detail}")
    if r.failures:
        sys.exit(f"{len(r.failures)} check(s) failed")


if __name__ == "__main__":
    main()
