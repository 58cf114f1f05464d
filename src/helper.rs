//! `cpuguard-libvirt`, the libvirt-linked helper: where it is, and that it is safe to run.
//!
//! Everything that talks to libvirt lives in that separate binary, so `cpuguard` (the hook)
//! never loads libvirt. The hook runs as root and starts the helper, so the helper must be a
//! root-owned regular file that nobody else can write, like the emulators the probe runs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// File name of the libvirt-linked helper binary (stamping runs there, never in the hook).
pub const HELPER_NAME: &str = "cpuguard-libvirt";
/// Where the packages install the helper; the last place [`locate`] looks.
pub const LIBEXEC_PATH: &str = "/usr/libexec/cpuguard/cpuguard-libvirt";

/// The helper in force: the configured path, else next to this executable, else libexec.
pub fn locate(config: &Config) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if !config.stamp.helper.as_os_str().is_empty() {
        vec![config.stamp.helper.clone()]
    } else {
        let mut v = Vec::new();
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.canonicalize().ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            v.push(dir.join(HELPER_NAME));
        }
        v.push(PathBuf::from(LIBEXEC_PATH));
        v
    };
    let found = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        format!("{HELPER_NAME} not found (looked at {})", list.join(", "))
    })?;
    check_trusted(found)?;
    Ok(found.clone())
}

/// A file root may execute: regular, owned by root (or by us when not root), not writable by
/// group or others.
pub fn check_trusted(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{}: owned by uid {}, not root",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{}: writable by group or others (mode {:o})",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn configured_helper_must_exist_and_be_safe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let helper = dir.path().join("cpuguard-libvirt");
        let mut config = Config::default();
        config.stamp.helper = helper.clone();
        assert!(locate(&config).expect_err("missing").contains("not found"));
        std::fs::write(&helper, b"#!").expect("write");
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(locate(&config)
            .expect_err("writable")
            .contains("writable by group or others"));
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(locate(&config).expect("ok"), helper);
    }
}
