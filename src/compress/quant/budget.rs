//! `max_accuracy_drop`: quantize every selected tensor; while the accuracy drop on the eval
//! set is over budget, put back to float the tensor whose quantization alone costs the most,
//! and report what was reverted and why.

use std::collections::HashMap;

use serde::Serialize;

use super::Quantizer;
use crate::compress::engine::evaluate::EvalData;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::sequential::evaluate_weights;
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::progress::Ctx;
use crate::compress::Result;

/// One tensor put back to float.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reverted {
    /// Tensor name.
    pub tensor: String,
    /// Why it was chosen, in words.
    pub reason: String,
    /// Accuracy lost by quantizing it alone.
    pub accuracy_drop_alone: f64,
    /// Accuracy with it (and the ones before it) back in float.
    pub accuracy_after_revert: f64,
}

/// One point of the search: accuracy after `reverted` tensors went back to float.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchStep {
    /// Tensors reverted so far.
    pub reverted: usize,
    /// Accuracy then.
    pub accuracy: f64,
    /// Drop from the float accuracy.
    pub drop: f64,
}

/// What the budget search did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetReport {
    /// The allowed accuracy drop.
    pub budget: f64,
    /// Accuracy of the float model.
    pub float_accuracy: f64,
    /// Accuracy with every selected tensor quantized.
    pub all_quantized_accuracy: f64,
    /// Accuracy of the result.
    pub final_accuracy: f64,
    /// The reverted tensors, in order.
    pub tensors: Vec<Reverted>,
    /// Every point of the search.
    pub search: Vec<SearchStep>,
    /// Whether the result is within the budget.
    pub within_budget: bool,
}

/// What the budget search quantizes with and measures on.
#[derive(Debug, Clone, Copy)]
pub struct BudgetParams<'a> {
    /// The step's quantizer.
    pub quantizer: &'a Quantizer,
    /// The tensors it quantizes.
    pub selected: &'a [String],
    /// The allowed accuracy drop.
    pub budget: f64,
    /// The quantizer's seed.
    pub seed: u64,
    /// The evaluation set.
    pub eval: EvalData<'a>,
}

/// Returns the tensors still quantized and the report.
pub fn accuracy_budget(
    arch: &Architecture,
    weights: &[NamedTensor],
    params: &BudgetParams<'_>,
    ctx: &Ctx<'_>,
) -> Result<(Vec<String>, BudgetReport)> {
    let BudgetParams {
        quantizer,
        selected,
        budget,
        seed,
        eval,
    } = *params;
    let accuracy = |w: Vec<NamedTensor>| -> Result<f64> {
        Ok(evaluate_weights(arch, w, eval, None, ctx)?
            .accuracy
            .unwrap_or(0.0))
    };
    let float_acc = accuracy(weights.to_vec())?;
    let mut quantized = HashMap::new();
    for w in weights.iter().filter(|w| selected.contains(&w.name)) {
        ctx.check()?;
        let (q, _) = quantizer.quantize(&w.name, &w.values, &w.shape, seed)?;
        quantized.insert(w.name.clone(), q.dequantized);
    }
    let all_acc = accuracy(with_quantized(weights, selected, &quantized))?;
    let mut kept: Vec<String> = selected.to_vec();
    let mut reverted = Vec::new();
    let mut search = vec![SearchStep {
        reverted: 0,
        accuracy: all_acc,
        drop: float_acc - all_acc,
    }];
    if float_acc - all_acc > budget {
        // Sensitivity: the accuracy lost by quantizing each tensor alone.
        let mut sensitivity = Vec::new();
        for name in selected {
            ctx.check()?;
            let acc = accuracy(with_quantized(
                weights,
                std::slice::from_ref(name),
                &quantized,
            ))?;
            sensitivity.push((name.clone(), float_acc - acc));
        }
        sensitivity.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut best = (all_acc, kept.clone());
        for (name, drop_alone) in sensitivity {
            kept.retain(|k| *k != name);
            let acc = accuracy(with_quantized(weights, &kept, &quantized))?;
            reverted.push(Reverted {
                tensor: name,
                reason: format!("quantizing it alone cost {drop_alone:.4} accuracy, the most of the tensors still quantized"),
                accuracy_drop_alone: drop_alone,
                accuracy_after_revert: acc,
            });
            search.push(SearchStep {
                reverted: reverted.len(),
                accuracy: acc,
                drop: float_acc - acc,
            });
            if acc > best.0 {
                best = (acc, kept.clone());
            }
            if float_acc - acc <= budget {
                best = (acc, kept.clone());
                break;
            }
        }
        kept = best.1;
    }
    let final_acc = accuracy(with_quantized(weights, &kept, &quantized))?;
    let report = BudgetReport {
        budget,
        float_accuracy: float_acc,
        all_quantized_accuracy: all_acc,
        final_accuracy: final_acc,
        tensors: reverted,
        search,
        within_budget: float_acc - final_acc <= budget,
    };
    Ok((kept, report))
}

/// Weights with the `chosen` tensors replaced by their dequantized values.
fn with_quantized(
    weights: &[NamedTensor],
    chosen: &[String],
    quantized: &HashMap<String, Vec<f32>>,
) -> Vec<NamedTensor> {
    weights
        .iter()
        .map(
            |w| match (chosen.contains(&w.name), quantized.get(&w.name)) {
                (true, Some(q)) => NamedTensor {
                    name: w.name.clone(),
                    shape: w.shape.clone(),
                    values: q.clone(),
                },
                _ => w.clone(),
            },
        )
        .collect()
}
