//! `cpuguard install` / `cpuguard uninstall`: the hook in libvirt's hooks directory, for hosts
//! without the RPM (whose `%post`/`%preun` run these same commands).
//!
//! The hook is a symlink to the cpuguard binary (cpuguard recognises a hook call by the name it
//! was run under). `/etc/libvirt/hooks/qemu` may already belong to another program: it is never
//! replaced; cpuguard then goes to `qemu.d/50-cpuguard`, which libvirt (>= 6.5) runs after `qemu`.
//! Uninstall removes only links that lead to cpuguard.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// libvirt's hooks directory; `cpuguard install --hooks-dir` names another.
pub const DEFAULT_HOOKS_DIR: &str = "/etc/libvirt/hooks";
/// Where the packages install the cpuguard binary; the hook's default target when it exists
/// (see [`default_target`]).
pub const DEFAULT_TARGET: &str = "/usr/bin/cpuguard";
/// The name under `qemu.d/`: libvirt runs those scripts in alphabetical order.
pub const DISPATCH_NAME: &str = "50-cpuguard";

/// Why `cpuguard install` or `uninstall` failed; each names the path concerned.
#[derive(Debug, Error)]
pub enum InstallError {
    /// The binary the hook would link to does not exist (or cannot be `stat`ed).
    #[error("{path}: the cpuguard binary to link to is missing: {source}")]
    Target {
        /// The target binary.
        path: PathBuf,
        /// Why `stat` failed.
        source: io::Error,
    },
    /// The hooks directory or its `qemu.d/` could not be created.
    #[error("{path}: cannot create directory: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why `mkdir` failed.
        source: io::Error,
    },
    /// A hook path could not be examined.
    #[error("{path}: cannot inspect: {source}")]
    Inspect {
        /// The hook path.
        path: PathBuf,
        /// Why `lstat` or `readlink` failed.
        source: io::Error,
    },
    /// Both `hooks/qemu` and `hooks/qemu.d/50-cpuguard` belong to other programs, so there is no
    /// place left for cpuguard.
    #[error("{path}: belongs to another program ({what}); cpuguard does not replace it")]
    Foreign {
        /// `hooks/qemu.d/50-cpuguard`.
        path: PathBuf,
        /// What is there instead (e.g. `a link to /usr/bin/other`, `a file`).
        what: String,
    },
    /// The symlink could not be created.
    #[error("{path}: cannot create the hook link: {source}")]
    Link {
        /// The hook path.
        path: PathBuf,
        /// Why `symlink` failed.
        source: io::Error,
    },
    /// One of cpuguard's hook links could not be removed.
    #[error("{path}: cannot remove: {source}")]
    Remove {
        /// The link.
        path: PathBuf,
        /// Why `unlink` failed.
        source: io::Error,
    },
}

/// Where the hook went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// `hooks/qemu`
    Main,
    /// `hooks/qemu.d/50-cpuguard`, because `hooks/qemu` is another program's.
    Dispatch,
}

/// What `install` did or found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// The hook's path: `hooks/qemu` or `hooks/qemu.d/50-cpuguard`.
    pub path: PathBuf,
    /// The binary the hook leads to.
    pub target: PathBuf,
    /// Which of the two paths it is.
    pub placement: Placement,
    /// False when the hook was already there.
    pub created: bool,
    /// When [`Placement::Dispatch`]: what occupies `hooks/qemu`.
    pub foreign_main: Option<String>,
}

/// What is at a hook path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Occupant {
    Nothing,
    Cpuguard,
    Other(String),
}

