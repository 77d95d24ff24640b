//! Training throughput of the candle engine: samples/s for LeNet-300-100 (784-300-100-10)
//! and a LeNet-5-style CNN at batch 128 with AdamW on random MNIST-shaped data, through
//! the same training loop the `finetune` op uses. The PyTorch peer is
//! `scripts/bench_train_pytorch.py`; run both on the same cores:
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench --bench train_throughput
//! python3 scripts/bench_train_pytorch.py --threads 2
//! ```
//!
//! `BENCH_BATCHES` (default 40) sets the batches per epoch; `BENCH_MODEL` (`lenet-300-100`
//! or `lenet-5`) runs one network only. Besides throughput it prints
//! where one step's time goes: forward + loss, backward, and the rest (optimizer update,
//! batching, bookkeeping), measured separately on the same batches.
//!
//! The numbers are sensitive to the allocator: candle allocates a fresh buffer for every
//! op and gradient, and glibc's default trimming hands them back to the kernel, so much
//! of a step can be page faults. Like the `whittle` binary, this bench uses mimalloc.

/// The same allocator as the `whittle` binary (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use whittle::compress::engine::data::{Dataset, DatasetX, Subset};
use whittle::compress::engine::sequential::arch::Architecture;
use whittle::compress::engine::sequential::model::Model;
use whittle::compress::engine::train::{
    cross_entropy, train, LrSchedule, Optimizer, ScheduleKind, TrainConfig, TrainHooks,
};
use whittle::compress::progress::Ctx;

const BATCH: usize = 128;

fn lenet_300_100() -> serde_json::Value {
    serde_json::json!({"kind":"sequential","input_shape":[1,28,28],"layers":[
        {"type":"flatten"},
        {"type":"linear","name":"fc1","in_features":784,"out_features":300},
        {"type":"relu"},
        {"type":"linear","name":"fc2","in_features":300,"out_features":100},
        {"type":"relu"},
        {"type":"linear","name":"fc3","in_features":100,"out_features":10}]})
}

fn lenet5() -> serde_json::Value {
    serde_json::json!({"kind":"sequential","input_shape":[1,28,28],"layers":[
        {"type":"conv2d","in_channels":1,"out_channels":6,"kernel_size":5,"padding":2},
        {"type":"relu"},
        {"type":"max_pool2d","kernel_size":2},
        {"type":"conv2d","in_channels":6,"out_channels":16,"kernel_size":5},
        {"type":"relu"},
        {"type":"max_pool2d","kernel_size":2},
        {"type":"flatten"},
        {"type":"linear","in_features":400,"out_features":120},
        {"type":"relu"},
        {"type":"linear","in_features":120,"out_features":84},
        {"type":"relu"},
        {"type":"linear","in_features":84,"out_features":10}]})
}

fn random_mnist(samples: usize) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    Dataset {
        x: DatasetX::U8((0..samples * 784).map(|_| rng.gen()).collect()),
        feature_shape: vec![1, 28, 28],
        samples,
        y: Some((0..samples).map(|_| rng.gen_range(0..10)).collect()),
        num_classes: Some(10),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batches: usize = std::env::var("BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!("candle training throughput, batch {BATCH}, AdamW, RAYON_NUM_THREADS={threads}");
    let data = random_mnist(BATCH * batches);
    let cancel = AtomicBool::new(false);
    let ctx = Ctx::new(&|_, _| {}, &cancel);
    let only = std::env::var("BENCH_MODEL").ok();
    for (name, doc) in [("lenet-300-100", lenet_300_100()), ("lenet-5", lenet5())] {
        if only.as_deref().is_some_and(|m| m != name) {
            continue;
        }
        let arch = Architecture::from_json(&doc)?;
        let mut model = Model::init(&arch, 0)?;
        let config = TrainConfig {
            epochs: 3,
            batch_size: BATCH,
            optimizer: Optimizer::ADAMW,
            lr: 1e-3,
            weight_decay: 0.01,
            schedule: LrSchedule {
                kind: ScheduleKind::Constant,
                warmup_epochs: 0,
            },
            grad_clip: None,
            augment: None,
            accumulate: 1,
            early_stopping: None,
            lr_multipliers: Vec::new(),
            seed: 0,
        };
        let all = Subset::all(&data);
        let out = train(&mut model, &all, None, &config, &ctx, TrainHooks::default())?;
        // The first epoch warms caches and allocators; report the best of the others.
        let seconds = out.history[1..]
            .iter()
            .map(|m| m.seconds)
            .fold(f64::INFINITY, f64::min);
        let throughput = data.samples as f64 / seconds;

        // Where a step's time goes, on the same batches.
        let (mut fwd, mut bwd, mut n) = (0f64, 0f64, 0usize);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for batch in all.batches(BATCH) {
            let batch = batch?;
            let t0 = Instant::now();
            let logits = model.forward_train(&batch.x, &mut rng)?;
            let loss = cross_entropy(&logits, &batch)?;
            loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            drop(grads);
            fwd += (t1 - t0).as_secs_f64();
            bwd += t1.elapsed().as_secs_f64();
            n += 1;
        }
        let step_ms = 1000.0 * BATCH as f64 / throughput;
        let (fwd_ms, bwd_ms) = (1000.0 * fwd / n as f64, 1000.0 * bwd / n as f64);
        println!(
            "{name:14} {throughput:9.0} samples/s  step {step_ms:6.2} ms = forward+loss {fwd_ms:5.2} + backward {bwd_ms:5.2} + optimizer/batching/rest {:5.2}",
            step_ms - fwd_ms - bwd_ms
        );
    }
    Ok(())
}
