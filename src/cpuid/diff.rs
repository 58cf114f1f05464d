//! Explaining how two CPUID tables differ, in the terms an operator uses.
//!
//! Feature bits are named with libvirt's names (the ones written in domain XML); other fields
//! (vendor, family/model/stepping, brand string, maximum leaves, caches) are decoded into words;
//! anything else is shown as the raw register. Side A is the migration source, side B the
//! destination: a feature A has and B lacks is *lost* by the guest when it moves.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::features::{leaf_has_subleaves, msr_name, register_name, FeatureBit, FeatureMap};
use super::normalize::{normalize, standard_masks};
use super::table::{CpuidEntry, CpuidTable, Register};

const REGISTERS: [Register; 4] = [Register::Eax, Register::Ebx, Register::Ecx, Register::Edx];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Present on A (source), missing on B (destination).
    Lost,
    /// Missing on A, present on B.
    Gained,
}

/// A named feature bit that differs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureChange {
    /// libvirt's name.
    pub name: String,
    #[serde(flatten)]
    pub location: FeatureBit,
    pub side: Side,
}

impl fmt::Display for FeatureChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.side {
            Side::Lost => "lost",
            Side::Gained => "gained",
        };
        write!(f, "{side}: {} ({})", self.name, self.location)
    }
}

/// A difference outside named feature bits, described in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// What differs, e.g. `family/model/stepping` or `leaf 0x6.0 EAX`.
    pub field: String,
    /// Where it is read, e.g. `CPUID.0x1:EAX`, when `field` does not already say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Value on side A (source).
    pub a: String,
    /// Value on side B (destination).
    pub b: String,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.field)?;
        if let Some(location) = &self.location {
            write!(f, " ({location})")?;
        }
        write!(f, ": {} -> {}", self.a, self.b)
    }
}

/// Everything that differs between A (source) and B (destination).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub lost: Vec<FeatureChange>,
    pub gained: Vec<FeatureChange>,
    pub fields: Vec<FieldChange>,
    /// Differences under informational masks: reported, never a reason to refuse.
    pub informational: Vec<FieldChange>,
}

impl Diff {
    /// True when a guest could not tell A from B (informational differences aside).
    pub fn is_equivalent(&self) -> bool {
        self.lost.is_empty() && self.gained.is_empty() && self.fields.is_empty()
    }
}

impl fmt::Display for Diff {
    /// One line per difference: `lost: vmx (CPUID.0x1:ECX[5])`, `changed: ...`,
    /// `informational: ...`; `equivalent` first when nothing but informational lines follow.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_equivalent() {
            writeln!(f, "equivalent")?;
        }
        for change in self.lost.iter().chain(&self.gained) {
            writeln!(f, "{change}")?;
        }
        for field in &self.fields {
            writeln!(f, "changed: {field}")?;
        }
        for field in &self.informational {
            writeln!(f, "informational: {field}")?;
        }
        Ok(())
    }
}

/// Compares two raw tables (A = source, B = destination): both are normalized first, and the
/// values under informational masks are compared raw and listed apart. Passing tables that are
/// already normalized works, but then informational differences are no longer visible.
pub fn diff(a: &CpuidTable, b: &CpuidTable, features: &FeatureMap) -> Diff {
    let (na, _) = normalize(a);
    let (nb, _) = normalize(b);
    let mut out = diff_normalized(&na, &nb, features);
    out.informational = informational(a, b);
    out
}

