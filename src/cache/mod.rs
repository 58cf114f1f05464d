//! The fingerprint cache: one measured [`Fingerprint`] per distinct guest CPU configuration on this
//! host, so that only the first migration of a configuration pays for a probe.
//!
//! Layout of the cache directory (root-only, mode 0700):
//!
//! - `<digest>.json`: one entry; `<digest>` is the sha256 hex of the [`CacheKey`]'s canonical JSON.
//!   The entry stores the key itself, and a lookup compares it with the key asked for: a hash
//!   collision or a file renamed by hand is a miss, never a wrong answer.
//! - `<digest>.lock`: exists only while a process measures that key; it is held with `flock` and
//!   removed by its holder before unlocking (see `lock::KeyLock` for why that is safe).
//! - `<digest>.corrupt`: the last entry of that key that failed verification, kept for the
//!   operator (one per key at most, replaced by the next).
//! - `.<digest>.json.<pid>.tmp`: a write in progress ([`crate::fsutil::write_atomic`]); one left
//!   by a killed process is removed the next time that key is locked, or by [`Cache::clear`].
//! - `<digest>.emulator`: an emulator binary's version, keyed by the binary's metadata
//!   ([`Cache::emulator_identity`]), so the warm path does not start QEMU just to ask it.
//!
//! Concurrency: readers never lock (entries appear by atomic rename, so a reader sees a whole old
//! file or a whole new one). A miss takes the key's exclusive lock, looks again (another process
//! may have measured meanwhile), and only then measures: concurrent callers for one key measure
//! once, different keys proceed in parallel. A bad entry is only moved aside under the lock, so
//! a process cannot remove a good entry that another has just renamed into place.
//!
//! The code is split by concern: `key` (what a measurement depends on and its digest),
//! `entry` (the file format and its verification), `lock` (the per-key `flock` protocol) and
//! `dir` (the directory's own checks, file names and housekeeping). This file joins them into
//! the lookups callers use.

mod dir;
mod entry;
mod key;
mod lock;

pub use entry::{EntryProblem, EntrySummary};
pub use key::{CacheKey, EmulatorIdentity, HostIdentity, ProbeIdentity};

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::fingerprint::{Fingerprint, FingerprintError};

use entry::{EntryRead, Prepared};

/// Version of the entry layout and of the key's serialization. Part of every digest, so a new
/// layout never reads an old file; an entry claiming another version is treated as foreign.
pub const CACHE_FORMAT: u32 = 1;

/// How long a caller waits for another process measuring the same key before giving up, when
/// the cache is not opened from a [`Config`]. A probe is bounded by its own timeout (default
/// 30 s), so this only trips when the holder is stuck outside the probe (e.g. stopped).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(75);

