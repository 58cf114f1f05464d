//! What a guest sees of its CPU, whatever the architecture: the CPUID table (and feature MSRs) of
//! an x86 guest, or the ID registers of an aarch64 guest.
//!
//! Everything above the probe (fingerprint, cache, stamp, guard, `diff`, `matrix`) handles these
//! types only, so the guard's policies and messages are the same for both architectures. Each
//! architecture's table implements [`ArchTable`] and its diff [`ArchDiff`] (here, so that the
//! architecture modules know nothing of this layer); a third architecture is a variant of
//! [`GuestView`], [`Tables`] and [`ViewDiff`] and two impls.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::aarch64::{self, ArmIdTable};
pub use crate::arch::Arch;
use crate::x86_64::dump::{parse_dump, write_dump};
use crate::x86_64::{self, CpuidTable, FeatureMap};

/// The version of the fingerprint format, and of the text its digest is computed over.
pub const FORMAT_VERSION: u32 = 2;

/// What each architecture's table gives the layers above: normalization with the masks that
/// did it, the text its digest is computed over, and the comparison of two tables.
pub trait ArchTable: Clone + PartialEq {
    /// One set of bits normalization put aside, with its reason.
    type Mask;
    /// The explanation of two tables' differences.
    type Diff: ArchDiff;
    /// Sorts into the one order equal tables compare, serialize and digest in.
    fn canonicalize(&mut self);
    /// The table with per-host and per-vCPU noise masked, and the masks applied.
    fn normalize(&self) -> (Self, Vec<Self::Mask>);
    /// The digest text of a normalized table (see [`Tables::canonical_text`]).
    fn canonical_text(&self, version: u32) -> String;
    /// Compares two raw tables (A = source, B = destination): both normalized first, masked
    /// differences reported as informational.
    fn diff(a: &Self, b: &Self, features: &FeatureMap) -> Self::Diff;
}

/// What every architecture's diff tells the guard and the operator.
pub trait ArchDiff {
    /// True when a guest could not tell A from B (informational differences aside).
    fn is_equivalent(&self) -> bool;
    /// True when the guest would only gain capabilities (nothing lost, nothing else changed).
    fn only_gained(&self) -> bool;
    /// The differences, one line each: `lost: …`, `gained: …`, `changed: …`.
    fn lines(&self) -> Vec<String>;
    /// Differences under informational masks, one line each.
    fn informational(&self) -> Vec<String>;
    /// Names of lost capabilities.
    fn lost_names(&self) -> Vec<String>;
    /// Names of gained capabilities.
    fn gained_names(&self) -> Vec<String>;
    /// Names of what otherwise changed, for the audit summary.
    fn changed_names(&self) -> Vec<String>;
    /// Other differences, one line each without the `changed:` prefix.
    fn changed_lines(&self) -> Vec<String>;
    /// `equivalent: 0 lost, 0 gained, 0 changed, 1 informational, 3 masked` (or `different: …`).
    fn summary_line(&self) -> String;
    /// The summary line, the differences, the informational ones; with `verbose`, whatever
    /// more the architecture can say.
    fn render(&self, verbose: bool) -> String;
}

impl ArchTable for CpuidTable {
    type Mask = x86_64::Mask;
    type Diff = x86_64::Diff;
    fn canonicalize(&mut self) {
        CpuidTable::canonicalize(self)
    }
    fn normalize(&self) -> (Self, Vec<Self::Mask>) {
        x86_64::normalize(self)
    }
    fn canonical_text(&self, version: u32) -> String {
        CpuidTable::canonical_text(self, version)
    }
    fn diff(a: &Self, b: &Self, features: &FeatureMap) -> Self::Diff {
        x86_64::diff(a, b, features)
    }
}

impl ArchTable for ArmIdTable {
    type Mask = aarch64::Mask;
    type Diff = aarch64::Diff;
    fn canonicalize(&mut self) {
        ArmIdTable::canonicalize(self)
    }
    fn normalize(&self) -> (Self, Vec<Self::Mask>) {
        aarch64::normalize(self)
    }
    fn canonical_text(&self, version: u32) -> String {
        ArmIdTable::canonical_text(self, version)
    }
    /// aarch64 fields are named by the register table; `features` names only x86 bits.
    fn diff(a: &Self, b: &Self, _features: &FeatureMap) -> Self::Diff {
        aarch64::diff(a, b)
    }
}

