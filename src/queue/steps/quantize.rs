//! The `quantize` step: float casts; GGUF block types (the file read back is the model);
//! the integer and codebook codecs with their importance weights, QAT, accuracy budget and
//! activation calibration around them, and the `packed` encoding as an artifact.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Value};

use super::{current_arch, failed, Artifact, Env, Input, PipelineError, StepOut};
use crate::codes::Code;
use crate::compress::calib::{self, CalibrationParams};
use crate::compress::engine::sequential::model::Model;
use crate::compress::formats::packed::{self, QuantizeFile};
use crate::compress::formats::safetensors::{self, SafetensorsFile};
use crate::compress::formats::{gguf, gguf_import, gguf_llama};
use crate::compress::quant::activations::{self, ActivationParams};
use crate::compress::quant::budget::{accuracy_budget, BudgetParams};
use crate::compress::quant::float::quantize_float;
use crate::compress::quant::qat::{quantization_aware_training, QatParams};
use crate::compress::quant::{self, Format, Importance, Method, Quantization, Quantizer};
use crate::spec::quantize::ImportanceSource;
use crate::spec::{FloatQuantize, QuantizeSpec};

/// `quantize` with `method: float`: cast the selected tensors to f16 / bf16.
pub(super) fn float(env: &Env, q: &FloatQuantize, input: &Input) -> Result<StepOut, PipelineError> {
    let mut temp = env.store.create_temp()?;
    let selected: HashSet<String> = q
        .selection
        .resolve(&input.file.header().tensors)
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    let reports = quantize_float(
        input.file,
        &selected,
        q.dtype,
        input.metadata,
        &mut temp,
        env.ctx,
    )?;
    let changed: Vec<_> = reports.iter().filter(|r| r.changed).collect();
    let record = json!({
        "summary": {
            "method": "float",
            "dtype": q.dtype.as_str(),
            "tensors_changed": changed.len(),
            "tensor_bytes_before": reports.iter().map(|r| r.bytes_before).sum::<u64>(),
            "tensor_bytes_after": reports.iter().map(|r| r.bytes_after).sum::<u64>(),
            "max_abs_error": changed.iter().map(|r| r.max_abs_error).fold(0.0, f64::max),
        },
        "layers": reports,
    });
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact: None,
        architecture: None,
        record,
    })
}

