#!/usr/bin/env python3
"""Make tiny Hugging Face transformer fixtures (BERT and Llama families) for the Rust tests.

What it makes, under tests/fixtures/transformers/ (about 0.3 MB in all, meant to be committed):

  tiny-bert/       tokenizer.json   `tokenizers` WordPiece tokenizer whose vocabulary is learned
                                    here from the fixed sentences below (lowercase BertNormalizer,
                                    BertPreTokenizer, [CLS] $A [SEP] post-processor); see
                                    learn_wordpiece_vocab for why not WordPieceTrainer
                   config.json      transformers.BertConfig (hidden 32, 2 layers, 4 heads,
                   model.safetensors  intermediate 64, 64 positions), `BertModel` (with pooler)
                                    initialised at random after torch.manual_seed(0)
                   expected.safetensors / expected.json
                                    3 sentences padded to the longest: input_ids,
                                    token_type_ids, attention_mask, last_hidden_state [3, seq, 32],
                                    pooler_output [3, 32], sentence_embedding [3, 32] (mask-weighted
                                    mean pooling of last_hidden_state, then L2 normalisation)
  tiny-bert-cls/   the same tokenizer and config plus num_labels=3,
                   `BertForSequenceClassification` after torch.manual_seed(1);
                   expected: logits [3, 3] on the same 3 padded sentences
  tiny-llama/      tokenizer.json   byte-level BPE trained here with tokenizers' BpeTrainer (ByteLevel pre-tokenizer with
                                    add_prefix_space=False, ByteLevel decoder, `<s>` prepended by
                                    the post-processor)
                   config.json      transformers.LlamaConfig (hidden 32, 2 layers, 4 heads,
                   model.safetensors  2 KV heads, intermediate 64, tied embeddings),
                                    `LlamaForCausalLM` after torch.manual_seed(2)
                   expected: for 2 texts, each run alone (batch 1, no padding): input_ids_<i>,
                   logits_<i> [seq, vocab]; expected.json has mean_nll_<i>, the mean next-token
                   cross-entropy in nats (perplexity = exp(mean_nll_<i>))

All expected tensors are float32 (ids and masks int64), computed in eval mode under
torch.no_grad() with transformers' default attention implementation (the eager one is run too,
and the largest difference between the two is written in expected.json as `eager_max_abs_diff`).

Weights: transformers' own random initialisation (normal with std `initializer_range`), except
that (a) initializer_range is 0.2 instead of the default 0.02, so attention is far from uniform
and a wrong mask / RoPE / head split changes the outputs well above float tolerance, and (b) after
init every norm weight is set to 1 + 0.1*N(0,1) and every bias to 0.1*N(0,1) (from the same
seeded generator), so a loader that drops a bias or a LayerNorm/RMSNorm weight fails the tests.
The [PAD] row of BERT's word embeddings stays zero, as transformers initialises it.

Run (needs torch, transformers, tokenizers, safetensors; no network, no model hub):

    /work/pyenv/bin/python scripts/make_transformer_fixtures.py            # write the fixtures
    /work/pyenv/bin/python scripts/make_transformer_fixtures.py --check    # only re-verify them
    /work/pyenv/bin/python scripts/make_transformer_fixtures.py --out DIR  # write elsewhere

The outputs are deterministic for the fixed seeds, texts and library versions (torch runs on one
thread so reductions happen in a fixed order); the versions used are recorded in each
expected.json. After writing, the script reloads every folder with AutoModel* .from_pretrained
(local folder) and Tokenizer.from_file and checks they reproduce the expected outputs.
"""
import argparse
import copy
import hashlib
import json
import os
import sys

import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "transformers")

INIT_RANGE = 0.2  # std of the normal init of weights (transformers' default is 0.02)
NORM_BIAS_STD = 0.1  # spread of norm weights around 1 and of biases around 0

# ---------------------------------------------------------------------------------------------
# Fixed text. Do not edit without regenerating every fixture.
# ---------------------------------------------------------------------------------------------

