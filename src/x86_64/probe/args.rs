//! The QEMU command line that boots the probe with the guest's own CPU configuration.
//!
//! The `-machine` type, `-accel`, `-cpu` and `-smp` follow what libvirt 9.0 puts on the command
//! line for the same domain XML (`qemuBuildCpuCommandLine`, `qemuBuildCpuModelArgStr`, and the CPU
//! update `qemuProcessUpdateGuestCPU` runs before them), so the probe's guest sees the CPU the real
//! guest sees. tests/probe_qemu_args.rs checks this against libvirt's own answers
//! (`virsh domxml-to-native`) for a generated corpus of definitions. Everything else (devices,
//! memory, firmware) is the probe's own and does not change CPUID.
//!
//! libvirt 9.0's rules reproduced here:
//! - no `<cpu>`, or a custom `<cpu>` without `<model>`: the emulator's default CPU type for the
//!   machine (`qemu64` for qemu-system-x86_64, also for an i686 guest; `qemu32` for
//!   qemu-system-i386), which libvirt writes into the definition;
//! - `<feature>` policies `force`/`require` → `name=on`, `disable`/`forbid` → `name=off`; features
//!   QEMU has no property for (`cmt`, `mbm_total`, `mbm_local`, `osxsave`, `ospke`) are dropped, as
//!   libvirt's `virQEMUCapsCPUFilterFeatures` drops them;
//! - features a cpu_map model marks `removed='yes'` (e.g. `monitor` in EPYC) are turned off unless
//!   the XML names them: QEMU's model still has them;
//! - `<model vendor_id>` only for custom CPUs (libvirt ignores it for host-passthrough);
//! - `<panic model='hyperv'/>` → `hv-crash`; Hyper-V enlightenments as libvirt 9.0 knows them
//!   (only `stimer`'s `<direct/>` among the sub-elements; `tlbflush`'s `<direct/>`/`<extended/>`
//!   came with later libvirt and 9.0 leaves them off the command line).
//!
//! What libvirt 9.0 decides from the host at start, and cpuguard therefore refuses to probe (the
//! error names the construct; the live XML of a running domain has it resolved, and is probed):
//! `host-model` (with or without `<model>`: a new start gets this host's CPU model), `match='minimum'`
//! (the same), `policy='optional'` features of a custom CPU (on where the host has them), and a
//! `fallback='allow'` model this QEMU does not have (libvirt substitutes the closest model;
//! checked by [`check_model_available`] against the emulator's model list).

use crate::x86_64::features::libvirt_to_qemu;
use std::path::Path;

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::arch::Arch;
use crate::domain::guest::{Accel, CpuMode, FeaturePolicy, GuestCpuConfig};

