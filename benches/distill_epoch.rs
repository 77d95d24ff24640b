//! Cost of one epoch of knowledge distillation against one epoch of plain training of the
//! same student: teacher 784-1200-1200-10 with dropout, student 784-800-800-10, random
//! 10k×784 data, batch 128, AdamW, no validation.
//!
//! ```text
//! cargo bench --bench distill_epoch
//! ```
//!
//! Prints, per round: the plain epoch; distillation with the cached teacher (its epoch,
//! and the one-off caching pass of the teacher over the transfer set); distillation with
//! the teacher run live on every batch; and the ratios to the plain epoch.
//! `BENCH_SAMPLES` (default 10000) and `BENCH_ROUNDS` (default 2) change the size.

/// The same allocator as the `whittle` binary (see src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use whittle::compress::distill::{distill_with_cache, DistillParams, TeacherCache};
use whittle::compress::engine::data::{Dataset, DatasetX};
use whittle::compress::engine::finetune::{finetune, FinetuneParams, Validation};
use whittle::compress::engine::sequential::arch::Architecture;
use whittle::compress::engine::sequential::model::Model;
use whittle::compress::engine::train::TrainHooks;
use whittle::compress::progress::Ctx;

fn mlp(hidden: usize, dropout: bool) -> Architecture {
    let mut layers = vec![serde_json::json!({"type":"flatten"})];
    let mut width = 784;
    for i in 0..2 {
        layers.push(
            serde_json::json!({"type":"linear","name":format!("fc{}", i + 1),
            "in_features":width,"out_features":hidden}),
        );
        layers.push(serde_json::json!({"type":"relu"}));
        if dropout {
            layers.push(serde_json::json!({"type":"dropout","p":0.5}));
        }
        width = hidden;
    }
    layers.push(
        serde_json::json!({"type":"linear","name":"fc3","in_features":width,"out_features":10}),
    );
    Architecture::from_json(
        &serde_json::json!({"kind":"sequential","input_shape":[1,28,28],"layers":layers}),
    )
    .expect("valid architecture")
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

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let samples = env("BENCH_SAMPLES", 10_000);
    let rounds = env("BENCH_ROUNDS", 2);
    let data = random_mnist(samples);
    let (teacher_arch, student_arch) = (mlp(1200, true), mlp(800, false));
    let teacher = Model::init(&teacher_arch, 1)?;
    let mut train = FinetuneParams::new(&data);
    train.validation = Validation::None;
    train.epochs = 1;
    train.batch_size = 128;
    let cancel = AtomicBool::new(false);
    let ctx = Ctx::new(&|_, _| {}, &cancel);
    println!(
        "distill_epoch: {samples} samples, batch 128, AdamW; teacher {} params, student {} params",
        teacher_arch.parameter_count(),
        student_arch.parameter_count()
    );
    // Minimum over rounds of (plain epoch, cached epoch, live epoch, plain call, cached call, live call).
    let mut best = [f64::INFINITY; 6];
    for round in 1..=rounds {
        let started = Instant::now();
        let out = finetune(
            Box::new(Model::init(&student_arch, 2)?),
            &train,
            &ctx,
            TrainHooks::default(),
        )?;
        let (plain, plain_epoch) = (started.elapsed().as_secs_f64(), out.history[0].seconds);

        let mut p = DistillParams::new(&data);
        p.train = train.clone();
        let started = Instant::now();
        let out = distill_with_cache(
            &teacher,
            Box::new(Model::init(&student_arch, 2)?),
            &p,
            TeacherCache::Auto,
            &ctx,
            TrainHooks::default(),
        )?;
        let (cached, cached_epoch) = (started.elapsed().as_secs_f64(), out.history[0].seconds);
        assert!(out.teacher_cached);

        let started = Instant::now();
        let out = distill_with_cache(
            &teacher,
            Box::new(Model::init(&student_arch, 2)?),
            &p,
            TeacherCache::Live,
            &ctx,
            TrainHooks::default(),
        )?;
        let (live, live_epoch) = (started.elapsed().as_secs_f64(), out.history[0].seconds);
        assert!(!out.teacher_cached);
        println!(
            "round {round}: epoch (training loop only): plain {plain_epoch:.3} s, \
             cached teacher {cached_epoch:.3} s ({:.2}x), live teacher {live_epoch:.3} s ({:.2}x)",
            cached_epoch / plain_epoch,
            live_epoch / plain_epoch
        );
        println!(
            "round {round}: whole call: plain {plain:.3} s, cached teacher {cached:.3} s ({:.2}x, \
             of which ~{:.3} s caching the teacher's logits once), live teacher {live:.3} s ({:.2}x)",
            cached / plain,
            cached - cached_epoch - (plain - plain_epoch),
            live / plain
        );
        let now = [plain_epoch, cached_epoch, live_epoch, plain, cached, live];
        for (b, v) in best.iter_mut().zip(now) {
            *b = b.min(v);
        }
    }
    let [pe, ce, le, pc, cc, lc] = best;
    println!(
        "best of {rounds}: epoch ratio cached {:.2}x (goal <= 1.2x), live {:.2}x; \
         whole-call ratio (one epoch + one-off caching) cached {:.2}x, live {:.2}x",
        ce / pe,
        le / pe,
        cc / pc,
        lc / pc
    );
    Ok(())
}
