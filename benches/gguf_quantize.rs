//! GGUF export throughput: file-to-file `write_gguf` (safetensors f32 → GGUF) for Q8_0,
//! Q4_0 and Q4_K, in seconds per GiB of f32 input, plus candle's single-threaded
//! `QTensor::quantize` on one tensor as the reference the 2-thread row split is measured
//! against. The peer (gguf-py's numpy quantizer) is `scripts/bench_gguf.sh`.
//!
//! ```text
//! cargo bench --bench gguf_quantize                      # ~1 GiB input under /tmp, deleted after
//! BENCH_GIB=0.25 BENCH_TYPES=q8_0 cargo bench --bench gguf_quantize
//! BENCH_KEEP=1 cargo bench --bench gguf_quantize         # keep the input for scripts/bench_gguf.sh
//! cargo bench --bench gguf_quantize -- convert IN.safetensors OUT.gguf q4_k
//! cargo bench --bench gguf_quantize -- input             # only write the 1 GiB input
//! ```
//!
//! The input is `BENCH_GIB` × 16 tensors of 4096 × 4096 f32 (64 MiB each) drawn from a
//! fixed-seed ChaCha8 stream (sums of four uniforms, σ ≈ 0.058), written to
//! `/tmp/whittle-gguf-bench.safetensors`. Outputs go to `/tmp/whittle-gguf-bench.<type>.gguf`
//! and are deleted after timing. `convert` writes one GGUF (every float tensor with ndim ≥ 2
//! quantized) and its JSON report next to it (`OUT.gguf.report.json`), for
//! `scripts/check_gguf.py`. Like the `whittle` binary, this bench uses mimalloc.

/// The same allocator as the `whittle` binary (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use whittle::compress::formats::gguf::{write_gguf, GgufReport, GgufType};
use whittle::compress::formats::safetensors::{
    encode_f32, write_safetensors, Dtype, SafetensorsFile, TensorSpec,
};
use whittle::compress::progress::Ctx;

const ROWS: usize = 4096;
const COLS: usize = 4096;
const INPUT: &str = "/tmp/whittle-gguf-bench.safetensors";
const GIB: f64 = (1u64 << 30) as f64;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn tensor_values(seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..ROWS * COLS)
        .map(|_| (0..4).map(|_| rng.gen_range(-0.05f32..0.05)).sum())
        .collect()
}

