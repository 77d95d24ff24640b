//! Model rows: a stored safetensors blob plus its tensor inventory and optional architecture.

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_col, json_col, json_col_opt, Db, Result};
use crate::ids::{JobId, ModelId};

/// One model, as stored.
#[derive(Debug, Clone)]
pub struct ModelRecord {
    /// Identifier.
    pub id: ModelId,
    /// Display name (the upload's or the producing job's choice).
    pub name: String,
    /// sha256 of the safetensors bytes (and the blob's name).
    pub sha256: String,
    /// File size in bytes.
    pub size_bytes: i64,
    /// Number of elements over all tensors.
    pub parameters: i64,
    /// `[{name, dtype, shape}]` in file order.
    pub tensors: Value,
    /// Architecture JSON, when known.
    pub architecture: Option<Value>,
    /// The job (and step index) that produced this model, if any.
    pub source: Option<(JobId, i64)>,
    /// Every file of the model's folder, the weights (`model.safetensors`) included.
    pub files: Vec<ModelFile>,
    /// The parsed `config.json` of a folder model.
    pub config: Option<Value>,
    /// The model family (`sequential`, `bert`, `llama`) when known.
    pub family: Option<String>,
    /// Creation time, µs since the epoch.
    pub created_at: i64,
    /// The tenant it belongs to (API.md "Access").
    pub tenant: String,
}

/// The path of the weights in every model's folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// One file of a model's folder: a blob under a path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelFile {
    /// Path in the folder (`config.json`, `tokenizer.json`, `model.safetensors`).
    pub path: String,
    /// Size in bytes.
    pub size_bytes: i64,
    /// sha256 of the content (and the blob's name).
    pub sha256: String,
}

impl ModelRecord {
    /// A new model (fresh id, created now) for the committed file `sha256` of `size` bytes
    /// whose header is `header`: the one place a model row is made.
    pub fn new(
        name: String,
        sha256: String,
        size: u64,
        header: &crate::compress::formats::safetensors::Header,
        architecture: Option<Value>,
        source: Option<(JobId, i64)>,
    ) -> ModelRecord {
        let (tensors, parameters) = inventory(header);
        let family = architecture.as_ref().map(|_| "sequential".to_string());
        ModelRecord {
            id: ModelId::new(),
            name,
            files: vec![ModelFile {
                path: WEIGHTS_FILE.into(),
                size_bytes: size as i64,
                sha256: sha256.clone(),
            }],
            sha256,
            size_bytes: size as i64,
            parameters,
            tensors,
            architecture,
            source,
            config: None,
            family,
            created_at: crate::ids::now_micros(),
            tenant: super::keys::DEFAULT_TENANT.into(),
        }
    }

    /// This model as a folder: its weights file plus `companions` (config, tokenizer, …),
    /// with the parsed `config.json` and the family it names.
    pub fn with_folder(
        mut self,
        companions: Vec<ModelFile>,
        config: Option<Value>,
        family: Option<String>,
    ) -> ModelRecord {
        self.files.retain(|f| f.path == WEIGHTS_FILE);
        self.files.extend(companions);
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.config = config;
        if family.is_some() {
            self.family = family;
        }
        self
    }

    /// The folder's files other than the weights.
    pub fn companions(&self) -> Vec<ModelFile> {
        self.files
            .iter()
            .filter(|f| f.path != WEIGHTS_FILE)
            .cloned()
            .collect()
    }

