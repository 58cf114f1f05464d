//! What a guest sees of its CPU, whatever the architecture: the CPUID table (and feature MSRs) of
//! an x86 guest, or the ID registers of an aarch64 guest.
//!
//! Everything above the probe (fingerprint, cache, stamp, guard, `diff`, `matrix`) handles these
//! types only, so the guard's policies and messages are the same for both architectures and a
//! third one would be added here and in the probe.

use std::fmt;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::arm::{self, ArmDiff, ArmIdTable, ArmMask};
use crate::cpuid::diff::Diff;
use crate::cpuid::dump::{parse_dump, write_dump};
use crate::cpuid::normalize::{normalize, Mask};
use crate::cpuid::{CpuidTable, FeatureMap};

/// The guest architecture a view belongs to (libvirt's `<os><type arch=…>` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

/// A raw (unnormalized) guest view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestView {
    X86(CpuidTable),
    Aarch64(ArmIdTable),
}

impl From<CpuidTable> for GuestView {
    fn from(table: CpuidTable) -> Self {
        GuestView::X86(table)
    }
}

impl From<ArmIdTable> for GuestView {
    fn from(table: ArmIdTable) -> Self {
        GuestView::Aarch64(table)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{0}")]
    X86(#[from] crate::cpuid::DumpError),
    #[error("{0}")]
    Aarch64(#[from] arm::probe::ArmOutputError),
}

impl GuestView {
    pub fn arch(&self) -> Arch {
        match self {
            GuestView::X86(_) => Arch::X86_64,
            GuestView::Aarch64(_) => Arch::Aarch64,
        }
    }

    /// The text form a stamp's `<table>` carries: a kvm-unit-tests CPUID dump for x86, the
    /// aarch64 probe's own output for ARM. [`GuestView::parse_text`] reads both.
    pub fn to_text(&self) -> String {
        match self {
            GuestView::X86(t) => write_dump(t),
            GuestView::Aarch64(t) => arm::probe::write_transcript(t),
        }
    }

    /// Reads [`GuestView::to_text`]'s output (or a `cpuid -r` dump); the aarch64 form is
    /// recognized by its header line.
    pub fn parse_text(text: &str) -> Result<GuestView, ViewError> {
        if arm::probe::is_transcript(text) {
            let table = arm::probe::parse(text.trim_start().as_bytes())?;
            return Ok(GuestView::Aarch64(table));
        }
        Ok(GuestView::X86(parse_dump(text)?))
    }

    pub fn canonicalize(&mut self) {
        match self {
            GuestView::X86(t) => t.canonicalize(),
            GuestView::Aarch64(t) => t.canonicalize(),
        }
    }

    /// `sha256:<hex>` of the normalized view (what a fingerprint's digest is).
    pub fn digest(&self) -> String {
        Tables::of(self.clone()).digest()
    }
}

/// A raw view with its normalization and the masks that produced it: the body of a fingerprint.
/// Serialized with an `arch` tag beside `raw`, `normalized` and `masks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "arch")]
pub enum Tables {
    #[serde(rename = "x86_64")]
    X86 {
        raw: CpuidTable,
        normalized: CpuidTable,
        masks: Vec<Mask>,
    },
    #[serde(rename = "aarch64")]
    Aarch64 {
        raw: ArmIdTable,
        normalized: ArmIdTable,
        masks: Vec<ArmMask>,
    },
}

impl Tables {
    /// Canonicalizes and normalizes `raw`.
    pub fn of(raw: GuestView) -> Tables {
        match raw {
            GuestView::X86(mut raw) => {
                raw.canonicalize();
                let (normalized, masks) = normalize(&raw);
                Tables::X86 {
                    raw,
                    normalized,
                    masks,
                }
            }
            GuestView::Aarch64(mut raw) => {
                raw.canonicalize();
                let (normalized, masks) = arm::normalize(&raw);
                Tables::Aarch64 {
                    raw,
                    normalized,
                    masks,
                }
            }
        }
    }

    pub fn arch(&self) -> Arch {
        match self {
            Tables::X86 { .. } => Arch::X86_64,
            Tables::Aarch64 { .. } => Arch::Aarch64,
        }
    }

    pub fn raw(&self) -> GuestView {
        match self {
            Tables::X86 { raw, .. } => GuestView::X86(raw.clone()),
            Tables::Aarch64 { raw, .. } => GuestView::Aarch64(raw.clone()),
        }
    }

    /// True when `normalized` and `masks` are what [`Tables::of`] makes of `raw` (a hand-edited
    /// or corrupt file is not).
    pub fn is_consistent(&self) -> bool {
        Tables::of(self.raw()) == *self
    }

    /// The text the digest is computed over. Fixed here rather than borrowed from the dump
    /// writers so that a change of dump format cannot silently change every digest.
    pub fn canonical_text(&self) -> String {
        let version = crate::fingerprint::FORMAT_VERSION;
        match self {
            Tables::X86 { normalized, .. } => {
                let mut table = normalized.clone();
                table.canonicalize();
                // Written in place (one allocation, not one per line): the hook computes this
                // on its warm path. Writing to a String cannot fail.
                let mut out = String::with_capacity(64 + 46 * table.entries.len());
                let _ = writeln!(out, "cpuguard normalized cpuid v{version}");
                for e in &table.entries {
                    let _ = writeln!(
                        out,
                        "{:08x} {:08x}: {:08x} {:08x} {:08x} {:08x}",
                        e.leaf, e.subleaf, e.eax, e.ebx, e.ecx, e.edx
                    );
                }
                for m in &table.msrs {
                    let _ = writeln!(out, "msr {:08x}: {:016x}", m.index, m.value);
                }
                out
            }
            Tables::Aarch64 { normalized, .. } => {
                let mut table = normalized.clone();
                table.canonicalize();
                let mut out = format!("cpuguard normalized aarch64 id registers v{version}\n");
                for r in &table.regs {
                    match r.value {
                        Some(v) => out.push_str(&format!("{} {v:016x}\n", r.name)),
                        None => out.push_str(&format!("{} absent\n", r.name)),
                    }
                }
                out
            }
        }
    }

    /// `sha256:<hex>` of [`Tables::canonical_text`].
    pub fn digest(&self) -> String {
        let hash = Sha256::digest(self.canonical_text().as_bytes());
        format!("sha256:{}", hex::encode(hash))
    }
}

/// How the guest's view on A (source) differs from B (destination). As JSON: the
/// architecture's diff with an `arch` tag (`mixed` when the architectures differ).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "arch")]
pub enum ViewDiff {
    #[serde(rename = "x86_64")]
    X86(Diff),
    #[serde(rename = "aarch64")]
    Aarch64(ArmDiff),
    /// Different architectures: nothing else is comparable.
    #[serde(rename = "mixed")]
    Arch { a: Arch, b: Arch },
}

/// Compares two raw views (A = source, B = destination); masked differences are reported as
/// informational. `features` names x86 bits (aarch64 fields are named by the register table).
pub fn diff(a: &GuestView, b: &GuestView, features: &FeatureMap) -> ViewDiff {
    match (a, b) {
        (GuestView::X86(a), GuestView::X86(b)) => ViewDiff::X86(crate::cpuid::diff(a, b, features)),
        (GuestView::Aarch64(a), GuestView::Aarch64(b)) => {
            ViewDiff::Aarch64(arm::diff_normalized(a, b))
        }
        (a, b) => ViewDiff::Arch {
            a: a.arch(),
            b: b.arch(),
        },
    }
}

impl ViewDiff {
    /// True when a guest could not tell A from B (informational differences aside).
    pub fn is_equivalent(&self) -> bool {
        match self {
            ViewDiff::X86(d) => d.is_equivalent(),
            ViewDiff::Aarch64(d) => d.is_equivalent(),
            ViewDiff::Arch { .. } => false,
        }
    }

    /// True when the guest would only gain capabilities (nothing lost, nothing else changed).
    pub fn only_gained(&self) -> bool {
        match self {
            ViewDiff::X86(d) => d.lost.is_empty() && d.fields.is_empty() && !d.gained.is_empty(),
            ViewDiff::Aarch64(d) => {
                d.lost.is_empty() && d.changed.is_empty() && !d.gained.is_empty()
            }
            ViewDiff::Arch { .. } => false,
        }
    }

    /// The differences for the operator, one line each: `lost: …`, `gained: …`, `changed: …`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ViewDiff::X86(d) => {
                let mut out: Vec<String> = d
                    .lost
                    .iter()
                    .chain(&d.gained)
                    .map(|c| c.to_string())
                    .collect();
                out.extend(d.changed_lines().iter().map(|f| format!("changed: {f}")));
                out
            }
            ViewDiff::Aarch64(d) => d.lines(),
            ViewDiff::Arch { a, b } => vec![format!("changed: architecture ({a} -> {b})")],
        }
    }

