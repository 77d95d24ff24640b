//! Pruning from calibration statistics.
//!
//! - **Wanda** (Sun et al. 2023): score `|W_ij| · ‖x_j‖₂` (the weight times the norm of the
//!   input feature it multiplies over the calibration tokens), compared within each output
//!   row; the lowest scores go. No weight update.
//! - **SparseGPT** (Frantar & Alistarh 2023): GPTQ's sweep with pruning in place of rounding:
//!   per block of columns, the weights with the lowest `w² / [H⁻¹]_jj²` are chosen, and each
//!   column's removal error is spread over the columns not yet visited through the upper
//!   Cholesky factor of the damped inverse Hessian, so the remaining weights compensate.
//!
//! Both take a per-layer sparsity (the fraction of the row's weights removed; SparseGPT
//! chooses within each block of columns across all rows, as the reference does) or N:M
//! (n of every m consecutive weights of a row kept).

use crate::compress::calib::damped_inverse;
use crate::compress::{Error, Result};

/// How many weights go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// This fraction of each layer's weights, in [0, 1).
    Sparsity(f64),
    /// Keep `n` of every `m` consecutive weights of a row.
    NM {
        /// Kept per group.
        n: usize,
        /// Group length.
        m: usize,
    },
}

impl Target {
    fn check(&self, cols: usize) -> Result<()> {
        match *self {
            Target::Sparsity(s) if (0.0..1.0).contains(&s) => Ok(()),
            Target::Sparsity(s) => Err(Error::invalid("sparsity", format!("{s} is not in [0, 1)"))),
            Target::NM { n, m } if n < m && m > 0 && cols.is_multiple_of(m) => Ok(()),
            Target::NM { n, m } => Err(Error::invalid(
                "m",
                format!("{n}:{m} does not fit rows of {cols} weights (m must divide them, n < m)"),
            )),
        }
    }
}

/// The `k` smallest of `scores` (indices), ties by index.
fn smallest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            scores[a].total_cmp(&scores[b]).then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx
}