/// The `quantize` step with every method but `float`.
pub(super) fn quantize(
    env: &Env,
    spec: &QuantizeSpec,
    input: &Input,
) -> Result<StepOut, PipelineError> {
    let mut selected: Vec<String> = spec
        .selection
        .resolve(&input.file.header().tensors)
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    let method = match spec.method {
        Quantization::Gguf(ty) => {
            let (importance, summary) = load_importance(env, spec, None, input, &selected)?;
            let mut out = to_gguf(env, ty, input, &selected, &importance, Mixed::default())?;
            if !summary.is_null() {
                out.record["summary"]["importance"] = summary;
            }
            return Ok(out);
        }
        Quantization::Codec(m) => m,
    };
    let mut metadata = input.metadata.clone();
    let mut record = json!({});
    let seed = env.seed;
    let (importance, importance_summary) =
        load_importance(env, spec, Some(&method), input, &selected)?;
    let quantizer = Quantizer {
        method,
        importance: Arc::new(importance),
    };
    // QAT trains a float model first (an intermediate blob nothing references; the blob
    // collector reclaims it), which is then quantized exactly as PTQ would.
    let mut trained = None;
    if let Some(qat) = &spec.qat {
        let model = super::network(input)?;
        let params = env.datasets.training_params(qat, env.seed)?;
        let mut on_epoch = env.checkpointer(qat.epochs);
        let qat = QatParams {
            quantizer: &quantizer,
            selected: &selected,
            seed,
            train: &params,
        };
        let (out, mode) = quantization_aware_training(
            model,
            &qat,
            env.ctx,
            &mut on_epoch,
            env.resume_checkpoint()?,
        )?;
        let (temp, _) = env.write_f32(&metadata, &out.weights)?;
        let blob = env.store.commit(temp)?;
        record["epochs"] = serde_json::to_value(&out.history).unwrap_or(Value::Null);
        record["qat"] = json!({
            "epochs_run": out.history.len(),
            "final_train_loss": out.history.last().map(|h| h.train_loss),
            "final_val_accuracy": out.history.last().and_then(|h| h.val_accuracy),
            "mode": mode.as_str(),
        });
        trained = Some(SafetensorsFile::open(env.store.materialize(&blob.sha256)?)?);
    }
    let source = trained.as_ref().unwrap_or(input.file);
    if let Some(budget) = spec.max_accuracy_drop {
        let arch = current_arch(input.architecture)?;
        let weights = Model::from_safetensors(&arch, source)?.export()?;
        let eval = env.eval_data()?.ok_or_else(|| {
            failed(
                Code::ValidationFailed,
                "max_accuracy_drop needs the job's `eval` dataset",
            )
        })?;
        let params = BudgetParams {
            quantizer: &quantizer,
            selected: &selected,
            budget,
            seed,
            eval,
        };
        let (kept, report) = accuracy_budget(&arch, &weights, &params, env.ctx)?;
        selected = kept;
        record["reverted"] = serde_json::to_value(&report).unwrap_or(Value::Null);
    }
    if let Some(a) = &spec.activations {
        // Calibrate on the float network (the weights' error is measured separately), and
        // ship the ranges in the file so every later evaluation simulates them.
        let arch = current_arch(input.architecture)?;
        let model = Model::from_safetensors(&arch, source)?;
        let data = env.datasets.get(&a.dataset_id)?;
        let params = ActivationParams {
            bits: a.bits,
            symmetric: a.symmetric,
            calibration: a.method,
            samples: a.samples,
            seed,
        };
        let calibrated = activations::calibrate(&model, data, &params, env.ctx)?;
        metadata.insert(
            activations::METADATA_KEY.into(),
            serde_json::to_string(&calibrated.layers).unwrap_or_default(),
        );
        record["activations"] = json!({
            "bits": a.bits,
            "symmetric": a.symmetric,
            "calibration": {
                "dataset_id": a.dataset_id.to_string(),
                "method": calibrated.method,
                "samples": calibrated.indices.len(),
                "seed": seed,
                "indices": calibrated.indices,
            },
            "layers": calibrated.layers,
        });
    }
    let job = |packed| QuantizeFile {
        selected: &selected,
        quantizer: &quantizer,
        seed,
        packed,
        metadata: &metadata,
        precomputed: None,
        entropy: spec.entropy,
    };
    let mut temp = env.store.create_temp()?;
    let reports = packed::quantize_file(source, &job(false), &mut temp, env.ctx)?;
    let mut packed_reports = Vec::new();
    let artifact = if spec.format == Format::Packed {
        let mut file = env.store.create_temp()?;
        packed_reports = packed::quantize_file(source, &job(true), &mut file, env.ctx)?;
        Some(Artifact {
            kind: "packed",
            format: "safetensors",
            file,
        })
    } else {
        None
    };
    // The packed file's own figures where one was written (its sizes, entropy coding).
    let layers = if packed_reports.is_empty() {
        &reports
    } else {
        &packed_reports
    };
    let numel: u64 = layers
        .iter()
        .map(|r| r.shape.iter().product::<usize>() as u64)
        .sum();
    let bits: f64 = layers
        .iter()
        .map(|r| r.bits_per_weight * r.shape.iter().product::<usize>() as f64)
        .sum();
    record["summary"] = json!({
        "method": spec.method.as_str(),
        "format": spec.format.as_str(),
        "tensors_quantized": reports.len(),
        "bits_per_weight": if numel == 0 { 0.0 } else { bits / numel as f64 },
        "packed_bytes": layers.iter().map(|r| r.packed_bytes).sum::<u64>(),
        "dense_bytes": layers.iter().map(|r| r.dense_bytes).sum::<u64>(),
        "packed_file_bytes": artifact.as_ref().map(|a| a.file.size()),
        "max_mse": reports.iter().map(|r| r.mse).fold(0.0, f64::max),
        "min_sqnr_db": reports.iter().filter_map(|r| r.sqnr_db).reduce(f64::min),
    });
    if !importance_summary.is_null() {
        record["summary"]["importance"] = importance_summary;
    }
    if let Some(a) = &artifact {
        record["summary"]["entropy"] = json!(spec.entropy.as_str());
        record["summary"]["stages"] = stages(&packed_reports, temp.size(), a.file.size());
    }
    record["layers"] = serde_json::to_value(layers).unwrap_or(Value::Null);
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact,
        architecture: None,
        record,
    })
}

