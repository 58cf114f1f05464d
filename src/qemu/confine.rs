//! The probe's QEMU is confined the way libvirt confines the guests' QEMU: it runs as libvirt's
//! unprivileged QEMU user (`user`/`group` in `/etc/libvirt/qemu.conf`, else the distribution's
//! default, `libvirt-qemu` on Debian, `qemu` on RHEL, detected by which exists), under QEMU's own
//! seccomp sandbox, with an empty environment and resource limits. The hook runs as root on XML
//! from other hosts; the emulator it starts must not.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::unistd::{Gid, Group, Uid, User};

/// QEMU's seccomp sandbox: no obsolete syscalls, no privilege changes, no new processes, no
/// scheduler or affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// libvirt's QEMU driver configuration.
pub const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// The distributions' defaults when `qemu.conf` sets no `user`: Debian/Ubuntu, RHEL/Fedora/SUSE.
pub const DEFAULT_USERS: &[&str] = &["libvirt-qemu", "qemu"];

/// Largest file the probe's QEMU may write (its output is a few KiB).
const FSIZE_LIMIT: u64 = 16 * 1024 * 1024;
/// Open files: QEMU needs a few dozen.
const NOFILE_LIMIT: u64 = 1024;
/// Address space: TCG reserves a 1 GiB translation buffer; the guest has 16 MiB.
const AS_LIMIT: u64 = 16 * 1024 * 1024 * 1024;

/// Who the probe's QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    /// User name (`libvirt-qemu`, `qemu`, or qemu.conf's `user`).
    pub name: String,
    /// Its numeric user id, which QEMU runs as.
    pub uid: u32,
    /// Group id QEMU runs as: qemu.conf's `group`, else the user's primary group.
    pub gid: u32,
    /// Supplementary groups (e.g. `kvm`, for /dev/kvm), as libvirt gives them.
    pub groups: Vec<u32>,
}

/// The user and group libvirt's QEMU driver runs guests as, from `qemu_conf`'s text (`None`:
/// no file) or the distribution's default. `Ok(None)` when this process is not root: it cannot
/// change users and QEMU runs as the caller.
pub fn qemu_user(qemu_conf: Option<&str>) -> Result<Option<QemuUser>, String> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let (user, group) = qemu_conf.map(parse_qemu_conf).unwrap_or_default();
    let (name, uid, primary) = match &user {
        Some(spec) => resolve_user(spec)
            .ok_or_else(|| format!("{QEMU_CONF}: user {spec:?} does not exist on this host"))?,
        None => DEFAULT_USERS
            .iter()
            .find_map(|n| resolve_user(n))
            .ok_or_else(|| {
                format!(
                    "no unprivileged QEMU user: {QEMU_CONF} sets no user and neither {} exists",
                    DEFAULT_USERS.join(" nor ")
                )
            })?,
    };
    let gid = match &group {
        Some(spec) => resolve_group(spec)
            .ok_or_else(|| format!("{QEMU_CONF}: group {spec:?} does not exist on this host"))?,
        None => primary,
    };
    let c_name = std::ffi::CString::new(name.clone()).map_err(|e| e.to_string())?;
    let groups = nix::unistd::getgrouplist(&c_name, Gid::from_raw(gid))
        .map(|list| list.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_else(|_| vec![gid]);
    Ok(Some(QemuUser {
        name,
        uid,
        gid,
        groups,
    }))
}

/// [`qemu_user`] for this host's `/etc/libvirt/qemu.conf`.
pub fn this_host_qemu_user() -> Result<Option<QemuUser>, String> {
    let text = std::fs::read_to_string(Path::new(QEMU_CONF)).ok();
    qemu_user(text.as_deref())
}

/// `user = "…"` and `group = "…"` from qemu.conf (libvirt's own syntax: `key = "value"`, `#`
/// comments).
pub fn parse_qemu_conf(text: &str) -> (Option<String>, Option<String>) {
    let mut user = None;
    let mut group = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.split('#').next().unwrap_or("").trim();
        let Some(value) = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .filter(|v| !v.is_empty())
        else {
            continue;
        };
        match key.trim() {
            "user" => user = Some(value.to_string()),
            "group" => group = Some(value.to_string()),
            _ => {}
        }
    }
    (user, group)
}

/// libvirt's user syntax: `+N` is uid N, otherwise a name (or, failing that, a number).
fn resolve_user(spec: &str) -> Option<(String, u32, u32)> {
    let by_uid = |uid: u32| {
        User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| (u.name, uid, u.gid.as_raw()))
    };
    if let Some(n) = spec.strip_prefix('+') {
        return by_uid(n.parse().ok()?);
    }
    match User::from_name(spec).ok().flatten() {
        Some(u) => Some((u.name, u.uid.as_raw(), u.gid.as_raw())),
        None => by_uid(spec.parse().ok()?),
    }
}

fn resolve_group(spec: &str) -> Option<u32> {
    if let Some(n) = spec.strip_prefix('+') {
        return n.parse().ok();
    }
    match Group::from_name(spec).ok().flatten() {
        Some(g) => Some(g.gid.as_raw()),
        None => spec.parse().ok(),
    }
}

/// Applies the confinement to a QEMU command: empty environment, resource limits (core dumps
/// off, bounded file size, open files, address space and CPU time) and, when `user` is given,
/// that user's groups, group and uid, dropped in the child before exec.
pub fn confine(command: &mut Command, user: Option<&QemuUser>, cpu_secs: u64) {
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let ids = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    let limits = [
        (nix::libc::RLIMIT_CORE, 0),
        (nix::libc::RLIMIT_FSIZE, FSIZE_LIMIT),
        (nix::libc::RLIMIT_NOFILE, NOFILE_LIMIT),
        (nix::libc::RLIMIT_AS, AS_LIMIT),
        (nix::libc::RLIMIT_CPU, cpu_secs.max(1)),
    ];
    // SAFETY: between fork and exec the closure only makes raw syscalls (setrlimit, setgroups,
    // setgid, setuid) on values computed before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for (resource, value) in limits {
                let limit = nix::libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if nix::libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &ids {
                if nix::libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || nix::libc::setgid(*gid) != 0
                    || nix::libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_conf_user_and_group_are_read_like_libvirt() {
        let text = "# user = \"nobody\"\n#user = \"libvirt-qemu\"\nuser = \"qemu\"  # RHEL\ngroup=\"kvm\"\nsecurity_driver = \"none\"\n";
        assert_eq!(
            parse_qemu_conf(text),
            (Some("qemu".into()), Some("kvm".into()))
        );
        assert_eq!(parse_qemu_conf("#user = \"x\"\n"), (None, None));
    }

    #[test]
    fn the_default_user_is_detected_and_a_missing_one_named() {
        if !Uid::effective().is_root() {
            assert_eq!(qemu_user(None), Ok(None));
            return;
        }
        match qemu_user(None) {
            Ok(Some(u)) => {
                assert!(DEFAULT_USERS.contains(&u.name.as_str()), "{u:?}");
                assert_ne!(u.uid, 0);
            }
            Ok(None) => unreachable!("root resolves a user"),
            Err(e) => assert!(e.contains("no unprivileged QEMU user"), "{e}"),
        }
        let e = qemu_user(Some("user = \"no-such-user-cpuguard\"\n")).unwrap_err();
        assert!(
            e.contains("\"no-such-user-cpuguard\" does not exist"),
            "{e}"
        );
        let u = qemu_user(Some("user = \"+65534\"\n")).unwrap().unwrap();
        assert_eq!(u.uid, 65534);
    }
}
