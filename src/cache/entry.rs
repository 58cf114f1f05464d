//! The entry file: what is stored for one key, and how a stored file is verified before its
//! fingerprint is believed (ownership and mode, size, format versions, the key it was stored for,
//! the fingerprint's own digest). The hook decides migrations from these files, so anything that
//! does not verify is reported and measured again, never trusted.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::dir::{ENTRY_EXT, QUARANTINE_EXT};
use super::key::{accel_name, model_and_mode};
use super::{Cache, CacheError, CacheKey, CacheWarning, CACHE_FORMAT};
use crate::fingerprint::{Fingerprint, FingerprintError, FORMAT_VERSION};
use crate::fsutil::{read_trusted, write_atomic, FileProblem};

/// Larger entries are not fingerprints (a real one is ~100 KiB); refused before parsing.
const MAX_ENTRY_BYTES: u64 = 16 * 1024 * 1024;
/// The file as written. Key and fingerprint are kept as JSON values when reading so that a
/// layout change is reported as a foreign entry rather than a parse error deep inside.
#[derive(Debug, Serialize, Deserialize)]
struct StoredEntry {
    cache_format: u32,
    measured_at_unix: u64,
    key: serde_json::Value,
    fingerprint: serde_json::Value,
}

/// Why an entry was not trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "detail")]
pub enum EntryProblem {
    /// The file exists but could not be read.
    Unreadable(String),
    /// Not JSON, truncated, wrong fields, or a fingerprint whose digest or normalization does not
    /// match its table.
    Corrupt(String),
    /// Written by another cache or fingerprint format version.
    ForeignVersion(String),
    /// A valid entry for another key (hash collision or a file renamed by hand).
    KeyMismatch,
    /// Not a file cpuguard could have written: not a regular file, a symlink, owned by another
    /// user, or writable by group or others. Whatever it says, someone else could have said it.
    Untrusted(String),
}

impl std::fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryProblem::Unreadable(reason) => write!(f, "unreadable: {reason}"),
            EntryProblem::Corrupt(reason) => write!(f, "corrupt: {reason}"),
            EntryProblem::ForeignVersion(reason) => write!(f, "foreign version: {reason}"),
            EntryProblem::KeyMismatch => {
                write!(f, "stored for another configuration (key mismatch)")
            }
            EntryProblem::Untrusted(reason) => write!(f, "untrusted: {reason}"),
        }
    }
}
/// One entry as `cpuguard cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySummary {
    /// The key digest (file stem).
    pub digest: String,
    /// The entry's path, `<digest>.json`.
    pub file: PathBuf,
    /// The stored key's CPU model (`<cpu><model>`); None without one, or when the entry cannot be
    /// read as far as its key (see `problem`).
    pub model: Option<String>,
    /// The stored key's CPU mode (`custom`, `host-model`, `host-passthrough`, `maximum`); None as
    /// for `model`.
    pub mode: Option<String>,
    /// The stored key's emulator path; None when the entry cannot be read as far as its key.
    pub emulator: Option<String>,
    /// The first line of that emulator's `--version`, as stored; None as for `emulator`.
    pub emulator_version: Option<String>,
    /// The machine type the probe ran; None as for `emulator`, or when the domain named none.
    pub machine: Option<String>,
    /// The accelerator the probe ran under (`kvm` or `tcg`); None as for `emulator`.
    pub accel: Option<String>,
    /// When the entry was measured, seconds since the Unix epoch; None when the file does not
    /// verify.
    pub measured_at_unix: Option<u64>,
    /// The fingerprint's own digest (`sha256:…`).
    pub fingerprint_digest: Option<String>,
    /// None when the entry verifies (its key digests to its file name and its fingerprint is
    /// intact); otherwise why a lookup would discard it.
    pub problem: Option<EntryProblem>,
}
impl Cache {
    /// The entry file for `key` (whether or not it exists).
    pub fn entry_path(&self, key: &CacheKey) -> Result<PathBuf, CacheError> {
        Ok(self.file(&key.digest()?, ENTRY_EXT))
    }
    /// Every entry in the directory, sorted by digest, each checked as a lookup would check it
    /// (except against a caller's key: its stored key must digest to its file name).
    pub fn list(&self) -> Result<Vec<EntrySummary>, CacheError> {
        let mut out = Vec::new();
        for (digest, ext, path) in self.scan()? {
            if ext == ENTRY_EXT {
                out.push(summarize(&digest, &path));
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }
}

pub(super) enum EntryRead {
    Good(Box<Fingerprint>),
    Missing,
    Bad(EntryProblem),
}

/// One key's digest, its expected stored form, and its files.
pub(super) struct Prepared<'a> {
    cache: &'a Cache,
    pub(super) digest: String,
    key_value: serde_json::Value,
    pub(super) entry: PathBuf,
}

impl<'a> Prepared<'a> {
    pub(super) fn new(cache: &'a Cache, key: &CacheKey) -> Result<Self, CacheError> {
        let digest = key.digest()?;
        let key_value = serde_json::to_value(key).map_err(CacheError::Serialize)?;
        let entry = cache.file(&digest, ENTRY_EXT);
        Ok(Prepared {
            cache,
            digest,
            key_value,
            entry,
        })
    }

