//! Running the aarch64 ID-register probe: the QEMU command line for the `virt` machine, a bounded
//! run (the x86 runner's process-group and timeout handling) and the parser of the UART output.
//!
//! The later wiring maps a domain's `GuestCpuConfig` (emulator, machine, accel, `<cpu>` mode and
//! model, vCPUs) onto [`ArmProbeConfig`]; nothing here reads XML.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::firmware::{HEADER, PROBED_REGISTERS};
use super::idregs::{ArmIdReg, ArmIdTable};
use super::PROBE_AARCH64;
use crate::domain::guest::{Accel, CpuMode, FeaturePolicy, GuestCpuConfig};
use crate::probe::emulator::{check_emulator, EmulatorError};
use crate::probe::run::{run_firmware, ProbeError, WorkDir};

/// The guest CPU, as `-cpu` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode", content = "model")]
pub enum ArmCpu {
    /// `<cpu mode='host-passthrough'>` (KVM only).
    Host,
    /// `<cpu mode='maximum'>`: every feature the accelerator can give.
    Max,
    /// `<cpu mode='custom'><model>cortex-a57</model>`.
    Model(String),
}

/// What a probe of an aarch64 domain needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmProbeConfig {
    /// The domain's `<emulator>`; checked against the allow-list before it is run.
    pub emulator: String,
    /// `<os><type machine=…>`, e.g. `virt` or `virt-7.2`.
    pub machine: String,
    pub accel: Accel,
    pub cpu: ArmCpu,
    /// `-cpu` properties in libvirt's order: `<cpu><feature>` (`sve=off`, `sve256=on`, …), then
    /// `<features><pmu>` (`pmu=off`); names are checked when the command line is built.
    #[serde(default)]
    pub properties: Vec<String>,
    pub vcpus: u32,
}

impl ArmProbeConfig {
    /// The probe configuration of an aarch64 domain. Refused rather than approximated: anything
    /// the probe would not reproduce exactly (CPU features, host-model, no `<cpu>`).
    pub fn from_guest(config: &GuestCpuConfig) -> Result<ArmProbeConfig, ArmProbeError> {
        let bad =
            |what: &'static str, value: &str, reason: &'static str| ArmProbeError::BadConfig {
                what,
                value: value.to_string(),
                reason,
            };
        if config.arch != "aarch64" {
            return Err(bad(
                "<os><type arch>",
                &config.arch,
                "not an aarch64 domain",
            ));
        }
        let emulator = config
            .emulator
            .clone()
            .ok_or_else(|| bad("<emulator>", "", "the domain names no emulator"))?;
        let def = config.cpu.as_ref().ok_or_else(|| {
            bad(
                "<cpu>",
                "",
                "an aarch64 domain without <cpu> runs QEMU's default model, which is not probed",
            )
        })?;
        // libvirt puts each feature on -cpu as `name=on|off` (aarch64 names are QEMU's
        // property names, e.g. sve, sve256) and the PMU switch after them.
        let mut properties = Vec::new();
        for f in &def.features {
            let state = match f.policy {
                FeaturePolicy::Force | FeaturePolicy::Require => "on",
                FeaturePolicy::Disable | FeaturePolicy::Forbid => "off",
                FeaturePolicy::Optional => continue,
            };
            properties.push(format!("{}={state}", f.name));
        }
        if let Some(pmu) = config.features.pmu {
            properties.push(format!("pmu={}", if pmu { "on" } else { "off" }));
        }
        let cpu = match def.mode {
            CpuMode::HostPassthrough => ArmCpu::Host,
            CpuMode::Maximum => ArmCpu::Max,
            CpuMode::Custom => ArmCpu::Model(
                def.model
                    .clone()
                    .ok_or_else(|| bad("<cpu><model>", "", "custom mode needs a model"))?,
            ),
            CpuMode::HostModel => {
                return Err(bad(
                    "<cpu mode>",
                    "host-model",
                    "libvirt does not support host-model on aarch64",
                ))
            }
        };
        Ok(ArmProbeConfig {
            emulator,
            machine: config.machine.clone().unwrap_or_else(|| "virt".to_string()),
            accel: config.accel,
            cpu,
            properties,
            vcpus: config.vcpus.max(1),
        })
    }

    /// A one-vCPU `virt` guest.
    pub fn new(emulator: &str, accel: Accel, cpu: ArmCpu) -> ArmProbeConfig {
        ArmProbeConfig {
            emulator: emulator.to_string(),
            machine: "virt".to_string(),
            accel,
            cpu,
            properties: Vec::new(),
            vcpus: 1,
        }
    }
}

