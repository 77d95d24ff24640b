//! Artifact rows: files a job produced (model, gguf, packed, report), stored as blobs.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_col, Db, Result};
use crate::ids::{ArtifactId, JobId};

/// One artifact, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// Identifier.
    pub id: ArtifactId,
    /// The job that produced it.
    pub job_id: JobId,
    /// `model`, `gguf`, `packed` or `report`.
    pub kind: String,
    /// `safetensors`, `gguf` or `json`.
    pub format: String,
    /// Content hash (and blob name).
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: i64,
    /// Creation time (µs).
    pub created_at: i64,
}

fn from_row(row: &AnyRow) -> Result<ArtifactRecord> {
    Ok(ArtifactRecord {
        id: id_col(row, "id")?,
        job_id: id_col(row, "job_id")?,
        kind: row.try_get("kind")?,
        format: row.try_get("format")?,
        sha256: row.try_get("sha256")?,
        size_bytes: row.try_get("size_bytes")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Insert an artifact row (inside the completing transaction).
pub async fn insert<'e, E>(executor: E, a: &ArtifactRecord) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "insert into artifacts (id, job_id, kind, format, sha256, size_bytes, created_at) \
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(a.id.to_string())
    .bind(a.job_id.to_string())
    .bind(&a.kind)
    .bind(&a.format)
    .bind(&a.sha256)
    .bind(a.size_bytes)
    .bind(a.created_at)
    .execute(executor)
    .await?;
    Ok(())
}

/// One artifact by id.
pub async fn get(db: &Db, id: ArtifactId) -> Result<Option<ArtifactRecord>> {
    let row = sqlx::query(
        "select id, job_id, kind, format, sha256, size_bytes, created_at from artifacts where id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(db.pool())
    .await?;
    row.as_ref().map(from_row).transpose()
}
