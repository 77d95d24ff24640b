//! Calibration-based steps: GPTQ and AWQ quantization, Wanda and SparseGPT pruning, and the
//! calibration-free HQQ. The network runs on a seeded draw of the calibration dataset; layer
//! groups are compressed in order, each measured on the inputs the already-compressed groups
//! before it produce ([`crate::compress::calib::sweep`]). Every layer's output error relative
//! to its output (`tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ)` on the calibration inputs it saw) is reported
//! beside the same figure for the calibration-free baseline at the same setting
//! (round-to-nearest on the same grids; magnitude pruning at the same per-row target). HQQ
//! needs no data and solves each selected tensor of the file on its own.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::{current_arch, Artifact, Env, Input, PipelineError, StepOut};
use crate::compress::calib::{self, relative_output_error, CalibrationParams};
use crate::compress::engine::sequential::model::Model;
use crate::compress::engine::Network;
use crate::compress::formats::packed::{self, QuantizeFile};
use crate::compress::prune::calibrated::{self as cprune, Target};
use crate::compress::quant::awq::{self, AwqParams};
use crate::compress::quant::gptq::{self, GptqParams};
use crate::compress::quant::{Granularity, Method, Quantized, Quantizer};
use crate::spec::calibrated::{CalibratedMethod, CalibratedSpec};