/// Why the fingerprint cache could not answer, or why the measurement it ran failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory could not be created, or not `stat`ed once it existed.
    #[error("cache directory {path}: cannot create: {source}")]
    CreateDir {
        /// The cache directory.
        path: PathBuf,
        /// Why `mkdir` or `lstat` failed.
        source: io::Error,
    },
    /// The cache directory exists but is not safe to trust: owned by another user, not a directory,
    /// or a symlink.
    #[error("cache directory {path}: {reason}")]
    UnsafeDir {
        /// The cache directory.
        path: PathBuf,
        /// What is wrong with it, as one line.
        reason: String,
    },
    /// The cache directory could not be narrowed to mode 0700, or is not writable (e.g. a read-only
    /// file system).
    #[error("cache directory {path}: not writable: {source}")]
    NotWritable {
        /// The cache directory.
        path: PathBuf,
        /// The failed `chmod` or `access(2)` call's error.
        source: io::Error,
    },
    /// The cache directory could not be read to find cpuguard's files in it.
    #[error("cache directory {path}: cannot list: {source}")]
    List {
        /// The cache directory.
        path: PathBuf,
        /// Why `readdir` failed.
        source: io::Error,
    },
    /// A key's lock file could not be opened or locked.
    #[error("cache lock {path}: {source}")]
    Lock {
        /// The lock file, `<digest>.lock`.
        path: PathBuf,
        /// The failed `open`, `flock` or `stat` call's error.
        source: io::Error,
    },
    /// Another process held the key's lock for longer than the lock timeout (see
    /// [`Cache::with_lock_timeout`]).
    #[error("cache lock {path}: another process has been measuring this configuration for {waited:?}; giving up")]
    LockTimeout {
        /// The lock file, `<digest>.lock`.
        path: PathBuf,
        /// How long this caller waited before giving up.
        waited: Duration,
    },
    /// A file of the cache could not be removed.
    #[error("cache file {path}: cannot remove: {source}")]
    Remove {
        /// The file that stays.
        path: PathBuf,
        /// Why `unlink` failed.
        source: io::Error,
    },
    /// The emulator binary named in the key could not be `stat`ed, so its identity is unknown.
    #[error("cache key: emulator {path}: cannot stat: {source}")]
    Emulator {
        /// The emulator binary.
        path: PathBuf,
        /// Why `stat` failed.
        source: io::Error,
    },
    /// The key could not be serialized to its canonical JSON (a bug, not an operator error).
    #[error("cache key: cannot serialize: {0}")]
    Serialize(serde_json::Error),
    /// The measuring closure (the probe) failed; nothing was stored.
    #[error("measuring {what}: {source}")]
    Measure {
        /// What was being measured, as the caller named it (e.g. the domain).
        what: String,
        /// The closure's own error; downcast it to the probe's error type if needed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The measuring closure returned a fingerprint that fails its own verification; nothing was
    /// stored.
    #[error("measuring {what}: the measured fingerprint is invalid: {source}")]
    InvalidMeasurement {
        /// What was being measured, as the caller named it (e.g. the domain).
        what: String,
        /// Why the fingerprint is invalid.
        source: FingerprintError,
    },
}

impl CacheError {
    /// True when the measuring closure failed (the probe), as opposed to the cache itself; the
    /// closure's own error is the `source` of [`CacheError::Measure`] (downcast it if needed).
    pub fn is_measure_failure(&self) -> bool {
        matches!(
            self,
            CacheError::Measure { .. } | CacheError::InvalidMeasurement { .. }
        )
    }
}
/// Something the caller should audit; none of these changes the answer, which is always a
/// verified or freshly measured fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum CacheWarning {
    /// A bad entry was found and not trusted; it was moved to `moved_to` (None: it could not be
    /// moved aside nor removed, and will be overwritten).
    Discarded {
        /// The entry file that was discarded, `<digest>.json`.
        file: PathBuf,
        /// Why the entry was not trusted.
        problem: EntryProblem,
        /// Where it was moved, `<digest>.corrupt`.
        moved_to: Option<PathBuf>,
    },
    /// The fresh measurement could not be stored; the next caller measures again.
    NotStored {
        /// The entry file that was not written, `<digest>.json`.
        file: PathBuf,
        /// Why the write failed.
        reason: String,
    },
    /// The cache could not be used at all (see [`Cache::get_or_measure_or_bypass`]); the
    /// fingerprint was measured without it and not stored.
    Bypassed {
        /// The cache directory.
        dir: PathBuf,
        /// Why the cache could not be used.
        reason: String,
    },
    /// The directory was writable by others (mode `mode`): narrowed to 0700, and the `moved`
    /// entries it held were moved aside (anyone could have planted them), to be measured again.
    Quarantined {
        /// The cache directory.
        dir: PathBuf,
        /// Its mode before narrowing (permission bits, e.g. `0o777`).
        mode: u32,
        /// How many entries were moved aside to `<digest>.corrupt`.
        moved: usize,
    },
}

