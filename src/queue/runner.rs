//! Runs one job's pipeline: blocking, on a worker thread, step by step through `compress`,
//! each step reading the previous step's committed blob and writing a new content-addressed
//! one. Returns the outputs for the queue to record; records nothing itself.

use std::collections::HashSet;
use std::time::Instant;

use serde_json::{json, Value};

use crate::compress::progress::Ctx;
use crate::compress::tensors::SafetensorsFile;
use crate::compress::{self, quantize};
use crate::db::jobs::JobRecord;
use crate::db::models::ModelRecord;
use crate::queue::JobError;
use crate::spec::{JobSpec, Step};
use crate::store::{BlobRef, BlobStore};

/// Metadata key carrying the architecture JSON in every file we write.
pub const META_ARCHITECTURE: &str = "whittle.architecture";
/// Metadata key carrying the provenance of a produced file.
pub const META_JOB: &str = "whittle.job";

/// What a pipeline produced.
#[derive(Debug, Clone)]
pub struct PipelineOutput {
    /// The final model's blob.
    pub model: BlobRef,
    /// Its tensor inventory (`[{name, dtype, shape}]`).
    pub tensors: Value,
    /// Its element count.
    pub parameters: i64,
    /// The metrics document (API.md "Metrics").
    pub metrics: Value,
    /// The metrics document stored as a `report` artifact.
    pub report: BlobRef,
}

/// Why a pipeline stopped without output.
#[derive(Debug)]
pub enum PipelineError {
    /// The cancel flag was raised (by a cancel request, the timeout or shutdown).
    Cancelled,
    /// The job failed.
    Failed(JobError),
}

impl From<compress::Error> for PipelineError {
    fn from(e: compress::Error) -> Self {
        match e {
            compress::Error::Cancelled => PipelineError::Cancelled,
            compress::Error::Io(io) => PipelineError::Failed(JobError {
                code: "io_error".into(),
                message: format!("reading or writing a blob failed: {io}"),
                retryable: true,
            }),
            other => PipelineError::Failed(JobError {
                code: other.code().into(),
                message: other.to_string(),
                retryable: false,
            }),
        }
    }
}

impl From<crate::store::Error> for PipelineError {
    fn from(e: crate::store::Error) -> Self {
        PipelineError::Failed(JobError {
            code: "storage_error".into(),
            message: format!("the blob store failed: {e}"),
            retryable: true,
        })
    }
}

impl From<std::io::Error> for PipelineError {
    fn from(e: std::io::Error) -> Self {
        crate::store::Error::Io(e).into()
    }
}