/// Wanda on `[rows, cols]` weights with the input norms `norms` (one per column).
pub fn wanda(
    w: &[f32],
    rows: usize,
    cols: usize,
    norms: &[f64],
    target: Target,
) -> Result<Vec<f32>> {
    target.check(cols)?;
    if norms.len() != cols || w.len() != rows * cols {
        return Err(Error::Internal(format!(
            "wanda: {} norms and {} weights for [{rows}, {cols}]",
            norms.len(),
            w.len()
        )));
    }
    let mut out = w.to_vec();
    for r in 0..rows {
        let row = &mut out[r * cols..(r + 1) * cols];
        let scores: Vec<f32> = row
            .iter()
            .zip(norms)
            .map(|(x, n)| (f64::from(x.abs()) * n) as f32)
            .collect();
        match target {
            Target::Sparsity(s) => {
                for i in smallest(&scores, (cols as f64 * s) as usize) {
                    row[i] = 0.0;
                }
            }
            Target::NM { n, m } => {
                for start in (0..cols).step_by(m) {
                    for i in smallest(&scores[start..start + m], m - n) {
                        row[start + i] = 0.0;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// SparseGPT of `[rows, cols]` weights with the Hessian `h` (`cols × cols`), damping `damp`,
/// `block_size` columns per mask selection and lazy update. Returns the pruned, updated
/// weights and the damping used.
pub fn sparsegpt(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    target: Target,
    damp: f64,
    block_size: usize,
) -> Result<(Vec<f32>, f64)> {
    target.check(cols)?;
    if w.len() != rows * cols || block_size == 0 {
        return Err(Error::Internal(format!(
            "sparsegpt: {} weights for [{rows}, {cols}], block size {block_size}",
            w.len()
        )));
    }
    let block = match target {
        // N:M groups must not straddle blocks.
        Target::NM { m, .. } => block_size.div_ceil(m) * m,
        Target::Sparsity(_) => block_size,
    };
    let mut hd = h.to_vec();
    let (u, damp, _) = damped_inverse(&mut hd, cols, damp)?;
    // Column-major working copy.
    let mut wt = vec![0f32; rows * cols];
    for c in 0..cols {
        for r in 0..rows {
            // Columns never active on the calibration data keep their weights (no error
            // flows through them); the reference zeroes them.
            wt[c * rows + r] = w[r * cols + c];
        }
    }
    let mut err = vec![0f32; block * rows];
    let mut pruned = vec![false; rows * cols]; // column-major, like wt
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + block).min(cols);
        // The block's mask from w² / d² (d = diag of U).
        let score = |wt: &[f32], c: usize, r: usize| {
            let d = u[c * cols + c] as f32;
            let x = wt[c * rows + r];
            x * x / (d * d)
        };
        match target {
            Target::Sparsity(s) => {
                let scores: Vec<f32> = (i1..i2)
                    .flat_map(|c| (0..rows).map(move |r| (c, r)))
                    .map(|(c, r)| score(&wt, c, r))
                    .collect();
                for k in smallest(&scores, (scores.len() as f64 * s) as usize) {
                    let (c, r) = (i1 + k / rows, k % rows);
                    pruned[c * rows + r] = true;
                }
            }
            Target::NM { .. } => {} // chosen as the sweep reaches each group (below)
        }
        for i in i1..i2 {
            if let Target::NM { n, m } = target {
                if (i - i1) % m == 0 {
                    for r in 0..rows {
                        let scores: Vec<f32> = (i..i + m).map(|c| score(&wt, c, r)).collect();
                        for k in smallest(&scores, m - n) {
                            pruned[(i + k) * rows + r] = true;
                        }
                    }
                }
            }
            let d = u[i * cols + i] as f32;
            let (done, rest) = wt.split_at_mut((i + 1) * rows);
            let col = &mut done[i * rows..];
            let e = &mut err[(i - i1) * rows..(i - i1 + 1) * rows];
            for r in 0..rows {
                if pruned[i * rows + r] {
                    e[r] = col[r] / d;
                    col[r] = 0.0;
                } else {
                    e[r] = 0.0;
                }
            }
            for j in i + 1..i2 {
                let f = u[i * cols + j] as f32;
                if f != 0.0 {
                    let t = &mut rest[(j - i - 1) * rows..(j - i) * rows];
                    for (t, ev) in t.iter_mut().zip(e.iter()) {
                        *t -= f * ev;
                    }
                }
            }
        }
        if i2 < cols {
            let (_, rest) = wt.split_at_mut(i2 * rows);
            for j in i2..cols {
                let t = &mut rest[(j - i2) * rows..(j - i2 + 1) * rows];
                for i in i1..i2 {
                    let f = u[i * cols + j] as f32;
                    if f != 0.0 {
                        let e = &err[(i - i1) * rows..(i - i1 + 1) * rows];
                        for (t, ev) in t.iter_mut().zip(e) {
                            *t -= f * ev;
                        }
                    }
                }
            }
        }
        i1 = i2;
    }
    let mut out = vec![0f32; rows * cols];
    for c in 0..cols {
        for r in 0..rows {
            out[r * cols + c] = if pruned[c * rows + r] {
                0.0
            } else {
                wt[c * rows + r]
            };
        }
    }
    Ok((out, damp))
}

/// Magnitude pruning at the same target, per row (the baseline both are compared with).
pub fn magnitude(w: &[f32], rows: usize, cols: usize, target: Target) -> Result<Vec<f32>> {
    wanda(w, rows, cols, &vec![1.0; cols], target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calib::relative_output_error;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn problem(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<f64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut gram = vec![0f64; cols * cols];
        for _ in 0..256 {
            let z: Vec<f64> = (0..3).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Vec<f64> = (0..cols)
                .map(|c| {
                    let loud = if c % 5 == 0 { 8.0 } else { 1.0 };
                    loud * (z[c % 3] + 0.2 * rng.gen_range(-1.0..1.0))
                })
                .collect();
            for i in 0..cols {
                for j in 0..cols {
                    gram[i * cols + j] += x[i] * x[j];
                }
            }
        }
        (w, gram)
    }

    fn zeros(w: &[f32]) -> usize {
        w.iter().filter(|v| **v == 0.0).count()
    }

    #[test]
    fn wanda_removes_the_lowest_scores_of_each_row() {
        // Row [4, 3, 2, 1] with norms [0.1, 1, 1, 10]: scores 0.4, 3, 2, 10.
        let w = vec![4.0, 3.0, 2.0, 1.0];
        let out = wanda(&w, 1, 4, &[0.1, 1.0, 1.0, 10.0], Target::Sparsity(0.5)).unwrap();
        assert_eq!(out, vec![0.0, 3.0, 0.0, 1.0]);
        let out = wanda(&w, 1, 4, &[0.1, 1.0, 1.0, 10.0], Target::NM { n: 1, m: 2 }).unwrap();
        assert_eq!(out, vec![0.0, 3.0, 0.0, 1.0]);
    }

    #[test]
    fn exact_counts_and_n_m_patterns() {
        let (rows, cols) = (8, 32);
        let (w, gram) = problem(rows, cols, 1);
        let norms: Vec<f64> = (0..cols).map(|i| gram[i * cols + i].sqrt()).collect();
        let a = wanda(&w, rows, cols, &norms, Target::Sparsity(0.5)).unwrap();
        assert_eq!(zeros(&a), rows * cols / 2);
        let (b, _) = sparsegpt(&w, rows, cols, &gram, Target::Sparsity(0.5), 0.01, 8).unwrap();
        assert_eq!(zeros(&b), rows * cols / 2);
        for out in [
            wanda(&w, rows, cols, &norms, Target::NM { n: 2, m: 4 }).unwrap(),
            sparsegpt(&w, rows, cols, &gram, Target::NM { n: 2, m: 4 }, 0.01, 6)
                .unwrap()
                .0,
        ] {
            for r in 0..rows {
                for g in 0..cols / 4 {
                    let kept = out[r * cols + g * 4..r * cols + g * 4 + 4]
                        .iter()
                        .filter(|v| **v != 0.0)
                        .count();
                    assert_eq!(kept, 2, "row {r} group {g}");
                }
            }
        }
    }

    #[test]
    fn second_order_and_activation_aware_beat_magnitude_on_the_output() {
        let (rows, cols) = (16, 40);
        let (w, gram) = problem(rows, cols, 7);
        let norms: Vec<f64> = (0..cols).map(|i| gram[i * cols + i].sqrt()).collect();
        for t in [Target::Sparsity(0.5), Target::NM { n: 2, m: 4 }] {
            let e_mag =
                relative_output_error(&w, &magnitude(&w, rows, cols, t).unwrap(), &gram, cols);
            let e_wanda =
                relative_output_error(&w, &wanda(&w, rows, cols, &norms, t).unwrap(), &gram, cols);
            let (s, _) = sparsegpt(&w, rows, cols, &gram, t, 0.01, 8).unwrap();
            let e_sgpt = relative_output_error(&w, &s, &gram, cols);
            assert!(e_wanda < e_mag, "{t:?}: wanda {e_wanda} magnitude {e_mag}");
            assert!(
                e_sgpt < 0.5 * e_mag,
                "{t:?}: sparsegpt {e_sgpt} magnitude {e_mag}"
            );
        }
    }

    #[test]
    fn bad_targets_are_refused() {
        let w = vec![1.0; 6];
        assert!(wanda(&w, 1, 6, &[1.0; 6], Target::NM { n: 2, m: 4 }).is_err());
        assert!(wanda(&w, 1, 6, &[1.0; 6], Target::Sparsity(1.0)).is_err());
    }
}
