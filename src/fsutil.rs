//! Files cpuguard trusts: atomic replacement (every file cpuguard writes appears whole or not at
//! all, so a crash or a full disk never leaves a half-written file to be trusted), root-only
//! directories (the cache and the runtime directory decide migrations, so nobody else may write
//! there), and reads that cannot be made to hang or follow a link (a FIFO or a symlink planted
//! where a record or an entry should be).

use std::fs::{self, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Why a directory cpuguard keeps decisions in cannot be used. One line each.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory was missing and could not be created, or could not be `lstat`ed.
    #[error("cannot create: {0}")]
    Create(io::Error),
    /// The path exists but is not a directory; a symlink, even to a directory, is refused too.
    #[error("is not a directory (a symlink is refused too)")]
    NotADirectory,
    /// The directory belongs to another user.
    #[error("owned by uid {owner}, not by uid {euid} that runs cpuguard")]
    Foreign {
        /// The directory's owner uid.
        owner: u32,
        /// The effective uid cpuguard runs as.
        euid: u32,
    },
    /// The directory was open to group or others and `chmod 0700` failed.
    #[error("mode {mode:04o} is too open and cannot be narrowed to 0700: {source}")]
    Narrow {
        /// The directory's mode before (permission bits).
        mode: u32,
        /// Why `chmod` failed.
        source: io::Error,
    },
}

/// Makes sure `dir` is a directory (not a symlink) owned by this process's user and writable by
/// nobody else: created mode 0700 when missing; an existing one with group or other permissions
/// is narrowed to 0700. Returns the mode it had when it had to be narrowed: whatever it held
/// may have been planted by someone else, and the caller must not trust it.
pub fn private_dir(dir: &Path) -> Result<Option<u32>, DirError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(DirError::Create)?;
    let meta = fs::symlink_metadata(dir).map_err(DirError::Create)?;
    if !meta.is_dir() {
        return Err(DirError::NotADirectory);
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(DirError::Foreign {
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| DirError::Narrow { mode, source })?;
    Ok(Some(mode))
}

/// Why a file cpuguard would trust was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FileProblem {
    /// The file exists but could not be opened (the `io::Error`, as text).
    #[error("cannot open: {0}")]
    Open(String),
    /// Not a regular file: what it is instead (a symlink, a FIFO, a directory, …).
    #[error("is not a regular file ({0})")]
    NotRegular(&'static str),
    /// The file is larger than the caller's limit.
    #[error("is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Its size, bytes (or at least what was read).
        size: u64,
        /// The caller's limit, bytes.
        limit: u64,
    },
    /// The file belongs to another user.
    #[error("owned by uid {owner}, not by uid {euid} that runs cpuguard")]
    Foreign {
        /// The file's owner uid.
        owner: u32,
        /// The effective uid cpuguard runs as.
        euid: u32,
    },
    /// Group or others may write the file: its mode (permission bits).
    #[error("mode {0:04o} lets others write it")]
    Writable(u32),
    /// Reading the opened file failed (the `io::Error`, as text).
    #[error("cannot read: {0}")]
    Read(String),
}

/// Reads a file cpuguard itself wrote into one of its private directories, trusting nothing
/// about what is there now: opened with `O_NOFOLLOW` (a symlink is refused) and `O_NONBLOCK` (a
/// FIFO cannot hang the open), then it must be a regular file of at most `limit` bytes, owned by
/// this process's user and not writable by group or others. `None` when it does not exist.
pub fn read_trusted(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, FileProblem> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(FileProblem::NotRegular("a symlink"))
        }
        Err(e) => return Err(FileProblem::Open(e.to_string())),
    };
    let meta = file
        .metadata()
        .map_err(|e| FileProblem::Read(e.to_string()))?;
    check_trusted(&meta, limit)?;
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| FileProblem::Read(e.to_string()))?;
    if data.len() as u64 > limit {
        return Err(FileProblem::TooLarge {
            size: data.len() as u64,
            limit,
        });
    }
    Ok(Some(data))
}

fn check_trusted(meta: &Metadata, limit: u64) -> Result<(), FileProblem> {
    let kind = meta.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "not a plain file"
        };
        return Err(FileProblem::NotRegular(what));
    }
    if meta.len() > limit {
        return Err(FileProblem::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(FileProblem::Foreign {
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(FileProblem::Writable(mode));
    }
    Ok(())
}

/// Writes `data` to a temporary file beside `path` (mode `mode`), syncs it, and renames it over
/// `path`. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_file_with_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        fs::write(&p, b"old old old").expect("seed");
        write_atomic(&p, b"new", 0o600).expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"new");
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn failure_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Renaming a file over a non-empty directory fails.
        let target = dir.path().join("d");
        fs::create_dir(&target).expect("mkdir");
        fs::write(target.join("x"), b"x").expect("seed");
        assert!(write_atomic(&target, b"data", 0o600).is_err());
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("d")]);
    }
}
