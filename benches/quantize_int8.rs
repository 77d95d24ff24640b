//! int8 symmetric per-channel quantization speed (1 GiB of f32 in memory, and file → file
//! against `cp`), plus how much the clipping search lowers int4 group-64 error.
//! Prints one JSON object per line. Sizes: WHITTLE_BENCH_ROWS × WHITTLE_BENCH_COLS
//! (default 16384 × 16384 = 1 GiB), WHITTLE_BENCH_REPEAT (default 5), WHITTLE_BENCH_DIR
//! for the file test (default the system temp dir; skipped when WHITTLE_BENCH_FILE=0).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use whittle::compress::formats::packed::{quantize_file, QuantizeFile};
use whittle::compress::formats::safetensors::{
    write_safetensors, Dtype, SafetensorsFile, TensorSpec,
};
use whittle::compress::progress::Ctx;
use whittle::compress::quant::{
    quantize_symmetric_rows, quantize_tensor, Granularity, Method, Quantizer,
};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fast deterministic pseudo-Gaussian-ish values (sum of two uniforms, xorshift).
fn fill(values: &mut [f32], seed: u64) {
    let mut s = seed | 1;
    for v in values.iter_mut() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let a = (s & 0xffff) as f32 / 65536.0;
        let b = ((s >> 16) & 0xffff) as f32 / 65536.0;
        *v = (a + b - 1.0) * 0.05;
    }
}

