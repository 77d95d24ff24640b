//! An honest estimate of a job's peak memory, per step, from what is known at submission: the
//! model's tensors and architecture, the students and datasets the steps name. Used by the
//! dry-run plan and to refuse, before anything is queued, a job that would not fit
//! (`WHITTLE_JOB_MEMORY_BYTES`): a worker that runs out of memory takes its process down.

use super::distill::{from_teacher_facts, StudentSpec};
use super::{EvalSpec, Facts, FinetuneSpec, JobSpec, Step, TransformerFacts};
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::Family;

/// Fixed overhead of a step (buffers, the runtime).
const OVERHEAD: u64 = 8 << 20;

/// The estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Each step's peak, in order.
    pub steps: Vec<u64>,
    /// The job `eval`'s (the final evaluation), 0 without one.
    pub eval: u64,
    /// The largest of them: the job's peak.
    pub peak: u64,
}

fn activations(arch: &Architecture) -> u64 {
    arch.summary().iter().map(|l| l.activation_bytes).sum()
}

/// Training: weights, gradients and two optimizer moments (4 × f32 per parameter), and each
/// layer's activation and its gradient for one batch.
fn training(arch: &Architecture, batch: usize) -> u64 {
    arch.parameter_count() * 16 + activations(arch) * batch as u64 * 2 + OVERHEAD
}

/// Inference: the weights and one batch's activations.
fn inference(arch: &Architecture, batch: usize) -> u64 {
    arch.parameter_count() * 4 + activations(arch) * batch as u64 + OVERHEAD
}

/// A weight-only step streams tensor by tensor: the largest tensor in f32, its output and
/// write buffers.
fn streaming(facts: &Facts) -> u64 {
    let largest = facts
        .tensors
        .iter()
        .map(|t| t.nbytes() as u64)
        .max()
        .unwrap_or(0);
    largest * 2 + largest / 2 + (2 << 20)
}

/// Every f32 weight of the model (a transformer loaded for evaluation).
fn weights_f32(facts: &Facts) -> u64 {
    facts.tensors.iter().map(|t| t.numel() as u64 * 4).sum()
}

/// An evaluation against the job's input: both networks and, for a transformer, a batch of
/// windows' logits of each (device and host) and 256 MiB for activations and the text.
fn evaluation(facts: &Facts, arch: Option<&Architecture>, e: &EvalSpec) -> u64 {
    match (&facts.transformer, &e.text, arch) {
        (Some(t), Some(p), _) => {
            let logits = (p.context * t.vocab_size * 4) as u64;
            2 * weights_f32(facts) + 4 * logits + (256 << 20)
        }
        (_, _, Some(a)) => 2 * inference(a, e.batch_size),
        _ => streaming(facts),
    }
}

/// The sequence length a training batch is estimated at: the dataset's mean UTF-8 bytes per
/// document — about 4× its mean tokens (a token per 4 bytes of English), which covers
/// padding to each batch's longest document and the copies candle keeps (calibrated on the
/// measured peaks, see [`transformer_training`]) — at least 16 and at most the model's
/// positions.
fn tokens_per_document(facts: &Facts, t: &TransformerFacts, train: &FinetuneSpec) -> usize {
    let bytes = facts
        .datasets
        .get(&train.dataset)
        .map_or(0, |d| d.mean_document_bytes as usize);
    bytes.clamp(16, t.max_positions.max(16))
}

/// Parameters of a set of tensors.
fn parameters(tensors: &[crate::compress::formats::safetensors::TensorInfo]) -> u64 {
    tensors
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| t.numel() as u64)
        .sum()
}

/// Training a transformer of `params` parameters and `blocks` blocks on batches of
/// `batch × seq` tokens: 16 bytes per parameter (f32 weights, gradients, AdamW's two
/// moments), and per token what backward keeps in each block (about 48 hidden-wide and 16
/// feed-forward-wide f32 values, and 4 attention rows of `seq` per head) and, for a language
/// model, its logits with their softmax and gradients (10 vocabulary-wide f32 rows). With
/// [`tokens_per_document`] the estimate was checked against the peak resident memory of the
/// service (`scripts/check_transformer_training.py`): all-MiniLM-L6-v2 fine-tuning, batch 16
/// of fortunes, 1.5 GB measured for 2.2 GB estimated; SmolLM2-135M distillation into 15
/// blocks, batch 8, 5.3 GB measured for 6.2 GB estimated.
fn transformer_training(
    t: &TransformerFacts,
    params: u64,
    blocks: usize,
    batch: usize,
    seq: usize,
) -> u64 {
    let tokens = (batch * seq) as u64;
    let per_block = 4 * (48 * t.hidden + 16 * t.intermediate + 4 * t.heads * seq) as u64;
    let logits = match t.family {
        Family::Llama => 40 * t.vocab_size as u64,
        _ => 0,
    };
    params * 16 + tokens * (blocks as u64 * per_block + logits) + OVERHEAD
}

/// A transformer teacher's inference beside its student: its f32 weights and, for a
/// language model, its logits and their softmax for the batch.
fn transformer_teacher(t: &TransformerFacts, params: u64, batch: usize, seq: usize) -> u64 {
    let logits = match t.family {
        Family::Llama => 12 * t.vocab_size as u64,
        _ => 0,
    };
    params * 4 + (batch * seq) as u64 * logits
}

