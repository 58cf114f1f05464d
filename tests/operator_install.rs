//! `cpuguard install` / `cpuguard uninstall` through the binary, on temporary hooks directories;
//! and that the installed link really is the hook (libvirt's call through it is answered).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");

fn cpuguard(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run cpuguard");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn install_then_uninstall_an_empty_hooks_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = dir.path().join("hooks");
    let h = hooks.to_str().expect("utf-8");
    let (code, out, err) = cpuguard(&["install", "--hooks-dir", h, "--target", BIN]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with(&format!("installed the hook: {h}/qemu -> {BIN}")),
        "{out}"
    );
    assert!(out.contains("restart"), "{out}");
    assert!(out.contains("cpuguard stamp --all"), "{out}");
    assert_eq!(
        std::fs::read_link(hooks.join("qemu")).expect("link"),
        Path::new(BIN)
    );

    // libvirt runs the link with the protocol's arguments: it answers as the hook (a normal
    // start's `start begin` is a no-op, exit 0, no output).
    let mut child = Command::new(hooks.join("qemu"))
        .args(["guest1", "start", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the hook link");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"<domain type='qemu'><name>guest1</name></domain>")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());

    let (code, out, _) = cpuguard(&["install", "--hooks-dir", h, "--target", BIN]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("already installed"), "{out}");

    let (code, out, _) = cpuguard(&["uninstall", "--hooks-dir", h, "--target", BIN]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("removed {h}/qemu")), "{out}");
    assert!(std::fs::symlink_metadata(hooks.join("qemu")).is_err());
    let (code, out, _) = cpuguard(&["uninstall", "--hooks-dir", h, "--target", BIN]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("no cpuguard hook in"), "{out}");
}

#[test]
fn another_programs_hook_is_kept_and_said() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooks = dir.path().join("hooks");
    std::fs::create_dir_all(&hooks).expect("mkdir");
    std::os::unix::fs::symlink("/usr/local/bin/vendor-hook", hooks.join("qemu")).expect("link");
    let h = hooks.to_str().expect("utf-8");
    let (code, out, err) = cpuguard(&["install", "--hooks-dir", h, "--target", BIN]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("{h}/qemu.d/50-cpuguard")), "{out}");
    assert!(
        out.contains("belongs to another program (a link to /usr/local/bin/vendor-hook)"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_link(hooks.join("qemu")).expect("vendor link"),
        Path::new("/usr/local/bin/vendor-hook")
    );
    let (code, _, _) = cpuguard(&["uninstall", "--hooks-dir", h, "--target", BIN]);
    assert_eq!(code, Some(0));
    assert!(std::fs::symlink_metadata(hooks.join("qemu.d/50-cpuguard")).is_err());
    assert!(std::fs::symlink_metadata(hooks.join("qemu")).is_ok());

    // Someone else's qemu.d/50-cpuguard: refused, exit 2, one line.
    std::fs::write(hooks.join("qemu.d/50-cpuguard"), b"x").expect("write");
    let (code, out, err) = cpuguard(&["install", "--hooks-dir", h, "--target", BIN]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("cpuguard does not replace it"), "{err}");
}

#[test]
fn a_missing_target_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = dir.path().join("hooks");
    let (code, _, err) = cpuguard(&[
        "install",
        "--hooks-dir",
        h.to_str().expect("utf-8"),
        "--target",
        "/nonexistent/cpuguard",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.starts_with("cpuguard: /nonexistent/cpuguard: the cpuguard binary"),
        "{err}"
    );
}
