//! Explaining how two CPUID tables differ, in the terms an operator uses.
//!
//! Feature bits are named with libvirt's names (the ones written in domain XML); other fields
//! (vendor, family/model/stepping, brand string, maximum leaves, caches) are decoded into words;
//! anything else is shown as the raw register. Side A is the migration source, side B the
//! destination: a feature A has and B lacks is *lost* by the guest when it moves.
//!
//! Only leaves inside each side's declared ranges are compared: past a range's maximum (and in a
//! range whose base leaf declares none) Intel CPUs and QEMU answer with the highest basic leaf,
//! an echo that is no leaf of the CPU's. Such echo leaves are listed apart, never as differences.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::features::{
    leaf_has_subleaves, msr_name, register_name, subleaf_text, FeatureBit, FeatureMap,
};
use super::normalize::{normalize, standard_masks};
use super::table::{CpuidEntry, CpuidTable, Register};

const REGISTERS: [Register; 4] = [Register::Eax, Register::Ebx, Register::Ecx, Register::Edx];

/// How many registers one folded `changed:` line names before "and N more".
pub const MAX_FOLDED_NAMES: usize = 16;
/// Which way a named feature bit moves for a guest going from A (source) to B (destination).
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
    /// Where the bit is read (CPUID leaf, sub-leaf, register, bit, or an MSR bit); flattened
    /// into this object in JSON.
    #[serde(flatten)]
    pub location: FeatureBit,
    /// Whether the guest loses or gains the feature by moving from A to B.
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

/// A difference outside named feature bits, described in words, with its numbers for scripts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// What differs, e.g. `family/model/stepping` or `leaf 0x6.0 EAX`.
    pub field: String,
    /// Where it is read, e.g. `CPUID.0x1:EAX`, when `field` does not already say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Value on side A (source), in words.
    pub a: String,
    /// Value on side B (destination), in words.
    pub b: String,
    /// The CPUID leaf whose register differs (the first one, for fields spanning several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf: Option<u32>,
    /// The sub-leaf of `leaf` (ECX input), when the difference is in a CPUID leaf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subleaf: Option<u32>,
    /// The register of `leaf` that differs, when the difference is in a CPUID leaf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<Register>,
    /// The MSR index, for an MSR difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msr: Option<u32>,
    /// The bits of the register (or MSR) that differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u64>,
    /// The whole register (or MSR) on A; absent when the leaf (or MSR) is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a_value: Option<u64>,
    /// The whole register (or MSR) on B; absent when the leaf (or MSR) is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b_value: Option<u64>,
    /// Why these bits are masked (masked and informational differences only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_reason: Option<String>,
}

impl FieldChange {
    /// A register shown raw (no decoding knows it): these are what folding groups.
    fn is_raw(&self) -> bool {
        self.location.is_none() && self.msr.is_none() && self.field.starts_with("leaf ")
    }
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

/// Which side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    /// Side A, the migration source (serialized as `"a"`).
    A,
    /// Side B, the migration destination (serialized as `"b"`).
    B,
}

/// A leaf one side answered outside its declared ranges (an echo, never compared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EchoLeaf {
    /// The side whose probe read this echo.
    pub side: Which,
    /// The CPUID leaf queried, past its range's maximum.
    pub leaf: u32,
    /// The sub-leaf queried (ECX input).
    pub subleaf: u32,
}

/// Everything that differs between A (source) and B (destination).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    /// Named features A has and B lacks: the guest loses them by moving.
    pub lost: Vec<FeatureChange>,
    /// Named features B has and A lacks: the guest gains them by moving.
    pub gained: Vec<FeatureChange>,
    /// Every other unmasked difference (decoded fields, raw registers, MSRs): like a lost or
    /// gained feature, any one makes A and B not equivalent.
    pub fields: Vec<FieldChange>,
    /// Differences under informational masks: reported, never a reason to refuse.
    pub informational: Vec<FieldChange>,
    /// Differences under the other normalization masks (per-vCPU IDs, bits mirroring guest OS
    /// state), each with its mask's reason: never a reason to refuse.
    #[serde(default)]
    pub masked: Vec<FieldChange>,
    /// Leaves outside a side's declared ranges, left out of the comparison.
    #[serde(default)]
    pub echo_leaves: Vec<EchoLeaf>,
}

