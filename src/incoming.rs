//! "This start is an incoming migration": the note the migrate/restore phase leaves for the prepare
//! phase that follows it.
//!
//! libvirt calls `prepare` the same way for a normal start and for an incoming migration, so the
//! earlier phase records the fact in a small per-domain file under the runtime directory. That
//! directory decides whether a guest is checked at all, so it gets the cache directory's checks
//! (owned by the user running cpuguard, no symlink, narrowed to 0700 when too open, and then
//! everything it held is discarded). The file is written atomically (temp file, fsync, rename),
//! named by a digest of the domain name (never by the untrusted name), names the domain's UUID,
//! and is consumed by renaming it away (so exactly one prepare phase gets it) by the prepare phase
//! of the domain with that UUID. A record of another UUID (a migration that failed after
//! `migrate begin`, then another domain of that name started) or an expired one is discarded
//! without judging the start. Records are read without following links or blocking on a FIFO.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::fsutil::{self, DirError, FileProblem};

/// The shortest `incoming_ttl_secs` accepted: libvirt runs `prepare` right after `migrate begin`,
/// but a destination whose libvirt capabilities cache is cold takes ~50 s to get there.
pub const MIN_TTL_SECS: u64 = 60;

/// A record is ~200 bytes; anything larger was not written by cpuguard.
pub const MAX_RECORD_BYTES: u64 = 4096;

/// A claimed or temporary file older than this was left by a killed process.
const LEFTOVER_SECS: i64 = 60;

/// Why the incoming-migration record could not be written or claimed; each names the path.
#[derive(Debug, Error)]
pub enum IncomingError {
    /// The runtime directory or its `incoming/` is missing and cannot be created, or is not safe to
    /// trust.
    #[error("runtime directory {path}: {source}")]
    Dir {
        /// The directory concerned.
        path: PathBuf,
        /// What is wrong with it.
        source: DirError,
    },
    /// The record could not be written (serialized, or replaced atomically).
    #[error("cannot write incoming-migration record {path}: {source}")]
    Write {
        /// The record's file, `<runtime>/incoming/<digest>.json`.
        path: PathBuf,
        /// Why writing it failed.
        source: std::io::Error,
    },
    /// The record exists but could not be renamed away to claim it.
    #[error("cannot claim incoming-migration record {path}: {source}")]
    Claim {
        /// The record's file, `<runtime>/incoming/<digest>.json`.
        path: PathBuf,
        /// Why `rename` failed.
        source: std::io::Error,
    },
    /// The claimed file is not one cpuguard could have written (a symlink, a FIFO, another owner,
    /// writable by others, too large).
    #[error("incoming-migration record {path} {problem}")]
    Untrusted {
        /// The record's file, as named before claiming.
        path: PathBuf,
        /// What is wrong with it.
        problem: FileProblem,
    },
    /// The claimed file is not a record (not JSON, or wrong fields).
    #[error("incoming-migration record {path} is corrupt: {reason}")]
    Corrupt {
        /// The record's file, as named before claiming.
        path: PathBuf,
        /// The JSON parser's message.
        reason: String,
    },
}

/// How the prepare phase knows a guest is incoming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Announced by `migrate begin`.
    Migrate,
    /// Announced by `restore begin`.
    Restore,
    /// No record, but the prepare-phase XML carries a cpuguard stamp: a stamp lives only in a
    /// running domain's live metadata, so this XML is a running guest's (an incoming migration or
    /// restore whose record went missing), never a definition started cold.
    Inferred,
}

impl Origin {
    /// The origin as audit records and the record file spell it: `migrate`, `restore`, `inferred`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Migrate => "migrate",
            Origin::Restore => "restore",
            Origin::Inferred => "inferred",
        }
    }

    /// How messages name the operation.
    pub fn describe(self) -> &'static str {
        match self {
            Origin::Migrate => "incoming migration",
            Origin::Restore => "restore",
            Origin::Inferred => "incoming guest",
        }
    }
}

/// The note the migrate or restore phase leaves for the prepare phase of the same domain, as stored
/// (JSON) under `<runtime>/incoming/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRecord {
    /// The domain's name, as libvirt passed it in argv.
    pub domain: String,
    /// The domain's UUID from the phase's XML; the prepare phase takes the record only with the
    /// same UUID (compared case-insensitively; None matches only None).
    pub uuid: Option<String>,
    /// Which phase wrote the record.
    pub origin: Origin,
    /// Seconds since the epoch.
    pub created: u64,
    /// Seconds since the epoch after which the record is stale: `created` plus `incoming_ttl_secs`.
    pub expires: u64,
}

