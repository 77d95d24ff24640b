//! The stable problem codes of the REST contract, in one enum: the `code` of every
//! problem+json body, of each entry of its `errors`, and of a failed job's `error`.
//! Clients branch on them; renaming one is a breaking change (API.md "Conventions").

use serde::{Serialize, Serializer};

/// A stable snake_case problem code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// `file_not_found`.
    FileNotFound,
    /// `tokenizer_required`.
    TokenizerRequired,
    /// `unsupported_family`.
    UnsupportedFamily,
    /// `invalid_model_folder`.
    InvalidModelFolder,
    /// `architecture_mismatch`.
    ArchitectureMismatch,
    /// `architecture_required`.
    ArchitectureRequired,
    /// `artifact_not_found`.
    ArtifactNotFound,
    /// `cancelled`.
    Cancelled,
    /// `database_error`.
    DatabaseError,
    /// `dataset_in_use`.
    DatasetInUse,
    /// `dataset_mismatch`.
    DatasetMismatch,
    /// `dataset_not_found`.
    DatasetNotFound,
    /// `dataset_shape_mismatch`.
    DatasetShapeMismatch,
    /// `dataset_unlabeled`.
    DatasetUnlabeled,
    /// `idempotency_key_reused`.
    IdempotencyKeyReused,
    /// `internal_error`.
    InternalError,
    /// `invalid_architecture`.
    InvalidArchitecture,
    /// `invalid_cursor`.
    InvalidCursor,
    /// `invalid_dataset`.
    InvalidDataset,
    /// `invalid_dataset_format`.
    InvalidDatasetFormat,
    /// `invalid_idempotency_key`.
    InvalidIdempotencyKey,
    /// `invalid_name`.
    InvalidName,
    /// `invalid_parameter`.
    InvalidParameter,
    /// `invalid_safetensors`.
    InvalidSafetensors,
    /// `invalid_spec`.
    InvalidSpec,
    /// `io_error`.
    IoError,
    /// `job_already_finished`.
    JobAlreadyFinished,
    /// `job_not_found`.
    JobNotFound,
    /// `labels_out_of_range`.
    LabelsOutOfRange,
    /// `lease_expired`.
    LeaseExpired,
    /// `worker_crashed`.
    WorkerCrashed,
    /// `memory_limit_exceeded`.
    MemoryLimitExceeded,
    /// `malformed_json`.
    MalformedJson,
    /// `malformed_multipart`.
    MalformedMultipart,
    /// `method_not_allowed`.
    MethodNotAllowed,
    /// `missing_part`.
    MissingPart,
    /// `model_in_use`.
    ModelInUse,
    /// `model_not_found`.
    ModelNotFound,
    /// `non_finite_loss`.
    NonFiniteLoss,
    /// `payload_too_large`.
    PayloadTooLarge,
    /// `range_not_satisfiable`.
    RangeNotSatisfiable,
    /// `route_not_found`.
    RouteNotFound,
    /// `storage_error`.
    StorageError,
    /// `timeout`.
    Timeout,
    /// `unsupported_dtype`.
    UnsupportedDtype,
    /// `unsupported_media_type`.
    UnsupportedMediaType,
    /// `unsupported_operation`.
    UnsupportedOperation,
    /// `upload_interrupted`.
    UploadInterrupted,
    /// `validation_failed`.
    ValidationFailed,
    /// `unauthenticated`.
    Unauthenticated,
    /// `forbidden`.
    Forbidden,
    /// `key_not_found`.
    KeyNotFound,
    /// `invalid_tenant`.
    InvalidTenant,
    /// `database_unavailable`.
    DatabaseUnavailable,
    /// `job_not_finished`.
    JobNotFinished,
}