/// Compares two normalized tables (no informational section).
pub fn diff_normalized(a: &CpuidTable, b: &CpuidTable, features: &FeatureMap) -> Diff {
    let mut a = a.clone();
    let mut b = b.clone();
    a.canonicalize();
    b.canonicalize();
    let mut out = Diff::default();
    let mut described: BTreeSet<String> = BTreeSet::new();

    let keys: BTreeSet<(u32, u32)> = a
        .entries
        .iter()
        .chain(&b.entries)
        .map(|e| (e.leaf, e.subleaf))
        .collect();
    for (leaf, subleaf) in keys {
        let ea = a.get(leaf, subleaf);
        let eb = b.get(leaf, subleaf);
        for register in REGISTERS {
            let va = ea.map_or(0, |e| e.reg(register));
            let vb = eb.map_or(0, |e| e.reg(register));
            let changed = va ^ vb;
            if changed == 0 {
                continue;
            }
            let mut unnamed = 0u32;
            for bit in 0..32u8 {
                if changed & (1 << bit) == 0 {
                    continue;
                }
                let location = FeatureBit::Cpuid {
                    leaf,
                    subleaf,
                    register,
                    bit,
                };
                let named = features.at(&location);
                if named.is_empty() {
                    unnamed |= 1 << bit;
                }
                for feature in named {
                    push_feature(&mut out, &feature.name, location, va & (1 << bit) != 0);
                }
            }
            if unnamed != 0 {
                if let Some(field) = describe_field(&a, &b, leaf, subleaf, register, unnamed) {
                    // Fields spanning several registers or leaves (vendor, brand) appear once.
                    if described.insert(field.to_string()) {
                        out.fields.push(field);
                    }
                }
            }
        }
    }

    let indices: BTreeSet<u32> = a.msrs.iter().chain(&b.msrs).map(|m| m.index).collect();
    for index in indices {
        let va = a.msr(index);
        let vb = b.msr(index);
        let changed = va.unwrap_or(0) ^ vb.unwrap_or(0);
        let mut unnamed = 0u64;
        for bit in 0..64u8 {
            if changed & (1 << bit) == 0 {
                continue;
            }
            let location = FeatureBit::Msr { index, bit };
            let named = features.at(&location);
            if named.is_empty() {
                unnamed |= 1 << bit;
            }
            for feature in named {
                push_feature(
                    &mut out,
                    &feature.name,
                    location,
                    va.unwrap_or(0) & (1 << bit) != 0,
                );
            }
        }
        if unnamed != 0 || va.is_some() != vb.is_some() {
            out.fields.push(FieldChange {
                field: match msr_name(index) {
                    Some(name) => format!("MSR {index:#x} {name}"),
                    None => format!("MSR {index:#x}"),
                },
                location: None,
                a: va.map_or_else(|| "(not readable)".to_string(), |v| format!("{v:#018x}")),
                b: vb.map_or_else(|| "(not readable)".to_string(), |v| format!("{v:#018x}")),
            });
        }
    }
    // Table order, so lines read like the dump they come from.
    out.lost
        .sort_by(|x, y| (x.location, &x.name).cmp(&(y.location, &y.name)));
    out.gained
        .sort_by(|x, y| (x.location, &x.name).cmp(&(y.location, &y.name)));
    out
}

fn push_feature(out: &mut Diff, name: &str, location: FeatureBit, on_a: bool) {
    let side = if on_a { Side::Lost } else { Side::Gained };
    let change = FeatureChange {
        name: name.to_string(),
        location,
        side,
    };
    match side {
        Side::Lost => out.lost.push(change),
        Side::Gained => out.gained.push(change),
    }
}

/// Differences under informational masks, compared on the raw tables.
fn informational(a: &CpuidTable, b: &CpuidTable) -> Vec<FieldChange> {
    let mut a = a.clone();
    let mut b = b.clone();
    a.canonicalize();
    b.canonicalize();
    let keys: BTreeSet<(u32, u32)> = a
        .entries
        .iter()
        .chain(&b.entries)
        .map(|e| (e.leaf, e.subleaf))
        .collect();
    let mut out = Vec::new();
    for mask in standard_masks().iter().filter(|m| m.informational) {
        for &(leaf, subleaf) in keys.iter().filter(|(l, s)| mask.applies_to(*l, *s)) {
            let va = a
                .get(leaf, subleaf)
                .map(|e| e.reg(mask.register) & mask.bits);
            let vb = b
                .get(leaf, subleaf)
                .map(|e| e.reg(mask.register) & mask.bits);
            if va == vb {
                continue;
            }
            let (field, unit) = match (leaf, mask.register) {
                (0x4000_0010, Register::Eax) => ("TSC frequency".to_string(), " kHz"),
                (0x4000_0010, Register::Ebx) => ("APIC bus frequency".to_string(), " kHz"),
                _ => (format!("bits {:#010x}", mask.bits), ""),
            };
            let show =
                |v: Option<u32>| v.map_or_else(|| "(absent)".to_string(), |v| format!("{v}{unit}"));
            out.push(FieldChange {
                field,
                location: Some(cpuid_location(leaf, subleaf, mask.register)),
                a: show(va),
                b: show(vb),
            });
        }
    }
    out
}

