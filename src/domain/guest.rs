//! What in a libvirt domain XML decides the CPU a guest sees, and nothing else.
//!
//! [`GuestCpuConfig`] is the probe's input (src/x86_64/probe/args.rs turns it into a QEMU command
//! line), the cache key, and the "measured for" record in a fingerprint. It is canonical: lists are
//! sorted and defaults are spelled out the way libvirt applies them, so two XML documents that give
//! the guest the same CPU produce equal values whatever their element order.
//!
//! The XML comes from another host (the migration source), so it is parsed strictly: DOCTYPE
//! (and with it any entity declaration) is refused, unknown entity references are errors, and
//! values are validated before they reach a command line.

use crate::arch::Arch;
use crate::domain::tree::{parse_tree, Element, TreeError, MAX_DEPTH};
use serde::{Deserialize, Serialize};

/// Why a domain XML was refused; names the element or attribute concerned where there is one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    /// The document is not well-formed XML (or an entity reference is unknown).
    #[error("domain XML is not well-formed at byte {position}: {reason}")]
    Malformed {
        /// Byte offset of the construct where the problem was found.
        position: u64,
        /// The parser's message.
        reason: String,
    },
    /// The document declares a DOCTYPE; refused whatever it holds, so no entity is ever expanded.
    #[error("domain XML contains a DOCTYPE declaration: refused (no entity expansion, ever)")]
    Doctype,
    /// Elements nest deeper than [`MAX_DEPTH`], which no libvirt domain does: a bound against
    /// hostile input.
    #[error("domain XML nests deeper than {MAX_DEPTH} elements")]
    TooDeep,
    /// The root element is not `<domain>`.
    #[error("domain XML root element is <{found}>, expected <domain>")]
    NotADomain {
        /// The root element's name.
        found: String,
    },
    /// A second element follows the root.
    #[error("domain XML has a second root element <{found}>")]
    SecondRoot {
        /// Its name.
        found: String,
    },
    /// The document holds no element at all.
    #[error("domain XML has no root element")]
    NoRoot,
    /// A required element or attribute is absent.
    #[error("domain XML: {what} is missing")]
    Missing {
        /// Which, spelled as in the XML (e.g. `<os><type arch>`).
        what: &'static str,
    },
    /// A value is not one cpuguard can pass on safely or understands.
    #[error("domain XML: {what} has invalid value {value:?}: {reason}")]
    Invalid {
        /// Where, spelled as in the XML (e.g. `<cpu mode>`).
        what: &'static str,
        /// The value found.
        value: String,
        /// What is expected instead.
        reason: &'static str,
    },
}

/// How QEMU runs the guest's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// `<domain type='kvm'>`
    Kvm,
    /// `<domain type='qemu'>` (TCG emulation)
    Tcg,
}

/// `<cpu mode=…>`; libvirt's default when the attribute is absent is `custom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuMode {
    /// `custom`: the named `<model>` plus the listed features.
    Custom,
    /// `host-model`: libvirt picks the model nearest this host's CPU; live and prepare XML carry
    /// the expanded model.
    HostModel,
    /// `host-passthrough`: the host's CPU as KVM offers it (`-cpu host`).
    HostPassthrough,
    /// `maximum`: everything the accelerator can give (`-cpu max`).
    Maximum,
}

/// `<feature policy=…>`; libvirt's default is `require`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeaturePolicy {
    /// Enabled even when the host CPU lacks it.
    Force,
    /// Enabled; the domain does not start when the host cannot give it.
    Require,
    /// Enabled when the host can give it, else left out.
    Optional,
    /// Removed from the model.
    Disable,
    /// Removed; the domain does not start when the host CPU has it.
    Forbid,
}

/// One `<cpu><feature>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CpuFeature {
    /// libvirt's name (cpu_map spelling, e.g. `tsc_adjust`), not QEMU's.
    pub name: String,
    /// The `policy` attribute, libvirt's default spelled out.
    pub policy: FeaturePolicy,
}

