//! Evaluation throughput of a llama model: tokens/s of the forward pass over windows of
//! `BENCH_CONTEXT` (512) tokens, and the whole text evaluation (forward + log-softmax + KL
//! against a reference, one pass) — the engine's half of `scripts/check_smollm2.py`'s
//! comparison with transformers (which also runs the PyTorch side on the same windows):
//!
//! ```text
//! scripts/fetch_transformers.sh
//! RAYON_NUM_THREADS=2 cargo bench --bench text_eval
//! ```
//!
//! The model is SmolLM2-135M imported from its GGUF (`target/fixtures/smollm2`), the text the
//! Debian fortunes (`target/fixtures/fortunes`). `BENCH_WINDOWS` (default 4) sets the windows.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use whittle::compress::engine::data::{Batch, Dataset, TextEncoder};
use whittle::compress::engine::text_eval::{evaluate_text, TextEvalParams};
use whittle::compress::engine::{families, Mode};
use whittle::compress::formats::gguf_import::import_gguf;
use whittle::compress::formats::safetensors::SafetensorsFile;
use whittle::compress::progress::Ctx;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn gemm_rates() -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::{Device, Tensor};
    for (m, k, n) in [
        (512, 576, 576),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 49152),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        for _ in 0..3 {
            a.matmul(&w.t()?)?;
        }
        let started = Instant::now();
        for _ in 0..10 {
            a.matmul(&w.t()?)?;
        }
        let dt = started.elapsed().as_secs_f64() / 10.0;
        println!(
            "candle matmul {m}x{k} . {k}x{n}: {:.0} GFLOP/s",
            2.0 * (m * k * n) as f64 / dt / 1e9
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("BENCH_GEMM").is_some() {
        return gemm_rates();
    }
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures");
    let gguf = root.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tempfile::tempdir()?;
    let weights = dir.path().join("model.safetensors");
    let started = Instant::now();
    let imported = import_gguf(
        &gguf,
        &BTreeMap::new(),
        &mut std::fs::File::create(&weights)?,
    )?;
    println!("import: {:.2} s", started.elapsed().as_secs_f64());
    let tokenizer = TextEncoder::from_bytes(imported.tokenizer.unwrap().to_string().as_bytes())?;
    let file = SafetensorsFile::open(&weights)?;
    let net = families::load(&imported.config, &file, Some(Arc::new(tokenizer)))?;

    let context = env("BENCH_CONTEXT", 512);
    let windows = env("BENCH_WINDOWS", 4);
    let mut text = String::new();
    for f in ["wisdom", "people", "science", "politics", "work"] {
        text.push_str(
            &std::fs::read_to_string(root.join("fortunes").join(f))?.replace("\n%\n", "\n\n"),
        );
    }
    let data = Dataset::from_text(text.as_bytes())?;
    let stream = net
        .text_input()
        .unwrap()
        .encoder
        .encode_stream(data.documents().unwrap())?;

    // The forward pass alone, measured as scripts/bench_text_eval.py measures PyTorch's: the
    // best of two passes over the same windows (the first one warms the allocator up), the
    // logits left in the tensor.
    let mut seconds = f64::INFINITY;
    for _ in 0..env("BENCH_PASSES", 2) {
        let mut pass = 0f64;
        for w in 0..windows {
            let ids: Vec<u32> = stream[w * context..(w + 1) * context].to_vec();
            let batch = Batch {
                x: candle_core::Tensor::from_vec(ids, (1, context), &candle_core::Device::Cpu)?,
                mask: None,
                segments: None,
                y: None,
                labels: None,
                len: 1,
                indices: vec![0],
            };
            let started = Instant::now();
            let out = net.forward(&batch, Mode::Eval)?;
            pass += started.elapsed().as_secs_f64();
            assert_eq!(out.dims(), [1, context, 49152]);
        }
        seconds = seconds.min(pass);
    }
    println!(
        "forward: {:.0} tokens/s ({windows} windows of {context})",
        (windows * context) as f64 / seconds
    );

    if std::env::var_os("BENCH_LINEARS").is_some() {
        // The linear layers of one window alone: every weight matrix times [context, in].
        let mut secs = 0f64;
        for p in net.params() {
            let shape = &p.spec().shape;
            if shape.len() != 2 || p.name().contains("embed_tokens") {
                continue;
            }
            let x = candle_core::Tensor::randn(
                0f32,
                1.0,
                (context, shape[1]),
                &candle_core::Device::Cpu,
            )?;
            let w = p.var().as_tensor().detach();
            let started = Instant::now();
            let _ = whittle::compress::engine::sequential::linear::Linear.forward(&x, &w, None)?;
            secs += started.elapsed().as_secs_f64();
        }
        println!("linear layers of one window: {secs:.3} s");
    }
    if std::env::var_os("BENCH_FORWARD_ONLY").is_some() {
        return Ok(());
    }
    // The whole evaluation against a reference (the same model twice: the cost of both).
    let cancel = AtomicBool::new(false);
    let ctx = Ctx::new(&|_, _| {}, &cancel);
    let params = TextEvalParams {
        max_tokens: windows * (context - 1),
        context,
        stride: context,
        save_outputs: false,
    };
    let started = Instant::now();
    let e = evaluate_text(net.as_ref(), Some(net.as_ref()), &data, &params, 1, &ctx)?;
    let total = started.elapsed().as_secs_f64();
    println!(
        "evaluation with a reference: {total:.2} s for {} tokens ({:.0} tokens/s through both models)",
        windows * (context - 1),
        (windows * context) as f64 / total
    );
    println!("{}", serde_json::to_string(&e.model)?);
    Ok(())
}