/// What the prepare phase found for its domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No record.
    None,
    /// This domain's record, now consumed.
    Matched(IncomingRecord),
    /// A record was there but is not this start's (another UUID, expired); consumed, and why.
    Stale(String),
}

/// Now, in whole seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The record's file: `<runtime>/incoming/<digest of the name>.json`. Keyed by the name libvirt
/// passes in argv so a normal start's prepare phase finds out with one `stat`; digested because
/// the name is untrusted and must not become a path.
pub fn record_path(runtime_dir: &Path, name: &str) -> PathBuf {
    let key = hex::encode(&Sha256::digest(name.as_bytes())[..16]);
    runtime_dir.join("incoming").join(format!("{key}.json"))
}

/// Checks (creating them) the runtime directory and its `incoming/`. When either had to be
/// narrowed (someone else could write there), every record it held is discarded: returns how
/// many, for the audit trail.
pub fn check_dir(runtime_dir: &Path) -> Result<usize, IncomingError> {
    let dir = runtime_dir.join("incoming");
    let mut narrowed = false;
    for d in [runtime_dir, dir.as_path()] {
        match fsutil::private_dir(d) {
            Ok(was) => narrowed |= was.is_some(),
            Err(source) => {
                return Err(IncomingError::Dir {
                    path: d.to_path_buf(),
                    source,
                })
            }
        }
    }
    if !narrowed {
        return Ok(0);
    }
    let mut discarded = 0;
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if fs::remove_file(entry.path()).is_ok() {
                discarded += 1;
            }
        }
    }
    Ok(discarded)
}

/// Writes the record atomically; removes expired and foreign files on the way. The directory
/// must have passed [`check_dir`].
pub fn write(runtime_dir: &Path, record: &IncomingRecord) -> Result<PathBuf, IncomingError> {
    let path = record_path(runtime_dir, &record.domain);
    let dir = path.parent().unwrap_or(runtime_dir).to_path_buf();
    sweep(&dir, record.created);
    let json = serde_json::to_vec(record).map_err(|e| IncomingError::Write {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    if let Err(source) = crate::fsutil::write_atomic(&path, &json, 0o600) {
        return Err(IncomingError::Write { path, source });
    }
    Ok(path)
}

/// Consumes the record for this start, if any. The file is first renamed to a name only this
/// process uses, so two prepare phases can never both act on one record, then read as a
/// trusted file. Its name and UUID must be this domain's (`uuid` from the prepare-phase XML).
pub fn take(
    runtime_dir: &Path,
    name: &str,
    uuid: Option<&str>,
    now: u64,
) -> Result<Claim, IncomingError> {
    let path = record_path(runtime_dir, name);
    let claimed = claimed_path(&path);
    match fs::rename(&path, &claimed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Claim::None),
        Err(source) => return Err(IncomingError::Claim { path, source }),
    }
    let read = fsutil::read_trusted(&claimed, MAX_RECORD_BYTES);
    // Consumed whatever it says: a record is good for exactly one prepare phase.
    let _ = fs::remove_file(&claimed);
    let bytes = match read {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(Claim::None),
        Err(problem) => return Err(IncomingError::Untrusted { path, problem }),
    };
    let record: IncomingRecord =
        serde_json::from_slice(&bytes).map_err(|e| IncomingError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if record.expires < now {
        return Ok(Claim::Stale(format!(
            "incoming record {} expired {} s ago",
            path.display(),
            now - record.expires
        )));
    }
    let same_uuid = match (record.uuid.as_deref(), uuid) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        (None, None) => true,
        _ => false,
    };
    if record.domain != name || !same_uuid {
        return Ok(Claim::Stale(format!(
            "incoming record {} was left for uuid {}, not this domain's {}",
            path.display(),
            record.uuid.as_deref().unwrap_or("(none)"),
            uuid.unwrap_or("(none)")
        )));
    }
    Ok(Claim::Matched(record))
}

/// Whether a record file is present for `name` (one `lstat`, whatever the file is).
pub fn present(runtime_dir: &Path, name: &str) -> bool {
    fs::symlink_metadata(record_path(runtime_dir, name)).is_ok()
}

fn claimed_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.claimed", std::process::id()))
}

