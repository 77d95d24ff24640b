//! The object-store backend (`WHITTLE_BLOB_URL=s3://bucket/prefix`, `gs://…`, `az://…`,
//! through the `object_store` crate): blobs are objects `<prefix>/blobs/<aa>/<sha256>`; a
//! bounded local cache (`<data-dir>/cache`, least recently used out first) holds the ones
//! compute memory-maps, and temps are local files. Several processes on different machines
//! share the bucket and the database and nothing else.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{BlobRef, BlobStore, Error, TempBlob};

/// Uploads above this size go in parts of this size.
const PART_BYTES: usize = 16 << 20;

/// Blobs in an object store, with a local cache for compute.
#[derive(Debug, Clone)]
pub struct ObjectBlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    cache: PathBuf,
    cache_bytes: u64,
    url: String,
    runtime: tokio::runtime::Handle,
}

fn os_err(e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { path, .. } => Error::NotFound(path),
        e => Error::Io(io::Error::other(e.to_string())),
    }
}

impl ObjectBlobStore {
    /// Opens the store at `url` (credentials and endpoint from the standard `AWS_*`,
    /// `GOOGLE_*`, `AZURE_*` variables; an `http://` endpoint is allowed as such), caching up to
    /// `cache_bytes` under `cache_dir`. Must be called inside a Tokio runtime.
    pub fn open(url: &str, cache_dir: &Path, cache_bytes: u64) -> io::Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| io::Error::other(format!("{url}: {e}")))?;
        let mut options: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let plain_http = options
            .iter()
            .any(|(k, v)| k.starts_with("aws_endpoint") && v.starts_with("http://"));
        if plain_http {
            options.push(("allow_http".into(), "true".into()));
        }
        let (store, prefix) = object_store::parse_url_opts(&parsed, options)
            .map_err(|e| io::Error::other(format!("{url}: {e}")))?;
        std::fs::create_dir_all(cache_dir.join("blobs"))?;
        std::fs::create_dir_all(cache_dir.join("tmp"))?;
        Ok(Self {
            store: Arc::from(store),
            prefix,
            cache: cache_dir.to_path_buf(),
            cache_bytes,
            url: url.to_string(),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn object(&self, sha256: &str) -> ObjectPath {
        let prefix = sha256.get(..2).unwrap_or("00");
        self.prefix.child("blobs").child(prefix).child(sha256)
    }

    /// An empty object whose time says when blob `sha256` was last stored again: content
    /// already in the bucket is not rewritten, so its own time stays the first upload's, and
    /// garbage collection must see the new one.
    fn touch_marker(&self, sha256: &str) -> ObjectPath {
        self.prefix.child("touched").child(sha256)
    }

    fn cached(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("00");
        self.cache.join("blobs").join(prefix).join(sha256)
    }

    /// Runs `fut` to completion from synchronous code (compute runs on blocking threads; a
    /// runtime worker thread is moved aside first).
    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.runtime.block_on(fut))
            }
            _ => self.runtime.block_on(fut),
        }
    }

    async fn upload(&self, sha256: &str, file: &Path, size: u64) -> Result<(), Error> {
        let location = self.object(sha256);
        // Content-addressed: an object already there holds these bytes; mark it as stored now.
        if self.store.head(&location).await.is_ok() {
            self.store
                .put(&self.touch_marker(sha256), PutPayload::new())
                .await
                .map_err(os_err)?;
            return Ok(());
        }
        if size as usize <= PART_BYTES {
            let bytes = tokio::fs::read(file).await?;
            self.store
                .put(&location, PutPayload::from(bytes))
                .await
                .map_err(os_err)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&location).await.map_err(os_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let written = async {
            let mut f = tokio::fs::File::open(file).await?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
                if n == 0 {
                    break;
                }
                writer.wait_for_capacity(4).await.map_err(os_err)?;
                writer.write(&buf[..n]);
            }
            Ok::<_, Error>(())
        }
        .await;
        match written {
            Ok(()) => {
                writer.finish().await.map_err(os_err)?;
                Ok(())
            }
            Err(e) => {
                // Leave no orphaned parts behind.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Fetches blob `sha256` into the cache (checking its hash), unless it is there.
    async fn fetch(&self, sha256: &str) -> Result<PathBuf, Error> {
        let dest = self.cached(sha256);
        if tokio::fs::metadata(&dest).await.is_ok() {
            touch(&dest);
            return Ok(dest);
        }
        let result = self.store.get(&self.object(sha256)).await.map_err(os_err)?;
        let temp = self
            .cache
            .join("tmp")
            .join(format!("{}.part", uuid::Uuid::now_v7()));
        let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(&temp).await?);
        let mut hasher = Sha256::new();
        let mut stream = result.into_stream();
        let written = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(os_err)?;
                hasher.update(&chunk);
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
        if hex::encode(hasher.finalize()) != sha256 {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(Error::Io(io::Error::other(format!(
                "object {sha256} in {} does not hold the bytes its name says",
                self.url
            ))));
        }
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::rename(&temp, &dest).await?;
        self.trim_cache(&dest);
        Ok(dest)
    }

    /// Removes the least recently used cached blobs until the cache fits its bound. Files used
    /// in the last hour stay even past the bound (a job may hold a path it has not opened yet;
    /// `keep` is about to be used), so the bound can be exceeded for a while. A blob
    /// memory-mapped by a running job stays readable anyway: unlinking does not unmap it.
    fn trim_cache(&self, keep: &Path) {
        let recent = SystemTime::now() - std::time::Duration::from_secs(3600);
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.cache.join("blobs")) else {
            return;
        };
        for dir in dirs.flatten() {
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(m) = f.metadata() {
                    files.push((
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        m.len(),
                        f.path(),
                    ));
                }
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.cache_bytes {
                break;
            }
            if path != keep
                && files_time_before(&path, recent)
                && std::fs::remove_file(&path).is_ok()
            {
                total -= len;
            }
        }
    }
}

