#!/usr/bin/env python3
"""Make tiny GGUF fixtures (and what Hugging Face transformers makes of them) for the Rust GGUF importer.

The importer turns a llama.cpp GGUF file into a Hugging Face Llama folder (config.json,
model.safetensors, tokenizer.json). These fixtures pin down every step of that against
transformers 5.25, which can load a GGUF itself (`from_pretrained(dir, gguf_file=...)`): the
config it derives from the `llama.*` metadata, the dequantised and un-permuted weights, the
tokenizer.json it rebuilds from `tokenizer.ggml.*`, and the logits of the resulting model.

What it makes, under tests/fixtures/gguf/ (about 0.27 MB in all, meant to be committed):

  tiny-llama-bpe.gguf   tests/fixtures/transformers/tiny-llama converted the way llama.cpp's
                        convert_hf_to_gguf.py converts a Llama with a byte-level BPE tokenizer:
                        `llama.*` hyper-parameters (plus attention.key_length/value_length, which
                        the converter writes when config.json has head_dim), llama.cpp tensor
                        names in the converter's order (sorted HF names), no output.weight (tied),
                        Q and K rows permuted with llama.cpp's `permute`, and the tokenizer as
                        `_set_vocab_gpt2` + `gguf.SpecialVocab` write it: model "gpt2", pre
                        "gpt-2" (the converter's name for the plain GPT-2 split regex), tokens in
                        id order, token_type 3 for the added special tokens and 1 otherwise,
                        merges "a b", bos/eos ids from config.json, add_bos_token true and
                        add_sep_token false (parsed by SpecialVocab from the `<s> $A`
                        post-processor). Tensor types are mixed on purpose so every dequantiser
                        is exercised:
                            token_embd              Q8_0
                            blk.0.* matrices        Q4_1
                            blk.1.attn_{q,k,v,output} Q4_0
                            blk.1.ffn_{gate,up,down}  F16
                            norms                   F32
  tiny-spm.gguf         a SentencePiece-type vocabulary (`tokenizer.ggml.model = "llama"`):
                        <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF> (type 6), pieces
                        learned here by BPE over a small corpus (▁-prefixed words; score = -rank,
                        then the single characters with lower scores), and one user-defined
                        token `<think>` (type 4). There is NO tokenizer.ggml.merges key, so a
                        reader has to derive the merges from the scores. add_bos_token true,
                        add_eos_token false, add_space_prefix true. Weights: a random F32 llama
                        (hidden 16, 1 layer, 2 heads, 1 KV head, head_dim 8, ffn 32) with an
                        untied output.weight, tensors in llama.cpp's natural order; the file has
                        no llama.vocab_size and no llama.rope.dimension_count (older converters
                        omit them), so vocab_size comes from the token count and head_dim from
                        hidden/heads.
  <name>.tokenizer.json the tokenizer.json transformers rebuilds from each file
                        (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, backend
                        tokenizer saved pretty): the Rust rebuild should equal it as JSON.
  expected.json         per file: the GGUF tensor table (name, ggml type, ne, HF name), the
                        config fields transformers derives, tokenizer facts (bos/eos/unk,
                        add_bos/add_eos, length), input_ids/tokens/decode of the test texts,
                        a logits summary for one text (per position argmax, max, logsumexp; the
                        full last row) and, per HF tensor name, a checksum of the weights
                        transformers loaded (float64 sum and sum of squares, first 4 values,
                        sha256 of the little-endian f32 bytes, so bit-exactness can be tested).
                        `notes`: oddities of transformers' rebuild found while writing (e.g. the
                        extra `<|endoftext|>` it adds to the byte-level tokenizer). For
                        tiny-llama-bpe also `tokenizer_parity`, the comparison with the
                        tiny-llama folder (ids, vocab, merges, pipeline differences, logits).
  expected.safetensors  the full logits [seq, vocab] and input_ids of that one text per file
                        (`<name>.logits`, `<name>.input_ids`).

Checks made while writing (the script fails if one does not hold):
  * transformers' weights equal this script's own numpy `gguf.dequantize` + reverse-permute of
    the GGUF tensors, bit for bit (the reference a Rust dequantiser must match);
  * tiny-llama-bpe: F32 tensors equal the tiny-llama fixture's weights exactly, F16 tensors equal
    them rounded to f16, quantised ones equal dequantize(quantize(permute(w))) un-permuted (their
    max error against the f32 originals is recorded);
  * tiny-spm: every weight equals the random f32 array it was written from (Q/K after the
    permute/un-permute round trip);
  * tiny-llama-bpe: the same conversion with every tensor F32 (written to a temp dir, not kept)
    gives tiny-llama's logits exactly, so the recorded logits difference is quantisation only;
  * tiny-llama-bpe: transformers' rebuilt tokenizer gives the same ids as
    tiny-llama/tokenizer.json on every test text (a mismatch is printed as a NOTE and recorded in
    expected.json under `tokenizer_parity` instead of failing);
  * each dumped <name>.tokenizer.json, loaded alone with `tokenizers.Tokenizer.from_file`, gives
    the recorded input_ids on every test text.

Run (needs torch, transformers, tokenizers, gguf (llama.cpp's gguf-py), safetensors, numpy;
no network, no model hub):

    /work/pyenv/bin/python scripts/make_gguf_fixtures.py            # write the fixtures
    /work/pyenv/bin/python scripts/make_gguf_fixtures.py --check    # regenerate into a temp dir, compare
    /work/pyenv/bin/python scripts/make_gguf_fixtures.py --out DIR  # write elsewhere

Deterministic: fixed seeds and texts, torch on one thread; the same library versions give
byte-identical files (the versions are recorded in expected.json). `--check` fails if any file
differs from the committed one.
"""
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a tqdm bar per file

