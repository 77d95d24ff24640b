//! Dataset rows: a canonical blob (safetensors `x`, optional `y`; or JSONL documents for
//! text) plus its shape summary.

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_col, json_col, Db, Result};
use crate::ids::DatasetId;

/// One dataset, as stored.
#[derive(Debug, Clone)]
pub struct DatasetRecord {
    /// Identifier.
    pub id: DatasetId,
    /// Display name.
    pub name: String,
    /// Upload format: `safetensors`, `csv`, `idx`, `text` or `jsonl`.
    pub format: String,
    /// Number of samples.
    pub samples: i64,
    /// Shape of one sample, e.g. `[1, 28, 28]` or `[64]`.
    pub feature_shape: Value,
    /// Number of classes (max label + 1), when labels were given.
    pub num_classes: Option<i64>,
    /// sha256 of the canonical stored form.
    pub sha256: String,
    /// Stored size in bytes.
    pub size_bytes: i64,
    /// Text datasets: bytes of UTF-8 text over all documents (`None` for tensor datasets).
    pub text_bytes: Option<i64>,
    /// Creation time, µs since the epoch.
    pub created_at: i64,
    /// The tenant it belongs to (API.md "Access").
    pub tenant: String,
}

fn from_row(row: &AnyRow) -> Result<DatasetRecord> {
    Ok(DatasetRecord {
        id: id_col(row, "id")?,
        name: row.try_get("name")?,
        format: row.try_get("format")?,
        samples: row.try_get("samples")?,
        feature_shape: json_col(row, "feature_shape")?,
        num_classes: row.try_get("num_classes")?,
        sha256: row.try_get("sha256")?,
        size_bytes: row.try_get("size_bytes")?,
        text_bytes: row.try_get("text_bytes")?,
        created_at: row.try_get("created_at")?,
        tenant: row.try_get("tenant")?,
    })
}

const COLUMNS: &str =
    "id, name, format, samples, feature_shape, num_classes, sha256, size_bytes, created_at, text_bytes, tenant";

/// Insert a dataset row (the blob must already be committed).
pub async fn insert(db: &Db, d: &DatasetRecord) -> Result<()> {
    sqlx::query(&format!(
        "insert into datasets ({COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    ))
    .bind(d.id.to_string())
    .bind(&d.name)
    .bind(&d.format)
    .bind(d.samples)
    .bind(d.feature_shape.to_string())
    .bind(d.num_classes)
    .bind(&d.sha256)
    .bind(d.size_bytes)
    .bind(d.created_at)
    .bind(d.text_bytes)
    .bind(&d.tenant)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// One dataset by id.
pub async fn get(db: &Db, id: DatasetId) -> Result<Option<DatasetRecord>> {
    let row = sqlx::query(&format!("select {COLUMNS} from datasets where id = $1"))
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// A page of datasets, newest first.
/// `tenant` restricts the page to one tenant's datasets.
pub async fn list(
    db: &Db,
    tenant: Option<&str>,
    after: Option<DatasetId>,
    limit: i64,
) -> Result<Vec<DatasetRecord>> {
    let rows = sqlx::query(&format!(
        "select {COLUMNS} from datasets where ($1 = '' or id < $1) and ($3 = '' or tenant = $3) \
         order by id desc limit $2"
    ))
    .bind(after.map(|a| a.to_string()).unwrap_or_default())
    .bind(limit)
    .bind(tenant.unwrap_or_default())
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Delete a dataset unless a queued or running job reads it (one statement, no race).
/// Returns whether a row was deleted; `false` means in use or absent.
pub async fn delete_unless_in_use(db: &Db, id: DatasetId) -> Result<bool> {
    let done = sqlx::query(
        "delete from datasets where id = $1 and not exists (select 1 from jobs \
         where state in ('queued', 'running') and spec like $2)",
    )
    .bind(id.to_string())
    .bind(format!("%{id}%"))
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() > 0)
}
