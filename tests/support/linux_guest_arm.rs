//! Boots a real arm64 Linux guest (Debian 12 kernel + busybox initramfs made by
//! testbed/fetch-linux-guest-arm64.sh) under the aarch64 probe's own `-machine`/`-cpu`/`-smp`,
//! and returns what its /init printed: /proc/cpuinfo, the identification registers Linux exposes
//! under /sys/devices/system/cpu/cpu0/regs/identification/, and the kernel's CPU-feature messages.
//!
//! Used by tests/fidelity_arm.rs: the guest's view is the reference the probe must match.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::guest_boot::{self, boot_to_serial, kernel_argv, tail, ArgvError, BootError, SerialRun};

/// Where testbed/fetch-linux-guest-arm64.sh puts its output unless
/// `CPUGUARD_LINUX_GUEST_ARM64_DIR` is set.
pub const DEFAULT_GUEST_DIR: &str = "/var/tmp/cpuguard-linux-guest-arm64";
/// Printed by the initramfs's /init (same strings as the fetch script).
pub const BEGIN_MARKER: &str = "=====CPUGUARD-ARM64-BEGIN=====";
pub const CPUINFO_MARKER: &str = "=====CPUGUARD-ARM64-CPUINFO=====";
pub const IDREGS_MARKER: &str = "=====CPUGUARD-ARM64-IDREGS=====";
pub const DMESG_MARKER: &str = "=====CPUGUARD-ARM64-DMESG=====";
pub const END_MARKER: &str = "=====CPUGUARD-ARM64-END=====";
/// `quiet` keeps the boot log off the console; /init also sets printk to 0 before the dump.
pub const CMDLINE: &str = "console=ttyAMA0 panic=-1 quiet";
/// The options of the probe's command line that decide the CPU the guest sees (the aarch64 probe
/// passes the accelerator inside `-machine`).
pub const CPU_DECIDING_OPTIONS: &[&str] = &["-machine", "-accel", "-cpu", "-smp"];

#[derive(Debug, thiserror::Error)]
pub enum ArmGuestError {
    #[error("arm64 Linux guest file {path:?} is missing or empty: run testbed/fetch-linux-guest-arm64.sh as root first")]
    Missing { path: PathBuf },
    #[error("{0}")]
    Argv(#[from] ArgvError),
    #[error("arm64 Linux guest: {0}")]
    Boot(#[from] BootError),
    #[error("arm64 Linux guest serial output has no {marker:?} line; serial tail: {tail}")]
    NoMarker { marker: &'static str, tail: String },
    #[error("arm64 Linux guest sysfs line {line:?} is not `name=0x<hex>`")]
    BadIdReg { line: String },
}

/// The files testbed/fetch-linux-guest-arm64.sh made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmLinuxGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel's build configuration.
    pub config: PathBuf,
}

/// What /init printed between the markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestView {
    /// /proc/cpuinfo, line endings normalized.
    pub cpuinfo: String,
    /// /sys/devices/system/cpu/cpu0/regs/identification/<name>, by file name.
    pub idregs: BTreeMap<String, u64>,
    /// The kernel's `Linux version` and CPU-feature boot messages.
    pub dmesg: String,
}

/// One boot of the guest.
#[derive(Debug, Clone)]
pub struct GuestRun {
    pub view: GuestView,
    /// The whole argv given to the emulator.
    pub argv: Vec<String>,
    /// Emulator start to exit (kernel boot, dump, power off).
    pub wall_time: Duration,
}

pub fn guest_dir() -> PathBuf {
    std::env::var_os("CPUGUARD_LINUX_GUEST_ARM64_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR), PathBuf::from)
}

impl ArmLinuxGuest {
    /// The files in [`guest_dir`].
    pub fn locate() -> Result<Self, ArmGuestError> {
        Self::in_dir(&guest_dir())
    }

    pub fn in_dir(dir: &Path) -> Result<Self, ArmGuestError> {
        let guest = ArmLinuxGuest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
            config: dir.join("config"),
        };
        for path in [&guest.kernel, &guest.initrd, &guest.config] {
            let present = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0);
            if !present {
                return Err(ArmGuestError::Missing { path: path.clone() });
            }
        }
        Ok(guest)
    }
}

/// The CPU-deciding option/value pairs of the probe's argv, in its order, so the Linux guest runs
/// with literally the same CPU configuration.
pub fn cpu_options(probe_argv: &[String]) -> Result<Vec<String>, ArmGuestError> {
    // `virt` is no default on aarch64 and the default CPU is not the probed one: both required.
    Ok(guest_boot::cpu_options(
        probe_argv,
        CPU_DECIDING_OPTIONS,
        &["-machine", "-cpu", "-smp"],
    )?)
}