impl ArchDiff for x86_64::Diff {
    fn is_equivalent(&self) -> bool {
        x86_64::Diff::is_equivalent(self)
    }
    fn only_gained(&self) -> bool {
        self.lost.is_empty() && self.fields.is_empty() && !self.gained.is_empty()
    }
    fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .lost
            .iter()
            .chain(&self.gained)
            .map(|c| c.to_string())
            .collect();
        out.extend(
            x86_64::Diff::changed_lines(self)
                .iter()
                .map(|f| format!("changed: {f}")),
        );
        out
    }
    fn informational(&self) -> Vec<String> {
        self.informational.iter().map(|f| f.to_string()).collect()
    }
    /// libvirt feature names.
    fn lost_names(&self) -> Vec<String> {
        self.lost.iter().map(|c| c.name.clone()).collect()
    }
    fn gained_names(&self) -> Vec<String> {
        self.gained.iter().map(|c| c.name.clone()).collect()
    }
    fn changed_names(&self) -> Vec<String> {
        self.fields.iter().map(|c| c.field.clone()).collect()
    }
    fn changed_lines(&self) -> Vec<String> {
        x86_64::Diff::changed_lines(self)
    }
    fn summary_line(&self) -> String {
        x86_64::Diff::summary_line(self)
    }
    /// With `verbose`, also masked differences with their reasons and the echo leaves left out.
    fn render(&self, verbose: bool) -> String {
        x86_64::Diff::render(self, verbose)
    }
}

impl ArchDiff for aarch64::Diff {
    fn is_equivalent(&self) -> bool {
        aarch64::Diff::is_equivalent(self)
    }
    fn only_gained(&self) -> bool {
        self.lost.is_empty() && self.changed.is_empty() && !self.gained.is_empty()
    }
    fn lines(&self) -> Vec<String> {
        aarch64::Diff::lines(self)
    }
    fn informational(&self) -> Vec<String> {
        self.informational.iter().map(|c| c.detail()).collect()
    }
    /// `REGISTER.Field` names.
    fn lost_names(&self) -> Vec<String> {
        self.lost.iter().map(|c| c.subject()).collect()
    }
    fn gained_names(&self) -> Vec<String> {
        self.gained.iter().map(|c| c.subject()).collect()
    }
    fn changed_names(&self) -> Vec<String> {
        self.changed.iter().map(|c| c.subject()).collect()
    }
    fn changed_lines(&self) -> Vec<String> {
        self.changed.iter().map(|c| c.detail()).collect()
    }
    fn summary_line(&self) -> String {
        format!(
            "{}: {} lost, {} gained, {} changed, {} informational, 0 masked",
            if self.is_equivalent() {
                "equivalent"
            } else {
                "different"
            },
            self.lost.len(),
            self.gained.len(),
            self.changed.len(),
            self.informational.len()
        )
    }
    /// No verbose part: nothing is masked but the informational bits.
    fn render(&self, _verbose: bool) -> String {
        render_plain(
            &ArchDiff::summary_line(self),
            &ArchDiff::lines(self),
            &ArchDiff::informational(self),
        )
    }
}

/// The summary line, one line per difference, `informational: …` lines.
fn render_plain(summary: &str, lines: &[String], informational: &[String]) -> String {
    let mut out = format!("{summary}\n");
    for line in lines {
        out.push_str(&format!("{line}\n"));
    }
    for line in informational {
        out.push_str(&format!("informational: {line}\n"));
    }
    out
}

/// A raw (unnormalized) guest view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestView {
    /// An x86_64 or i686 guest's CPUID leaves (and feature MSRs).
    X86(CpuidTable),
    /// An aarch64 guest's ID registers.
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

