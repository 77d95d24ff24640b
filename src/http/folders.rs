//! Model folders over HTTP: uploading one (multipart with one part per file, or a tar),
//! downloading one file of it, or the whole folder as a tar.
//!
//! Every uploaded file streams into its own temp blob (the whole upload within
//! `WHITTLE_MAX_UPLOAD_BYTES`); the folder is then checked and assembled by
//! [`crate::compress::formats::hf`] (paths, weights, shards merged into one
//! `model.safetensors`, `config.json`, family) and only then committed and recorded, so a
//! refused folder leaves nothing behind.

use std::collections::{BTreeMap, HashSet};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::codes::Code;
use crate::compress::engine::data::TextEncoder;
use crate::compress::formats::gguf_import;
use crate::compress::formats::hf::{self, Weights};
use crate::compress::formats::safetensors::SafetensorsFile;
use crate::compress::{self};
use crate::db::models::{ModelFile, ModelRecord};
use crate::store::{BlobStore, TempBlob};

/// Most files one folder may hold.
pub const MAX_FILES: usize = 1000;
/// Largest file other than weights (configs, tokenizers, vocabularies).
pub const MAX_COMPANION_BYTES: u64 = 256 << 20;

/// One uploaded file of a folder.
#[derive(Debug)]
pub struct UploadedFile {
    /// Its path in the folder (checked).
    pub path: String,
    /// Its bytes.
    pub temp: TempBlob,
}

/// Adds `file` to `files`, refusing a second file at the same path and too many files.
pub fn push_file(files: &mut Vec<UploadedFile>, file: UploadedFile) -> ApiResult<()> {
    if files.iter().any(|f| f.path == file.path) {
        return Err(ApiError::unprocessable(
            Code::InvalidModelFolder,
            format!("the folder holds {:?} twice", file.path),
        ));
    }
    if files.len() >= MAX_FILES {
        return Err(ApiError::unprocessable(
            Code::InvalidModelFolder,
            format!("a folder holds at most {MAX_FILES} files"),
        ));
    }
    files.push(file);
    Ok(())
}

/// Checks and assembles an uploaded folder and commits its blobs; the caller records the model.
pub async fn ingest_folder(
    state: &AppState,
    files: Vec<UploadedFile>,
    name: String,
) -> ApiResult<ModelRecord> {
    let name = super::upload::clean_name(name)?;
    let store = state.store.clone();
    let record =
        tokio::task::spawn_blocking(move || assemble(store.as_ref(), files, name)).await??;
    Ok(record)
}

/// `POST /v1/models` with a GGUF file: imported as a Hugging Face folder (f32 weights under
/// Hugging Face names, config.json, tokenizer.json, …), then ingested like an uploaded folder.
/// The weights' metadata records the GGUF file's sha256 (`whittle.source`).
pub async fn import_gguf(state: &AppState, gguf: TempBlob, name: String) -> ApiResult<ModelRecord> {
    let store = state.store.clone();
    let files = tokio::task::spawn_blocking(move || -> ApiResult<Vec<UploadedFile>> {
        let sha = {
            use sha2::{Digest, Sha256};
            let mut hasher = Sha256::new();
            let mut f = std::fs::File::open(gguf.path()).map_err(ApiError::internal)?;
            std::io::copy(&mut f, &mut hasher).map_err(ApiError::internal)?;
            hex::encode(hasher.finalize())
        };
        let mut meta = std::collections::BTreeMap::new();
        meta.insert(
            "whittle.source".to_string(),
            serde_json::json!({"format": "gguf", "sha256": sha, "size_bytes": gguf.size()})
                .to_string(),
        );
        let mut weights = store.create_temp().map_err(ApiError::internal)?;
        let imported = gguf_import::import_gguf(gguf.path(), &meta, &mut weights)?;
        std::io::Write::flush(&mut weights).map_err(ApiError::internal)?;
        drop(gguf);
        let mut files = vec![UploadedFile {
            path: hf::WEIGHTS.into(),
            temp: weights,
        }];
        let mut json_file = |path: &str, value: &serde_json::Value| -> ApiResult<()> {
            let mut temp = store.create_temp().map_err(ApiError::internal)?;
            let bytes = serde_json::to_vec_pretty(value).map_err(ApiError::internal)?;
            std::io::Write::write_all(&mut temp, &bytes).map_err(ApiError::internal)?;
            std::io::Write::flush(&mut temp).map_err(ApiError::internal)?;
            files.push(UploadedFile {
                path: path.into(),
                temp,
            });
            Ok(())
        };
        json_file(hf::CONFIG, &imported.config)?;
        json_file("generation_config.json", &imported.generation_config)?;
        if let Some(t) = &imported.tokenizer {
            json_file(hf::TOKENIZER, t)?;
        }
        if let Some(t) = &imported.tokenizer_config {
            json_file("tokenizer_config.json", t)?;
        }
        Ok(files)
    })
    .await??;
    ingest_folder(state, files, name).await
}