/// The emulator argv that boots `guest` with `cpu_options` (see [`cpu_options`]).
pub fn guest_argv(guest: &ArmLinuxGuest, cpu_options: &[String]) -> Vec<String> {
    kernel_argv(cpu_options, 512, &guest.kernel, &guest.initrd, CMDLINE)
}

/// Boots the guest, waits at most `timeout` (then kills the emulator's process group), and
/// returns what /init printed.
pub fn boot(
    emulator: &Path,
    guest: &ArmLinuxGuest,
    cpu_options: &[String],
    work_dir: &Path,
    timeout: Duration,
) -> Result<GuestRun, ArmGuestError> {
    let argv = guest_argv(guest, cpu_options);
    let SerialRun { text, wall_time } = boot_to_serial(emulator, &argv, work_dir, timeout)?;
    Ok(GuestRun {
        view: parse_serial(&text)?,
        argv,
        wall_time,
    })
}

/// Splits the serial output into its sections.
pub fn parse_serial(serial: &str) -> Result<GuestView, ArmGuestError> {
    let text = serial.replace("\r\n", "\n");
    let mut rest = text.as_str();
    let mut sections = Vec::new();
    // Markers are found as substrings (the console may put escape sequences on their line); each
    // section is the text between one marker's line end and the next marker.
    for marker in [
        BEGIN_MARKER,
        CPUINFO_MARKER,
        IDREGS_MARKER,
        DMESG_MARKER,
        END_MARKER,
    ] {
        let at = rest.find(marker).ok_or_else(|| ArmGuestError::NoMarker {
            marker,
            tail: tail(&text),
        })?;
        sections.push(&rest[..at]);
        rest = &rest[at + marker.len()..];
    }
    // sections[0] is the boot log before BEGIN, [1] between BEGIN and CPUINFO.
    let body = |s: &str| s.trim_start_matches(['\n', ' ']).trim_end().to_string();
    let mut idregs = BTreeMap::new();
    for line in sections[3].lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || ArmGuestError::BadIdReg {
            line: line.to_string(),
        };
        let (name, value) = line.split_once('=').ok_or_else(bad)?;
        let value = value
            .strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or_else(bad)?;
        idregs.insert(name.to_string(), value);
    }
    Ok(GuestView {
        cpuinfo: body(sections[2]),
        idregs,
        dmesg: body(sections[4]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_options_copies_machine_cpu_and_smp_from_the_probe() {
        let argv: Vec<String> = [
            "-nodefaults",
            "-m",
            "64",
            "-machine",
            "virt,accel=tcg",
            "-cpu",
            "cortex-a72",
            "-smp",
            "2",
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
                "virt,accel=tcg",
                "-cpu",
                "cortex-a72",
                "-smp",
                "2"
            ]
        );
        let guest = ArmLinuxGuest {
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            config: PathBuf::from("/c"),
        };
        let full = guest_argv(&guest, &options).join(" ");
        assert!(full.contains("-cpu cortex-a72 -smp 2"), "{full}");
        assert!(full.contains("-kernel /k -initrd /i"), "{full}");
        assert!(!full.contains("-bios"), "{full}");
        let no_cpu: Vec<String> = argv.iter().filter(|a| *a != "-cpu").cloned().collect();
        assert!(matches!(
            cpu_options(&no_cpu),
            Err(ArmGuestError::Argv(ArgvError::NoCpuOption {
                option: "-cpu",
                ..
            }))
        ));
    }

    #[test]
    fn serial_sections_are_split_at_the_markers() {
        let serial = format!(
            "[    0.1] boot noise\r\n{BEGIN_MARKER}\r\n{CPUINFO_MARKER}\r\nprocessor\t: 0\r\n\
             Features\t: fp\r\n\r\n{IDREGS_MARKER}\r\nmidr_el1=0x00000000411fd070\r\n\
             revidr_el1=0x0000000000000000\r\n{DMESG_MARKER}\r\n[    0.0] Linux version 6.1.0\r\n\
             {END_MARKER}\r\n"
        );
        let view = parse_serial(&serial).unwrap();
        assert_eq!(view.cpuinfo, "processor\t: 0\nFeatures\t: fp");
        assert_eq!(view.idregs.get("midr_el1"), Some(&0x411f_d070));
        assert_eq!(view.idregs.get("revidr_el1"), Some(&0));
        assert!(view.dmesg.contains("Linux version 6.1.0"));
        let truncated = &serial[..serial.find(DMESG_MARKER).unwrap()];
        assert!(matches!(
            parse_serial(truncated),
            Err(ArmGuestError::NoMarker {
                marker: DMESG_MARKER,
                ..
            })
        ));
        let bad = serial.replace("=0x00000000411fd070", "=411fd070");
        assert!(matches!(
            parse_serial(&bad),
            Err(ArmGuestError::BadIdReg { .. })
        ));
    }
}