BERT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn useful features.",
    "Compression makes neural networks faster and smaller.",
    "We prune the weights that matter least to the output.",
    "Quantization stores each weight in fewer bits.",
    "The cat sat on the warm mat by the door.",
    "Rain is falling on the quiet city tonight.",
    "She reads a book about the history of science.",
    "Transformers use attention to mix information between tokens.",
    "Every layer has a normalization step and a feed forward block.",
    "The teacher asked the students to write a short story.",
    "Fresh bread smells wonderful in the early morning.",
    "He walked along the river and watched the boats.",
    "The server answers requests with a small JSON document.",
    "Please send the report before the meeting on Friday.",
    "Mountains are covered with snow during the winter.",
    "The children played football in the park after school.",
    "A good test checks one thing and fails loudly.",
    "The engine loads the model and runs a forward pass.",
    "Sentence embeddings are pooled from the hidden states.",
    "The library opens at nine and closes at five.",
    "Birds sing in the trees when the sun rises.",
    "Our team builds tools that make models cheaper to run.",
    "The train to the coast leaves from platform two.",
    "Coffee and tea are popular drinks around the world.",
    "The scientist measured the temperature of the water.",
    "Small changes in the input can change the prediction.",
    "The museum shows paintings from many different countries.",
    "Write clear code, and keep the tests fast.",
    "The garden is full of red and yellow flowers.",
    "A tokenizer splits text into words and word pieces.",
    "The old bridge was repaired last summer.",
    "Music filled the hall as the concert began.",
    "They cooked dinner together and talked for hours.",
    "The market sells fruit, vegetables and fresh fish.",
    "Learning a new language takes patience and practice.",
]

# The three sentences the BERT fixtures are run on: different lengths (so padding is exercised),
# upper case and an accent (normalisation), an unseen word (word pieces), and a character the
# vocabulary lacks ("€", which turns its whole word into [UNK]).
BERT_TEST_TEXTS = [
    "The cat sat.",
    "Compression makes neural networks faster!",
    "A café near the MUSEUM sells unbelievable bread for 5€ every morning.",
]

LLAMA_CORPUS = [
    "Once upon a time there was a little robot who wanted to learn.",
    "Every morning the robot read a book and wrote down new words.",
    "The sun rose over the hills and the birds began to sing.",
    "Models are trained on text and learn to predict the next token.",
    "A language model assigns a probability to every possible next word.",
    "Perplexity is the exponential of the mean negative log likelihood.",
    "The small model runs quickly, even on a laptop without a GPU.",
    "Compression keeps the important weights and drops the rest.",
    "The cat chased the mouse around the kitchen table.",
    "After dinner they walked to the lake and watched the stars.",
    "Good tests are small, fast, and easy to understand.",
    "The river flows from the mountains down to the sea.",
    "She opened the window and let the cool air into the room.",
    "Rotary position embeddings rotate the queries and the keys.",
    "Grouped query attention shares each key head between two query heads.",
    "The story ends when the robot finally learns to tell jokes.",
]