/// The blocking half of [`ingest_folder`].
fn assemble(
    store: &dyn BlobStore,
    files: Vec<UploadedFile>,
    name: String,
) -> ApiResult<ModelRecord> {
    let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    let read_json = |path: &str| -> ApiResult<Option<serde_json::Value>> {
        match files.iter().find(|f| f.path == path) {
            None => Ok(None),
            Some(f) => {
                let bytes = std::fs::read(f.temp.path()).map_err(ApiError::internal)?;
                Ok(Some(hf::parse_json_object(path, &bytes)?))
            }
        }
    };
    let config = read_json(hf::CONFIG)?.ok_or_else(|| {
        ApiError::from(compress::Error::InvalidModelFolder(format!(
            "the folder has no {}: a model folder carries its configuration",
            hf::CONFIG
        )))
    })?;
    // A family the engine runs reads text with the tokenizer: it must load now, not fail
    // every text job later.
    if let (Some(_), Some(f)) = (
        hf::family_of(&config),
        files.iter().find(|f| f.path == hf::TOKENIZER),
    ) {
        TextEncoder::from_file(f.temp.path()).map_err(|e| {
            compress::Error::InvalidModelFolder(format!(
                "{} does not load with the tokenizers library: {e}",
                hf::TOKENIZER
            ))
        })?;
    }
    let index = read_json(hf::INDEX)?;
    let weights = hf::weights_of(&paths, index.as_ref())?;
    for f in &files {
        if !f.path.ends_with(".safetensors") && f.temp.size() > MAX_COMPANION_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::PayloadTooLarge,
                format!(
                    "{} is {} bytes; files other than weights are limited to {MAX_COMPANION_BYTES}",
                    f.path,
                    f.temp.size()
                ),
            ));
        }
    }
    let mut by_path: BTreeMap<String, TempBlob> =
        files.into_iter().map(|f| (f.path, f.temp)).collect();
    let weights_temp = match weights {
        Weights::Single => by_path
            .remove(hf::WEIGHTS)
            .ok_or_else(|| ApiError::internal("weights vanished"))?,
        Weights::Shards(shards) => {
            let mut opened = Vec::with_capacity(shards.len());
            for s in &shards {
                let temp = by_path
                    .get(s)
                    .ok_or_else(|| ApiError::internal("shard vanished"))?;
                opened.push((s.clone(), SafetensorsFile::open(temp.path())?));
            }
            let metadata = opened
                .first()
                .map(|(_, f)| f.header().metadata.clone())
                .unwrap_or_default();
            let mut merged = store.create_temp().map_err(ApiError::internal)?;
            hf::merge_shards(&opened, &metadata, &mut merged)?;
            std::io::Write::flush(&mut merged).map_err(ApiError::internal)?;
            drop(opened);
            for s in &shards {
                by_path.remove(s);
            }
            by_path.remove(hf::INDEX);
            merged
        }
    };
    let header = SafetensorsFile::open(weights_temp.path())?.header().clone();
    let family = hf::family_of(&config).map(|f| f.as_str().to_string());
    let blob = store.commit(weights_temp)?;
    let mut companions = Vec::with_capacity(by_path.len());
    for (path, temp) in by_path {
        let b = store.commit(temp)?;
        companions.push(ModelFile {
            path,
            size_bytes: b.size as i64,
            sha256: b.sha256,
        });
    }
    Ok(
        ModelRecord::new(name, blob.sha256, blob.size, &header, None, None).with_folder(
            companions,
            Some(config),
            family,
        ),
    )
}