/// A link (or hard link) leads to cpuguard when it resolves to the target's file, or to a file
/// named `cpuguard` (an older install linked to another copy of the binary).
fn occupant(path: &Path, target: &Path) -> Result<Occupant, InstallError> {
    let inspect = |source| InstallError::Inspect {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Occupant::Nothing),
        Err(e) => return Err(inspect(e)),
    };
    let target_meta = std::fs::metadata(target).ok();
    let same_file = |m: &std::fs::Metadata| {
        target_meta
            .as_ref()
            .is_some_and(|t| t.dev() == m.dev() && t.ino() == m.ino())
    };
    if meta.file_type().is_symlink() {
        let link = std::fs::read_link(path).map_err(inspect)?;
        let resolved = std::fs::metadata(path).ok();
        if resolved.as_ref().is_some_and(same_file)
            || link.file_name().is_some_and(|n| n == "cpuguard")
        {
            return Ok(Occupant::Cpuguard);
        }
        return Ok(Occupant::Other(format!("a link to {}", link.display())));
    }
    if meta.is_file() && same_file(&meta) {
        return Ok(Occupant::Cpuguard);
    }
    let kind = if meta.is_dir() {
        "a directory"
    } else {
        "a file"
    };
    Ok(Occupant::Other(kind.to_string()))
}

