//! Calibration-based steps: GPTQ and AWQ quantization, Wanda and SparseGPT pruning, and the
//! calibration-free HQQ. The network runs on a seeded draw of the calibration dataset; layer
//! groups are compressed in order, each measured on the inputs the already-compressed groups
//! before it produce ([`crate::compress::calib::sweep`]). Every layer's output error relative
//! to its output (`tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ)` on the calibration inputs it saw) is reported
//! beside the same figure for the calibration-free baseline at the same setting
//! (round-to-nearest on full-range grids of the same bits and groups; magnitude pruning at
//! the same per-row target). HQQ needs no data and solves each selected tensor of the file
//! on its own.

use std::cell::RefCell;
use std::collections::HashSet;

use serde_json::{json, Value};

use super::sweep_state::SweepState;
use super::{current_arch, Artifact, Env, Input, PipelineError, StepOut};
use crate::compress::calib::{self, relative_output_error, CalibrationParams};
use crate::compress::engine::sequential::model::Model;
use crate::compress::engine::Network;
use crate::compress::formats::gguf;
use crate::compress::formats::packed::{self, QuantizeFile};
use crate::compress::prune::calibrated::{self as cprune, Target};
use crate::compress::quant::awq::{self, AwqParams};
use crate::compress::quant::gptq::{self, GptqParams};
use crate::compress::quant::{Granularity, Method, Quantizer};
use crate::spec::calibrated::{CalibratedMethod, CalibratedSpec};