/// `<topology>`; attributes libvirt leaves out are absent here too (QEMU then picks defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Topology {
    /// `sockets`.
    pub sockets: Option<u32>,
    /// `dies` (dies per socket).
    pub dies: Option<u32>,
    /// `clusters` (clusters per die).
    pub clusters: Option<u32>,
    /// `cores` (cores per cluster, or per die without clusters).
    pub cores: Option<u32>,
    /// `threads` (threads per core).
    pub threads: Option<u32>,
}

/// `<cache level=… mode=…>` decides the cache leaves (4, 0x8000001D) QEMU builds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuCache {
    /// `level`; None when absent.
    pub level: Option<u32>,
    /// `mode`: `emulate`, `passthrough` or `disable`.
    pub mode: String,
}

/// `<maxphysaddr mode=… bits=…>` decides CPUID 0x80000008 EAX.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MaxPhysAddr {
    /// `mode`: `passthrough` (the host's width) or `emulate` (the width in `bits`).
    pub mode: String,
    /// `bits`: the physical address width, in bits.
    pub bits: Option<u32>,
}

/// The `<cpu>` element, with libvirt's defaults spelled out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuDefinition {
    /// `mode`; `custom` when absent.
    pub mode: CpuMode,
    /// `<model>`; for host-model after libvirt expanded it (live or prepare XML) this is the
    /// expanded model.
    pub model: Option<String>,
    /// `<model fallback=…>`, libvirt default `allow`.
    pub fallback: Option<String>,
    /// `<cpu match='minimum'>`: libvirt 9 replaces the model with this host's CPU at start, so the
    /// named model is not what the guest gets (src/x86_64/probe/args.rs refuses it). Skipped when
    /// false so that cache keys of every other CPU stay what they were.
    #[serde(default, skip_serializing_if = "is_false")]
    pub match_minimum: bool,
    /// `<vendor>` (e.g. `Intel`): the host CPU vendor a custom model requires.
    pub vendor: Option<String>,
    /// `<model vendor_id=…>`: the CPUID vendor string the guest sees instead of the model's.
    pub vendor_id: Option<String>,
    /// Sorted by name.
    pub features: Vec<CpuFeature>,
    /// `<topology>`; None when absent.
    pub topology: Option<Topology>,
    /// `<cpu migratable=…>` (host-passthrough / maximum).
    pub migratable: Option<bool>,
    /// `<cache>`; None when absent.
    pub cache: Option<CpuCache>,
    /// `<maxphysaddr>`; None when absent.
    pub maxphysaddr: Option<MaxPhysAddr>,
}

/// One Hyper-V enlightenment under `<features><hyperv>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HypervFeature {
    /// The element's name, e.g. `relaxed`, `spinlocks`, `vendor_id`.
    pub name: String,
    /// `state` attribute (`on`/`off`).
    pub state: Option<String>,
    /// `retries` (spinlocks) or `value` (vendor_id).
    pub value: Option<String>,
    /// Sub-elements with their state, e.g. stimer's `direct`, tlbflush's `extended`; sorted.
    pub sub: Vec<(String, String)>,
}

/// `<features><hyperv>`: the Hyper-V enlightenments (CPUID leaves 0x40000000 and up).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hyperv {
    /// `custom` (default) or `passthrough`.
    pub mode: String,
    /// Sorted by name.
    pub features: Vec<HypervFeature>,
}