    /// Differences under informational masks (never a reason to refuse), one line each.
    pub fn informational(&self) -> Vec<String> {
        match self {
            ViewDiff::X86(d) => d.informational.iter().map(|f| f.to_string()).collect(),
            ViewDiff::Aarch64(d) => d.informational.iter().map(|c| c.detail()).collect(),
            ViewDiff::Arch { .. } => Vec::new(),
        }
    }

    /// Names of lost capabilities: libvirt feature names (x86), `REGISTER.Field` (aarch64).
    pub fn lost_names(&self) -> Vec<String> {
        match self {
            ViewDiff::X86(d) => d.lost.iter().map(|c| c.name.clone()).collect(),
            ViewDiff::Aarch64(d) => d.lost.iter().map(|c| c.subject()).collect(),
            ViewDiff::Arch { .. } => Vec::new(),
        }
    }

    /// Names of gained capabilities, as [`ViewDiff::lost_names`].
    pub fn gained_names(&self) -> Vec<String> {
        match self {
            ViewDiff::X86(d) => d.gained.iter().map(|c| c.name.clone()).collect(),
            ViewDiff::Aarch64(d) => d.gained.iter().map(|c| c.subject()).collect(),
            ViewDiff::Arch { .. } => Vec::new(),
        }
    }

    /// Other differences (identification, cache geometry, leaves), one line each without the
    /// `changed:` prefix.
    pub fn changed_lines(&self) -> Vec<String> {
        match self {
            ViewDiff::X86(d) => d.changed_lines(),
            ViewDiff::Aarch64(d) => d.changed.iter().map(|c| c.detail()).collect(),
            ViewDiff::Arch { a, b } => vec![format!("architecture ({a} -> {b})")],
        }
    }