impl std::fmt::Display for CacheWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheWarning::Discarded {
                file,
                problem,
                moved_to: Some(to),
            } => write!(
                f,
                "cache entry {} discarded ({problem}); moved to {}",
                file.display(),
                to.display()
            ),
            CacheWarning::Discarded {
                file,
                problem,
                moved_to: None,
            } => write!(
                f,
                "cache entry {} discarded ({problem}); it could not be moved aside",
                file.display()
            ),
            CacheWarning::Bypassed { dir, reason } => write!(
                f,
                "fingerprint cache {} bypassed ({reason}); measured without it",
                dir.display()
            ),
            CacheWarning::Quarantined { dir, mode, moved } => write!(
                f,
                "fingerprint cache {} had mode {mode:04o}: narrowed to 0700, its {moved} entr{} moved aside and measured again when needed",
                dir.display(),
                if *moved == 1 { "y" } else { "ies" }
            ),
            CacheWarning::NotStored { file, reason } => write!(
                f,
                "cache entry {} not stored: {reason}; the next migration measures again",
                file.display()
            ),
        }
    }
}

/// Where a fingerprint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A verified entry (possibly written moments ago by a concurrent caller).
    Hit,
    /// Measured by this call.
    Measured,
}

/// Result of [`Cache::get`].
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// The verified fingerprint; `None` on a miss (including a discarded entry).
    pub fingerprint: Option<Fingerprint>,
    /// Bad entries found on the way, for the caller to audit.
    pub warnings: Vec<CacheWarning>,
}

/// Result of [`Cache::get_or_measure`].
#[derive(Debug, Clone, PartialEq)]
pub struct Obtained {
    /// The fingerprint: a verified entry or a fresh measurement.
    pub fingerprint: Fingerprint,
    /// Whether it came from the cache or was measured by this call.
    pub source: Source,
    /// Problems found on the way (a bad entry, a failed store), for the caller to audit.
    pub warnings: Vec<CacheWarning>,
}
/// The fingerprint cache in one directory. Cheap to open; holds no file open between calls.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    lock_timeout: Duration,
    /// What opening found and repaired (a too-open directory), for the caller to audit.
    opened: Vec<CacheWarning>,
}
impl Cache {
    /// What [`Cache::open`] found and repaired; empty for a healthy directory.
    pub fn open_warnings(&self) -> &[CacheWarning] {
        &self.opened
    }
    /// Opens `config.cache_dir`, waiting for a concurrent measurement at most twice the probe
    /// timeout plus slack (the holder may run `--version` and a probe).
    pub fn from_config(config: &Config) -> Result<Cache, CacheError> {
        let wait = Duration::from_secs(
            config
                .probe
                .timeout_secs
                .saturating_mul(2)
                .saturating_add(15),
        );
        Ok(Cache::open(&config.cache_dir)?.with_lock_timeout(wait))
    }

    /// Sets how long a caller waits for another process measuring the same key before failing with
    /// [`CacheError::LockTimeout`] (default [`DEFAULT_LOCK_TIMEOUT`]).
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Cache {
        self.lock_timeout = timeout;
        self
    }

    /// The cache directory this cache reads and writes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The verified entry for `key`, if any. A bad entry is moved aside (under the key's lock),
    /// reported in `warnings`, and answered as a miss.
    pub fn get(&self, key: &CacheKey) -> Result<Lookup, CacheError> {
        let prepared = Prepared::new(self, key)?;
        match prepared.read() {
            EntryRead::Good(fingerprint) => {
                return Ok(Lookup {
                    fingerprint: Some(*fingerprint),
                    warnings: Vec::new(),
                })
            }
            EntryRead::Missing => {
                return Ok(Lookup {
                    fingerprint: None,
                    warnings: Vec::new(),
                })
            }
            EntryRead::Bad(_) => {}
        }
        let _lock = self.lock(&prepared.digest)?;
        let mut warnings = Vec::new();
        let fingerprint = prepared.read_locked(&mut warnings);
        Ok(Lookup {
            fingerprint,
            warnings,
        })
    }

