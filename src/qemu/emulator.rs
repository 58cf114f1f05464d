//! Deciding whether an emulator path taken from a domain XML may be executed.
//!
//! The XML was written on another host (the migration source), so its `<emulator>` is untrusted:
//! cpuguard runs it as root. It is accepted only when it is an absolute path listed in the
//! caller's allow-list (libvirt's capabilities emulators plus the config's list), it resolves to a
//! regular executable file owned by root and not writable by group or others, and no directory on
//! the way to it lets anyone but root replace it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why an `<emulator>` path may not be run. `path` is always the path as the XML (or caller)
/// gave it, before resolving symlinks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmulatorError {
    /// Not absolute, or has empty, `.` or `..` segments.
    #[error("emulator {path:?} is not an absolute, normalized path")]
    NotAbsolute {
        /// The path as given.
        path: String,
    },
    /// Neither the path nor what it resolves to is in the allow-list (or the list is empty).
    #[error(
        "emulator {path:?} is not in the allow-list (libvirt capabilities and cpuguard config)"
    )]
    NotAllowed {
        /// The path as given.
        path: String,
    },
    /// The path or a directory above it cannot be resolved or stat'ed (missing, no access).
    #[error("emulator {path:?} cannot be inspected: {reason}")]
    Inaccessible {
        /// The path as given.
        path: String,
        /// The OS error, prefixed with the directory when a directory failed.
        reason: String,
    },
    /// Resolves to a directory, device or other non-regular file.
    #[error("emulator {path:?} is not a regular file")]
    NotRegular {
        /// The path as given.
        path: String,
    },
    /// No execute bit is set.
    #[error("emulator {path:?} is not executable")]
    NotExecutable {
        /// The path as given.
        path: String,
    },
    /// The file is not owned by root, so its owner could replace what cpuguard runs as root.
    #[error("emulator {path:?} is owned by uid {uid}, not root")]
    NotRootOwned {
        /// The path as given.
        path: String,
        /// The file's owner.
        uid: u32,
    },
    /// Group or others may write the file.
    #[error("emulator {path:?} is writable by group or others (mode {mode:o})")]
    Writable {
        /// The path as given.
        path: String,
        /// The file's permission bits (`0o7777` part of the mode).
        mode: u32,
    },
    /// A directory on the resolved path is not root's, or group/others may write it without the
    /// sticky bit: someone else could swap the binary after the check.
    #[error("emulator {path:?}: directory {dir:?} lets others replace it (owner uid {uid}, mode {mode:o})")]
    UnsafeDirectory {
        /// The path as given.
        path: String,
        /// The offending directory, on the resolved path.
        dir: String,
        /// The directory's owner.
        uid: u32,
        /// The directory's permission bits (`0o7777` part of the mode).
        mode: u32,
    },
}