    pub(super) fn read(&self) -> EntryRead {
        let text = match read_limited(&self.entry) {
            Ok(Some(text)) => text,
            Ok(None) => return EntryRead::Missing,
            Err(problem) => return EntryRead::Bad(problem),
        };
        match check_entry(&text, Some(&self.key_value), &self.entry) {
            Ok((fingerprint, _)) => EntryRead::Good(Box::new(fingerprint)),
            Err(problem) => EntryRead::Bad(problem),
        }
    }

    /// Under the key's lock: the entry if good; a bad one is moved aside and reported.
    pub(super) fn read_locked(&self, warnings: &mut Vec<CacheWarning>) -> Option<Fingerprint> {
        match self.read() {
            EntryRead::Good(fingerprint) => Some(*fingerprint),
            EntryRead::Missing => None,
            EntryRead::Bad(problem) => {
                let aside = self.cache.file(&self.digest, QUARANTINE_EXT);
                let moved_to = match fs::rename(&self.entry, &aside) {
                    Ok(()) => Some(aside),
                    Err(_) => None,
                };
                warnings.push(CacheWarning::Discarded {
                    file: self.entry.clone(),
                    problem,
                    moved_to,
                });
                None
            }
        }
    }

    /// Under the key's lock: writes the entry (fsync, rename, fsync of the directory).
    pub(super) fn store(&self, fingerprint: &Fingerprint) -> Result<(), String> {
        // Only a killed writer of this key can have left these, and it no longer runs: we hold
        // the lock.
        self.cache
            .remove_stale_temps(&self.digest)
            .map_err(|e| e.to_string())?;
        let fingerprint = serde_json::to_value(fingerprint).map_err(|e| e.to_string())?;
        let measured_at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let stored = StoredEntry {
            cache_format: CACHE_FORMAT,
            measured_at_unix,
            key: self.key_value.clone(),
            fingerprint,
        };
        let text = serde_json::to_vec_pretty(&stored).map_err(|e| e.to_string())?;
        write_atomic(&self.entry, &text, 0o600).map_err(|e| e.to_string())?;
        // The rename is durable only once the directory is synced; failing that only risks a
        // miss after a crash, so it is not an error.
        if let Ok(dir) = File::open(&self.cache.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// The file's text; None when it does not exist. Read as a file cpuguard wrote must be (see
/// [`crate::fsutil::read_trusted`]): an entry someone else owns or can write is not trusted.
pub(super) fn read_limited(path: &Path) -> Result<Option<String>, EntryProblem> {
    let bytes = match read_trusted(path, MAX_ENTRY_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(FileProblem::TooLarge { .. }) => {
            return Err(EntryProblem::Corrupt(format!(
                "larger than {MAX_ENTRY_BYTES} bytes"
            )))
        }
        Err(problem @ (FileProblem::Open(_) | FileProblem::Read(_))) => {
            return Err(EntryProblem::Unreadable(problem.to_string()))
        }
        Err(problem) => return Err(EntryProblem::Untrusted(problem.to_string())),
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| EntryProblem::Corrupt("not UTF-8".to_string()))
}

/// An entry of the current formats, read straight into its types: the hook's warm path. Parsing
/// into `serde_json::Value` first and converting after cost ~3 million instructions, half of the
/// warm incoming check (callgrind); anything this does not accept goes through the
/// value-by-value path of [`check_entry`], which says what is wrong with it.
#[derive(Deserialize)]
struct CurrentEntry {
    cache_format: u32,
    measured_at_unix: u64,
    key: serde_json::Value,
    fingerprint: Fingerprint,
}

/// Verifies an entry's text: its format, its key (against `expected` when given), and its
/// fingerprint. Returns the fingerprint and the stored entry.
fn check_entry(
    text: &str,
    expected: Option<&serde_json::Value>,
    path: &Path,
) -> Result<(Fingerprint, StoredEntry), EntryProblem> {
    if let Ok(entry) = serde_json::from_str::<CurrentEntry>(text) {
        if entry.cache_format == CACHE_FORMAT
            && entry.fingerprint.format_version == FORMAT_VERSION
            && expected.is_none_or(|expected| &entry.key == expected)
        {
            let origin = path.display().to_string();
            entry.fingerprint.verify(&origin).map_err(|e| match e {
                FingerprintError::Version { .. } => EntryProblem::ForeignVersion(e.to_string()),
                other => EntryProblem::Corrupt(other.to_string()),
            })?;
            let stored = StoredEntry {
                cache_format: entry.cache_format,
                measured_at_unix: entry.measured_at_unix,
                key: entry.key,
                fingerprint: serde_json::Value::Null,
            };
            return Ok((entry.fingerprint, stored));
        }
    }
    check_entry_by_value(text, expected, path)
}

/// [`check_entry`] one field at a time, so a foreign or damaged entry is classified (foreign
/// version, key mismatch, corrupt) rather than reported as a parse error deep inside.
fn check_entry_by_value(
    text: &str,
    expected: Option<&serde_json::Value>,
    path: &Path,
) -> Result<(Fingerprint, StoredEntry), EntryProblem> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| EntryProblem::Corrupt(e.to_string()))?;
    match value
        .get("cache_format")
        .and_then(serde_json::Value::as_u64)
    {
        Some(v) if v == u64::from(CACHE_FORMAT) => {}
        Some(v) => {
            return Err(EntryProblem::ForeignVersion(format!(
                "cache_format {v}, expected {CACHE_FORMAT}"
            )))
        }
        None => {
            return Err(EntryProblem::Corrupt(
                "no numeric cache_format field".to_string(),
            ))
        }
    }
    let mut stored: StoredEntry =
        serde_json::from_value(value).map_err(|e| EntryProblem::Corrupt(e.to_string()))?;
    if let Some(expected) = expected {
        if &stored.key != expected {
            return Err(EntryProblem::KeyMismatch);
        }
    }
    // Checked like Fingerprint::from_json (version first, then layout, then its invariants),
    // without printing the value back to text to parse it again: this is the hook's warm path.
    let origin = path.display().to_string();
    let fingerprint_value = std::mem::take(&mut stored.fingerprint);
    match fingerprint_value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
    {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        found => {
            return Err(EntryProblem::ForeignVersion(format!(
                "fingerprint format_version {}, expected {FORMAT_VERSION}",
                found.map_or_else(|| "(missing)".to_string(), |v| v.to_string())
            )))
        }
    }
    let fingerprint: Fingerprint = serde_json::from_value(fingerprint_value)
        .map_err(|e| EntryProblem::Corrupt(format!("fingerprint: {e}")))?;
    fingerprint.verify(&origin).map_err(|e| match e {
        FingerprintError::Version { .. } => EntryProblem::ForeignVersion(e.to_string()),
        other => EntryProblem::Corrupt(other.to_string()),
    })?;
    Ok((fingerprint, stored))
}

fn summarize(digest: &str, path: &Path) -> EntrySummary {
    let mut summary = EntrySummary {
        digest: digest.to_string(),
        file: path.to_path_buf(),
        model: None,
        mode: None,
        emulator: None,
        emulator_version: None,
        machine: None,
        accel: None,
        measured_at_unix: None,
        fingerprint_digest: None,
        problem: None,
    };
    let text = match read_limited(path) {
        Ok(Some(text)) => text,
        Ok(None) => {
            summary.problem = Some(EntryProblem::Unreadable("removed while listing".into()));
            return summary;
        }
        Err(problem) => {
            summary.problem = Some(problem);
            return summary;
        }
    };
    let (fingerprint, stored) = match check_entry(&text, None, path) {
        Ok(pair) => pair,
        Err(problem) => {
            summary.problem = Some(problem);
            return summary;
        }
    };
    summary.measured_at_unix = Some(stored.measured_at_unix);
    summary.fingerprint_digest = Some(fingerprint.digest);
    match serde_json::from_value::<CacheKey>(stored.key) {
        Ok(key) => {
            let (model, mode) = model_and_mode(&key.config);
            summary.model = model;
            summary.mode = mode;
            summary.emulator = Some(key.emulator.path.clone());
            summary.emulator_version = Some(key.emulator.version.clone());
            summary.machine = key.machine.clone();
            summary.accel = Some(accel_name(key.accel).to_string());
            match key.digest() {
                Ok(d) if d == digest => {}
                Ok(_) => summary.problem = Some(EntryProblem::KeyMismatch),
                Err(e) => summary.problem = Some(EntryProblem::Corrupt(e.to_string())),
            }
        }
        Err(e) => summary.problem = Some(EntryProblem::ForeignVersion(format!("key: {e}"))),
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fingerprint, key, names, obtain};
    use super::super::Source;
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn an_entry_others_can_write_is_remeasured() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(&tmp.path().join("cache")).unwrap();
        let k = key("Haswell-noTSX");
        let calls = AtomicUsize::new(0);
        obtain(&cache, &k, &calls, 1);
        let entry = cache.entry_path(&k).unwrap();
        fs::set_permissions(&entry, fs::Permissions::from_mode(0o666)).unwrap();
        let got = obtain(&cache, &k, &calls, 2);
        assert_eq!(got.source, Source::Measured);
        assert!(
            matches!(&got.warnings[..], [CacheWarning::Discarded { problem: EntryProblem::Untrusted(why), moved_to: Some(_), .. }] if why.contains("0666")),
            "{:?}",
            got.warnings
        );
    }
    /// Writes `mangle(entry text)` over k's entry, then checks the next get_or_measure discards
    /// it with `expected` problem, re-measures, and leaves a good entry.
    fn assert_remeasured(mangle: impl Fn(&str) -> String, expected: fn(&EntryProblem) -> bool) {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Haswell-noTSX");
        let calls = AtomicUsize::new(0);
        obtain(&cache, &k, &calls, 0x11);
        let entry = cache.entry_path(&k).unwrap();
        let good = fs::read_to_string(&entry).unwrap();
        fs::write(&entry, mangle(&good)).unwrap();

        let got = obtain(&cache, &k, &calls, 0x22);
        assert_eq!(got.source, Source::Measured);
        assert_eq!(got.fingerprint, fingerprint(0x22));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        match got.warnings.as_slice() {
            [CacheWarning::Discarded {
                file,
                problem,
                moved_to: Some(aside),
            }] => {
                assert_eq!(file, &entry);
                assert!(expected(problem), "unexpected problem {problem}");
                assert_eq!(fs::read_to_string(aside).unwrap(), mangle(&good));
                let line = got.warnings[0].to_string();
                assert!(line.contains("discarded") && !line.contains('\n'), "{line}");
            }
            other => panic!("expected one Discarded warning, got {other:?}"),
        }
        // The new entry is good: a hit with the new measurement.
        let again = obtain(&cache, &k, &calls, 0x33);
        assert_eq!(
            (again.source, again.fingerprint),
            (Source::Hit, fingerprint(0x22))
        );
        let listed = cache.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].problem, None);
    }

    #[test]
    fn truncated_entry_is_remeasured() {
        assert_remeasured(
            |t| t[..t.len() / 2].to_string(),
            |p| matches!(p, EntryProblem::Corrupt(_)),
        );
    }

    #[test]
    fn entry_with_wrong_fingerprint_digest_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["fingerprint"]["digest"] =
                    serde_json::json!(format!("sha256:{}", "0".repeat(64)));
                v.to_string()
            },
            |p| matches!(p, EntryProblem::Corrupt(m) if m.contains("digest")),
        );
    }

    #[test]
    fn entry_with_tampered_table_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["fingerprint"]["normalized"]["entries"][1]["ecx"] = serde_json::json!(0x7f);
                v.to_string()
            },
            |p| matches!(p, EntryProblem::Corrupt(_)),
        );
    }

    #[test]
    fn foreign_fingerprint_version_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["fingerprint"]["format_version"] = serde_json::json!(999);
                v.to_string()
            },
            |p| matches!(p, EntryProblem::ForeignVersion(m) if m.contains("999")),
        );
    }

    #[test]
    fn foreign_cache_format_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["cache_format"] = serde_json::json!(CACHE_FORMAT + 1);
                v.to_string()
            },
            |p| matches!(p, EntryProblem::ForeignVersion(_)),
        );
    }

    #[test]
    fn entry_of_another_key_is_not_trusted() {
        // A valid entry for EPYC renamed to Haswell's file name.
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let calls = AtomicUsize::new(0);
        obtain(&cache, &key("EPYC"), &calls, 0x44);
        let epyc = cache.entry_path(&key("EPYC")).unwrap();
        let k = key("Haswell-noTSX");
        let entry = cache.entry_path(&k).unwrap();
        fs::rename(&epyc, &entry).unwrap();

        let listed = cache.list().unwrap();
        assert_eq!(
            listed[0].problem,
            Some(EntryProblem::KeyMismatch),
            "list checks name against key"
        );

        let lookup = cache.get(&k).unwrap();
        assert_eq!(lookup.fingerprint, None);
        assert!(matches!(
            lookup.warnings.as_slice(),
            [CacheWarning::Discarded {
                problem: EntryProblem::KeyMismatch,
                moved_to: Some(_),
                ..
            }]
        ));
        assert!(!entry.exists(), "moved aside");
        let got = obtain(&cache, &k, &calls, 0x55);
        assert_eq!(
            (got.source, got.fingerprint),
            (Source::Measured, fingerprint(0x55))
        );
        assert!(got.warnings.is_empty());
    }
    #[test]
    fn unstorable_measurement_is_returned_with_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let digest = k.digest().unwrap();
        // Non-empty directories where the entry and its quarantine go: neither rename can work.
        for ext in [ENTRY_EXT, QUARANTINE_EXT] {
            let d = tmp.path().join(format!("{digest}.{ext}"));
            fs::create_dir(&d).unwrap();
            fs::write(d.join("x"), b"x").unwrap();
        }
        let calls = AtomicUsize::new(0);
        let got = obtain(&cache, &k, &calls, 0x66);
        assert_eq!(
            (got.source, &got.fingerprint),
            (Source::Measured, &fingerprint(0x66))
        );
        assert!(
            matches!(
                got.warnings.as_slice(),
                [
                    CacheWarning::Discarded {
                        moved_to: None,
                        problem: EntryProblem::Untrusted(_),
                        ..
                    },
                    CacheWarning::NotStored { .. }
                ]
            ),
            "{:?}",
            got.warnings
        );
        assert!(got.warnings[1].to_string().contains("not stored"));
        let leftovers: Vec<String> = names(tmp.path())
            .into_iter()
            .filter(|n| n.ends_with(".lock") || n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