/// The `<features>` and `<clock>` settings that change CPUID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuidAffectingFeatures {
    /// `<hyperv>`; None when absent.
    pub hyperv: Option<Hyperv>,
    /// `<kvm>` children as (name, state), sorted: hidden, hint-dedicated, poll-control, pv-ipi…
    pub kvm: Vec<(String, String)>,
    /// `<pmu state=…>`
    pub pmu: Option<bool>,
    /// `<apic eoi=…>` (KVM PV EOI, CPUID 0x40000001)
    pub apic_eoi: Option<bool>,
    /// `<pvspinlock state=…>` (KVM PV unhalt, CPUID 0x40000001)
    pub pvspinlock: Option<bool>,
    /// `<clock><timer name=… present=…>` for kvmclock and hypervclock, sorted.
    pub timers: Vec<(String, bool)>,
    /// `<clock><timer name='tsc' frequency=…>` (Hz): CPUID 0x40000010 and invtsc checks.
    pub tsc_frequency: Option<u64>,
    /// `<devices><panic model='hyperv'/>`: libvirt adds `hv-crash` to `-cpu` (Hyper-V leaf
    /// 0x40000003 `EDX[10]`, the crash MSRs). Skipped when false: cache keys stay as they were.
    #[serde(default, skip_serializing_if = "is_false")]
    pub hyperv_crash: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Everything in a domain XML that decides the guest CPU.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestCpuConfig {
    /// `<domain type>`: `kvm` or `qemu` (TCG).
    pub accel: Accel,
    /// `<devices><emulator>`: untrusted, checked by src/qemu/emulator.rs before use.
    pub emulator: Option<String>,
    /// `<os><type arch=…>` (serialized as libvirt's name, as the string it was before)
    pub arch: Arch,
    /// `<os><type machine=…>`
    pub machine: Option<String>,
    /// `<cpu>`; None when the domain has none (QEMU's default model).
    pub cpu: Option<CpuDefinition>,
    /// `<vcpu>`: maximum vCPUs.
    pub vcpus: u32,
    /// `<vcpu current=…>` when below the maximum.
    pub current_vcpus: Option<u32>,
    /// The `<features>`, `<clock>` and `<devices><panic>` settings that change CPUID.
    pub features: CpuidAffectingFeatures,
}

impl GuestCpuConfig {
    /// `sha256:…` of the configuration a stamp is bound to: this canonical configuration (lists
    /// sorted by the parser, serde's field order) without what differs between a source's live
    /// XML and the destination's prepare XML for the same guest CPU: the emulator's path (each
    /// host has its own) and `<model fallback>` (a started guest's model is not substituted any
    /// more; libvirt writes `forbid` into live XML, cpuguard's migrate phase pins it too).
    pub fn binding_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut bound = self.clone();
        bound.emulator = None;
        if let Some(cpu) = bound.cpu.as_mut() {
            cpu.fallback = None;
        }
        // Serializing plain data (strings, numbers, enums) cannot fail; an empty text would
        // only make every binding check fail, never pass.
        let json = serde_json::to_string(&bound).unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(b"cpuguard stamp binding v1\n");
        hasher.update(json.as_bytes());
        format!("sha256:{}", hex::encode(hasher.finalize()))
    }

    /// Extracts the CPU configuration from a libvirt domain XML document.
    pub fn from_domain_xml(xml: &str) -> Result<Self, GuestError> {
        let root = parse_tree(xml)?;
        if root.name != "domain" {
            return Err(GuestError::NotADomain { found: root.name });
        }
        let accel = match root.attr("type") {
            Some("kvm") => Accel::Kvm,
            Some("qemu") => Accel::Tcg,
            Some(other) => {
                return Err(GuestError::Invalid {
                    what: "<domain type>",
                    value: other.to_string(),
                    reason: "cpuguard probes only kvm and qemu domains",
                })
            }
            None => {
                return Err(GuestError::Missing {
                    what: "<domain type>",
                })
            }
        };
        let emulator = root
            .child("devices")
            .and_then(|d| d.child("emulator"))
            .map(|e| e.text.trim().to_string());
        let os_type = root
            .child("os")
            .and_then(|os| os.child("type"))
            .ok_or(GuestError::Missing { what: "<os><type>" })?;
        let arch_name = os_type.attr("arch").ok_or(GuestError::Missing {
            what: "<os><type arch>",
        })?;
        let machine = os_type.attr("machine").map(str::to_string);
        for (what, value) in [
            ("<os><type arch>", Some(arch_name)),
            ("<os><type machine>", machine.as_deref()),
        ] {
            if let Some(value) = value {
                check_token(what, value)?;
            }
        }
        let arch = Arch::from_name(arch_name)
            .ok_or_else(|| invalid("<os><type arch>", arch_name, crate::arch::SUPPORTED))?;

        let (vcpus, current_vcpus) = match root.child("vcpu") {
            None => (1, None),
            Some(v) => {
                let max = parse_u32("<vcpu>", v.text.trim())?;
                if max == 0 {
                    return Err(invalid("<vcpu>", "0", "must be at least 1"));
                }
                let current = v
                    .attr("current")
                    .map(|c| parse_u32("<vcpu current>", c))
                    .transpose()?
                    .filter(|&c| c != max);
                if let Some(c) = current {
                    if c == 0 || c > max {
                        return Err(invalid(
                            "<vcpu current>",
                            &c.to_string(),
                            "must be between 1 and the <vcpu> maximum",
                        ));
                    }
                }
                (max, current)
            }
        };

        let cpu = root.child("cpu").map(parse_cpu).transpose()?;
        let features = parse_features(&root)?;
        Ok(GuestCpuConfig {
            accel,
            emulator,
            arch,
            machine,
            cpu,
            vcpus,
            current_vcpus,
            features,
        })
    }
}