    /// The fingerprint for `key`: a verified entry, or else `measure()`'s result, stored
    /// atomically. Concurrent callers for one key (threads or processes) call `measure` once;
    /// the others wait for the key's lock and then read the stored entry.
    ///
    /// Errors: the cache itself ([`CacheError::Lock`], [`CacheError::LockTimeout`]), or the
    /// measurement ([`CacheError::Measure`], whose source is `measure`'s error). Failing to store
    /// a good measurement is not an error but a [`CacheWarning::NotStored`].
    pub fn get_or_measure<E>(
        &self,
        key: &CacheKey,
        measure: impl FnOnce() -> Result<Fingerprint, E>,
    ) -> Result<Obtained, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.obtain(key, measure, false)
    }

    /// Like [`Cache::get_or_measure`], for callers to whom the cache is only a shortcut (the
    /// hook deciding a migration): when the key's lock cannot be taken (directory turned
    /// unwritable or read-only, disk full, another measurer stuck past the lock timeout) it
    /// measures without the cache and reports [`CacheWarning::Bypassed`] instead of failing.
    /// Only the measurement itself can then fail.
    pub fn get_or_measure_or_bypass<E>(
        &self,
        key: &CacheKey,
        measure: impl FnOnce() -> Result<Fingerprint, E>,
    ) -> Result<Obtained, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.obtain(key, measure, true)
    }

    fn obtain<E>(
        &self,
        key: &CacheKey,
        measure: impl FnOnce() -> Result<Fingerprint, E>,
        bypass: bool,
    ) -> Result<Obtained, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let prepared = Prepared::new(self, key)?;
        if let EntryRead::Good(fingerprint) = prepared.read() {
            return Ok(Obtained {
                fingerprint: *fingerprint,
                source: Source::Hit,
                warnings: Vec::new(),
            });
        }
        let mut warnings = Vec::new();
        let lock = match self.lock(&prepared.digest) {
            Ok(lock) => Some(lock),
            Err(e) if bypass => {
                warnings.push(CacheWarning::Bypassed {
                    dir: self.dir.clone(),
                    reason: e.to_string(),
                });
                None
            }
            Err(e) => return Err(e),
        };
        if lock.is_some() {
            if let Some(fingerprint) = prepared.read_locked(&mut warnings) {
                return Ok(Obtained {
                    fingerprint,
                    source: Source::Hit,
                    warnings,
                });
            }
        }
        let fingerprint = measure().map_err(|e| CacheError::Measure {
            what: key.summary(),
            source: e.into(),
        })?;
        fingerprint
            .verify("measured")
            .map_err(|source| CacheError::InvalidMeasurement {
                what: key.summary(),
                source,
            })?;
        // Without the lock another process may be writing this entry: leave it to them.
        if lock.is_some() {
            if let Err(reason) = prepared.store(&fingerprint) {
                warnings.push(CacheWarning::NotStored {
                    file: prepared.entry.clone(),
                    reason,
                });
            }
        }
        Ok(Obtained {
            fingerprint,
            source: Source::Measured,
            warnings,
        })
    }
}

#[cfg(test)]
mod test_support {
    //! Keys, fingerprints and directory listings shared by the tests of every part of the cache.
    use super::*;
    use crate::domain::guest::{Accel, GuestCpuConfig};
    use crate::fingerprint::HostFacts;
    use crate::x86_64::table::{CpuidEntry, CpuidTable};
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(super) fn config(model: &str) -> GuestCpuConfig {
        let xml = format!(
            "<domain type='qemu'><vcpu>2</vcpu><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>\
             <cpu mode='custom'><model>{model}</model><feature name='vmx' policy='disable'/></cpu></domain>"
        );
        GuestCpuConfig::from_domain_xml(&xml).unwrap()
    }

    pub(super) fn key(model: &str) -> CacheKey {
        let config = config(model);
        CacheKey {
            machine: config.machine.clone(),
            config,
            emulator: EmulatorIdentity {
                path: "/usr/bin/qemu-system-x86_64".into(),
                version: "QEMU emulator version 7.2.0".into(),
                device: 1,
                inode: 2,
                size: 3,
                mtime: 4,
                mtime_nsec: 5,
                ctime: 6,
                ctime_nsec: 7,
            },
            accel: Accel::Tcg,
            host: HostIdentity {
                kernel_release: "6.1.0-18-amd64".into(),
                microcode: "0x49".into(),
                cpu_model: "Intel(R) Xeon(R) CPU E5-2640 v3".into(),
                kvm_parameters: vec![],
            },
            probe: ProbeIdentity::this_build(),
        }
    }

