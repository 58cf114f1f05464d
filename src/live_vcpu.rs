//! The live-vCPU cross-check: before a stamp is written, the running guest's first vCPU, as its
//! own QEMU reports it through the monitor, is compared with what the probe measured for the
//! domain. A stamp is a claim about *this* guest; the probe only rebuilds the guest's CPU from
//! the domain XML and the running binary, so anything that changed the running QEMU's CPU
//! outside both (a wrapper adding `-cpu` options, `-global`, a hand-edited command line) would
//! otherwise be stamped as the probe's CPU.
//!
//! What QEMU reports is its *configured* CPU: on x86 the `feature-words` (CPUID leaf, sub-leaf,
//! register and the bits QEMU put there after filtering), `family`/`model`/`stepping`,
//! `vendor`, `model-id`, `level` and `xlevel` (target/i386/cpu.c); on aarch64 `midr` and the
//! boolean properties that switch ID-register fields (`sve`, `sme`, `pmu`, `vfp`, `neon`,
//! target/arm). Only what those cover is compared: bits QEMU or KVM compute at CPUID time from
//! guest state (OSXSAVE, OSPKE) are left out, as are registers no property describes.
//!
//! This module is pure: [`read`] talks to the monitor through a function the caller supplies
//! (`cpuguard-libvirt` passes libvirt's QEMU monitor passthrough), so the comparison is tested
//! with QMP replies captured from this project's QEMU (`tests/fixtures/live_vcpu/`).

use serde_json::Value;

use crate::aarch64::ArmIdTable;
use crate::fingerprint::Fingerprint;
use crate::view::GuestView;
use crate::x86_64::features::{FeatureBit, FeatureMap};
use crate::x86_64::table::{CpuidTable, Register};

/// QOM properties of an x86 vCPU this check reads; every one exists in QEMU since 1.x.
pub const X86_PROPERTIES: &[&str] = &[
    "feature-words",
    "filtered-features",
    "family",
    "model",
    "stepping",
    "model-id",
    "vendor",
    "level",
    "xlevel",
];

/// QOM properties of an aarch64 vCPU this check reads when the CPU model has them (QEMU 7.2:
/// `midr` on every model; `sve`/`sme` only on models that can have them, e.g. `max`). QEMU
/// exposes no ID register itself as a property.
pub const AARCH64_PROPERTIES: &[&str] = &["midr", "sve", "sme", "pmu", "vfp", "neon"];

/// Bits of x86 feature words that mirror guest OS state (CR4) rather than the configured CPU:
/// QEMU and KVM set them at CPUID time, so the probe and the running guest may differ there
/// without their CPUs differing. (leaf, sub-leaf, register, bits)
const X86_GUEST_STATE_BITS: &[(u32, u32, Register, u32)] = &[
    // OSXSAVE mirrors CR4.OSXSAVE.
    (0x1, 0, Register::Ecx, 1 << 27),
    // OSPKE mirrors CR4.PKE.
    (0x7, 0, Register::Ecx, 1 << 4),
];

/// One x86 feature word as QEMU's `feature-words` / `filtered-features` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureWord {
    /// `cpuid-input-eax`: the CPUID leaf.
    pub leaf: u32,
    /// `cpuid-input-ecx`; absent for leaves without sub-leaves (then sub-leaf 0 is read).
    pub subleaf: Option<u32>,
    /// `cpuid-register`: the output register the bits are in.
    pub register: Register,
    /// `features`: the bits set (in `feature-words`, after QEMU's filtering; in
    /// `filtered-features`, the bits it removed).
    pub bits: u32,
}

/// The running x86 vCPU as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X86Vcpu {
    /// `feature-words`: the feature bits the vCPU has, per CPUID leaf and register.
    pub feature_words: Vec<FeatureWord>,
    /// `filtered-features`: bits the configuration asked for that QEMU removed because the host
    /// (or KVM) cannot give them.
    pub filtered: Vec<FeatureWord>,
    /// `family`: the displayed family (base family, plus the extended family when the base is
    /// 0xf), from CPUID.0x1:EAX.
    pub family: u64,
    /// `model`: the base model with the extended model above it (whatever the family, unlike the
    /// SDM's display model), from CPUID.0x1:EAX.
    pub model: u64,
    /// `stepping`: bits 3:0 of CPUID.0x1:EAX.
    pub stepping: u64,
    /// `model-id`: the brand string (CPUID.0x80000002..0x80000004).
    pub model_id: String,
    /// `vendor`: the vendor string of CPUID.0x0 (`GenuineIntel`, `AuthenticAMD`, …).
    pub vendor: String,
    /// `level`: the highest basic leaf (CPUID.0x0:EAX).
    pub level: u64,
    /// `xlevel`: the highest extended leaf (CPUID.0x80000000:EAX); below 0x80000000 the vCPU has
    /// no extended leaves.
    pub xlevel: u64,
}