/// Why no QEMU command line can be built for the domain: mostly a CPU configuration libvirt 9
/// resolves from the host at start, which the probe does not guess.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// The domain's architecture is not one the x86 probe runs.
    #[error("domain architecture {arch:?} is not supported by the probe (x86_64 and i686 only)")]
    UnsupportedArch {
        /// The domain's architecture, as libvirt names it.
        arch: String,
    },
    /// `<cpu mode='host-model'>` without `<model>`, which libvirt 9 expands at start.
    #[error("domain CPU <cpu mode='host-model'> is not expanded: libvirt 9 starts this host's own CPU model for it; probe the domain's live or prepare-phase XML, where libvirt has expanded it")]
    HostModelNotExpanded,
    /// `<cpu mode='host-model'>` with a `<model>`, which libvirt 9 replaces at start.
    #[error("domain CPU <cpu mode='host-model'> names <model>{model}</model>: libvirt 9 starts this host's own CPU model for it (from its domain capabilities), not {model}; probe the domain's live or prepare-phase XML, where libvirt has resolved it")]
    HostModelWithModel {
        /// The model the definition names.
        model: String,
    },
    /// `<cpu match='minimum'>`, which libvirt 9 resolves from the host at start.
    #[error("domain CPU <cpu match='minimum'>: libvirt 9 starts this host's CPU model with the guest's features for it, not the named model; probe the domain's live XML, where libvirt has resolved it")]
    MatchMinimum,
    /// A custom CPU's feature with `policy='optional'`.
    #[error("domain CPU <feature policy='optional' name='{name}'>: libvirt 9 turns it on or off at start from this host's CPU, which cpuguard does not guess; probe the domain's live XML, where libvirt has resolved it")]
    OptionalFeature {
        /// The feature's libvirt name.
        name: String,
    },
    /// A `fallback='allow'` model the emulator does not have (see [`check_model_available`]).
    #[error("domain CPU <model>{model}</model> with fallback='allow' (libvirt's default): {emulator} has no CPU model {model}, and libvirt would start a substitute; probe the domain's live XML, where libvirt has resolved it")]
    FallbackModelMissing {
        /// The model the definition names.
        model: String,
        /// The emulator asked for its model list.
        emulator: String,
    },
    /// A Hyper-V enlightenment libvirt 9.0 does not parse.
    #[error("domain Hyper-V enlightenment <{name}> is not one libvirt 9.0 knows (libvirt refuses such a domain)")]
    UnknownEnlightenment {
        /// The element's name under `<hyperv>`.
        name: String,
    },
    /// `<spinlocks retries=…>` that is not a decimal number fitting 32 bits.
    #[error("domain Hyper-V spinlocks retries {value:?} is not a number")]
    BadSpinlocks {
        /// The `retries` attribute as written.
        value: String,
    },
    /// A file of libvirt's CPU map (a model definition or `x86_features.xml`) cannot be read or
    /// parsed.
    #[error("libvirt CPU map {path:?} is unreadable: {reason}")]
    CpuMap {
        /// The map file.
        path: String,
        /// Why it is unusable.
        reason: String,
    },
    /// A path the command line names (the probe firmware or its output file) is not UTF-8.
    #[error("probe path {path:?} is not valid UTF-8 text for the QEMU command line")]
    BadPath {
        /// The path, lossily displayed.
        path: String,
    },
    /// A `<feature name=…>` that is not in libvirt's CPU feature map.
    #[error("domain CPU <feature name={name:?}> is not one of libvirt's CPU feature names ({map}); refused, as it would reach QEMU as a -cpu property")]
    UnknownFeature {
        /// The name as written in the domain XML.
        name: String,
        /// The feature map file consulted.
        map: String,
    },
}

/// The CPU model libvirt 9 writes for a domain without one: QEMU's default CPU type for the
/// machine, which belongs to the emulator binary, not to the guest architecture (an i686 guest on
/// qemu-system-x86_64 gets `qemu64`).
fn default_model(config: &GuestCpuConfig) -> &'static str {
    if emulator_is_i386(config) {
        "qemu32"
    } else {
        "qemu64"
    }
}

/// Whether the probe (and libvirt) runs qemu-system-i386 for this domain. Two libvirt 9 rules
/// depend on it: the default CPU model, and `migratable=`, which libvirt writes only when the
/// emulator has the `max-x86_64-cpu` type (its QEMU_CAPS_CPU_MIGRATABLE probe).
fn emulator_is_i386(config: &GuestCpuConfig) -> bool {
    let emulator = match &config.emulator {
        Some(path) => Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default(),
        None => config.arch.qemu_system(),
    };
    emulator == "qemu-system-i386"
}

/// libvirt CPU features QEMU has no property for: libvirt 9's `virQEMUCapsCPUFilterFeatures` drops
/// them from the definition before the command line is built, whatever their policy.
const FILTERED_FEATURES: &[&str] = &["cmt", "mbm_total", "mbm_local", "osxsave", "ospke"];

/// The Hyper-V enlightenments libvirt 9.0 parses (`virDomainHyperv`); it refuses a domain with any
/// other.
const LIBVIRT9_ENLIGHTENMENTS: &[&str] = &[
    "relaxed",
    "vapic",
    "spinlocks",
    "vpindex",
    "runtime",
    "synic",
    "stimer",
    "reset",
    "vendor_id",
    "frequencies",
    "reenlightenment",
    "tlbflush",
    "ipi",
    "evmcs",
    "avic",
];

