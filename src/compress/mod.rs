//! Pure, synchronous model-compression compute, by concern:
//!
//! - [`engine`]: networks that run on candle behind the [`engine::Network`] trait (the
//!   `sequential` family today), datasets and batching, the one training loop, evaluation,
//!   fine-tuning;
//! - [`prune`]: magnitude / random / N:M masks, structured pruning, gradual schedules, the
//!   sparse encoding;
//! - [`quant`]: the codecs (uniform, k-means, log2, nf4, float casts), activation
//!   calibration, QAT, the accuracy budget;
//! - [`distill`]: knowledge distillation;
//! - [`formats`]: safetensors, GGUF and the packed encoding;
//! - [`select`] (which tensors an operation touches), [`parallel`] (the thread budget) and
//!   [`progress`] (progress and cancellation).
//!
//! It must not know about HTTP, SQL, tokio or the queue: callers hand it bytes, paths,
//! a progress callback and a cancel flag, and get back values or a [`Error`] whose
//! [`Error::code`] is the stable, user-facing error code of the REST contract.

pub mod calib;
pub mod distill;
pub mod engine;
pub mod formats;
pub mod parallel;
pub mod progress;
pub mod prune;
pub mod quant;
pub mod select;

use crate::codes::Code;

/// Everything that can go wrong in compression compute, named by cause.
///
/// Every variant except [`Error::Io`] and [`Error::Internal`] is caused by the user's
/// input (a 4xx in HTTP terms) and is not worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a valid safetensors file; the message says exactly why.
    #[error("invalid safetensors file: {0}")]
    InvalidSafetensors(String),
    /// The architecture JSON is malformed or its shapes do not line up.
    #[error("invalid architecture{}: {detail}", at_pointer(.pointer))]
    ArchitectureInvalid {
        /// JSON pointer (RFC 6901) into the architecture document, e.g. `/layers/3/out_features`.
        pointer: String,
        /// What is wrong there, naming the shapes involved.
        detail: String,
    },
    /// The weights file does not hold the tensors the architecture expects.
    #[error("weights do not match the architecture: {0}")]
    ArchitectureMismatch(String),
    /// A model folder cannot be used (paths, missing weights or config, shards, JSON).
    #[error("invalid model folder: {0}")]
    InvalidModelFolder(String),
    /// The model's family is not one the engine runs (for operations that run the network).
    #[error("{0}")]
    UnsupportedFamily(String),
    /// Text input needs the model's `tokenizer.json`, which the folder lacks.
    #[error("{0}")]
    TokenizerRequired(String),
    /// The dataset bytes cannot be used (wrong format, ragged rows, bad labels, ...).
    #[error("invalid dataset: {0}")]
    InvalidDataset(String),
    /// A tensor has a dtype the requested operation cannot handle.
    #[error("tensor {tensor:?} has dtype {dtype}, but {expected} is required")]
    UnsupportedDtype {
        /// The tensor's name.
        tensor: String,
        /// Its dtype, in safetensors spelling.
        dtype: String,
        /// What the operation accepts, in words (e.g. "a floating-point dtype").
        expected: String,
    },
    /// A parameter of an operation is out of range or inconsistent with its inputs.
    #[error("invalid parameter{}: {detail}", named(.field))]
    InvalidParameter {
        /// The parameter, in this module's own terms: a name (`lr`), a path into nested
        /// parameters (`optimizer.momentum`, `features[0].teacher`) or a keyed entry
        /// (`layer_lr[fc1.*]`); empty when it is the operation as a whole. The API layer
        /// maps it to a JSON pointer ([`Error::field`]).
        field: String,
        /// What is wrong, naming the values involved.
        detail: String,
    },
    /// The dataset does not fit the model (feature shape, labels beyond the classifier).
    #[error("dataset does not match the model: {0}")]
    DatasetMismatch(String),
    /// The model or request uses something the engine cannot do (e.g. training through
    /// overlapping pooling windows).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Training produced a NaN or infinite loss (diverged); lower the learning rate.
    #[error("the training loss became non-finite in epoch {epoch}, batch {batch} (training diverged; try a lower learning rate or gradient clipping)")]
    NonFiniteLoss {
        /// 1-based epoch.
        epoch: usize,
        /// 0-based batch within the epoch.
        batch: usize,
    },
    /// Reading or writing a file failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The caller's cancel flag was raised; nothing was half-written.
    #[error("cancelled")]
    Cancelled,
    /// An invariant of this module was broken by its caller (a bug, not bad input).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The stable snake_case code for the problem+json `code` field.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidSafetensors(_) => Code::InvalidSafetensors,
            Error::ArchitectureInvalid { .. } => Code::InvalidArchitecture,
            Error::ArchitectureMismatch(_) => Code::ArchitectureMismatch,
            Error::InvalidDataset(_) => Code::InvalidDataset,
            Error::InvalidModelFolder(_) => Code::InvalidModelFolder,
            Error::UnsupportedFamily(_) => Code::UnsupportedFamily,
            Error::TokenizerRequired(_) => Code::TokenizerRequired,
            Error::UnsupportedDtype { .. } => Code::UnsupportedDtype,
            Error::InvalidParameter { .. } => Code::ValidationFailed,
            Error::DatasetMismatch(_) => Code::DatasetMismatch,
            Error::Unsupported(_) => Code::UnsupportedOperation,
            Error::NonFiniteLoss { .. } => Code::NonFiniteLoss,
            Error::Io(_) => Code::IoError,
            Error::Cancelled => Code::Cancelled,
            Error::Internal(_) => Code::InternalError,
        }
    }

    /// An [`Error::InvalidParameter`] of `field` (see there for its spelling).
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::InvalidParameter {
            field: field.into(),
            detail: detail.into(),
        }
    }

    /// The JSON pointer of the offending value, relative to the architecture document that
    /// was parsed, when the error has one. Callers embedding that document in a larger one
    /// prefix their own path (e.g. `/architecture`).
    pub fn pointer(&self) -> Option<String> {
        match self {
            Error::ArchitectureInvalid { pointer, .. } => Some(pointer.clone()),
            _ => None,
        }
    }

    /// The parameter an [`Error::InvalidParameter`] is about.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidParameter { field, .. } => Some(field),
            _ => None,
        }
    }

    /// Whether trying again could succeed (I/O trouble), as opposed to bad input that
    /// fails the same way every time.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io(_))
    }
}