fn parse_cpu(cpu: &Element) -> Result<CpuDefinition, GuestError> {
    let mode = match cpu.attr("mode") {
        None | Some("custom") => CpuMode::Custom,
        Some("host-model") => CpuMode::HostModel,
        Some("host-passthrough") => CpuMode::HostPassthrough,
        Some("maximum") => CpuMode::Maximum,
        Some(other) => return Err(invalid("<cpu mode>", other, "unknown CPU mode")),
    };
    let match_minimum = match cpu.attr("match") {
        None | Some("exact" | "strict") => false,
        Some("minimum") => true,
        Some(other) => {
            return Err(invalid(
                "<cpu match>",
                other,
                "expected exact, minimum or strict",
            ))
        }
    };
    let migratable = cpu
        .attr("migratable")
        .map(|v| parse_on_off("<cpu migratable>", v))
        .transpose()?
        // libvirt 9 fills in `on` for host-passthrough only; for maximum it stays unset and
        // libvirt writes nothing (QEMU's own default is the same CPU).
        .or(match mode {
            CpuMode::HostPassthrough => Some(true),
            _ => None,
        });
    let model_el = cpu.child("model");
    let model = model_el
        .map(|m| m.text.trim().to_string())
        .filter(|m| !m.is_empty());
    if let Some(model) = &model {
        check_token("<cpu><model>", model)?;
    }
    let fallback = match model_el.and_then(|m| m.attr("fallback")) {
        Some(f @ ("allow" | "forbid")) => Some(f.to_string()),
        Some(other) => {
            return Err(invalid(
                "<model fallback>",
                other,
                "expected allow or forbid",
            ))
        }
        None if model.is_some() => Some("allow".to_string()),
        None => None,
    };
    let vendor_id = model_el
        .and_then(|m| m.attr("vendor_id"))
        .map(|v| check_vendor_id("<model vendor_id>", v).map(|()| v.to_string()))
        .transpose()?;
    let vendor = cpu
        .child("vendor")
        .map(|v| v.text.trim().to_string())
        .filter(|v| !v.is_empty());
    let mut features = Vec::new();
    for f in cpu.children_named("feature") {
        let name = f.attr("name").ok_or(GuestError::Missing {
            what: "<cpu><feature name>",
        })?;
        check_token("<cpu><feature name>", name)?;
        let policy = match f.attr("policy") {
            None | Some("require") => FeaturePolicy::Require,
            Some("force") => FeaturePolicy::Force,
            Some("optional") => FeaturePolicy::Optional,
            Some("disable") => FeaturePolicy::Disable,
            Some("forbid") => FeaturePolicy::Forbid,
            Some(other) => return Err(invalid("<feature policy>", other, "unknown policy")),
        };
        features.push(CpuFeature {
            name: name.to_string(),
            policy,
        });
    }
    features.sort();
    features.dedup_by(|a, b| a.name == b.name);
    let topology = cpu
        .child("topology")
        .map(|t| -> Result<Topology, GuestError> {
            let get = |name: &'static str| t.attr(name).map(|v| parse_u32(name, v)).transpose();
            Ok(Topology {
                sockets: get("sockets")?,
                dies: get("dies")?,
                clusters: get("clusters")?,
                cores: get("cores")?,
                threads: get("threads")?,
            })
        })
        .transpose()?;
    let cache = cpu
        .child("cache")
        .map(|c| -> Result<CpuCache, GuestError> {
            Ok(CpuCache {
                level: c
                    .attr("level")
                    .map(|l| parse_u32("<cache level>", l))
                    .transpose()?,
                mode: c
                    .attr("mode")
                    .ok_or(GuestError::Missing {
                        what: "<cpu><cache mode>",
                    })?
                    .to_string(),
            })
        })
        .transpose()?;
    let maxphysaddr = cpu
        .child("maxphysaddr")
        .map(|m| -> Result<MaxPhysAddr, GuestError> {
            Ok(MaxPhysAddr {
                mode: m
                    .attr("mode")
                    .ok_or(GuestError::Missing {
                        what: "<cpu><maxphysaddr mode>",
                    })?
                    .to_string(),
                bits: m
                    .attr("bits")
                    .map(|b| parse_u32("<maxphysaddr bits>", b))
                    .transpose()?,
            })
        })
        .transpose()?;
    Ok(CpuDefinition {
        mode,
        model,
        fallback,
        match_minimum,
        vendor,
        vendor_id,
        features,
        topology,
        migratable,
        cache,
        maxphysaddr,
    })
}