impl Diff {
    /// True when a guest could not tell A from B (informational differences aside).
    pub fn is_equivalent(&self) -> bool {
        self.lost.is_empty() && self.gained.is_empty() && self.fields.is_empty()
    }

    /// `equivalent: 0 lost, 0 gained, 0 changed, 1 informational, 3 masked` (or `different: …`).
    pub fn summary_line(&self) -> String {
        format!(
            "{}: {} lost, {} gained, {} changed, {} informational, {} masked",
            if self.is_equivalent() {
                "equivalent"
            } else {
                "different"
            },
            self.lost.len(),
            self.gained.len(),
            self.fields.len(),
            self.informational.len(),
            self.masked.len()
        )
    }

    /// The `changed:` lines without their prefix, raw registers with the same values on both
    /// sides folded into one line (`leaf 0x16.0 EAX, leaf 0x20000000.0 EAX: … -> …`).
    pub fn changed_lines(&self) -> Vec<String> {
        // (first index in `out`, a, b) of each raw group already printed.
        let mut raw_groups: Vec<(usize, &str, &str, Vec<&str>)> = Vec::new();
        let mut out: Vec<Option<String>> = Vec::new();
        for field in &self.fields {
            if field.is_raw() {
                if let Some(group) = raw_groups
                    .iter_mut()
                    .find(|g| g.1 == field.a && g.2 == field.b)
                {
                    group.3.push(&field.field);
                    continue;
                }
                raw_groups.push((out.len(), &field.a, &field.b, vec![&field.field]));
                out.push(None);
            } else {
                out.push(Some(field.to_string()));
            }
        }
        for (index, a, b, names) in raw_groups {
            // A folded line stays readable and bounded, however many registers share the values
            // (a hostile stamp can bring thousands).
            let shown = names.len().min(MAX_FOLDED_NAMES);
            let mut list = names[..shown].join(", ");
            if names.len() > shown {
                list.push_str(&format!(" and {} more", names.len() - shown));
            }
            out[index] = Some(format!("{list}: {a} -> {b}"));
        }
        out.into_iter().flatten().collect()
    }

    /// The operator's text: the summary line, one line per difference, then informational
    /// lines; with `verbose`, also the masked differences with their reasons and the echo
    /// leaves left out.
    pub fn render(&self, verbose: bool) -> String {
        let mut out = format!("{}\n", self.summary_line());
        for change in self.lost.iter().chain(&self.gained) {
            out.push_str(&format!("{change}\n"));
        }
        for line in self.changed_lines() {
            out.push_str(&format!("changed: {line}\n"));
        }
        for field in &self.informational {
            out.push_str(&format!("informational: {field}\n"));
        }
        if verbose {
            for field in &self.masked {
                out.push_str(&format!(
                    "masked: {field} ({})\n",
                    field.mask_reason.as_deref().unwrap_or("")
                ));
            }
            for which in [Which::A, Which::B] {
                let leaves: Vec<String> = self
                    .echo_leaves
                    .iter()
                    .filter(|e| e.side == which)
                    .map(|e| format!("{:#x}.{}", e.leaf, subleaf_text(e.subleaf)))
                    .collect();
                if !leaves.is_empty() {
                    out.push_str(&format!(
                        "not compared on {}: {} leaves outside its declared ranges (answered with \
                         the highest basic leaf, not the CPU's): {}\n",
                        if which == Which::A { "A" } else { "B" },
                        leaves.len(),
                        leaves.join(" ")
                    ));
                }
            }
        }
        out
    }
}

