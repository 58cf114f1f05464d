//! The cache directory: the checks made on opening it (it decides whether a migration is
//! allowed, so only this user may write to it, and what a too-open one held is moved aside), the
//! names cpuguard gives its files there (and nothing else is touched), and the housekeeping that
//! removes them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Cache, CacheError, CacheWarning, DEFAULT_LOCK_TIMEOUT};
use crate::fsutil::{private_dir, DirError};

pub(super) const ENTRY_EXT: &str = "json";
pub(super) const LOCK_EXT: &str = "lock";
pub(super) const QUARANTINE_EXT: &str = "corrupt";
pub(super) const EMULATOR_EXT: &str = "emulator";
/// What [`classify`] calls a temporary file of an entry, and of an emulator record.
pub(super) const ENTRY_TMP: &str = "tmp";
pub(super) const EMULATOR_TMP: &str = "emulator-tmp";
impl Cache {
    /// Opens (creating it, mode 0700) the cache directory `dir`. The directory decides whether a
    /// migration is allowed, so it must be a directory owned by this process's user and writable
    /// by nobody else; an existing one with broader permissions is narrowed to 0700, one owned by
    /// someone else is refused.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let narrowed = private_dir(dir).map_err(|e| match e {
            DirError::Create(source) => CacheError::CreateDir {
                path: dir.to_path_buf(),
                source,
            },
            DirError::Narrow { source, .. } => CacheError::NotWritable {
                path: dir.to_path_buf(),
                source,
            },
            other => CacheError::UnsafeDir {
                path: dir.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        // access(2) reports a read-only file system even to root, which mode bits do not.
        nix::unistd::access(
            dir,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(|errno| CacheError::NotWritable {
            path: dir.to_path_buf(),
            source: io::Error::from(errno),
        })?;
        let mut cache = Cache {
            dir: dir.to_path_buf(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            opened: Vec::new(),
        };
        if let Some(mode) = narrowed {
            let moved = cache.quarantine_all()?;
            cache.opened.push(CacheWarning::Quarantined {
                dir: dir.to_path_buf(),
                mode,
                moved,
            });
        }
        Ok(cache)
    }
    /// After narrowing a directory others could write to: every entry is moved aside and every
    /// emulator record removed, since any of them may have been planted.
    fn quarantine_all(&self) -> Result<usize, CacheError> {
        let mut moved = 0;
        for (digest, ext, path) in self.scan()? {
            match ext.as_str() {
                ENTRY_EXT => {
                    let aside = self.file(&digest, QUARANTINE_EXT);
                    match fs::rename(&path, &aside) {
                        Ok(()) => moved += 1,
                        Err(_) => remove_if_present(&path)?,
                    }
                }
                EMULATOR_EXT | EMULATOR_TMP | ENTRY_TMP => remove_if_present(&path)?,
                _ => {}
            }
        }
        Ok(moved)
    }
    pub(super) fn file(&self, digest: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{digest}.{ext}"))
    }
    /// Removes every entry, moved-aside entry and emulator record, and the lock and temporary files of keys no
    /// one is measuring right now (those being measured are left to their measurer). Returns
    /// the number of entries (`.json`) removed.
    pub fn clear(&self) -> Result<usize, CacheError> {
        let mut removed = 0;
        let mut digests = Vec::new();
        for (digest, ext, path) in self.scan()? {
            match ext.as_str() {
                // Emulator records are written without a lock (concurrent writers write the
                // same text), so there is no writer to wait for.
                ENTRY_EXT | QUARANTINE_EXT | EMULATOR_EXT | EMULATOR_TMP => {
                    remove_if_present(&path)?;
                    if ext == ENTRY_EXT {
                        removed += 1;
                    }
                }
                _ => digests.push(digest),
            }
        }
        digests.sort();
        digests.dedup();
        for digest in digests {
            // Holding the lock means no one is writing this key: its temp files are stale, and
            // the lock file is removed when the guard drops.
            if let Some(lock) = self.try_lock(&digest)? {
                self.remove_stale_temps(&digest)?;
                drop(lock);
            }
        }
        Ok(removed)
    }

    /// (digest, extension, path) of every file cpuguard names in the directory: entries,
    /// locks, moved-aside entries, and temporary files (extension `tmp`).
    pub(super) fn scan(&self) -> Result<Vec<(String, String, PathBuf)>, CacheError> {
        let list_error = |source| CacheError::List {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(list_error)? {
            let item = item.map_err(list_error)?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some((digest, ext)) = classify(name) {
                out.push((digest, ext, item.path()));
            }
        }
        Ok(out)
    }

    pub(super) fn remove_stale_temps(&self, digest: &str) -> Result<(), CacheError> {
        for (d, ext, path) in self.scan()? {
            if d == digest && ext == ENTRY_TMP {
                remove_if_present(&path)?;
            }
        }
        Ok(())
    }
}

/// Splits `<64 hex>.<ext>` or `.<64 hex>.json.<pid>.tmp` names; anything else is not ours.
fn classify(name: &str) -> Option<(String, String)> {
    let is_digest = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(rest) = name.strip_prefix('.') {
        let rest = rest.strip_suffix(".tmp")?;
        let (digest, rest) = rest.split_once('.')?;
        let (ext, pid) = rest.split_once('.')?;
        let kind = match ext {
            ENTRY_EXT => ENTRY_TMP,
            EMULATOR_EXT => EMULATOR_TMP,
            _ => return None,
        };
        if is_digest(digest) && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
            return Some((digest.to_string(), kind.to_string()));
        }
        return None;
    }
    let (digest, ext) = name.split_once('.')?;
    if is_digest(digest) && [ENTRY_EXT, LOCK_EXT, QUARANTINE_EXT, EMULATOR_EXT].contains(&ext) {
        return Some((digest.to_string(), ext.to_string()));
    }
    None
}

fn remove_if_present(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{key, names, obtain};
    use super::super::{EntryProblem, Source};
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn open_creates_a_private_directory_and_refuses_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/cache");
        let cache = Cache::open(&dir).unwrap();
        assert_eq!(cache.dir(), dir);
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Too open: narrowed.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        Cache::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Under a regular file: cannot be created (root included).
        let file = tmp.path().join("plain");
        fs::write(&file, b"x").unwrap();
        let err = Cache::open(&file.join("cache")).unwrap_err();
        assert!(matches!(err, CacheError::CreateDir { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "cache directory {}: cannot create",
                file.join("cache").display()
            )),
            "{msg}"
        );
        assert!(!msg.contains('\n'));

        // A file where the directory should be.
        let err = Cache::open(&file).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::CreateDir { .. } | CacheError::UnsafeDir { .. }
            ),
            "{err}"
        );

