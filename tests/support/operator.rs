//! Shared by the operator-tool tests (`check`, `matrix`, the aarch64 guard): "hosts" that are
//! configuration files with their own cache, a destination made different by an emulator wrapper
//! that appends a `-cpu` option, and the `cpuguard` binary run as an operator would.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cpuguard::domain::metadata::{stamp_element, STAMP_NS};

pub const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");

/// A private directory under target/: every directory on the way is root's and not
/// world-writable, as the emulator checks require of a wrapper inside it.
pub fn scratch_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A host's configuration file: its own cache and runtime directories, `emulator` allowed.
pub fn host_config(dir: &Path, name: &str, emulator: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "cache_dir = \"{}\"\nruntime_dir = \"{}\"\n[probe]\nemulators = [\"{emulator}\"]\n",
            dir.join(format!("{name}-cache")).display(),
            dir.join(format!("{name}-run")).display(),
        ),
    )
    .expect("write config");
    path
}

/// An emulator wrapper `dir/name` that runs `qemu` with `,option` appended to every `-cpu`
/// value: how one machine plays a destination whose guests see a different CPU.
pub fn cpu_option_wrapper(dir: &Path, name: &str, qemu: &str, option: &str) -> String {
    let wrapper = dir.join(name);
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nargs=(); prev=\nfor a in \"$@\"; do\n  \
             if [[ $prev == -cpu ]]; then a=\"$a,{option}\"; fi\n  args+=(\"$a\"); prev=$1; shift\ndone\n\
             exec {qemu} \"${{args[@]}}\"\n"
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper.to_str().expect("utf-8").to_string()
}

/// Runs `cpuguard ARGS` with `config`, feeding `stdin`; (exit code, stdout, stderr).
pub fn cpuguard(
    config: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .env("CPUGUARD_CONFIG", config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cpuguard");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("write stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The domain XML with every cpuguard stamp in it bound to this domain (its UUID and CPU
/// configuration digest), as a source's `cpuguard-libvirt` writes them since issue 11. An XML
/// that cannot be read is returned unchanged (the hook then says why).
pub fn bind_stamps(xml: String) -> String {
    let Ok(guest) = cpuguard::domain::guest::GuestCpuConfig::from_domain_xml(&xml) else {
        return xml;
    };
    let uuid = xml
        .split_once("<uuid>")
        .and_then(|(_, rest)| rest.split_once("</uuid>"))
        .map(|(u, _)| u.to_string())
        .unwrap_or_default();
    xml.replace(
        "<cpuguard:stamp ",
        &format!(
            "<cpuguard:stamp uuid='{uuid}' config='{}' ",
            guest.binding_digest()
        ),
    )
}

/// A stamp element as libvirt shows it in the domain XML (namespaced by the metadata API).
pub fn namespaced_stamp(host: &str, digest: &str, cpu: &str, table: &str) -> String {
    stamp_element(host, "2026-11-22T05:00:00Z", digest, cpu, table)
        .replacen(
            "<stamp ",
            &format!("<cpuguard:stamp xmlns:cpuguard='{STAMP_NS}' "),
            1,
        )
        .replace("</stamp>", "</cpuguard:stamp>")
}