/// The estimate of `spec` on the model `facts` describe.
pub fn estimate(spec: &JobSpec, facts: &Facts) -> MemoryEstimate {
    let mut arch = facts.architecture.clone();
    // The job's input stays loaded as the reference whenever something compares with it.
    let reference = arch.as_ref().map_or(0, |a| a.parameter_count() * 4);
    let mut steps = Vec::with_capacity(spec.steps.len());
    for step in &spec.steps {
        let a = arch.as_ref();
        let bytes = match step {
            Step::QuantizeFloat(_) => streaming(facts),
            Step::Prune(p) => match (&p.schedule, a) {
                (Some(s), Some(a)) => training(a, s.finetune.batch_size) + reference,
                _ => streaming(facts),
            },
            Step::Quantize(q) => match (a, &q.qat) {
                (Some(a), Some(t)) => training(a, t.batch_size) + reference,
                (None, Some(train)) if facts.transformer.is_some() => {
                    let t = facts.transformer.as_ref().expect("checked");
                    let seq = tokens_per_document(facts, t, train);
                    transformer_training(
                        t,
                        parameters(&facts.tensors),
                        t.layers,
                        train.batch_size,
                        seq,
                    ) + reference
                }
                (Some(a), None) if q.max_accuracy_drop.is_some() || q.activations.is_some() => {
                    3 * inference(a, 256)
                }
                _ => streaming(facts),
            },
            Step::Finetune(f) => match (a, &facts.transformer) {
                (Some(a), _) => training(a, f.batch_size) + reference,
                (None, Some(t)) => {
                    let seq = tokens_per_document(facts, t, f);
                    // A new head adds `num_classes × hidden` weights (and their biases).
                    let head = f
                        .head
                        .as_ref()
                        .map_or(0, |h| (h.num_classes * (t.hidden + 1)) as u64);
                    let params = parameters(&facts.tensors) + head;
                    transformer_training(t, params, t.layers, f.batch_size, seq)
                }
                (None, None) => 0,
            },
            Step::Evaluate(e) => evaluation(facts, a, e),
            // The network, the copy written out, and one layer's statistics.
            // auto also keeps the float outputs and every block's input of each token, and
            // holds an output and its log-softmax while measuring.
            Step::Calibrated(c) if c.method_name() == "auto" => {
                let (tokens, width, states) = match (&facts.transformer, &c.calibration) {
                    (Some(t), Some(cal)) => {
                        let tokens = (cal.samples * cal.seq_len) as u64;
                        let width = if t.family == crate::compress::engine::Family::Llama {
                            t.vocab_size
                        } else {
                            t.hidden.max(t.classes.unwrap_or(0))
                        } as u64;
                        (
                            tokens,
                            width,
                            (t.layers as u64 + 1) * tokens * t.hidden as u64,
                        )
                    }
                    _ => (0, 0, 0),
                };
                3 * weights_f32(facts) + 4 * (3 * tokens * width + states) + (256 << 20)
            }
            Step::Calibrated(_) => 3 * weights_f32(facts) + (256 << 20),
            Step::Distill(d) if facts.transformer.is_some() => {
                let t = facts.transformer.as_ref().expect("checked");
                let seq = tokens_per_document(facts, t, &d.train);
                let batch = d.train.batch_size;
                // The student's widths (an uploaded one's own), parameters and blocks.
                let (widths, student_params, blocks) = match &d.student {
                    StudentSpec::FromTeacher(layers) => (
                        t.clone(),
                        parameters(&from_teacher_facts(facts, t, layers).tensors),
                        layers.len(),
                    ),
                    StudentSpec::Model(id) => match facts.models.get(id) {
                        Some(m) => {
                            let s = m.transformer.clone().unwrap_or_else(|| t.clone());
                            let blocks = s.layers;
                            (s, parameters(&m.tensors), blocks)
                        }
                        None => (t.clone(), parameters(&facts.tensors), t.layers),
                    },
                    StudentSpec::Config(c) => {
                        match super::distill::config_student_facts(
                            t,
                            c,
                            super::distill::has_pooler(facts),
                            "",
                            &mut Vec::new(),
                        ) {
                            Some(m) => {
                                let s = m.transformer.clone().unwrap_or_else(|| t.clone());
                                let blocks = s.layers;
                                (s, parameters(&m.tensors), blocks)
                            }
                            None => (t.clone(), parameters(&facts.tensors), t.layers),
                        }
                    }
                    StudentSpec::Architecture(_) => {
                        (t.clone(), parameters(&facts.tensors), t.layers)
                    }
                };
                // A sentence encoder's teacher-free baseline (SimCSE) runs each batch twice.
                let simcse = d.baseline && t.family == Family::Bert && t.classes.is_none();
                let student_batch = if simcse { 2 * batch } else { batch };
                transformer_teacher(t, parameters(&facts.tensors), batch, seq)
                    + transformer_training(&widths, student_params, blocks, student_batch, seq)
            }
            Step::Distill(d) => {
                let student = match &d.student {
                    StudentSpec::Architecture(v) => Architecture::from_json(v).ok(),
                    StudentSpec::Model(id) => {
                        facts.models.get(id).and_then(|m| m.architecture.clone())
                    }
                    StudentSpec::FromTeacher(_) | StudentSpec::Config(_) => None,
                };
                let batch = d.train.batch_size;
                let teacher = a.map_or(0, |a| inference(a, batch));
                let bytes =
                    teacher + student.as_ref().map_or(0, |s| training(s, batch)) + reference;
                if student.is_some() {
                    arch = student;
                }
                bytes
            }
        };
        steps.push(bytes.max(streaming(facts)));
    }
    let eval = spec
        .eval
        .as_ref()
        .map_or(0, |e| evaluation(facts, arch.as_ref(), e));
    let peak = steps.iter().copied().chain([eval]).max().unwrap_or(0);
    MemoryEstimate { steps, eval, peak }
}