/// The least time between two checkpoints of a calibrated step after its first: each holds
/// every weight compressed so far, so they are fewer than training's.
const CALIBRATION_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The least calibration rows (tokens, samples) in the Gram matrix on which Wanda's layers
/// report their output error: whole batches from the first until there are this many.
const WANDA_GRAM_ROWS: usize = 2048;

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
    let calibration = json!({
        "dataset_id": c.dataset_id.to_string(), "samples": set.samples, "kind": set.kind,
        "tokens": set.tokens, "seq_len": c.seq_len, "seed": seed, "indices": set.indices,
    });
    if let CalibratedMethod::Auto { budget, candidates } = &spec.method {
        let selected = in_file_order(input, |n| selected.contains(n));
        return super::auto::auto(
            env,
            input,
            net.as_ref(),
            &set,
            &selected,
            *budget,
            candidates,
            calibration,
        );
    }
    // What is done so far, shared by the solver and the per-block checkpoints; an earlier
    // attempt's checkpoint puts its weights back and the sweep starts after its blocks.
    let state = match env.resume_bytes()? {
        Some(bytes) => {
            let state = SweepState::from_bytes(&bytes)?;
            for (name, values) in &state.changed {
                calib::set_weight(net.as_ref(), name, values.clone())?;
            }
            state
        }
        None => SweepState::default(),
    };
    let start = state.blocks;
    let state = RefCell::new(state);
    let total_blocks = net.block_runner().map_or(0, |r| r.num_blocks());
    let mut last_saved: Option<std::time::Instant> = None;
    let mut checkpoint = |done: usize| {
        let due = last_saved.is_none_or(|t| t.elapsed() >= CALIBRATION_CHECKPOINT_INTERVAL);
        if !due || done >= total_blocks {
            return Ok(());
        }
        last_saved = Some(std::time::Instant::now());
        let mut s = state.borrow_mut();
        s.blocks = done;
        env.save_checkpoint(|w| s.write_to(w).map(|_| ()), done, Some("block"))
    };
    let blocks = calib::Blocks {
        start,
        done: &mut checkpoint,
    };
    // Wanda needs only the inputs' column norms: its layers' output error is reported on the
    // Gram matrix of the first WANDA_GRAM_ROWS calibration rows (tokens) or more.
    let gram_rows = matches!(spec.method, CalibratedMethod::Wanda(_)).then_some(WANDA_GRAM_ROWS);
    let started = std::time::Instant::now();
    calib::sweep(
        net.as_ref(),
        &set,
        &selected,
        env.ctx,
        blocks,
        gram_rows,
        |group, stats| {
            let mut guard = state.borrow_mut();
            let SweepState {
                layers,
                changed,
                codes,
                encoded,
                ..
            } = &mut *guard;
            let mut out = Vec::new();
            let gram = &stats.gram;
            if let CalibratedMethod::Awq {
                bits,
                group: g,
                symmetric,
                grid,
                clip,
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
                    clip,
                };
                let inputs: Vec<(&[f32], usize)> =
                    ws.iter().map(|(_, sh, w)| (w.as_slice(), sh[0])).collect();
                let found = awq::awq(&inputs, cols, &stats.mean_abs(), gram, &p)?;
                for ((name, shape, w), new) in ws.iter().zip(found.weights) {
                    let rtn = gptq::rtn_grouped(w, cols, gs, bits, symmetric);
                    layers.push(json!({
                        "layer": name, "shape": shape, "calibration_rows": stats.rows, "output_error_rows": stats.gram_rows,
                        "group_size": gs, "alpha": found.alpha, "clip": found.clip,
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
                let mut report = json!({
                    "layer": name,
                    "shape": shape,
                    "calibration_rows": stats.rows,
                    "output_error_rows": stats.gram_rows,
                });
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
                        report["output_error_rtn"] =
                            json!(relative_output_error(&w, &rtn, gram, cols));
                        if spec.gguf {
                            let ty = gptq::gguf_type(p.bits, p.symmetric).ok_or_else(|| {
                                crate::compress::Error::Internal(
                                    "no GGUF type for these codes".into(),
                                )
                            })?;
                            let blocks = gptq::gguf_blocks(&q, ty)?;
                            // The file must decode to exactly the weights GPTQ chose.
                            let decoded = gguf::decode_blocks(ty, &blocks, q.weights.len())?;
                            if decoded
                                .iter()
                                .zip(&q.weights)
                                .any(|(a, b)| a.to_bits() != b.to_bits())
                            {
                                return Err(crate::compress::Error::Internal(format!(
                                    "{name}: the {ty} blocks do not decode to GPTQ's weights"
                                )));
                            }
                            report["gguf_type"] = json!(ty.as_str());
                            encoded.insert(name.clone(), (ty, blocks));
                        }
                        if spec.packed {
                            codes.insert(name.clone(), q.quantized);
                        }
                        q.weights
                    }
                    CalibratedMethod::Awq { .. }
                    | CalibratedMethod::Hqq { .. }
                    | CalibratedMethod::Auto { .. } => {
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
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let SweepState {
        layers,
        mut changed,
        codes,
        encoded,
        ..
    } = state.into_inner();
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
    // The output: the input's tensors with the compressed ones replaced; with `gguf`, the
    // GGUF file of GPTQ's blocks and, as the model, that file read back (the same values).
    let mut gguf_out = None;
    let (temp, written) = if spec.gguf {
        let names = in_file_order(input, |n| encoded.contains_key(n));
        let ty = encoded
            .values()
            .next()
            .map(|(t, _)| *t)
            .unwrap_or(gguf::GgufType::Q8_0);
        let mut out = super::quantize::to_gguf(
            env,
            ty,
            input,
            &names,
            &Default::default(),
            super::quantize::Mixed {
                types: None,
                encoded: Some(&encoded),
            },
        )?;
        let file = out.file.take().ok_or_else(|| {
            super::failed(
                crate::codes::Code::InternalError,
                "the GGUF step wrote no model",
            )
        })?;
        let size = file.size();
        gguf_out = Some(out);
        (file, size)
    } else {
        let mut weights = input.file.float_tensors()?;
        for t in &mut weights {
            if let Some(v) = changed.remove(&t.name) {
                t.values = v;
            }
        }
        env.write_f32(input.metadata, &weights)?
    };
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
        "calibration": calibration,
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
        CalibratedMethod::Hqq { .. } | CalibratedMethod::Auto { .. } => {}
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
    if let Some(out) = gguf_out {
        let g = &out.record["summary"];
        summary["format"] = json!("gguf");
        summary["gguf_type"] = g["type"].clone();
        summary["gguf_bytes"] = g["gguf_bytes"].clone();
        summary["architecture"] = g.get("architecture").cloned().unwrap_or(Value::Null);
        artifact = out.artifact;
        return Ok(StepOut {
            outputs: None,
            file: Some(temp),
            artifact,
            architecture: None,
            record: json!({"summary": summary, "layers": layers, "gguf_tensors": out.record["layers"]}),
        });
    }
    Ok(StepOut {
        outputs: None,
        file: Some(temp),
        artifact,
        architecture: None,
        record: json!({"summary": summary, "layers": layers}),
    })
}

/// The names of the input's tensors `keep` takes, in file order (as a GGUF lists them).
fn in_file_order(input: &Input, keep: impl Fn(&str) -> bool) -> Vec<String> {
    input
        .file
        .header()
        .tensors
        .iter()
        .filter(|t| keep(&t.name))
        .map(|t| t.name.clone())
        .collect()
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
        let rtn = gptq::rtn_grouped(&t.values, cols, gs, bits, false);
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