/// Deep Compression's columns for the packed artifact (Han et al. 2016, Table 1), over the
/// quantized weights: their dense bytes over their bytes with fixed-width codes and index
/// (quantization, pruning's index included; what `entropy: none` stores) and over the bytes
/// stored (after Huffman coding where asked); and the whole files' ratio.
fn stages(packed: &[packed::QuantReport], input_bytes: u64, file_bytes: u64) -> Value {
    let dense: u64 = packed.iter().map(|r| r.dense_bytes).sum();
    let stored: u64 = packed.iter().map(|r| r.packed_bytes).sum();
    let fixed: u64 = packed
        .iter()
        .map(|r| r.entropy.as_ref().map_or(r.packed_bytes, |e| e.fixed_bytes))
        .sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    json!({
        "weights_dense_bytes": dense,
        "weights_quantized_bytes": fixed,
        "weights_stored_bytes": stored,
        "quantization_ratio": ratio(dense, fixed),
        "entropy_ratio": ratio(fixed, stored),
        "weights_ratio": ratio(dense, stored),
        "file_ratio": ratio(input_bytes, file_bytes),
    })
}

/// What a GGUF file holds per tensor besides the file's type: types of their own (`auto`),
/// blocks already encoded (GPTQ's codes); keyed by the input's tensor names.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Mixed<'a> {
    pub types: Option<&'a HashMap<String, gguf::GgufType>>,
    pub encoded: Option<&'a HashMap<String, (gguf::GgufType, Vec<u8>)>>,
}

/// `method: gguf`: the GGUF file is the artifact; the model of the step is that file read back
/// and dequantized, so `eval` and later jobs measure exactly what the GGUF holds. `mixed`
/// gives tensors their own types or blocks; `ty` is the file's.
pub(super) fn to_gguf(
    env: &Env,
    ty: gguf::GgufType,
    input: &Input,
    selected: &[String],
    importance: &Importance,
    mixed: Mixed<'_>,
) -> Result<StepOut, PipelineError> {
    if let Some(t) = input
        .transformer
        .filter(|t| t.family() == Some(crate::compress::engine::Family::Llama))
    {
        return to_llama_gguf(env, ty, input, selected, t, importance, mixed);
    }
    let mut file = env.store.create_temp()?;
    let extras = gguf::GgufExtras {
        strings: input.metadata,
        typed: &[],
        importance: Some(importance),
        types: mixed.types,
        encoded: mixed.encoded,
    };
    let reports = gguf::write_gguf_typed(input.file, selected, ty, extras, &mut file, env.ctx)?;
    std::io::Write::flush(&mut file)?;
    let dequantized = gguf_import::dequantize_tensors(file.path(), selected)?;
    let mut temp = env.store.create_temp()?;
    safetensors::write_replacing(input.file, &dequantized, input.metadata, &mut temp)?;
    let record = json!({
        "summary": gguf_summary(ty, selected.len(), file.size(), &reports),
        "layers": reports,
    });
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact: Some(Artifact {
            kind: "gguf",
            format: "gguf",
            file,
        }),
        architecture: None,
        record,
    })
}

