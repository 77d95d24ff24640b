//! `/v1/datasets`: upload (safetensors `x`/`y`, CSV, MNIST IDX, text, JSONL), list, get,
//! delete.
//!
//! Tensor datasets are stored in one canonical form — safetensors with `x` (U8 or F32, first
//! dim = samples) and optional `y` (I64 labels); text datasets as canonical JSONL (`text`,
//! optional `text_pair`, `label`) — so the engine reads two formats.

use axum::extract::{Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::Caller;
use super::bodies::DatasetBody;
use super::error::{ApiError, ApiResult};
use super::extract::{page_body, parse_id, AppQuery, Page, PageBody};
use super::upload::{check_content_length, clean_name, field_text, multipart};
use super::AppState;
use crate::codes::Code;
use crate::compress::engine::data::Dataset;
use crate::db::datasets::{self, DatasetRecord};
use crate::ids::{now_micros, DatasetId};
use crate::store::TempBlob;

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/datasets",
            get(list_datasets)
                .post(upload_dataset)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/datasets/{id}", get(get_dataset).delete(delete_dataset))
}

#[derive(Debug, Default, Deserialize)]
struct UploadQuery {
    name: Option<String>,
    format: Option<String>,
    label_column: Option<String>,
}

/// The parts of an upload, whichever body form carried them.
#[derive(Default)]
struct Parts {
    name: Option<String>,
    format: Option<String>,
    label_column: Option<String>,
    file: Option<TempBlob>,
    images: Option<TempBlob>,
    labels: Option<TempBlob>,
}

async fn upload_dataset(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(query): AppQuery<UploadQuery>,
    req: Request,
) -> ApiResult<Response> {
    let limit = state.config.max_upload_bytes;
    check_content_length(req.headers(), limit)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut parts = Parts {
        name: query.name,
        format: query.format,
        label_column: query.label_column,
        ..Parts::default()
    };
    if content_type.starts_with("multipart/form-data") {
        read_multipart(&state, multipart(req).await?, &mut parts).await?;
    } else if content_type.starts_with("application/octet-stream")
        || content_type.starts_with("text/")
        || content_type.starts_with("application/jsonl")
        || content_type.starts_with("application/x-ndjson")
    {
        if parts.format.is_none() {
            parts.format = match content_type.split(';').next().unwrap_or("").trim() {
                "text/csv" => Some("csv".into()),
                "text/plain" => Some("text".into()),
                "application/jsonl" | "application/x-ndjson" => Some("jsonl".into()),
                _ => None,
            };
        }
        parts.file = Some(
            crate::store::write_stream(
                state.store.as_ref(),
                req.into_body().into_data_stream(),
                limit,
            )
            .await?,
        );
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::UnsupportedMediaType,
            "send application/octet-stream with ?format=safetensors|csv|text|jsonl (or text/csv, text/plain, application/jsonl), or multipart/form-data with `file` (or `images` + `labels` for IDX)",
        ));
    }
    let format = match (parts.format.as_deref(), &parts.images) {
        (Some(f), _) => f.to_string(),
        (None, Some(_)) => "idx".to_string(),
        (None, None) => "safetensors".to_string(),
    };
    let label_column = parts.label_column.clone();
    let (file, images, labels) = (parts.file.take(), parts.images.take(), parts.labels.take());
    let requested = format.clone();
    let parsed = tokio::task::spawn_blocking(move || -> ApiResult<Dataset> {
        let read = |t: &TempBlob| std::fs::read(t.path()).map_err(ApiError::internal);
        match requested.as_str() {
            "safetensors" => {
                let file = file.as_ref().ok_or_else(|| missing("file"))?;
                Ok(Dataset::from_safetensors(file.path())?)
            }
            "csv" => {
                let file = file.as_ref().ok_or_else(|| missing("file"))?;
                Ok(Dataset::from_csv(&read(file)?, label_column.as_deref())?)
            }
            "idx" => {
                let images = images.as_ref().ok_or_else(|| missing("images"))?;
                let labels = labels.as_ref().ok_or_else(|| missing("labels"))?;
                Ok(Dataset::from_idx(&read(images)?, &read(labels)?)?)
            }
            "text" => {
                let file = file.as_ref().ok_or_else(|| missing("file"))?;
                Ok(Dataset::from_text(&read(file)?)?)
            }
            "jsonl" => {
                let file = file.as_ref().ok_or_else(|| missing("file"))?;
                Ok(Dataset::from_jsonl(&read(file)?)?)
            }
            other => Err(ApiError::unprocessable(
                Code::InvalidDatasetFormat,
                format!("unknown format `{other}`; expected safetensors, csv, idx, text or jsonl"),
            )),
        }
    })
    .await??;
    let name = clean_name(parts.name.unwrap_or_else(|| "dataset".into()))?;
    let (samples, feature_shape, num_classes) = (
        parsed.samples,
        parsed.feature_shape.clone(),
        parsed.num_classes,
    );
    let text_bytes = parsed.is_text().then(|| parsed.text_bytes() as i64);
    let store = state.store.clone();
    let blob = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let bytes = if parsed.is_text() {
            parsed.to_jsonl_bytes()?
        } else {
            parsed.to_safetensors_bytes()?
        };
        Ok(store.put_bytes(&bytes)?)
    })
    .await??;
    let record = DatasetRecord {
        id: DatasetId::new(),
        name,
        format,
        samples: samples as i64,
        feature_shape: json!(feature_shape),
        num_classes: num_classes.map(|n| n as i64),
        sha256: blob.sha256,
        size_bytes: blob.size as i64,
        text_bytes,
        created_at: now_micros(),
        tenant: caller.tenant,
    };
    datasets::insert(&state.db, &record).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/datasets/{}", record.id))],
        Json(DatasetBody::from(&record)),
    )
        .into_response())
}

