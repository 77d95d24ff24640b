//! `/v1/models`: upload (octet-stream, multipart, or JSON architecture + seeded init), list,
//! get, delete, download.
//!
//! An upload streams to a temp blob (size-limited, hashed on the way), is validated as
//! safetensors (and against its architecture, if any) and only then committed and recorded:
//! a rejected upload leaves nothing behind.

use axum::body::Body;
use axum::extract::{Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use super::auth::Caller;
use super::bodies::ModelBody;
use super::error::{ApiError, ApiResult};
use super::extract::{page_body, parse_id, AppQuery, Page, PageBody};
use super::folders::{ingest_folder, push_file, untar, UploadedFile};
use super::upload::{check_content_length, clean_name, field_text, multipart};
use super::AppState;
use crate::codes::Code;
use crate::compress::engine::sequential::arch::Architecture;
use crate::compress::engine::sequential::write_initialised;
use crate::compress::formats::gguf_import;
use crate::compress::formats::ARCHITECTURE_KEY;
use crate::compress::formats::{hf, safetensors};
use crate::db::models::{self, ModelRecord};
use crate::ids::ModelId;
use crate::spec::FieldError;
use crate::store::TempBlob;

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/models",
            get(list_models)
                .post(upload_model)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/models/{id}", get(get_model).delete(delete_model))
        .route("/models/{id}/content", get(download_model))
        .route("/models/{id}/files/{*path}", get(download_file))
        .route("/models/{id}/archive", get(download_archive))
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: Option<String>,
}

/// `POST /v1/models` — dispatches on Content-Type.
async fn upload_model(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(query): AppQuery<UploadQuery>,
    req: Request,
) -> ApiResult<Response> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let limit = state.config.max_upload_bytes;
    check_content_length(req.headers(), limit)?;
    let mut record = if content_type.starts_with("application/octet-stream") {
        let temp = crate::store::write_stream(
            state.store.as_ref(),
            req.into_body().into_data_stream(),
            limit,
        )
        .await?;
        let name = query.name.unwrap_or_else(|| "model".into());
        ingest(&state, temp, name, None).await?
    } else if content_type.starts_with("multipart/form-data") {
        let multipart = multipart(req).await?;
        upload_multipart(&state, multipart, query.name).await?
    } else if content_type.starts_with("application/x-tar")
        || content_type.starts_with("application/tar")
    {
        upload_tar(&state, req.into_body(), query.name).await?
    } else if content_type.starts_with("application/json") {
        let bytes = axum::body::to_bytes(req.into_body(), 4 << 20)
            .await
            .map_err(|e| {
                if e.to_string().contains("length limit") {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        Code::PayloadTooLarge,
                        "a JSON model request is limited to 4 MiB",
                    )
                } else {
                    ApiError::bad_request(
                        Code::UploadInterrupted,
                        format!("reading the body failed: {e}"),
                    )
                }
            })?;
        let body: Value = super::extract::parse_json(&bytes)?;
        create_from_architecture(&state, body, query.name).await?
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::UnsupportedMediaType,
            "send application/octet-stream (safetensors bytes), multipart/form-data (parts `file`, `architecture`, `name`; or one `file` part per file of a model folder, named by its path), application/x-tar (a model folder) or application/json (`architecture` + `init`)",
        ));
    };
    // Every path above checks and commits the blobs; the row is written here, once.
    record.tenant = caller.tenant;
    models::insert(state.db.pool(), &record).await?;
    created(&record)
}

/// 201 with `Location` and the model body.
fn created(record: &ModelRecord) -> ApiResult<Response> {
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/models/{}", record.id))],
        Json(ModelBody::from(record)),
    )
        .into_response())
}

