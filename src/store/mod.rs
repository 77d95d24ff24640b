//! Blob storage, content-addressed by sha256, behind the [`BlobStore`] trait.
//!
//! Bytes arrive in a temp file (hashed on the way, size-limited while streaming), then are
//! committed under their content hash: a blob's name is never derived from a user-supplied
//! name and a reader never sees a half-written blob. Writing the same content twice is
//! harmless, which is what lets a retried job write its output again.
//!
//! Compute runs on blocking threads and uses the synchronous half of the trait (temp files,
//! commit, [`BlobStore::materialize`] for a local file it can memory-map); HTTP handlers use
//! the asynchronous half (ranges, deletion, readiness). Nothing outside this module sees
//! where a blob lives. A backend is one file here: [`local`] is a directory.

pub mod local;
pub mod object;

use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub use local::LocalStore;
pub use object::ObjectBlobStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The streamed content exceeded the configured limit (nothing was kept).
    #[error("upload exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit in force, in bytes.
        limit: u64,
    },
    /// The request body failed while streaming (client went away, bad chunk).
    #[error("reading the upload failed: {0}")]
    Body(String),
    /// No blob has this hash.
    #[error("blob {0} is not in the store")]
    NotFound(String),
    /// The storage failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A stored blob: its content hash and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Lower-case hex sha256 of the content; also its name in the store.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// A shared handle to the store every part of the process uses.
pub type Store = Arc<dyn BlobStore>;

/// Content-addressed blob storage.
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// A new temp file to write a blob into (hashed as it is written).
    fn create_temp(&self) -> io::Result<TempBlob>;

    /// Puts a finished temp blob into the store under its content hash (blocking).
    fn commit(&self, temp: TempBlob) -> Result<BlobRef, Error>;

    /// Stores a small in-memory value (reports, canonicalised datasets, checkpoints).
    fn put_bytes(&self, bytes: &[u8]) -> Result<BlobRef, Error> {
        let mut temp = self.create_temp()?;
        temp.write_all(bytes)?;
        self.commit(temp)
    }

    /// A local file holding blob `sha256`, for compute that memory-maps or reads it
    /// (blocking). The file must not be modified.
    fn materialize(&self, sha256: &str) -> Result<PathBuf, Error>;

    /// Every committed blob with its last-modified time, for garbage collection (blocking).
    fn list(&self) -> Result<Vec<(String, SystemTime)>, Error>;

    /// Deletes temp files last written before `cutoff` (left by a crash mid-upload);
    /// returns how many (blocking).
    fn remove_stale_temps(&self, cutoff: SystemTime) -> Result<usize, Error>;

    /// The bytes `range` of blob `sha256`, streamed.
    fn read_range(
        &self,
        sha256: &str,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<BoxStream<'static, io::Result<Bytes>>, Error>>;

    /// Removes a blob; a missing blob is not an error.
    fn delete<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Whether the store can be written (for `/readyz`).
    fn check(&self) -> BoxFuture<'_, Result<(), Error>>;
}

/// A file being written under the store's temp directory, hashed as it is written.
/// Dropped without being committed, it is deleted.
#[derive(Debug)]
pub struct TempBlob {
    path: PathBuf,
    file: Option<io::BufWriter<std::fs::File>>,
    hasher: Sha256,
    size: u64,
}

impl TempBlob {
    /// A new, empty temp file in `dir`.
    fn create_in(dir: &Path) -> io::Result<TempBlob> {
        let path = dir.join(format!("{}.part", uuid::Uuid::now_v7()));
        let file = std::fs::File::create(&path)?;
        Ok(TempBlob {
            path,
            file: Some(io::BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Where the temp file lives (to read it back before committing, e.g. for validation).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Flush, close and return the content hash.
    fn finish(&mut self) -> io::Result<String> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        Ok(hex::encode(self.hasher.clone().finalize()))
    }
}

impl Write for TempBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("temp blob already finished"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        self.file.take();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Deletes the files of `dir` last written before `cutoff` (temps left by a crash
/// mid-upload); how many.
fn remove_files_older_than(dir: &Path, cutoff: SystemTime) -> Result<usize, Error> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.metadata()?.modified()? < cutoff && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Streams `body` into a new temp blob of `store`, failing with [`Error::TooLarge`] as soon as
/// more than `limit` bytes arrive — memory stays bounded by one chunk whatever the size.
pub async fn write_stream<S, B, E>(
    store: &dyn BlobStore,
    body: S,
    limit: u64,
) -> Result<TempBlob, Error>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut temp = store.create_temp()?;
    // The temp blob's buffered std writer is not used here: this path writes asynchronously.
    let std_file = temp
        .file
        .take()
        .ok_or_else(|| io::Error::other("fresh temp blob has no file"))?
        .into_inner()
        .map_err(|e| e.into_error())?;
    let mut file =
        tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::Body(e.to_string()))?;
        let chunk = chunk.as_ref();
        temp.size += chunk.len() as u64;
        if temp.size > limit {
            return Err(Error::TooLarge { limit });
        }
        temp.hasher.update(chunk);
        file.write_all(chunk).await?;
    }
    file.flush().await?;
    file.into_inner().sync_all().await?;
    Ok(temp)
}