fn parse_features(root: &Element) -> Result<CpuidAffectingFeatures, GuestError> {
    let mut out = CpuidAffectingFeatures::default();
    if let Some(features) = root.child("features") {
        if let Some(hv) = features.child("hyperv") {
            let mut list = Vec::new();
            for f in &hv.children {
                check_token("<hyperv> feature", &f.name)?;
                let value = f.attr("retries").or_else(|| f.attr("value"));
                match (f.name.as_str(), value) {
                    // libvirt's own documented example is 'KVM Hv': a space is harmless in one
                    // argv element (no shell), a comma would start another QEMU option.
                    ("vendor_id", Some(v)) => check_vendor_id("<hyperv><vendor_id value>", v)?,
                    (_, Some(v)) => check_token("<hyperv> feature value", v)?,
                    (_, None) => {}
                }
                let mut sub = Vec::new();
                for c in &f.children {
                    check_token("<hyperv> sub-feature", &c.name)?;
                    sub.push((c.name.clone(), c.attr("state").unwrap_or("on").to_string()));
                }
                sub.sort();
                list.push(HypervFeature {
                    name: f.name.clone(),
                    state: f.attr("state").map(str::to_string),
                    value: value.map(str::to_string),
                    sub,
                });
            }
            list.sort();
            out.hyperv = Some(Hyperv {
                mode: hv.attr("mode").unwrap_or("custom").to_string(),
                features: list,
            });
        }
        if let Some(kvm) = features.child("kvm") {
            out.kvm = kvm
                .children
                .iter()
                .map(|c| (c.name.clone(), c.attr("state").unwrap_or("on").to_string()))
                .collect();
            out.kvm.sort();
        }
        out.pmu = features
            .child("pmu")
            .map(|p| parse_on_off("<pmu state>", p.attr("state").unwrap_or("on")))
            .transpose()?;
        out.apic_eoi = features
            .child("apic")
            .and_then(|a| a.attr("eoi"))
            .map(|v| parse_on_off("<apic eoi>", v))
            .transpose()?;
        out.pvspinlock = features
            .child("pvspinlock")
            .map(|p| parse_on_off("<pvspinlock state>", p.attr("state").unwrap_or("on")))
            .transpose()?;
    }
    out.hyperv_crash = root.child("devices").is_some_and(|d| {
        d.children_named("panic")
            .any(|p| p.attr("model") == Some("hyperv"))
    });
    if let Some(clock) = root.child("clock") {
        for t in clock.children_named("timer") {
            match t.attr("name") {
                Some(name @ ("kvmclock" | "hypervclock")) => {
                    let present = t
                        .attr("present")
                        .map(|p| match p {
                            "yes" => Ok(true),
                            "no" => Ok(false),
                            other => Err(invalid("<timer present>", other, "expected yes or no")),
                        })
                        .transpose()?;
                    if let Some(present) = present {
                        out.timers.push((name.to_string(), present));
                    }
                }
                Some("tsc") => {
                    if let Some(freq) = t.attr("frequency") {
                        out.tsc_frequency = Some(freq.parse().map_err(|_| {
                            invalid("<timer name='tsc' frequency>", freq, "not a number")
                        })?);
                    }
                }
                _ => {}
            }
        }
        out.timers.sort();
    }
    Ok(out)
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> GuestError {
    GuestError::Invalid {
        what,
        value: value.chars().take(80).collect(),
        reason,
    }
}

fn parse_u32(what: &'static str, value: &str) -> Result<u32, GuestError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(what, value, "not a non-negative 32-bit number"))
}

fn parse_on_off(what: &'static str, value: &str) -> Result<bool, GuestError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(invalid(what, other, "expected on or off")),
    }
}

