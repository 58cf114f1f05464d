//! Whether this machine's KVM can run a firmware guest, for tests that need it.
//!
//! Tests gate on it through `Need::Kvm` (tests/support/gate.rs); benches/probe.rs includes it
//! directly. Usability is detected by doing what the tests do, not by looking at permissions: a
//! QEMU with `-accel kvm` boots cpuguard's exit firmware and must end with its exit status.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Command, Stdio};

use cpuguard::x86_64::probe::firmware::{EXIT_X86, PROBE_EXIT_STATUS};

pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Why KVM cannot be used here, or `None` when a KVM guest runs.
pub fn unusable_reason() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".to_string());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm cannot be opened read-write: {e}"));
    }
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => return Some(format!("no temporary directory: {e}")),
    };
    let firmware = dir.path().join("exit.bin");
    if let Err(e) = std::fs::write(&firmware, EXIT_X86) {
        return Some(format!("cannot write {}: {e}", firmware.display()));
    }
    // Bounded: a guest that never reaches its exit port must not hang the test, and coreutils'
    // timeout kills QEMU with it instead of leaving it behind.
    let output = Command::new("timeout")
        .args(["--kill-after=5", "30", QEMU])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-m", "16", "-accel", "kvm", "-cpu", "qemu64"])
        .arg("-bios")
        .arg(&firmware)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .output();
    match output {
        Err(e) => Some(format!("cannot run {QEMU}: {e}")),
        Ok(out) if out.status.code() == Some(PROBE_EXIT_STATUS) => None,
        Ok(out) => Some(format!(
            "a KVM guest did not run ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}