fn missing(part: &str) -> ApiError {
    ApiError::unprocessable(
        Code::MissingPart,
        format!("this format needs a multipart/form-data upload with a `{part}` part"),
    )
}

async fn read_multipart(state: &AppState, mut mp: Multipart, parts: &mut Parts) -> ApiResult<()> {
    let limit = state.config.max_upload_bytes;
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(Code::MalformedMultipart, e.body_text()))?
    {
        let part = field.name().unwrap_or("").to_string();
        let slot = match part.as_str() {
            "file" => &mut parts.file,
            "images" => &mut parts.images,
            "labels" => &mut parts.labels,
            "name" => {
                parts.name = Some(field_text(field).await?);
                continue;
            }
            "format" => {
                parts.format = Some(field_text(field).await?);
                continue;
            }
            "label_column" => {
                parts.label_column = Some(field_text(field).await?);
                continue;
            }
            other => {
                return Err(ApiError::bad_request(
                    Code::MalformedMultipart,
                    format!("unexpected part `{other}`; expected file, images, labels, name, format, label_column"),
                ))
            }
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(
                Code::MalformedMultipart,
                format!("the `{part}` part was sent twice"),
            ));
        }
        *slot = Some(crate::store::write_stream(state.store.as_ref(), field, limit).await?);
    }
    Ok(())
}

async fn list_datasets(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(page): AppQuery<Page>,
) -> ApiResult<Json<PageBody<DatasetBody>>> {
    let limit = page.limit();
    let rows = datasets::list(&state.db, caller.tenant_filter(), page.after()?, limit).await?;
    let last = rows.last().map(|d| d.id);
    Ok(Json(page_body(
        rows.iter().map(DatasetBody::from).collect(),
        last,
        limit,
    )))
}

/// The dataset `raw` names, if the caller may see it (another tenant's is 404).
async fn load_dataset(state: &AppState, caller: &Caller, raw: &str) -> ApiResult<DatasetRecord> {
    let id: DatasetId = parse_id(raw, Code::DatasetNotFound, "dataset")?;
    datasets::get(&state.db, id)
        .await?
        .filter(|d| caller.sees(&d.tenant))
        .ok_or_else(|| ApiError::not_found(Code::DatasetNotFound, "dataset", raw))
}

async fn get_dataset(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<DatasetBody>> {
    Ok(Json(DatasetBody::from(
        &load_dataset(&state, &caller, &id).await?,
    )))
}

/// `DELETE /v1/datasets/{id}`; the blob is reclaimed by the garbage collector.
async fn delete_dataset(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let dataset = load_dataset(&state, &caller, &id).await?;
    if !datasets::delete_unless_in_use(&state.db, dataset.id).await? {
        return Err(ApiError::conflict(
            Code::DatasetInUse,
            "a queued or running job uses this dataset",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}
