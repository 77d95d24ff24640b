//! The `sequential` family: an architecture of layers in order (MLPs and CNNs), as
//! described in API.md "Architecture (sequential/v1)".

pub mod arch;
pub mod conv;
pub mod model;
mod parse;