/// The running aarch64 vCPU: each property QEMU has for this model (`None`: not a property of
/// this model).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArmVcpu {
    /// `midr`: the MIDR_EL1 value the guest reads (implementer, variant, part number, revision).
    pub midr: Option<u64>,
    /// `sve`: whether the Scalable Vector Extension is on.
    pub sve: Option<bool>,
    /// `sme`: whether the Scalable Matrix Extension is on.
    pub sme: Option<bool>,
    /// `pmu`: whether the vCPU has a performance monitoring unit.
    pub pmu: Option<bool>,
    /// `vfp`: whether floating point is on.
    pub vfp: Option<bool>,
    /// `neon`: whether Advanced SIMD is on.
    pub neon: Option<bool>,
}

/// The running guest's first vCPU, as [`read`] got it from its QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveVcpu {
    /// An `x86_64` or `i386` target.
    X86(X86Vcpu),
    /// An `aarch64` target.
    Aarch64(ArmVcpu),
}

/// The outcome of a comparison: every difference, one line each, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossCheck {
    /// How the running vCPU differs from the probe's CPU (`vendor (CPUID.0x0): running …, probe
    /// …`); empty when they agree.
    pub differences: Vec<String>,
    /// Features the running QEMU filtered that the probe's QEMU did not (it asked for something
    /// the host lacks): named beside the differences, not a difference by itself.
    pub notes: Vec<String>,
    /// False when the feature words were not compared: the probe showed that this host does not
    /// give guests the CPUID QEMU configures (see [`compare`]).
    pub words_compared: bool,
}

impl CrossCheck {
    /// True when nothing compared differs (notes do not count).
    pub fn agrees(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Reads the first vCPU through `monitor`, which sends one QMP command (JSON text) to the
/// domain's QEMU and returns its reply (JSON text, `{"return": …}` or `{"error": …}`).
/// The vCPU's QOM path and architecture come from `query-cpus-fast`.
pub fn read(monitor: &mut dyn FnMut(&str) -> Result<String, String>) -> Result<LiveVcpu, String> {
    let cpus = reply(
        monitor,
        r#"{"execute":"query-cpus-fast"}"#,
        "query-cpus-fast",
    )?;
    let first = cpus
        .as_array()
        .and_then(|cpus| cpus.first())
        .ok_or("query-cpus-fast: no vCPU in the reply")?;
    let path = first
        .get("qom-path")
        .and_then(Value::as_str)
        .ok_or("query-cpus-fast: no qom-path for the first vCPU")?;
    let target = first
        .get("target")
        .and_then(Value::as_str)
        .ok_or("query-cpus-fast: no target for the first vCPU")?;
    let mut get = |property: &str| -> Result<Result<Value, String>, String> {
        let command = serde_json::json!({
            "execute": "qom-get",
            "arguments": {"path": path, "property": property},
        })
        .to_string();
        let text = monitor(&command).map_err(|e| format!("qom-get {property}: {e}"))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| format!("qom-get {property}: unreadable reply: {e}"))?;
        if let Some(ret) = value.get("return") {
            return Ok(Ok(ret.clone()));
        }
        let desc = value
            .pointer("/error/desc")
            .and_then(Value::as_str)
            .unwrap_or("error without a description");
        Ok(Err(format!("qom-get {property}: {desc}")))
    };
    match target {
        "x86_64" | "i386" => {
            let mut need = |property: &str| get(property)?;
            let words = |v: Value, what: &str| parse_feature_words(&v, what);
            let uint = |v: Value, what: &str| {
                v.as_u64()
                    .ok_or_else(|| format!("qom-get {what}: not an unsigned number: {v}"))
            };
            let string = |v: Value, what: &str| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("qom-get {what}: not a string: {v}"))
            };
            Ok(LiveVcpu::X86(X86Vcpu {
                feature_words: words(need("feature-words")?, "feature-words")?,
                filtered: words(need("filtered-features")?, "filtered-features")?,
                family: uint(need("family")?, "family")?,
                model: uint(need("model")?, "model")?,
                stepping: uint(need("stepping")?, "stepping")?,
                model_id: string(need("model-id")?, "model-id")?,
                vendor: string(need("vendor")?, "vendor")?,
                level: uint(need("level")?, "level")?,
                xlevel: uint(need("xlevel")?, "xlevel")?,
            }))
        }
        "aarch64" => {
            // A property this model lacks is an error reply: nothing to compare there.
            let mut optional = |property: &str| Ok::<_, String>(get(property)?.ok());
            let flag = |v: Option<Value>, what: &str| {
                v.map(|v| {
                    v.as_bool()
                        .ok_or_else(|| format!("qom-get {what}: not a boolean: {v}"))
                })
                .transpose()
            };
            let midr = optional("midr")?
                .map(|v| {
                    v.as_u64()
                        .ok_or_else(|| format!("qom-get midr: not an unsigned number: {v}"))
                })
                .transpose()?;
            Ok(LiveVcpu::Aarch64(ArmVcpu {
                midr,
                sve: flag(optional("sve")?, "sve")?,
                sme: flag(optional("sme")?, "sme")?,
                pmu: flag(optional("pmu")?, "pmu")?,
                vfp: flag(optional("vfp")?, "vfp")?,
                neon: flag(optional("neon")?, "neon")?,
            }))
        }
        other => Err(format!(
            "query-cpus-fast: target {other:?} has no live-vCPU check"
        )),
    }
}