/// How a probe runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmProbeOptions {
    pub timeout: Duration,
    pub allowed_emulators: Vec<PathBuf>,
    pub work_dir: Option<PathBuf>,
}

impl Default for ArmProbeOptions {
    fn default() -> Self {
        ArmProbeOptions {
            timeout: Duration::from_secs(10),
            allowed_emulators: Vec::new(),
            work_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArmProbeError {
    #[error("aarch64 probe: {0}")]
    Emulator(#[from] EmulatorError),
    /// The shared runner's errors already read `probe: …`.
    #[error("aarch64 {0}")]
    Run(#[from] ProbeError),
    #[error("aarch64 probe: {what} {value:?} is not usable: {reason}")]
    BadConfig {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("aarch64 probe: output of emulator {emulator:?} is unusable: {source}")]
    Output {
        emulator: PathBuf,
        #[source]
        source: ArmOutputError,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArmOutputError {
    #[error("aarch64 probe output is empty (the firmware printed nothing)")]
    Empty,
    #[error("aarch64 probe output is not ASCII text at byte {offset}")]
    NotText { offset: usize },
    #[error("aarch64 probe output line 1: expected header {HEADER:?}, found {found:?}")]
    BadHeader { found: String },
    #[error("aarch64 probe output line {line}: {reason}: {text:?}")]
    BadLine {
        line: usize,
        reason: &'static str,
        text: String,
    },
    #[error("aarch64 probe ran at EL{found}, not EL1: the machine's virtualization/secure options enter the firmware above the guest kernel's level")]
    WrongLevel { found: u32 },
    #[error("aarch64 probe output line {line}: the guest hit an unexpected exception")]
    GuestFault { line: usize },
    #[error("aarch64 probe output is truncated: no END marker after {lines} lines")]
    Truncated { lines: usize },
    #[error("aarch64 probe output: register {name} missing")]
    Missing { name: &'static str },
}

/// One completed run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmProbeRun {
    pub table: ArmIdTable,
    pub emulator: PathBuf,
    pub argv: Vec<String>,
    pub wall_time: Duration,
}

/// The argv (without the program) booting `firmware` and writing the UART to `serial_out`.
pub fn probe_args(
    config: &ArmProbeConfig,
    firmware: &Path,
    serial_out: &Path,
) -> Result<Vec<String>, ArmProbeError> {
    let text = |what: &'static str, p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| ArmProbeError::BadConfig {
                what,
                value: p.display().to_string(),
                reason: "not UTF-8",
            })
    };
    let firmware = text("firmware path", firmware)?;
    let out = text("output path", serial_out)?;
    // Machine and model come from domain XML: refuse anything that could smuggle QEMU
    // sub-options (`,virtualization=on` would enter the probe at EL2).
    let plain = |what: &'static str, v: &str| {
        let ok = !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if ok {
            Ok(v.to_string())
        } else {
            Err(ArmProbeError::BadConfig {
                what,
                value: v.to_string(),
                reason: "only letters, digits, '-', '.', '_' are allowed",
            })
        }
    };
    let machine = plain("machine", &config.machine)?;
    if !machine.starts_with("virt") {
        return Err(ArmProbeError::BadConfig {
            what: "machine",
            value: machine,
            reason: "the aarch64 probe firmware runs on QEMU's virt machine only",
        });
    }
    let mut cpu = match &config.cpu {
        ArmCpu::Host => "host".to_string(),
        ArmCpu::Max => "max".to_string(),
        ArmCpu::Model(m) => plain("cpu model", m)?,
    };
    for property in &config.properties {
        let (name, state) = property
            .split_once('=')
            .filter(|(_, state)| matches!(*state, "on" | "off"))
            .ok_or_else(|| ArmProbeError::BadConfig {
                what: "cpu feature",
                value: property.clone(),
                reason: "expected NAME=on or NAME=off",
            })?;
        cpu.push_str(&format!(",{}={state}", plain("cpu feature", name)?));
    }
    if config.vcpus == 0 {
        return Err(ArmProbeError::BadConfig {
            what: "vcpus",
            value: "0".to_string(),
            reason: "a guest needs at least one vCPU",
        });
    }
    let accel = match config.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    Ok(vec![
        "-nodefaults".to_string(),
        "-no-user-config".to_string(),
        "-display".to_string(),
        "none".to_string(),
        "-no-reboot".to_string(),
        "-m".to_string(),
        "64".to_string(),
        "-machine".to_string(),
        format!("{machine},accel={accel}"),
        "-cpu".to_string(),
        cpu,
        "-smp".to_string(),
        config.vcpus.to_string(),
        "-bios".to_string(),
        firmware,
        "-chardev".to_string(),
        // QEMU option values escape a comma by doubling it.
        format!("file,id=cpuguard-probe,path={}", out.replace(',', ",,")),
        "-serial".to_string(),
        "chardev:cpuguard-probe".to_string(),
    ])
}

/// Measures the ID registers a guest with `config` sees.
pub fn probe(config: &ArmProbeConfig, opts: &ArmProbeOptions) -> Result<ArmIdTable, ArmProbeError> {
    probe_run(config, opts).map(|r| r.table)
}

/// Like [`probe`], with the emulator, argv and wall time.
pub fn probe_run(
    config: &ArmProbeConfig,
    opts: &ArmProbeOptions,
) -> Result<ArmProbeRun, ArmProbeError> {
    probe_run_with(config, opts, None)
}

/// Like [`probe_run`], executing `executable` (checked by the caller: a running domain's own
/// binary) in place of the checked `<emulator>`.
pub fn probe_run_with(
    config: &ArmProbeConfig,
    opts: &ArmProbeOptions,
    executable: Option<&Path>,
) -> Result<ArmProbeRun, ArmProbeError> {
    let emulator = check_emulator(&config.emulator, &opts.allowed_emulators)?;
    let emulator = executable.map(Path::to_path_buf).unwrap_or(emulator);
    let work = WorkDir::create(opts.work_dir.as_deref())?;
    // PSCI SYSTEM_OFF makes QEMU exit 0; anything else is QEMU refusing the configuration.
    let run = run_firmware(
        &emulator,
        &work,
        PROBE_AARCH64,
        "serial.out",
        opts.timeout,
        |firmware, serial| probe_args(config, firmware, serial),
        |status| status.success(),
    )?;
    let (argv, bytes, wall_time) = (run.argv, run.output, run.wall_time);
    let table = parse(&bytes).map_err(|source| ArmProbeError::Output {
        emulator: emulator.clone(),
        source,
    })?;
    Ok(ArmProbeRun {
        table,
        emulator,
        argv,
        wall_time,
    })
}

/// Writes `table` in the firmware's own output format, so that [`parse`] reads it back: the form
/// a stamp carries and `cpuguard diff` accepts. Registers the probe does not read are left out
/// (a table only ever comes from [`parse`], which refuses them).
pub fn write_transcript(table: &ArmIdTable) -> String {
    let mut out = format!("{HEADER}\nE 1\n");
    let mut count = 0;
    for reg in PROBED_REGISTERS {
        let Some(entry) = table.regs.iter().find(|r| r.name == reg.name) else {
            continue;
        };
        count += 1;
        match entry.value {
            Some(v) => out.push_str(&format!("R {} {v:016x}\n", reg.encoding())),
            None => out.push_str(&format!("X {}\n", reg.encoding())),
        }
    }
    out.push_str(&format!("END {count}\n"));
    out
}

/// True when `text` starts like the aarch64 probe's output (see [`parse`]).
pub fn is_transcript(text: &str) -> bool {
    text.trim_start().lines().next().map(str::trim_end) == Some(HEADER)
}

/// Parses the complete UART output; every probed register must be there exactly once.
pub fn parse(bytes: &[u8]) -> Result<ArmIdTable, ArmOutputError> {
    if bytes.is_empty() {
        return Err(ArmOutputError::Empty);
    }
    if let Some(offset) = bytes.iter().position(|b| !b.is_ascii()) {
        return Err(ArmOutputError::NotText { offset });
    }
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end()));
    match lines.next() {
        Some((_, HEADER)) => {}
        Some((_, other)) => {
            return Err(ArmOutputError::BadHeader {
                found: other.to_string(),
            })
        }
        None => return Err(ArmOutputError::Empty),
    }
    let bad = |line: usize, reason: &'static str, text: &str| ArmOutputError::BadLine {
        line,
        reason,
        text: text.to_string(),
    };
    let mut level = None;
    let mut regs: Vec<ArmIdReg> = Vec::new();
    let mut count = 1;
    for (n, line) in lines {
        count = n;
        let fields: Vec<&str> = line.split(' ').collect();
        match fields.as_slice() {
            ["E", el] => {
                let el = el
                    .parse::<u32>()
                    .map_err(|_| bad(n, "bad exception level", line))?;
                if el != 1 {
                    return Err(ArmOutputError::WrongLevel { found: el });
                }
                level = Some(el);
            }
            ["R", enc, _] | ["X", enc] => {
                let reg = PROBED_REGISTERS
                    .iter()
                    .find(|r| r.encoding() == *enc)
                    .ok_or_else(|| bad(n, "unknown register encoding", line))?;
                if regs.iter().any(|r| r.name == reg.name) {
                    return Err(bad(n, "register appears twice", line));
                }
                let value = match fields.as_slice() {
                    ["R", _, v] if v.len() == 16 => Some(
                        u64::from_str_radix(v, 16).map_err(|_| bad(n, "bad hex value", line))?,
                    ),
                    ["R", ..] => return Err(bad(n, "value is not 16 hex digits", line)),
                    _ => None,
                };
                regs.push(ArmIdReg {
                    name: reg.name.to_string(),
                    value,
                });
            }
            ["F"] => return Err(ArmOutputError::GuestFault { line: n }),
            ["END", c] => {
                let c = c
                    .parse::<usize>()
                    .map_err(|_| bad(n, "bad END count", line))?;
                if c != regs.len() {
                    return Err(bad(n, "END count differs from the registers read", line));
                }
                if level.is_none() {
                    return Err(bad(n, "no exception level line before END", line));
                }
                if let Some(missing) = PROBED_REGISTERS
                    .iter()
                    .find(|p| !regs.iter().any(|r| r.name == p.name))
                {
                    return Err(ArmOutputError::Missing { name: missing.name });
                }
                let mut table = ArmIdTable { regs };
                table.canonicalize();
                return Ok(table);
            }
            _ => return Err(bad(n, "unrecognized line", line)),
        }
    }
    Err(ArmOutputError::Truncated { lines: count })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        let mut s = format!("{HEADER}\nE 1\n");
        for (i, r) in PROBED_REGISTERS.iter().enumerate() {
            if r.name == "ID_AA64MMFR3_EL1" {
                s.push_str(&format!("X {}\n", r.encoding()));
            } else {
                s.push_str(&format!("R {} {:016x}\n", r.encoding(), i as u64 * 0x11));
            }
        }
        s.push_str(&format!("END {}\n", PROBED_REGISTERS.len()));
        s
    }

    #[test]
    fn parses_a_complete_output() {
        let t = parse(sample().as_bytes()).unwrap();
        assert_eq!(t.regs.len(), PROBED_REGISTERS.len());
        assert_eq!(t.get("MIDR_EL1"), Some(0));
        assert_eq!(t.get("REVIDR_EL1"), Some(0x11));
        let mmfr3 = t
            .regs
            .iter()
            .find(|r| r.name == "ID_AA64MMFR3_EL1")
            .unwrap();
        assert_eq!(mmfr3.value, None);
    }

    #[test]
    fn transcript_round_trips_including_absent_registers() {
        let t = parse(sample().as_bytes()).unwrap();
        let text = write_transcript(&t);
        assert!(is_transcript(&text) && !is_transcript("00000000 00000000: 0 0 0 0"));
        assert_eq!(parse(text.as_bytes()).unwrap(), t);
        assert_eq!(text, sample(), "the firmware's own format, byte for byte");
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let full = sample();
        for cut in 0..full.len() - 1 {
            assert!(
                parse(&full.as_bytes()[..cut]).is_err(),
                "accepted a cut at {cut}"
            );
        }
        let mut garbled = full.clone().into_bytes();
        garbled[40] = 0xFF;
        assert!(matches!(
            parse(&garbled),
            Err(ArmOutputError::NotText { offset: 40 })
        ));
    }

    #[test]
    fn wrong_level_fault_and_duplicates_are_named() {
        let el2 = sample().replace("\nE 1\n", "\nE 2\n");
        assert_eq!(
            parse(el2.as_bytes()),
            Err(ArmOutputError::WrongLevel { found: 2 })
        );
        let fault = sample().replace("END", "F\nEND");
        assert!(matches!(
            parse(fault.as_bytes()),
            Err(ArmOutputError::GuestFault { .. })
        ));
        let first = PROBED_REGISTERS[0].encoding();
        let dup = sample().replacen(
            &format!("R {first}"),
            &format!("R {first} 0000000000000000\nR {first}"),
            1,
        );
        let err = parse(dup.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let missing = sample().replace(&format!("R {first} 0000000000000000\n"), "");
        assert!(parse(missing.as_bytes()).is_err());
    }

    fn guest(arch: &str, cpu: &str) -> GuestCpuConfig {
        let xml = format!(
            "<domain type='kvm'><name>a</name><vcpu>4</vcpu>\
             <os><type arch='{arch}' machine='virt-7.2'>hvm</type></os>{cpu}\
             <devices><emulator>/usr/bin/qemu-system-aarch64</emulator></devices></domain>"
        );
        GuestCpuConfig::from_domain_xml(&xml).unwrap()
    }

    #[test]
    fn from_domain_xml_modes() {
        let c = ArmProbeConfig::from_guest(&guest("aarch64", "<cpu mode='host-passthrough'/>"))
            .unwrap();
        assert_eq!(c.cpu, ArmCpu::Host);
        assert_eq!(
            (c.machine.as_str(), c.vcpus, c.accel),
            ("virt-7.2", 4, Accel::Kvm)
        );
        assert_eq!(c.emulator, "/usr/bin/qemu-system-aarch64");
        let c = ArmProbeConfig::from_guest(&guest(
            "aarch64",
            "<cpu mode='custom'><model>cortex-a57</model></cpu>",
        ))
        .unwrap();
        assert_eq!(c.cpu, ArmCpu::Model("cortex-a57".into()));
        let c = ArmProbeConfig::from_guest(&guest("aarch64", "<cpu mode='maximum'/>")).unwrap();
        assert_eq!(c.cpu, ArmCpu::Max);
        for (arch, cpu, needle) in [
            ("x86_64", "<cpu mode='maximum'/>", "aarch64"),
            ("aarch64", "<cpu mode='host-model'/>", "host-model"),
            ("aarch64", "", "without <cpu>"),
        ] {
            let err = ArmProbeConfig::from_guest(&guest(arch, cpu)).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn features_and_pmu_become_cpu_properties_in_libvirts_order() {
        let xml = "<domain type='qemu'><name>a</name><vcpu>1</vcpu>\
             <os><type arch='aarch64' machine='virt'>hvm</type></os>\
             <features><pmu state='off'/></features>\
             <cpu mode='custom'><model>max</model><feature policy='disable' name='sve'/>\
             <feature policy='require' name='sve256'/><feature policy='optional' name='x'/></cpu>\
             <devices><emulator>/usr/bin/qemu-system-aarch64</emulator></devices></domain>";
        let c = ArmProbeConfig::from_guest(&GuestCpuConfig::from_domain_xml(xml).unwrap()).unwrap();
        assert_eq!(c.properties, vec!["sve=off", "sve256=on", "pmu=off"]);
        let argv = probe_args(&c, Path::new("/f"), Path::new("/o")).unwrap();
        assert!(
            argv.join(" ")
                .contains("-cpu max,sve=off,sve256=on,pmu=off -smp 1"),
            "{argv:?}"
        );
        // A feature name from untrusted XML cannot smuggle another property or option.
        for bad in ["sve,pmu=on=on", "sve=maybe", "sve"] {
            let mut c = c.clone();
            c.properties = vec![bad.to_string()];
            let err = probe_args(&c, Path::new("/f"), Path::new("/o")).unwrap_err();
            assert!(err.to_string().contains("cpu feature"), "{err}");
        }
    }

    #[test]
    fn argv_for_a_model() {
        let config = ArmProbeConfig::new(
            "/usr/bin/qemu-system-aarch64",
            Accel::Tcg,
            ArmCpu::Model("cortex-a57".into()),
        );
        let argv = probe_args(&config, Path::new("/w/fw.bin"), Path::new("/w/a,b.out")).unwrap();
        let joined = argv.join(" ");
        assert!(
            joined.contains("-machine virt,accel=tcg -cpu cortex-a57 -smp 1"),
            "{joined}"
        );
        assert!(joined.contains("-bios /w/fw.bin"), "{joined}");
        assert!(joined.contains("path=/w/a,,b.out"), "{joined}");
        assert!(
            joined.contains("-serial chardev:cpuguard-probe"),
            "{joined}"
        );
    }

    #[test]
    fn argv_refuses_smuggled_options() {
        let mut config =
            ArmProbeConfig::new("/usr/bin/qemu-system-aarch64", Accel::Kvm, ArmCpu::Host);
        config.machine = "virt,virtualization=on".into();
        let err = probe_args(&config, Path::new("/f"), Path::new("/o")).unwrap_err();
        assert!(err.to_string().contains("virtualization=on"), "{err}");
        config.machine = "pc".into();
        assert!(probe_args(&config, Path::new("/f"), Path::new("/o")).is_err());
        config.machine = "virt-7.2".into();
        config.cpu = ArmCpu::Model("max,sve=off".into());
        assert!(probe_args(&config, Path::new("/f"), Path::new("/o")).is_err());
        config.cpu = ArmCpu::Host;
        let argv = probe_args(&config, Path::new("/f"), Path::new("/o")).unwrap();
        assert!(argv.join(" ").contains("virt-7.2,accel=kvm -cpu host"));
    }
}