/// Run every step of `spec` over `model`, reporting through `ctx`.
pub fn run_pipeline(
    store: &BlobStore,
    job: &JobRecord,
    spec: &JobSpec,
    model: &ModelRecord,
    ctx: &Ctx,
    step_started: &(dyn Fn(usize, &str) + Sync),
) -> Result<PipelineOutput, PipelineError> {
    let input = SafetensorsFile::open(store.path(&model.sha256))?;
    let baseline = weight_summary(&input);
    drop(input);

    let steps_json: Vec<Value> = spec.steps.iter().map(Step::to_json).collect();
    let mut current = BlobRef {
        sha256: model.sha256.clone(),
        size: model.size_bytes as u64,
    };
    let mut step_metrics = Vec::new();
    for (index, step) in spec.steps.iter().enumerate() {
        ctx.check()?;
        step_started(index, step.op());
        let started = Instant::now();
        let input = SafetensorsFile::open(store.path(&current.sha256))?;
        let mut metadata = input.header().metadata.clone();
        if let Some(arch) = &model.architecture {
            metadata.insert(META_ARCHITECTURE.into(), arch.to_string());
        }
        metadata.insert(
            META_JOB.into(),
            json!({
                "id": job.id.to_string(),
                "step": index,
                "steps": steps_json,
                "seed": spec.seed,
                "source_model_sha256": model.sha256,
                "dataset_sha256s": [],
                "whittle_version": env!("CARGO_PKG_VERSION"),
            })
            .to_string(),
        );
        let mut temp = store.create_temp()?;
        let (summary, layers) = match step {
            Step::QuantizeFloat(q) => {
                let selected: HashSet<String> = q
                    .selection
                    .resolve(&input.header().tensors)
                    .into_iter()
                    .map(|t| t.name.clone())
                    .collect();
                let reports = quantize::quantize_float(
                    &input, &selected, q.dtype, &metadata, &mut temp, ctx,
                )?;
                let changed: Vec<_> = reports.iter().filter(|r| r.changed).collect();
                let before: u64 = reports.iter().map(|r| r.bytes_before).sum();
                let after: u64 = reports.iter().map(|r| r.bytes_after).sum();
                let summary = json!({
                    "method": "float",
                    "dtype": q.dtype.as_str(),
                    "tensors_changed": changed.len(),
                    "tensor_bytes_before": before,
                    "tensor_bytes_after": after,
                    "max_abs_error": changed.iter().map(|r| r.max_abs_error).fold(0.0, f64::max),
                });
                (
                    summary,
                    serde_json::to_value(&reports).unwrap_or(Value::Null),
                )
            }
        };
        drop(input);
        current = store.commit(temp)?;
        step_metrics.push(json!({
            "op": step.op(),
            "seconds": started.elapsed().as_secs_f64(),
            "summary": summary,
            "layers": layers,
            "epochs": [],
        }));
    }

    let output = SafetensorsFile::open(store.path(&current.sha256))?;
    let final_summary = weight_summary(&output);
    let (tensors, parameters) = crate::db::models::inventory(output.header());
    let metrics = json!({
        "baseline": baseline.to_json(model.size_bytes as u64),
        "steps": step_metrics,
        "final": {
            "parameters": final_summary.parameters,
            "nonzero": final_summary.nonzero,
            "size_bytes": current.size,
            "bits_per_weight": final_summary.bits_per_weight(),
            "compression_ratio": model.size_bytes as f64 / current.size.max(1) as f64,
        },
    });
    let report = store.put_bytes(
        serde_json::to_vec_pretty(&metrics)
            .unwrap_or_default()
            .as_slice(),
    )?;
    Ok(PipelineOutput {
        model: current,
        tensors,
        parameters,
        metrics,
        report,
    })
}

/// Element and size counts of a model.
#[derive(Debug, Default, Clone, Copy)]
struct WeightSummary {
    parameters: u64,
    nonzero: u64,
    float_bytes: u64,
}

impl WeightSummary {
    fn bits_per_weight(&self) -> f64 {
        if self.parameters == 0 {
            0.0
        } else {
            self.float_bytes as f64 * 8.0 / self.parameters as f64
        }
    }

    fn to_json(self, size_bytes: u64) -> Value {
        json!({
            "parameters": self.parameters,
            "nonzero": self.nonzero,
            "size_bytes": size_bytes,
            "bits_per_weight": self.bits_per_weight(),
        })
    }
}

/// One pass over a file's floating-point tensors: elements, non-zero elements, bytes.
fn weight_summary(file: &SafetensorsFile) -> WeightSummary {
    let mut s = WeightSummary::default();
    for t in file.header().tensors.iter().filter(|t| t.dtype.is_float()) {
        let width = t.dtype.size_in_bytes();
        // A float is zero when every bit but the sign bit (top bit of the last byte,
        // little-endian) is zero, so -0.0 counts as zero too.
        s.nonzero += file
            .bytes(t)
            .chunks_exact(width)
            .filter(|e| {
                let last = e.len() - 1;
                e[..last].iter().any(|&b| b != 0) || e[last] & 0x7f != 0
            })
            .count() as u64;
        s.parameters += t.numel() as u64;
        s.float_bytes += t.nbytes() as u64;
    }
    s
}