/// Whether `path` was last used before `t`.
fn files_time_before(path: &Path, t: SystemTime) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|m| m < t)
}

/// Marks a cached file as just used (its modification time orders the eviction).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

impl BlobStore for ObjectBlobStore {
    fn create_temp(&self) -> io::Result<TempBlob> {
        TempBlob::create_in(&self.cache.join("tmp"))
    }

    /// Uploads the temp file (skipped when the object exists) and keeps it in the cache.
    fn commit(&self, mut temp: TempBlob) -> Result<BlobRef, Error> {
        let sha256 = temp.finish()?;
        let size = temp.size;
        self.block_on(self.upload(&sha256, &temp.path, size))?;
        let dest = self.cached(&sha256);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::rename(&temp.path, &dest)?;
        self.trim_cache(&dest);
        Ok(BlobRef { sha256, size })
    }

    fn materialize(&self, sha256: &str) -> Result<PathBuf, Error> {
        self.block_on(self.fetch(sha256))
    }

    /// Every blob with the later of its upload time and its last re-store (touch marker).
    fn list(&self) -> Result<Vec<(String, SystemTime)>, Error> {
        let named = |prefix: ObjectPath| async move {
            let metas: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(os_err)?;
            Ok::<_, Error>(
                metas
                    .into_iter()
                    .filter_map(|m| {
                        let name = m.location.filename()?.to_string();
                        (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                            .then(|| (name, SystemTime::from(m.last_modified)))
                    })
                    .collect::<Vec<_>>(),
            )
        };
        self.block_on(async {
            let blobs = named(self.prefix.child("blobs")).await?;
            let touched: std::collections::HashMap<String, SystemTime> =
                named(self.prefix.child("touched"))
                    .await?
                    .into_iter()
                    .collect();
            Ok(blobs
                .into_iter()
                .map(|(name, t)| {
                    let t = touched.get(&name).map_or(t, |&u| t.max(u));
                    (name, t)
                })
                .collect())
        })
    }

    fn remove_stale_temps(&self, cutoff: SystemTime) -> Result<usize, Error> {
        super::remove_files_older_than(&self.cache.join("tmp"), cutoff)
    }

    fn read_range(
        &self,
        sha256: &str,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<BoxStream<'static, io::Result<Bytes>>, Error>> {
        let location = self.object(sha256);
        Box::pin(async move {
            if range.is_empty() {
                return Ok(futures_util::stream::empty().boxed());
            }
            let options = GetOptions {
                range: Some(GetRange::Bounded(range)),
                ..Default::default()
            };
            let result = self
                .store
                .get_opts(&location, options)
                .await
                .map_err(os_err)?;
            Ok(result
                .into_stream()
                .map_err(|e| io::Error::other(e.to_string()))
                .boxed())
        })
    }

    fn delete<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            for location in [self.object(sha256), self.touch_marker(sha256)] {
                match self.store.delete(&location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(os_err(e)),
                }
            }
            let _ = tokio::fs::remove_file(self.cached(sha256)).await;
            Ok(())
        })
    }

    /// A read (one listing call under the prefix): `/readyz` is unauthenticated, so it must
    /// not make anyone able to write to the bucket.
    fn check(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.store
                .list_with_delimiter(Some(&self.prefix))
                .await
                .map_err(os_err)?;
            Ok(())
        })
    }
}
