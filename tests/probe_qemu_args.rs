//! cpuguard's `-machine`, `-accel`, `-cpu` and `-smp` for the probe against what libvirt itself
//! puts on the command line (`virsh domxml-to-native qemu-argv`), for every domain XML in
//! tests/fixtures/domains/.
//!
//! libvirt runs privately (tests/support/libvirtd.rs): its own namespaces, owned by the test,
//! neither disturbing nor seeing any other libvirtd on the machine. Needs root, `unshare` and
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

use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::probe::qemu_args::{accel_name, cpu_arg, smp_arg, ArgsError};

#[path = "support/libvirtd.rs"]
mod libvirtd;
use libvirtd::PrivateLibvirtd;

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/domains")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    files
}

/// Runs virsh domxml-to-native for every file in a private libvirtd this test owns (each call
/// bounded on its own; the daemon's first answer waits for its capabilities probe); returns
/// (file, argv text) pairs.
fn libvirt_argv(files: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let daemon = PrivateLibvirtd::start().unwrap_or_else(|e| panic!("{e}"));
    files
        .iter()
        .map(|file| {
            let argv = daemon
                .domxml_to_native(file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            (file.clone(), argv)
        })
        .collect()
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
    // A KVM definition whose CPU this machine's processor cannot give: libvirt refuses to start
    // it here, so there is no argv of libvirt's to compare with on this machine (the fixtures
    // come from other hosts' CPUs).
    if argv.contains("the CPU is incompatible with host CPU") && config.accel == Accel::Kvm {
        return Ok(format!(
            "{name}: not comparable on this machine, libvirt refuses it: {}",
            argv.trim()
        ));
    }
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
                if !line.contains("refuses") && !line.contains("not comparable") {
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