fn best_of(repeat: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut times = Vec::new();
    for _ in 0..repeat {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    (times[0], times[times.len() / 2])
}

fn main() {
    let rows = env("WHITTLE_BENCH_ROWS", 16384);
    let cols = env("WHITTLE_BENCH_COLS", 16384);
    let repeat = env("WHITTLE_BENCH_REPEAT", 5).max(1);
    let n = rows * cols;
    let gib = (n * 4) as f64 / (1u64 << 30) as f64;
    let mut values = vec![0f32; n];
    fill(&mut values, 42);
    let mut codes = vec![0u8; n];
    let mut scales = vec![0f32; rows];
    for threads in [1usize, 2] {
        // Reused output buffers (pages already mapped): the kernel's own speed.
        let (best, median) = best_of(repeat, || {
            quantize_symmetric_rows(&values, cols, 8, &mut codes, &mut scales, threads).unwrap();
        });
        println!(
            "{{\"bench\":\"int8_per_channel_in_memory\",\"impl\":\"whittle\",\"rows\":{rows},\"cols\":{cols},\"gib\":{gib:.3},\"threads\":{threads},\"fresh_output\":false,\"best_s\":{best:.4},\"median_s\":{median:.4}}}"
        );
        // Fresh output allocation each time (what torch/numpy pay): plain, and as the
        // service's quantizer allocates it (huge pages advised).
        for huge in [false, true] {
            let (best, median) = best_of(repeat, || {
                let mut c = vec![0u8; n];
                if huge {
                    whittle::compress::parallel::advise_huge_pages(&mut c);
                }
                let mut s = vec![0f32; rows];
                quantize_symmetric_rows(&values, cols, 8, &mut c, &mut s, threads).unwrap();
                std::hint::black_box((&c, &s));
            });
            println!(
                "{{\"bench\":\"int8_per_channel_in_memory\",\"impl\":\"whittle\",\"rows\":{rows},\"cols\":{cols},\"gib\":{gib:.3},\"threads\":{threads},\"fresh_output\":true,\"huge_pages\":{huge},\"best_s\":{best:.4},\"median_s\":{median:.4}}}"
            );
        }
    }
    // Plain single-threaded scalar loop for reference (the "plain C loop").
    let (best, median) = best_of(repeat, || {
        for ((row, c), s) in values
            .chunks(cols)
            .zip(codes.chunks_mut(cols))
            .zip(scales.iter_mut())
        {
            let amax = row.iter().fold(0f32, |a, x| a.max(x.abs()));
            *s = amax / 127.0;
            let inv = if *s > 0.0 { 1.0 / *s } else { 0.0 };
            for (c, &x) in c.iter_mut().zip(row) {
                *c = ((x * inv).round_ties_even().clamp(-127.0, 127.0) as i32 + 128) as u8;
            }
        }
    });
    println!(
        "{{\"bench\":\"int8_per_channel_in_memory\",\"impl\":\"naive_rust_loop\",\"rows\":{rows},\"cols\":{cols},\"gib\":{gib:.3},\"threads\":1,\"fresh_output\":false,\"best_s\":{best:.4},\"median_s\":{median:.4}}}"
    );
    drop(codes);

    if env("WHITTLE_BENCH_FILE", 1) != 0 {
        file_to_file(&values, rows, cols, repeat.min(3));
    }
    drop(values);
    search_quality();
}

/// safetensors (f32, 16 tensors) → packed int8 per-channel, against `cp` of the input.
fn file_to_file(values: &[f32], rows: usize, cols: usize, repeat: usize) {
    let dir = std::env::var("WHITTLE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let input = dir.join(format!("whittle-bench-{}.safetensors", std::process::id()));
    let copy = dir.join(format!("whittle-bench-{}.copy", std::process::id()));
    let output = dir.join(format!("whittle-bench-{}.packed", std::process::id()));
    let parts = 16.min(rows);
    let per = rows / parts;
    let specs: Vec<TensorSpec> = (0..parts)
        .map(|i| TensorSpec::new(format!("layer{i}.weight"), Dtype::F32, vec![per, cols]))
        .collect();
    {
        let f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        write_safetensors(f, &BTreeMap::new(), &specs, |i, w| {
            let chunk = &values[i * per * cols..(i + 1) * per * cols];
            // Encode in 4 MiB pieces to keep memory flat.
            for piece in chunk.chunks(1 << 20) {
                let bytes: Vec<u8> = piece.iter().flat_map(|v| v.to_le_bytes()).collect();
                w.write_all(&bytes)?;
            }
            Ok(())
        })
        .unwrap();
    }
    let in_bytes = std::fs::metadata(&input).unwrap().len();
    let (cp_best, cp_median) = best_of(repeat, || {
        let st = std::process::Command::new("cp")
            .arg(&input)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success());
    });
    let file = SafetensorsFile::open(&input).unwrap();
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let method = Method::Uniform {
        bits: 8,
        symmetric: true,
        granularity: Granularity::PerChannel,
        search: false,
    };
    let progress = |_: f64, _: &str| {};
    let cancel = AtomicBool::new(false);
    let ctx = Ctx::new(&progress, &cancel);
    let mut out_bytes = 0;
    let (q_best, q_median) = best_of(repeat, || {
        let f = std::fs::File::create(&output).unwrap();
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        quantize_file(
            &file,
            &QuantizeFile {
                selected: &names,
                quantizer: &Quantizer {
                    method,
                    importance: Default::default(),
                },
                seed: 0,
                packed: true,
                metadata: &BTreeMap::new(),
                precomputed: None,
                entropy: Default::default(),
            },
            &mut w,
            &ctx,
        )
        .unwrap();
        drop(w);
        out_bytes = std::fs::metadata(&output).unwrap().len();
    });
    println!(
        "{{\"bench\":\"file_to_file_int8_packed\",\"in_bytes\":{in_bytes},\"out_bytes\":{out_bytes},\"whittle_best_s\":{q_best:.4},\"whittle_median_s\":{q_median:.4},\"cp_best_s\":{cp_best:.4},\"cp_median_s\":{cp_median:.4},\"ratio_to_cp\":{:.2}}}",
        q_best / cp_best
    );
    for p in [&input, &copy, &output] {
        let _ = std::fs::remove_file(p);
    }
}

/// int4 group-64 MSE with and without the clipping search on synthetic "real-like" rows.
fn search_quality() {
    use rand::{Rng, SeedableRng};
    let (rows, cols) = (256usize, 1024usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut gauss = || {
        let (u, v): (f64, f64) = (rng.gen::<f64>().max(1e-12), rng.gen());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    };
    let gaussian: Vec<f32> = (0..rows * cols).map(|_| gauss()).collect();
    let product: Vec<f32> = gaussian
        .chunks(2)
        .flat_map(|p| {
            // The product of two Gaussians: peaked at 0 with heavy tails.
            let e = p[0] * p[1];
            [e, -e]
        })
        .collect();
    let student3: Vec<f32> = gaussian
        .iter()
        .map(|&x| {
            let chi: f32 = (0..3).map(|_| gauss().powi(2)).sum();
            x / (chi / 3.0).sqrt().max(0.05)
        })
        .collect();
    for (dist, data) in [
        ("gaussian", &gaussian),
        ("gauss_product", &product),
        ("student_t3", &student3),
    ] {
        for symmetric in [true, false] {
            let mut mse = [0f64; 2];
            let mut secs = [0f64; 2];
            for (k, search) in [false, true].into_iter().enumerate() {
                let m = Method::Uniform {
                    bits: 4,
                    symmetric,
                    granularity: Granularity::PerGroup { group_size: 64 },
                    search,
                };
                let t = Instant::now();
                let (_, stats) = quantize_tensor(data, &[rows, cols], &m, 0).unwrap();
                secs[k] = t.elapsed().as_secs_f64();
                mse[k] = stats.mse();
            }
            println!(
                "{{\"bench\":\"int4_g64_search\",\"data\":\"{dist}\",\"symmetric\":{symmetric},\"mse_rtn\":{:.6e},\"mse_search\":{:.6e},\"mse_reduction_pct\":{:.1},\"rtn_s\":{:.3},\"search_s\":{:.3},\"numel\":{}}}",
                mse[0], mse[1], 100.0 * (1.0 - mse[1] / mse[0]), secs[0], secs[1], rows * cols
            );
        }
    }
}
