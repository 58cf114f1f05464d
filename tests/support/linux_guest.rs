//! Boots a real Linux guest (Debian kernel + busybox initramfs made by
//! testbed/fetch-linux-guest.sh) under the probe's own `-machine`/`-accel`/`-cpu`/`-smp`, and
//! returns what `cpuid -r` printed inside it.
//!
//! Used by tests/fidelity_linux.rs: the guest's view is the reference the probe must match.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::guest_boot::{self, boot_to_serial, kernel_argv, tail, ArgvError, BootError, SerialRun};

/// Where testbed/fetch-linux-guest.sh puts its output unless `CPUGUARD_LINUX_GUEST_DIR` is set.
pub const DEFAULT_GUEST_DIR: &str = "/var/tmp/cpuguard-linux-guest";
/// Printed by the initramfs's /init around `cpuid -r` (same strings as the fetch script).
pub const BEGIN_MARKER: &str = "=====CPUGUARD-CPUID-BEGIN=====";
pub const END_MARKER: &str = "=====CPUGUARD-CPUID-END=====";
/// Separates `cpuid -r` from the extra sub-leaves read one by one (`cpuid -r -1 -l L -s S`).
pub const EXTRA_MARKER: &str = "=====CPUGUARD-CPUID-EXTRA=====";
/// x86 Linux truncates its command line at 2048 bytes; stay well inside it.
const MAX_CMDLINE: usize = 1900;
/// The kernel command line without the extra sub-leaves.
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// The options of the probe's command line that decide the CPU the guest sees. Everything else
/// (firmware, memory, devices) is the probe's own or the Linux guest's own.
pub const CPU_DECIDING_OPTIONS: &[&str] = &["-machine", "-accel", "-cpu", "-smp"];

