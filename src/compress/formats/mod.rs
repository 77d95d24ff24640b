//! File formats read and written by compression: safetensors, GGUF and the packed encoding.

pub mod gguf;
mod gguf_blocks;
pub mod gguf_import;
pub mod gguf_llama;
mod gguf_q4_0;
pub mod gguf_vocab;
pub mod hf;
pub mod huffman;
pub mod packed;
mod packed_codes;
pub mod safetensors;
mod tensor_codec;

/// The metadata key carrying a model's architecture as a JSON string, in every safetensors
/// and GGUF file Whittle writes (and read from uploads).
pub const ARCHITECTURE_KEY: &str = "whittle.architecture";

/// The metadata key carrying a produced file's provenance (job, steps, seed, inputs' sha256).
pub const JOB_KEY: &str = "whittle.job";