    /// The file at `path`, if the folder has one.
    pub fn file(&self, path: &str) -> Option<&ModelFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

fn from_row(row: &AnyRow) -> Result<ModelRecord> {
    let source_job: Option<String> = row.try_get("source_job_id")?;
    let source_step: Option<i64> = row.try_get("source_step")?;
    Ok(ModelRecord {
        id: id_col(row, "id")?,
        name: row.try_get("name")?,
        sha256: row.try_get("sha256")?,
        size_bytes: row.try_get("size_bytes")?,
        parameters: row.try_get("parameters")?,
        tensors: json_col(row, "tensors")?,
        architecture: json_col_opt(row, "architecture")?,
        source: match (source_job.and_then(|s| s.parse().ok()), source_step) {
            (Some(job), Some(step)) => Some((job, step)),
            _ => None,
        },
        files: match json_col_opt(row, "files")? {
            Some(files) => serde_json::from_value(files).map_err(|source| super::Error::Json {
                column: "files",
                source,
            })?,
            // Rows from before folders: the weights are the one file.
            None => vec![ModelFile {
                path: WEIGHTS_FILE.into(),
                size_bytes: row.try_get("size_bytes")?,
                sha256: row.try_get("sha256")?,
            }],
        },
        config: json_col_opt(row, "config")?,
        family: row.try_get("family")?,
        created_at: row.try_get("created_at")?,
        tenant: row.try_get("tenant")?,
    })
}

const COLUMNS: &str = "id, name, sha256, size_bytes, parameters, tensors, architecture, source_job_id, source_step, files, config, family, created_at, tenant";

/// Insert a model row (the blob must already be committed).
pub async fn insert<'e, E>(executor: E, m: &ModelRecord) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(&format!(
        "insert into models ({COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    ))
    .bind(m.id.to_string())
    .bind(&m.name)
    .bind(&m.sha256)
    .bind(m.size_bytes)
    .bind(m.parameters)
    .bind(m.tensors.to_string())
    .bind(m.architecture.as_ref().map(|a| a.to_string()))
    .bind(m.source.map(|(j, _)| j.to_string()))
    .bind(m.source.map(|(_, s)| s))
    .bind(serde_json::to_string(&m.files).unwrap_or_else(|_| "[]".into()))
    .bind(m.config.as_ref().map(|c| c.to_string()))
    .bind(m.family.clone())
    .bind(m.created_at)
    .bind(&m.tenant)
    .execute(executor)
    .await?;
    Ok(())
}

/// One model by id.
pub async fn get(db: &Db, id: ModelId) -> Result<Option<ModelRecord>> {
    let row = sqlx::query(&format!("select {COLUMNS} from models where id = $1"))
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// A page of models, newest first; `after` is the last id of the previous page; `tenant`
/// restricts it to one tenant's models.
pub async fn list(
    db: &Db,
    tenant: Option<&str>,
    after: Option<ModelId>,
    limit: i64,
) -> Result<Vec<ModelRecord>> {
    let rows = sqlx::query(&format!(
        "select {COLUMNS} from models where ($1 = '' or id < $1) and ($3 = '' or tenant = $3) \
         order by id desc limit $2"
    ))
    .bind(after.map(|a| a.to_string()).unwrap_or_default())
    .bind(limit)
    .bind(tenant.unwrap_or_default())
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Delete a model unless a queued or running job reads it (as input or as a referenced
/// student), in one statement so no job can slip in between the check and the delete.
/// Returns whether a row was deleted; `false` means in use or absent.
pub async fn delete_unless_in_use(db: &Db, id: ModelId) -> Result<bool> {
    let id = id.to_string();
    let done = sqlx::query(
        "delete from models where id = $1 and not exists (select 1 from jobs \
         where state in ('queued', 'running') and (model_id = $1 or spec like $2))",
    )
    .bind(&id)
    .bind(format!("%{id}%"))
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Whether any model, dataset or artifact still references a blob (before deleting it).
pub async fn blob_referenced(db: &Db, sha256: &str) -> Result<bool> {
    let row = sqlx::query(
        "select (select count(*) from models where sha256 = $1 or files like $2) \
              + (select count(*) from datasets where sha256 = $1) \
              + (select count(*) from artifacts where sha256 = $1) \
              + (select count(*) from jobs where checkpoint like $2) as n",
    )
    .bind(sha256)
    .bind(format!("%{sha256}%"))
    .fetch_one(db.pool())
    .await?;
    Ok(row.try_get::<i64, _>("n")? > 0)
}

/// The `tensors` inventory (`[{name, dtype, shape}]`) and parameter count (elements of
/// floating-point tensors; integer buffers such as position ids are not parameters) of a file.
fn inventory(header: &crate::compress::formats::safetensors::Header) -> (Value, i64) {
    let tensors = header
        .tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "dtype": t.dtype.as_str(), "shape": t.shape}))
        .collect();
    let parameters = header
        .tensors
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| t.numel() as i64)
        .sum();
    (Value::Array(tensors), parameters)
}