/// `CPUID.0x1:EAX`, `CPUID.0x4.2:EAX`.
fn cpuid_location(leaf: u32, subleaf: u32, register: Register) -> String {
    if subleaf != 0 || leaf_has_subleaves(leaf) {
        format!("CPUID.{leaf:#x}.{subleaf}:{}", register_name(register))
    } else {
        format!("CPUID.{leaf:#x}:{}", register_name(register))
    }
}

fn leaf_location(leaf: u32, subleaf: u32) -> String {
    if subleaf != 0 || leaf_has_subleaves(leaf) {
        format!("CPUID.{leaf:#x}.{subleaf}")
    } else {
        format!("CPUID.{leaf:#x}")
    }
}

/// Words for a difference in bits no feature names.
fn describe_field(
    a: &CpuidTable,
    b: &CpuidTable,
    leaf: u32,
    subleaf: u32,
    register: Register,
    unnamed: u32,
) -> Option<FieldChange> {
    let ea = a.get(leaf, subleaf);
    let eb = b.get(leaf, subleaf);
    let field = |field: &str, location: String, da: String, db: String| {
        Some(FieldChange {
            field: field.to_string(),
            location: Some(location),
            a: da,
            b: db,
        })
    };
    // Decodes one side, or says the leaf is not there.
    let both = |decode: &dyn Fn(&CpuidEntry) -> String| {
        let show = |e: Option<&CpuidEntry>| e.map_or_else(|| "(absent)".to_string(), decode);
        (show(ea), show(eb))
    };
    match (leaf, register) {
        (0x0, Register::Eax) => {
            let (da, db) = both(&|e| format!("{:#x}", e.eax));
            field("maximum basic leaf", cpuid_location(0, 0, register), da, db)
        }
        (0x0, _) => {
            let (da, db) = both(&|e| vendor(e.ebx, e.edx, e.ecx));
            field("vendor", "CPUID.0x0:EBX,EDX,ECX".to_string(), da, db)
        }
        (0x8000_0000, Register::Eax) => {
            let (da, db) = both(&|e| format!("{:#x}", e.eax));
            field(
                "maximum extended leaf",
                cpuid_location(leaf, 0, register),
                da,
                db,
            )
        }
        (0x8000_0000, _) => {
            let (da, db) = both(&|e| vendor(e.ebx, e.edx, e.ecx));
            field(
                "vendor (extended leaf)",
                "CPUID.0x80000000:EBX,EDX,ECX".to_string(),
                da,
                db,
            )
        }
        (0x4000_0000, Register::Eax) => {
            let (da, db) = both(&|e| format!("{:#x}", e.eax));
            field(
                "maximum hypervisor leaf",
                cpuid_location(leaf, 0, register),
                da,
                db,
            )
        }
        (0x4000_0000, _) => {
            let (da, db) = both(&|e| vendor(e.ebx, e.ecx, e.edx));
            field(
                "hypervisor signature",
                "CPUID.0x40000000:EBX,ECX,EDX".to_string(),
                da,
                db,
            )
        }
        (0x4000_0001 | 0x4000_0101, Register::Eax)
            if is_kvm(a, leaf - 1) || is_kvm(b, leaf - 1) =>
        {
            let (da, db) = both(&|e| kvm_features(e.eax));
            field(
                "KVM paravirtual features",
                cpuid_location(leaf, 0, register),
                da,
                db,
            )
        }
        (0x1, Register::Eax) => {
            let (da, db) = both(&|e| family_model_stepping(e.eax));
            field(
                "family/model/stepping",
                cpuid_location(1, 0, register),
                da,
                db,
            )
        }
        (0x8000_0002..=0x8000_0004, _) => field(
            "brand string",
            "CPUID.0x80000002-0x80000004".to_string(),
            brand(a),
            brand(b),
        ),
        (0x2, _) => {
            let (da, db) =
                both(&|e| format!("{:08x} {:08x} {:08x} {:08x}", e.eax, e.ebx, e.ecx, e.edx));
            field("cache and TLB descriptors", "CPUID.0x2".to_string(), da, db)
        }
        (0x4, _) | (0x8000_001d, _) => {
            let (da, db) = both(&deterministic_cache);
            field("cache parameters", leaf_location(leaf, subleaf), da, db)
        }
        (0x8000_0005, Register::Ecx) => {
            let (da, db) = both(&|e| amd_l1_cache(e.ecx));
            field("L1 data cache", cpuid_location(leaf, 0, register), da, db)
        }
        (0x8000_0005, Register::Edx) => {
            let (da, db) = both(&|e| amd_l1_cache(e.edx));
            field(
                "L1 instruction cache",
                cpuid_location(leaf, 0, register),
                da,
                db,
            )
        }
        (0x8000_0006, Register::Ecx) => {
            let (da, db) = both(&|e| amd_l2_cache(e.ecx));
            field("L2 cache", cpuid_location(leaf, 0, register), da, db)
        }
        (0x8000_0006, Register::Edx) => {
            let (da, db) = both(&|e| amd_l3_cache(e.edx));
            field("L3 cache", cpuid_location(leaf, 0, register), da, db)
        }
        (0x8000_0005 | 0x8000_0006, _) => {
            let (da, db) = both(&|e| format!("{:#010x}", e.reg(register)));
            field("TLB description", cpuid_location(leaf, 0, register), da, db)
        }
        _ => {
            let register_value = |e: &CpuidEntry| format!("{:#010x}", e.reg(register));
            let (da, db) = both(&register_value);
            let whole = ea.map_or(0, |e| e.reg(register)) ^ eb.map_or(0, |e| e.reg(register));
            let name = if whole == unnamed {
                format!("leaf {leaf:#x}.{subleaf} {}", register_name(register))
            } else {
                // Some bits of this register were reported by name already.
                format!(
                    "leaf {leaf:#x}.{subleaf} {} bits without a libvirt name {:#010x}",
                    register_name(register),
                    unnamed
                )
            };
            Some(FieldChange {
                field: name,
                location: None,
                a: da,
                b: db,
            })
        }
    }
}