fn link(path: &Path, target: &Path) -> Result<(), InstallError> {
    std::os::unix::fs::symlink(target, path).map_err(|source| InstallError::Link {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(path: &Path) -> Result<(), InstallError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| InstallError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Installs the hook in `hooks_dir` as a link to `target`.
pub fn install(hooks_dir: &Path, target: &Path) -> Result<Installed, InstallError> {
    std::fs::metadata(target).map_err(|source| InstallError::Target {
        path: target.to_path_buf(),
        source,
    })?;
    create_dir(hooks_dir)?;
    let main = hooks_dir.join("qemu");
    let foreign_main = match occupant(&main, target)? {
        Occupant::Nothing => {
            link(&main, target)?;
            return Ok(Installed {
                path: main,
                target: target.to_path_buf(),
                placement: Placement::Main,
                created: true,
                foreign_main: None,
            });
        }
        Occupant::Cpuguard => {
            return Ok(Installed {
                path: main,
                target: target.to_path_buf(),
                placement: Placement::Main,
                created: false,
                foreign_main: None,
            })
        }
        Occupant::Other(what) => what,
    };
    let dispatch_dir = hooks_dir.join("qemu.d");
    create_dir(&dispatch_dir)?;
    let dispatch = dispatch_dir.join(DISPATCH_NAME);
    let created = match occupant(&dispatch, target)? {
        Occupant::Nothing => {
            link(&dispatch, target)?;
            true
        }
        Occupant::Cpuguard => false,
        Occupant::Other(what) => {
            return Err(InstallError::Foreign {
                path: dispatch,
                what,
            })
        }
    };
    Ok(Installed {
        path: dispatch,
        target: target.to_path_buf(),
        placement: Placement::Dispatch,
        created,
        foreign_main: Some(foreign_main),
    })
}

/// Removes cpuguard's hook links from `hooks_dir`; returns those removed. Other programs' hooks
/// are left alone.
pub fn uninstall(hooks_dir: &Path, target: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    for path in [
        hooks_dir.join("qemu"),
        hooks_dir.join("qemu.d").join(DISPATCH_NAME),
    ] {
        if occupant(&path, target)? == Occupant::Cpuguard {
            std::fs::remove_file(&path).map_err(|source| InstallError::Remove {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// What to tell the operator after an install.
pub fn install_message(installed: &Installed) -> String {
    let mut out = String::new();
    match (&installed.placement, installed.created) {
        (Placement::Main, true) => out.push_str(&format!(
            "installed the hook: {} -> {}\n",
            installed.path.display(),
            installed.target.display()
        )),
        (_, false) => out.push_str(&format!(
            "already installed: {} -> {}\n",
            installed.path.display(),
            installed.target.display()
        )),
        (Placement::Dispatch, true) => out.push_str(&format!(
            "installed the hook: {} -> {}\n",
            installed.path.display(),
            installed.target.display()
        )),
    }
    if let Some(what) = &installed.foreign_main {
        out.push_str(&format!(
            "note: {} belongs to another program ({what}) and was left alone; libvirt (6.5 or \
             later) runs {} after it\n",
            installed
                .path
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("qemu").display().to_string())
                .unwrap_or_else(|| "qemu".to_string()),
            installed.path.display()
        ));
    }
    out.push_str(
        "libvirt looks for hooks only when libvirtd starts: restart it now \
         (systemctl restart libvirtd, or virtqemud on modular daemons)\n\
         then stamp the running VMs so they can leave this host: cpuguard stamp --all\n",
    );
    out
}

/// The cpuguard binary a new hook should lead to: the installed one when present, else this
/// executable.
pub fn default_target() -> PathBuf {
    let installed = PathBuf::from(DEFAULT_TARGET);
    if installed.is_file() {
        return installed;
    }
    std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .unwrap_or(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("bin").join("cpuguard");
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::write(&target, b"binary").expect("write");
        let hooks = dir.path().join("hooks");
        (dir, target, hooks)
    }

    #[test]
    fn fresh_install_takes_qemu_and_is_idempotent() {
        let (_dir, target, hooks) = setup();
        let first = install(&hooks, &target).expect("install");
        assert_eq!(first.placement, Placement::Main);
        assert!(first.created);
        assert_eq!(
            std::fs::read_link(hooks.join("qemu")).expect("link"),
            target
        );
        let again = install(&hooks, &target).expect("again");
        assert!(!again.created);
        assert!(install_message(&again).starts_with("already installed"));
        assert_eq!(
            uninstall(&hooks, &target).expect("uninstall"),
            vec![hooks.join("qemu")]
        );
        assert!(!hooks.join("qemu").exists());
        assert!(uninstall(&hooks, &target).expect("nothing").is_empty());
    }

    #[test]
    fn another_programs_hook_is_never_replaced() {
        let (_dir, target, hooks) = setup();
        std::fs::create_dir_all(&hooks).expect("mkdir");
        std::fs::write(hooks.join("qemu"), b"#!/bin/sh\nexit 0\n").expect("write");
        let installed = install(&hooks, &target).expect("install");
        assert_eq!(installed.placement, Placement::Dispatch);
        assert_eq!(installed.path, hooks.join("qemu.d").join(DISPATCH_NAME));
        assert_eq!(installed.foreign_main.as_deref(), Some("a file"));
        let message = install_message(&installed);
        assert!(message.contains("belongs to another program"), "{message}");
        assert!(message.contains("restart"), "{message}");
        assert!(message.contains("cpuguard stamp --all"), "{message}");
        assert_eq!(
            std::fs::read(hooks.join("qemu")).expect("read"),
            b"#!/bin/sh\nexit 0\n"
        );
        let removed = uninstall(&hooks, &target).expect("uninstall");
        assert_eq!(removed, vec![hooks.join("qemu.d").join(DISPATCH_NAME)]);
        assert!(hooks.join("qemu").exists(), "the other hook stays");
    }

    #[test]
    fn a_foreign_dispatch_entry_is_an_error() {
        let (_dir, target, hooks) = setup();
        std::fs::create_dir_all(hooks.join("qemu.d")).expect("mkdir");
        std::os::unix::fs::symlink("/usr/bin/other", hooks.join("qemu")).expect("link");
        std::fs::write(hooks.join("qemu.d").join(DISPATCH_NAME), b"x").expect("write");
        let e = install(&hooks, &target).expect_err("foreign");
        assert!(
            e.to_string()
                .ends_with("belongs to another program (a file); cpuguard does not replace it"),
            "{e}"
        );
        // An old install's link to another copy of cpuguard is ours.
        std::fs::remove_file(hooks.join("qemu")).expect("rm");
        std::os::unix::fs::symlink("/opt/old/cpuguard", hooks.join("qemu")).expect("link");
        assert!(!install(&hooks, &target).expect("ours").created);
    }

    #[test]
    fn a_missing_target_is_named() {
        let (dir, _target, hooks) = setup();
        let missing = dir.path().join("nope");
        let e = install(&hooks, &missing).expect_err("missing");
        assert!(
            e.to_string()
                .starts_with(&format!("{}:", missing.display())),
            "{e}"
        );
        assert!(!hooks.join("qemu").exists());
    }
}