impl Code {
    /// Every code.
    pub const ALL: [Code; 55] = [
        Code::FileNotFound,
        Code::TokenizerRequired,
        Code::UnsupportedFamily,
        Code::InvalidModelFolder,
        Code::ArchitectureMismatch,
        Code::ArchitectureRequired,
        Code::ArtifactNotFound,
        Code::Cancelled,
        Code::DatabaseError,
        Code::DatasetInUse,
        Code::DatasetMismatch,
        Code::DatasetNotFound,
        Code::DatasetShapeMismatch,
        Code::DatasetUnlabeled,
        Code::IdempotencyKeyReused,
        Code::InternalError,
        Code::InvalidArchitecture,
        Code::InvalidCursor,
        Code::InvalidDataset,
        Code::InvalidDatasetFormat,
        Code::InvalidIdempotencyKey,
        Code::InvalidName,
        Code::InvalidParameter,
        Code::InvalidSafetensors,
        Code::InvalidSpec,
        Code::IoError,
        Code::JobAlreadyFinished,
        Code::JobNotFound,
        Code::LabelsOutOfRange,
        Code::LeaseExpired,
        Code::WorkerCrashed,
        Code::MemoryLimitExceeded,
        Code::MalformedJson,
        Code::MalformedMultipart,
        Code::MethodNotAllowed,
        Code::MissingPart,
        Code::ModelInUse,
        Code::ModelNotFound,
        Code::NonFiniteLoss,
        Code::PayloadTooLarge,
        Code::RangeNotSatisfiable,
        Code::RouteNotFound,
        Code::StorageError,
        Code::Timeout,
        Code::UnsupportedDtype,
        Code::UnsupportedMediaType,
        Code::UnsupportedOperation,
        Code::UploadInterrupted,
        Code::ValidationFailed,
        Code::Unauthenticated,
        Code::Forbidden,
        Code::KeyNotFound,
        Code::InvalidTenant,
        Code::DatabaseUnavailable,
        Code::JobNotFinished,
    ];

    /// The snake_case spelling clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::FileNotFound => "file_not_found",
            Code::TokenizerRequired => "tokenizer_required",
            Code::UnsupportedFamily => "unsupported_family",
            Code::InvalidModelFolder => "invalid_model_folder",
            Code::ArchitectureMismatch => "architecture_mismatch",
            Code::ArchitectureRequired => "architecture_required",
            Code::ArtifactNotFound => "artifact_not_found",
            Code::Cancelled => "cancelled",
            Code::DatabaseError => "database_error",
            Code::DatasetInUse => "dataset_in_use",
            Code::DatasetMismatch => "dataset_mismatch",
            Code::DatasetNotFound => "dataset_not_found",
            Code::DatasetShapeMismatch => "dataset_shape_mismatch",
            Code::DatasetUnlabeled => "dataset_unlabeled",
            Code::IdempotencyKeyReused => "idempotency_key_reused",
            Code::InternalError => "internal_error",
            Code::InvalidArchitecture => "invalid_architecture",
            Code::InvalidCursor => "invalid_cursor",
            Code::InvalidDataset => "invalid_dataset",
            Code::InvalidDatasetFormat => "invalid_dataset_format",
            Code::InvalidIdempotencyKey => "invalid_idempotency_key",
            Code::InvalidName => "invalid_name",
            Code::InvalidParameter => "invalid_parameter",
            Code::InvalidSafetensors => "invalid_safetensors",
            Code::InvalidSpec => "invalid_spec",
            Code::IoError => "io_error",
            Code::JobAlreadyFinished => "job_already_finished",
            Code::JobNotFound => "job_not_found",
            Code::LabelsOutOfRange => "labels_out_of_range",
            Code::LeaseExpired => "lease_expired",
            Code::WorkerCrashed => "worker_crashed",
            Code::MemoryLimitExceeded => "memory_limit_exceeded",
            Code::MalformedJson => "malformed_json",
            Code::MalformedMultipart => "malformed_multipart",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::MissingPart => "missing_part",
            Code::ModelInUse => "model_in_use",
            Code::ModelNotFound => "model_not_found",
            Code::NonFiniteLoss => "non_finite_loss",
            Code::PayloadTooLarge => "payload_too_large",
            Code::RangeNotSatisfiable => "range_not_satisfiable",
            Code::RouteNotFound => "route_not_found",
            Code::StorageError => "storage_error",
            Code::Timeout => "timeout",
            Code::UnsupportedDtype => "unsupported_dtype",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::UnsupportedOperation => "unsupported_operation",
            Code::UploadInterrupted => "upload_interrupted",
            Code::ValidationFailed => "validation_failed",
            Code::Unauthenticated => "unauthenticated",
            Code::Forbidden => "forbidden",
            Code::KeyNotFound => "key_not_found",
            Code::InvalidTenant => "invalid_tenant",
            Code::DatabaseUnavailable => "database_unavailable",
            Code::JobNotFinished => "job_not_finished",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            let s = c.as_str();
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert!(seen.insert(s), "{s} twice");
        }
    }
}
