//! The CPU models an emulator has (`-cpu help`), for the one decision libvirt makes from them:
//! whether a `<model fallback='allow'>` is started as named or replaced by a substitute
//! (`crate::x86_64::probe::args::check_model_available`).
//!
//! libvirt asks QEMU the same question (`query-cpu-definitions`, whose names `-cpu help` lists), so
//! the answer belongs to the emulator that runs the probe, not to a list kept in cpuguard.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::run::{describe, run_bounded, RunError, WorkDir};

/// How long `qemu -cpu help` may take (it starts no guest: tens of milliseconds).
const HELP_TIMEOUT: Duration = Duration::from_secs(10);

/// The x86 CPU model names `emulator -cpu help` lists (aliases and versioned names included).
pub fn qemu_cpu_models(emulator: &Path) -> Result<Vec<String>, RunError> {
    let work = WorkDir::create(None)?;
    let out_path = work.path.join("cpu-help.out");
    let out = File::create(&out_path).map_err(|e| RunError::WorkDir {
        path: out_path.clone(),
        reason: e.to_string(),
    })?;
    let mut command = Command::new(emulator);
    command
        .args(["-cpu", "help"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    let status = run_bounded(command, emulator, HELP_TIMEOUT)?;
    if !status.success() {
        return Err(RunError::EmulatorFailed {
            emulator: emulator.to_path_buf(),
            status: describe(status),
            stderr: "`-cpu help` failed".to_string(),
        });
    }
    let text = std::fs::read_to_string(&out_path).map_err(|e| RunError::WorkDir {
        path: out_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(parse_cpu_help(&text))
}

/// `x86 NAME   description` lines, up to the feature flag list that follows them.
fn parse_cpu_help(text: &str) -> Vec<String> {
    text.lines()
        .take_while(|l| !l.starts_with("Recognized CPUID flags"))
        .filter_map(|l| l.strip_prefix("x86 "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_lines_are_read_and_flags_are_not() {
        let text = "Available CPUs:\nx86 486                   (alias configured by machine type)\n\
                    x86 Broadwell-IBRS        (alias of Broadwell-v3)\nx86 qemu64-v1             QEMU Virtual CPU version 2.5+\n\n\
                    Recognized CPUID flags:\n  x86 fpu vme de\n";
        assert_eq!(
            parse_cpu_help(text),
            vec!["486", "Broadwell-IBRS", "qemu64-v1"]
        );
    }

    #[test]
    fn this_hosts_qemu_lists_its_models() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.exists() {
            eprintln!("skipped: {} is not installed", qemu.display());
            return;
        }
        let models = qemu_cpu_models(qemu).unwrap();
        for model in ["qemu64", "Nehalem", "EPYC"] {
            assert!(models.iter().any(|m| m == model), "{model}: {models:?}");
        }
    }
}
