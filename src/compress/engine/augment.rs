//! Data augmentation of training batches: whole-pixel translation of images (the input
//! jitter of Hinton et al. 2015), drawn from the training loop's seeded generator.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::compress::engine::data::Batch;
use crate::compress::{Error, Result};

/// Data augmentation of training batches, drawn from the training loop's seeded generator
/// (reproducible, and resumed with it from a checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Each sample is shifted by whole pixels, `dy` and `dx` drawn uniformly from
    /// `−translate ..= translate` (every channel alike), the uncovered border filled with 0:
    /// the input jitter of Hinton et al. 2015. Samples must be images, `[H, W]` or
    /// `[C, H, W]`.
    pub translate: usize,
}

impl Augment {
    /// Checks that samples of `feature_shape` can be augmented so.
    pub fn check(&self, feature_shape: &[usize]) -> Result<()> {
        match feature_shape {
            [.., h, w] if feature_shape.len() <= 3 => {
                if self.translate >= (*h).min(*w) {
                    return Err(Error::invalid(
                        "augment.translate",
                        format!(
                            "a shift of {} pixels is not smaller than the {h}×{w} images",
                            self.translate
                        ),
                    ));
                }
                Ok(())
            }
            _ => Err(Error::invalid(
                "augment.translate",
                format!(
                    "translation needs image samples, [H, W] or [C, H, W]; this dataset's samples are {feature_shape:?}"
                ),
            )),
        }
    }

    /// The batch with every sample shifted (see [`Augment::translate`]).
    pub fn apply(&self, mut batch: Batch, rng: &mut impl rand::Rng) -> Result<Batch> {
        let t = self.translate as i64;
        if t == 0 {
            return Ok(batch);
        }
        let dims = batch.x.dims().to_vec();
        let (n, h, w) = match dims[..] {
            [n, .., h, w] if dims.len() >= 3 => (n, h, w),
            _ => {
                return Err(Error::Internal(format!(
                    "translation of a batch of shape {dims:?}"
                )))
            }
        };
        let x = batch.x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        let plane = h * w;
        let per_sample = x.len() / n.max(1);
        for (src, dst) in x
            .chunks_exact(per_sample)
            .zip(out.chunks_exact_mut(per_sample))
        {
            let dy = rng.gen_range(-t..=t);
            let dx = rng.gen_range(-t..=t);
            // Destination columns [c0, c1) read source columns shifted by dx.
            let c0 = dx.max(0) as usize;
            let c1 = (w as i64 + dx.min(0)) as usize;
            for (sp, dp) in src.chunks_exact(plane).zip(dst.chunks_exact_mut(plane)) {
                for y in 0..h {
                    let sy = y as i64 - dy;
                    if sy < 0 || sy >= h as i64 {
                        continue;
                    }
                    let s_row = &sp[sy as usize * w..(sy as usize + 1) * w];
                    let d_row = &mut dp[y * w..(y + 1) * w];
                    let from = (c0 as i64 - dx) as usize;
                    d_row[c0..c1].copy_from_slice(&s_row[from..from + (c1 - c0)]);
                }
            }
        }
        batch.x = Tensor::from_vec(out, dims, batch.x.device())?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn translation_shifts_each_image_whole_and_fills_with_zero() {
        // Two samples of 2 channels of 3×4, values 1.. (no zeros of their own).
        let (n, c, h, w) = (2usize, 2usize, 3usize, 4usize);
        let x: Vec<f32> = (0..n * c * h * w).map(|i| i as f32 + 1.0).collect();
        let batch = Batch {
            x: Tensor::from_vec(x.clone(), (n, c, h, w), &candle_core::Device::Cpu).unwrap(),
            mask: None,
            segments: None,
            y: None,
            labels: None,
            len: n,
            indices: vec![0, 1],
        };
        let a = Augment { translate: 1 };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let out = a.apply(batch.clone(), &mut rng).unwrap();
        let got = out.x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for s in 0..n {
            // Exactly one (dy, dx) in −1..=1 explains the sample, the same for both channels.
            let sample = &got[s * c * h * w..(s + 1) * c * h * w];
            let fits = |dy: i64, dx: i64| {
                (0..c * h * w).all(|k| {
                    let (ch, y, xx) = (k / (h * w), (k / w) % h, k % w);
                    let (sy, sx) = (y as i64 - dy, xx as i64 - dx);
                    let want = if sy < 0 || sy >= h as i64 || sx < 0 || sx >= w as i64 {
                        0.0
                    } else {
                        x[s * c * h * w + ch * h * w + sy as usize * w + sx as usize]
                    };
                    sample[k] == want
                })
            };
            let found: Vec<(i64, i64)> = (-1..=1)
                .flat_map(|dy| (-1..=1).map(move |dx| (dy, dx)))
                .filter(|&(dy, dx)| fits(dy, dx))
                .collect();
            assert_eq!(found.len(), 1, "sample {s}: {sample:?}");
        }
        // Seeded: the same generator state gives the same shifts.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let again = a.apply(batch.clone(), &mut rng).unwrap();
        assert_eq!(
            again.x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got
        );
        // Over many draws every shift in the square occurs.
        let mut seen = std::collections::HashSet::new();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..200 {
            let o = a.apply(batch.clone(), &mut rng).unwrap();
            let v = o.x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            seen.insert(
                v[..c * h * w]
                    .iter()
                    .map(|f| f.to_bits())
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(seen.len(), 9);
        assert_eq!(
            Augment { translate: 0 }
                .apply(batch, &mut rng)
                .unwrap()
                .x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            x
        );
        // Only images, and shifts smaller than them.
        assert!(a.check(&[784]).is_err());
        assert!(a.check(&[1, 1, 28, 28]).is_err());
        assert!(a.check(&[28, 28]).is_ok() && a.check(&[3, 8, 8]).is_ok());
        assert!(Augment { translate: 8 }.check(&[1, 8, 8]).is_err());
    }
}