/// The `return` of one QMP command, or its error as one line.
fn reply(
    monitor: &mut dyn FnMut(&str) -> Result<String, String>,
    command: &str,
    what: &str,
) -> Result<Value, String> {
    let text = monitor(command).map_err(|e| format!("{what}: {e}"))?;
    let mut value: Value =
        serde_json::from_str(&text).map_err(|e| format!("{what}: unreadable reply: {e}"))?;
    if let Some(ret) = value.get_mut("return") {
        return Ok(ret.take());
    }
    Err(format!(
        "{what}: {}",
        value
            .pointer("/error/desc")
            .and_then(Value::as_str)
            .unwrap_or("error without a description")
    ))
}

/// `[{"cpuid-input-eax": 1, "cpuid-register": "ECX", "features": …}, …]`
pub fn parse_feature_words(value: &Value, what: &str) -> Result<Vec<FeatureWord>, String> {
    let items = value
        .as_array()
        .ok_or_else(|| format!("qom-get {what}: not a list"))?;
    items
        .iter()
        .map(|item| {
            let num = |key: &str| {
                item.get(key)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            };
            let leaf = num("cpuid-input-eax")
                .ok_or_else(|| format!("qom-get {what}: an item without cpuid-input-eax"))?;
            let register = match item.get("cpuid-register").and_then(Value::as_str) {
                Some("EAX") => Register::Eax,
                Some("EBX") => Register::Ebx,
                Some("ECX") => Register::Ecx,
                Some("EDX") => Register::Edx,
                other => {
                    return Err(format!(
                        "qom-get {what}: leaf {leaf:#x}: unknown cpuid-register {other:?}"
                    ))
                }
            };
            let bits = num("features").ok_or_else(|| {
                format!("qom-get {what}: leaf {leaf:#x}: no 32-bit features value")
            })?;
            Ok(FeatureWord {
                leaf,
                subleaf: num("cpuid-input-ecx"),
                register,
                bits,
            })
        })
        .collect()
}

/// Compares the running vCPU with the probe's fingerprint. `features` names CPUID bits (libvirt's
/// feature map); without it bits are named by location only.
///
/// The x86 feature words are compared only where the probe shows that guests see the CPUID QEMU
/// configures: when its user-mode pass found guest applications reading other values than the
/// guest kernel (`policy.user_mode_cpuid`'s case: CPUID not fully virtualized, as under a
/// paravirtualized KVM), the table is not QEMU's configuration for any guest of this host, the
/// probe's own included, so the words would differ for every guest; the identity (vendor,
/// family/model/stepping, model-id, levels) is still compared.
pub fn compare(live: &LiveVcpu, probe: &Fingerprint, features: Option<&FeatureMap>) -> CrossCheck {
    let enforced = !probe.user_mode.as_ref().is_some_and(|u| u.differs());
    match (live, probe.raw()) {
        (LiveVcpu::X86(vcpu), GuestView::X86(table)) => {
            compare_x86(vcpu, &table, &probe.filtered, features, enforced)
        }
        (LiveVcpu::Aarch64(vcpu), GuestView::Aarch64(table)) => compare_aarch64(vcpu, &table),
        (LiveVcpu::X86(_), GuestView::Aarch64(_)) => CrossCheck {
            differences: vec!["architecture: running x86_64, probe aarch64".to_string()],
            notes: Vec::new(),
            words_compared: false,
        },
        (LiveVcpu::Aarch64(_), GuestView::X86(_)) => CrossCheck {
            differences: vec!["architecture: running aarch64, probe x86_64".to_string()],
            notes: Vec::new(),
            words_compared: false,
        },
    }
}

