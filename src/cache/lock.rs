//! The per-key lock: one process measures a key while the others wait for its entry, and
//! different keys proceed in parallel. The lock is an `flock` on a file that its holder removes
//! before unlocking, so no lock file outlives its use and a waiter that locked a removed file
//! notices and starts over; waits poll, so they stay bounded by the cache's lock timeout.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::dir::LOCK_EXT;
use super::{Cache, CacheError};

impl Cache {
    /// Takes the key's lock, waiting at most `lock_timeout`.
    pub(super) fn lock(&self, digest: &str) -> Result<KeyLock, CacheError> {
        let path = self.file(digest, LOCK_EXT);
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(lock) = self.try_lock(digest)? {
                return Ok(lock);
            }
            let waited = started.elapsed();
            if waited >= self.lock_timeout {
                return Err(CacheError::LockTimeout { path, waited });
            }
            // Polling rather than a blocking flock keeps the wait bounded without signals; the
            // holder is a probe of ~0.1 s, so a pause of at most 25 ms costs little.
            std::thread::sleep(pause.min(self.lock_timeout.saturating_sub(waited)));
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    /// The key's lock if no one holds it, None if someone does.
    pub(super) fn try_lock(&self, digest: &str) -> Result<Option<KeyLock>, CacheError> {
        let path = self.file(digest, LOCK_EXT);
        let lock_error = |source| CacheError::Lock {
            path: path.clone(),
            source,
        };
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc_o_nofollow())
                .open(&path)
                .map_err(lock_error)?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, Errno::EINTR)) => continue,
                Err((_, errno)) => return Err(lock_error(io::Error::from(errno))),
            };
            // The previous holder may have unlinked the file between our open and our flock:
            // then we hold a lock no one else can see, and must lock the current file instead.
            let held = lock.metadata().map_err(lock_error)?;
            match fs::symlink_metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Some(KeyLock { path, lock }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(lock_error(e)),
            }
        }
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// An exclusive `flock` on `<digest>.lock`. Dropping it unlinks the file *before* unlocking:
/// a waiter that opened the old file then finds, after locking it, that the path no longer
/// names its file and starts over (see [`Cache::try_lock`]), so two holders never coexist and
/// no lock file outlives its use.
pub(super) struct KeyLock {
    path: PathBuf,
    lock: Flock<File>,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let ours = match (self.lock.metadata(), fs::symlink_metadata(&self.path)) {
            (Ok(held), Ok(now)) => held.dev() == now.dev() && held.ino() == now.ino(),
            _ => false,
        };
        if ours {
            // Best effort: a lock file left behind is harmless and removed by the next holder.
            let _ = fs::remove_file(&self.path);
        }
        // The flock is released when `self.lock` is dropped, after this.
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fingerprint, key, names, obtain};
    use super::super::{CacheWarning, Source};
    use super::*;
    use crate::fingerprint::Fingerprint;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn stale_temp_and_lock_files_do_not_pile_up() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let digest = k.digest().unwrap();
        // What a writer killed mid-measurement leaves.
        fs::write(tmp.path().join(format!(".{digest}.json.4242.tmp")), b"{").unwrap();
        fs::write(tmp.path().join(format!("{digest}.lock")), b"").unwrap();
        fs::write(tmp.path().join("unrelated.txt"), b"keep").unwrap();
        let calls = AtomicUsize::new(0);
        assert_eq!(obtain(&cache, &k, &calls, 1).source, Source::Measured);
        assert_eq!(
            names(tmp.path()),
            vec![format!("{digest}.json"), "unrelated.txt".to_string()]
        );
    }
    #[test]
    fn clear_leaves_a_key_being_measured_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let digest = key("EPYC").digest().unwrap();
        let held = cache.try_lock(&digest).unwrap().unwrap();
        let temp = tmp.path().join(format!(".{digest}.json.1.tmp"));
        fs::write(&temp, b"{").unwrap();
        assert!(
            cache.try_lock(&digest).unwrap().is_none(),
            "held locks exclude"
        );
        assert_eq!(cache.clear().unwrap(), 0);
        assert!(temp.exists(), "a write in progress is not removed");
        assert!(tmp.path().join(format!("{digest}.lock")).exists());
        drop(held);
        assert!(
            !tmp.path().join(format!("{digest}.lock")).exists(),
            "the holder removes its lock file"
        );
        cache.clear().unwrap();
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn a_lock_wait_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path())
            .unwrap()
            .with_lock_timeout(Duration::from_millis(150));
        let k = key("EPYC");
        let _held = cache.try_lock(&k.digest().unwrap()).unwrap().unwrap();
        let started = Instant::now();
        let err = cache
            .get_or_measure(&k, || Ok::<_, std::io::Error>(fingerprint(1)))
            .unwrap_err();
        assert!(matches!(err, CacheError::LockTimeout { .. }), "{err}");
        assert!(!err.is_measure_failure());
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(started.elapsed() < Duration::from_secs(2));

        // The hook's variant measures without the cache instead, and stores nothing.
        let got = cache
            .get_or_measure_or_bypass(&k, || Ok::<_, std::io::Error>(fingerprint(9)))
            .unwrap();
        assert_eq!(
            (got.source, &got.fingerprint),
            (Source::Measured, &fingerprint(9))
        );
        match got.warnings.as_slice() {
            [w @ CacheWarning::Bypassed { dir, reason }] => {
                assert_eq!(dir, tmp.path());
                assert!(reason.contains("giving up"), "{reason}");
                assert!(w.to_string().contains("bypassed"), "{w}");
            }
            other => panic!("expected Bypassed, got {other:?}"),
        }
        assert!(!cache.entry_path(&k).unwrap().exists());
        // The measurement itself still fails loudly.
        let err = cache
            .get_or_measure_or_bypass(&k, || {
                Err::<Fingerprint, _>(std::io::Error::other("probe timed out"))
            })
            .unwrap_err();
        assert!(err.is_measure_failure(), "{err}");
    }
}
