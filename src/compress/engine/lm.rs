//! Language models' training objective: next-token cross-entropy over a batch of their own
//! text (padding left out), and the validation figures of a language model in training
//! (mean next-token loss and top-1 accuracy).

use candle_core::{DType, Tensor, D};

use super::data::{Batch, Subset};
use super::transformer::token_ids;
use super::{Mode, Network};
use crate::compress::progress::Ctx;
use crate::compress::{Error, Result};

/// Mean next-token cross-entropy of a language model's logits `[batch, seq, vocab]` over its
/// own input ids `[batch, seq]`: position `t` predicts token `t + 1`; targets that are
/// padding (mask 0) are left out. Returns the loss and the number of targets.
pub fn causal_lm_loss_and_count(logits: &Tensor, batch: &Batch) -> Result<(Tensor, usize)> {
    let ids = token_ids(&batch.x)?;
    let (_, s) = ids.dims2()?;
    if s < 2 {
        return Err(Error::DatasetMismatch(
            "language-model training needs documents of at least 2 tokens".into(),
        ));
    }
    let logits = logits.narrow(1, 0, s - 1)?;
    let targets = ids.narrow(1, 1, s - 1)?.contiguous()?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    let (picked, count) = match &batch.mask {
        Some(m) => {
            let w = m.narrow(1, 1, s - 1)?.to_dtype(DType::F32)?;
            let count = w.sum_all()?.to_scalar::<f32>()? as usize;
            (picked.mul(&w)?, count)
        }
        None => (picked, targets.elem_count()),
    };
    let loss = picked.sum_all()?.affine(-1.0 / count.max(1) as f64, 0.0)?;
    Ok((loss, count))
}

/// [`causal_lm_loss_and_count`]'s loss.
pub fn causal_lm_loss(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    Ok(causal_lm_loss_and_count(logits, batch)?.0)
}

/// A language model's mean next-token loss and top-1 accuracy on `data` (evaluation mode,
/// weighted by targets): the training loop's validation of causal-LM training.
pub fn lm_loss_and_accuracy(
    model: &dyn Network,
    data: &Subset<'_>,
    batch_size: usize,
    ctx: &Ctx<'_>,
) -> Result<(f64, f64)> {
    let (mut loss_sum, mut correct, mut targets) = (0f64, 0usize, 0usize);
    for batch in model.batches(data, batch_size) {
        ctx.check()?;
        let batch = batch?;
        let logits = model.forward(&batch, Mode::Eval)?;
        let (loss, count) = causal_lm_loss_and_count(&logits, &batch)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * count as f64;
        targets += count;
        let s = logits.dim(1)?;
        let pred = logits
            .narrow(1, 0, s - 1)?
            .argmax(2)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let ids = token_ids(&batch.x)?;
        let next = ids.narrow(1, 1, s - 1)?.flatten_all()?.to_vec1::<u32>()?;
        let keep: Vec<f32> = match &batch.mask {
            Some(m) => m
                .narrow(1, 1, s - 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            None => vec![1.0; next.len()],
        };
        correct += pred
            .iter()
            .zip(&next)
            .zip(&keep)
            .filter(|((p, y), k)| **k > 0.0 && p == y)
            .count();
    }
    if targets == 0 {
        return Err(Error::DatasetMismatch(
            "the validation documents have no token to predict".into(),
        ));
    }
    Ok((loss_sum / targets as f64, correct as f64 / targets as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_language_model_loss_leaves_padding_out() {
        use candle_core::{Device, Tensor};
        // Two sequences of 3 positions over a vocabulary of 4; the second is padded after 2.
        let logits: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 / 5.0).collect();
        let ids = [1u32, 3, 2, 0, 2, 0];
        let batch = crate::compress::engine::transformer::fixtures::batch(
            Tensor::from_slice(&ids, (2, 3), &Device::Cpu).unwrap(),
            Some(Tensor::from_slice(&[1u32, 1, 1, 1, 1, 0], (2, 3), &Device::Cpu).unwrap()),
            None,
        );
        let t = Tensor::from_slice(&logits, (2, 3, 4), &Device::Cpu).unwrap();
        let (loss, count) = causal_lm_loss_and_count(&t, &batch).unwrap();
        assert_eq!(count, 3);
        let nll = |row: usize, target: usize| {
            let r = &logits[row * 4..row * 4 + 4];
            let lse = r.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            lse - r[target] as f64
        };
        // (seq 0: 0→3, 1→2), (seq 1: 0→2); seq 1 position 1 predicts padding.
        let want = (nll(0, 3) + nll(1, 2) + nll(3, 2)) / 3.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