/// QEMU's names for the bits of KVM's feature leaf (CPUID.0x40000001:EAX, target/i386/cpu.c
/// `FEAT_KVM`); libvirt's CPU map does not name them.
const KVM_FEATURE_NAMES: [(u8, &str); 16] = [
    (0, "kvmclock"),
    (1, "kvm-nopiodelay"),
    (2, "kvm-mmu"),
    (3, "kvmclock2"),
    (4, "kvm-asyncpf"),
    (5, "kvm-steal-time"),
    (6, "kvm-pv-eoi"),
    (7, "kvm-pv-unhalt"),
    (9, "kvm-pv-tlb-flush"),
    (10, "kvm-asyncpf-vmexit"),
    (11, "kvm-pv-ipi"),
    (12, "kvm-poll-control"),
    (13, "kvm-pv-sched-yield"),
    (14, "kvm-asyncpf-int"),
    (15, "kvm-msi-ext-dest-id"),
    (24, "kvmclock-stable-bit"),
];

/// Whether `leaf` carries KVM's signature `KVMKVMKVM\0\0\0` (0x40000000, or 0x40000100 when
/// Hyper-V leaves come first).
fn is_kvm(table: &CpuidTable, leaf: u32) -> bool {
    table
        .get(leaf, 0)
        .is_some_and(|e| (e.ebx, e.ecx, e.edx) == (0x4b4d_564b, 0x564b_4d56, 0x0000_004d))
}

fn kvm_features(eax: u32) -> String {
    let mut names: Vec<String> = Vec::new();
    let mut known = 0u32;
    for (bit, name) in KVM_FEATURE_NAMES {
        known |= 1 << bit;
        if eax & (1 << bit) != 0 {
            names.push(name.to_string());
        }
    }
    for bit in 0..32u8 {
        if eax & !known & (1 << bit) != 0 {
            names.push(format!("bit{bit}"));
        }
    }
    format!("[{}] ({eax:#010x})", names.join(" "))
}

fn ascii(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                char::from(c)
            } else {
                '.'
            }
        })
        .collect()
}

/// The 12-character vendor or signature string held in three registers, in the order given.
fn vendor(first: u32, second: u32, third: u32) -> String {
    let mut bytes = Vec::with_capacity(12);
    for word in [first, second, third] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    format!("'{}'", ascii(&bytes))
}