import argparse
import hashlib
import importlib.metadata
import json
import logging
import math
import sys
import tempfile

import gguf
import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "gguf")
TINY_LLAMA = os.path.join(REPO, "tests", "fixtures", "transformers", "tiny-llama")

BPE_NAME = "tiny-llama-bpe"
SPM_NAME = "tiny-spm"

# ---------------------------------------------------------------------------------------------
# Fixed text. Do not edit without regenerating every fixture.
# ---------------------------------------------------------------------------------------------

# Run through both tokenizers: plain text (the first one is tiny-llama's own test text), leading
# spaces / newlines / a tab, digits, non-ASCII (é, ï, —) and an emoji (byte fallback in the
# SentencePiece vocabulary, multi-byte ByteLevel symbols in the BPE one), the empty string.
COMMON_TEXTS = [
    "Once upon a time the little robot read a book.",
    "  Hello world\n\nThe robot said:\thi \n",
    "In 2024 the robot counted 1234567 stars, not 42.",
    "The café's naïve robot 🤖 said: hello — 42 times!",
    "",
]
# Per file: special tokens written in the text (BPE: <s> and </s> are added special tokens), the
# user-defined token <think> (SPM, type 4: matched whole, not special).
EXTRA_TEXTS = {
    BPE_NAME: ["Hi</s><s> again<s>"],
    SPM_NAME: ["Ask <think>the robot<think> now", " once upon a time"],
}
# Which text the logits are recorded for.
LOGITS_TEXT = {BPE_NAME: 0, SPM_NAME: 3}

# Corpus the SentencePiece-style pieces are learned from. Not in it, so byte fallback: "é", "ï",
# "—", the emoji, "7", "I", newline, tab.
SPM_CORPUS = [
    "Once upon a time there was a little robot.",
    "The robot read a book and the robot wrote a story.",
    "The little robot said hello to the world.",
    "There were 12 robots and 40 books in the room.",
    "A time to read, a time to write: the robot knew that!",
    "Hello there, said the robot to the other robots.",
]
SPM_MERGES = 56
SPM_USER_DEFINED = "<think>"

