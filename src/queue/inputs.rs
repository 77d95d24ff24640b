//! What a job names besides its spec — the input model, the datasets, other models (distill
//! students, importance weights) — loaded from the database in one place: at submission for
//! the checks, and again by the worker that runs it (rows may have gone in between).

use std::collections::HashMap;

use serde_json::Value;

use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::formats::hf;
use crate::compress::formats::safetensors::TensorInfo;
use crate::db::datasets::DatasetRecord;
use crate::db::models::ModelRecord;
use crate::db::{self, Db};
use crate::ids::{DatasetId, ModelId};
use crate::spec::{self, DatasetFacts, Facts, ModelFacts, TransformerFacts};

/// The rows a job body names that exist.
#[derive(Debug, Clone, Default)]
pub struct JobInputs {
    /// The input model (`model_id`).
    pub model: Option<ModelRecord>,
    /// Every dataset the body names, by id.
    pub datasets: HashMap<DatasetId, DatasetRecord>,
    /// Every other model the body names, by id.
    pub models: HashMap<String, ModelRecord>,
}

impl JobInputs {
    /// Loads what `body` (a job request or a stored spec) names; with a `tenant`, rows of
    /// other tenants count as absent.
    pub async fn load(db: &Db, tenant: Option<&str>, body: &Value) -> db::Result<JobInputs> {
        let visible = |t: &str| tenant.is_none_or(|want| want == t);
        let model = match body
            .get("model_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<ModelId>().ok())
        {
            Some(id) => db::models::get(db, id)
                .await?
                .filter(|m| visible(&m.tenant)),
            None => None,
        };
        let mut datasets = HashMap::new();
        for id in spec::referenced_datasets(body) {
            if let Some(d) = db::datasets::get(db, id)
                .await?
                .filter(|d| visible(&d.tenant))
            {
                datasets.insert(id, d);
            }
        }
        let mut models = HashMap::new();
        for id in spec::referenced_models(body) {
            let Ok(model_id) = id.parse::<ModelId>() else {
                continue;
            };
            if let Some(m) = db::models::get(db, model_id)
                .await?
                .filter(|m| visible(&m.tenant))
            {
                models.insert(id, m);
            }
        }
        Ok(JobInputs {
            model,
            datasets,
            models,
        })
    }

    /// What the spec checks need to know, when the input model exists.
    pub fn facts(&self) -> Option<Facts> {
        let model = self.model.as_ref()?;
        Some(Facts {
            tensors: inventory_infos(&model.tensors),
            // A stored architecture was validated on upload; one that no longer parses (a
            // newer rule) is treated as absent, which the checks report.
            architecture: parsed(&model.architecture),
            transformer: model.config.as_ref().and_then(|c| {
                TransformerFacts::of(
                    c,
                    &inventory_infos(&model.tensors),
                    model.file(hf::TOKENIZER).map(|f| f.sha256.as_str()),
                )
            }),
            other_family: match (&model.config, &model.family) {
                (Some(c), None) => Some(
                    c.get("model_type")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string(),
                ),
                _ => None,
            },
            datasets: self
                .datasets
                .iter()
                .map(|(id, d)| {
                    let facts = DatasetFacts {
                        feature_shape: serde_json::from_value(d.feature_shape.clone())
                            .unwrap_or_default(),
                        num_classes: d.num_classes.map(|n| n as usize),
                        text: d.text_bytes.is_some(),
                        mean_document_bytes: d
                            .text_bytes
                            .map_or(0, |b| (b.max(0) as u64).div_ceil(d.samples.max(1) as u64)),
                    };
                    (*id, facts)
                })
                .collect(),
            models: self
                .models
                .iter()
                .map(|(id, m)| {
                    let facts = ModelFacts {
                        tensors: inventory_infos(&m.tensors),
                        architecture: parsed(&m.architecture),
                        transformer: m.config.as_ref().and_then(|c| {
                            TransformerFacts::of(
                                c,
                                &inventory_infos(&m.tensors),
                                m.file(hf::TOKENIZER).map(|f| f.sha256.as_str()),
                            )
                        }),
                    };
                    (id.clone(), facts)
                })
                .collect(),
        })
    }
}

fn parsed(architecture: &Option<Value>) -> Option<Architecture> {
    architecture
        .as_ref()
        .and_then(|a| Architecture::from_json(a).ok())
}

/// Tensor infos from a stored inventory (offsets are not needed for validation).
fn inventory_infos(tensors: &Value) -> Vec<TensorInfo> {
    tensors
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|t| {
                    Some(TensorInfo {
                        name: t.get("name")?.as_str()?.to_string(),
                        dtype: t.get("dtype")?.as_str()?.parse().ok()?,
                        shape: serde_json::from_value(t.get("shape")?.clone()).ok()?,
                        data_offsets: (0, 0),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}
