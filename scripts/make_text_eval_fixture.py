#!/usr/bin/env python3
"""Reference figures of a text evaluation, computed with Hugging Face `transformers` (PyTorch)
on the tiny fixture models, for the Rust tests to compare against (tests/fixtures/transformers/
text-eval.json, a few KB, committed).

What it computes, with its own code (no Whittle code involved):

* The corpus: the documents below, written as a labelled JSONL file the tests upload as is.
* Llama (tiny-llama): the documents joined by a blank line ("\\n\\n") and tokenized once with
  tokenizer.json (special tokens as the tokenizer adds them: `<s>` first). Sliding windows as in
  transformers' perplexity guide: windows of CONTEXT tokens starting every STRIDE tokens, each
  scoring only the targets no earlier window scored (labels -100 elsewhere), until a window
  reaches the end. Per scored token: the NLL of the reference model (the fixture as is) and of a
  perturbed copy (every `self_attn.q_proj.weight` × 0.9, every `mlp.down_proj.weight` × 1.1),
  KL(reference ‖ perturbed) over the vocabulary, whether the argmaxes agree, and
  Δp = p_perturbed(next) − p_reference(next). Figures: perplexity of both, KL mean / median /
  p99 / max (nearest-rank on the sorted values, index round((n-1)·q)), top-1 agreement, Δp mean
  and rms.
* Bert (tiny-bert): each document alone ([CLS] … [SEP], no padding), sentence embedding = mean
  pooling of the last hidden state, L2-normalised; the perturbed copy scales every
  `attention.self.query.weight` by 0.9 and every `intermediate.dense.weight` by 1.1. Figures:
  per-document cosine (min, mean) and the Spearman correlation of the pairwise cosine
  similarities (reference vs perturbed, ties averaged).
* Bert classifier (tiny-bert-cls): accuracy and mean cross-entropy of its head on the labels.

Run: /work/pyenv/bin/python scripts/make_text_eval_fixture.py [--check]
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIX = os.path.join(ROOT, "tests/fixtures/transformers")
OUT = os.path.join(FIX, "text-eval.json")
CONTEXT, STRIDE = 16, 8

DOCS = [
    ("the cat sat on the mat and looked at the door.", 0),
    ("a quick brown fox jumps over the lazy dog.", 0),
    ("tea is best with a little milk and no sugar.", 1),
    ("the old clock in the hall stopped at noon.", 2),
    ("rain fell on the roof all night long.", 2),
    ("she read the letter twice and smiled.", 1),
    ("bread rises slowly in a warm kitchen.", 1),
    ("the river runs past the mill to the sea.", 0),
]


def perturb(model, scale):
    with torch.no_grad():
        for name, p in model.named_parameters():
            for suffix, factor in scale.items():
                if name.endswith(suffix):
                    p.mul_(factor)


def load(cls, folder):
    m = cls.from_pretrained(os.path.join(FIX, folder), attn_implementation="eager")
    m.eval()
    return m


@torch.no_grad()
def llama_figures():
    tok = Tokenizer.from_file(os.path.join(FIX, "tiny-llama/tokenizer.json"))
    ids = tok.encode("\n\n".join(d for d, _ in DOCS)).ids
    ref = load(transformers.LlamaForCausalLM, "tiny-llama")
    mod = load(transformers.LlamaForCausalLM, "tiny-llama")
    perturb(mod, {"self_attn.q_proj.weight": 0.9, "mlp.down_proj.weight": 1.1})
    rows = []
    prev_end, windows = 0, 0
    for begin in range(0, len(ids), STRIDE):
        end = min(begin + CONTEXT, len(ids))
        x = torch.tensor([ids[begin:end]])
        lr = F.log_softmax(ref(input_ids=x).logits[0].double(), -1)
        lm = F.log_softmax(mod(input_ids=x).logits[0].double(), -1)
        windows += 1
        for t in range(max(prev_end, begin + 1), end):  # targets t, predicted at t-1-begin
            p = t - 1 - begin
            nxt = ids[t]
            kl = (lr[p].exp() * (lr[p] - lm[p])).sum().item()
            rows.append({
                "nll": -lm[p, nxt].item(),
                "ref_nll": -lr[p, nxt].item(),
                "kl": kl,
                "same": int(lr[p].argmax().item() == lm[p].argmax().item()),
                "dp": lm[p, nxt].exp().item() - lr[p, nxt].exp().item(),
            })
        prev_end = end
        if end == len(ids):
            break
    n = len(rows)
    kls = sorted(r["kl"] for r in rows)
    at = lambda q: kls[min(n - 1, round((n - 1) * q))]
    mean_nll = sum(r["nll"] for r in rows) / n
    ref_nll = sum(r["ref_nll"] for r in rows) / n
    return {
        "stream_tokens": len(ids),
        "context": CONTEXT,
        "stride": STRIDE,
        "windows": windows,
        "tokens": n,
        "perplexity": math.exp(mean_nll),
        "reference_perplexity": math.exp(ref_nll),
        "kl_divergence": {"mean": sum(kls) / n, "median": at(0.5), "p99": at(0.99), "max": kls[-1]},
        "top1_agreement": sum(r["same"] for r in rows) / n,
        "delta_p": {
            "mean": sum(r["dp"] for r in rows) / n,
            "rms": math.sqrt(sum(r["dp"] ** 2 for r in rows) / n),
        },
    }


def ranks(v):
    order = sorted(range(len(v)), key=lambda i: v[i])
    out = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


@torch.no_grad()
def bert_figures():
    tok = Tokenizer.from_file(os.path.join(FIX, "tiny-bert/tokenizer.json"))
    ref = load(transformers.BertModel, "tiny-bert")
    mod = load(transformers.BertModel, "tiny-bert")
    perturb(mod, {"attention.self.query.weight": 0.9, "intermediate.dense.weight": 1.1})

    def embed(model, text):
        e = tok.encode(text)
        out = model(input_ids=torch.tensor([e.ids]), token_type_ids=torch.tensor([e.type_ids]))
        return F.normalize(out.last_hidden_state[0].double().mean(0), dim=-1)

    er = [embed(ref, d) for d, _ in DOCS]
    em = [embed(mod, d) for d, _ in DOCS]
    cos = [(a @ b).item() for a, b in zip(er, em)]
    pairs = [(i, j) for i in range(len(DOCS)) for j in range(i + 1, len(DOCS))]
    sr = [(er[i] @ er[j]).item() for i, j in pairs]
    sm = [(em[i] @ em[j]).item() for i, j in pairs]
    tokens = sum(len(tok.encode(d).ids) for d, _ in DOCS)

    cls = load(transformers.BertForSequenceClassification, "tiny-bert-cls")
    loss, correct = 0.0, 0
    for d, y in DOCS:
        e = tok.encode(d)
        logits = cls(input_ids=torch.tensor([e.ids]), token_type_ids=torch.tensor([e.type_ids])).logits[0].double()
        loss += -F.log_softmax(logits, -1)[y].item()
        correct += int(logits.argmax().item() == y)
    return {
        "documents": len(DOCS),
        "tokens": tokens,
        "embedding_cosine": {"min": min(cos), "mean": sum(cos) / len(cos)},
        "similarity_spearman": pearson(ranks(sm), ranks(sr)),
        "classifier": {"accuracy": correct / len(DOCS), "loss": loss / len(DOCS)},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with the committed file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {
        "generator": "scripts/make_text_eval_fixture.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "jsonl": "".join(json.dumps({"text": d, "label": y}) + "\n" for d, y in DOCS),
        "llama": llama_figures(),
        "bert": bert_figures(),
    }
    if args.check:
        old = json.load(open(OUT))
        same = json.dumps(old["llama"]) == json.dumps(result["llama"]) and json.dumps(old["bert"]) == json.dumps(result["bert"])
        print("unchanged" if same else "DIFFERENT")
        sys.exit(0 if same else 1)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ("llama", "bert")}, indent=2))


if __name__ == "__main__":
    main()
