//! Error statistics of a reconstruction (MSE, SQNR, max error), split over the thread budget.

#[allow(unused_imports)]
use super::*;

/// Error statistics of a reconstruction, computed on two threads for large tensors.
pub fn error_stats(values: &[f32], approx: &[f32]) -> ErrorStats {
    let serial = stats_serial;
    let n = values.len().min(approx.len());
    if n < PARALLEL_MIN {
        return serial(&values[..n], &approx[..n]);
    }
    let mid = n / 2;
    let (a, b) = std::thread::scope(|sc| {
        let h = sc.spawn(|| serial(&values[mid..n], &approx[mid..n]));
        let a = serial(&values[..mid], &approx[..mid]);
        (a, h.join())
    });
    let b = b.unwrap_or_else(|_| serial(&values[mid..n], &approx[mid..n]));
    merge_stats(a, b)
}

pub(super) fn merge_stats(a: ErrorStats, b: ErrorStats) -> ErrorStats {
    ErrorStats {
        signal: a.signal + b.signal,
        noise: a.noise + b.noise,
        max_abs: a.max_abs.max(b.max_abs),
        count: a.count + b.count,
    }
}

/// Eight f32 lanes per 4096-element chunk (vectorisable), summed into f64 per chunk.
pub(super) fn stats_serial(v: &[f32], a: &[f32]) -> ErrorStats {
    let mut s = ErrorStats::default();
    for (vc, ac) in v.chunks(4096).zip(a.chunks(4096)) {
        let (mut sig, mut noi, mut max) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        let (mut v8, mut a8) = (vc.chunks_exact(8), ac.chunks_exact(8));
        for (w, q) in (&mut v8).zip(&mut a8) {
            for l in 0..8 {
                let e = w[l] - q[l];
                sig[l] += w[l] * w[l];
                noi[l] += e * e;
                let ae = e.abs();
                max[l] = if ae > max[l] { ae } else { max[l] };
            }
        }
        for (&w, &q) in v8.remainder().iter().zip(a8.remainder()) {
            s.add(w, q);
            s.count -= 1;
        }
        s.signal += sig.iter().map(|&x| f64::from(x)).sum::<f64>();
        s.noise += noi.iter().map(|&x| f64::from(x)).sum::<f64>();
        s.max_abs = max.iter().fold(s.max_abs, |m, &x| m.max(f64::from(x)));
        s.count += vc.len().min(ac.len()) as u64;
    }
    s
}

/// Runs `f(first_block_index, values, codes, out_params)` over contiguous ranges of whole
/// blocks on up to `threads` threads. `per_block` is how many output parameters each
/// block produces.
pub(super) fn par_blocks<P: Send + Default + Clone>(
    values: &[f32],
    block_len: usize,
    codes: &mut [u8],
    threads: usize,
    f: impl Fn(usize, &[f32], &mut [u8], &mut [P]) + Sync,
) -> Vec<P> {
    let blocks = values.len().div_ceil(block_len.max(1));
    let mut params = vec![P::default(); blocks];
    let t = if values.len() < PARALLEL_MIN {
        1
    } else {
        threads.clamp(1, blocks.max(1))
    };
    if t <= 1 {
        f(0, values, codes, &mut params);
        return params;
    }
    let per = blocks.div_ceil(t);
    std::thread::scope(|sc| {
        let mut v = values;
        let mut c = &mut *codes;
        let mut p = &mut params[..];
        let f = &f;
        let mut first = 0;
        while !p.is_empty() {
            let nb = per.min(p.len());
            let ne = (nb * block_len).min(v.len());
            let (v0, v1) = v.split_at(ne);
            let (c0, c1) = std::mem::take(&mut c).split_at_mut(ne);
            let (p0, p1) = std::mem::take(&mut p).split_at_mut(nb);
            sc.spawn(move || f(first, v0, c0, p0));
            first += nb;
            v = v1;
            c = c1;
            p = p1;
        }
    });
    params
}