    /// A compact one-line summary for the audit trail: `lost a,b; gained c; changed d`.
    pub fn summary(&self) -> String {
        let changed: Vec<String> = match self {
            ViewDiff::X86(d) => d.fields.iter().map(|c| c.field.clone()).collect(),
            ViewDiff::Aarch64(d) => d.changed.iter().map(|c| c.subject()).collect(),
            ViewDiff::Arch { a, b } => vec![format!("arch {a}->{b}")],
        };
        let mut parts = Vec::new();
        for (word, names) in [
            ("lost", self.lost_names()),
            ("gained", self.gained_names()),
            ("changed", changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{word} {}", names.join(",")));
            }
        }
        parts.join("; ")
    }
}

impl ViewDiff {
    /// `equivalent: 0 lost, 0 gained, 0 changed, 1 informational, 3 masked` (or `different: …`):
    /// the first line of every rendering.
    pub fn summary_line(&self) -> String {
        match self {
            ViewDiff::X86(d) => d.summary_line(),
            ViewDiff::Aarch64(d) => format!(
                "{}: {} lost, {} gained, {} changed, {} informational, 0 masked",
                if d.is_equivalent() {
                    "equivalent"
                } else {
                    "different"
                },
                d.lost.len(),
                d.gained.len(),
                d.changed.len(),
                d.informational.len()
            ),
            ViewDiff::Arch { .. } => {
                "different: 0 lost, 0 gained, 1 changed, 0 informational, 0 masked".to_string()
            }
        }
    }

    /// The summary line, one line per difference, `informational: …` lines; with `verbose`,
    /// also masked differences with their reasons and the echo leaves left out (x86).
    pub fn render(&self, verbose: bool) -> String {
        if let ViewDiff::X86(d) = self {
            return d.render(verbose);
        }
        let mut out = format!("{}\n", self.summary_line());
        for line in self.lines() {
            out.push_str(&format!("{line}\n"));
        }
        for line in self.informational() {
            out.push_str(&format!("informational: {line}\n"));
        }
        out
    }
}

impl fmt::Display for ViewDiff {
    /// [`ViewDiff::render`] without the verbose part.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arm::ArmIdReg;
    use crate::cpuid::CpuidEntry;

    /// The digest text is what stamps and cache entries are compared by: pinned byte for byte
    /// (the expected digest is sha256 of the expected text, computed outside Rust).
    #[test]
    fn x86_digest_text_is_pinned() {
        let table = crate::cpuid::parse_dump(
            "00000001 00000000: 000306c1 00000800 fffa3223 078bfbff\n\
             00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n\
             msr 0000010a: 000000000000002b\n",
        )
        .expect("dump");
        let tables = Tables::X86 {
            raw: table.clone(),
            normalized: table,
            masks: Vec::new(),
        };
        assert_eq!(
            tables.canonical_text(),
            "cpuguard normalized cpuid v2\n\
             00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n\
             00000001 00000000: 000306c1 00000800 fffa3223 078bfbff\n\
             msr 0000010a: 000000000000002b\n"
        );
        assert_eq!(
            tables.digest(),
            "sha256:c1072eabf2868184ef2abf3be6e1373130d24ab1474ee03b2a9d12b0dd71a59d"
        );
    }

