//! The one gate for tests that need something outside the crate: root, an emulator, a usable
//! KVM, libvirt, rsyslog, Chromium, a command-line tool, the Linux guest images.
//!
//! Include it with `#[path = "support/gate.rs"] mod gate;` and start the test with
//! `if !gate::require(&[Need::Root, Need::Qemu("x86_64")]) { return; }`.
//!
//! A missing prerequisite is one printed line naming the test and what is missing, and the test
//! returns early. Under `CI=true` (set by `.ci/run` and `testbed/run-tests.sh`, which install
//! everything with `testbed/install-deps.sh` and the guest fetch scripts) a missing prerequisite
//! that those scripts provide fails the test instead: a CI run must never pass by skipping. What
//! no script can provide (a usable KVM, a kernel that allows mount namespaces) stays a printed
//! skip even under CI, except a `/dev/kvm` that exists but cannot run a guest: a CI machine that
//! has KVM must run the KVM tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;

#[path = "kvm.rs"]
mod kvm;

const INSTALL: &str = "testbed/install-deps.sh";

/// Something a test needs from the machine.
#[derive(Debug, Clone)]
pub enum Need {
    /// Running as root (the probe runs only root-owned emulators; chown, mknod, mounts).
    Root,
    /// `/usr/bin/qemu-system-<arch>`, e.g. `Qemu("x86_64")`, `Qemu("aarch64")`.
    Qemu(&'static str),
    /// A KVM that boots a guest: `/dev/kvm` opens read-write and runs cpuguard's exit firmware.
    Kvm,
    /// `libvirtd`, `virtlogd` and `virsh` (the two-host test bed).
    Libvirt,
    /// `/usr/sbin/rsyslogd`.
    Rsyslog,
    /// `/usr/bin/chromium` (renders `cpuguard plan --html`).
    Chromium,
    /// A command on `PATH` that `testbed/install-deps.sh` installs, e.g. `Tool("cpuid")`.
    Tool(&'static str),
    /// Files a fetch script makes: `script` and why they are not usable (`None`: they are),
    /// e.g. `Fetched("testbed/fetch-linux-guest.sh", LinuxGuest::locate().err().map(…))`.
    Fetched(&'static str, Option<String>),
    /// Private mount namespaces (`unshare -m`); `None` when they work, else why not (a container
    /// may forbid them; no script can change that).
    MountNamespace(Option<String>),
}

impl Need {
    /// Why this prerequisite is missing, or `None` when it is met.
    fn missing(&self) -> Option<String> {
        match self {
            Need::Root => (!nix::unistd::geteuid().is_root()).then(|| "root".to_string()),
            Need::Qemu(arch) => {
                let path = format!("/usr/bin/qemu-system-{arch}");
                let package = if *arch == "aarch64" {
                    "qemu-system-arm"
                } else {
                    "qemu-system-x86"
                };
                (!Path::new(&path).exists()).then(|| format!("{path} (package {package})"))
            }
            Need::Kvm => kvm::unusable_reason().map(|reason| format!("a usable KVM: {reason}")),
            Need::Libvirt => {
                let missing: Vec<&str> =
                    ["/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/bin/virsh"]
                        .into_iter()
                        .filter(|tool| !Path::new(tool).exists())
                        .collect();
                (!missing.is_empty()).then(|| missing.join(", "))
            }
            Need::Rsyslog => (!Path::new("/usr/sbin/rsyslogd").exists())
                .then(|| "/usr/sbin/rsyslogd".to_string()),
            Need::Chromium => {
                (!Path::new("/usr/bin/chromium").exists()).then(|| "/usr/bin/chromium".to_string())
            }
            Need::Tool(name) => (!on_path(name)).then(|| format!("`{name}` on PATH")),
            Need::Fetched(script, problem) => problem
                .as_ref()
                .map(|problem| format!("the files {script} makes: {problem}")),
            Need::MountNamespace(problem) => problem
                .as_ref()
                .map(|problem| format!("a private mount namespace: {problem}")),
        }
    }

    /// Whether the CI's own scripts provide this prerequisite, so that missing it under
    /// `CI=true` is a broken CI machine rather than a limit of the machine.
    fn ci_provides(&self) -> bool {
        match self {
            Need::Kvm => Path::new("/dev/kvm").exists(),
            Need::MountNamespace(_) => false,
            Need::Root
            | Need::Qemu(_)
            | Need::Libvirt
            | Need::Rsyslog
            | Need::Chromium
            | Need::Tool(_)
            | Need::Fetched(..) => true,
        }
    }

    /// How to provide it, for the printed line.
    fn remedy(&self) -> String {
        match self {
            Need::Root => "run the tests as root".to_string(),
            Need::Kvm | Need::MountNamespace(_) => "not installable".to_string(),
            Need::Fetched(script, _) => format!("run {script} as root"),
            _ => format!("run {INSTALL} as root"),
        }
    }
}

/// True when `CI` is `true` (or `1`): prerequisites the CI installs are then mandatory.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when every prerequisite in `needs` is met. Otherwise prints one line naming the test
/// (libtest's thread name) and what is missing, and returns false; under `CI=true` it panics
/// instead when something missing is one the CI provides.
pub fn require(needs: &[Need]) -> bool {
    require_for(&current_test(), needs)
}

/// [`require`] for a named part of a test (`"the KVM half of …"`) that is skipped alone.
pub fn require_part(part: &str, needs: &[Need]) -> bool {
    require_for(&format!("{} ({part})", current_test()), needs)
}

fn require_for(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<(&Need, String)> = needs
        .iter()
        .filter_map(|need| need.missing().map(|why| (need, why)))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let line = missing
        .iter()
        .map(|(need, why)| format!("{why} [{}]", need.remedy()))
        .collect::<Vec<_>>()
        .join("; ");
    if in_ci() && missing.iter().any(|(need, _)| need.ci_provides()) {
        panic!("{test}: missing under CI=true: {line}");
    }
    eprintln!("skipped {test}: missing {line}");
    false
}

fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string()
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}
