//! The transformer families the engine runs, chosen by a folder model's `config.json`.

use crate::compress::formats::safetensors::SafetensorsFile;
use crate::compress::{Error, Result};

/// The network of a folder model: its `config.json` names the family (`bert`, `llama`),
/// `file` holds the weights, `tokenizer` (its `tokenizer.json`) reads text.
pub fn load(
    config: &serde_json::Value,
    file: &SafetensorsFile,
    tokenizer: Option<std::sync::Arc<super::data::TextEncoder>>,
) -> Result<Box<dyn super::Network>> {
    use crate::compress::formats::hf::family_of;
    match family_of(config) {
        Some(super::Family::Bert) => Ok(Box::new(
            super::bert::Bert::from_safetensors(config, file)?.with_tokenizer(tokenizer),
        )),
        Some(super::Family::Llama) => Ok(Box::new(
            super::llama::Llama::from_safetensors(config, file)?.with_tokenizer(tokenizer),
        )),
        _ => Err(Error::UnsupportedFamily(format!(
            "the engine does not run `{}` models: supported families are sequential, bert and llama",
            config
                .get("model_type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unknown")
        ))),
    }
}

/// The tensors (names and shapes) of a folder model with `config` as the engine draws it,
/// with a bert classifier of `classes` (a bert pooler with it or with `pooler`): what a
/// student described by a config will hold.
pub fn shapes(
    config: &serde_json::Value,
    classes: Option<usize>,
    pooler: bool,
) -> Result<Vec<(String, Vec<usize>)>> {
    use crate::compress::formats::hf::family_of;
    match family_of(config) {
        Some(super::Family::Bert) => super::bert::Bert::shapes_of(config, classes, pooler),
        Some(super::Family::Llama) => super::llama::Llama::shapes_of(config),
        _ => Err(Error::UnsupportedFamily(
            "the engine draws bert and llama models only".into(),
        )),
    }
}