/// The summary of a `gguf` step: what was written, and every tensor that fell back to
/// another type (llama-quantize's rule for rows the k-quant blocks do not divide).
fn gguf_summary(
    ty: gguf::GgufType,
    quantized: usize,
    bytes: u64,
    reports: &[gguf::GgufReport],
) -> Value {
    let fallbacks: Vec<Value> = reports
        .iter()
        .filter(|r| r.note.as_deref().is_some_and(|n| n.contains("fallback")))
        .map(|r| json!({"tensor": r.tensor, "type": r.gguf_type}))
        .collect();
    json!({
        "method": "gguf",
        "type": ty.as_str(),
        "format": "gguf",
        "tensors_quantized": quantized,
        "gguf_bytes": bytes,
        "fallbacks": fallbacks,
    })
}

/// `gguf` for a llama folder model: a file llama.cpp runs (its tensor names, the query/key
/// row permutation, the hyper-parameters and the tokenizer as metadata); the step's model is
/// that file read back, un-permuted, under the Hugging Face names.
fn to_llama_gguf(
    env: &Env,
    ty: gguf::GgufType,
    input: &Input,
    selected: &[String],
    source: &super::TransformerSource,
    importance: &Importance,
    mixed: Mixed<'_>,
) -> Result<StepOut, PipelineError> {
    let tokenizer = source.tokenizer_json()?;
    let plan = gguf_llama::plan(
        &source.config,
        &input.file.header().tensors,
        tokenizer.as_ref(),
        &source.name,
    )?;
    let mut prepared = env.store.create_temp()?;
    gguf_llama::prepare(input.file, &plan, input.metadata, &mut prepared)?;
    std::io::Write::flush(&mut prepared)?;
    let renamed = SafetensorsFile::open(prepared.path())?;
    let in_gguf: Vec<String> = selected
        .iter()
        .filter_map(|n| plan.names.get(n).cloned())
        .collect();
    let mut file = env.store.create_temp()?;
    // Importance and types under the file's (llama.cpp) names; columns are not permuted.
    let renamed_importance: Importance = importance
        .iter()
        .filter_map(|(hf, w)| plan.names.get(hf).map(|g| (g.clone(), w.clone())))
        .collect();
    let renamed_types: Option<HashMap<String, gguf::GgufType>> = mixed.types.map(|t| {
        t.iter()
            .filter_map(|(hf, ty)| plan.names.get(hf).map(|g| (g.clone(), *ty)))
            .collect()
    });
    // Encoded blocks: rows permuted as the file's query / key rows are.
    let mut renamed_encoded: Option<HashMap<String, (gguf::GgufType, Vec<u8>)>> = None;
    if let Some(encoded) = mixed.encoded {
        let mut out = HashMap::new();
        for (hf, (t, bytes)) in encoded {
            let Some(g) = plan.names.get(hf) else {
                continue;
            };
            let bytes = match (plan.permuted.get(hf), input.file.get(hf)) {
                (Some(&heads), Some(info)) => {
                    let rows = info.shape.first().copied().unwrap_or(0);
                    gguf_llama::permute_rows(bytes, rows, heads, bytes.len() / rows.max(1))?
                }
                _ => bytes.clone(),
            };
            out.insert(g.clone(), (*t, bytes));
        }
        renamed_encoded = Some(out);
    }
    let extras = gguf::GgufExtras {
        strings: input.metadata,
        typed: &plan.metadata,
        importance: Some(&renamed_importance),
        types: renamed_types.as_ref(),
        encoded: renamed_encoded.as_ref(),
    };
    let mut reports = gguf::write_gguf_typed(&renamed, &in_gguf, ty, extras, &mut file, env.ctx)?;
    std::io::Write::flush(&mut file)?;
    drop(renamed);
    drop(prepared);
    let decoded = gguf_import::dequantize_tensors(file.path(), &in_gguf)?;
    let mut dequantized = HashMap::new();
    for hf in selected {
        let Some(g) = plan.names.get(hf) else {
            continue;
        };
        let Some(values) = decoded.get(g) else {
            continue;
        };
        let values = match plan.permuted.get(hf) {
            Some(&heads) => {
                let rows = input
                    .file
                    .get(hf)
                    .and_then(|t| t.shape.first().copied())
                    .unwrap_or(0);
                gguf_import::unpermute_rows(values, rows, heads)?
            }
            None => values.clone(),
        };
        dequantized.insert(hf.clone(), values);
    }
    let hf_of: HashMap<&str, &str> = plan
        .names
        .iter()
        .map(|(hf, g)| (g.as_str(), hf.as_str()))
        .collect();
    for r in &mut reports {
        if let Some(hf) = hf_of.get(r.tensor.as_str()) {
            r.tensor = hf.to_string();
        }
    }
    let mut temp = env.store.create_temp()?;
    safetensors::write_replacing(input.file, &dequantized, input.metadata, &mut temp)?;
    let mut summary = gguf_summary(ty, in_gguf.len(), file.size(), &reports);
    summary["architecture"] = json!("llama");
    summary["notes"] = json!(plan.notes);
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact: Some(Artifact {
            kind: "gguf",
            format: "gguf",
            file,
        }),
        architecture: None,
        record: json!({ "summary": summary, "layers": reports }),
    })
}