/// The step.
pub(super) fn calibrated(
    env: &Env,
    spec: &CalibratedSpec,
    input: &Input,
) -> Result<StepOut, PipelineError> {
    let Some(c) = &spec.calibration else {
        return weight_only(env, spec, input);
    };
    let net: Box<dyn Network> = match input.transformer {
        Some(t) => t.load(input.file)?,
        None => Box::new(Model::from_safetensors(
            &current_arch(input.architecture)?,
            input.file,
        )?),
    };
    let selected: HashSet<String> = spec
        .selection
        .resolve(&input.file.header().tensors)
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    let seed = c.seed.unwrap_or(env.seed);
    let data = env.datasets.get(&c.dataset_id)?;
    let set = calib::calibration_set(
        net.as_ref(),
        data,
        &CalibrationParams {
            samples: c.samples,
            seq_len: c.seq_len,
            seed,
        },
    )?;
    let mut layers: Vec<Value> = Vec::new();
    let mut changed: HashMap<String, Vec<f32>> = HashMap::new();
    let mut codes: HashMap<String, Quantized> = HashMap::new();
    let started = std::time::Instant::now();
    calib::sweep(net.as_ref(), &set, &selected, env.ctx, |group, stats| {
        let mut out = Vec::new();
        let gram = &stats.gram;
        if let CalibratedMethod::Awq {
            bits,
            group: g,
            symmetric,
            grid,
        } = spec.method
        {
            // One search for the whole group: its layers share the input's scales.
            let cols = stats.cols;
            let mut ws = Vec::new();
            for layer in &group.layers {
                let name = format!("{layer}.weight");
                if selected.contains(&name) {
                    let (shape, w) = calib::weight(net.as_ref(), &name)?;
                    ws.push((name, shape, w));
                }
            }
            let gs = g.for_cols(cols).unwrap_or(cols);
            let p = AwqParams {
                group: gs,
                bits,
                symmetric,
                grid,
            };
            let inputs: Vec<(&[f32], usize)> =
                ws.iter().map(|(_, sh, w)| (w.as_slice(), sh[0])).collect();
            let found = awq::awq(&inputs, cols, &stats.mean_abs(), gram, &p)?;
            for ((name, shape, w), new) in ws.iter().zip(found.weights) {
                let rtn = gptq::rtn(
                    w,
                    shape[0],
                    cols,
                    &GptqParams {
                        bits,
                        group_size: Some(gs),
                        symmetric,
                        act_order: false,
                        damp: 0.0,
                        block_size: 1,
                    },
                );
                layers.push(json!({
                    "layer": name, "shape": shape, "calibration_rows": stats.rows,
                    "group_size": gs, "alpha": found.alpha,
                    "output_error": relative_output_error(w, &new, gram, cols),
                    "output_error_rtn": relative_output_error(w, &rtn, gram, cols),
                }));
                changed.insert(name.clone(), new.clone());
                out.push((name.clone(), new));
            }
            return Ok(out);
        }
        let h = stats.hessian();
        for layer in &group.layers {
            let name = format!("{layer}.weight");
            if !selected.contains(&name) {
                continue;
            }
            let (shape, w) = calib::weight(net.as_ref(), &name)?;
            let (rows, cols) = (shape[0], stats.cols);
            let mut report = json!({"layer": name, "shape": shape, "calibration_rows": stats.rows});
            let new = match spec.method {
                CalibratedMethod::Gptq { params, group } => {
                    let p = GptqParams {
                        group_size: group.for_cols(cols),
                        ..params
                    };
                    let q = gptq::gptq(&w, rows, cols, &h, &p)?;
                    let rtn = gptq::rtn(&w, rows, cols, &p);
                    report["group_size"] = json!(p.group_size);
                    report["damp"] = json!(q.damp);
                    report["dead_columns"] = json!(q.dead_columns);
                    report["output_error"] =
                        json!(relative_output_error(&w, &q.weights, gram, cols));
                    report["output_error_rtn"] = json!(relative_output_error(&w, &rtn, gram, cols));
                    if spec.packed {
                        codes.insert(name.clone(), q.quantized);
                    }
                    q.weights
                }
                CalibratedMethod::Awq { .. } | CalibratedMethod::Hqq { .. } => {
                    return Err(crate::compress::Error::Internal(
                        "awq and hqq are handled apart".into(),
                    ))
                }
                CalibratedMethod::Wanda(t) => {
                    let pruned = cprune::wanda(&w, rows, cols, &stats.column_norms(), t)?;
                    prune_report(&mut report, &w, &pruned, rows, cols, gram, t)?;
                    pruned
                }
                CalibratedMethod::SparseGpt {
                    target,
                    damp,
                    block_size,
                } => {
                    let (pruned, used) =
                        cprune::sparsegpt(&w, rows, cols, &h, target, damp, block_size)?;
                    report["damp"] = json!(used);
                    prune_report(&mut report, &w, &pruned, rows, cols, gram, target)?;
                    pruned
                }
            };
            layers.push(report);
            changed.insert(name.clone(), new.clone());
            out.push((name, new));
        }
        Ok(out)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    // Selected tensors no linear layer reads through the forward pass (an embedding, a tied
    // head): left unchanged, and said so.
    let mut not_reached: Vec<&String> = selected
        .iter()
        .filter(|n| !changed.contains_key(*n))
        .collect();
    not_reached.sort();
    if changed.is_empty() {
        return Err(super::failed(
            crate::codes::Code::ValidationFailed,
            format!("no selected tensor is the weight of a linear layer the network runs ({} selected); select the linear layers' weights", selected.len()),
        ));
    }
    // The output: the input's tensors with the compressed ones replaced.
    let mut weights = input.file.float_tensors()?;
    for t in &mut weights {
        if let Some(v) = changed.remove(&t.name) {
            t.values = v;
        }
    }
    let (temp, written) = env.write_f32(input.metadata, &weights)?;
    // GPTQ's codes in the packed encoding, with their error against the input's weights.
    let mut artifact = None;
    let mut packed_reports = Vec::new();
    if spec.packed {
        let CalibratedMethod::Gptq { params, .. } = spec.method else {
            return Err(super::failed(
                crate::codes::Code::ValidationFailed,
                "only gptq writes packed codes",
            ));
        };
        let mut names: Vec<String> = codes.keys().cloned().collect();
        names.sort();
        let nominal = Quantizer {
            method: Method::Uniform {
                bits: params.bits,
                symmetric: params.symmetric,
                granularity: Granularity::PerChannel,
                search: false,
            },
            importance: Default::default(),
        };
        let mut file = env.store.create_temp()?;
        packed_reports = packed::quantize_file(
            input.file,
            &QuantizeFile {
                selected: &names,
                quantizer: &nominal,
                seed,
                packed: true,
                metadata: input.metadata,
                precomputed: Some(&codes),
                entropy: Default::default(),
            },
            &mut file,
            env.ctx,
        )?;
        artifact = Some(Artifact {
            kind: "packed",
            format: "safetensors",
            file,
        });
    }
    let mean = |key: &str| {
        let v: Vec<f64> = layers.iter().filter_map(|l| l[key].as_f64()).collect();
        if v.is_empty() {
            Value::Null
        } else {
            json!(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let mut summary = json!({
        "method": spec.method_name(),
        "layers": layers.len(),
        "calibration": {
            "dataset_id": c.dataset_id.to_string(), "samples": set.samples, "kind": set.kind,
            "tokens": set.tokens, "seq_len": c.seq_len, "seed": seed,
            "indices": set.indices,
        },
        "calibration_seconds": seconds,
        "mean_output_error": mean("output_error"),
        "file_bytes_after": written,
        "not_reached": not_reached,
        "format": if spec.packed { "packed" } else { "dequantized" },
    });
    if let Some(a) = &artifact {
        let numel: u64 = packed_reports
            .iter()
            .map(|r| r.shape.iter().product::<usize>() as u64)
            .sum();
        let bits: f64 = packed_reports
            .iter()
            .map(|r| r.bits_per_weight * r.shape.iter().product::<usize>() as f64)
            .sum();
        summary["packed_file_bytes"] = json!(a.file.size());
        summary["packed_bytes"] = json!(packed_reports.iter().map(|r| r.packed_bytes).sum::<u64>());
        summary["bits_per_weight"] = json!(if numel == 0 { 0.0 } else { bits / numel as f64 });
    }
    match spec.method {
        CalibratedMethod::Gptq { params, .. } => {
            summary["bits"] = json!(params.bits);
            summary["symmetric"] = json!(params.symmetric);
            summary["act_order"] = json!(params.act_order);
            summary["mean_output_error_rtn"] = mean("output_error_rtn");
        }
        CalibratedMethod::Awq {
            bits, symmetric, ..
        } => {
            summary["bits"] = json!(bits);
            summary["symmetric"] = json!(symmetric);
            summary["mean_output_error_rtn"] = mean("output_error_rtn");
        }
        CalibratedMethod::Hqq { .. } => {}
        CalibratedMethod::Wanda(_) | CalibratedMethod::SparseGpt { .. } => {
            summary["mean_output_error_magnitude"] = mean("output_error_magnitude");
            let (z, n) = layers.iter().fold((0u64, 0u64), |(z, n), l| {
                (
                    z + l["zeros"].as_u64().unwrap_or(0),
                    n + l["weights"].as_u64().unwrap_or(0),
                )
            });
            summary["sparsity"] = json!(if n > 0 { z as f64 / n as f64 } else { 0.0 });
        }
    }
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact,
        architecture: None,
        record: json!({"summary": summary, "layers": layers}),
    })
}

fn prune_report(
    report: &mut Value,
    w: &[f32],
    pruned: &[f32],
    rows: usize,
    cols: usize,
    gram: &[f64],
    target: Target,
) -> crate::compress::Result<()> {
    let magnitude = cprune::magnitude(w, rows, cols, target)?;
    report["weights"] = json!(w.len());
    report["zeros"] = json!(pruned.iter().filter(|v| **v == 0.0).count());
    report["output_error"] = json!(relative_output_error(w, pruned, gram, cols));
    report["output_error_magnitude"] = json!(relative_output_error(w, &magnitude, gram, cols));
    Ok(())
}

/// HQQ needs no data: each selected 2-D tensor of the file is solved on its own, and its
/// weight error is reported beside round-to-nearest's on the same affine grid.
fn weight_only(env: &Env, spec: &CalibratedSpec, input: &Input) -> Result<StepOut, PipelineError> {
    let CalibratedMethod::Hqq { bits, group } = spec.method else {
        return Err(super::failed(
            crate::codes::Code::ValidationFailed,
            "this method needs a `calibration` block",
        ));
    };
    let selected: HashSet<String> = spec
        .selection
        .resolve(&input.file.header().tensors)
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    let mut weights = input.file.float_tensors()?;
    let mut layers = Vec::new();
    let total = selected.len().max(1);
    for t in &mut weights {
        if !selected.contains(&t.name) || t.shape.len() != 2 {
            continue;
        }
        env.ctx.check()?;
        env.ctx.report(
            layers.len() as f64 / total as f64,
            &format!("hqq {}", t.name),
        );
        let cols = t.shape[1];
        let gs = group.for_cols(cols).unwrap_or(cols);
        let h = awq::hqq(&t.values, gs, bits);
        let rtn = gptq::rtn(
            &t.values,
            t.shape[0],
            cols,
            &GptqParams {
                bits,
                group_size: Some(gs),
                symmetric: false,
                act_order: false,
                damp: 0.0,
                block_size: 1,
            },
        );
        let mse = |q: &[f32]| {
            q.iter()
                .zip(&t.values)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                / q.len().max(1) as f64
        };
        layers.push(json!({"layer": t.name, "shape": t.shape, "group_size": gs,
                           "mse": mse(&h), "mse_rtn": mse(&rtn)}));
        t.values = h;
    }
    let (temp, written) = env.write_f32(input.metadata, &weights)?;
    let mean = |key: &str| {
        let v: Vec<f64> = layers.iter().filter_map(|l| l[key].as_f64()).collect();
        json!(v.iter().sum::<f64>() / v.len().max(1) as f64)
    };
    let summary = json!({"method": "hqq", "bits": bits, "layers": layers.len(),
                         "calibration": null, "mean_mse": mean("mse"), "mean_mse_rtn": mean("mse_rtn"),
                         "file_bytes_after": written});
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact: None,
        architecture: None,
        record: json!({"summary": summary, "layers": layers}),
    })
}