/// Refuses a custom CPU whose `<model fallback='allow'>` names a model missing from `qemu_models`
/// (the emulator's `-cpu help` list): libvirt 9 would start a substitute it picks from the host's
/// and QEMU's models (`virCPUTranslate`), which cpuguard does not reproduce. With
/// `fallback='forbid'` libvirt refuses such a domain itself, and so does QEMU in the probe.
pub fn check_model_available(
    config: &GuestCpuConfig,
    emulator: &str,
    qemu_models: &[String],
) -> Result<(), ArgsError> {
    let Some(cpu) = &config.cpu else {
        return Ok(());
    };
    match (&cpu.model, cpu.mode, cpu.fallback.as_deref()) {
        (Some(model), CpuMode::Custom, Some("allow")) if !qemu_models.contains(model) => {
            Err(ArgsError::FallbackModelMissing {
                model: model.clone(),
                emulator: emulator.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// The `-accel` value for `accel` (`kvm`, `tcg`).
pub fn accel_name(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    }
}

/// libvirt's installed CPU map (model definitions and feature names).
pub const LIBVIRT_CPU_MAP: &str = "/usr/share/libvirt/cpu_map";

/// Features the cpu_map definition of `model` marks `removed='yes'` (libvirt disables them
/// explicitly because QEMU's model still enables them). No file for the model: none.
pub fn removed_features(cpu_map: &Path, model: &str) -> Result<Vec<String>, ArgsError> {
    let path = cpu_map.join(format!("x86_{model}.xml"));
    let map_error = |reason: String| ArgsError::CpuMap {
        path: path.display().to_string(),
        reason,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(map_error(e.to_string())),
    };
    let mut reader = Reader::from_str(&text);
    let mut removed = Vec::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) if e.name().as_ref() == b"feature" => {
                let mut name = None;
                let mut is_removed = false;
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| map_error(e.to_string()))?;
                    let value = attr
                        .unescape_value()
                        .map_err(|e| map_error(e.to_string()))?;
                    match attr.key.as_ref() {
                        b"name" => name = Some(value.into_owned()),
                        b"removed" => is_removed = value == "yes",
                        _ => {}
                    }
                }
                if let (Some(name), true) = (name, is_removed) {
                    removed.push(name);
                }
            }
            Ok(Event::Eof) => return Ok(removed),
            Ok(_) => {}
            Err(e) => return Err(map_error(e.to_string())),
        }
    }
}

/// The `-cpu` value: model (or host/max), features, then the settings libvirt also puts there.
/// Uses libvirt's installed cpu_map for removed model features.
pub fn cpu_arg(config: &GuestCpuConfig) -> Result<String, ArgsError> {
    cpu_arg_with_map(config, Path::new(LIBVIRT_CPU_MAP))
}

