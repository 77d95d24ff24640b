//! The local backend: blobs in a directory, `blobs/<aa>/<sha256>`, temps in `tmp/`. A
//! committed blob is a rename of its temp file, so readers never see a partial blob.

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{BlobRef, BlobStore, Error, TempBlob};

/// A content-addressed store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(Self { root })
    }

    /// The path of a committed blob. `sha256` must be a hash this store produced.
    fn path(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("00");
        self.root.join("blobs").join(prefix).join(sha256)
    }
}

impl BlobStore for LocalStore {
    fn create_temp(&self) -> io::Result<TempBlob> {
        TempBlob::create_in(&self.root.join("tmp"))
    }

    fn commit(&self, mut temp: TempBlob) -> Result<BlobRef, Error> {
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

    /// The blob's own file; whoever opens it learns if it is missing (an I/O error).
    fn materialize(&self, sha256: &str) -> Result<PathBuf, Error> {
        Ok(self.path(sha256))
    }

    fn list(&self) -> Result<Vec<(String, SystemTime)>, Error> {
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

    fn remove_stale_temps(&self, cutoff: SystemTime) -> Result<usize, Error> {
        super::remove_files_older_than(&self.root.join("tmp"), cutoff)
    }

    fn read_range(
        &self,
        sha256: &str,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<BoxStream<'static, io::Result<Bytes>>, Error>> {
        let path = self.path(sha256);
        Box::pin(async move {
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::NotFound(
                        path.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            if range.start > 0 {
                file.seek(std::io::SeekFrom::Start(range.start)).await?;
            }
            let len = range.end.saturating_sub(range.start);
            Ok(ReaderStream::with_capacity(file.take(len), 1 << 16).boxed())
        })
    }

    fn delete<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.path(sha256)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let probe = self
                .root
                .join("tmp")
                .join(format!(".ready-{}", uuid::Uuid::now_v7()));
            tokio::fs::write(&probe, b"ok").await?;
            tokio::fs::remove_file(&probe).await?;
            Ok(())
        })
    }
}