/// Values that end up inside a QEMU `-cpu`/`-machine` option must not smuggle in another option:
/// allow only what libvirt's own names use.
fn check_token(what: &'static str, value: &str) -> Result<(), GuestError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            what,
            value,
            "only letters, digits, '-', '_' and '.' are allowed",
        ))
    }
}

/// A CPUID vendor string (`<model vendor_id>`, `<hyperv><vendor_id value>`): at most 12
/// printable ASCII characters, as libvirt requires, spaces included (QEMU gets the value inside
/// one argv element, no shell is involved); a comma is refused because QEMU would read what follows
/// as another `-cpu` option.
fn check_vendor_id(what: &'static str, value: &str) -> Result<(), GuestError> {
    if value.is_empty() || value.len() > 12 {
        return Err(invalid(what, value, "must be 1 to 12 characters"));
    }
    if !value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b',')
    {
        return Err(invalid(
            what,
            value,
            "only printable ASCII characters other than ',' are allowed",
        ));
    }
    Ok(())
}

impl From<TreeError> for GuestError {
    fn from(e: TreeError) -> Self {
        match e {
            TreeError::Malformed { position, reason } => GuestError::Malformed { position, reason },
            TreeError::Doctype => GuestError::Doctype,
            TreeError::TooDeep => GuestError::TooDeep,
            TreeError::SecondRoot { found } => GuestError::SecondRoot { found },
            TreeError::NoRoot => GuestError::NoRoot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREPARE: &str = include_str!("../../tests/fixtures/domains/libvirt9-prepare-begin.xml");

    #[test]
    fn extracts_the_prepare_sample() {
        let c = GuestCpuConfig::from_domain_xml(PREPARE).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        assert_eq!(c.emulator.as_deref(), Some("/usr/bin/qemu-system-x86_64"));
        assert_eq!(c.arch, Arch::X86_64);
        assert_eq!(c.machine.as_deref(), Some("pc-i440fx-7.2"));
        assert_eq!(c.vcpus, 1);
        let cpu = c.cpu.unwrap();
        assert_eq!(cpu.mode, CpuMode::Custom);
        assert_eq!(cpu.model.as_deref(), Some("EPYC-Milan"));
        assert_eq!(cpu.fallback.as_deref(), Some("forbid"));
        assert_eq!(cpu.vendor.as_deref(), Some("AMD"));
        let names: Vec<&str> = cpu.features.iter().map(|f| f.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "features must be sorted");
        let tsc_adjust = cpu
            .features
            .iter()
            .find(|f| f.name == "tsc_adjust")
            .unwrap();
        assert_eq!(tsc_adjust.policy, FeaturePolicy::Require);
        let pni = cpu.features.iter().find(|f| f.name == "pni").unwrap();
        assert_eq!(pni.policy, FeaturePolicy::Disable);
    }

    #[test]
    fn element_order_does_not_change_the_config() {
        let a = r#"<domain type='qemu'><os><type arch='x86_64' machine='pc'>hvm</type></os>
            <cpu mode='custom'><model>Nehalem</model><feature name='vmx' policy='disable'/>
            <feature name='aes'/></cpu><vcpu>2</vcpu></domain>"#;
        let b = r#"<domain type='qemu'><vcpu>2</vcpu><cpu><feature policy='require' name='aes'/>
            <feature policy='disable' name='vmx'/><model fallback='allow'>Nehalem</model></cpu>
            <os><type machine='pc' arch='x86_64'>hvm</type></os></domain>"#;
        let ca = GuestCpuConfig::from_domain_xml(a).unwrap();
        let cb = GuestCpuConfig::from_domain_xml(b).unwrap();
        assert_eq!(ca, cb);
        assert_eq!(
            serde_json::to_string(&ca).unwrap(),
            serde_json::to_string(&cb).unwrap()
        );
        assert_eq!(ca.accel, Accel::Tcg);
    }

    #[test]
    fn features_topology_and_enlightenments() {
        let xml = r#"<domain type='kvm'><vcpu current='2'>4</vcpu>
          <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
          <features><hyperv mode='custom'><relaxed state='on'/><spinlocks state='on' retries='8191'/>
            <stimer state='on'><direct state='on'/></stimer><vendor_id state='on' value='KVMKVM'/></hyperv>
            <kvm><hidden state='on'/></kvm><pmu state='off'/><apic eoi='on'/></features>
          <cpu mode='host-passthrough' migratable='off'><topology sockets='1' dies='1' cores='2' threads='2'/>
            <cache mode='passthrough'/></cpu>
          <clock offset='utc'><timer name='hypervclock' present='yes'/><timer name='tsc' frequency='2000000000'/></clock>
          </domain>"#;
        let c = GuestCpuConfig::from_domain_xml(xml).unwrap();
        assert_eq!((c.vcpus, c.current_vcpus), (4, Some(2)));
        let cpu = c.cpu.as_ref().unwrap();
        assert_eq!(cpu.mode, CpuMode::HostPassthrough);
        assert_eq!(cpu.migratable, Some(false));
        let topo = cpu.topology.as_ref().unwrap();
        assert_eq!(
            (
                topo.sockets,
                topo.dies,
                topo.clusters,
                topo.cores,
                topo.threads
            ),
            (Some(1), Some(1), None, Some(2), Some(2))
        );
        assert_eq!(cpu.cache.as_ref().unwrap().mode, "passthrough");
        let hv = c.features.hyperv.as_ref().unwrap();
        let names: Vec<&str> = hv.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["relaxed", "spinlocks", "stimer", "vendor_id"]);
        assert_eq!(hv.features[1].value.as_deref(), Some("8191"));
        assert_eq!(
            hv.features[2].sub,
            vec![("direct".to_string(), "on".to_string())]
        );
        assert_eq!(
            c.features.kvm,
            vec![("hidden".to_string(), "on".to_string())]
        );
        assert_eq!(c.features.pmu, Some(false));
        assert_eq!(c.features.apic_eoi, Some(true));
        assert_eq!(c.features.timers, vec![("hypervclock".to_string(), true)]);
        assert_eq!(c.features.tsc_frequency, Some(2_000_000_000));
    }

    #[test]
    fn hostile_or_broken_documents_are_refused() {
        let doctype = r#"<!DOCTYPE domain [<!ENTITY x "kvm">]><domain type='&x;'/>"#;
        assert_eq!(
            GuestCpuConfig::from_domain_xml(doctype),
            Err(GuestError::Doctype)
        );
        let entity = r#"<domain type='kvm'><os><type arch='&x;'>hvm</type></os></domain>"#;
        assert!(matches!(
            GuestCpuConfig::from_domain_xml(entity),
            Err(GuestError::Malformed { .. })
        ));
        let two_roots = r#"<domain type='kvm'/><domain type='kvm'/>"#;
        assert!(matches!(
            GuestCpuConfig::from_domain_xml(two_roots),
            Err(GuestError::SecondRoot { .. })
        ));
        let unclosed = r#"<domain type='kvm'><os>"#;
        assert!(matches!(
            GuestCpuConfig::from_domain_xml(unclosed),
            Err(GuestError::Malformed { .. })
        ));
        assert_eq!(
            GuestCpuConfig::from_domain_xml("  "),
            Err(GuestError::NoRoot)
        );
        let xen = r#"<domain type='xen'><os><type arch='x86_64'>hvm</type></os></domain>"#;
        let err = GuestCpuConfig::from_domain_xml(xen).unwrap_err();
        assert!(err.to_string().contains("xen"), "{err}");
        let deep = format!(
            "<domain type='kvm'>{}{}</domain>",
            "<a>".repeat(100),
            "</a>".repeat(100)
        );
        assert_eq!(
            GuestCpuConfig::from_domain_xml(&deep),
            Err(GuestError::TooDeep)
        );
    }

    #[test]
    fn values_that_could_inject_qemu_options_are_refused() {
        let xml = r#"<domain type='qemu'><os><type arch='x86_64' machine='pc,accel=kvm'>hvm</type></os></domain>"#;
        let err = GuestCpuConfig::from_domain_xml(xml).unwrap_err();
        assert!(
            matches!(
                err,
                GuestError::Invalid {
                    what: "<os><type machine>",
                    ..
                }
            ),
            "{err}"
        );
        let xml = r#"<domain type='qemu'><os><type arch='x86_64'>hvm</type></os>
            <cpu><model>qemu64</model><feature name='vmx=on,pmu'/></cpu></domain>"#;
        assert!(GuestCpuConfig::from_domain_xml(xml).is_err());
        let xml =
            r#"<domain type='qemu'><os><type arch='x86_64'>hvm</type></os><vcpu>0</vcpu></domain>"#;
        assert!(GuestCpuConfig::from_domain_xml(xml).is_err());
        for vendor in ["a,b", "KVM\nHv", "thirteen char"] {
            let hv = format!(
                "<domain type='kvm'><os><type arch='x86_64'>hvm</type></os><features><hyperv>\
                 <vendor_id state='on' value='{vendor}'/></hyperv></features></domain>"
            );
            let model = format!(
                "<domain type='kvm'><os><type arch='x86_64'>hvm</type></os>\
                 <cpu><model vendor_id='{vendor}'>qemu64</model></cpu></domain>"
            );
            for xml in [hv, model] {
                let err = GuestCpuConfig::from_domain_xml(&xml).unwrap_err();
                assert!(err.to_string().contains("vendor_id"), "{err}");
            }
        }
    }

    #[test]
    fn vendor_ids_with_a_space_panic_device_and_match_are_read() {
        let xml = r#"<domain type='kvm'><os><type arch='x86_64'>hvm</type></os>
            <features><hyperv><vendor_id state='on' value='KVM Hv'/></hyperv></features>
            <cpu match='minimum'><model vendor_id='Libvirt QEMU'>qemu64</model></cpu>
            <devices><panic model='isa'/><panic model='hyperv'/></devices></domain>"#;
        let c = GuestCpuConfig::from_domain_xml(xml).unwrap();
        let cpu = c.cpu.as_ref().unwrap();
        assert_eq!(cpu.vendor_id.as_deref(), Some("Libvirt QEMU"));
        assert!(cpu.match_minimum);
        assert!(c.features.hyperv_crash);
        let hv = c.features.hyperv.as_ref().unwrap();
        assert_eq!(hv.features[0].value.as_deref(), Some("KVM Hv"));
        let xml = r#"<domain type='kvm'><os><type arch='x86_64'>hvm</type></os>
            <cpu match='loose'/></domain>"#;
        let err = GuestCpuConfig::from_domain_xml(xml).unwrap_err();
        assert!(err.to_string().contains("<cpu match>"), "{err}");
    }

    #[test]
    fn new_fields_keep_old_cache_keys() {
        // A config without a panic device or match='minimum' serializes as before these fields
        // existed, so existing cache entries and stamps keep their keys.
        let c = GuestCpuConfig::from_domain_xml(PREPARE).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("hyperv_crash") && !json.contains("match_minimum"));
        let back: GuestCpuConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }
}