fn brand(table: &CpuidTable) -> String {
    let mut bytes = Vec::with_capacity(48);
    for leaf in 0x8000_0002..=0x8000_0004u32 {
        let Some(e) = table.get(leaf, 0) else {
            return "(absent)".to_string();
        };
        for word in [e.eax, e.ebx, e.ecx, e.edx] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
    }
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    format!("'{}'", ascii(&bytes[..end]).trim())
}

/// Decodes CPUID.1:EAX the way the SDM defines the displayed family and model.
pub fn family_model_stepping(eax: u32) -> String {
    let stepping = eax & 0xf;
    let model = (eax >> 4) & 0xf;
    let family = (eax >> 8) & 0xf;
    let ext_model = (eax >> 16) & 0xf;
    let ext_family = (eax >> 20) & 0xff;
    let display_family = if family == 0xf {
        family + ext_family
    } else {
        family
    };
    let display_model = if family == 0x6 || family == 0xf {
        (ext_model << 4) | model
    } else {
        model
    };
    format!("family {display_family:#x} model {display_model:#x} stepping {stepping} ({eax:#010x})")
}

/// Leaf 4 / 0x8000001D: one cache level's geometry.
fn deterministic_cache(e: &CpuidEntry) -> String {
    let kind = match e.eax & 0x1f {
        0 => return "no cache".to_string(),
        1 => "data",
        2 => "instruction",
        3 => "unified",
        _ => "unknown-type",
    };
    let level = (e.eax >> 5) & 0x7;
    let sharing = ((e.eax >> 14) & 0xfff) + 1;
    let ways = u64::from((e.ebx >> 22) & 0x3ff) + 1;
    let partitions = u64::from((e.ebx >> 12) & 0x3ff) + 1;
    let line = u64::from(e.ebx & 0xfff) + 1;
    let sets = u64::from(e.ecx) + 1;
    let size = ways * partitions * line * sets;
    format!(
        "L{level} {kind} {}, {ways}-way, {line}-byte lines, {sets} sets, shared by {sharing} threads (eax {:#010x} ebx {:#010x} ecx {:#010x} edx {:#010x})",
        human_size(size),
        e.eax,
        e.ebx,
        e.ecx,
        e.edx
    )
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn amd_l1_cache(reg: u32) -> String {
    format!(
        "{} KiB, associativity {:#x}, {}-byte lines ({reg:#010x})",
        reg >> 24,
        (reg >> 16) & 0xff,
        reg & 0xff
    )
}

fn amd_l2_cache(reg: u32) -> String {
    format!(
        "{} KiB, associativity code {:#x}, {}-byte lines ({reg:#010x})",
        reg >> 16,
        (reg >> 12) & 0xf,
        reg & 0xff
    )
}

fn amd_l3_cache(reg: u32) -> String {
    format!(
        "{} KiB, associativity code {:#x}, {}-byte lines ({reg:#010x})",
        u64::from(reg >> 18) * 512,
        (reg >> 12) & 0xf,
        reg & 0xff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"<cpus>
  <feature name='vme'><cpuid eax_in='0x01' edx='0x00000002'/></feature>
  <feature name='vmx'><cpuid eax_in='0x01' ecx='0x00000020'/></feature>
  <feature name='osxsave'><cpuid eax_in='0x01' ecx='0x08000000'/></feature>
  <feature name='tsc_adjust'><cpuid eax_in='0x07' ecx_in='0x00' ebx='0x00000002'/></feature>
  <feature name='mds-no'><msr index='0x10a' edx='0x00000000' eax='0x00000020'/></feature>
</cpus>"#;

    fn map() -> FeatureMap {
        FeatureMap::parse(MAP, "test map").unwrap()
    }

    fn entry(leaf: u32, subleaf: u32, regs: [u32; 4]) -> CpuidEntry {
        CpuidEntry {
            leaf,
            subleaf,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
        }
    }

    fn base() -> CpuidTable {
        CpuidTable {
            entries: vec![
                entry(0x0, 0, [0xd, 0x756e6547, 0x6c65746e, 0x49656e69]),
                entry(0x1, 0, [0x000306c1, 0x00000800, 0xf7fa3223, 0x078bfbff]),
                entry(0x4, 1, [0x00000122, 0x01c0003f, 0x0000003f, 0]),
                entry(0x7, 0, [0, 0x7ab, 0, 0]),
                entry(0x4000_0010, 0, [0x0027ac40, 0x000f4240, 0, 0]),
                entry(
                    0x8000_0002,
                    0,
                    [0x65746e49, 0x2952286c, 0x6f655820, 0x2952286e],
                ),
                entry(0x8000_0003, 0, [0x55504320, 0, 0, 0]),
                entry(0x8000_0004, 0, [0, 0, 0, 0]),
            ],
            msrs: vec![crate::cpuid::table::MsrEntry {
                index: 0x10a,
                value: 0x20,
            }],
        }
    }

    fn set(table: &mut CpuidTable, leaf: u32, subleaf: u32, f: impl Fn(&mut CpuidEntry)) {
        let e = table
            .entries
            .iter_mut()
            .find(|e| e.leaf == leaf && e.subleaf == subleaf)
            .unwrap();
        f(e);
    }

    #[test]
    fn identical_tables_are_equivalent() {
        let d = diff(&base(), &base(), &map());
        assert!(d.is_equivalent());
        assert!(d.informational.is_empty());
        assert_eq!(d.to_string(), "equivalent\n");
    }

    #[test]
    fn names_lost_and_gained_features_with_locations() {
        let a = base();
        let mut b = base();
        set(&mut b, 1, 0, |e| {
            e.ecx &= !0x20;
            e.edx &= !0x2;
        });
        set(&mut b, 7, 0, |e| e.ebx &= !0x2);
        let mut a2 = a.clone();
        set(&mut a2, 1, 0, |e| e.edx &= !0x2);
        let d = diff(&a2, &b, &map());
        assert!(!d.is_equivalent());
        let lost: Vec<String> = d.lost.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            lost,
            vec![
                "lost: vmx (CPUID.0x1:ECX[5])",
                "lost: tsc_adjust (CPUID.0x7.0:EBX[1])"
            ]
        );
        assert!(d.gained.is_empty());
        assert!(d.fields.is_empty(), "{:?}", d.fields);

        let d = diff(&b, &a, &map());
        let gained: Vec<&str> = d.gained.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(gained, vec!["vmx", "vme", "tsc_adjust"]);
        assert!(d.gained.iter().all(|c| c.side == Side::Gained));
        assert_eq!(
            d.gained[1].location,
            FeatureBit::Cpuid {
                leaf: 1,
                subleaf: 0,
                register: Register::Edx,
                bit: 1
            }
        );
    }

    #[test]
    fn masked_bits_never_differ_but_timing_leaf_is_informational() {
        let a = base();
        let mut b = base();
        set(&mut b, 1, 0, |e| {
            e.ebx |= 0x0500_0000; // another vCPU's APIC ID
            e.ecx |= 1 << 27; // OSXSAVE
        });
        set(&mut b, 0x4000_0010, 0, |e| e.eax = 0x0027ac3d);
        let d = diff(&a, &b, &map());
        assert!(d.is_equivalent(), "{d}");
        assert_eq!(d.informational.len(), 1);
        let info = &d.informational[0];
        assert_eq!(info.field, "TSC frequency");
        assert_eq!(info.a, "2600000 kHz");
        assert_eq!(info.b, "2599997 kHz");
        let text = d.to_string();
        assert!(text.starts_with("equivalent\n"), "{text}");
        assert!(
            text.contains(
                "informational: TSC frequency (CPUID.0x40000010:EAX): 2600000 kHz -> 2599997 kHz"
            ),
            "{text}"
        );
    }

    #[test]
    fn non_feature_fields_are_described_in_words() {
        let a = base();
        let mut b = base();
        set(&mut b, 0, 0, |e| {
            e.eax = 0x10;
            e.ebx = 0x68747541;
            e.ecx = 0x444d4163;
            e.edx = 0x69746e65;
        });
        set(&mut b, 1, 0, |e| e.eax = 0x00a00f11);
        set(&mut b, 4, 1, |e| e.ecx = 0x7f);
        set(&mut b, 0x8000_0003, 0, |e| e.eax = 0x55504321);
        set(&mut b, 7, 0, |e| e.ebx |= 0x40); // bit 6: no libvirt name
        let d = diff(&a, &b, &map());
        let text = d.to_string();
        assert!(
            text.contains("changed: maximum basic leaf (CPUID.0x0:EAX): 0xd -> 0x10"),
            "{text}"
        );
        assert!(
            text.contains(
                "changed: vendor (CPUID.0x0:EBX,EDX,ECX): 'GenuineIntel' -> 'AuthenticAMD'"
            ),
            "{text}"
        );
        assert_eq!(text.matches("vendor").count(), 1, "vendor once: {text}");
        assert!(text.contains("family 0x6 model 0x3c stepping 1"), "{text}");
        assert!(text.contains("family 0x19 model 0x1 stepping 1"), "{text}");
        assert!(text.contains("cache parameters (CPUID.0x4.1)"), "{text}");
        assert!(text.contains("L1 instruction 32 KiB, 8-way"), "{text}");
        assert!(text.contains("L1 instruction 64 KiB, 8-way"), "{text}");
        assert!(text.contains("brand string"), "{text}");
        assert!(
            text.contains("'Intel(R) Xeon(R) CPU' -> 'Intel(R) Xeon(R)!CPU'"),
            "{text}"
        );
        assert!(
            text.contains("changed: leaf 0x7.0 EBX: 0x000007ab -> 0x000007eb"),
            "{text}"
        );
        assert_eq!(d.fields.len(), 6, "{text}");
    }

    #[test]
    fn kvm_leaf_is_decoded_by_qemu_names() {
        let kvm = |eax| {
            let mut t = base();
            t.entries.push(entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d564b, 0x564b4d56, 0x4d],
            ));
            t.entries.push(entry(0x4000_0001, 0, [eax, 0, 0, 0]));
            t
        };
        let d = diff(&kvm(0x0100_00fb), &kvm(0x0100_007b), &map());
        assert_eq!(d.fields.len(), 1, "{d}");
        let f = &d.fields[0];
        assert_eq!(f.field, "KVM paravirtual features");
        assert!(
            f.a.contains("kvm-pv-unhalt") && !f.b.contains("kvm-pv-unhalt"),
            "{d}"
        );
        assert!(f.a.contains("kvmclock-stable-bit"), "{d}");
        // Without KVM's signature the leaf is somebody else's: shown raw.
        let mut a = kvm(1);
        let mut b = kvm(3);
        for t in [&mut a, &mut b] {
            t.entries.retain(|e| e.leaf != 0x4000_0000);
        }
        let d = diff(&a, &b, &map());
        assert_eq!(d.fields[0].field, "leaf 0x40000001.0 EAX", "{d}");
    }

    #[test]
    fn msr_bits_are_named_from_the_map() {
        let a = base();
        let mut b = base();
        b.msrs[0].value = 0x1;
        let d = diff(&a, &b, &map());
        assert_eq!(d.lost.len(), 1);
        assert_eq!(d.lost[0].to_string(), "lost: mds-no (MSR.0x10a[5])");
        assert_eq!(d.fields.len(), 1, "bit 0 has no name in this map");
        assert!(d.fields[0].field.contains("IA32_ARCH_CAPABILITIES"));
        b.msrs.clear();
        let d = diff(&a, &b, &map());
        assert_eq!(d.lost.len(), 1);
        assert!(d.fields[0].b.contains("not readable"));
    }

    #[test]
    fn missing_leaves_count_as_zero_and_are_shown_absent() {
        let a = base();
        let mut b = base();
        b.entries.retain(|e| e.leaf != 7);
        let d = diff(&a, &b, &map());
        assert!(d.lost.iter().any(|c| c.name == "tsc_adjust"));
        assert!(d.fields.iter().any(|f| f.b == "(absent)"), "{d}");
    }

    #[test]
    fn diff_serializes_with_flat_locations() {
        let a = base();
        let mut b = base();
        set(&mut b, 1, 0, |e| e.ecx &= !0x20);
        let d = diff(&a, &b, &map());
        let json = serde_json::to_value(&d).unwrap();
        let lost = &json["lost"][0];
        assert_eq!(lost["name"], "vmx");
        assert_eq!(lost["kind"], "cpuid");
        assert_eq!(lost["leaf"], 1);
        assert_eq!(lost["register"], "ecx");
        assert_eq!(lost["bit"], 5);
        assert_eq!(lost["side"], "lost");
        let back: Diff = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
    }
}