impl fmt::Display for Diff {
    /// [`Diff::render`] without the verbose part.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

/// The base leaf of the range `leaf` belongs to: 0x40000000 and 0x40000100 are separate
/// hypervisor ranges (KVM behind Hyper-V's), every other range spans 0x10000 leaves.
fn range_base(leaf: u32) -> u32 {
    if leaf & 0xffff_0000 == 0x4000_0000 {
        leaf & 0xffff_ff00
    } else {
        leaf & 0xffff_0000
    }
}

/// Whether `table` declares `leaf`: its range's base entry names a maximum inside the range and
/// at or above `leaf`. A table without the base entry cannot say: its leaves are compared (never
/// hide a difference for lack of information).
fn declared(table: &CpuidTable, leaf: u32) -> bool {
    let base = range_base(leaf);
    let Some(e) = table.get(base, 0) else {
        return true;
    };
    if base == 0 {
        return leaf <= e.eax;
    }
    let span = if base & 0xffff_0000 == 0x4000_0000 {
        0xff
    } else {
        0xffff
    };
    e.eax >= base && e.eax - base <= span && leaf <= e.eax
}

/// `table` canonicalized without its echo leaves, and those leaves.
fn split_declared(table: &CpuidTable) -> (CpuidTable, Vec<(u32, u32)>) {
    let mut table = table.clone();
    table.canonicalize();
    let mut echoes = Vec::new();
    let mut kept = Vec::with_capacity(table.entries.len());
    for e in &table.entries {
        if declared(&table, e.leaf) {
            kept.push(*e);
        } else {
            echoes.push((e.leaf, e.subleaf));
        }
    }
    table.entries = kept;
    (table, echoes)
}

fn echo_list(a: &[(u32, u32)], b: &[(u32, u32)]) -> Vec<EchoLeaf> {
    let tag = |side| {
        move |&(leaf, subleaf): &(u32, u32)| EchoLeaf {
            side,
            leaf,
            subleaf,
        }
    };
    a.iter()
        .map(tag(Which::A))
        .chain(b.iter().map(tag(Which::B)))
        .collect()
}

/// Compares two raw tables (A = source, B = destination) over their declared ranges: both are
/// normalized first; the values under masks are compared raw and listed apart (informational
/// and masked). Passing tables that are already normalized works, but then those differences
/// are no longer visible.
pub fn diff(a: &CpuidTable, b: &CpuidTable, features: &FeatureMap) -> Diff {
    let (a, echo_a) = split_declared(a);
    let (b, echo_b) = split_declared(b);
    let (na, _) = normalize(&a);
    let (nb, _) = normalize(&b);
    let mut out = compare_tables(&na, &nb, features);
    out.informational = masked_changes(&a, &b, true);
    out.masked = masked_changes(&a, &b, false);
    out.echo_leaves = echo_list(&echo_a, &echo_b);
    out
}

/// Compares two normalized tables over their declared ranges (no informational or masked
/// section).
pub fn diff_normalized(a: &CpuidTable, b: &CpuidTable, features: &FeatureMap) -> Diff {
    let (a, echo_a) = split_declared(a);
    let (b, echo_b) = split_declared(b);
    let mut out = compare_tables(&a, &b, features);
    out.echo_leaves = echo_list(&echo_a, &echo_b);
    out
}

/// Every entry of two canonical tables, bit by bit.
fn compare_tables(a: &CpuidTable, b: &CpuidTable, features: &FeatureMap) -> Diff {
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
                if let Some(mut field) = describe_field(a, b, leaf, subleaf, register, unnamed) {
                    // Fields spanning several registers or leaves (vendor, brand) appear once.
                    if described.insert(field.to_string()) {
                        field.leaf = Some(leaf);
                        field.subleaf = Some(subleaf);
                        field.register = Some(register);
                        field.bits = Some(u64::from(unnamed));
                        field.a_value = ea.map(|e| u64::from(e.reg(register)));
                        field.b_value = eb.map(|e| u64::from(e.reg(register)));
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
                a: va.map_or_else(|| "(not readable)".to_string(), |v| format!("{v:#018x}")),
                b: vb.map_or_else(|| "(not readable)".to_string(), |v| format!("{v:#018x}")),
                msr: Some(index),
                bits: Some(unnamed),
                a_value: va,
                b_value: vb,
                ..FieldChange::default()
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

/// How one side's masked value is written.
type Shown = Box<dyn Fn(u32) -> String>;

/// Differences under the standard masks (`informational` ones, or the others), compared on the
/// raw tables (already limited to their declared ranges).
fn masked_changes(a: &CpuidTable, b: &CpuidTable, informational: bool) -> Vec<FieldChange> {
    let keys: BTreeSet<(u32, u32)> = a
        .entries
        .iter()
        .chain(&b.entries)
        .map(|e| (e.leaf, e.subleaf))
        .collect();
    let mut out = Vec::new();
    for mask in standard_masks()
        .iter()
        .filter(|m| m.informational == informational)
    {
        for &(leaf, subleaf) in keys.iter().filter(|(l, s)| mask.applies_to(*l, *s)) {
            let ra = a.get(leaf, subleaf).map(|e| e.reg(mask.register));
            let rb = b.get(leaf, subleaf).map(|e| e.reg(mask.register));
            let va = ra.map(|v| v & mask.bits);
            let vb = rb.map(|v| v & mask.bits);
            if va == vb {
                continue;
            }
            let location = cpuid_location(leaf, subleaf, mask.register);
            let (field, location, show): (String, Option<String>, Shown) =
                match (leaf, mask.register) {
                    (0x4000_0010, Register::Eax) => (
                        "TSC frequency".to_string(),
                        Some(location),
                        Box::new(|v| format!("{v} kHz")),
                    ),
                    (0x4000_0010, Register::Ebx) => (
                        "APIC bus frequency".to_string(),
                        Some(location),
                        Box::new(|v| format!("{v} kHz")),
                    ),
                    _ if informational => (
                        format!("bits {:#010x}", mask.bits),
                        Some(location),
                        Box::new(|v| v.to_string()),
                    ),
                    _ => (
                        format!("{location} bits {:#010x}", mask.bits),
                        None,
                        Box::new(|v| format!("{v:#010x}")),
                    ),
                };
            let text = |v: Option<u32>| v.map_or_else(|| "(absent)".to_string(), &show);
            out.push(FieldChange {
                field,
                location,
                a: text(va),
                b: text(vb),
                leaf: Some(leaf),
                subleaf: Some(subleaf),
                register: Some(mask.register),
                msr: None,
                bits: Some(u64::from(mask.bits)),
                a_value: ra.map(u64::from),
                b_value: rb.map(u64::from),
                mask_reason: Some(mask.reason.clone()),
            });
        }
    }
    out
}

/// `CPUID.0x1:EAX`, `CPUID.0x4.2:EAX`, `CPUID.0xd.0xb:EAX`.
fn cpuid_location(leaf: u32, subleaf: u32, register: Register) -> String {
    format!(
        "{}:{}",
        leaf_location(leaf, subleaf),
        register_name(register)
    )
}

fn leaf_location(leaf: u32, subleaf: u32) -> String {
    if subleaf != 0 || leaf_has_subleaves(leaf) {
        format!("CPUID.{leaf:#x}.{}", subleaf_text(subleaf))
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
            ..FieldChange::default()
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
            let (da, db) = both(&|e| deterministic_cache(leaf, e));
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
            let sub = subleaf_text(subleaf);
            let name = if whole == unnamed {
                format!("leaf {leaf:#x}.{sub} {}", register_name(register))
            } else {
                // Some bits of this register were reported by name already.
                format!(
                    "leaf {leaf:#x}.{sub} {} bits without a libvirt name {:#010x}",
                    register_name(register),
                    unnamed
                )
            };
            Some(FieldChange {
                field: name,
                a: da,
                b: db,
                ..FieldChange::default()
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
    let end = bytes.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    bytes[..end]
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
    quoted_or_none(&ascii(&bytes))
}

/// `'text'`, or `(none)` for a string that is empty once trailing NULs and blanks are gone (an
/// all-zero vendor would otherwise print as `'............'`).
fn quoted_or_none(text: &str) -> String {
    if text.trim().is_empty() {
        "(none)".to_string()
    } else {
        format!("'{text}'")
    }
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
    quoted_or_none(ascii(&bytes[..end]).trim())
}

/// The SDM's displayed family, model and stepping of CPUID.1:EAX.
pub fn display_family_model_stepping(eax: u32) -> (u32, u32, u32) {
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
    (display_family, display_model, stepping)
}

/// Decodes CPUID.1:EAX the way the SDM defines the displayed family and model.
pub fn family_model_stepping(eax: u32) -> String {
    let (family, model, stepping) = display_family_model_stepping(eax);
    format!("family {family:#x} model {model:#x} stepping {stepping} ({eax:#010x})")
}

/// Leaf 4 / 0x8000001D: one cache level's geometry, every field the SDM (leaf 4) and the APM
/// (0x8000001D) define, so two descriptions read the same only when the registers are the same.
fn deterministic_cache(leaf: u32, e: &CpuidEntry) -> String {
    let raw = format!(
        "eax {:#010x} ebx {:#010x} ecx {:#010x} edx {:#010x}",
        e.eax, e.ebx, e.ecx, e.edx
    );
    let kind = match e.eax & 0x1f {
        0 => return format!("no cache ({raw})"),
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
    let mut words = vec![
        format!("L{level} {kind} {}", human_size(size)),
        if e.eax & (1 << 9) != 0 {
            "fully associative".to_string()
        } else {
            format!("{ways}-way")
        },
        format!("{line}-byte lines"),
        format!(
            "{partitions} partition{}",
            if partitions == 1 { "" } else { "s" }
        ),
        format!("{sets} sets"),
        format!("shared by {sharing} threads"),
    ];
    let top = (e.eax >> 26) & 0x3f;
    if leaf == 0x4 {
        words.push(format!("{} cores per package", top + 1));
    } else if top != 0 {
        words.push(format!("EAX[31:26] {top}"));
    }
    if e.eax & (1 << 8) != 0 {
        words.push("self-initializing".to_string());
    }
    words.push(if e.edx & 1 != 0 {
        "WBINVD not guaranteed on sharers' lower levels".to_string()
    } else {
        "WBINVD acts on lower levels".to_string()
    });
    words.push(
        if e.edx & 2 != 0 {
            "inclusive"
        } else {
            "not inclusive"
        }
        .to_string(),
    );
    if e.edx & 4 != 0 {
        words.push("complex indexing".to_string());
    }
    format!("{} ({raw})", words.join(", "))
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
            msrs: vec![crate::x86_64::table::MsrEntry {
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
        assert_eq!(
            d.to_string(),
            "equivalent: 0 lost, 0 gained, 0 changed, 0 informational, 0 masked\n"
        );
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
        assert!(
            text.starts_with(
                "equivalent: 0 lost, 0 gained, 0 changed, 1 informational, 2 masked\n"
            ),
            "{text}"
        );
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

    /// What Intel CPUs and QEMU answer past a range's maximum: the highest basic leaf.
    fn echo_of(t: &CpuidTable, leaf: u32) -> CpuidEntry {
        let max = t.get(0, 0).unwrap().eax;
        let e = t.entries.iter().rev().find(|e| e.leaf <= max).unwrap();
        entry(leaf, 0, [e.eax, e.ebx, e.ecx, e.edx])
    }

    #[test]
    fn echo_leaves_never_differ_but_declared_leaves_still_do() {
        let mut a = base();
        a.entries
            .push(entry(0x8000_0000, 0, [0x8000_0004, 0, 0, 0]));
        let mut b = a.clone();
        // `cpuid -r` on the guest also asks 0x20000000, 0x40000100, 0x80860000, 0xc0000000 and
        // gets echoes; the probe never asked. A leaf past the basic maximum echoes too.
        for leaf in [0x2000_0000, 0x4000_0100, 0x8086_0000, 0xc000_0000, 0xe] {
            let echo = echo_of(&a, leaf);
            b.entries.push(echo);
        }
        b.entries.push(entry(0x8000_0005, 0, [1, 2, 3, 4])); // past 0x80000004
        let d = diff(&a, &b, &map());
        assert!(d.is_equivalent(), "{d}");
        assert_eq!(d.echo_leaves.len(), 6, "{:?}", d.echo_leaves);
        assert!(d.echo_leaves.iter().all(|e| e.side == Which::B));
        let verbose = d.render(true);
        assert!(
            verbose.contains("not compared on B: 6 leaves outside its declared ranges"),
            "{verbose}"
        );
        assert!(verbose.contains("0x20000000.0"), "{verbose}");
        assert!(
            !d.to_string().contains("not compared"),
            "only with --verbose"
        );

        // A range both sides declare is compared, echo or not on a third range.
        let mut c = b.clone();
        set(&mut c, 0x8000_0003, 0, |e| e.eax ^= 1);
        let d = diff(&a, &c, &map());
        assert!(!d.is_equivalent(), "declared leaves are still compared");
        assert!(d.fields.iter().any(|f| f.field == "brand string"), "{d}");

        // A hypervisor range one side declares and the other does not is a difference.
        let mut kvm = a.clone();
        kvm.entries.push(entry(
            0x4000_0000,
            0,
            [0x4000_0010, 0x4b4d564b, 0x564b4d56, 0x4d],
        ));
        kvm.entries
            .push(entry(0x4000_0001, 0, [0x0100_00fb, 0, 0, 0]));
        let mut tcg = a.clone();
        tcg.entries.push(echo_of(&a, 0x4000_0000));
        let d = diff(&kvm, &tcg, &map());
        assert!(!d.is_equivalent(), "{d}");
        assert!(
            d.fields
                .iter()
                .any(|f| f.field == "maximum hypervisor leaf" && f.b == "(absent)"),
            "{d}"
        );

        // 0x40000100 is compared when 0x40000100.EAX declares it (KVM behind Hyper-V).
        let mut hv = kvm.clone();
        hv.entries.push(entry(
            0x4000_0100,
            0,
            [0x4000_0101, 0x4b4d564b, 0x564b4d56, 0x4d],
        ));
        hv.entries
            .push(entry(0x4000_0101, 0, [0x0100_00fb, 0, 0, 0]));
        let mut hv2 = hv.clone();
        set(&mut hv2, 0x4000_0101, 0, |e| e.eax = 0x0100_007b);
        let d = diff(&hv, &hv2, &map());
        assert!(!d.is_equivalent(), "{d}");
        assert!(d.echo_leaves.is_empty(), "{:?}", d.echo_leaves);
    }

    #[test]
    fn sub_leaves_are_hex_and_repeated_raw_values_fold() {
        let mut a = base();
        let mut b = base();
        for t in [&mut a, &mut b] {
            t.entries.push(entry(0xd, 0xb, [0x10, 0, 0, 0]));
            t.entries.push(entry(0x6, 0, [4, 0, 0, 0]));
            t.entries.push(entry(0x9, 0, [4, 0, 0, 0]));
        }
        set(&mut b, 0xd, 0xb, |e| e.eax = 0x11);
        set(&mut b, 0x6, 0, |e| e.eax = 5);
        set(&mut b, 0x9, 0, |e| e.eax = 5);
        let d = diff(&a, &b, &map());
        let text = d.to_string();
        assert!(
            text.contains("changed: leaf 0xd.0xb EAX: 0x00000010 -> 0x00000011"),
            "{text}"
        );
        assert!(
            text.contains("changed: leaf 0x6.0 EAX, leaf 0x9.0 EAX: 0x00000004 -> 0x00000005"),
            "{text}"
        );
        assert!(
            text.starts_with("different: 0 lost, 0 gained, 3 changed, 0 informational, 0 masked\n"),
            "{text}"
        );
        let f = d.fields.iter().find(|f| f.leaf == Some(0xd)).unwrap();
        assert_eq!(
            (f.subleaf, f.a_value, f.b_value),
            (Some(0xb), Some(0x10), Some(0x11))
        );
        let location = FeatureBit::Cpuid {
            leaf: 0xd,
            subleaf: 0xb,
            register: Register::Eax,
            bit: 0,
        };
        assert_eq!(location.to_string(), "CPUID.0xd.0xb:EAX[0]");
    }

    #[test]
    fn cache_geometry_names_every_field_and_empty_vendors_read_none() {
        let a = base();
        let mut b = base();
        // Only EAX[31:26] (cores per package) differs.
        set(&mut b, 4, 1, |e| e.eax |= 3 << 26);
        let d = diff(&a, &b, &map());
        let f = &d.fields[0];
        assert!(f.a.contains("1 cores per package"), "{d}");
        assert!(f.b.contains("4 cores per package"), "{d}");
        assert_ne!(f.a.split(" (").next(), f.b.split(" (").next(), "{d}");

        let mut zero = base();
        set(&mut zero, 0, 0, |e| {
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        });
        let d = diff(&base(), &zero, &map());
        assert!(
            d.to_string()
                .contains("vendor (CPUID.0x0:EBX,EDX,ECX): 'GenuineIntel' -> (none)"),
            "{d}"
        );
    }

    #[test]
    fn masked_differences_carry_their_reason() {
        let a = base();
        let mut b = base();
        set(&mut b, 1, 0, |e| e.ebx |= 0x0100_0000);
        let d = diff(&a, &b, &map());
        assert!(d.is_equivalent());
        assert_eq!(d.masked.len(), 1, "{d}");
        let m = &d.masked[0];
        assert_eq!(
            (m.leaf, m.register, m.bits),
            (Some(1), Some(Register::Ebx), Some(0xff00_0000))
        );
        assert!(m.mask_reason.as_deref().unwrap_or("").contains("APIC ID"));
        assert!(
            d.render(true)
                .contains("masked: CPUID.0x1:EBX bits 0xff000000"),
            "{}",
            d.render(true)
        );
    }
}
