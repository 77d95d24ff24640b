//! The `sequential` family: an architecture of layers in order (MLPs and CNNs), as
//! described in API.md "Architecture (sequential/v1)".

pub mod arch;
pub mod conv;
mod conv_kernels;
mod layer;
pub mod linear;
pub mod model;
mod parse;

use std::collections::BTreeMap;
use std::io::Write;

use crate::compress::engine::data::Subset;
use crate::compress::engine::evaluate::{evaluate, EvalData, Evaluation};
use crate::compress::engine::Network;
use crate::compress::formats::safetensors::{write_f32, NamedTensor};
use crate::compress::formats::ARCHITECTURE_KEY;
use crate::compress::progress::Ctx;
use crate::compress::Result;

/// Writes a freshly initialised model of `arch` (PyTorch's default initialisation, seeded)
/// as a safetensors file whose metadata carries `document` (the architecture as its author
/// wrote it) and the initialisation scheme. Returns the bytes written.
pub fn write_initialised(
    arch: &arch::Architecture,
    document: &str,
    seed: u64,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut metadata = BTreeMap::new();
    metadata.insert(ARCHITECTURE_KEY.to_string(), document.to_string());
    metadata.insert(
        "whittle.init".to_string(),
        serde_json::json!({"scheme": "pytorch_default", "seed": seed}).to_string(),
    );
    let weights: Vec<NamedTensor> = arch
        .init_weights(seed)
        .into_iter()
        .map(|(p, values)| NamedTensor {
            name: p.name,
            shape: p.shape,
            values,
        })
        .collect();
    write_f32(out, &metadata, &weights)
}

/// [`evaluate`] of the network `weights` make with `arch`, on all of `data`.
pub fn evaluate_weights(
    arch: &arch::Architecture,
    weights: Vec<NamedTensor>,
    data: EvalData<'_>,
    reference: Option<&dyn Network>,
    ctx: &Ctx<'_>,
) -> Result<Evaluation> {
    let model = model::Model::new(arch, weights)?;
    evaluate(
        &model,
        &Subset::all(data.dataset),
        reference,
        data.batch_size,
        ctx,
    )
}