        // A symlink to a directory is refused.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = Cache::open(&link).unwrap_err();
        assert!(matches!(err, CacheError::UnsafeDir { .. }), "{err}");

        if nix::unistd::geteuid().is_root() {
            let foreign = tmp.path().join("foreign");
            fs::create_dir(&foreign).unwrap();
            nix::unistd::chown(&foreign, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let err = Cache::open(&foreign).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }
    #[test]
    fn narrowing_a_too_open_directory_quarantines_what_it_held() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cache = Cache::open(&dir).unwrap();
        let k = key("Haswell-noTSX");
        let calls = AtomicUsize::new(0);
        obtain(&cache, &k, &calls, 1);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let cache = Cache::open(&dir).unwrap();
        assert!(
            matches!(
                cache.open_warnings(),
                [CacheWarning::Quarantined {
                    mode: 0o777,
                    moved: 1,
                    ..
                }]
            ),
            "{:?}",
            cache.open_warnings()
        );
        let got = obtain(&cache, &k, &calls, 2);
        assert_eq!(
            got.source,
            Source::Measured,
            "the planted-or-not entry is not used"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
    #[test]
    fn list_and_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let calls = AtomicUsize::new(0);
        let models = ["EPYC", "Nehalem", "qemu64"];
        for (i, m) in models.iter().enumerate() {
            obtain(&cache, &key(m), &calls, i as u32);
        }
        let bad_digest = "f".repeat(64);
        fs::write(
            tmp.path().join(format!("{bad_digest}.json")),
            b"{\"cache_format\": 1",
        )
        .unwrap();
        fs::write(tmp.path().join(format!("{bad_digest}.corrupt")), b"old").unwrap();
        fs::write(tmp.path().join(format!(".{bad_digest}.json.77.tmp")), b"").unwrap();
        fs::write(tmp.path().join(format!("{bad_digest}.lock")), b"").unwrap();
        fs::write(tmp.path().join("README"), b"not ours").unwrap();

        let list = cache.list().unwrap();
        assert_eq!(list.len(), 4);
        let mut sorted = list.clone();
        sorted.sort_by(|a, b| a.digest.cmp(&b.digest));
        assert_eq!(list, sorted);
        for m in models {
            let k = key(m);
            let s = list.iter().find(|s| s.model.as_deref() == Some(m)).unwrap();
            assert_eq!(s.digest, k.digest().unwrap());
            assert_eq!(s.file, cache.entry_path(&k).unwrap());
            assert_eq!(s.mode.as_deref(), Some("custom"));
            assert_eq!(s.machine.as_deref(), Some("pc-i440fx-7.2"));
            assert_eq!(s.accel.as_deref(), Some("tcg"));
            assert_eq!(s.emulator.as_deref(), Some("/usr/bin/qemu-system-x86_64"));
            assert!(s.measured_at_unix.unwrap() > 1_600_000_000);
            assert!(s
                .fingerprint_digest
                .as_deref()
                .unwrap()
                .starts_with("sha256:"));
            assert_eq!(s.problem, None);
        }
        let broken = list.iter().find(|s| s.digest == bad_digest).unwrap();
        assert!(matches!(broken.problem, Some(EntryProblem::Corrupt(_))));

        assert_eq!(cache.clear().unwrap(), 4);
        assert_eq!(names(tmp.path()), vec!["README".to_string()]);
        assert!(cache.list().unwrap().is_empty());
        assert_eq!(cache.clear().unwrap(), 0);
    }
    #[test]
    fn classify_only_knows_our_names() {
        let d = "a".repeat(64);
        assert_eq!(
            classify(&format!("{d}.json")),
            Some((d.clone(), "json".into()))
        );
        assert_eq!(
            classify(&format!("{d}.lock")),
            Some((d.clone(), "lock".into()))
        );
        assert_eq!(
            classify(&format!("{d}.corrupt")),
            Some((d.clone(), "corrupt".into()))
        );
        assert_eq!(
            classify(&format!(".{d}.json.123.tmp")),
            Some((d.clone(), "tmp".into()))
        );
        assert_eq!(
            classify(&format!("{d}.emulator")),
            Some((d.clone(), "emulator".into()))
        );
        assert_eq!(
            classify(&format!(".{d}.emulator.9.tmp")),
            Some((d.clone(), "emulator-tmp".into()))
        );
        for other in [
            format!("{d}.txt"),
            format!(".{d}.lock.9.tmp"),
            format!(".{d}.json.x.tmp"),
            format!(".{d}.json..tmp"),
            "abc.json".to_string(),
            format!("{}.json", "g".repeat(64)),
            "README".to_string(),
        ] {
            assert_eq!(classify(&other), None, "{other}");
        }
    }
}
