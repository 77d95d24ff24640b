//! Quantization-aware training (`qat`): training with the quantizer in the loop, then the same
//! final quantization as post-training quantization. Two modes: fake-quantized weights with
//! straight-through gradients (`w + (q(w) − w).detach()`, every method but `kmeans`), and for
//! `kmeans` Deep Compression's fine-tuning of the shared centroids (weights tied within their
//! clusters after every optimizer step; [`super::sharing`]).

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::Tensor;

use super::sharing::SharedWeights;
use super::{Method, Quantizer};
use crate::compress::engine::data::Dataset;
use crate::compress::engine::finetune::{finetune, FinetuneOutput, FinetuneParams};
use crate::compress::engine::train::{Checkpoint, EpochFn, TrainHooks};
use crate::compress::engine::{Network, WeightTransform};
use crate::compress::progress::Ctx;
use crate::compress::Result;

/// Which kind of quantization-aware training ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QatMode {
    /// `kmeans`: weights tied to their cluster's centroid, centroids trained.
    SharedCentroids,
    /// Fake-quantized forward, straight-through gradients.
    FakeQuantSte,
}

impl QatMode {
    /// Spelling in the step's metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SharedCentroids => "shared_centroids",
            Self::FakeQuantSte => "fake_quant_ste",
        }
    }
}

/// What QAT trains with.
pub struct QatParams<'a> {
    /// The step's quantizer.
    pub quantizer: &'a Quantizer,
    /// The tensors it quantizes.
    pub selected: &'a [String],
    /// The quantizer's seed.
    pub seed: u64,
    /// The training.
    pub train: &'a FinetuneParams<&'a Dataset>,
}

/// Trains `model` with the quantizer in the loop on the selected tensors; the caller
/// quantizes the trained float weights exactly as PTQ would. `on_epoch` and `resume` are
/// the training loop's ([`TrainHooks`]).
pub fn quantization_aware_training(
    mut model: Box<dyn Network>,
    params: &QatParams<'_>,
    ctx: &Ctx<'_>,
    on_epoch: &mut EpochFn<'_>,
    resume: Option<Checkpoint>,
) -> Result<(FinetuneOutput, QatMode)> {
    let QatParams {
        quantizer,
        selected,
        seed,
        train: params,
    } = *params;
    let selected: HashSet<String> = selected.iter().cloned().collect();
    let shared = if matches!(quantizer.method, Method::Kmeans { .. }) {
        Some(SharedWeights::new(
            model.as_ref(),
            &selected,
            &quantizer.method,
            seed,
        )?)
    } else {
        let quantizer = quantizer.clone();
        model.set_weight_transform(Some(WeightTransform(Arc::new(
            move |name: &str, w: &Tensor| {
                if !selected.contains(name) {
                    return Ok(None);
                }
                let shape = w.dims().to_vec();
                let values = w.flatten_all()?.to_vec1::<f32>()?;
                let (q, _) = quantizer.quantize(name, &values, &shape, seed)?;
                Ok(Some(Tensor::from_vec(q.dequantized, shape, w.device())?))
            },
        ))));
        None
    };
    let tie = |m: &dyn Network| shared.as_ref().map_or(Ok(()), |s| s.project(m));
    let out = finetune(
        model,
        params,
        ctx,
        TrainHooks {
            on_epoch: Some(on_epoch),
            resume,
            after_step: shared.is_some().then_some(&tie as &_),
            ..Default::default()
        },
    )?;
    let mode = if shared.is_some() {
        QatMode::SharedCentroids
    } else {
        QatMode::FakeQuantSte
    };
    Ok((out, mode))
}