async fn upload_multipart(
    state: &AppState,
    mut multipart: Multipart,
    name: Option<String>,
) -> ApiResult<ModelRecord> {
    let mut files: Vec<(Option<String>, TempBlob)> = Vec::new();
    let mut architecture: Option<Value> = None;
    let mut name = name;
    let limit = state.config.max_upload_bytes;
    let mut used = 0u64;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(Code::MalformedMultipart, e.body_text()))?
    {
        match field.name().unwrap_or("") {
            "file" => {
                let filename = field.file_name().map(str::to_string);
                let temp = crate::store::write_stream(
                    state.store.as_ref(),
                    field,
                    limit.saturating_sub(used),
                )
                .await
                .map_err(|e| match e {
                    crate::store::Error::TooLarge { .. } => crate::store::Error::TooLarge { limit },
                    other => other,
                })?;
                used += temp.size();
                files.push((filename, temp));
            }
            "architecture" => {
                let text = field_text(field).await?;
                let value: Value = serde_json::from_str(&text).map_err(|e| {
                    ApiError::unprocessable(
                        Code::InvalidArchitecture,
                        format!("the `architecture` part is not valid JSON: {e}"),
                    )
                })?;
                architecture = Some(value);
            }
            "name" => name = Some(field_text(field).await?),
            other => {
                return Err(ApiError::bad_request(
                    Code::MalformedMultipart,
                    format!("unexpected part `{other}`; expected `file`, `architecture`, `name`"),
                ))
            }
        }
    }
    // One safetensors part is a model file; anything else is a folder, one part per file.
    let folder = files.len() > 1
        || files.iter().any(|(f, _)| {
            f.as_deref().is_some_and(|p| {
                p.contains('/') || !(p.ends_with(".safetensors") || p.ends_with(".gguf"))
            })
        });
    if !folder {
        let (filename, temp) = files.pop().ok_or_else(|| {
            ApiError::bad_request(
                Code::MalformedMultipart,
                "the `file` part (safetensors bytes, or one part per file of a model folder) is required",
            )
        })?;
        let name = name
            .or_else(|| {
                filename.map(|f| {
                    f.trim_end_matches(".safetensors")
                        .trim_end_matches(".gguf")
                        .to_string()
                })
            })
            .unwrap_or_else(|| "model".into());
        return ingest(state, temp, name, architecture).await;
    }
    if architecture.is_some() {
        return Err(ApiError::bad_request(
            Code::MalformedMultipart,
            "the `architecture` part applies to a single safetensors file; a model folder carries its config.json",
        ));
    }
    let mut folder = Vec::with_capacity(files.len());
    for (filename, temp) in files {
        let filename = filename.ok_or_else(|| {
            ApiError::bad_request(
                Code::MalformedMultipart,
                "every `file` part of a folder needs a filename: its path in the folder",
            )
        })?;
        let path = hf::check_path(&filename)?;
        push_file(&mut folder, UploadedFile { path, temp })?;
    }
    ingest_folder(state, folder, name.unwrap_or_else(|| "model".into())).await
}

/// `POST /v1/models` with `application/x-tar`: the folder as a tar archive.
async fn upload_tar(state: &AppState, body: Body, name: Option<String>) -> ApiResult<ModelRecord> {
    let limit = state.config.max_upload_bytes;
    let tar =
        crate::store::write_stream(state.store.as_ref(), body.into_data_stream(), limit).await?;
    let store = state.store.clone();
    let files = tokio::task::spawn_blocking(move || untar(store.as_ref(), tar.path())).await??;
    ingest_folder(state, files, name.unwrap_or_else(|| "model".into())).await
}

/// Whether an uploaded file starts with the GGUF magic.
fn starts_with_gguf(temp: &TempBlob) -> ApiResult<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(temp.path()).map_err(ApiError::internal)?;
    let n = f.read(&mut magic).map_err(ApiError::internal)?;
    Ok(n == 4 && gguf_import::is_gguf(&magic))
}

/// Validate a streamed upload (a GGUF file is imported as a folder), then commit the blob
/// and record the model.
async fn ingest(
    state: &AppState,
    temp: TempBlob,
    name: String,
    architecture: Option<Value>,
) -> ApiResult<ModelRecord> {
    if architecture.is_none() && starts_with_gguf(&temp)? {
        return super::folders::import_gguf(state, temp, name).await;
    }
    let name = clean_name(name)?;
    let path = temp.path().to_path_buf();
    let header = tokio::task::spawn_blocking(move || safetensors::read_header(path)).await??;
    let architecture = match architecture {
        Some(a) => Some(a),
        None => match header.metadata.get(ARCHITECTURE_KEY) {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| {
                ApiError::unprocessable(
                    Code::InvalidArchitecture,
                    format!("metadata `{ARCHITECTURE_KEY}` is not valid JSON: {e}"),
                )
            })?),
            None => None,
        },
    };
    if let Some(a) = &architecture {
        let arch = Architecture::from_json(a)?;
        arch.validate_weights(&header)?;
    }
    let store = state.store.clone();
    let blob = tokio::task::spawn_blocking(move || store.commit(temp)).await??;
    Ok(ModelRecord::new(
        name,
        blob.sha256,
        blob.size,
        &header,
        architecture,
        None,
    ))
}

