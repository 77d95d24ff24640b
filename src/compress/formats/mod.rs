//! File formats read and written by compression: safetensors, GGUF and the packed encoding.

pub mod gguf;
pub mod packed;
pub mod safetensors;
