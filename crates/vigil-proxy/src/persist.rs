//! The last good snapshot on disk, as the signed envelopes that built it: the full
//! snapshot, then each delta. A full snapshot replaces the file atomically (temp file,
//! fsync, rename, fsync of the directory); a delta is appended and fsynced. On load
//! every envelope is verified again, so the file is trusted no more than the network,
//! and a torn last record (a crash mid-append) is simply dropped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use prost::Message as _;
use vigil_snapshot::{Envelope, Verifier};

use crate::index::Index;

/// Largest record accepted when reading back (a full snapshot of a very large site).
const MAX_RECORD: usize = 1 << 30;

/// The snapshot file of a proxy.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// Keeps the snapshot at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Store {
        Store { path: path.into() }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records an applied envelope: a full snapshot starts the file anew.
    pub fn record(&self, envelope: &Envelope, full: bool) -> io::Result<()> {
        let bytes = frame(envelope);
        if full {
            let tmp = self.path.with_extension("tmp");
            {
                let mut f = private(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
            }
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                // Make the rename itself durable.
                File::open(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                })?
                .sync_all()?;
            }
        } else {
            let mut f = OpenOptions::new().append(true).open(&self.path)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
        }
        Ok(())
    }

    /// Size of the file in bytes (0 when absent).
    pub fn size(&self) -> u64 {
        fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Rebuilds the last good snapshot: every envelope verified and applied in order.
    /// Returns `None` when there is no file or its first record is unusable.
    pub fn load(&self, verifier: &Verifier) -> io::Result<Option<(Index, usize)>> {
        let mut data = Vec::new();
        match File::open(&self.path) {
            Ok(mut f) => f.read_to_end(&mut data)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut index: Option<Index> = None;
        let mut records = 0;
        let mut rest = &data[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len > MAX_RECORD || rest.len() < 4 + len {
                tracing::warn!(path = %self.path.display(), "Snapshot file ends in a torn record; ignoring it");
                break;
            }
            let applied = Envelope::decode(&rest[4..4 + len])
                .map_err(|e| e.to_string())
                .and_then(|env| verifier.open(&env).map_err(|e| e.to_string()))
                .and_then(|update| {
                    index
                        .clone()
                        .unwrap_or_default()
                        .apply(update)
                        .map_err(|e| e.to_string())
                });
            match applied {
                Ok(next) => {
                    index = Some(next);
                    records += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "Snapshot file record refused; keeping what came before it");
                    break;
                }
            }
            rest = &rest[4 + len..];
        }
        Ok(index.map(|i| (i, records)))
    }
}

fn frame(envelope: &Envelope) -> Vec<u8> {
    let body = envelope.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Creates (or empties) a file only the proxy's user can read: it holds client secrets.
fn private(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        o.mode(0o600);
    }
    o.open(path)
}
