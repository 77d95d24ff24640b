//! The response bodies of the resources (API.md), as types: what the OpenAPI component
//! schemas `Model`, `Dataset`, `Job` and `Artifact` describe, and a test checks real
//! responses against them. Built from the stored records; handlers serialise these.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::compress::engine::sequential::arch::{Architecture, LayerSummary};
use crate::db::artifacts::ArtifactRecord;
use crate::db::datasets::DatasetRecord;
use crate::db::jobs::JobRecord;
use crate::db::models::{ModelFile, ModelRecord};
use crate::ids::{rfc3339, ArtifactId, DatasetId, JobId, ModelId};

/// `Model`.
#[derive(Debug, Serialize)]
pub struct ModelBody {
    id: ModelId,
    name: String,
    sha256: String,
    size_bytes: i64,
    parameters: i64,
    tensors: Value,
    architecture: Option<Value>,
    summary: Option<NetworkSummary>,
    source: Option<Source>,
    family: Option<String>,
    files: Vec<ModelFile>,
    config: Option<Value>,
    created_at: String,
    tenant: String,
}

/// What running the network costs: parameters, FLOPs and activation memory per sample, per
/// layer and in total (from the architecture alone).
#[derive(Debug, Serialize)]
pub struct NetworkSummary {
    parameters: u64,
    flops_per_sample: u64,
    activation_bytes_per_sample: u64,
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
    layers: Vec<LayerSummary>,
}

/// The job and step that produced a model.
#[derive(Debug, Serialize)]
pub struct Source {
    job_id: JobId,
    step: i64,
}

impl From<&ModelRecord> for ModelBody {
    fn from(m: &ModelRecord) -> Self {
        ModelBody {
            id: m.id,
            name: m.name.clone(),
            sha256: m.sha256.clone(),
            size_bytes: m.size_bytes,
            parameters: m.parameters,
            tensors: m.tensors.clone(),
            architecture: m.architecture.clone(),
            summary: m
                .architecture
                .as_ref()
                .and_then(|a| Architecture::from_json(a).ok())
                .map(|a| {
                    let layers = a.summary();
                    NetworkSummary {
                        parameters: a.parameter_count(),
                        flops_per_sample: a.flops(),
                        activation_bytes_per_sample: layers
                            .iter()
                            .map(|l| l.activation_bytes)
                            .sum(),
                        input_shape: a.input_shape().to_vec(),
                        output_shape: a.output_shape().to_vec(),
                        layers,
                    }
                }),
            source: m.source.map(|(job_id, step)| Source { job_id, step }),
            family: m.family.clone(),
            files: m.files.clone(),
            config: m.config.clone(),
            created_at: rfc3339(m.created_at),
            tenant: m.tenant.clone(),
        }
    }
}

/// `Dataset`.
#[derive(Debug, Serialize)]
pub struct DatasetBody {
    id: DatasetId,
    name: String,
    format: String,
    samples: i64,
    feature_shape: Value,
    num_classes: Option<i64>,
    sha256: String,
    size_bytes: i64,
    /// Text datasets: the number of documents (`null` for tensor datasets).
    documents: Option<i64>,
    /// Text datasets: UTF-8 bytes of text (`null` for tensor datasets).
    bytes: Option<i64>,
    /// Whether every sample has a label.
    labelled: bool,
    created_at: String,
    tenant: String,
}

impl From<&DatasetRecord> for DatasetBody {
    fn from(d: &DatasetRecord) -> Self {
        DatasetBody {
            id: d.id,
            name: d.name.clone(),
            format: d.format.clone(),
            samples: d.samples,
            feature_shape: d.feature_shape.clone(),
            num_classes: d.num_classes,
            sha256: d.sha256.clone(),
            size_bytes: d.size_bytes,
            documents: d.text_bytes.map(|_| d.samples),
            bytes: d.text_bytes,
            labelled: d.num_classes.is_some(),
            created_at: rfc3339(d.created_at),
            tenant: d.tenant.clone(),
        }
    }
}

/// `Artifact`.
#[derive(Debug, Serialize)]
pub struct ArtifactBody {
    id: ArtifactId,
    job_id: JobId,
    kind: String,
    format: String,
    size_bytes: i64,
    sha256: String,
    created_at: String,
}

impl From<&ArtifactRecord> for ArtifactBody {
    fn from(a: &ArtifactRecord) -> Self {
        ArtifactBody {
            id: a.id,
            job_id: a.job_id,
            kind: a.kind.clone(),
            format: a.format.clone(),
            size_bytes: a.size_bytes,
            sha256: a.sha256.clone(),
            created_at: rfc3339(a.created_at),
        }
    }
}

/// `Job`. The steps, eval, seed and webhook come from the stored (normalised) spec.
#[derive(Debug, Serialize)]
pub struct JobBody {
    id: JobId,
    state: &'static str,
    model_id: ModelId,
    steps: Value,
    eval: Value,
    progress: Option<Value>,
    attempt: i64,
    max_attempts: i64,
    priority: i64,
    timeout_seconds: i64,
    seed: Value,
    cancel_requested: bool,
    error: Option<Value>,
    result: Option<Value>,
    labels: BTreeMap<String, String>,
    webhook_url: Value,
    created_at: String,
    tenant: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    updated_at: String,
}

impl From<&JobRecord> for JobBody {
    fn from(j: &JobRecord) -> Self {
        let spec = |key: &str, default: Value| j.spec.get(key).cloned().unwrap_or(default);
        JobBody {
            id: j.id,
            state: j.state.as_str(),
            model_id: j.model_id,
            steps: spec("steps", Value::Null),
            eval: spec("eval", Value::Null),
            progress: j.progress.clone(),
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            priority: j.priority,
            timeout_seconds: j.timeout_seconds,
            seed: spec("seed", Value::from(0)),
            cancel_requested: j.cancel_requested,
            error: j.error.clone(),
            result: j.result.clone(),
            labels: j.labels(),
            webhook_url: spec("webhook_url", Value::Null),
            created_at: rfc3339(j.created_at),
            tenant: j.tenant.clone(),
            started_at: j.started_at.map(rfc3339),
            finished_at: j.finished_at.map(rfc3339),
            updated_at: rfc3339(j.updated_at),
        }
    }
}

/// `Delivery`: one webhook event of a job and its attempts.
#[derive(Debug, Serialize)]
pub struct DeliveryBody {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    url: String,
    state: String,
    attempts: i64,
    next_attempt_at: Option<String>,
    created_at: String,
    delivered_at: Option<String>,
    payload: Value,
    responses: Value,
}

impl From<&crate::db::webhooks::Delivery> for DeliveryBody {
    fn from(d: &crate::db::webhooks::Delivery) -> Self {
        DeliveryBody {
            id: d.id.clone(),
            event_type: d.event_type.clone(),
            url: d.url.clone(),
            state: d.state.clone(),
            attempts: d.attempts,
            next_attempt_at: (d.state == "pending").then(|| rfc3339(d.next_attempt_at)),
            created_at: rfc3339(d.created_at),
            delivered_at: d.delivered_at.map(rfc3339),
            payload: serde_json::from_str(&d.payload).unwrap_or(Value::Null),
            responses: d.responses.clone(),
        }
    }
}