/// Removes expired records, anything in the directory that is not a record cpuguard could have
/// written (a FIFO, a symlink, an oversized or corrupt file), and claimed or temporary files left
/// by killed processes. Never blocks: every file is read as [`fsutil::read_trusted`] reads.
fn sweep(dir: &Path, now: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            // write_atomic's temp files and claimed records: the rename that made them changed
            // their ctime, so an old ctime means their process is gone.
            let old = fs::symlink_metadata(&path)
                .map(|m| (now as i64).saturating_sub(m.ctime()) > LEFTOVER_SECS)
                .unwrap_or(false);
            if old {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        let keep = match fsutil::read_trusted(&path, MAX_RECORD_BYTES) {
            Ok(Some(bytes)) => serde_json::from_slice::<IncomingRecord>(&bytes)
                .map(|r| r.expires >= now)
                .unwrap_or(false),
            Ok(None) => true,
            Err(_) => false,
        };
        if !keep {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
    const OTHER: &str = "aaaaaaaa-0000-0000-0000-000000000000";

    fn ready(dir: &Path) {
        check_dir(dir).expect("private runtime dir");
    }

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
    fn written_record_is_taken_once_by_its_uuid() {
        let dir = tempfile::tempdir().expect("tempdir");
        ready(dir.path());
        let r = record("guest1", Some(UUID), 1000, 600);
        let path = write(dir.path(), &r).expect("written");
        assert!(path.exists());
        // The UUID is compared as libvirt treats it: case-insensitively.
        let lower = UUID.to_ascii_lowercase();
        assert_eq!(
            take(dir.path(), "guest1", Some(&lower), 1001).expect("read"),
            Claim::Matched(r)
        );
        assert_eq!(
            take(dir.path(), "guest1", Some(UUID), 1002).expect("read"),
            Claim::None
        );
        // No temp or claimed files are left behind.
        let left: Vec<_> = fs::read_dir(dir.path().join("incoming"))
            .expect("dir")
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn a_record_of_another_uuid_is_stale_and_consumed() {
        let dir = tempfile::tempdir().expect("tempdir");
        ready(dir.path());
        write(dir.path(), &record("web1", Some(UUID), 1000, 600)).expect("written");
        match take(dir.path(), "web1", Some(OTHER), 1001).expect("read") {
            Claim::Stale(why) => assert!(why.contains(OTHER) && why.contains(UUID), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(!present(dir.path(), "web1"));
    }

    #[test]
    fn expired_records_do_not_count_and_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        ready(dir.path());
        write(dir.path(), &record("old", None, 100, 10)).expect("written");
        assert!(matches!(
            take(dir.path(), "old", None, 200).expect("read"),
            Claim::Stale(_)
        ));
        let stale = write(dir.path(), &record("stale", None, 100, 10)).expect("written");
        write(dir.path(), &record("new", None, 500, 10)).expect("written");
        assert!(!stale.exists(), "expired record swept by a later write");
    }

    #[test]
    fn corrupt_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        ready(dir.path());
        let path = record_path(dir.path(), "g");
        fs::write(&path, b"{not json").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = take(dir.path(), "g", None, 0).expect_err("corrupt");
        assert!(e.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn fifo_and_symlink_records_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        ready(dir.path());
        let path = record_path(dir.path(), "g");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        let e = take(dir.path(), "g", None, 0).expect_err("fifo");
        assert!(
            e.to_string().ends_with("is not a regular file (a FIFO)"),
            "{e}"
        );
        std::os::unix::fs::symlink("/etc/hostname", &path).expect("symlink");
        let e = take(dir.path(), "g", None, 0).expect_err("symlink");
        assert!(e.to_string().contains("a symlink"), "{e}");
        // A FIFO among the records does not stop the sweep either.
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        write(dir.path(), &record("h", None, 0, 600)).expect("written past a FIFO");
        assert!(!path.exists(), "the FIFO was swept");
    }

    #[test]
    fn unwritable_runtime_dir_is_an_error() {
        let e = check_dir(Path::new("/proc/cpuguard-test")).expect_err("cannot create under /proc");
        assert!(e
            .to_string()
            .starts_with("runtime directory /proc/cpuguard-test: cannot create"));
    }

    #[test]
    fn a_too_open_runtime_dir_is_narrowed_and_its_records_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        ready(dir.path());
        write(dir.path(), &record("g", None, now(), 600)).expect("written");
        fs::set_permissions(
            dir.path().join("incoming"),
            fs::Permissions::from_mode(0o777),
        )
        .expect("chmod");
        assert_eq!(check_dir(dir.path()).expect("narrowed"), 1);
        let mode = fs::metadata(dir.path().join("incoming"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!present(dir.path(), "g"));
    }
}
