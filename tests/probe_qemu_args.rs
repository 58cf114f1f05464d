//! cpuguard's `-machine`, `-accel`, `-cpu` and `-smp` for the probe against what libvirt itself
//! puts on the command line (`virsh domxml-to-native qemu-argv`), for every domain XML in
//! tests/fixtures/domains/.
//!
//! libvirt runs in a private mount namespace with empty /etc/libvirt, /run,
//! /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, so it neither disturbs nor sees any
//! other libvirtd on the machine (no hooks, no autostart domains). Needs root, `unshare` and
//! libvirt-daemon-system.
//!
//! What is compared:
//! - `-machine`: the machine type (libvirt adds usb=off etc., which do not change CPUID);
//! - `-accel`: equal;
//! - `-cpu`: the model (first field) equal, the properties equal as sets (libvirt keeps the XML's
//!   feature order, cpuguard sorts);
//! - `-smp`: equal.
//!
//! An unexpanded host-model CPU is not compared: libvirt expands it from its host CPU data, and
//! cpuguard refuses it (asserted).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpuguard::domain::guest::GuestCpuConfig;
use cpuguard::probe::qemu_args::{accel_name, cpu_arg, smp_arg, ArgsError};

const LIBVIRT_IN_NAMESPACE: &str = r#"
set -e
D=$(mktemp -d /tmp/cpuguard-virsh-ns.XXXXXX)
trap 'rm -rf "$D"' EXIT
mkdir -p "$D/etc" "$D/run" "$D/lib" "$D/cache" "$D/log"
mount --bind "$D/etc" /etc/libvirt
# All of /run, not /run/libvirt: the latter comes and goes with other daemons on the machine.
mount --bind "$D/run" /run
mount --bind "$D/lib" /var/lib/libvirt
mount --bind "$D/cache" /var/cache/libvirt
mount --bind "$D/log" /var/log/libvirt
libvirtd -d -p "$D/libvirtd.pid"
up=
for i in $(seq 300); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then up=1; break; fi
  sleep 0.1
done
[ -n "$up" ] || { echo "private libvirtd did not come up" >&2; kill "$(cat "$D/libvirtd.pid")"; exit 1; }
for f in "$@"; do
  kill -0 "$(cat "$D/libvirtd.pid")" || { echo "private libvirtd died before $f" >&2; exit 1; }
  echo "== $f"
  virsh -c qemu:///system domxml-to-native qemu-argv --xml "$f" 2>&1 | tr '\n' ' '
  echo
done
kill "$(cat "$D/libvirtd.pid")"
"#;

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/domains")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    files
}

/// Runs virsh domxml-to-native for every file; returns (file, argv text) pairs.
fn libvirt_argv(files: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let output = Command::new("timeout")
        .arg("180")
        .args(["unshare", "-m", "--propagation", "private"])
        .args(["bash", "-c", LIBVIRT_IN_NAMESPACE, "libvirt-in-namespace"])
        .args(files)
        .output()
        .expect("cannot run unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "private libvirtd failed (needs root, unshare, libvirt-daemon-system): {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        stdout
    );
    let mut result = Vec::new();
    let mut lines = stdout.lines();
    while let Some(line) = lines.next() {
        if let Some(file) = line.strip_prefix("== ") {
            let argv = lines.next().unwrap_or_default().to_string();
            result.push((PathBuf::from(file), argv));
        }
    }
    assert_eq!(result.len(), files.len(), "{stdout}");
    result
}

fn option<'a>(argv: &'a str, name: &str) -> Option<&'a str> {
    let mut words = argv.split_whitespace();
    while let Some(word) = words.next() {
        if word == name {
            return words.next();
        }
    }
    None
}

fn cpu_parts(cpu: &str) -> (String, BTreeSet<String>) {
    let mut parts = cpu.split(',');
    let model = parts.next().unwrap_or_default().to_string();
    (model, parts.map(str::to_string).collect())
}

fn compare(file: &Path, argv: &str) -> Result<String, String> {
    let xml = std::fs::read_to_string(file).unwrap();
    let config = GuestCpuConfig::from_domain_xml(&xml).unwrap();
    let name = file.file_name().unwrap().to_string_lossy();
    let libvirt_cpu = option(argv, "-cpu").ok_or(format!("{name}: libvirt said: {argv}"))?;

    let ours_cpu = match cpu_arg(&config) {
        Err(ArgsError::HostModelNotExpanded) => {
            return Ok(format!(
                "{name}: host-model, libvirt expands to {}; cpuguard refuses (expected)",
                cpu_parts(libvirt_cpu).0
            ))
        }
        other => other.map_err(|e| format!("{name}: {e}"))?,
    };

    let libvirt_machine = option(argv, "-machine")
        .and_then(|m| m.split(',').next())
        .ok_or(format!("{name}: no -machine in {argv}"))?;
    if config.machine.as_deref() != Some(libvirt_machine) {
        return Err(format!(
            "{name}: machine {:?} vs libvirt {libvirt_machine}",
            config.machine
        ));
    }
    let libvirt_accel = option(argv, "-accel").ok_or(format!("{name}: no -accel"))?;
    if accel_name(config.accel) != libvirt_accel {
        return Err(format!(
            "{name}: accel differs from libvirt {libvirt_accel}"
        ));
    }
    let (their_model, their_props) = cpu_parts(libvirt_cpu);
    let (our_model, our_props) = cpu_parts(&ours_cpu);
    if their_model != our_model || their_props != our_props {
        return Err(format!(
            "{name}: -cpu differs\n  libvirt:  {libvirt_cpu}\n  cpuguard: {ours_cpu}\n  only libvirt: {:?}\n  only cpuguard: {:?}",
            their_props.difference(&our_props).collect::<Vec<_>>(),
            our_props.difference(&their_props).collect::<Vec<_>>()
        ));
    }
    let libvirt_smp = option(argv, "-smp").ok_or(format!("{name}: no -smp"))?;
    let ours_smp = smp_arg(&config);
    if libvirt_smp != ours_smp {
        return Err(format!("{name}: -smp {ours_smp} vs libvirt {libvirt_smp}"));
    }
    Ok(format!(
        "{name}: same -machine {libvirt_machine} -accel {libvirt_accel} -cpu {our_model}(+{} props) -smp {ours_smp}",
        our_props.len()
    ))
}

#[test]
fn machine_cpu_and_smp_match_virsh_domxml_to_native() {
    let files = fixtures();
    assert!(files.len() >= 8, "fixture corpus shrank: {files:?}");
    let mut failures = Vec::new();
    let mut compared = 0;
    for (file, argv) in libvirt_argv(&files) {
        match compare(&file, &argv) {
            Ok(line) => {
                if !line.contains("refuses") {
                    compared += 1;
                }
                println!("{line}");
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(compared >= 7, "only {compared} fixtures compared");
}