/// Why a text view (a stamp's `<table>`, a file given to `cpuguard diff`) cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// Not a CPUID dump cpuguard reads (kvm-unit-tests or `cpuid -r` form).
    #[error("{0}")]
    X86(#[from] x86_64::DumpError),
    /// Starts with the aarch64 probe header but is not a complete transcript.
    #[error("{0}")]
    Aarch64(#[from] aarch64::probe::OutputError),
}

impl GuestView {
    /// The architecture of the table (an i686 guest's view is an x86_64 CPUID table).
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
            GuestView::Aarch64(t) => aarch64::probe::write_transcript(t),
        }
    }

    /// Reads [`GuestView::to_text`]'s output (or a `cpuid -r` dump); the aarch64 form is
    /// recognized by its header line.
    pub fn parse_text(text: &str) -> Result<GuestView, ViewError> {
        if aarch64::probe::is_transcript(text) {
            let table = aarch64::probe::parse(text.trim_start().as_bytes())?;
            return Ok(GuestView::Aarch64(table));
        }
        Ok(GuestView::X86(parse_dump(text)?))
    }

    /// Sorts the table into the one order in which equal views compare, serialize and digest.
    pub fn canonicalize(&mut self) {
        match self {
            GuestView::X86(t) => ArchTable::canonicalize(t),
            GuestView::Aarch64(t) => ArchTable::canonicalize(t),
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
    /// An x86_64 or i686 guest's CPUID table.
    #[serde(rename = "x86_64")]
    X86 {
        /// The table as probed, canonicalized.
        raw: CpuidTable,
        /// `raw` with the normalization masks applied: what the digest covers.
        normalized: CpuidTable,
        /// The masks that turned `raw` into `normalized`, each with its reason.
        masks: Vec<x86_64::Mask>,
    },
    /// An aarch64 guest's ID registers.
    #[serde(rename = "aarch64")]
    Aarch64 {
        /// The registers as probed, canonicalized.
        raw: ArmIdTable,
        /// `raw` with the MPIDR_EL1 affinity masked: what the digest covers.
        normalized: ArmIdTable,
        /// The masks that turned `raw` into `normalized`, each with its reason.
        masks: Vec<aarch64::Mask>,
    },
}

/// `raw` canonicalized, its normalization and the masks applied.
fn normalized<T: ArchTable>(mut raw: T) -> (T, T, Vec<T::Mask>) {
    raw.canonicalize();
    let (normalized, masks) = raw.normalize();
    (raw, normalized, masks)
}

impl Tables {
    /// Canonicalizes and normalizes `raw`.
    pub fn of(raw: GuestView) -> Tables {
        match raw {
            GuestView::X86(raw) => {
                let (raw, normalized, masks) = normalized(raw);
                Tables::X86 {
                    raw,
                    normalized,
                    masks,
                }
            }
            GuestView::Aarch64(raw) => {
                let (raw, normalized, masks) = normalized(raw);
                Tables::Aarch64 {
                    raw,
                    normalized,
                    masks,
                }
            }
        }
    }

    /// The architecture of the tables (an i686 guest's is an x86_64 CPUID table).
    pub fn arch(&self) -> Arch {
        match self {
            Tables::X86 { .. } => Arch::X86_64,
            Tables::Aarch64 { .. } => Arch::Aarch64,
        }
    }

    /// The raw view, as probed (canonicalized).
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

    /// The text the digest is computed over: each architecture's normalized table in a form fixed
    /// for [`FORMAT_VERSION`] (see [`ArchTable::canonical_text`]).
    pub fn canonical_text(&self) -> String {
        match self {
            Tables::X86 { normalized, .. } => normalized.canonical_text(FORMAT_VERSION),
            Tables::Aarch64 { normalized, .. } => normalized.canonical_text(FORMAT_VERSION),
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
    /// Two x86 views: features lost or gained by libvirt name, and other changed fields.
    #[serde(rename = "x86_64")]
    X86(x86_64::Diff),
    /// Two aarch64 views: ID-register fields.
    #[serde(rename = "aarch64")]
    Aarch64(aarch64::Diff),
    /// Different architectures: nothing else is comparable.
    #[serde(rename = "mixed")]
    Arch {
        /// The source's architecture.
        a: Arch,
        /// The destination's architecture.
        b: Arch,
    },
}

/// Compares two raw views (A = source, B = destination); masked differences are reported as
/// informational. `features` names x86 bits (aarch64 fields are named by the register table).
pub fn diff(a: &GuestView, b: &GuestView, features: &FeatureMap) -> ViewDiff {
    match (a, b) {
        (GuestView::X86(a), GuestView::X86(b)) => ViewDiff::X86(ArchTable::diff(a, b, features)),
        (GuestView::Aarch64(a), GuestView::Aarch64(b)) => {
            ViewDiff::Aarch64(ArchTable::diff(a, b, features))
        }
        (a, b) => ViewDiff::Arch {
            a: a.arch(),
            b: b.arch(),
        },
    }
}

impl ViewDiff {
    /// The architecture's diff, or the two architectures when they differ.
    fn per_arch(&self) -> Result<&dyn ArchDiff, (Arch, Arch)> {
        match self {
            ViewDiff::X86(d) => Ok(d),
            ViewDiff::Aarch64(d) => Ok(d),
            ViewDiff::Arch { a, b } => Err((*a, *b)),
        }
    }

    /// True when a guest could not tell A from B (informational differences aside).
    pub fn is_equivalent(&self) -> bool {
        self.per_arch().is_ok_and(|d| d.is_equivalent())
    }

    /// True when the guest would only gain capabilities (nothing lost, nothing else changed).
    pub fn only_gained(&self) -> bool {
        self.per_arch().is_ok_and(|d| d.only_gained())
    }

    /// The differences for the operator, one line each: `lost: …`, `gained: …`, `changed: …`.
    pub fn lines(&self) -> Vec<String> {
        match self.per_arch() {
            Ok(d) => d.lines(),
            Err((a, b)) => vec![format!("changed: architecture ({a} -> {b})")],
        }
    }

    /// Differences under informational masks (never a reason to refuse), one line each.
    pub fn informational(&self) -> Vec<String> {
        self.per_arch()
            .map(|d| d.informational())
            .unwrap_or_default()
    }

    /// Names of lost capabilities: libvirt feature names (x86), `REGISTER.Field` (aarch64).
    pub fn lost_names(&self) -> Vec<String> {
        self.per_arch().map(|d| d.lost_names()).unwrap_or_default()
    }

    /// Names of gained capabilities, as [`ViewDiff::lost_names`].
    pub fn gained_names(&self) -> Vec<String> {
        self.per_arch()
            .map(|d| d.gained_names())
            .unwrap_or_default()
    }

    /// Other differences (identification, cache geometry, leaves), one line each without the
    /// `changed:` prefix.
    pub fn changed_lines(&self) -> Vec<String> {
        match self.per_arch() {
            Ok(d) => d.changed_lines(),
            Err((a, b)) => vec![format!("architecture ({a} -> {b})")],
        }
    }

    /// A compact one-line summary for the audit trail: `lost a,b; gained c; changed d`.
    pub fn summary(&self) -> String {
        let changed = match self.per_arch() {
            Ok(d) => d.changed_names(),
            Err((a, b)) => vec![format!("arch {a}->{b}")],
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

    /// `equivalent: 0 lost, 0 gained, 0 changed, 1 informational, 3 masked` (or `different: …`):
    /// the first line of every rendering.
    pub fn summary_line(&self) -> String {
        match self.per_arch() {
            Ok(d) => d.summary_line(),
            Err(_) => {
                "different: 0 lost, 0 gained, 1 changed, 0 informational, 0 masked".to_string()
            }
        }
    }

    /// The summary line, one line per difference, `informational: …` lines; with `verbose`,
    /// also masked differences with their reasons and the echo leaves left out (x86).
    pub fn render(&self, verbose: bool) -> String {
        match self.per_arch() {
            Ok(d) => d.render(verbose),
            Err(_) => render_plain(&self.summary_line(), &self.lines(), &[]),
        }
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
    use crate::aarch64::ArmIdReg;
    use crate::x86_64::CpuidEntry;

    /// The digest text is what stamps and cache entries are compared by: pinned byte for byte
    /// (the expected digest is sha256 of the expected text, computed outside Rust).
    #[test]
    fn x86_digest_text_is_pinned() {
        let table = crate::x86_64::parse_dump(
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
        let mut regs: Vec<ArmIdReg> = crate::aarch64::sysregs::REGISTERS
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