#[derive(Debug, thiserror::Error)]
pub enum LinuxGuestError {
    #[error("Linux guest file {path:?} is missing or empty: run testbed/fetch-linux-guest.sh as root first")]
    Missing { path: PathBuf },
    #[error("{0}")]
    Argv(#[from] ArgvError),
    #[error("Linux guest: {0}")]
    Boot(#[from] BootError),
    #[error("Linux guest serial output has no {marker:?} line; serial tail: {tail}")]
    NoMarker { marker: &'static str, tail: String },
    #[error("`cpuid -r` in the Linux guest exited with {code:?}")]
    CpuidFailed { code: String },
    #[error("kernel command line for {count} extra sub-leaves is {len} bytes, over {MAX_CMDLINE}")]
    CmdlineTooLong { count: usize, len: usize },
}

/// The kernel and initramfs testbed/fetch-linux-guest.sh made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// What /init printed between the markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialDump {
    /// `cpuid -r` output (all CPUs), line endings normalized.
    pub dump: String,
    /// The extra sub-leaves as `cpuid -r` data lines without `CPU:` headers (may be empty).
    pub extra: String,
}

/// One boot of the Linux guest.
#[derive(Debug, Clone)]
pub struct GuestRun {
    pub output: SerialDump,
    /// The whole argv given to the emulator.
    pub argv: Vec<String>,
    /// Emulator start to exit (kernel boot, `cpuid -r`, power off).
    pub wall_time: Duration,
}

pub fn guest_dir() -> PathBuf {
    std::env::var_os("CPUGUARD_LINUX_GUEST_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR), PathBuf::from)
}

impl LinuxGuest {
    /// The files in [`guest_dir`]; an error (never a skip) when they are not there.
    pub fn locate() -> Result<Self, LinuxGuestError> {
        Self::in_dir(&guest_dir())
    }

    pub fn in_dir(dir: &Path) -> Result<Self, LinuxGuestError> {
        let guest = LinuxGuest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
        };
        for path in [&guest.kernel, &guest.initrd] {
            let present = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0);
            if !present {
                return Err(LinuxGuestError::Missing { path: path.clone() });
            }
        }
        Ok(guest)
    }
}

/// The `-machine`, `-accel`, `-cpu` and `-smp` option/value pairs of the probe's argv, in its
/// order, so the Linux guest runs with literally the same CPU configuration.
pub fn cpu_options(probe_argv: &[String]) -> Result<Vec<String>, LinuxGuestError> {
    // -machine is optional (QEMU's default); the other three the probe always passes.
    Ok(guest_boot::cpu_options(
        probe_argv,
        CPU_DECIDING_OPTIONS,
        &["-accel", "-cpu", "-smp"],
    )?)
}

/// The kernel command line asking /init to also read `extra_leaves` (leaf, sub-leaf).
pub fn kernel_cmdline(extra_leaves: &[(u32, u32)]) -> Result<String, LinuxGuestError> {
    if extra_leaves.is_empty() {
        return Ok(BASE_CMDLINE.to_string());
    }
    let list: Vec<String> = extra_leaves
        .iter()
        .map(|(leaf, subleaf)| format!("{leaf:x}:{subleaf:x}"))
        .collect();
    let cmdline = format!("{BASE_CMDLINE} cpuguard.leaves={}", list.join(","));
    if cmdline.len() > MAX_CMDLINE {
        return Err(LinuxGuestError::CmdlineTooLong {
            count: extra_leaves.len(),
            len: cmdline.len(),
        });
    }
    Ok(cmdline)
}

/// The emulator argv that boots `guest` with `cpu_options` (see [`cpu_options`]) and the
/// kernel command line `cmdline` (see [`kernel_cmdline`]).
pub fn guest_argv(guest: &LinuxGuest, cpu_options: &[String], cmdline: &str) -> Vec<String> {
    kernel_argv(cpu_options, 256, &guest.kernel, &guest.initrd, cmdline)
}

/// Boots the guest, waits at most `timeout` (then kills the emulator's process group), and
/// returns the `cpuid -r` text and the `extra_leaves` read one by one.
pub fn boot(
    emulator: &Path,
    guest: &LinuxGuest,
    cpu_options: &[String],
    extra_leaves: &[(u32, u32)],
    work_dir: &Path,
    timeout: Duration,
) -> Result<GuestRun, LinuxGuestError> {
    let argv = guest_argv(guest, cpu_options, &kernel_cmdline(extra_leaves)?);
    let SerialRun { text, wall_time } = boot_to_serial(emulator, &argv, work_dir, timeout)?;
    let output = extract_dump(&text)?;
    Ok(GuestRun {
        output,
        argv,
        wall_time,
    })
}

/// The text between the markers, checked for `cpuid`'s exit status lines.
pub fn extract_dump(serial: &str) -> Result<SerialDump, LinuxGuestError> {
    let text = serial.replace("\r\n", "\n");
    // The kernel's console may emit escape sequences on the marker's line (SeaBIOS clears the
    // screen), so markers are found as substrings and the data starts on the next line.
    let begin = text
        .find(BEGIN_MARKER)
        .ok_or_else(|| LinuxGuestError::NoMarker {
            marker: BEGIN_MARKER,
            tail: tail(&text),
        })?;
    let after_begin = &text[begin + BEGIN_MARKER.len()..];
    let end = after_begin
        .find(END_MARKER)
        .ok_or_else(|| LinuxGuestError::NoMarker {
            marker: END_MARKER,
            tail: tail(&text),
        })?;
    let body = &after_begin[..end];
    let (main, extra_part) = body.split_once(EXTRA_MARKER).unwrap_or((body, ""));
    let mut dump = String::new();
    let mut exit = None;
    for line in main.lines() {
        if let Some(code) = line.trim().strip_prefix("cpuid-exit=") {
            exit = Some(code.to_string());
        } else {
            dump.push_str(line);
            dump.push('\n');
        }
    }
    if exit.as_deref() != Some("0") {
        return Err(LinuxGuestError::CpuidFailed {
            code: exit.unwrap_or_else(|| "no exit line".to_string()),
        });
    }
    let mut extra = String::new();
    for line in extra_part.lines().map(str::trim) {
        if let Some(code) = line.strip_prefix("cpuid-exit=") {
            return Err(LinuxGuestError::CpuidFailed {
                code: format!("{code} (extra sub-leaf)"),
            });
        }
        if line.starts_with("0x") {
            extra.push_str(line);
            extra.push('\n');
        }
    }
    Ok(SerialDump {
        dump: dump.trim_start_matches('\n').to_string(),
        extra,
    })
}

/// Splits `cpuid -r` output (all CPUs) into one text per `CPU n:` block, in order.
pub fn split_cpus(dump: &str) -> Vec<String> {
    let mut cpus: Vec<String> = Vec::new();
    for line in dump.lines() {
        let body = line.trim();
        if body.starts_with("CPU") && body.ends_with(':') {
            cpus.push(String::new());
        }
        if let Some(current) = cpus.last_mut() {
            current.push_str(line);
            current.push('\n');
        }
    }
    cpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_options_copies_the_deciding_pairs_in_order() {
        let argv: Vec<String> = [
            "-nodefaults",
            "-m",
            "16",
            "-machine",
            "pc-q35-7.2",
            "-accel",
            "tcg",
            "-cpu",
            "EPYC,vmx=off",
            "-smp",
            "2,sockets=1,cores=2,threads=1",
            "-bios",
            "/tmp/fw.bin",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let options = cpu_options(&argv).unwrap();
        assert_eq!(
            options,
            [
                "-machine",
                "pc-q35-7.2",
                "-accel",
                "tcg",
                "-cpu",
                "EPYC,vmx=off",
                "-smp",
                "2,sockets=1,cores=2,threads=1"
            ]
        );
        let guest = LinuxGuest {
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
        };
        let full = guest_argv(&guest, &options, BASE_CMDLINE).join(" ");
        assert!(
            full.contains("-cpu EPYC,vmx=off -smp 2,sockets=1"),
            "{full}"
        );
        assert!(full.contains("-kernel /k -initrd /i"), "{full}");
        assert!(!full.contains("-bios"), "{full}");
    }

    #[test]
    fn cpu_options_rejects_an_argv_without_cpu() {
        let argv = vec!["-accel".to_string(), "tcg".to_string()];
        assert!(matches!(
            cpu_options(&argv),
            Err(LinuxGuestError::Argv(ArgvError::NoCpuOption {
                option: "-cpu",
                ..
            }))
        ));
        let argv = vec!["-cpu".to_string()];
        assert!(matches!(
            cpu_options(&argv),
            Err(LinuxGuestError::Argv(ArgvError::DanglingOption { .. }))
        ));
    }

    #[test]
    fn extract_dump_takes_text_between_markers_and_checks_exit() {
        let serial = format!(
            "SeaBIOS\r\n\x1b[2J{BEGIN_MARKER}\r\nCPU 0:\r\n   0x00000000 0x00: eax=0x0000000d ebx=0x1 ecx=0x2 edx=0x3\r\ncpuid-exit=0\r\n{END_MARKER}\r\n"
        );
        let dump = extract_dump(&serial).unwrap();
        assert_eq!(
            dump.dump,
            "CPU 0:\n   0x00000000 0x00: eax=0x0000000d ebx=0x1 ecx=0x2 edx=0x3\n"
        );
        assert_eq!(dump.extra, "");
        let failed = format!("{BEGIN_MARKER}\ncpuid-exit=1\n{END_MARKER}\n");
        assert!(matches!(
            extract_dump(&failed),
            Err(LinuxGuestError::CpuidFailed { .. })
        ));
        let cut = format!("{BEGIN_MARKER}\nCPU 0:\n");
        assert!(matches!(
            extract_dump(&cut),
            Err(LinuxGuestError::NoMarker {
                marker: END_MARKER,
                ..
            })
        ));
    }

    #[test]
    fn extra_sub_leaves_are_separated_and_their_failures_reported() {
        let serial = format!(
            "{BEGIN_MARKER}\nCPU 0:\n   0x00000000 0x00: eax=0x1 ebx=0x1 ecx=0x2 edx=0x3\ncpuid-exit=0\n\
             {EXTRA_MARKER}\nCPU:\n   0x0000000d 0x05: eax=0x0 ebx=0x0 ecx=0x0 edx=0x0\n{END_MARKER}\n"
        );
        let dump = extract_dump(&serial).unwrap();
        assert!(!dump.dump.contains("0x0000000d"), "{dump:?}");
        assert_eq!(
            dump.extra,
            "0x0000000d 0x05: eax=0x0 ebx=0x0 ecx=0x0 edx=0x0\n"
        );
        let failed = serial.replace("CPU:\n", "cpuid-exit=1\n");
        assert!(matches!(
            extract_dump(&failed),
            Err(LinuxGuestError::CpuidFailed { .. })
        ));
    }

    #[test]
    fn kernel_cmdline_lists_extra_sub_leaves_in_hex_within_the_limit() {
        assert_eq!(kernel_cmdline(&[]).unwrap(), BASE_CMDLINE);
        let line = kernel_cmdline(&[(0xd, 2), (0x8000_001d, 4)]).unwrap();
        assert_eq!(
            line,
            format!("{BASE_CMDLINE} cpuguard.leaves=d:2,8000001d:4")
        );
        let many: Vec<(u32, u32)> = (0..400).map(|s| (0x8000_001d, s)).collect();
        assert!(matches!(
            kernel_cmdline(&many),
            Err(LinuxGuestError::CmdlineTooLong { count: 400, .. })
        ));
    }

    #[test]
    fn split_cpus_separates_blocks() {
        let dump = "CPU 0:\n   0x0 a\nCPU 1:\n   0x0 b\n   0x1 c\n";
        let cpus = split_cpus(dump);
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[1], "CPU 1:\n   0x0 b\n   0x1 c\n");
    }

    #[test]
    fn missing_files_name_the_fetch_script() {
        let dir = tempfile::tempdir().unwrap();
        let err = LinuxGuest::in_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("fetch-linux-guest.sh"), "{err}");
    }
}
