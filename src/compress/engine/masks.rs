//! Zeros held through training: a 0/1 mask per chosen parameter, taken from its zeros when
//! training starts and multiplied in after every optimizer step, so pruned weights stay
//! exactly zero while the others learn (gradual pruning's retraining, `keep_sparsity`).

use candle_core::{DType, Tensor};

use crate::compress::engine::Network;
use crate::compress::Result;

/// The masks of some parameters of one model, by parameter index.
#[derive(Debug, Default)]
pub struct ZeroMasks {
    masks: Vec<(usize, Tensor)>,
}

impl ZeroMasks {
    /// For each parameter of `model` named in `names`, a mask of its non-zero weights.
    pub fn of(model: &dyn Network, names: &[String]) -> Result<ZeroMasks> {
        let mut masks = Vec::new();
        for (i, p) in model.params().iter().enumerate() {
            if names.iter().any(|s| s == p.name()) {
                let w = p.var().as_tensor();
                masks.push((i, w.ne(0f32)?.to_dtype(w.dtype())?));
            }
        }
        Ok(ZeroMasks { masks })
    }

    /// Multiplies every masked parameter of `model` by its mask.
    pub fn apply(&self, model: &dyn Network) -> Result<()> {
        let params = model.params();
        for (i, mask) in &self.masks {
            let var = params[*i].var();
            var.set(&var.as_tensor().mul(mask)?)?;
        }
        Ok(())
    }

    /// How many weights the masks hold at zero.
    pub fn zeros(&self) -> Result<usize> {
        let mut ones = 0.0f64;
        let mut total = 0usize;
        for (_, m) in &self.masks {
            ones += m.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            total += m.elem_count();
        }
        Ok(total.saturating_sub(ones as usize))
    }
}