/// [`cpu_arg`] with the cpu_map directory given.
pub fn cpu_arg_with_map(config: &GuestCpuConfig, cpu_map: &Path) -> Result<String, ArgsError> {
    // This command line is the x86 one; aarch64 has its own (crate::aarch64::probe).
    match config.arch {
        Arch::X86_64 | Arch::I686 => {}
        Arch::Aarch64 => {
            return Err(ArgsError::UnsupportedArch {
                arch: config.arch.to_string(),
            })
        }
    }
    let mut parts: Vec<String> = Vec::new();
    match &config.cpu {
        None => parts.push(default_model(config).to_string()),
        Some(cpu) => {
            let custom = cpu.mode == CpuMode::Custom;
            match cpu.mode {
                CpuMode::HostPassthrough | CpuMode::Maximum => {
                    parts.push(
                        if cpu.mode == CpuMode::HostPassthrough {
                            "host"
                        } else {
                            "max"
                        }
                        .to_string(),
                    );
                    if let Some(m) = cpu.migratable.filter(|_| !emulator_is_i386(config)) {
                        parts.push(format!("migratable={}", on_off(m)));
                    }
                }
                // libvirt 9 resolves both from this host's CPU at start (x86UpdateHostModel); the
                // live XML carries the result as a custom CPU.
                CpuMode::HostModel => {
                    return Err(match &cpu.model {
                        None => ArgsError::HostModelNotExpanded,
                        Some(model) => ArgsError::HostModelWithModel {
                            model: model.clone(),
                        },
                    })
                }
                CpuMode::Custom if cpu.match_minimum => return Err(ArgsError::MatchMinimum),
                CpuMode::Custom => {
                    parts.push(
                        cpu.model
                            .clone()
                            .unwrap_or_else(|| default_model(config).to_string()),
                    );
                    if let Some(v) = &cpu.vendor_id {
                        parts.push(format!("vendor={v}"));
                    }
                }
            }
            // Only libvirt's CPU feature names: anything else (`start-powered-off`, any QEMU CPU
            // property) is not a CPU feature libvirt would accept, and must not become a `-cpu`
            // property of a QEMU started by root.
            if !cpu.features.is_empty() {
                let path = cpu_map.join("x86_features.xml");
                let map =
                    crate::x86_64::FeatureMap::load(&path).map_err(|e| ArgsError::CpuMap {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                if let Some(f) = cpu.features.iter().find(|f| map.by_name(&f.name).is_none()) {
                    return Err(ArgsError::UnknownFeature {
                        name: f.name.clone(),
                        map: path.display().to_string(),
                    });
                }
            }
            let features = cpu
                .features
                .iter()
                .filter(|f| !FILTERED_FEATURES.contains(&f.name.as_str()));
            for f in features {
                let state = match f.policy {
                    FeaturePolicy::Force | FeaturePolicy::Require => "on",
                    FeaturePolicy::Disable | FeaturePolicy::Forbid => "off",
                    // A custom CPU's optional feature is decided against the host
                    // (virCPUx86Update); host-passthrough and maximum leave it to QEMU.
                    FeaturePolicy::Optional if custom => {
                        return Err(ArgsError::OptionalFeature {
                            name: f.name.clone(),
                        })
                    }
                    FeaturePolicy::Optional => continue,
                };
                parts.push(format!("{}={state}", libvirt_to_qemu(&f.name)));
            }
            if let Some(model) = cpu.model.as_deref().filter(|_| custom) {
                for name in removed_features(cpu_map, model)? {
                    if !cpu.features.iter().any(|f| f.name == name) {
                        parts.push(format!("{}=off", libvirt_to_qemu(&name)));
                    }
                }
            }
        }
    }

    let features = &config.features;
    for (timer, present) in &features.timers {
        match (timer.as_str(), present) {
            ("hypervclock", true) => parts.push("hv-time=on".to_string()),
            ("kvmclock", present) => parts.push(format!("kvmclock={}", on_off(*present))),
            _ => {}
        }
    }
    if let Some(eoi) = features.apic_eoi {
        parts.push(format!("kvm-pv-eoi={}", on_off(eoi)));
    }
    if let Some(unhalt) = features.pvspinlock {
        parts.push(format!("kvm-pv-unhalt={}", on_off(unhalt)));
    }
    if let Some(hv) = &features.hyperv {
        if hv.mode == "passthrough" {
            parts.push("hv-passthrough=on".to_string());
        }
        for f in &hv.features {
            if !LIBVIRT9_ENLIGHTENMENTS.contains(&f.name.as_str()) {
                return Err(ArgsError::UnknownEnlightenment {
                    name: f.name.clone(),
                });
            }
            if f.state.as_deref() != Some("on") {
                continue;
            }
            let qemu = format!("hv-{}", f.name.replace('_', "-"));
            match (f.name.as_str(), &f.value) {
                ("spinlocks", Some(retries)) => {
                    let n: u32 = retries.parse().map_err(|_| ArgsError::BadSpinlocks {
                        value: retries.clone(),
                    })?;
                    parts.push(format!("{qemu}={n:#x}"));
                }
                ("vendor_id", Some(value)) => parts.push(format!("{qemu}={value}")),
                _ => parts.push(format!("{qemu}=on")),
            }
            // libvirt 9.0 emits stimer's <direct/> only; tlbflush's <direct/> and <extended/>
            // are parsed by later versions, and 9.0 leaves them off the command line.
            for (sub, state) in &f.sub {
                if f.name == "stimer" && sub == "direct" && state == "on" {
                    parts.push("hv-stimer-direct=on".to_string());
                }
            }
        }
    }
    for (name, state) in &features.kvm {
        let on = state == "on";
        match name.as_str() {
            "hidden" if on => parts.push("kvm=off".to_string()),
            "hint-dedicated" | "poll-control" if on => parts.push(format!("kvm-{name}=on")),
            "pv-ipi" if !on => parts.push("kvm-pv-ipi=off".to_string()),
            _ => {}
        }
    }
    if features.hyperv_crash {
        // libvirt writes it without a value.
        parts.push("hv-crash".to_string());
    }
    if let Some(pmu) = features.pmu {
        parts.push(format!("pmu={}", on_off(pmu)));
    }
    if let Some(cpu) = &config.cpu {
        if let Some(cache) = &cpu.cache {
            // libvirt 9: emulate turns the host's cache info off (only meaningful for host and
            // max), passthrough turns the emulated L3 off, disable turns both off.
            let (host_off, l3_off) = match cache.mode.as_str() {
                "emulate" => {
                    parts.push("l3-cache=on".to_string());
                    (true, false)
                }
                "passthrough" => {
                    parts.push("host-cache-info=on".to_string());
                    (false, true)
                }
                "disable" => (true, true),
                _ => (false, false),
            };
            if host_off && matches!(cpu.mode, CpuMode::HostPassthrough | CpuMode::Maximum) {
                parts.push("host-cache-info=off".to_string());
            }
            if l3_off {
                parts.push("l3-cache=off".to_string());
            }
        }
        if let Some(phys) = &cpu.maxphysaddr {
            match (phys.mode.as_str(), phys.bits) {
                ("passthrough", bits) => {
                    parts.push("host-phys-bits=on".to_string());
                    if let Some(bits) = bits {
                        parts.push(format!("host-phys-bits-limit={bits}"));
                    }
                }
                ("emulate", Some(bits)) => parts.push(format!("phys-bits={bits}")),
                _ => {}
            }
        }
    }
    if let Some(hz) = features.tsc_frequency {
        parts.push(format!("tsc-frequency={hz}"));
    }
    Ok(parts.join(","))
}

/// The `-smp` value, as libvirt 9 writes it.
pub fn smp_arg(config: &GuestCpuConfig) -> String {
    let max = config.vcpus;
    let mut smp = match config.current_vcpus {
        Some(current) => format!("{current},maxcpus={max}"),
        None => max.to_string(),
    };
    let topology = config
        .cpu
        .as_ref()
        .and_then(|c| c.topology.as_ref())
        .filter(|t| t.sockets.is_some());
    match topology {
        Some(t) => {
            smp.push_str(&format!(
                ",sockets={},dies={}",
                t.sockets.unwrap_or(1),
                t.dies.unwrap_or(1)
            ));
            if let Some(clusters) = t.clusters {
                smp.push_str(&format!(",clusters={clusters}"));
            }
            smp.push_str(&format!(
                ",cores={},threads={}",
                t.cores.unwrap_or(1),
                t.threads.unwrap_or(1)
            ));
        }
        None => smp.push_str(&format!(",sockets={max},cores=1,threads=1")),
    }
    smp
}

/// The complete argv (without the program) that boots `firmware` and writes its port 0xe9 output
/// to `debugcon_out`.
pub fn probe_args(
    config: &GuestCpuConfig,
    accel: Accel,
    firmware: &Path,
    debugcon_out: &Path,
) -> Result<Vec<String>, ArgsError> {
    let firmware = path_text(firmware)?;
    let out = path_text(debugcon_out)?;
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        // A triple fault must end the probe, not reboot it into a loop until the wall-time bound.
        "-no-reboot",
        "-m",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(machine) = &config.machine {
        args.extend(["-machine".to_string(), machine.clone()]);
    }
    args.extend([
        "-accel".to_string(),
        accel_name(accel).to_string(),
        "-cpu".to_string(),
        cpu_arg(config)?,
        "-smp".to_string(),
        smp_arg(config),
        "-bios".to_string(),
        firmware.to_string(),
        "-chardev".to_string(),
        // QEMU option values escape a comma by doubling it.
        format!("file,id=cpuguard-probe,path={}", out.replace(',', ",,")),
        "-device".to_string(),
        "isa-debugcon,iobase=0xe9,chardev=cpuguard-probe".to_string(),
        "-device".to_string(),
        "isa-debug-exit,iobase=0xf4,iosize=0x04".to_string(),
    ]);
    Ok(args)
}

fn path_text(path: &Path) -> Result<&str, ArgsError> {
    path.to_str().ok_or_else(|| ArgsError::BadPath {
        path: path.display().to_string(),
    })
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(xml_body: &str, domain_type: &str) -> GuestCpuConfig {
        let xml = format!(
            "<domain type='{domain_type}'><os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>{xml_body}</domain>"
        );
        GuestCpuConfig::from_domain_xml(&xml).unwrap()
    }

    #[test]
    fn custom_model_features_are_translated() {
        let c = config(
            "<cpu><model>Haswell-noTSX</model><feature name='tsc_adjust'/>\
             <feature policy='disable' name='vmx'/><feature policy='forbid' name='pclmuldq'/>\
             <feature policy='force' name='sse4.1'/><feature name='osxsave'/>\
             <feature policy='disable' name='cmt'/></cpu>",
            "qemu",
        );
        let cpu = cpu_arg(&c).unwrap();
        let mut parts: Vec<&str> = cpu.split(',').collect();
        assert_eq!(parts.remove(0), "Haswell-noTSX");
        parts.sort();
        assert_eq!(
            parts,
            vec!["pclmulqdq=off", "sse4.1=on", "tsc-adjust=on", "vmx=off"]
        );
    }

    #[test]
    fn removed_model_features_are_disabled_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        // Feature names are checked against libvirt's installed list.
        std::fs::copy(
            Path::new(LIBVIRT_CPU_MAP).join("x86_features.xml"),
            dir.path().join("x86_features.xml"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("x86_Old.xml"),
            "<cpus><model name='Old'><vendor name='AMD'/><feature name='sse2'/>\
             <feature name='monitor' removed='yes'/><feature name='tsc_adjust' removed='yes'/>\
             </model></cpus>",
        )
        .unwrap();
        let c = config("<cpu><model>Old</model></cpu>", "qemu");
        assert_eq!(
            cpu_arg_with_map(&c, dir.path()).unwrap(),
            "Old,monitor=off,tsc-adjust=off"
        );
        let c = config(
            "<cpu><model>Old</model><feature name='monitor'/></cpu>",
            "qemu",
        );
        assert_eq!(
            cpu_arg_with_map(&c, dir.path()).unwrap(),
            "Old,monitor=on,tsc-adjust=off"
        );
        let c = config("<cpu><model>Unknown</model></cpu>", "qemu");
        assert_eq!(cpu_arg_with_map(&c, dir.path()).unwrap(), "Unknown");
        std::fs::write(dir.path().join("x86_Bad.xml"), "<cpus><model").unwrap();
        let c = config("<cpu><model>Bad</model></cpu>", "qemu");
        assert!(matches!(
            cpu_arg_with_map(&c, dir.path()),
            Err(ArgsError::CpuMap { .. })
        ));
    }

    #[test]
    fn no_cpu_element_means_the_architecture_default() {
        let c = config("", "qemu");
        assert_eq!(cpu_arg(&c).unwrap(), "qemu64");
        assert_eq!(smp_arg(&c), "1,sockets=1,cores=1,threads=1");
    }

    #[test]
    fn what_libvirt_resolves_from_the_host_is_refused_naming_the_construct() {
        let c = config("<cpu mode='host-model'/>", "kvm");
        assert_eq!(cpu_arg(&c), Err(ArgsError::HostModelNotExpanded));
        let c = config(
            "<cpu mode='host-model'><model>EPYC-Milan</model></cpu>",
            "kvm",
        );
        let err = cpu_arg(&c).unwrap_err().to_string();
        assert!(
            err.contains("<cpu mode='host-model'> names <model>EPYC-Milan</model>"),
            "{err}"
        );
        let c = config("<cpu match='minimum'><model>Nehalem</model></cpu>", "kvm");
        let err = cpu_arg(&c).unwrap_err().to_string();
        assert!(err.contains("<cpu match='minimum'>"), "{err}");
        let c = config(
            "<cpu><model>Nehalem</model><feature policy='optional' name='vmx'/></cpu>",
            "qemu",
        );
        let err = cpu_arg(&c).unwrap_err().to_string();
        assert!(
            err.contains("<feature policy='optional' name='vmx'>"),
            "{err}"
        );
        // host-passthrough and maximum leave an optional feature to QEMU, as libvirt does.
        let c = config(
            "<cpu mode='maximum'><feature policy='optional' name='vmx'/></cpu>",
            "qemu",
        );
        assert_eq!(cpu_arg(&c).unwrap(), "max");
    }

    #[test]
    fn a_fallback_model_qemu_lacks_is_refused() {
        let models = vec!["qemu64".to_string(), "Nehalem".to_string()];
        let c = config("<cpu><model>Icelake-Client</model></cpu>", "qemu");
        let err = check_model_available(&c, "/usr/bin/qemu-system-x86_64", &models)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("<model>Icelake-Client</model> with fallback='allow'"),
            "{err}"
        );
        let c = config("<cpu><model>Nehalem</model></cpu>", "qemu");
        assert_eq!(check_model_available(&c, "q", &models), Ok(()));
        // forbid: libvirt refuses the domain itself, and QEMU refuses the probe.
        let c = config(
            "<cpu><model fallback='forbid'>Icelake-Client</model></cpu>",
            "qemu",
        );
        assert_eq!(check_model_available(&c, "q", &models), Ok(()));
    }

    #[test]
    fn the_default_model_is_the_emulators() {
        let xml = |arch: &str, emulator: &str| {
            format!(
                "<domain type='qemu'><os><type arch='{arch}'>hvm</type></os>\
                 <devices><emulator>{emulator}</emulator></devices></domain>"
            )
        };
        for (arch, emulator, model) in [
            ("i686", "/usr/bin/qemu-system-x86_64", "qemu64"),
            ("i686", "/usr/bin/qemu-system-i386", "qemu32"),
            ("x86_64", "/usr/bin/qemu-system-x86_64", "qemu64"),
        ] {
            let c = GuestCpuConfig::from_domain_xml(&xml(arch, emulator)).unwrap();
            assert_eq!(cpu_arg(&c).unwrap(), model, "{arch} on {emulator}");
        }
        let xml = "<domain type='qemu'><os><type arch='i686'>hvm</type></os></domain>";
        let c = GuestCpuConfig::from_domain_xml(xml).unwrap();
        assert_eq!(cpu_arg(&c).unwrap(), "qemu32");
    }

    #[test]
    fn panic_device_vendor_ids_and_unknown_enlightenments() {
        let c = config(
            "<features><hyperv><vendor_id state='on' value='KVM Hv'/></hyperv></features>\
             <cpu><model vendor_id='Libvirt QEMU'>qemu64</model></cpu>\
             <devices><panic model='hyperv'/></devices>",
            "kvm",
        );
        assert_eq!(
            cpu_arg(&c).unwrap(),
            "qemu64,vendor=Libvirt QEMU,hv-vendor-id=KVM Hv,hv-crash"
        );
        let c = config(
            "<features><hyperv><emsr_bitmap state='on'/></hyperv></features>",
            "kvm",
        );
        let err = cpu_arg(&c).unwrap_err().to_string();
        assert!(err.contains("<emsr_bitmap>"), "{err}");
    }

    #[test]
    fn smp_with_topology_and_offline_vcpus() {
        let c = config(
            "<vcpu current='3'>8</vcpu><cpu><topology sockets='2' cores='2' threads='2'/></cpu>",
            "qemu",
        );
        assert_eq!(
            smp_arg(&c),
            "3,maxcpus=8,sockets=2,dies=1,cores=2,threads=2"
        );
    }

    #[test]
    fn enlightenments_and_pmu_become_cpu_properties() {
        let c = config(
            "<features><hyperv><relaxed state='on'/><reset state='off'/>\
             <spinlocks state='on' retries='4095'/><tlbflush state='on'><extended state='on'/></tlbflush>\
             <stimer state='on'><direct state='on'/></stimer></hyperv><kvm><hidden state='on'/></kvm><pmu state='off'/></features>\
             <cpu mode='host-passthrough'/>",
            "kvm",
        );
        let cpu = cpu_arg(&c).unwrap();
        assert_eq!(
            cpu,
            "host,migratable=on,hv-relaxed=on,hv-spinlocks=0xfff,hv-stimer=on,hv-stimer-direct=on,hv-tlbflush=on,kvm=off,pmu=off"
        );
    }

    #[test]
    fn argv_has_the_probe_devices_and_escapes_commas() {
        let c = config("", "kvm");
        let args = probe_args(
            &c,
            Accel::Tcg,
            Path::new("/tmp/fw.bin"),
            Path::new("/tmp/a,b/out"),
        )
        .unwrap();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(joined.contains("-machine pc-q35-7.2"), "{joined}");
        assert!(joined.contains("path=/tmp/a,,b/out"), "{joined}");
        assert!(joined.contains("isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(joined.contains("-bios /tmp/fw.bin"));
    }

    #[test]
    fn unsupported_arch_is_an_error() {
        let xml = "<domain type='qemu'><os><type arch='aarch64'>hvm</type></os></domain>";
        let c = GuestCpuConfig::from_domain_xml(xml).unwrap();
        assert!(matches!(
            cpu_arg(&c),
            Err(ArgsError::UnsupportedArch { .. })
        ));
    }
}