    fn arm_table(isar0: u64, mpidr: u64) -> ArmIdTable {
        let mut regs: Vec<ArmIdReg> = crate::arm::firmware::PROBED_REGISTERS
            .iter()
            .map(|r| ArmIdReg {
                name: r.name.to_string(),
                value: Some(0),
            })
            .collect();
        let mut set = |name: &str, v: u64| {
            if let Some(r) = regs.iter_mut().find(|r| r.name == name) {
                r.value = Some(v);
            }
        };
        set("MIDR_EL1", 0x411f_d070);
        set("ID_AA64ISAR0_EL1", isar0);
        set("MPIDR_EL1", mpidr);
        let mut t = ArmIdTable { regs };
        t.canonicalize();
        t
    }

    fn x86_table(ecx: u32) -> CpuidTable {
        CpuidTable {
            entries: vec![CpuidEntry {
                leaf: 1,
                subleaf: 0,
                eax: 0x306c1,
                ebx: 0,
                ecx,
                edx: 0,
            }],
            msrs: Vec::new(),
        }
    }

    #[test]
    fn text_form_round_trips_for_both_architectures() {
        for view in [
            GuestView::from(arm_table(0x1_0000_0020, 0x8000_0000)),
            GuestView::from(x86_table(0x1)),
        ] {
            let text = view.to_text();
            let back = GuestView::parse_text(&format!("\n{text}")).unwrap();
            assert_eq!(back, view);
        }
        let err = GuestView::parse_text("CPUGUARD-ARM-PROBE 1\nE 1\n").unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn tables_serialize_with_an_arch_tag_and_digest_per_architecture() {
        let arm = Tables::of(arm_table(0x20, 0x8000_0000).into());
        let json = serde_json::to_value(&arm).unwrap();
        assert_eq!(json["arch"], "aarch64");
        assert!(json["raw"]["regs"].is_array());
        let back: Tables = serde_json::from_value(json).unwrap();
        assert_eq!(back, arm);
        assert!(back.is_consistent());

        // Affinity is masked: another vCPU position, same digest; another field, another digest.
        let other_vcpu = Tables::of(arm_table(0x20, 0x8000_0003).into());
        assert_eq!(arm.digest(), other_vcpu.digest());
        assert_ne!(arm.raw(), other_vcpu.raw());
        let other_cpu = Tables::of(arm_table(0x10, 0x8000_0000).into());
        assert_ne!(arm.digest(), other_cpu.digest());
        let Tables::Aarch64 { masks, .. } = &arm else {
            panic!("aarch64 tables expected")
        };
        assert_eq!(masks.len(), 1);

        let x86 = Tables::of(x86_table(1).into());
        assert_eq!(serde_json::to_value(&x86).unwrap()["arch"], "x86_64");
        assert_ne!(x86.digest(), arm.digest());

        let mut edited = arm.clone();
        if let Tables::Aarch64 { normalized, .. } = &mut edited {
            normalized.regs[0].value = Some(1);
        }
        assert!(!edited.is_consistent());
    }

    #[test]
    fn diffs_name_fields_and_refuse_to_compare_architectures() {
        let map = FeatureMap::parse(
            "<cpus><feature name='vmx'><cpuid eax_in='0x01' ecx='0x00000020'/></feature></cpus>",
            "map",
        )
        .unwrap();
        let with_aes = GuestView::from(arm_table(0x20, 0x8000_0000));
        let without = GuestView::from(arm_table(0x0, 0x8000_0001));
        let d = diff(&with_aes, &without, &map);
        assert!(!d.is_equivalent() && !d.only_gained());
        assert!(
            d.lines()
                .iter()
                .any(|l| l.starts_with("lost: ID_AA64ISAR0_EL1.AES")),
            "{:?}",
            d.lines()
        );
        assert!(
            d.summary().starts_with("lost ID_AA64ISAR0_EL1.AES"),
            "{}",
            d.summary()
        );
        assert!(
            d.informational().iter().any(|l| l.starts_with("MPIDR_EL1")),
            "{:?}",
            d.informational()
        );
        let back = diff(&without, &with_aes, &map);
        assert!(back.only_gained(), "{back}");
        assert!(diff(&with_aes, &with_aes, &map)
            .to_string()
            .starts_with("equivalent"));

        let cross = diff(&with_aes, &GuestView::from(x86_table(1)), &map);
        assert!(!cross.is_equivalent() && !cross.only_gained());
        assert_eq!(
            cross.lines(),
            vec!["changed: architecture (aarch64 -> x86_64)"]
        );
    }
}