# The two texts the Llama fixture is run on, each alone (batch of 1, no padding). The second has
# multi-byte UTF-8 characters so the byte-level path is exercised.
LLAMA_TEST_TEXTS = [
    "Once upon a time the little robot read a book.",
    "The café's naïve robot said: hello — 42 times!",
]

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_VOCAB_SIZE = 320
LLAMA_SPECIALS = ["<s>", "</s>"]
LLAMA_VOCAB_SIZE = 320


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def bert_pipeline() -> Tokenizer:
    """An empty WordPiece tokenizer with BERT's normaliser and pre-tokeniser."""
    tok = Tokenizer(models.WordPiece(vocab={"[UNK]": 0}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def learn_wordpiece_vocab(tok: Tokenizer, corpus, vocab_size: int) -> dict:
    """WordPiece vocabulary learned the way `tokenizers.trainers.WordPieceTrainer` does it
    (frequency-ranked BPE merges over the pre-tokenised words, word-internal pieces prefixed
    "##"), but reproducibly: the trainer numbers the "##" pieces in Rust HashMap order, which
    changes from process to process and also changes which of two equally frequent merges wins,
    so here ties go to the lexicographically smallest pair and the alphabet is sorted.
    """
    counts = {}
    for line in corpus:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in counts}
    vocab = list(BERT_SPECIALS)
    vocab += sorted({c for w in counts for c in w})
    vocab += sorted({"##" + c for w in counts for c in w[1:]})
    seen = set(vocab)
    while len(vocab) < vocab_size:
        pairs = {}
        for w, syms in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + counts[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b[2:]
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
    return {t: i for i, t in enumerate(vocab)}


def build_bert_tokenizer() -> Tokenizer:
    pipeline = bert_pipeline()
    vocab = learn_wordpiece_vocab(pipeline, BERT_CORPUS, BERT_VOCAB_SIZE)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = pipeline.normalizer
    tok.pre_tokenizer = pipeline.pre_tokenizer
    tok.add_special_tokens(BERT_SPECIALS)  # already in the vocab: marks them special, keeps their ids
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    assert [tok.token_to_id(t) for t in BERT_SPECIALS] == list(range(len(BERT_SPECIALS)))
    return tok


def build_llama_tokenizer() -> Tokenizer:
    # BpeTrainer is reproducible here: the whole byte alphabet is given up front (sorted), so no
    # token id depends on HashMap order, and ties between merges are broken by token ids.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(LLAMA_CORPUS, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B:1",
        special_tokens=[("<s>", bos_id)],
    )
    return tok


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def perturb_norms_and_biases(model: torch.nn.Module) -> None:
    """Give norm weights and biases non-trivial values (transformers' init makes them 1 and 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            cls = type(owner).__name__
            if leaf == "bias":
                p.copy_(NORM_BIAS_STD * torch.randn(p.shape))
            elif leaf == "weight" and ("LayerNorm" in cls or "RMSNorm" in cls):
                p.copy_(1.0 + NORM_BIAS_STD * torch.randn(p.shape))


def bert_config(vocab_size: int, pad_id: int, **extra) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=64,
        type_vocab_size=2,
        initializer_range=INIT_RANGE,
        layer_norm_eps=1e-12,
        pad_token_id=pad_id,
        **extra,
    )


def llama_config(vocab_size: int, bos_id: int, eos_id: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        initializer_range=INIT_RANGE,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
    )


def make_model(cls, config, seed: int):
    torch.manual_seed(seed)
    model = cls(config)
    perturb_norms_and_biases(model)
    model = model.float().eval()
    return model


def with_eager(model):
    """A copy of the model (same weights) under the eager attention implementation."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    return eager.eval()


# ---------------------------------------------------------------------------------------------
# Expected outputs
# ---------------------------------------------------------------------------------------------


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def encode_bert(tok: Tokenizer, texts):
    tok = Tokenizer.from_str(tok.to_str())  # a copy, so padding does not leak into tokenizer.json
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    encs = tok.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.int64),
        "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.int64),
        "tokens": [e.tokens for e in encs],
    }


def mean_pool_l2(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


@torch.no_grad()
def bert_outputs(model, enc) -> dict:
    out = model(
        input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"], attention_mask=enc["attention_mask"]
    )
    if isinstance(model, transformers.BertForSequenceClassification):
        return {"logits": out.logits.float().contiguous()}
    return {
        "last_hidden_state": out.last_hidden_state.float().contiguous(),
        "pooler_output": out.pooler_output.float().contiguous(),
        "sentence_embedding": mean_pool_l2(out.last_hidden_state, enc["attention_mask"]).float().contiguous(),
    }


@torch.no_grad()
def llama_outputs(model, ids_list) -> dict:
    res = {}
    for i, ids in enumerate(ids_list):
        ids = torch.tensor([ids], dtype=torch.int64)
        logits = model(input_ids=ids).logits[0].float()
        res[f"logits_{i}"] = logits.contiguous()
    return res


def mean_nll(logits: torch.Tensor, ids) -> float:
    ids = torch.tensor(ids, dtype=torch.int64)
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="mean").item()


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Fixture folders
# ---------------------------------------------------------------------------------------------


