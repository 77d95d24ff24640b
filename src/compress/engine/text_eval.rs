//! Evaluation of transformers on text (API.md "Evaluation of transformers").
//!
//! Language models (`llama`) are scored on the dataset's documents joined into one token
//! stream and cut into context windows ([`windows`]): perplexity, and against a reference
//! (the job's input model) llama.cpp's `--kl-divergence` figures — KL(reference ‖ model) per
//! token (mean, median, p99, max), top-1 agreement, Δp (the model's probability of the true
//! next token minus the reference's). Encoders (`bert`) are scored per document: the cosine
//! of each sentence embedding to the reference's, the Spearman correlation of the pairwise
//! similarities, and accuracy when the model has a classification head.
//!
//! Both networks run window by window (batch by batch) in the same pass, so nothing grows
//! with the number of tokens but the per-token figures (8 bytes a token) and, when asked,
//! the saved outputs; the reference's own figures (its perplexity, accuracy) come out of the
//! same pass.

use std::time::Instant;

use serde::Serialize;

use super::data::{windows, Batch, Dataset, Subset, Window};
use super::{Family, Mode, Network};
use crate::compress::formats::safetensors::{self, Dtype, TensorSpec};
use crate::compress::parallel::par_map;
use crate::compress::progress::Ctx;
use crate::compress::{Error, Result};

/// How text is read for an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextEvalParams {
    /// Tokens scored at most (language models) or read at most (encoders).
    pub max_tokens: usize,
    /// Window length (language models) or longest document (encoders), in tokens.
    pub context: usize,
    /// Distance between window starts (language models).
    pub stride: usize,
    /// Whether to return the outputs (embeddings, last-position logits) for an artifact.
    pub save_outputs: bool,
}

/// A distribution summarised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    fn of(values: &mut [f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((values.len() - 1) as f64 * q).round() as usize;
            values[i.min(values.len() - 1)]
        };
        Some(Spread {
            mean: values.iter().sum::<f64>() / values.len() as f64,
            median: at(0.5),
            p99: at(0.99),
            max: values[values.len() - 1],
        })
    }
}

/// Mean and spread of Δp.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeltaP {
    /// Mean of p_model(next) − p_reference(next).
    pub mean: f64,
    /// Root mean square.
    pub rms: f64,
}

/// Minimum and mean cosine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cosines {
    /// Smallest cosine over the documents.
    pub min: f64,
    /// Mean cosine.
    pub mean: f64,
}

/// Figures of a language model on a token stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LanguageFigures {
    /// Predictions scored.
    pub tokens: usize,
    /// Windows run.
    pub windows: usize,
    /// Window length and stride used.
    pub context: usize,
    /// Distance between window starts.
    pub stride: usize,
    /// Mean negative log-likelihood of the next token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// KL(reference ‖ model) per token, nats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_divergence: Option<Spread>,
    /// Fraction of tokens where the model's most likely next token is the reference's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// p_model(next) − p_reference(next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_p: Option<DeltaP>,
    /// Tokens through this model's forward pass per second.
    pub tokens_per_second: f64,
    /// Peak resident memory of the process during the evaluation, bytes (Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
}

/// Figures of an encoder on documents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EncoderFigures {
    /// Documents read.
    pub documents: usize,
    /// Tokens read (special tokens included).
    pub tokens: usize,
    /// Cosine of each sentence embedding to the reference's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_cosine: Option<Cosines>,
    /// Spearman correlation of pairwise embedding similarities, model vs reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity_spearman: Option<f64>,
    /// Top-1 accuracy of the classification head on labelled documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean cross-entropy of the head on labelled documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Tokens through this model's forward pass per second.
    pub tokens_per_second: f64,
    /// Peak resident memory of the process during the evaluation, bytes (Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
}

/// The figures of one text evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TextFigures {
    /// A language model.
    Language(LanguageFigures),
    /// An encoder.
    Encoder(EncoderFigures),
}