/// Checks `path` and returns the canonical path to execute.
pub fn check_emulator(path: &str, allow_list: &[PathBuf]) -> Result<PathBuf, EmulatorError> {
    let text = || path.to_string();
    let candidate = Path::new(path);
    // Textual check: Path::components() would silently drop "." and "//".
    let normalized = path.len() > 1
        && path.starts_with('/')
        && path[1..]
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..");
    if !normalized {
        return Err(EmulatorError::NotAbsolute { path: text() });
    }
    let listed = allow_list.iter().any(|allowed| allowed == candidate);
    if !listed && allow_list.is_empty() {
        return Err(EmulatorError::NotAllowed { path: text() });
    }
    let canonical = std::fs::canonicalize(candidate).map_err(|e| EmulatorError::Inaccessible {
        path: text(),
        reason: e.to_string(),
    })?;
    // The resolved form of a listed path (what resolve_emulator hands on) is as good as the
    // listed path itself: the file that runs is the same.
    let resolves_to_listed = || {
        allow_list
            .iter()
            .any(|allowed| std::fs::canonicalize(allowed).is_ok_and(|c| c == canonical))
    };
    if !listed && !resolves_to_listed() {
        return Err(EmulatorError::NotAllowed { path: text() });
    }
    let meta = std::fs::metadata(&canonical).map_err(|e| EmulatorError::Inaccessible {
        path: text(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(EmulatorError::NotRegular { path: text() });
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(EmulatorError::NotExecutable { path: text() });
    }
    if meta.uid() != 0 {
        return Err(EmulatorError::NotRootOwned {
            path: text(),
            uid: meta.uid(),
        });
    }
    if mode & 0o022 != 0 {
        return Err(EmulatorError::Writable {
            path: text(),
            mode: mode & 0o7777,
        });
    }
    // Whoever can write a directory on the way can swap the file after this check.
    for dir in canonical.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| EmulatorError::Inaccessible {
            path: text(),
            reason: format!("{}: {e}", dir.display()),
        })?;
        let mode = meta.permissions().mode();
        // A sticky directory (like /tmp) lets others add entries but not replace root's.
        let others_can_replace = mode & 0o022 != 0 && mode & 0o1000 == 0;
        if meta.uid() != 0 || others_can_replace {
            return Err(EmulatorError::UnsafeDirectory {
                path: text(),
                dir: dir.display().to_string(),
                uid: meta.uid(),
                mode: mode & 0o7777,
            });
        }
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const QEMU: &str = "/usr/bin/qemu-system-x86_64";

    fn allow(paths: &[&Path]) -> Vec<PathBuf> {
        paths.iter().map(|p| p.to_path_buf()).collect()
    }

    #[test]
    fn the_installed_qemu_is_accepted_when_allowed() {
        if !Path::new(QEMU).exists() {
            eprintln!("skipping: {QEMU} not installed");
            return;
        }
        let ok = check_emulator(QEMU, &allow(&[Path::new(QEMU)])).unwrap();
        assert!(ok.is_absolute());
        assert_eq!(
            check_emulator(QEMU, &allow(&[Path::new("/usr/bin/qemu-system-i386")])),
            Err(EmulatorError::NotAllowed { path: QEMU.into() })
        );
    }

    #[test]
    fn the_resolved_form_of_an_allowed_symlink_is_allowed() {
        if !Path::new(QEMU).exists() {
            eprintln!("skipping: {QEMU} not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("qemu-link");
        std::os::unix::fs::symlink(QEMU, &link).unwrap();
        let canonical = check_emulator(link.to_str().unwrap(), &allow(&[&link])).unwrap();
        assert_eq!(canonical, std::fs::canonicalize(QEMU).unwrap());
        let again = check_emulator(canonical.to_str().unwrap(), &allow(&[&link])).unwrap();
        assert_eq!(again, canonical);
        // A path that resolves elsewhere is still refused.
        assert!(matches!(
            check_emulator("/usr/bin/qemu-system-i386", &allow(&[&link])),
            Err(EmulatorError::NotAllowed { .. }) | Err(EmulatorError::Inaccessible { .. })
        ));
    }

    #[test]
    fn relative_and_dotted_paths_are_refused() {
        for bad in [
            "qemu-system-x86_64",
            "/usr/bin/../bin/qemu",
            "/usr/./bin/qemu",
            "",
        ] {
            assert!(
                matches!(
                    check_emulator(bad, &allow(&[Path::new(bad)])),
                    Err(EmulatorError::NotAbsolute { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn writable_non_root_or_non_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qemu");
        std::fs::write(&file, b"#!/bin/false\n").unwrap();
        let path = file.to_str().unwrap();
        let allowed = allow(&[&file]);

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o757)).unwrap();
        assert!(matches!(
            check_emulator(path, &allowed),
            Err(EmulatorError::Writable { mode: 0o757, .. })
        ));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            check_emulator(path, &allowed),
            Err(EmulatorError::NotExecutable { .. })
        ));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let owned_by_root = nix::unistd::geteuid().is_root();
        match check_emulator(path, &allowed) {
            Ok(_) => assert!(owned_by_root),
            Err(EmulatorError::NotRootOwned { .. }) => assert!(!owned_by_root),
            Err(other) => panic!("unexpected {other}"),
        }
        if owned_by_root {
            nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(matches!(
                check_emulator(path, &allowed),
                Err(EmulatorError::NotRootOwned { uid: 65534, .. })
            ));
        }
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            check_emulator(sub.to_str().unwrap(), &allow(&[&sub])),
            Err(EmulatorError::NotRegular { .. })
        ));
        let missing = dir.path().join("missing");
        assert!(matches!(
            check_emulator(missing.to_str().unwrap(), &allow(&[&missing])),
            Err(EmulatorError::Inaccessible { .. })
        ));
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to create root-owned files");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let file = open.join("qemu");
        std::fs::write(&file, b"#!/bin/false\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = check_emulator(file.to_str().unwrap(), &allow(&[&file])).unwrap_err();
        assert!(
            matches!(err, EmulatorError::UnsafeDirectory { mode: 0o777, .. }),
            "{err}"
        );
    }
}