def tokenizer_info(tok: Tokenizer, specials) -> dict:
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_token_ids": {s: tok.token_to_id(s) for s in specials},
    }


def save_folder(model, tok: Tokenizer, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(os.path.join(folder, "tokenizer.json"), pretty=True)


def make_bert(out: str, tok: Tokenizer) -> None:
    enc = encode_bert(tok, BERT_TEST_TEXTS)
    pad_id = tok.token_to_id("[PAD]")
    vocab = tok.get_vocab_size(with_added_tokens=True)

    for name, cls, seed, extra in [
        ("tiny-bert", transformers.BertModel, 0, {}),
        ("tiny-bert-cls", transformers.BertForSequenceClassification, 1, {"num_labels": 3}),
    ]:
        folder = os.path.join(out, name)
        model = make_model(cls, bert_config(vocab, pad_id, **extra), seed)
        outs = bert_outputs(model, enc)
        eager_diff = max_diff(outs, bert_outputs(with_eager(model), enc))
        save_folder(model, tok, folder)
        tensors = {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
        tensors.update(outs)
        save_file(tensors, os.path.join(folder, "expected.safetensors"), metadata={"seed": str(seed)})
        notes = {}
        if name == "tiny-bert":
            notes["sentence_embedding"] = "mean of last_hidden_state over attention_mask==1 positions, then L2-normalised"
            notes["pooler_output"] = "tanh(pooler.dense(last_hidden_state[:, 0])), transformers' BertPooler"
        else:
            notes["logits"] = "classifier(pooler_output): tanh(bert.pooler.dense(h[:, 0])) then classifier"
        write_json(
            os.path.join(folder, "expected.json"),
            {
                "model_class": cls.__name__,
                "notes": notes,
                "seed": seed,
                "texts": BERT_TEST_TEXTS,
                "padding": "longest",
                "tokens": enc["tokens"],
                "input_ids": enc["input_ids"].tolist(),
                "token_type_ids": enc["token_type_ids"].tolist(),
                "attention_mask": enc["attention_mask"].tolist(),
                "outputs": {k: list(v.shape) for k, v in outs.items()},
                "attn_implementation": model.config._attn_implementation,
                "eager_max_abs_diff": eager_diff,
                "tokenizer": tokenizer_info(tok, BERT_SPECIALS),
                "versions": versions(),
            },
        )


def make_llama(out: str, tok: Tokenizer) -> None:
    folder = os.path.join(out, "tiny-llama")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    model = make_model(
        transformers.LlamaForCausalLM, llama_config(vocab, tok.token_to_id("<s>"), tok.token_to_id("</s>")), 2
    )
    encs = [tok.encode(t) for t in LLAMA_TEST_TEXTS]
    ids_list = [e.ids for e in encs]
    outs = llama_outputs(model, ids_list)
    eager_diff = max_diff(outs, llama_outputs(with_eager(model), ids_list))
    save_folder(model, tok, folder)
    tensors = {}
    info = {
        "model_class": "LlamaForCausalLM",
        "seed": 2,
        "texts": LLAMA_TEST_TEXTS,
        "padding": "none; each text is run alone as a batch of 1",
    }
    for i, ids in enumerate(ids_list):
        tensors[f"input_ids_{i}"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"logits_{i}"] = outs[f"logits_{i}"]
        nll = mean_nll(outs[f"logits_{i}"], ids)
        info[f"tokens_{i}"] = encs[i].tokens
        info[f"input_ids_{i}"] = ids
        info[f"attention_mask_{i}"] = encs[i].attention_mask
        info[f"mean_nll_{i}"] = nll
        info[f"perplexity_{i}"] = float(torch.tensor(nll, dtype=torch.float64).exp())
    info["mean_nll"] = "mean over positions t=0..n-2 of -log softmax(logits_i[t])[input_ids_i[t+1]], natural log"
    info["outputs"] = {k: list(v.shape) for k, v in outs.items()}
    info["attn_implementation"] = model.config._attn_implementation
    info["eager_max_abs_diff"] = eager_diff
    info["tokenizer"] = tokenizer_info(tok, LLAMA_SPECIALS)
    info["versions"] = versions()
    save_file(tensors, os.path.join(folder, "expected.safetensors"), metadata={"seed": "2"})
    write_json(os.path.join(folder, "expected.json"), info)


# ---------------------------------------------------------------------------------------------
# Verification: reload each folder the way a user would and compare
# ---------------------------------------------------------------------------------------------


def check(out: str, atol: float = 1e-5) -> None:
    ok = True

    def report(name, what, diff):
        nonlocal ok
        good = diff <= atol
        ok &= good
        print(f"  {name:14s} {what:28s} max|diff| = {diff:.3e} {'ok' if good else 'MISMATCH'}")

    for name in ("tiny-bert", "tiny-bert-cls"):
        folder = os.path.join(out, name)
        exp = load_file(os.path.join(folder, "expected.safetensors"))
        meta = json.load(open(os.path.join(folder, "expected.json")))
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        enc = encode_bert(tok, meta["texts"])
        for k in ("input_ids", "token_type_ids", "attention_mask"):
            if not torch.equal(enc[k], exp[k]):
                ok = False
                print(f"  {name}: tokenizer.json gives different {k}")
        auto = transformers.AutoModel if name == "tiny-bert" else transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(folder, dtype=torch.float32).eval()
        got = bert_outputs(model, enc)
        for k, v in got.items():
            report(name, f"{auto.__name__} {k}", (v - exp[k]).abs().max().item())

    folder = os.path.join(out, "tiny-llama")
    exp = load_file(os.path.join(folder, "expected.safetensors"))
    meta = json.load(open(os.path.join(folder, "expected.json")))
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for i, text in enumerate(meta["texts"]):
        ids = tok.encode(text).ids
        if ids != exp[f"input_ids_{i}"].tolist():
            ok = False
            print(f"  tiny-llama: tokenizer.json gives different input_ids_{i}")
        if tok.decode(ids, skip_special_tokens=True) != text:
            ok = False
            print(f"  tiny-llama: decode does not round-trip text {i}")
        with torch.no_grad():
            out_ = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
        report("tiny-llama", f"AutoModelForCausalLM logits_{i}", (out_.logits[0] - exp[f"logits_{i}"]).abs().max().item())
        report("tiny-llama", f"mean_nll_{i} (labels= loss)", abs(out_.loss.item() - meta[f"mean_nll_{i}"]))
        report("tiny-llama", f"mean_nll_{i} (from fixture)", abs(mean_nll(exp[f"logits_{i}"], ids) - meta[f"mean_nll_{i}"]))

    if not ok:
        sys.exit("fixture check FAILED")
    print("fixture check passed")


def list_files(out: str) -> None:
    total = 0
    for root, _, files in sorted(os.walk(out)):
        for f in sorted(files):
            p = os.path.join(root, f)
            size = os.path.getsize(p)
            total += size
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest()[:16]
            print(f"  {os.path.relpath(p, out):40s} {size:9d}  sha256:{digest}")
    print(f"  {'total':40s} {total:9d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: tests/fixtures/transformers)")
    ap.add_argument("--check", action="store_true", help="only verify existing fixtures")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if not args.check:
        os.makedirs(args.out, exist_ok=True)
        bert_tok = build_bert_tokenizer()
        llama_tok = build_llama_tokenizer()
        make_bert(args.out, bert_tok)
        make_llama(args.out, llama_tok)
        print(f"wrote fixtures to {args.out}")
    check(args.out)
    list_files(args.out)


if __name__ == "__main__":
    main()