/// " `lr`" for a parameter, nothing for the operation as a whole ("").
fn named(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!(" `{field}`")
    }
}

/// " at /layers/3" for a pointer, nothing for the whole document ("").
fn at_pointer(pointer: &str) -> String {
    if pointer.is_empty() {
        String::new()
    } else {
        format!(" at {pointer}")
    }
}

/// Escapes one JSON pointer reference token (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// "a string", "an array", … for error messages about a JSON value of the wrong kind.
pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Result alias for compression compute.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn codes_and_pointers_are_stable() {
        let arch = Error::ArchitectureInvalid {
            pointer: "/layers/3/out_features".into(),
            detail: "must be at least 1, got 0".into(),
        };
        assert_eq!(arch.code().as_str(), "invalid_architecture");
        assert_eq!(arch.pointer().as_deref(), Some("/layers/3/out_features"));
        assert_eq!(
            arch.to_string(),
            "invalid architecture at /layers/3/out_features: must be at least 1, got 0"
        );
        let root = Error::ArchitectureInvalid {
            pointer: String::new(),
            detail: "not an object".into(),
        };
        assert_eq!(root.to_string(), "invalid architecture: not an object");
        let cases = [
            (Error::InvalidSafetensors("x".into()), "invalid_safetensors"),
            (
                Error::ArchitectureMismatch("x".into()),
                "architecture_mismatch",
            ),
            (Error::InvalidDataset("x".into()), "invalid_dataset"),
            (Error::DatasetMismatch("x".into()), "dataset_mismatch"),
            (Error::Unsupported("x".into()), "unsupported_operation"),
            (
                Error::NonFiniteLoss { epoch: 1, batch: 0 },
                "non_finite_loss",
            ),
            (Error::Io(std::io::Error::other("disk")), "io_error"),
            (Error::Cancelled, "cancelled"),
            (Error::Internal("x".into()), "internal_error"),
        ];
        for (e, code) in cases {
            assert_eq!(e.code().as_str(), code);
            assert_eq!(e.pointer(), None);
            assert_eq!(e.is_retryable(), code == "io_error");
        }
    }
}