    /// A fingerprint whose leaf 1 ECX carries `marker`, so tests can tell measurements apart.
    pub(super) fn fingerprint(marker: u32) -> Fingerprint {
        let e = |leaf, eax, ebx, ecx, edx| CpuidEntry {
            leaf,
            subleaf: 0,
            eax,
            ebx,
            ecx,
            edx,
        };
        let table = CpuidTable {
            entries: vec![
                e(0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69),
                e(1, 0x000306c1, 0x00000800, marker, 0x178bfbff),
            ],
            msrs: vec![],
        };
        Fingerprint::new(
            HostFacts::default(),
            serde_json::json!({"test": marker}),
            table,
        )
    }

    pub(super) fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// get_or_measure with a counting closure returning `fingerprint(marker)`.
    pub(super) fn obtain(
        cache: &Cache,
        key: &CacheKey,
        calls: &AtomicUsize,
        marker: u32,
    ) -> Obtained {
        cache
            .get_or_measure(key, || {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(fingerprint(marker))
            })
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{fingerprint, key, names, obtain};
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn miss_then_hit() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let calls = AtomicUsize::new(0);
        assert_eq!(
            cache.get(&k).unwrap(),
            Lookup {
                fingerprint: None,
                warnings: vec![]
            }
        );

        let first = obtain(&cache, &k, &calls, 0x11);
        assert_eq!(first.source, Source::Measured);
        assert!(first.warnings.is_empty());
        assert_eq!(first.fingerprint, fingerprint(0x11));
        let second = obtain(&cache, &k, &calls, 0x22);
        assert_eq!(second.source, Source::Hit);
        assert_eq!(
            second.fingerprint,
            fingerprint(0x11),
            "the stored measurement, not a new one"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get(&k).unwrap().fingerprint, Some(fingerprint(0x11)));

        // Only the entry remains: no lock, no temp file.
        let entry = cache.entry_path(&k).unwrap();
        assert_eq!(
            names(tmp.path()),
            vec![entry.file_name().unwrap().to_string_lossy().into_owned()]
        );
        assert_eq!(
            fs::metadata(&entry).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Another key misses.
        let other = obtain(&cache, &key("EPYC"), &calls, 0x33);
        assert_eq!(other.source, Source::Measured);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
    #[test]
    fn failed_measurement_stores_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let err = cache
            .get_or_measure(&k, || {
                Err::<Fingerprint, _>(std::io::Error::other("emulator hung"))
            })
            .unwrap_err();
        assert!(err.is_measure_failure());
        let msg = err.to_string();
        assert!(
            msg.starts_with("measuring Nehalem (custom)") && msg.ends_with("emulator hung"),
            "{msg}"
        );
        assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));

        // A measurement that fails its own verification is not stored either.
        let mut bad = fingerprint(1);
        bad.digest = "sha256:00".into();
        let err = cache
            .get_or_measure(&k, || Ok::<_, std::io::Error>(bad))
            .unwrap_err();
        assert!(
            matches!(err, CacheError::InvalidMeasurement { .. }),
            "{err}"
        );
        assert!(names(tmp.path()).is_empty());
    }
    #[test]
    fn from_config_uses_the_configured_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config {
            cache_dir: tmp.path().join("cache"),
            probe: crate::config::ProbeConfig {
                timeout_secs: 5,
                ..Default::default()
            },
            ..Default::default()
        };
        let cache = Cache::from_config(&config).unwrap();
        assert_eq!(cache.dir(), config.cache_dir);
        assert_eq!(cache.lock_timeout, Duration::from_secs(25));
    }
}