/// How one CPUID bit is named in a difference: `pni (CPUID.0x1:ECX[0])`.
fn bit_text(
    features: Option<&FeatureMap>,
    leaf: u32,
    subleaf: u32,
    register: Register,
    bit: u8,
) -> String {
    let location = FeatureBit::Cpuid {
        leaf,
        subleaf,
        register,
        bit,
    }
    .to_string();
    let names = features
        .map(|f| f.cpuid_names(leaf, subleaf, register, bit).join("/"))
        .unwrap_or_default();
    if names.is_empty() {
        location
    } else {
        format!("{names} ({location})")
    }
}

/// QEMU's `family` getter: base family, plus the extended family when the base is 0xf.
fn qemu_family(eax: u32) -> u64 {
    let base = u64::from((eax >> 8) & 0xf);
    if base == 0xf {
        base + u64::from((eax >> 20) & 0xff)
    } else {
        base
    }
}

/// QEMU's `model` getter: extended model above the base model, whatever the family.
fn qemu_model(eax: u32) -> u64 {
    u64::from(((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4))
}

/// Registers' bytes as the guest reads a string from them (vendor, brand).
fn regs_text(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    // QEMU's model-id getter stops at the first NUL, as the guest's string does.
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// (leaf, register, bit) of a probe's filtered-feature line
/// (`avx2: the host lacks it (CPUID.07H:EBX [bit 5])`).
fn filtered_location(line: &str) -> Option<(u32, Register, u8)> {
    let at = line.rfind("(CPUID.")? + "(CPUID.".len();
    let rest = &line[at..];
    let (leaf, rest) = rest.split_once("H:")?;
    let leaf = u32::from_str_radix(leaf, 16).ok()?;
    let (register, rest) = rest.split_once(" [bit ")?;
    let register = match register {
        "EAX" => Register::Eax,
        "EBX" => Register::Ebx,
        "ECX" => Register::Ecx,
        "EDX" => Register::Edx,
        _ => return None,
    };
    let bit = rest.strip_suffix("])")?.parse().ok()?;
    Some((leaf, register, bit))
}

fn compare_x86(
    live: &X86Vcpu,
    table: &CpuidTable,
    probe_filtered: &[String],
    features: Option<&FeatureMap>,
    compare_words: bool,
) -> CrossCheck {
    let mut out = CrossCheck {
        differences: Vec::new(),
        notes: Vec::new(),
        words_compared: compare_words,
    };
    let mut differ = |what: String| out.differences.push(what);
    let leaf0 = table.get(0, 0);
    match leaf0 {
        Some(e) => {
            let vendor = regs_text(&[e.ebx, e.edx, e.ecx]);
            if vendor != live.vendor {
                differ(format!(
                    "vendor (CPUID.0x0): running {:?}, probe {vendor:?}",
                    live.vendor
                ));
            }
            if u64::from(e.eax) != live.level {
                differ(format!(
                    "level (CPUID.0x0:EAX): running {:#x}, probe {:#x}",
                    live.level, e.eax
                ));
            }
        }
        None => differ("vendor, level (CPUID.0x0): the probe has no leaf 0".to_string()),
    }
    // QEMU answers extended leaves only when xlevel declares them.
    let has_extended = live.xlevel >= 0x8000_0000;
    if has_extended {
        match table.get(0x8000_0000, 0) {
            Some(e) if u64::from(e.eax) == live.xlevel => {}
            Some(e) => differ(format!(
                "xlevel (CPUID.0x80000000:EAX): running {:#x}, probe {:#x}",
                live.xlevel, e.eax
            )),
            None => differ(format!(
                "xlevel (CPUID.0x80000000:EAX): running {:#x}, the probe has no leaf 0x80000000",
                live.xlevel
            )),
        }
    }
    match table.get(1, 0) {
        Some(e) => {
            let probe = (
                qemu_family(e.eax),
                qemu_model(e.eax),
                u64::from(e.eax & 0xf),
            );
            let running = (live.family, live.model, live.stepping);
            if probe != running {
                differ(format!(
                    "family/model/stepping (CPUID.0x1:EAX): running {}/{}/{}, probe {}/{}/{}",
                    running.0, running.1, running.2, probe.0, probe.1, probe.2
                ));
            }
        }
        None => differ("family/model/stepping (CPUID.0x1): the probe has no leaf 1".to_string()),
    }
    if live.xlevel >= 0x8000_0004 {
        let regs: Option<Vec<u32>> = (0x8000_0002..=0x8000_0004)
            .map(|leaf| table.get(leaf, 0).map(|e| [e.eax, e.ebx, e.ecx, e.edx]))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        match regs {
            Some(regs) => {
                let brand = regs_text(&regs);
                if brand != live.model_id {
                    differ(format!(
                        "model-id (CPUID.0x80000002-4): running {:?}, probe {brand:?}",
                        live.model_id
                    ));
                }
            }
            None => differ(format!(
                "model-id (CPUID.0x80000002-4): running {:?}, the probe has no brand leaves",
                live.model_id
            )),
        }
    }
    let level = u32::try_from(live.level).unwrap_or(u32::MAX);
    let xlevel = u32::try_from(live.xlevel).unwrap_or(u32::MAX);
    let words: &[FeatureWord] = if compare_words {
        &live.feature_words
    } else {
        &[]
    };
    for word in words {
        let subleaf = word.subleaf.unwrap_or(0);
        // Leaves past the declared maximum are never answered with the word's bits.
        let visible = match word.leaf {
            l if l < 0x4000_0000 => l <= level,
            l if (0x8000_0000..0xc000_0000).contains(&l) => has_extended && l <= xlevel,
            // Hypervisor and Centaur ranges: QEMU declares them by other means; the probe read
            // them when they were declared.
            _ => true,
        };
        if !visible {
            continue;
        }
        let ignored = X86_GUEST_STATE_BITS
            .iter()
            .filter(|(l, s, r, _)| *l == word.leaf && *s == subleaf && *r == word.register)
            .fold(0u32, |acc, (_, _, _, bits)| acc | bits);
        // A leaf the probe did not read is one the guest was not shown: all zeros.
        let probe = table
            .get(word.leaf, subleaf)
            .map(|e| e.reg(word.register))
            .unwrap_or(0);
        let diff = (probe ^ word.bits) & !ignored;
        for bit in 0..32u8 {
            if diff & (1 << bit) == 0 {
                continue;
            }
            let name = bit_text(features, word.leaf, subleaf, word.register, bit);
            let (running, probed) = if word.bits & (1 << bit) != 0 {
                ("has it", "lacks it")
            } else {
                ("lacks it", "has it")
            };
            differ(format!(
                "{name}: the running vCPU {running}, the probe {probed}"
            ));
        }
    }
    let probe_filtered: Vec<(u32, Register, u8)> = probe_filtered
        .iter()
        .filter_map(|l| filtered_location(l))
        .collect();
    let filtered: &[FeatureWord] = if compare_words { &live.filtered } else { &[] };
    for word in filtered {
        for bit in 0..32u8 {
            if word.bits & (1 << bit) != 0
                && !probe_filtered.contains(&(word.leaf, word.register, bit))
            {
                let subleaf = word.subleaf.unwrap_or(0);
                out.notes.push(format!(
                    "the running QEMU filtered {} (the host lacks it), the probe's did not",
                    bit_text(features, word.leaf, subleaf, word.register, bit)
                ));
            }
        }
    }
    out
}

/// A 4-bit ID-register field.
fn field(value: u64, shift: u32) -> u64 {
    (value >> shift) & 0xf
}

/// One aarch64 CPU property and the 4-bit ID-register field that says the same to the guest.
struct ArmFlag {
    property: &'static str,
    running: Option<bool>,
    register: &'static str,
    name: &'static str,
    shift: u32,
    /// Whether the field's value means the property is on.
    present: fn(u64) -> bool,
}

impl ArmFlag {
    fn new(
        property: &'static str,
        running: Option<bool>,
        register: &'static str,
        name: &'static str,
        shift: u32,
        present: fn(u64) -> bool,
    ) -> ArmFlag {
        ArmFlag {
            property,
            running,
            register,
            name,
            shift,
            present,
        }
    }
}

fn compare_aarch64(live: &ArmVcpu, table: &ArmIdTable) -> CrossCheck {
    let mut out = CrossCheck {
        differences: Vec::new(),
        notes: Vec::new(),
        words_compared: true,
    };
    if let (Some(running), Some(probe)) = (live.midr, table.get("MIDR_EL1")) {
        if running != probe {
            out.differences.push(format!(
                "midr (MIDR_EL1): running {running:#x}, probe {probe:#x}"
            ));
        }
    }
    let checks = [
        ArmFlag::new("sve", live.sve, "ID_AA64PFR0_EL1", "SVE", 32, |v| v != 0),
        ArmFlag::new("sme", live.sme, "ID_AA64PFR1_EL1", "SME", 24, |v| v != 0),
        // PMUVer 0xf is an IMPLEMENTATION DEFINED PMU, not the architected one QEMU offers.
        ArmFlag::new("pmu", live.pmu, "ID_AA64DFR0_EL1", "PMUVer", 8, |v| {
            v != 0 && v != 0xf
        }),
        // FP and AdvSIMD say "not implemented" with 0xf.
        ArmFlag::new("vfp", live.vfp, "ID_AA64PFR0_EL1", "FP", 16, |v| v != 0xf),
        ArmFlag::new("neon", live.neon, "ID_AA64PFR0_EL1", "AdvSIMD", 20, |v| {
            v != 0xf
        }),
    ];
    for ArmFlag {
        property,
        running,
        register,
        name,
        shift,
        present,
    } in checks
    {
        let (Some(running), Some(value)) = (running, table.get(register)) else {
            continue;
        };
        let probed = present(field(value, shift));
        if probed != running {
            let on = |b: bool| if b { "on" } else { "off" };
            out.differences.push(format!(
                "{property} ({register}.{name}): running {}, probe {} ({name}={:#x})",
                on(running),
                on(probed),
                field(value, shift)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::HostFacts;

    /// A captured fixture: the QMP exchanges and the probe of the same configuration.
    struct Capture {
        exchanges: Vec<(String, String)>,
        probe: Fingerprint,
    }

    fn capture(text: &str) -> Capture {
        let v: Value = serde_json::from_str(text).unwrap();
        let exchanges = v["exchanges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_str().unwrap().to_string(),
                    e[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let raw = &v["probe"]["raw"];
        let view: GuestView = if raw.get("entries").is_some() {
            let mut t: CpuidTable = serde_json::from_value(raw.clone()).unwrap();
            t.canonicalize();
            GuestView::X86(t)
        } else {
            GuestView::Aarch64(serde_json::from_value(raw.clone()).unwrap())
        };
        let mut probe = Fingerprint::new(HostFacts::default(), Value::Null, view);
        probe.filtered = serde_json::from_value(v["probe"]["filtered"].clone()).unwrap();
        Capture { exchanges, probe }
    }

    /// Answers each command with the captured reply to the same command (the vCPU path is the
    /// same in every capture).
    fn replay(c: &Capture) -> impl FnMut(&str) -> Result<String, String> + '_ {
        move |command: &str| {
            let want: Value = serde_json::from_str(command).unwrap();
            c.exchanges
                .iter()
                .find(|(sent, _)| serde_json::from_str::<Value>(sent).unwrap() == want)
                .map(|(_, reply)| reply.clone())
                .ok_or_else(|| format!("no captured reply to {command}"))
        }
    }

    fn live_of(c: &Capture) -> LiveVcpu {
        read(&mut replay(c)).unwrap()
    }

    const TCG_QEMU64: &str = include_str!("../tests/fixtures/live_vcpu/x86-tcg-qemu64.json");
    const TCG_HASWELL: &str = include_str!("../tests/fixtures/live_vcpu/x86-tcg-haswell.json");
    const KVM_QEMU64: &str = include_str!("../tests/fixtures/live_vcpu/x86-kvm-qemu64.json");
    const ARM_MAX: &str = include_str!("../tests/fixtures/live_vcpu/arm-tcg-max.json");
    const ARM_A57: &str = include_str!("../tests/fixtures/live_vcpu/arm-tcg-a57.json");

    fn features() -> FeatureMap {
        FeatureMap::load_default().expect("libvirt's cpu_map is installed (libvirt-daemon)")
    }

    #[test]
    fn reads_the_x86_properties_qemu_reports() {
        let c = capture(TCG_HASWELL);
        let LiveVcpu::X86(v) = live_of(&c) else {
            panic!("not x86")
        };
        assert_eq!((v.family, v.model, v.stepping), (6, 60, 1));
        assert_eq!(v.vendor, "GenuineIntel");
        assert_eq!(v.model_id, "Intel Core Processor (Haswell, no TSX)");
        assert_eq!((v.level, v.xlevel), (0xd, 0x8000_0008));
        let leaf7 = v
            .feature_words
            .iter()
            .find(|w| w.leaf == 7 && w.subleaf == Some(0) && w.register == Register::Ebx)
            .unwrap();
        assert_eq!(leaf7.bits, 937);
        // TCG lacks invpcid (CPUID.07H:EBX bit 10): QEMU says so in filtered-features.
        let filtered7 = v
            .filtered
            .iter()
            .find(|w| w.leaf == 7 && w.register == Register::Ebx)
            .unwrap();
        assert_eq!(filtered7.bits, 1 << 10);
    }

    #[test]
    fn a_consistent_tcg_guest_agrees_with_its_probe() {
        for text in [TCG_QEMU64, TCG_HASWELL] {
            let c = capture(text);
            let check = compare(&live_of(&c), &c.probe, Some(&features()));
            assert!(check.agrees(), "{:?}", check.differences);
            assert!(check.notes.is_empty(), "{:?}", check.notes);
        }
    }

    #[test]
    fn a_feature_the_running_vcpu_lacks_is_named_with_its_bit() {
        let c = capture(TCG_QEMU64);
        let LiveVcpu::X86(mut v) = live_of(&c) else {
            panic!("not x86")
        };
        // What a wrapper adding `-cpu …,-pni` does to the running guest.
        for w in &mut v.feature_words {
            if w.leaf == 1 && w.register == Register::Ecx {
                w.bits &= !1;
            }
        }
        let check = compare(&LiveVcpu::X86(v), &c.probe, Some(&features()));
        assert_eq!(
            check.differences,
            vec!["pni (CPUID.0x1:ECX[0]): the running vCPU lacks it, the probe has it"]
        );
    }

    #[test]
    fn identity_properties_are_compared() {
        let c = capture(TCG_QEMU64);
        let LiveVcpu::X86(mut v) = live_of(&c) else {
            panic!("not x86")
        };
        v.model_id = "Other CPU".into();
        v.vendor = "GenuineIntel".into();
        v.stepping = 3;
        v.level = 7;
        let check = compare(&LiveVcpu::X86(v), &c.probe, None);
        let text = check.differences.join("\n");
        assert!(text.contains(r#"model-id (CPUID.0x80000002-4): running "Other CPU", probe "QEMU Virtual CPU version 2.5+""#), "{text}");
        assert!(
            text.contains(r#"vendor (CPUID.0x0): running "GenuineIntel", probe "AuthenticAMD""#),
            "{text}"
        );
        assert!(
            text.contains(
                "family/model/stepping (CPUID.0x1:EAX): running 15/107/3, probe 15/107/1"
            ),
            "{text}"
        );
        assert!(
            text.contains("level (CPUID.0x0:EAX): running 0x7, probe 0xd"),
            "{text}"
        );
    }

    #[test]
    fn guest_state_bits_and_undeclared_leaves_are_not_differences() {
        let c = capture(TCG_HASWELL);
        let LiveVcpu::X86(mut v) = live_of(&c) else {
            panic!("not x86")
        };
        for w in &mut v.feature_words {
            // OSXSAVE mirrors CR4: never a difference.
            if w.leaf == 1 && w.register == Register::Ecx {
                w.bits ^= 1 << 27;
            }
            // Leaf 0x14 is past level 0xd: the guest never sees it.
            if w.leaf == 0x14 {
                w.bits = 0xffff;
            }
        }
        let check = compare(&LiveVcpu::X86(v), &c.probe, None);
        assert!(check.agrees(), "{:?}", check.differences);
    }

    #[test]
    fn bits_in_a_leaf_the_probe_did_not_read_are_differences() {
        let c = capture(TCG_QEMU64);
        let LiveVcpu::X86(mut v) = live_of(&c) else {
            panic!("not x86")
        };
        // CPUID.7.1:EAX is within level 0xd, but the probe's guest was not shown it.
        for w in &mut v.feature_words {
            if w.leaf == 7 && w.subleaf == Some(1) {
                w.bits = 1 << 4;
            }
        }
        let check = compare(&LiveVcpu::X86(v), &c.probe, Some(&features()));
        assert_eq!(
            check.differences,
            vec!["avx-vnni (CPUID.0x7.1:EAX[4]): the running vCPU has it, the probe lacks it"]
        );
    }

    #[test]
    fn a_feature_only_the_running_qemu_filtered_is_a_note() {
        let c = capture(TCG_HASWELL);
        let mut probe = c.probe.clone();
        probe.filtered.retain(|l| !l.starts_with("invpcid:"));
        let check = compare(&live_of(&c), &probe, Some(&features()));
        assert!(check.agrees());
        assert_eq!(
            check.notes,
            vec!["the running QEMU filtered invpcid (CPUID.0x7.0:EBX[10]) (the host lacks it), the probe's did not"]
        );
    }

    /// Captured under this machine's paravirtualized KVM (kvm_pvm), where guest code reads the
    /// host's CPUID whatever `-cpu` says: the probe saw the host's bits, not the configured
    /// qemu64. The cross-check is what notices.
    #[test]
    fn a_guest_that_sees_other_bits_than_its_qemu_configured_is_caught() {
        let c = capture(KVM_QEMU64);
        let check = compare(&live_of(&c), &c.probe, Some(&features()));
        let text = check.differences.join("\n");
        assert!(
            text.contains("avx2 (CPUID.0x7.0:EBX[5]): the running vCPU lacks it, the probe has it"),
            "{text}"
        );
        assert!(
            text.contains("pni (CPUID.0x1:ECX[0]): the running vCPU lacks it, the probe has it"),
            "{text}"
        );
    }

    /// The same capture, with the probe's user-mode pass showing what it showed on this machine:
    /// guest applications read other CPUID values than the kernel. The words are then not
    /// compared (no guest of this host sees QEMU's configuration); the identity still is.
    #[test]
    fn a_host_that_does_not_enforce_cpuid_compares_the_identity_only() {
        let c = capture(KVM_QEMU64);
        let mut probe = c.probe.clone();
        probe.user_mode = Some(crate::fingerprint::UserModeCpuid {
            compared: vec![(1, 0)],
            differing: vec![crate::fingerprint::UserModeDifference {
                leaf: 1,
                subleaf: 0,
                kernel: [0x60fb1, 0x800, 0xf6f8_3203, 0x178b_fbff],
                user: [0xb0_0f21, 0x2_0800, 0xfffa_3203, 0x178b_fbff],
            }],
        });
        let check = compare(&live_of(&c), &probe, None);
        assert!(check.agrees(), "{:?}", check.differences);
        assert!(!check.words_compared);
        let LiveVcpu::X86(mut v) = live_of(&c) else {
            panic!("not x86")
        };
        v.model_id = "Wrapped CPU".into();
        let check = compare(&LiveVcpu::X86(v), &probe, None);
        assert_eq!(check.differences.len(), 1, "{:?}", check.differences);
    }

    #[test]
    fn aarch64_properties_agree_with_the_probes_id_registers() {
        for text in [ARM_MAX, ARM_A57] {
            let c = capture(text);
            let check = compare(&live_of(&c), &c.probe, None);
            assert!(check.agrees(), "{:?}", check.differences);
        }
        let c = capture(ARM_A57);
        let LiveVcpu::Aarch64(v) = live_of(&c) else {
            panic!("not aarch64")
        };
        // cortex-a57 has no sve/sme property in QEMU 7.2: nothing to compare there.
        assert_eq!(v.sve, None);
        assert_eq!(v.midr, Some(0x411f_d070));
    }

    #[test]
    fn aarch64_differences_name_the_register_field() {
        let c = capture(ARM_MAX);
        let LiveVcpu::Aarch64(mut v) = live_of(&c) else {
            panic!("not aarch64")
        };
        v.pmu = Some(false);
        v.midr = Some(0x410f_d070);
        let check = compare(&LiveVcpu::Aarch64(v), &c.probe, None);
        assert_eq!(
            check.differences,
            vec![
                "midr (MIDR_EL1): running 0x410fd070, probe 0xf0510",
                "pmu (ID_AA64DFR0_EL1.PMUVer): running off, probe on (PMUVer=0x6)",
            ]
        );
    }

    #[test]
    fn monitor_errors_and_bad_replies_are_one_line_errors() {
        let mut failing = |_: &str| Err::<String, String>("monitor closed".into());
        assert_eq!(
            read(&mut failing).unwrap_err(),
            "query-cpus-fast: monitor closed"
        );
        let mut garbage = |_: &str| Ok::<String, String>("{\"return\": 5}".into());
        assert_eq!(
            read(&mut garbage).unwrap_err(),
            "query-cpus-fast: no vCPU in the reply"
        );
        let c = capture(TCG_QEMU64);
        let mut replay = replay(&c);
        let mut missing = |cmd: &str| {
            if cmd.contains("\"model-id\"") {
                Ok(r#"{"error": {"class": "GenericError", "desc": "Property 'x.model-id' not found"}}"#.to_string())
            } else {
                replay(cmd)
            }
        };
        assert_eq!(
            read(&mut missing).unwrap_err(),
            "qom-get model-id: Property 'x.model-id' not found"
        );
    }
}
