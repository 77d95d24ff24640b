//! The network engine: networks that run on candle, the data they read, and the one
//! training loop, evaluation and fine-tuning built on them.

pub mod data;
pub mod evaluate;
pub mod finetune;
pub mod masks;
pub mod sequential;
pub mod train;
