//! Blob storage, content-addressed by sha256, in a local directory.
//!
//! Bytes arrive in a temp file (hashed on the way, size-limited while streaming), then are
//! renamed to `blobs/<aa>/<sha256>`: a blob path is never derived from a user-supplied name and
//! a reader never sees a half-written blob. Writing the same content twice is harmless (the
//! rename replaces identical bytes), which is what lets a retried job write its output again.
//!
//! Multi-node deployments need every process to see the same directory (a shared volume);
//! an object-store backend is not built yet.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

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
    /// The file system failed.
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

/// The local, content-addressed blob store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// A file being written under the store's temp directory, hashed as it is written.
/// Dropped without [`BlobStore::commit`], it is deleted.
#[derive(Debug)]
pub struct TempBlob {
    path: PathBuf,
    file: Option<io::BufWriter<std::fs::File>>,
    hasher: Sha256,
    size: u64,
}

impl TempBlob {
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

impl BlobStore {
    /// Open (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(Self { root })
    }

    /// The path of a committed blob. `sha256` must be a hash this store produced.
    pub fn path(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("00");
        self.root.join("blobs").join(prefix).join(sha256)
    }

    /// Whether the store's directories are present and writable (for `/readyz`).
    pub async fn check(&self) -> io::Result<()> {
        let probe = self
            .root
            .join("tmp")
            .join(format!(".ready-{}", uuid::Uuid::now_v7()));
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await
    }

    /// A new temp file, for synchronous writers (the job runner).
    pub fn create_temp(&self) -> io::Result<TempBlob> {
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.part", uuid::Uuid::now_v7()));
        let file = std::fs::File::create(&path)?;
        Ok(TempBlob {
            path,
            file: Some(io::BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Stream `body` into a temp blob, failing with [`Error::TooLarge`] as soon as more than
    /// `limit` bytes arrive — memory stays bounded by one chunk whatever the upload size.
    pub async fn write_stream<S, B, E>(&self, body: S, limit: u64) -> Result<TempBlob, Error>
    where
        S: Stream<Item = Result<B, E>>,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let mut temp = self.create_temp()?;
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

    /// Move a finished temp blob into place under its content hash.
    pub fn commit(&self, mut temp: TempBlob) -> Result<BlobRef, Error> {
        let sha256 = temp.finish()?;
        let dest = self.path(&sha256);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::rename(&temp.path, &dest)?;
        Ok(BlobRef {
            sha256,
            size: temp.size,
        })
    }

    /// Store a small in-memory value (reports, canonicalised datasets).
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<BlobRef, Error> {
        let mut temp = self.create_temp()?;
        temp.write_all(bytes)?;
        self.commit(temp)
    }

    /// Every committed blob with its last-modified time (for garbage collection).
    pub fn list(&self) -> io::Result<Vec<(String, std::time::SystemTime)>> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(self.root.join("blobs"))? {
            let dir = dir?;
            if !dir.file_type()?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(dir.path())? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.push((name, entry.metadata()?.modified()?));
                }
            }
        }
        Ok(out)
    }

    /// Delete temp files last written before `cutoff` (left by a crash mid-upload).
    pub fn remove_stale_temps(&self, cutoff: std::time::SystemTime) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            if entry.metadata()?.modified()? < cutoff && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Remove a blob; a missing blob is not an error.
    pub async fn delete(&self, sha256: &str) -> Result<(), Error> {
        match tokio::fs::remove_file(self.path(sha256)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
