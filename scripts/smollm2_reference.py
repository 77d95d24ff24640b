#!/usr/bin/env python3
"""Reference numbers for importing a llama-family GGUF into a Hugging Face model folder.

Loads SmolLM2-135M-Instruct (Q4_1 GGUF, llama.cpp format) with Hugging Face transformers, which
dequantizes every tensor to f32, undoes llama.cpp's Q/K row permutation and rebuilds a
tokenizer.json from the tokenizer.ggml.* metadata. Writes, under
target/fixtures/smollm2/reference/:

    tokenizer.json, tokenizer_config.json   what transformers rebuilt from the GGUF metadata
    config.json                             the LlamaConfig transformers derived from the GGUF, minus
                                            quantization_config, plus architectures (see below)
    expected.json                           token ids, NLL / perplexity, last-position top logits,
                                            per-tensor checksums of the dequantized HF weights

Run (from the repository root; needs torch, transformers, gguf, numpy, accelerate):

    scripts/fetch_transformers.sh                 # GGUF + fortunes into target/fixtures/
    /work/pyenv/bin/python scripts/smollm2_reference.py [--threads 2]

Takes about 30 s on 2 idle CPU cores (transformers 5.25.0, torch 2.15.0 CPU), measured: ~2.5 s
imports, ~4 s tokenizer build, ~13 s GGUF model load (of which GGUFReader parses ~2.5 s, twice;
gguf.dequantize ~1 s; transformers' GGUF->HF name map ~4 s), ~3 s numpy weight cross-check,
~0.3 s tokenizing the corpus, ~0.18 s per 128-token forward pass (9 passes; up to ~3 s each when
the cores are busy). The measured times are written to expected.json ("timings_s").
`--write-folder DIR` adds ~1 s and 538 MB.

Definitions (so that Rust can reproduce them exactly):
  * fortune files are UTF-8; a document is the text between lines consisting of exactly "%"
    (lines joined with "\\n", no trailing newline); documents that are empty after strip() are
    dropped.
  * corpus = the documents of wisdom, people, science, politics, work (in that order, file order
    inside each file) joined with "\\n\\n"; it is tokenized without special tokens (this tokenizer
    adds no BOS: tokenizer.ggml.add_bos_token = false).
  * windows = corpus_ids[128*i : 128*(i+1)] for i in 0..4; each window is fed alone (no BOS, no
    cache, positions 0..127). NLL of a window = mean over t in 0..126 of
    -log_softmax(logits[t])[ids[t+1]] (127 predictions), computed in f32; perplexity = exp(NLL).
    The "all windows" NLL is the mean over all 4*127 predictions.
  * per_file: the same for the first 128 tokens of each file's own corpus (its documents joined
    with "\\n\\n"), one window per file.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

T_START = time.time()
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODEL_DIR = os.path.join(ROOT, "target/fixtures/smollm2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FORTUNES_DIR = os.path.join(ROOT, "target/fixtures/fortunes")
FORTUNE_FILES = ["wisdom", "people", "science", "politics", "work"]
WINDOW, STRIDE, N_WINDOWS = 128, 128, 4


def read_fortunes(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    docs, cur = [], []
    for line in text.split("\n"):
        if line == "%":
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))  # after the last "%": only "" (file ends with "%\n") or a tail
    return [d for d in docs if d.strip()]


def reverse_permute(w, n_head, n_head_kv):
    """Inverse of llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rows of attn_q / attn_k)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w, n_head, n_head_kv):
    """llama.cpp's LlamaModel.permute: HF row order (rotate-half RoPE) -> GGUF (interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_weights(gguf_path, model, cfg):
    """Independent numpy check: gguf dequantize + reverse_permute == transformers' weights."""
    from gguf import GGUFReader, dequantize

    sd = model.state_dict()
    reader = GGUFReader(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    checks = {}
    for layer in (0, cfg.num_hidden_layers - 1):
        for g, h, heads in (("attn_q", "q_proj", nh), ("attn_k", "k_proj", nkv)):
            t = by_name[f"blk.{layer}.{g}.weight"]
            raw = dequantize(t.data, t.tensor_type)
            mine = reverse_permute(raw, nh, heads)
            hf = sd[f"model.layers.{layer}.self_attn.{h}.weight"].numpy()
            assert np.array_equal(mine, hf), f"reverse_permute mismatch on {t.name}"
            assert np.array_equal(permute(mine, nh, heads), raw), f"permute round trip on {t.name}"
            checks[f"blk.{layer}.{g}.weight"] = {"permuted_rows_changed": int((raw != hf).any(axis=1).sum())}
    emb = dequantize(by_name["token_embd.weight"].data, by_name["token_embd.weight"].tensor_type)
    assert np.array_equal(emb, sd["model.embed_tokens.weight"].numpy())
    return checks


def tensor_stats(model):
    out = {}
    seen = {}
    for name, p in model.state_dict().items():
        key = p.data_ptr()
        if key in seen:
            out[name] = {"tied_to": seen[key]}
            continue
        seen[key] = name
        a = p.detach().to(torch.float64).numpy()
        flat = a.reshape(-1)
        out[name] = {
            "shape": list(a.shape),
            "dtype": str(p.dtype).replace("torch.", ""),
            "sum": float(flat.sum()),
            "abs_sum": float(np.abs(flat).sum()),
            "sum_sq": float((flat * flat).sum()),
            "first8": [float(x) for x in flat[:8]],
            "row1_first8": [float(x) for x in a[1, :8]] if a.ndim == 2 else None,
        }
    return out


@torch.inference_mode()
def score_window(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=x, use_cache=False).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    tgt = x[0, 1:]
    nll_each = -logp[:-1].gather(1, tgt[:, None])[:, 0]
    last = logits[-1]
    top = torch.topk(last, 5)
    return {
        "n_predictions": int(nll_each.numel()),
        "nll_sum": float(nll_each.double().sum()),
        "mean_nll": float(nll_each.double().mean()),
        "perplexity": math.exp(float(nll_each.double().mean())),
        "first_position_top1": {"id": int(logits[0].argmax()), "logit": float(logits[0].max())},
        "last_position_top1": {"id": int(top.indices[0]), "logit": float(top.values[0])},
        "last_position_top5": [{"id": int(i), "logit": float(v)} for i, v in zip(top.indices, top.values)],
        "last_position_logits_first8": [float(v) for v in last[:8]],
        "last_position_logsumexp": float(torch.logsumexp(last, 0)),
    }


def write_folder(folder, ref_dir, model, window):
    """The HF folder an importer should produce: dequantized f32 weights under HF names."""
    import shutil

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    os.makedirs(folder, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ref_dir, name), folder)
    reloaded = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        x = torch.tensor([window["ids"]])
        diff = (reloaded(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    assert diff == 0.0, f"reloaded folder differs: max |dlogit| = {diff}"
    print(f"wrote {folder} ({len(sd)} tensors); reload reproduces window 0 logits exactly")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(MODEL_DIR, "reference"))
    ap.add_argument("--write-folder", metavar="DIR",
                    help="also write the complete HF folder (model.safetensors f32, 538 MB, no lm_head.weight "
                         "since it is tied; config.json; tokenizer*.json) to DIR and check that "
                         "LlamaForCausalLM.from_pretrained(DIR) reproduces window 0's logits")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    timings = {"imports": time.time() - T_START}
    gguf_path = os.path.join(MODEL_DIR, GGUF_NAME)
    if not os.path.isfile(gguf_path):
        sys.exit(f"{gguf_path} missing: run scripts/fetch_transformers.sh first")
    os.makedirs(args.out, exist_ok=True)

    t = time.time()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF_NAME)
    timings["tokenizer_from_gguf"] = time.time() - t
    tok.save_pretrained(args.out)  # tokenizer.json + tokenizer_config.json (+ chat_template.jinja)

    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    timings["model_from_gguf"] = time.time() - t
    cfg = model.config
    # config.json as an HF folder of dequantized f32 safetensors needs it: the transformers-derived
    # config minus its `quantization_config` (which would make transformers look for the GGUF
    # again), plus `architectures`. The raw derived config is kept in expected.json["config"].
    folder_cfg = copy.deepcopy(cfg)
    if hasattr(folder_cfg, "quantization_config"):
        del folder_cfg.quantization_config
    folder_cfg.architectures = ["LlamaForCausalLM"]
    folder_cfg.save_pretrained(args.out)  # config.json

    t = time.time()
    weight_checks = check_weights(gguf_path, model, cfg)
    timings["numpy_weight_check"] = time.time() - t

    docs = {f: read_fortunes(os.path.join(FORTUNES_DIR, f)) for f in FORTUNE_FILES}
    first3 = [{"text": d, "ids": tok(d, add_special_tokens=True)["input_ids"]} for d in docs["wisdom"][:3]]
    for e in first3:
        e["tokens"] = tok.convert_ids_to_tokens(e["ids"])
        e["decoded"] = tok.decode(e["ids"])
        assert tok(e["text"], add_special_tokens=False)["input_ids"] == e["ids"]

    t = time.time()
    corpus = "\n\n".join(d for f in FORTUNE_FILES for d in docs[f])
    corpus_ids = tok(corpus, add_special_tokens=False)["input_ids"]
    timings["tokenize_corpus"] = time.time() - t
    per_file_ids = {f: tok("\n\n".join(docs[f]), add_special_tokens=False)["input_ids"][:WINDOW] for f in FORTUNE_FILES}

    # llama.cpp's "smollm" pre-tokenizer (and, as far as we know, SmolLM2's own tokenizer.json) splits
    # every digit off first; transformers' rebuild only has plain ByteLevel. Count where that matters.
    from tokenizers import Tokenizer, pre_tokenizers

    digits_tok = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    digits_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    all_docs = [d for f in FORTUNE_FILES for d in docs[f]]
    mismatch = [i for i, d in enumerate(all_docs) if digits_tok.encode(d).ids != tok(d)["input_ids"]]
    digits_windows_equal = digits_tok.encode(corpus).ids[: N_WINDOWS * STRIDE] == corpus_ids[: N_WINDOWS * STRIDE]

    windows, fwd = [], []
    for i in range(N_WINDOWS):
        ids = corpus_ids[i * STRIDE : i * STRIDE + WINDOW]
        t = time.time()
        r = score_window(model, ids)
        fwd.append(time.time() - t)
        windows.append({"index": i, "start": i * STRIDE, "ids": ids, **r})
    total_nll = sum(w["nll_sum"] for w in windows)
    total_n = sum(w["n_predictions"] for w in windows)
    per_file = {}
    for f, ids in per_file_ids.items():
        t = time.time()
        per_file[f] = {"ids": ids, **score_window(model, ids)}
        fwd.append(time.time() - t)
    timings["forward_128_each"] = fwd
    timings["forward_total"] = sum(fwd)

    if args.write_folder:
        t = time.time()
        write_folder(args.write_folder, args.out, model, windows[0])
        timings["write_folder"] = time.time() - t

    t = time.time()
    stats = tensor_stats(model)
    timings["tensor_stats"] = time.time() - t
    timings["total"] = time.time() - T_START

    expected = {
        "source": {
            "gguf": f"target/fixtures/smollm2/{GGUF_NAME}",
            "gguf_sha256": GGUF_SHA256,
            "fortunes": "Debian fortunes 1:1.99.1-7.3, usr/share/games/fortunes/{" + ",".join(FORTUNE_FILES) + "}",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "attn_implementation": "eager",
            "dtype": "float32",
            "threads": args.threads,
        },
        "config": json.loads(cfg.to_json_string()),
        "tokenizer": {
            "class": type(tok).__name__,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "unk_token": tok.unk_token, "pad_token": tok.pad_token,
            "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
            "vocab_size_with_added": len(tok),
            "n_docs": {f: len(docs[f]) for f in FORTUNE_FILES},
            "corpus_chars": len(corpus),
            "corpus_tokens": len(corpus_ids),
            "digits_pretokenizer_mismatch_docs": len(mismatch),
            "digits_pretokenizer_windows_equal": digits_windows_equal,
            "digits_pretokenizer_mismatch_first": [
                {"doc": all_docs[i], "transformers": tok(all_docs[i])["input_ids"],
                 "digits_split": digits_tok.encode(all_docs[i]).ids} for i in mismatch[:3]
            ],
        },
        "wisdom_first3": first3,
        "windows": {"window": WINDOW, "stride": STRIDE, "count": N_WINDOWS, "items": windows,
                    "mean_nll": total_nll / total_n, "perplexity": math.exp(total_nll / total_n),
                    "n_predictions": total_n},
        "per_file": per_file,
        "weight_checks": weight_checks,
        "tensor_stats": stats,
        "timings_s": timings,
    }
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.threads} threads")
    for e in first3:
        print(f"wisdom doc: {len(e['ids'])} tokens, first ids {e['ids'][:10]}")
    for w in windows:
        print(f"window {w['index']}: nll {w['mean_nll']:.5f} ppl {w['perplexity']:.3f} "
              f"last top1 {w['last_position_top1']}")
    print(f"all windows: nll {total_nll / total_n:.5f} ppl {math.exp(total_nll / total_n):.3f}")
    for f, r in per_file.items():
        print(f"{f}: nll {r['mean_nll']:.5f} ppl {r['perplexity']:.3f}")
    print(f"corpus {len(corpus)} chars, {len(corpus_ids)} tokens; digit-split mismatches: {len(mismatch)} docs")
    print("timings:", json.dumps({k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v])
                                  for k, v in timings.items()}))
    print(f"wrote {args.out}/{{expected.json,config.json,tokenizer.json,tokenizer_config.json}}")


if __name__ == "__main__":
    main()