/// What a text evaluation produced.
#[derive(Debug)]
pub struct TextEvaluation {
    /// The model's figures (with the comparison to the reference, when there is one).
    pub model: TextFigures,
    /// The reference's own figures from the same pass, when there is a reference.
    pub reference: Option<TextFigures>,
    /// The outputs as a safetensors file, when `save_outputs` was asked.
    pub outputs: Option<Vec<u8>>,
}

impl TextEvaluation {
    /// This evaluation of a model as the comparison with itself: the reference's figures are
    /// the model's, and the comparison is exact (KL 0, every top-1 the same, Δp 0, cosines 1)
    /// — what running the same weights twice would give, without running them twice.
    pub fn compared_with_itself(mut self) -> TextEvaluation {
        self.reference = Some(self.model.clone());
        match &mut self.model {
            TextFigures::Language(l) => {
                l.kl_divergence = Some(Spread {
                    mean: 0.0,
                    median: 0.0,
                    p99: 0.0,
                    max: 0.0,
                });
                l.top1_agreement = Some(1.0);
                l.delta_p = Some(DeltaP {
                    mean: 0.0,
                    rms: 0.0,
                });
            }
            TextFigures::Encoder(e) => {
                e.embedding_cosine = Some(Cosines {
                    min: 1.0,
                    mean: 1.0,
                });
                e.similarity_spearman = (e.documents >= 3).then_some(1.0);
            }
        }
        self
    }
}