/// Writes the input file unless one of the right size is already there.
fn make_input(n_tensors: usize) -> BoxResult<()> {
    let expected = (n_tensors * ROWS * COLS * 4) as u64;
    if let Ok(h) = whittle::compress::formats::safetensors::read_header(INPUT) {
        if h.data_len() as u64 == expected {
            return Ok(());
        }
    }
    let start = Instant::now();
    let specs: Vec<TensorSpec> = (0..n_tensors)
        .map(|i| TensorSpec::new(format!("layers.{i}.weight"), Dtype::F32, vec![ROWS, COLS]))
        .collect();
    let w = BufWriter::new(File::create(INPUT)?);
    write_safetensors(w, &BTreeMap::new(), &specs, |i, w| {
        w.write_all(&encode_f32(&tensor_values(42 + i as u64)))?;
        Ok(())
    })?;
    eprintln!(
        "wrote {INPUT}: {n_tensors} × [{ROWS}, {COLS}] f32 ({:.2} GiB) in {:.1} s",
        expected as f64 / GIB,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// CPU seconds (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` (Linux; 0 elsewhere). Unlike wall time it barely moves when other
/// processes compete for the cores.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // Fields 14 and 15 (utime, stime) in clock ticks of 1/100 s; `rest` starts at field 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Quantizes `selected` of `input` into `out`, returning the reports and the seconds taken.
fn convert(
    input: &SafetensorsFile,
    selected: &[String],
    ty: GgufType,
    out: &Path,
) -> BoxResult<(Vec<GgufReport>, f64)> {
    let cancel = AtomicBool::new(false);
    let progress = |_: f64, _: &str| {};
    let ctx = Ctx::new(&progress, &cancel);
    let meta = BTreeMap::from([(
        "whittle.job".to_string(),
        format!("{{\"bench\":\"gguf_quantize\",\"type\":\"{ty}\"}}"),
    )]);
    let start = Instant::now();
    let mut w = BufWriter::new(File::create(out)?);
    let reports = write_gguf(input, selected, ty, &meta, &mut w, &ctx)?;
    drop(w);
    Ok((reports, start.elapsed().as_secs_f64()))
}

/// `convert IN OUT TYPE`: quantize every float tensor of ndim ≥ 2, write the report JSON.
fn convert_cmd(args: &[String]) -> BoxResult<()> {
    let [input, out, ty] = args else {
        return Err("usage: convert IN.safetensors OUT.gguf TYPE".into());
    };
    let ty: GgufType = ty.parse()?;
    let input = SafetensorsFile::open(input)?;
    let selected: Vec<String> = input
        .header()
        .tensors
        .iter()
        .filter(|t| t.dtype.is_float() && t.shape.len() >= 2)
        .map(|t| t.name.clone())
        .collect();
    let start_cpu = cpu_seconds();
    let (reports, secs) = convert(&input, &selected, ty, Path::new(out))?;
    let cpu = cpu_seconds() - start_cpu;
    std::fs::write(
        format!("{out}.report.json"),
        serde_json::to_vec_pretty(&reports)?,
    )?;
    println!(
        "{out}: {ty}, {} tensors, {secs:.3} s wall, {cpu:.2} s cpu",
        reports.len()
    );
    Ok(())
}

fn bench() -> BoxResult<()> {
    let gib: f64 = std::env::var("BENCH_GIB").map_or(Ok(1.0), |v| v.parse())?;
    let types: Vec<GgufType> = std::env::var("BENCH_TYPES")
        .unwrap_or_else(|_| "q8_0,q4_0,q4_k".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let n_tensors = ((gib * 16.0).round() as usize).max(1);
    make_input(n_tensors)?;
    let input = SafetensorsFile::open(INPUT)?;
    let in_gib = input.header().data_len() as f64 / GIB;
    let selected: Vec<String> = input
        .header()
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .collect();

    // Reference: candle alone, one thread, one 64 MiB tensor (no file I/O, no error stats).
    let values = input.to_f32(&input.header().tensors[0])?;
    let t = Tensor::from_vec(values, (ROWS, COLS), &Device::Cpu)?;
    println!("input {INPUT}: {n_tensors} × [{ROWS}, {COLS}] f32 = {in_gib:.3} GiB");
    println!("type   write_gguf: wall s/GiB  cpu s/GiB | candle 1-thread quantize: wall s/GiB  cpu s/GiB | out MiB  bits/w  mean SQNR dB");
    for ty in types {
        let (start, start_cpu) = (Instant::now(), cpu_seconds());
        let q = QTensor::quantize(&t, ty.ggml_dtype())?;
        let t_gib = (ROWS * COLS * 4) as f64 / GIB;
        let single = start.elapsed().as_secs_f64() / t_gib;
        let single_cpu = (cpu_seconds() - start_cpu) / t_gib;
        drop(q);
        let out = format!("/tmp/whittle-gguf-bench.{ty}.gguf");
        let start_cpu = cpu_seconds();
        let (reports, secs) = convert(&input, &selected, ty, Path::new(&out))?;
        let cpu = cpu_seconds() - start_cpu;
        let size = std::fs::metadata(&out)?.len() as f64;
        std::fs::remove_file(&out)?;
        let sqnr: f64 =
            reports.iter().filter_map(|r| r.sqnr_db).sum::<f64>() / reports.len() as f64;
        println!(
            "{:<6} {:>22.2} {:>10.2} | {:>36.2} {:>10.2} | {:>7.1} {:>7.3} {:>13.2}",
            ty.as_str(),
            secs / in_gib,
            cpu / in_gib,
            single,
            single_cpu,
            size / (1 << 20) as f64,
            reports[0].bits_per_weight,
            sqnr
        );
    }
    if std::env::var("BENCH_KEEP").is_err() {
        std::fs::remove_file(INPUT)?;
    }
    Ok(())
}

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("convert") => convert_cmd(&args[1..]),
        Some("input") => make_input(16),
        _ => bench(),
    }
}