# tiny-spm model shape
SPM_HIDDEN = 16
SPM_LAYERS = 1
SPM_HEADS = 2
SPM_KV_HEADS = 1
SPM_FFN = 32
SPM_CONTEXT = 64
SPM_ROPE_THETA = 500000.0
SPM_RMS_EPS = 1e-6
SPM_SEED = 7
INIT_STD = 0.2

# tiny-llama-bpe tensor types, by HF name (anything not listed: F32)
def bpe_tensor_type(hf_name: str) -> QT:
    if hf_name == "model.embed_tokens.weight":
        return QT.Q8_0
    if hf_name.endswith("layernorm.weight") or hf_name == "model.norm.weight":
        return QT.F32
    if hf_name.startswith("model.layers.0."):
        return QT.Q4_1
    if hf_name.startswith("model.layers.1.self_attn."):
        return QT.Q4_0
    if hf_name.startswith("model.layers.1.mlp."):
        return QT.F16
    raise ValueError(hf_name)


# ---------------------------------------------------------------------------------------------
# Names and the Q/K permutation (llama.cpp's convert_hf_to_gguf.py / transformers' inverse)
# ---------------------------------------------------------------------------------------------

HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    assert parts[:2] == ["model", "layers"], hf_name
    return f"blk.{parts[2]}.{HF_TO_GGUF_LAYER['.'.join(parts[3:])]}"


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> ggml pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reverse_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights (GGUF -> HF)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def to_gguf_layout(hf_name: str, w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return permute(w, n_head, n_head)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return permute(w, n_head, n_kv)
    return w


def from_gguf_layout(g_name: str, w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    if ".attn_q." in g_name:
        return reverse_permute(w, n_head, n_head)
    if ".attn_k." in g_name:
        return reverse_permute(w, n_head, n_kv)
    return w


def add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: QT) -> None:
    data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    if qtype in (QT.F32, QT.F16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=qtype)


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# tiny-llama-bpe.gguf
# ---------------------------------------------------------------------------------------------


def write_bpe_gguf(path: str, all_f32: bool = False) -> dict:
    """Returns {hf_name: (gguf_name, qtype, original f32 array)}. all_f32: every tensor F32 (a
    check that the conversion itself is lossless; that file is not kept)."""
    cfg = json.load(open(os.path.join(TINY_LLAMA, "config.json")))
    tok_json = json.load(open(os.path.join(TINY_LLAMA, "tokenizer.json"), encoding="utf-8"))
    weights = load_np(os.path.join(TINY_LLAMA, "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name("Tiny Llama")
    # LlamaModel.set_gguf_parameters (TextModel's, then vocab_size and rope.dimension_count)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)  # nominal: the types are mixed
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)

    # _set_vocab_gpt2: tokens in id order, added special tokens CONTROL, others NORMAL
    vocab = dict(tok_json["model"]["vocab"])
    for t in tok_json["added_tokens"]:
        vocab[t["content"]] = t["id"]
    inv = {i: t for t, i in vocab.items()}
    assert sorted(inv) == list(range(cfg["vocab_size"])), "tiny-llama ids are not dense"
    tokens = [inv[i] for i in range(len(inv))]
    added = {t["id"]: t for t in tok_json["added_tokens"]}
    toktypes = [
        (gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        if i in added
        else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    special = gguf.SpecialVocab(TINY_LLAMA, load_merges=True, n_vocab=len(tokens))
    assert special.special_token_ids == {"bos": cfg["bos_token_id"], "eos": cfg["eos_token_id"]}, special
    assert special.add_special_token.get("bos") is True, special
    special.add_to_gguf(w, quiet=True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    written = {}
    for hf_name in sorted(weights):  # convert_hf_to_gguf walks the safetensors names, sorted
        arr = weights[hf_name].astype(np.float32)
        g = gguf_name(hf_name)
        qt = QT.F32 if all_f32 else bpe_tensor_type(hf_name)
        add_tensor(w, g, to_gguf_layout(hf_name, arr, n_head, n_kv), qt)
        written[hf_name] = (g, qt, arr)
    assert "lm_head.weight" not in weights and cfg["tie_word_embeddings"]
    finish(w)
    return written


# ---------------------------------------------------------------------------------------------
# tiny-spm.gguf
# ---------------------------------------------------------------------------------------------


def learn_spm_pieces(corpus, n_merges):
    """SentencePiece-style BPE: words are whitespace-split and ▁-prefixed, merges never cross a
    word, and (like SentencePiece's split_by_unicode_script / split_digits) only letters and ▁ are
    merged: digits and punctuation stay single characters. Ties go to the lexicographically
    smallest pair, so the result is reproducible.
    Returns (merged pieces in merge order, characters by frequency then character)."""
    counts = {}
    for line in corpus:
        for word in line.split():
            w = "\u2581" + word
            counts[w] = counts.get(w, 0) + 1
    char_freq = {}
    for w, c in counts.items():
        for ch in w:
            char_freq[ch] = char_freq.get(ch, 0) + c
    words = {w: list(w) for w in counts}
    pieces, seen = [], set()
    while len(pieces) < n_merges:
        pairs = {}
        for w, syms in words.items():
            for a, b in zip(syms, syms[1:]):
                if (a + b).replace("\u2581", "").isalpha():
                    pairs[(a, b)] = pairs.get((a, b), 0) + counts[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
        if a + b not in seen:
            seen.add(a + b)
            pieces.append(a + b)
    chars = sorted(char_freq, key=lambda ch: (-char_freq[ch], ch))
    return pieces, chars


def spm_vocab():
    pieces, chars = learn_spm_pieces(SPM_CORPUS, SPM_MERGES)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    for i, p in enumerate(pieces + chars):  # SentencePiece BPE: score = -(rank), characters last
        tokens.append(p)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i))
    tokens.append(SPM_USER_DEFINED)  # llama.cpp's converter gives added tokens score -1000
    types.append(gguf.TokenType.USER_DEFINED)
    scores.append(-1000.0)
    assert len(set(tokens)) == len(tokens)
    return tokens, [int(t) for t in types], scores


def spm_weights(vocab_size: int) -> dict:
    """Random f32 HF-layout weights (normal(0, INIT_STD) matrices, norms 1 + 0.1 N(0,1))."""
    rng = np.random.default_rng(SPM_SEED)
    head_dim = SPM_HIDDEN // SPM_HEADS
    h, f = SPM_HIDDEN, SPM_FFN

    def mat(rows, cols):
        return (INIT_STD * rng.standard_normal((rows, cols))).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab_size, h)}
    for i in range(SPM_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = mat(SPM_HEADS * head_dim, h)
        w[p + "self_attn.k_proj.weight"] = mat(SPM_KV_HEADS * head_dim, h)
        w[p + "self_attn.v_proj.weight"] = mat(SPM_KV_HEADS * head_dim, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, SPM_HEADS * head_dim)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = mat(f, h)
        w[p + "mlp.up_proj.weight"] = mat(f, h)
        w[p + "mlp.down_proj.weight"] = mat(h, f)
    w["model.norm.weight"] = norm(h)
    w["lm_head.weight"] = mat(vocab_size, h)
    return w


def write_spm_gguf(path: str) -> dict:
    tokens, types, scores = spm_vocab()
    weights = spm_weights(len(tokens))

    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name("Tiny SPM")
    w.add_block_count(SPM_LAYERS)
    w.add_context_length(SPM_CONTEXT)
    w.add_embedding_length(SPM_HIDDEN)
    w.add_feed_forward_length(SPM_FFN)
    w.add_head_count(SPM_HEADS)
    w.add_head_count_kv(SPM_KV_HEADS)
    w.add_rope_freq_base(SPM_ROPE_THETA)
    w.add_layer_norm_rms_eps(SPM_RMS_EPS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # deliberately absent: llama.vocab_size, llama.rope.dimension_count, attention.key_length
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    written = {}
    # llama.cpp's natural order: token_embd, blk.N.*, output_norm, output
    for hf_name, arr in weights.items():
        g = gguf_name(hf_name)
        add_tensor(w, g, to_gguf_layout(hf_name, arr, SPM_HEADS, SPM_KV_HEADS), QT.F32)
        written[hf_name] = (g, QT.F32, arr)
    finish(w)
    return written


# ---------------------------------------------------------------------------------------------
# Reading back: numpy reference and transformers
# ---------------------------------------------------------------------------------------------


def numpy_reference(path: str):
    """{gguf_name: (qtype, ne, f32 HF-layout array)} by gguf.dequantize + reverse permute."""
    reader = gguf.GGUFReader(path)
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    out = {}
    for t in reader.tensors:
        arr = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        arr = arr.reshape(shape)
        out[t.name] = (t.tensor_type, [int(x) for x in t.shape.tolist()], from_gguf_layout(t.name, arr, n_head, n_kv))
    return out


def gguf_metadata(path: str) -> dict:
    """Every key-value pair of the file (arrays: type, length and the first 8 items)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = {
                "type": f"ARRAY[{field.types[-1].name}]",
                "len": len(value),
                "first": [float(x) if isinstance(x, float) else x for x in value[:8]],
            }
        else:
            out[key] = {"type": field.types[0].name, "value": value}
    return out


def load_transformers(folder: str, fname: str):
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = transformers.LlamaForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return tok, model


def checksum(t: torch.Tensor) -> dict:
    a = t.detach().to(torch.float32).contiguous().numpy()
    d = a.astype(np.float64)
    return {
        "shape": list(a.shape),
        "sum": float(d.sum()),
        "sum_sq": float((d * d).sum()),
        "first4": [float(x) for x in a.reshape(-1)[:4]],
        "sha256_f32le": hashlib.sha256(a.astype("<f4").tobytes()).hexdigest(),
    }


def config_fields(cfg) -> dict:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope.get("rope_theta"),
        "rope_parameters": dict(rope),
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": getattr(cfg, "pad_token_id", None),
        "unk_token_id": getattr(cfg, "unk_token_id", None),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
    }


def tokenizer_facts(tok) -> dict:
    return {
        "class": type(tok).__name__,
        "len": len(tok),
        "backend_vocab_size_with_added": tok.backend_tokenizer.get_vocab_size(with_added_tokens=True),
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "unk_token": tok.unk_token,
        "unk_token_id": tok.unk_token_id,
        "pad_token": tok.pad_token,
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": tok.add_eos_token,
    }


def encode_texts(tok, texts) -> list:
    res = []
    for text in texts:
        ids = tok(text)["input_ids"]
        res.append(
            {
                "text": text,
                "input_ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    return res


@torch.no_grad()
def logits_for(model, ids) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], dtype=torch.int64)).logits[0].float().contiguous()


def logits_summary(logits: torch.Tensor, text_index: int, ids) -> dict:
    return {
        "text_index": text_index,
        "input_ids": list(ids),
        "shape": list(logits.shape),
        "argmax": logits.argmax(-1).tolist(),
        "max": [float(x) for x in logits.max(-1).values],
        "logsumexp": [float(x) for x in torch.logsumexp(logits.double(), -1)],
        "last_row": [float(x) for x in logits[-1]],
    }


def tokenizer_json_shape(j: dict) -> dict:
    """tokenizer.json without the vocab and merges (for comparing pipelines)."""
    j = json.loads(json.dumps(j))
    j["model"]["vocab"] = len(j["model"]["vocab"])
    j["model"]["merges"] = len(j["model"]["merges"])
    return j


def json_diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                out.append(f"{path}/{k}: {a.get(k, '<absent>')!r} vs {b.get(k, '<absent>')!r}")
            else:
                out += json_diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_diff(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


# ---------------------------------------------------------------------------------------------
# One fixture: write, load with transformers, check, describe
# ---------------------------------------------------------------------------------------------


def make_one(out: str, name: str, written: dict, texts) -> tuple[dict, dict]:
    fname = name + ".gguf"
    path = os.path.join(out, fname)
    ref = numpy_reference(path)
    tok, model = load_transformers(out, fname)
    cfg = model.config

    # weights: transformers == numpy dequantize + reverse permute, bit for bit
    params = dict(model.named_parameters())  # a tied lm_head is not listed
    g_by_hf = {hf: g for hf, (g, _, _) in written.items()}
    hf_by_g = {g: hf for hf, g in g_by_hf.items()}
    assert set(params) == set(written), (sorted(params), sorted(written))
    tensors = {}
    max_err = {}
    for hf_name, p in params.items():
        g, qt, orig = written[hf_name]
        rqt, ne, arr = ref[g]
        assert rqt == qt, (g, rqt, qt)
        mine = torch.from_numpy(np.ascontiguousarray(arr))
        if not torch.equal(p.detach(), mine):
            raise SystemExit(f"{name}: transformers' {hf_name} differs from numpy dequantize+unpermute")
        # against the weights the file was written from
        if qt == QT.F32:
            assert np.array_equal(arr, orig), f"{name}: {hf_name} F32 not lossless"
        elif qt == QT.F16:
            assert np.array_equal(arr, orig.astype(np.float16).astype(np.float32)), f"{name}: {hf_name} F16"
        else:
            g_layout = to_gguf_layout(hf_name, orig, cfg.num_attention_heads, cfg.num_key_value_heads)
            rt = gguf.quants.dequantize(gguf.quants.quantize(g_layout, qt), qt).reshape(orig.shape)
            rt = from_gguf_layout(g, rt, cfg.num_attention_heads, cfg.num_key_value_heads)
            assert np.array_equal(arr, rt), f"{name}: {hf_name} {qt.name} round trip"
        max_err[hf_name] = float(np.abs(arr - orig).max())
        tensors[hf_name] = dict(checksum(p), gguf_name=g, ggml_type=qt.name)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    gguf_tensors = [
        {"name": g, "ggml_type": QT(rqt).name, "ne": ne, "hf_name": hf_by_g[g]} for g, (rqt, ne, _) in ref.items()
    ]

    enc = encode_texts(tok, texts)
    li = LOGITS_TEXT[name]
    ids = enc[li]["input_ids"]
    logits = logits_for(model, ids)

    tok_json = json.loads(tok.backend_tokenizer.to_str())
    n_file_tokens = len(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data)
    notes = []
    beyond = [t for t in tok_json["added_tokens"] if t["id"] >= n_file_tokens]
    if beyond:
        notes.append(
            "transformers adds tokens the file does not have, past its vocabulary: "
            + ", ".join(f"{t['content']!r} id {t['id']}" for t in beyond)
            + f" (len(tokenizer) {len(tok)} > config.vocab_size {cfg.vocab_size}); these come from the "
            "tokenizer class's default special tokens (GPT2Tokenizer: unk/bos/eos '<|endoftext|>')"
        )
    if tok_json["model"].get("unk_token") is None and tok.unk_token is not None:
        notes.append(
            f"unk token {tok.unk_token!r} is an added special token, but model.unk_token is null: a character "
            "with no piece and no byte token would be dropped, not mapped to unk"
        )
    info = {
        "file": fname,
        "file_bytes": os.path.getsize(path),
        "loaded_with": (
            f"AutoTokenizer.from_pretrained(dir, gguf_file={fname!r}); "
            f"LlamaForCausalLM.from_pretrained(dir, gguf_file={fname!r}, dtype=torch.float32, "
            'attn_implementation="eager")'
        ),
        "gguf_metadata": gguf_metadata(path),
        "gguf_tensors": gguf_tensors,
        "config": config_fields(cfg),
        "tokenizer": tokenizer_facts(tok),
        "tokenizer_json_file": f"{name}.tokenizer.json",
        "notes": notes,
        "texts": enc,
        "logits": logits_summary(logits, li, ids),
        "tensors": tensors,
        "max_abs_err_vs_source_f32": max_err,
    }
    extra = {
        "tok": tok,
        "tok_json": tok_json,
        "logits": logits,
        "ids": ids,
        "model": model,
    }
    return info, extra


def bpe_parity(info: dict, extra: dict, texts) -> dict:
    """tiny-llama-bpe against the tiny-llama folder: tokenizer ids, pipeline, logits."""
    src_tok = tokenizers.Tokenizer.from_file(os.path.join(TINY_LLAMA, "tokenizer.json"))
    mismatches = []
    for e in info["texts"]:
        want = src_tok.encode(e["text"]).ids
        if want != e["input_ids"]:
            mismatches.append({"text": e["text"], "tiny_llama": want, "transformers_gguf": e["input_ids"]})
            print(f"  NOTE: {BPE_NAME}: transformers' ids differ from tiny-llama/tokenizer.json on {e['text']!r}")
    src_json = json.load(open(os.path.join(TINY_LLAMA, "tokenizer.json"), encoding="utf-8"))
    got = extra["tok_json"]
    same_vocab = src_json["model"]["vocab"] == got["model"]["vocab"]
    same_merges = [list(m) for m in src_json["model"]["merges"]] == [list(m) for m in got["model"]["merges"]]
    diffs = json_diff(tokenizer_json_shape(src_json), tokenizer_json_shape(got))

    # logits against the original f32 model on the same ids (quantisation error, for information)
    src_model = transformers.LlamaForCausalLM.from_pretrained(
        TINY_LLAMA, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    src_logits = logits_for(src_model, extra["ids"])

    # The same conversion with every tensor F32 (not kept) must reproduce tiny-llama exactly: what
    # is left in logits_max_abs_diff_vs_tiny_llama_f32 is quantisation error only.
    with tempfile.TemporaryDirectory() as tmp:
        write_bpe_gguf(os.path.join(tmp, "all-f32.gguf"), all_f32=True)
        _, f32_model = load_transformers(tmp, "all-f32.gguf")
        f32_diff = float((logits_for(f32_model, extra["ids"]) - src_logits).abs().max())
    if f32_diff > 1e-6:
        raise SystemExit(f"{BPE_NAME}: an all-F32 conversion differs from tiny-llama by {f32_diff}")
    return {
        "ids_equal_on_all_texts": not mismatches,
        "mismatches": mismatches,
        "vocab_equal": same_vocab,
        "merges_equal": same_merges,
        "tokenizer_json_differences_besides_vocab_and_merges": diffs,
        "all_f32_conversion_logits_max_abs_diff_vs_tiny_llama": f32_diff,
        "logits_max_abs_diff_vs_tiny_llama_f32": float((extra["logits"] - src_logits).abs().max()),
        "argmax_equal_vs_tiny_llama_f32": bool(torch.equal(extra["logits"].argmax(-1), src_logits.argmax(-1))),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def compact_json(obj, indent=0) -> str:
    """JSON with indent 2, but lists of scalars (ids, floats) on one line."""
    pad, pad1 = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(k, ensure_ascii=False)}: {compact_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        return "[\n" + ",\n".join(pad1 + compact_json(x, indent + 1) for x in obj) + "\n" + pad + "]"
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError("non-finite float in expected.json")
    return json.dumps(obj, ensure_ascii=False)


def generate(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    expected = {
        "about": (
            "What transformers makes of each GGUF file here; written by scripts/make_gguf_fixtures.py "
            "(see its docstring). tensors.*: checksums of the f32 weights transformers loaded "
            "(dequantised, Q/K rows un-permuted), sum and sum_sq accumulated in float64 in row-major "
            "order, sha256 over the little-endian f32 bytes. logits: eval mode, no grad, batch of 1, no "
            "padding; per position argmax/max/logsumexp (float64) and the whole last row; the full "
            "[seq, vocab] logits are in expected.safetensors as <name>.logits."
        ),
        "versions": versions(),
        "files": {},
    }
    tensors_out = {}

    for name, writer in ((BPE_NAME, write_bpe_gguf), (SPM_NAME, write_spm_gguf)):
        texts = COMMON_TEXTS + EXTRA_TEXTS[name]
        written = writer(os.path.join(out, name + ".gguf"))
        info, extra = make_one(out, name, written, texts)
        if name == BPE_NAME:
            info["tokenizer_parity"] = bpe_parity(info, extra, texts)
        else:
            info["spm_vocab"] = {
                "corpus": SPM_CORPUS,
                "merges_learned": SPM_MERGES,
                "layout": "0 <unk> (type 2), 1 <s>, 2 </s> (type 3), 3..258 <0x00>..<0xFF> (type 6, score 0), "
                "then merged pieces in merge order and single characters, score -(index from 259), type 1, "
                f"then {SPM_USER_DEFINED} (type 4, score -1000)",
                "merges_transformers_derived": len(extra["tok_json"]["model"]["merges"]),
                "note": "no tokenizer.ggml.merges key: transformers derives the merges with "
                "tokenization_utils_base.generate_merges(vocab, scores)",
            }
        expected["files"][name] = info
        with open(os.path.join(out, f"{name}.tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(extra["tok"].backend_tokenizer.to_str(pretty=True))
            f.write("\n")
        # the dumped tokenizer.json, loaded on its own (as the Rust side will), gives the same ids
        dumped = tokenizers.Tokenizer.from_file(os.path.join(out, f"{name}.tokenizer.json"))
        for e in info["texts"]:
            if dumped.encode(e["text"]).ids != e["input_ids"]:
                raise SystemExit(f"{name}: {name}.tokenizer.json does not reproduce the ids of {e['text']!r}")
        tensors_out[f"{name}.logits"] = extra["logits"]
        tensors_out[f"{name}.input_ids"] = torch.tensor(extra["ids"], dtype=torch.int64)
        print(f"  {name}: {len(info['tensors'])} tensors checked bit-exact; vocab {info['config']['vocab_size']}")

    save_file(tensors_out, os.path.join(out, "expected.safetensors"), metadata={"script": "make_gguf_fixtures.py"})
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        f.write(compact_json(expected))
        f.write("\n")


def list_files(out: str) -> None:
    total = 0
    for f in sorted(os.listdir(out)):
        p = os.path.join(out, f)
        size = os.path.getsize(p)
        total += size
        digest = hashlib.sha256(open(p, "rb").read()).hexdigest()[:16]
        print(f"  {f:32s} {size:9d}  sha256:{digest}")
    print(f"  {'total':32s} {total:9d}")


def check(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        mine, theirs = sorted(os.listdir(tmp)), sorted(os.listdir(out)) if os.path.isdir(out) else []
        ok = mine == theirs
        if not ok:
            print(f"  file lists differ: generated {mine}, committed {theirs}")
        for f in mine:
            a = open(os.path.join(tmp, f), "rb").read()
            b = open(os.path.join(out, f), "rb").read() if f in theirs else None
            same = a == b
            ok &= same
            print(f"  {f:32s} {'identical' if same else 'DIFFERS'}")
    if not ok:
        sys.exit("gguf fixture check FAILED (regenerate with scripts/make_gguf_fixtures.py and review the diff)")
    print("gguf fixture check passed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: tests/fixtures/gguf)")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # SpecialVocab warns about tiny-llama's pair template ("<s> $A <s> $B"), as the converter would
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)

    if args.check:
        check(args.out)
    else:
        generate(args.out)
        print(f"wrote fixtures to {args.out}")
    list_files(args.out)


if __name__ == "__main__":
    main()
