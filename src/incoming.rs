//! "This start is an incoming migration": the note the migrate/restore phase leaves for the prepare
//! phase that follows it.
//!
//! libvirt calls `prepare` the same way for a normal start and for an incoming migration, so the
//! earlier phase records the fact in a small per-domain file under the runtime directory. The file
//! is written atomically (temp file, fsync, rename), named by a digest of the domain name (never by the
//! untrusted name), consumed by `prepare`, and ignored once it has expired so a migration that
//! failed between the two phases cannot make a later normal start look like an incoming one.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IncomingError {
    #[error("cannot create runtime directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write incoming-migration record {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read incoming-migration record {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("incoming-migration record {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Which earlier phase announced the incoming guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Migrate,
    Restore,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Migrate => "migrate",
            Origin::Restore => "restore",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub domain: String,
    pub uuid: Option<String>,
    pub origin: Origin,
    /// Seconds since the epoch.
    pub created: u64,
    pub expires: u64,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The record's file: `<runtime>/incoming/<digest of the name>.json`. Keyed by the name libvirt
/// passes in argv so a normal start's prepare phase finds out with one `stat`, without reading the
/// XML; digested because the name is untrusted and must not become a path.
pub fn record_path(runtime_dir: &Path, name: &str) -> PathBuf {
    let key = hex::encode(&Sha256::digest(name.as_bytes())[..16]);
    runtime_dir.join("incoming").join(format!("{key}.json"))
}

/// Writes the record atomically; removes expired records of other domains on the way.
pub fn write(runtime_dir: &Path, record: &IncomingRecord) -> Result<PathBuf, IncomingError> {
    let path = record_path(runtime_dir, &record.domain);
    let dir = path.parent().unwrap_or(runtime_dir).to_path_buf();
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| IncomingError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    sweep_expired(&dir, record.created);
    let json = serde_json::to_vec(record).map_err(|e| IncomingError::Write {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    if let Err(source) = crate::fsutil::write_atomic(&path, &json, 0o600) {
        return Err(IncomingError::Write { path, source });
    }
    Ok(path)
}

/// Consumes the record for this domain: `Some` only if one exists and has not expired.
pub fn take(
    runtime_dir: &Path,
    name: &str,
    now: u64,
) -> Result<Option<IncomingRecord>, IncomingError> {
    let path = record_path(runtime_dir, name);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IncomingError::Read { path, source }),
    };
    // Consumed whatever it says: a record is good for exactly one prepare phase.
    let _ = fs::remove_file(&path);
    let record: IncomingRecord =
        serde_json::from_slice(&bytes).map_err(|e| IncomingError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if record.expires < now {
        return Ok(None);
    }
    Ok(Some(record))
}

fn sweep_expired(dir: &Path, now: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let expired = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<IncomingRecord>(&b).ok())
            .map(|r| r.expires < now)
            .unwrap_or(false);
        if expired {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, uuid: Option<&str>, created: u64, ttl: u64) -> IncomingRecord {
        IncomingRecord {
            domain: name.into(),
            uuid: uuid.map(Into::into),
            origin: Origin::Migrate,
            created,
            expires: created + ttl,
        }
    }

    const UUID: &str = "06C0C0DC-1080-4d3f-bdac-967d624c94f9";

    #[test]
    fn paths_never_come_from_the_name() {
        let run = Path::new("/run/cpuguard");
        let p = record_path(run, "../../etc/passwd");
        assert_eq!(p.parent(), Some(Path::new("/run/cpuguard/incoming")));
        let file = p.file_name().and_then(|n| n.to_str()).expect("file name");
        assert_eq!(file.len(), 32 + ".json".len());
        assert!(file
            .trim_end_matches(".json")
            .chars()
            .all(|c| c.is_ascii_hexdigit()));
        assert_ne!(record_path(run, "a"), record_path(run, "b"));
    }

    #[test]
    fn written_record_is_taken_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = record("guest1", Some(UUID), 1000, 600);
        let path = write(dir.path(), &r).expect("written");
        assert!(path.exists());
        assert_eq!(take(dir.path(), "guest1", 1001).expect("read"), Some(r));
        assert_eq!(take(dir.path(), "guest1", 1002).expect("read"), None);
        // No temp files are left behind.
        let left: Vec<_> = fs::read_dir(dir.path().join("incoming"))
            .expect("dir")
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn expired_records_do_not_count_and_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &record("old", None, 100, 10)).expect("written");
        assert_eq!(take(dir.path(), "old", 200).expect("read"), None);
        let stale = write(dir.path(), &record("stale", None, 100, 10)).expect("written");
        write(dir.path(), &record("new", None, 500, 10)).expect("written");
        assert!(!stale.exists(), "expired record swept by a later write");
    }

    #[test]
    fn corrupt_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = record_path(dir.path(), "g");
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, b"{not json").expect("write");
        let e = take(dir.path(), "g", 0).expect_err("corrupt");
        assert!(e.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn unwritable_runtime_dir_is_an_error() {
        let e = write(Path::new("/proc/cpuguard-test"), &record("g", None, 0, 1))
            .expect_err("cannot create under /proc");
        assert!(e.to_string().starts_with("cannot create runtime directory"));
    }
}