/// Unpacks a tar (already in a temp blob) into one temp blob per regular file. Directory
/// entries are skipped; links and special files are refused; a single top-level directory
/// holding everything (`my-model/config.json`, …) is stripped.
pub fn untar(store: &dyn BlobStore, tar: &std::path::Path) -> ApiResult<Vec<UploadedFile>> {
    let bad = |msg: String| ApiError::from(compress::Error::InvalidModelFolder(msg));
    let file = std::fs::File::open(tar).map_err(ApiError::internal)?;
    let mut archive = tar::Archive::new(file);
    let mut files = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("the tar archive is damaged: {e}")))?;
        let kind = entry.header().entry_type();
        let raw = entry
            .path()
            .map_err(|e| bad(format!("a tar entry has an unreadable path: {e}")))?
            .to_string_lossy()
            .into_owned();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(bad(format!(
                "tar entry {raw:?} is a link or special file; only regular files are accepted"
            )));
        }
        let path = hf::check_path(&raw)?;
        let mut temp = store.create_temp().map_err(ApiError::internal)?;
        std::io::copy(&mut entry, &mut temp)
            .map_err(|e| bad(format!("reading {raw:?} from the tar failed: {e}")))?;
        std::io::Write::flush(&mut temp).map_err(ApiError::internal)?;
        push_file(&mut files, UploadedFile { path, temp })?;
    }
    strip_common_dir(&mut files);
    let mut seen = HashSet::new();
    for f in &files {
        if !seen.insert(f.path.clone()) {
            return Err(bad(format!("the folder holds {:?} twice", f.path)));
        }
    }
    Ok(files)
}

/// Removes a first path segment every file shares (a folder tarred with its directory).
fn strip_common_dir(files: &mut [UploadedFile]) {
    let first = |p: &str| p.split_once('/').map(|(d, _)| d.to_string());
    let Some(dir) = files.first().and_then(|f| first(&f.path)) else {
        return;
    };
    if files
        .iter()
        .all(|f| first(&f.path).as_deref() == Some(dir.as_str()))
    {
        for f in files.iter_mut() {
            f.path = f.path[dir.len() + 1..].to_string();
        }
    }
}

/// `GET /v1/models/{id}/files/{path}`: one file of the folder (ETag, Range).
pub async fn serve_file(
    state: &AppState,
    model: &ModelRecord,
    path: &str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let file = model.file(path).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::FileNotFound,
            format!("model {} has no file {path:?}", model.id),
        )
    })?;
    let content_type = if path.ends_with(".json") {
        "application/json"
    } else if path.ends_with(".txt") || path.ends_with(".md") {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    let filename = path.rsplit('/').next().unwrap_or(path);
    super::content::serve_blob(
        state.store.as_ref(),
        &file.sha256,
        file.size_bytes as u64,
        content_type,
        filename,
        headers,
    )
    .await
}

/// `GET /v1/models/{id}/archive`: the folder as a ustar archive, streamed file by file.
pub async fn serve_archive(state: &AppState, model: &ModelRecord) -> ApiResult<Response> {
    let mtime = (model.created_at / 1_000_000).max(0) as u64;
    let mut length = 1024u64;
    let mut parts: Vec<BoxStream<'static, std::io::Result<Bytes>>> = Vec::new();
    for f in &model.files {
        let size = f.size_bytes as u64;
        let header = tar_header(&f.path, size, mtime)?;
        let padding = (512 - size % 512) % 512;
        length += 512 + size + padding;
        let body = state.store.read_range(&f.sha256, 0..size).await?;
        parts.push(stream::once(async move { Ok(header) }).boxed());
        parts.push(body);
        if padding > 0 {
            parts.push(
                stream::once(async move { Ok(Bytes::from(vec![0u8; padding as usize])) }).boxed(),
            );
        }
    }
    parts.push(stream::once(async { Ok(Bytes::from(vec![0u8; 1024])) }).boxed());
    let body = stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>)).try_flatten();
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::CONTENT_LENGTH, length)
        .header(
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"{}.tar\"",
                super::content::sanitize(&model.name)
            ),
        )
        .body(Body::from_stream(body))
        .map(IntoResponse::into_response)
        .map_err(ApiError::internal)
}

/// A ustar header block for a regular file.
fn tar_header(path: &str, size: u64, mtime: u64) -> ApiResult<Bytes> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).map_err(ApiError::internal)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(Bytes::copy_from_slice(h.as_bytes()))
}
