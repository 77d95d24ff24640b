//! Global magnitude pruning at 90% of 100M f32 parameters in 100 tensors of 1000×1000
//! (standard normal, fixed seed), in memory, through [`prune_tensors`]: the time of the
//! threshold selection (two radix-histogram passes) plus the masking pass, and the peak
//! resident memory (`VmHWM`) relative to the model's size. Prints one JSON line per rep.
//! The peers (PyTorch's `global_unstructured`, a `kthvalue` / `topk` threshold, numpy's
//! `partition`) are `scripts/bench_prune.py`; `scripts/bench_prune.sh` runs both.
//!
//! ```text
//! cargo bench --bench prune_global            # BENCH_REPS=3 BENCH_TENSORS=100 BENCH_DIM=1000
//! ```

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use whittle::compress::formats::safetensors::NamedTensor;
use whittle::compress::prune::{prune_tensors, Method, PruneTargets, Scope};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmHWM` (peak resident set) and `VmRSS` of this process, in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Standard-normal values (Box–Muller), generated on two threads straight into the tensors.
fn fill(weights: &mut [NamedTensor], seed: u64) {
    let half = weights.len() / 2;
    let (a, b) = weights.split_at_mut(half);
    std::thread::scope(|s| {
        for (part, tensors) in [a, b].into_iter().enumerate() {
            s.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(part as u64);
                for t in tensors.iter_mut() {
                    for pair in t.values.chunks_mut(2) {
                        let u: f32 = rng.gen_range(f32::EPSILON..1.0);
                        let v: f32 = rng.gen();
                        let r = (-2.0 * u.ln()).sqrt();
                        let (sin, cos) = (std::f32::consts::TAU * v).sin_cos();
                        pair[0] = r * cos;
                        if let Some(x) = pair.get_mut(1) {
                            *x = r * sin;
                        }
                    }
                }
            });
        }
    });
}

fn main() {
    let tensors = env("BENCH_TENSORS", 100);
    let dim = env("BENCH_DIM", 1000);
    let reps = env("BENCH_REPS", 3);
    let sparsity = 0.9;
    let params = tensors * dim * dim;
    let model_mib = (params * 4) as f64 / (1024.0 * 1024.0);
    let (hwm_start, _) = memory_mib();
    let mut weights: Vec<NamedTensor> = (0..tensors)
        .map(|i| NamedTensor {
            name: format!("layers.{i}.weight"),
            shape: vec![dim, dim],
            values: vec![0.0; dim * dim],
        })
        .collect();
    let selected: Vec<String> = weights.iter().map(|t| t.name.clone()).collect();
    let targets = PruneTargets {
        sparsity,
        scope: Scope::Global,
        overrides: vec![],
    };
    for rep in 0..reps {
        fill(&mut weights, 42);
        let (hwm_before, rss_before) = memory_mib();
        let start = Instant::now();
        let reports = prune_tensors(&mut weights, &selected, &Method::Magnitude, &targets, 0)
            .expect("pruning failed");
        let seconds = start.elapsed().as_secs_f64();
        let (hwm_after, rss_after) = memory_mib();
        let pruned: u64 = reports.iter().map(|r| r.pruned).sum();
        let threshold = reports
            .first()
            .and_then(|r| r.threshold)
            .unwrap_or(f64::NAN);
        println!(
            "{}",
            serde_json::json!({
                "bench": "prune_global", "impl": "whittle", "rep": rep,
                "tensors": tensors, "params": params, "sparsity": sparsity,
                "seconds": seconds, "pruned": pruned, "threshold": threshold,
                "model_mib": model_mib, "vmhwm_start_mib": hwm_start,
                "vmhwm_before_mib": hwm_before, "vmhwm_after_mib": hwm_after,
                "vmrss_before_mib": rss_before, "vmrss_after_mib": rss_after,
                "peak_over_model": hwm_after / model_mib,
                "extra_over_model": (hwm_after - hwm_before) / model_mib,
            })
        );
    }
}