/// The importance weights of a `uniform` step's selected tensors: read from the uploaded
/// file it names, or measured on the model over calibration samples; and what to report
/// about them.
fn load_importance(
    env: &Env,
    spec: &QuantizeSpec,
    method: Option<&Method>,
    input: &Input,
    selected: &[String],
) -> Result<(Importance, Value), PipelineError> {
    let Some(source) = &spec.importance else {
        return Ok((Importance::new(), Value::Null));
    };
    let (mut all, mut summary) = match source {
        ImportanceSource::Model(id) => {
            let record = env.named_model(id, "importance")?;
            let file = SafetensorsFile::open(env.store.materialize(&record.sha256)?)?;
            let mut all = Importance::new();
            for info in &file.header().tensors {
                if selected.contains(&info.name) {
                    all.insert(info.name.clone(), file.to_f32(info)?);
                }
            }
            (all, json!({ "model_id": id }))
        }
        ImportanceSource::Calibration {
            dataset_id,
            samples,
        } if input.transformer.is_some() => {
            let t = input.transformer.expect("checked by the guard");
            let net = t.load(input.file)?;
            let data = env.datasets.get(dataset_id)?;
            let set = calib::calibration_set(
                net.as_ref(),
                data,
                &CalibrationParams {
                    samples: *samples,
                    seq_len: 512,
                    seed: env.seed,
                },
            )?;
            let all = calib::input_mean_squares(net.as_ref(), &set, env.ctx)?;
            let summary = json!({"dataset_id": dataset_id.to_string(), "samples": set.samples,
                                 "kind": set.kind, "tokens": set.tokens,
                                 "seed": env.seed, "indices": set.indices});
            (all, summary)
        }
        ImportanceSource::Calibration {
            dataset_id,
            samples,
        } => {
            let arch = current_arch(input.architecture)?;
            let model = Model::from_safetensors(&arch, input.file)?;
            let data = env.datasets.get(dataset_id)?;
            let (all, indices) =
                activations::input_importance(&model, data, *samples, env.seed, env.ctx)?;
            let summary = json!({"dataset_id": dataset_id.to_string(), "samples": indices.len(),
                                 "seed": env.seed, "indices": indices});
            (all, summary)
        }
    };
    let mut importance = Importance::new();
    let mut unweighted = Vec::new();
    for name in selected {
        let Some(w) = all.remove(name) else {
            unweighted.push(name.clone());
            continue;
        };
        if let Some(t) = input.file.get(name) {
            match method {
                Some(m) => quant::check_importance(name, &t.shape, m, &w)?,
                None => quant::check_importance_values(name, &t.shape, &w)?,
            }
        }
        importance.insert(name.clone(), w);
    }
    let mut weighted: Vec<&String> = importance.keys().collect();
    weighted.sort();
    summary["weighted"] = json!(weighted);
    summary["unweighted"] = json!(unweighted);
    Ok((importance, summary))
}