/// `POST /v1/models` with JSON: `{"name", "architecture", "init": {"seed"}}`.
async fn create_from_architecture(
    state: &AppState,
    body: Value,
    name: Option<String>,
) -> ApiResult<ModelRecord> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::unprocessable(
            Code::ValidationFailed,
            "the body must be a JSON object",
        ));
    };
    for key in obj.keys() {
        if !["name", "architecture", "init"].contains(&key.as_str()) {
            return Err(ApiError::validation(vec![FieldError::new(
                format!("/{key}"),
                "unknown field; expected name, architecture, init",
            )]));
        }
    }
    let architecture = obj.get("architecture").cloned().ok_or_else(|| {
        ApiError::validation(vec![FieldError {
            code: Code::ArchitectureRequired,
            ..FieldError::new(
                "/architecture",
                "is required to create a model without weights",
            )
        }])
    })?;
    let mut errors = Vec::new();
    let seed = match obj.get("init") {
        None | Some(Value::Null) => 0,
        Some(Value::Object(init)) => {
            for key in init.keys().filter(|k| k.as_str() != "seed") {
                errors.push(FieldError::new(
                    format!("/init/{key}"),
                    "unknown field; `init` takes `seed`",
                ));
            }
            match init.get("seed") {
                None | Some(Value::Null) => 0,
                Some(v) => v.as_u64().unwrap_or_else(|| {
                    errors.push(FieldError::new(
                        "/init/seed",
                        "must be a non-negative integer",
                    ));
                    0
                }),
            }
        }
        Some(_) => {
            errors.push(FieldError::new(
                "/init",
                "must be an object like {\"seed\": 0}",
            ));
            0
        }
    };
    // `?name=` wins over the body's `name`, as for the other upload forms.
    let body_name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => {
            errors.push(FieldError::new("/name", "must be a string"));
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    // The body's name is checked even when `?name=` replaces it.
    if let Some(n) = &body_name {
        clean_name(n.clone())?;
    }
    let name = name.or(body_name).unwrap_or_else(|| "model".into());
    let arch = Architecture::from_json(&architecture).map_err(|e| {
        let mut err = ApiError::from(e);
        // Pointers from the architecture are relative to it; make them relative to the body.
        for f in &mut err.errors {
            f.pointer = format!("/architecture{}", f.pointer);
        }
        err
    })?;
    let name = clean_name(name)?;
    // Initialising holds every weight in memory and writes them all: refuse what would not fit.
    let bytes = arch.parameter_count().saturating_mul(4);
    let limit = state
        .config
        .job_memory_limit()
        .min(state.config.max_upload_bytes);
    if bytes > limit {
        return Err(ApiError::validation(vec![crate::spec::FieldError {
            code: Code::MemoryLimitExceeded,
            ..crate::spec::FieldError::new(
                "/architecture",
                format!(
                    "{} parameters are {} MiB of f32 weights, above the limit of {} MiB (WHITTLE_JOB_MEMORY_BYTES, WHITTLE_MAX_UPLOAD_BYTES)",
                    arch.parameter_count(),
                    bytes >> 20,
                    limit >> 20
                ),
            )
        }]));
    }
    let store = state.store.clone();
    let document = architecture.to_string();
    let (blob, header) = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let mut temp = store.create_temp().map_err(ApiError::internal)?;
        write_initialised(&arch, &document, seed, &mut temp)?;
        let header = safetensors::read_header(temp.path())?;
        Ok((store.commit(temp)?, header))
    })
    .await??;
    Ok(ModelRecord::new(
        name,
        blob.sha256,
        blob.size,
        &header,
        Some(architecture),
        None,
    ))
}

async fn list_models(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(page): AppQuery<Page>,
) -> ApiResult<Json<PageBody<ModelBody>>> {
    let limit = page.limit();
    let rows = models::list(&state.db, caller.tenant_filter(), page.after()?, limit).await?;
    let last = rows.last().map(|m| m.id);
    Ok(Json(page_body(
        rows.iter().map(ModelBody::from).collect(),
        last,
        limit,
    )))
}

/// The model `raw` names, if the caller may see it (another tenant's is 404, as if absent).
async fn load_model(state: &AppState, caller: &Caller, raw: &str) -> ApiResult<ModelRecord> {
    let id: ModelId = parse_id(raw, Code::ModelNotFound, "model")?;
    models::get(&state.db, id)
        .await?
        .filter(|m| caller.sees(&m.tenant))
        .ok_or_else(|| ApiError::not_found(Code::ModelNotFound, "model", raw))
}

async fn get_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelBody>> {
    Ok(Json(ModelBody::from(
        &load_model(&state, &caller, &id).await?,
    )))
}

/// `DELETE /v1/models/{id}`: the row goes at once; the blob is reclaimed by the garbage
/// collector once nothing references it (see [`crate::app::App::collect_garbage`]).
async fn delete_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let model = load_model(&state, &caller, &id).await?;
    if !models::delete_unless_in_use(&state.db, model.id).await? {
        return Err(ApiError::conflict(
            Code::ModelInUse,
            "a queued or running job uses this model; cancel it or wait for it to finish",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/models/{id}/files/{path}`.
async fn download_file(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let model = load_model(&state, &caller, &id).await?;
    super::folders::serve_file(&state, &model, &path, &headers).await
}

/// `GET /v1/models/{id}/archive`.
async fn download_archive(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let model = load_model(&state, &caller, &id).await?;
    super::folders::serve_archive(&state, &model).await
}

async fn download_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let model = load_model(&state, &caller, &id).await?;
    super::content::serve_blob(
        state.store.as_ref(),
        &model.sha256,
        model.size_bytes as u64,
        "application/octet-stream",
        &format!("{}.safetensors", model.name),
        &headers,
    )
    .await
}
