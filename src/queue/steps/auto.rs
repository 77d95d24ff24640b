//! `quantize` with `method: "auto"`: a GGUF type per tensor under a budget
//! ([`crate::compress::quant::auto`]), the GGUF written with those types, and the table of
//! choices with the predicted and measured divergence.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::{failed, Env, Input, PipelineError, StepOut};
use crate::codes::Code;
use crate::compress::calib::{self, CalibrationSet};
use crate::compress::engine::Network;
use crate::compress::formats::gguf::GgufType;
use crate::compress::quant::auto::{self, Candidates, Reference};
use crate::compress::quant::Importance;
use crate::spec::calibrated::AutoBudget;

/// The step, once the network is loaded and the calibration set drawn.
#[allow(clippy::too_many_arguments)]
pub(super) fn auto(
    env: &Env,
    input: &Input,
    net: &dyn Network,
    set: &CalibrationSet,
    selected: &[String],
    budget: AutoBudget,
    candidates: &[GgufType],
    calibration: Value,
) -> Result<StepOut, PipelineError> {
    let started = std::time::Instant::now();
    let ctx = env.ctx;
    // llama.cpp's importance matrix from the same draw: the k-quant blocks are fitted with it
    // when measured and when written.
    let mut importance: Importance = calib::input_mean_squares(net, set, ctx)?;
    importance.retain(|name, _| selected.contains(name));
    let mut tensors: Vec<Candidates> = Vec::new();
    for name in selected {
        let Some(info) = input.file.get(name) else {
            continue;
        };
        let choices = auto::choices(&info.shape, candidates);
        if choices.is_empty() {
            return Err(failed(
                Code::ValidationFailed,
                format!(
                    "no candidate type fits `{name}` (rows of {} values)",
                    info.shape.last().copied().unwrap_or(0)
                ),
            ));
        }
        tensors.push(Candidates {
            tensor: name.clone(),
            numel: info.numel() as u64,
            choices,
        });
    }
    let numel: u64 = tensors.iter().map(|t| t.numel).sum();
    let budget_bytes = budget.bytes(numel);
    let reference = Reference::new(net, set, ctx)?;
    auto::measure(net, set, &reference, &mut tensors, &importance, ctx)?;
    let pick = auto::solve(&tensors, budget_bytes).ok_or_else(|| {
        failed(
            Code::ValidationFailed,
            format!("the budget of {budget_bytes} bytes is below the smallest candidates' size"),
        )
    })?;
    // The mix as the file will hold it, measured whole.
    let mut types: HashMap<String, GgufType> = HashMap::new();
    let mut predicted = 0f64;
    let mut bytes = 0u64;
    let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut table = Vec::new();
    let mut originals = Vec::new();
    for (t, &j) in tensors.iter().zip(&pick) {
        let c = t.choices[j];
        types.insert(t.tensor.clone(), c.ty);
        predicted += c.divergence;
        bytes += c.bytes;
        let entry = by_type.entry(c.ty.as_str()).or_default();
        entry.0 += 1;
        entry.1 += t.numel;
        let (shape, values) = calib::weight(net, &t.tensor)?;
        let row = shape.last().copied().unwrap_or(0);
        let stored = crate::compress::formats::gguf::roundtrip(
            &values,
            row,
            c.ty,
            importance.get(&t.tensor).map(Vec::as_slice),
        )?;
        originals.push((t.tensor.clone(), values));
        calib::set_weight(net, &t.tensor, stored)?;
        table.push(json!({
            "tensor": t.tensor,
            "shape": shape,
            "type": c.ty.as_str(),
            "bytes": c.bytes,
            "bits_per_weight": c.bytes as f64 * 8.0 / t.numel.max(1) as f64,
            "divergence": c.divergence,
            "choices": t.choices.iter().map(|c| json!({
                "type": c.ty.as_str(), "bytes": c.bytes, "divergence": c.divergence,
            })).collect::<Vec<_>>(),
        }));
    }
    let measured = reference.divergence(net, set, 0, ctx)?;
    for (name, values) in originals {
        calib::set_weight(net, &name, values)?;
    }
    // The file is named by the type holding most weights (llama.cpp's `general.file_type`).
    let nominal = by_type
        .iter()
        .max_by_key(|(_, (_, n))| *n)
        .and_then(|(t, _)| t.parse::<GgufType>().ok())
        .unwrap_or(GgufType::Q8_0);
    let mut out = super::quantize::to_gguf(
        env,
        nominal,
        input,
        selected,
        &importance,
        super::quantize::Mixed {
            types: Some(&types),
            encoded: None,
        },
    )?;
    let gguf_summary = out.record["summary"].take();
    let mut weighted: Vec<&String> = importance.keys().collect();
    weighted.sort();
    out.record["summary"] = json!({
        "method": "auto",
        "format": "gguf",
        "budget": budget.to_json(),
        "budget_bytes": budget_bytes,
        "candidates": candidates.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "measure": reference.measure().as_str(),
        "tensors_quantized": tensors.len(),
        "weights": numel,
        "bytes": bytes,
        "bits_per_weight": if numel == 0 { 0.0 } else { bytes as f64 * 8.0 / numel as f64 },
        "types": by_type.iter().map(|(t, (n, w))| (t.to_string(), json!({"tensors": n, "weights": w}))).collect::<serde_json::Map<_, _>>(),
        "predicted_divergence": predicted,
        "measured_divergence": measured,
        "passes": tensors.iter().map(|t| t.choices.len()).sum::<usize>(),
        "calibration": calibration,
        "importance": {"weighted": weighted},
        "gguf_bytes": gguf_summary.get("gguf_bytes"),
        "architecture": gguf_summary.get("architecture"),
        "notes": gguf_summary.get("notes"),
        "seconds": started.elapsed().as_secs_f64(),
    });
    out.record["choices"] = json!(table);
    Ok(out)
}
