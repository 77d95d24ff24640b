//! Training step throughput of a transformer in the candle engine: tokens/s of
//! all-MiniLM-L6-v2 with a new 5-class head (forward + cross-entropy + backward + AdamW, train
//! mode with dropout) at batch 16 × 64 tokens, through the same training loop `finetune`
//! uses (tokenization included). The PyTorch peer is `scripts/bench_transformer_train.py`
//! (transformers' `BertForSequenceClassification` on the same folder); run both on the same
//! cores:
//!
//! ```text
//! scripts/fetch_data.sh minilm
//! RAYON_NUM_THREADS=2 cargo bench --bench transformer_train
//! python3 scripts/bench_transformer_train.py --threads 2
//! ```
//!
//! `BENCH_BATCHES` (default 8) sets the batches per epoch; `MINILM` the folder (default
//! target/fixtures/minilm). Each document is 62 words that tokenize to one token each, so
//! every sequence is exactly 64 tokens with `[CLS]` and `[SEP]` (no padding). The first epoch
//! is a warm-up; the best of the next three is reported.

/// The same allocator as the `whittle` binary (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use whittle::compress::engine::data::{Dataset, Subset, TextEncoder};
use whittle::compress::engine::families;
use whittle::compress::engine::train::{
    train, LrSchedule, Optimizer, ScheduleKind, TrainConfig, TrainHooks,
};
use whittle::compress::formats::safetensors::SafetensorsFile;
use whittle::compress::progress::Ctx;

const BATCH: usize = 16;
const TOKENS: usize = 64;
const WORDS: [&str; 8] = ["the", "cat", "sat", "on", "a", "mat", "and", "dog"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batches: usize = std::env::var("BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = std::env::var("MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/fixtures/minilm"));
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "no MiniLM folder at {} (scripts/fetch_data.sh minilm)",
            dir.display()
        );
        return Ok(());
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let file = SafetensorsFile::open(dir.join("model.safetensors"))?;
    let tokenizer = Arc::new(TextEncoder::from_file(dir.join("tokenizer.json"))?);
    let base = families::load(&config, &file, Some(tokenizer))?;
    let mut lines = String::new();
    for i in 0..BATCH * batches {
        let words: Vec<&str> = (0..TOKENS - 2)
            .map(|k| WORDS[(i * 7 + k * 3) % WORDS.len()])
            .collect();
        lines.push_str(&serde_json::json!({"text": words.join(" "), "label": i % 5}).to_string());
        lines.push('\n');
    }
    let data = Dataset::from_jsonl(lines.as_bytes())?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!(
        "candle transformer training, all-MiniLM-L6-v2 + 5-class head, batch {BATCH} x {TOKENS} tokens, AdamW, RAYON_NUM_THREADS={threads}"
    );
    let cancel = AtomicBool::new(false);
    let ctx = Ctx::new(&|_, _| {}, &cancel);
    let mut model = base.with_head("classifier", 5, 0)?;
    let config = TrainConfig {
        epochs: 1,
        batch_size: BATCH,
        optimizer: Optimizer::ADAMW,
        lr: 2e-5,
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
    let mut best = 0f64;
    for epoch in 0..4 {
        let start = std::time::Instant::now();
        train(
            model.as_mut(),
            &Subset::all(&data),
            None,
            &config,
            &ctx,
            TrainHooks::default(),
        )?;
        let secs = start.elapsed().as_secs_f64();
        let tps = (BATCH * batches * TOKENS) as f64 / secs;
        println!(
            "epoch {epoch}{}: {secs:.2} s, {tps:.0} tokens/s, {:.3} s/step",
            if epoch == 0 { " (warm-up)" } else { "" },
            secs / batches as f64
        );
        if epoch > 0 {
            best = best.max(tps);
        }
    }
    println!("minilm-train tokens/s {best:.0}");
    Ok(())
}