/// Peak resident memory tracking (`VmHWM`, reset through `/proc/self/clear_refs`).
mod peak {
    /// Resets the high-water mark, where the kernel allows it.
    pub fn reset() {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// The high-water mark of resident memory, bytes.
    pub fn read() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

/// Whether `model` can be compared with `reference`: the same family, and outputs of the
/// same width — encoders are compared on their sentence embeddings (a new classifier head
/// may change the output), language models on their logits.
pub fn comparable(model: &dyn Network, reference: &dyn Network) -> Result<bool> {
    let width = |n: &dyn Network| -> Result<usize> {
        match n.family() {
            Family::Bert => n.layer_width(n.layer_names().last().map_or("", String::as_str)),
            _ => n.output_width(),
        }
    };
    Ok(reference.family() == model.family() && width(reference)? == width(model)?)
}

/// Evaluates `model` (and `reference`, in the same pass) on the text of `dataset`.
pub fn evaluate_text(
    model: &dyn Network,
    reference: Option<&dyn Network>,
    dataset: &Dataset,
    params: &TextEvalParams,
    batch_size: usize,
    ctx: &Ctx<'_>,
) -> Result<TextEvaluation> {
    model.check_dataset(dataset, false)?;
    if let Some(r) = reference {
        r.check_dataset(dataset, false)?;
        if !comparable(model, r)? {
            return Err(Error::DatasetMismatch(
                "the reference model's outputs do not match the model's".into(),
            ));
        }
    }
    if model.text_input().is_none() {
        return Err(Error::TokenizerRequired(
            "the model folder has no tokenizer.json to read text with".into(),
        ));
    }
    peak::reset();
    match model.family() {
        Family::Llama => language(model, reference, dataset, params, batch_size, ctx),
        Family::Bert => encoder(model, reference, dataset, params, batch_size, ctx),
        Family::Sequential => Err(Error::DatasetMismatch(
            "a sequential network reads tensors, not text".into(),
        )),
    }
}

/// Per-token results of one scored position.
#[derive(Debug, Clone, Copy, Default)]
struct Scored {
    nll: f64,
    ref_nll: f64,
    kl: f64,
    same_top: bool,
    delta_p: f64,
}

/// `(log-sum-exp, argmax)` of a row of logits.
fn lse_argmax(row: &[f32]) -> (f64, usize) {
    let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > max {
            max = v;
            best = i;
        }
    }
    let sum: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
    (sum.ln() + f64::from(max), best)
}

/// Scores one position: the model's row `m`, the reference's `r` (if any), the true next id.
fn score(m: &[f32], r: Option<&[f32]>, next: usize) -> Scored {
    let (lse_m, top_m) = lse_argmax(m);
    let lp_m = f64::from(m[next]) - lse_m;
    let Some(r) = r else {
        return Scored {
            nll: -lp_m,
            ..Scored::default()
        };
    };
    let (lse_r, top_r) = lse_argmax(r);
    let lp_r = f64::from(r[next]) - lse_r;
    // KL(r ‖ m) = Σ p_r (log p_r − log p_m), the constant parts taken out of the sum.
    let shift = (lse_m - lse_r) as f32;
    let (lse_r32, mut kl) = (lse_r as f32, 0f64);
    for (&a, &b) in r.iter().zip(m) {
        let p = (a - lse_r32).exp();
        kl += f64::from(p * (a - b + shift));
    }
    Scored {
        nll: -lp_m,
        ref_nll: -lp_r,
        kl: kl.max(0.0),
        same_top: top_m == top_r,
        delta_p: lp_m.exp() - lp_r.exp(),
    }
}

/// Rows `positions` of window `w` of logits `[b, s, v]`, on the host.
fn rows_of(
    logits: &candle_core::Tensor,
    w: usize,
    positions: std::ops::Range<usize>,
) -> Result<Vec<f32>> {
    Ok(logits
        .get(w)?
        .narrow(0, positions.start, positions.len())?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Positions whose logits are copied to the host at once (per model).
const ROWS_PER_CHUNK: usize = 64;

/// Bytes of logits (both models together) a batch of windows may produce at once.
const LOGITS_BUDGET: usize = 256 << 20;

fn language(
    model: &dyn Network,
    reference: Option<&dyn Network>,
    dataset: &Dataset,
    params: &TextEvalParams,
    batch_size: usize,
    ctx: &Ctx<'_>,
) -> Result<TextEvaluation> {
    let text = model
        .text_input()
        .ok_or_else(|| Error::TokenizerRequired("no tokenizer".into()))?;
    let docs = dataset
        .documents()
        .ok_or_else(|| Error::DatasetMismatch("a language model reads text".into()))?;
    let stream = text.encoder.encode_stream(docs)?;
    if stream.len() < 2 {
        return Err(Error::DatasetMismatch(format!(
            "the text holds {} token(s); scoring needs at least 2",
            stream.len()
        )));
    }
    let context = params.context.min(text.max_len).max(2);
    let cut = windows(&stream, context, params.stride, params.max_tokens);
    let vocab = model.output_width()?;
    let models = if reference.is_some() { 2 } else { 1 };
    let per_window = context * vocab * 4 * models;
    let group = (LOGITS_BUDGET / per_window.max(1)).clamp(1, batch_size.max(1));

    let mut scored: Vec<Scored> = Vec::new();
    let mut forward_seconds = 0f64;
    let mut forward_tokens = 0usize;
    let mut last_logits: Vec<f32> = Vec::new();
    let mut i = 0;
    while i < cut.len() {
        ctx.check()?;
        // Windows of one length batch together (all but perhaps the last).
        let len = cut[i].ids.len();
        let mut j = i;
        while j < cut.len() && j - i < group && cut[j].ids.len() == len {
            j += 1;
        }
        let chunk = &cut[i..j];
        let batch = window_batch(chunk)?;
        let started = Instant::now();
        let m = model.forward(&batch, Mode::Eval)?;
        forward_seconds += started.elapsed().as_secs_f64();
        forward_tokens += chunk.len() * len;
        let r = reference
            .map(|r| r.forward(&batch, Mode::Eval))
            .transpose()?;
        for (w, win) in chunk.iter().enumerate() {
            // The logits stay in their tensors; a few rows at a time come to the host.
            let mut from = win.score_from;
            while from < len - 1 {
                let to = (from + ROWS_PER_CHUNK).min(len - 1);
                let mrows = rows_of(&m, w, from..to)?;
                let rrows = r.as_ref().map(|r| rows_of(r, w, from..to)).transpose()?;
                let (mrows, rrows) = (&mrows, rrows.as_ref());
                let rows = par_map((from..to).collect(), |t| {
                    let at = (t - from) * vocab;
                    score(
                        &mrows[at..at + vocab],
                        rrows.map(|r| &r[at..at + vocab]),
                        win.ids[t + 1] as usize,
                    )
                });
                scored.extend(rows);
                from = to;
            }
            if params.save_outputs {
                last_logits.extend(rows_of(&m, w, len - 1..len)?);
            }
        }
        i = j;
        ctx.report(i as f64 / cut.len() as f64, "evaluating text");
    }
    let peak = peak::read();
    let n = scored.len().max(1) as f64;
    let mean_nll = scored.iter().map(|s| s.nll).sum::<f64>() / n;
    let tokens_per_second = if forward_seconds > 0.0 {
        forward_tokens as f64 / forward_seconds
    } else {
        0.0
    };
    let figures = |nll: f64| LanguageFigures {
        tokens: scored.len(),
        windows: cut.len(),
        context,
        stride: params.stride.min(context),
        mean_nll: nll,
        perplexity: nll.exp(),
        kl_divergence: None,
        top1_agreement: None,
        delta_p: None,
        tokens_per_second,
        peak_rss_bytes: peak,
    };
    let mut own = figures(mean_nll);
    let reference_figures = reference.map(|_| {
        let ref_nll = scored.iter().map(|s| s.ref_nll).sum::<f64>() / n;
        let mut kl: Vec<f64> = scored.iter().map(|s| s.kl).collect();
        own.kl_divergence = Spread::of(&mut kl);
        own.top1_agreement = Some(scored.iter().filter(|s| s.same_top).count() as f64 / n);
        let dp_mean = scored.iter().map(|s| s.delta_p).sum::<f64>() / n;
        let dp_rms = (scored.iter().map(|s| s.delta_p * s.delta_p).sum::<f64>() / n).sqrt();
        own.delta_p = Some(DeltaP {
            mean: dp_mean,
            rms: dp_rms,
        });
        let mut r = figures(ref_nll);
        // The throughput is the model's; the reference's is not measured separately.
        r.tokens_per_second = 0.0;
        TextFigures::Language(r)
    });
    let outputs = if params.save_outputs {
        Some(language_outputs(&cut, &scored, &last_logits, vocab)?)
    } else {
        None
    };
    Ok(TextEvaluation {
        model: TextFigures::Language(own),
        reference: reference_figures,
        outputs,
    })
}

/// Windows of equal length as one batch (no padding).
fn window_batch(chunk: &[Window]) -> Result<Batch> {
    let len = chunk[0].ids.len();
    let ids: Vec<u32> = chunk.iter().flat_map(|w| w.ids.iter().copied()).collect();
    Ok(Batch {
        x: candle_core::Tensor::from_vec(ids, (chunk.len(), len), &candle_core::Device::Cpu)?,
        mask: None,
        segments: None,
        y: None,
        labels: None,
        len: chunk.len(),
        indices: (0..chunk.len()).collect(),
    })
}

fn i64_bytes(values: impl Iterator<Item = i64>) -> Vec<u8> {
    values.flat_map(i64::to_le_bytes).collect()
}

/// The `outputs` file of a language-model evaluation: every window's ids (`input_ids`, flat,
/// with `window_begin` and `window_length`), the last position's logits of each window
/// (`last_logits` `[windows, vocab]`) and the NLL of every scored token (`token_nll`).
fn language_outputs(
    cut: &[Window],
    scored: &[Scored],
    last_logits: &[f32],
    vocab: usize,
) -> Result<Vec<u8>> {
    let ids = i64_bytes(cut.iter().flat_map(|w| w.ids.iter().map(|&i| i64::from(i))));
    let total: usize = cut.iter().map(|w| w.ids.len()).sum();
    let begins = i64_bytes(cut.iter().map(|w| w.begin as i64));
    let lengths = i64_bytes(cut.iter().map(|w| w.ids.len() as i64));
    let nll: Vec<f32> = scored.iter().map(|s| s.nll as f32).collect();
    let (logits_bytes, nll_bytes) = (
        safetensors::encode_f32(last_logits),
        safetensors::encode_f32(&nll),
    );
    let w = cut.len();
    safetensors::serialize(
        &Default::default(),
        &[
            (TensorSpec::new("input_ids", Dtype::I64, vec![total]), &ids),
            (
                TensorSpec::new("window_begin", Dtype::I64, vec![w]),
                &begins,
            ),
            (
                TensorSpec::new("window_length", Dtype::I64, vec![w]),
                &lengths,
            ),
            (
                TensorSpec::new("last_logits", Dtype::F32, vec![w, vocab]),
                &logits_bytes,
            ),
            (
                TensorSpec::new("token_nll", Dtype::F32, vec![nll.len()]),
                &nll_bytes,
            ),
        ],
    )
}

/// Embeddings (L2-normalised, `[b, h]`) and head logits (`[b, c]`, when the model has a
/// head) of a batch.
fn encode(net: &dyn Network, batch: &Batch) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let layers = net.layer_names();
    let last = layers
        .last()
        .ok_or_else(|| Error::Internal("an encoder without layers".into()))?;
    let (out, taps) = net.forward_taps(batch, Mode::Eval, &[last.as_str()])?;
    let pooled = &super::bert::mean_pool(&taps[0], batch.mask.as_ref())?;
    let norm = pooled
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    let emb = pooled
        .broadcast_div(&norm)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let head = net.has_head().then(|| out.flatten_all()?.to_vec1::<f32>());
    Ok((emb, head.transpose()?))
}

/// Classes predicted, summed loss and correct count of head logits against labels.
fn head_score(logits: &[f32], classes: usize, labels: &[u32]) -> (f64, usize) {
    let (mut loss, mut correct) = (0f64, 0usize);
    for (row, &y) in logits.chunks_exact(classes).zip(labels) {
        let (lse, top) = lse_argmax(row);
        loss += lse - f64::from(row[y as usize]);
        correct += usize::from(top == y as usize);
    }
    (loss, correct)
}

fn encoder(
    model: &dyn Network,
    reference: Option<&dyn Network>,
    dataset: &Dataset,
    params: &TextEvalParams,
    batch_size: usize,
    ctx: &Ctx<'_>,
) -> Result<TextEvaluation> {
    let text = model
        .text_input()
        .ok_or_else(|| Error::TokenizerRequired("no tokenizer".into()))?;
    let docs = dataset
        .documents()
        .ok_or_else(|| Error::DatasetMismatch("an encoder reads text".into()))?;
    let context = params.context.min(text.max_len).max(2);
    // Documents are read in order until `max_tokens` tokens have been read.
    let mut take = 0usize;
    let mut tokens = 0usize;
    while take < docs.len() && tokens < params.max_tokens {
        tokens += text.encoder.encode(&docs[take], context)?.ids.len();
        take += 1;
    }
    let view = Subset {
        dataset,
        indices: (0..take).collect(),
    };
    let labelled = dataset.y.is_some();
    let mut batches = view
        .batches(batch_size.max(1))
        .reading(Some(super::data::TextInput {
            max_len: context,
            ..text
        }));
    let total = batches.batch_count().max(1);
    let (mut emb_m, mut emb_r) = (Vec::new(), Vec::new());
    let mut head_m: Vec<f32> = Vec::new();
    let (mut loss_m, mut correct_m, mut loss_r, mut correct_r) = (0f64, 0usize, 0f64, 0usize);
    let mut forward_seconds = 0f64;
    let mut done = 0usize;
    for batch in &mut batches {
        ctx.check()?;
        let batch = batch?;
        let started = Instant::now();
        let (e, h) = encode(model, &batch)?;
        forward_seconds += started.elapsed().as_secs_f64();
        emb_m.extend(e);
        if let (Some(h), Some(labels)) = (&h, &batch.labels) {
            let (l, c) = head_score(h, model.output_width()?, labels);
            loss_m += l;
            correct_m += c;
        }
        if params.save_outputs {
            head_m.extend(h.unwrap_or_default());
        }
        if let Some(r) = reference {
            let (e, h) = encode(r, &batch)?;
            emb_r.extend(e);
            if let (Some(h), Some(labels)) = (&h, &batch.labels) {
                let (l, c) = head_score(h, r.output_width()?, labels);
                loss_r += l;
                correct_r += c;
            }
        }
        done += 1;
        ctx.report(done as f64 / total as f64, "evaluating text");
    }
    let peak = peak::read();
    let n = take.max(1) as f64;
    let width = emb_m.len() / take.max(1);
    let has_head = model.has_head() && labelled;
    let figures = |loss: f64, correct: usize| EncoderFigures {
        documents: take,
        tokens,
        embedding_cosine: None,
        similarity_spearman: None,
        accuracy: has_head.then_some(correct as f64 / n),
        loss: has_head.then_some(loss / n),
        tokens_per_second: if forward_seconds > 0.0 {
            tokens as f64 / forward_seconds
        } else {
            0.0
        },
        peak_rss_bytes: peak,
    };
    let mut own = figures(loss_m, correct_m);
    let reference_figures = reference.map(|r| {
        let cos: Vec<f64> = emb_m
            .chunks_exact(width)
            .zip(emb_r.chunks_exact(width))
            .map(|(a, b)| dot(a, b))
            .collect();
        own.embedding_cosine = Some(Cosines {
            min: cos.iter().copied().fold(f64::INFINITY, f64::min),
            mean: cos.iter().sum::<f64>() / n,
        });
        own.similarity_spearman = similarity_spearman(&emb_m, &emb_r, width);
        let mut f = figures(loss_r, correct_r);
        f.accuracy = (r.has_head() && labelled).then_some(correct_r as f64 / n);
        f.loss = (r.has_head() && labelled).then_some(loss_r / n);
        f.tokens_per_second = 0.0;
        TextFigures::Encoder(f)
    });
    let outputs = if params.save_outputs {
        let emb = safetensors::encode_f32(&emb_m);
        let index = i64_bytes(0..take as i64);
        let heads = safetensors::encode_f32(&head_m);
        let mut parts = vec![
            (
                TensorSpec::new("embeddings", Dtype::F32, vec![take, width]),
                emb.as_slice(),
            ),
            (
                TensorSpec::new("document_index", Dtype::I64, vec![take]),
                index.as_slice(),
            ),
        ];
        if !head_m.is_empty() {
            let classes = head_m.len() / take.max(1);
            parts.push((
                TensorSpec::new("logits", Dtype::F32, vec![take, classes]),
                heads.as_slice(),
            ));
        }
        Some(safetensors::serialize(&Default::default(), &parts)?)
    } else {
        None
    };
    Ok(TextEvaluation {
        model: TextFigures::Encoder(own),
        reference: reference_figures,
        outputs,
    })
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// Most documents whose pairwise similarities are compared (n·(n−1)/2 pairs).
const SPEARMAN_DOCUMENTS: usize = 1000;

/// Spearman correlation between the pairwise cosine similarities of two sets of normalised
/// embeddings (the first [`SPEARMAN_DOCUMENTS`] documents); `None` under 3 documents.
fn similarity_spearman(a: &[f32], b: &[f32], width: usize) -> Option<f64> {
    let n = (a.len() / width.max(1)).min(SPEARMAN_DOCUMENTS);
    if n < 3 {
        return None;
    }
    let mut sa = Vec::with_capacity(n * (n - 1) / 2);
    let mut sb = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let (ai, aj) = (
                &a[i * width..(i + 1) * width],
                &a[j * width..(j + 1) * width],
            );
            let (bi, bj) = (
                &b[i * width..(i + 1) * width],
                &b[j * width..(j + 1) * width],
            );
            sa.push(dot(ai, aj));
            sb.push(dot(bi, bj));
        }
    }
    Some(pearson(&ranks(&sa), &ranks(&sb)))
}

/// Ranks (1-based, ties averaged).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return if sxx == syy { 1.0 } else { 0.0 };
    }
    sxy / (sxx * syy).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_matches_hand_computed_kl_and_delta_p() {
        let m = [1.0f32, 2.0, 0.5];
        let r = [1.5f32, 1.0, 0.0];
        let s = score(&m, Some(&r), 1);
        let soft = |v: &[f32]| {
            let z: f64 = v.iter().map(|&x| f64::from(x).exp()).sum();
            v.iter()
                .map(|&x| f64::from(x).exp() / z)
                .collect::<Vec<_>>()
        };
        let (pm, pr) = (soft(&m), soft(&r));
        let kl: f64 = pr.iter().zip(&pm).map(|(p, q)| p * (p / q).ln()).sum();
        assert!((s.kl - kl).abs() < 1e-6, "{} vs {kl}", s.kl);
        assert!((s.nll + pm[1].ln()).abs() < 1e-6);
        assert!((s.ref_nll + pr[1].ln()).abs() < 1e-6);
        assert!((s.delta_p - (pm[1] - pr[1])).abs() < 1e-6);
        assert!(!s.same_top);
        let same = score(&m, Some(&m), 0);
        assert!(same.kl.abs() < 1e-7 && same.same_top && same.delta_p == 0.0);
    }

    #[test]
    fn spearman_of_identical_and_reversed_orders() {
        assert_eq!(ranks(&[3.0, 1.0, 2.0, 1.0]), vec![4.0, 1.5, 3.0, 1.5]);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        let mut v = vec![5.0, 1.0, 3.0];
        let s = Spread::of(&mut v).unwrap();
        assert_eq!((s.median, s.max), (3.0, 5.0));
        assert!((s.mean - 3.0).abs() < 1e-12);
    }

    mod against_transformers {
        //! The figures of `tests/fixtures/transformers/text-eval.json`, computed with
        //! `transformers` by `scripts/make_text_eval_fixture.py`.

        use std::sync::atomic::AtomicBool;

        use serde_json::Value;

        use super::super::*;
        use crate::compress::engine::transformer::fixtures::{dir, network, scaled};

        fn reference() -> (Value, Dataset) {
            let path = dir("").join("text-eval.json");
            let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            let data = Dataset::from_jsonl(v["jsonl"].as_str().unwrap().as_bytes()).unwrap();
            (v, data)
        }

        fn close(got: f64, want: &Value, tol: f64, what: &str) {
            let want = want.as_f64().unwrap_or_else(|| panic!("{what} missing"));
            assert!(
                (got - want).abs() <= tol * want.abs().max(1e-3),
                "{what}: {got} vs {want}"
            );
        }

        fn run(
            model: &dyn Network,
            reference: &dyn Network,
            data: &Dataset,
            p: TextEvalParams,
        ) -> TextEvaluation {
            let cancel = AtomicBool::new(false);
            let ctx = Ctx::new(&|_, _| {}, &cancel);
            evaluate_text(model, Some(reference), data, &p, 4, &ctx).unwrap()
        }

        #[test]
        fn llama_perplexity_and_kl_match() {
            let (v, data) = reference();
            let want = &v["llama"];
            let base = network("tiny-llama");
            let model = scaled(
                base.as_ref(),
                &[
                    ("self_attn.q_proj.weight", 0.9),
                    ("mlp.down_proj.weight", 1.1),
                ],
            );
            let params = TextEvalParams {
                max_tokens: 1 << 20,
                context: 16,
                stride: 8,
                save_outputs: true,
            };
            let e = run(model.as_ref(), base.as_ref(), &data, params);
            let (TextFigures::Language(m), Some(TextFigures::Language(r))) =
                (&e.model, &e.reference)
            else {
                panic!("{e:?}")
            };
            assert_eq!(m.tokens as u64, want["tokens"].as_u64().unwrap());
            assert_eq!(m.windows as u64, want["windows"].as_u64().unwrap());
            close(m.perplexity, &want["perplexity"], 1e-5, "perplexity");
            close(
                r.perplexity,
                &want["reference_perplexity"],
                1e-5,
                "reference perplexity",
            );
            let kl = m.kl_divergence.as_ref().unwrap();
            for (got, key) in [
                (kl.mean, "mean"),
                (kl.median, "median"),
                (kl.p99, "p99"),
                (kl.max, "max"),
            ] {
                close(got, &want["kl_divergence"][key], 1e-3, key);
            }
            close(
                m.top1_agreement.unwrap(),
                &want["top1_agreement"],
                1e-9,
                "top1",
            );
            let dp = m.delta_p.as_ref().unwrap();
            assert!((dp.mean - want["delta_p"]["mean"].as_f64().unwrap()).abs() < 1e-6);
            close(dp.rms, &want["delta_p"]["rms"], 1e-3, "delta_p rms");
            // The saved outputs hold every scored token's NLL.
            let tmp = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(tmp.path(), e.outputs.unwrap()).unwrap();
            let out =
                crate::compress::formats::safetensors::SafetensorsFile::open(tmp.path()).unwrap();
            let nll = out.to_f32(out.get("token_nll").unwrap()).unwrap();
            assert_eq!(nll.len(), m.tokens);
            let mean = nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64;
            close(mean.exp(), &want["perplexity"], 1e-4, "saved NLL");
            // The token budget stops early; the same model compared with itself agrees.
            let params = TextEvalParams {
                max_tokens: 10,
                ..params
            };
            let e = run(base.as_ref(), base.as_ref(), &data, params);
            let TextFigures::Language(m) = &e.model else {
                panic!()
            };
            assert_eq!(m.tokens, 10);
            assert_eq!(m.top1_agreement, Some(1.0));
            assert!(m.kl_divergence.as_ref().unwrap().max < 1e-6);
            // Comparing with itself without running twice gives the same figures.
            let cancel = AtomicBool::new(false);
            let ctx = Ctx::new(&|_, _| {}, &cancel);
            let once = evaluate_text(base.as_ref(), None, &data, &params, 4, &ctx)
                .unwrap()
                .compared_with_itself();
            let (TextFigures::Language(a), Some(TextFigures::Language(r))) =
                (&once.model, &once.reference)
            else {
                panic!()
            };
            assert_eq!(
                (a.tokens, a.perplexity, r.perplexity),
                (m.tokens, m.perplexity, m.perplexity)
            );
            assert_eq!(a.top1_agreement, Some(1.0));
            assert_eq!(a.kl_divergence.as_ref().unwrap().max, 0.0);
        }

        #[test]
        fn bert_cosines_spearman_and_head_match() {
            let (v, data) = reference();
            let want = &v["bert"];
            let base = network("tiny-bert");
            let model = scaled(
                base.as_ref(),
                &[
                    ("attention.self.query.weight", 0.9),
                    ("intermediate.dense.weight", 1.1),
                ],
            );
            let params = TextEvalParams {
                max_tokens: 1 << 20,
                context: 64,
                stride: 64,
                save_outputs: false,
            };
            let e = run(model.as_ref(), base.as_ref(), &data, params);
            let TextFigures::Encoder(m) = &e.model else {
                panic!()
            };
            assert_eq!(m.documents, 8);
            assert_eq!(m.tokens as u64, want["tokens"].as_u64().unwrap());
            let c = m.embedding_cosine.as_ref().unwrap();
            assert!((c.min - want["embedding_cosine"]["min"].as_f64().unwrap()).abs() < 1e-5);
            assert!((c.mean - want["embedding_cosine"]["mean"].as_f64().unwrap()).abs() < 1e-5);
            close(
                m.similarity_spearman.unwrap(),
                &want["similarity_spearman"],
                1e-6,
                "spearman",
            );
            assert_eq!(m.accuracy, None, "no head");

            let cls = network("tiny-bert-cls");
            let e = run(cls.as_ref(), cls.as_ref(), &data, params);
            let TextFigures::Encoder(m) = &e.model else {
                panic!()
            };
            close(
                m.accuracy.unwrap(),
                &want["classifier"]["accuracy"],
                1e-9,
                "accuracy",
            );
            close(m.loss.unwrap(), &want["classifier"]["loss"], 1e-5, "loss");
            assert!((m.embedding_cosine.as_ref().unwrap().min - 1.0).abs() < 1e-6);
        }
    }
}
