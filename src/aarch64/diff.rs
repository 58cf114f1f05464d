//! Field-level comparison of two aarch64 ID-register views: which capabilities a guest would lose
//! or gain, and which identification or cache-geometry fields change.

use serde::{Deserialize, Serialize};

use super::normalize::normalize;
use super::sysregs::{register_def, FieldDef, FieldKind};
use super::table::ArmIdTable;

/// Whether a field difference takes capability away, adds it, or is unordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// A capability field is lower on B: the guest would lose a feature it may be using.
    Lost,
    /// A capability field is higher on B: the guest would see a feature appear.
    Gained,
    /// An unordered difference: identification or cache-geometry field, bits no field names, a
    /// register without a field table, or a register present on one side only.
    Changed,
}

/// One difference, `a` (source) -> `b` (destination).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterChange {
    /// Lost, gained or changed: which list of [`Diff`] holds this change.
    pub kind: ChangeKind,
    /// Register name (`ID_AA64ISAR0_EL1`).
    pub register: String,
    /// Field name, `bits[mask]` for bits no field names, or empty for the whole register.
    pub field: String,
    /// Human-readable value on A: `2 (AES+PMULL)` for a field, the register in hex when it has
    /// no field table, `absent` when its read trapped, `not read` when the table lacks it.
    pub a: String,
    /// Human-readable value on B, as `a`.
    pub b: String,
    /// The field's (or, for `field` empty or `bits[…]`, the register's or those bits') value on
    /// A as a number; absent when the register is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a_value: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The same value on B, as `a_value`.
    pub b_value: Option<u64>,
}

impl RegisterChange {
    /// `lost: ID_AA64ISAR0_EL1.AES (2 (AES+PMULL) -> 0 (none))`
    pub fn line(&self) -> String {
        let kind = match self.kind {
            ChangeKind::Lost => "lost",
            ChangeKind::Gained => "gained",
            ChangeKind::Changed => "changed",
        };
        format!("{kind}: {}", self.detail())
    }

    /// `ID_AA64ISAR0_EL1.AES`, or the register alone when the whole register differs.
    pub fn subject(&self) -> String {
        if self.field.is_empty() {
            self.register.clone()
        } else {
            format!("{}.{}", self.register, self.field)
        }
    }

    /// `ID_AA64ISAR0_EL1.AES (2 (AES+PMULL) -> 0 (none))`: the line without its kind.
    pub fn detail(&self) -> String {
        format!("{} ({} -> {})", self.subject(), self.a, self.b)
    }
}

/// The comparison of two tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    /// Capability fields lower on B than on A.
    pub lost: Vec<RegisterChange>,
    /// Capability fields higher on B than on A.
    pub gained: Vec<RegisterChange>,
    /// Unordered differences (identification, cache geometry, unnamed bits, presence).
    pub changed: Vec<RegisterChange>,
    /// Differences in masked (per-vCPU) bits: reported, never a reason to refuse.
    pub informational: Vec<RegisterChange>,
}

impl Diff {
    /// Equivalent: a guest would notice no difference (informational ones aside).
    pub fn is_equivalent(&self) -> bool {
        self.lost.is_empty() && self.gained.is_empty() && self.changed.is_empty()
    }

    /// Lost, then gained, then changed, one line each (what a refusal prints).
    pub fn lines(&self) -> Vec<String> {
        self.lost
            .iter()
            .chain(&self.gained)
            .chain(&self.changed)
            .map(RegisterChange::line)
            .collect()
    }
}

/// Compares two tables as they are, every bit: meant for tables that are already normalized
/// (no informational section).
pub fn diff_normalized(a: &ArmIdTable, b: &ArmIdTable) -> Diff {
    let mut out = Diff::default();
    let mut names: Vec<&str> = a.regs.iter().map(|r| r.name.as_str()).collect();
    for r in &b.regs {
        if !names.contains(&r.name.as_str()) {
            names.push(&r.name);
        }
    }
    for name in names {
        let find = |t: &ArmIdTable| t.regs.iter().find(|r| r.name == name).map(|r| r.value);
        // Outer None: not in the table; inner None: read trapped.
        let (va, vb) = match (find(a), find(b)) {
            (Some(Some(x)), Some(Some(y))) => (x, y),
            (x, y) if x == y => continue,
            (x, y) => {
                out.changed.push(RegisterChange {
                    kind: ChangeKind::Changed,
                    register: name.to_string(),
                    field: String::new(),
                    a: presence(x),
                    b: presence(y),
                    a_value: x.flatten(),
                    b_value: y.flatten(),
                });
                continue;
            }
        };
        if va == vb {
            continue;
        }
        compare_register(name, va, vb, &mut out);
    }
    out
}

/// Compares two raw tables (A = source, B = destination): both are normalized first, and
/// differences only in masked bits are listed as informational.
pub fn diff(a: &ArmIdTable, b: &ArmIdTable) -> Diff {
    let (na, _) = normalize(a);
    let (nb, _) = normalize(b);
    let mut out = diff_normalized(&na, &nb);
    let raw = diff_normalized(a, b);
    for change in raw.lost.into_iter().chain(raw.gained).chain(raw.changed) {
        let kept = out
            .lost
            .iter()
            .chain(&out.gained)
            .chain(&out.changed)
            .any(|c| c.register == change.register && c.field == change.field);
        if !kept {
            out.informational.push(change);
        }
    }
    out
}

fn presence(v: Option<Option<u64>>) -> String {
    match v {
        None => "not read".to_string(),
        Some(None) => "absent".to_string(),
        Some(Some(x)) => format!("{x:#018x}"),
    }
}

fn compare_register(name: &str, va: u64, vb: u64, out: &mut Diff) {
    let Some(def) = register_def(name) else {
        out.changed.push(RegisterChange {
            kind: ChangeKind::Changed,
            register: name.to_string(),
            field: String::new(),
            a: format!("{va:#018x}"),
            b: format!("{vb:#018x}"),
            a_value: Some(va),
            b_value: Some(vb),
        });
        return;
    };
    for f in def.fields {
        let (fa, fb) = (f.extract(va), f.extract(vb));
        if fa == fb {
            continue;
        }
        let kind = match f.kind {
            FieldKind::Identity => ChangeKind::Changed,
            FieldKind::Unsigned | FieldKind::Signed => {
                if f.ordinal(vb) < f.ordinal(va) {
                    ChangeKind::Lost
                } else {
                    ChangeKind::Gained
                }
            }
        };
        let change = RegisterChange {
            kind,
            register: name.to_string(),
            field: f.name.to_string(),
            a: describe_field(name, f, fa),
            b: describe_field(name, f, fb),
            a_value: Some(fa),
            b_value: Some(fb),
        };
        match kind {
            ChangeKind::Lost => out.lost.push(change),
            ChangeKind::Gained => out.gained.push(change),
            ChangeKind::Changed => out.changed.push(change),
        }
    }
    let rest = def.unnamed_bits();
    if (va ^ vb) & rest != 0 {
        out.changed.push(RegisterChange {
            kind: ChangeKind::Changed,
            register: name.to_string(),
            field: format!("bits[{rest:#x}]"),
            a: format!("{:#x}", va & rest),
            b: format!("{:#x}", vb & rest),
            a_value: Some(va & rest),
            b_value: Some(vb & rest),
        });
    }
}

fn describe_field(register: &str, f: &FieldDef, raw: u64) -> String {
    let number = if raw <= 9 {
        raw.to_string()
    } else {
        format!("{raw:#x}")
    };
    let meaning = match (register, f.name) {
        ("MIDR_EL1", "Implementer") => implementer_name(raw).map(str::to_string),
        _ => f
            .values
            .iter()
            .find(|(v, _)| *v == raw)
            .map(|(_, m)| m.to_string()),
    };
    match meaning {
        Some(m) => format!("{number} ({m})"),
        None => number,
    }
}

/// MIDR_EL1 decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Midr {
    /// Implementer code, bits 31:24 (0x41 = ARM, 0x00 = software, QEMU's `max`).
    pub implementer: u8,
    /// Major revision, bits 23:20 (the `r` of `r1p0`).
    pub variant: u8,
    /// Architecture code, bits 19:16 (0xF: defined by the ID registers).
    pub architecture: u8,
    /// Implementer-defined part number, bits 15:4 (0xd07 = Cortex-A57 for ARM).
    pub part: u16,
    /// Minor revision, bits 3:0 (the `p` of `r1p0`).
    pub revision: u8,
}

impl Midr {
    /// Splits a MIDR_EL1 value into its fields (bits 63:32 are RES0 and ignored).
    pub fn decode(value: u64) -> Midr {
        Midr {
            implementer: ((value >> 24) & 0xFF) as u8,
            variant: ((value >> 20) & 0xF) as u8,
            architecture: ((value >> 16) & 0xF) as u8,
            part: ((value >> 4) & 0xFFF) as u16,
            revision: (value & 0xF) as u8,
        }
    }

    /// `ARM Cortex-A57 r1p0 (implementer 0x41, part 0xd07)`
    pub fn describe(&self) -> String {
        let implementer = implementer_name(u64::from(self.implementer)).unwrap_or("unknown");
        let part = part_name(self.implementer, self.part).unwrap_or("unknown part");
        format!(
            "{implementer} {part} r{}p{} (implementer {:#04x}, part {:#05x})",
            self.variant, self.revision, self.implementer, self.part
        )
    }
}

fn implementer_name(code: u64) -> Option<&'static str> {
    Some(match code {
        0x00 => "software (QEMU max)",
        0x41 => "ARM",
        0x42 => "Broadcom",
        0x43 => "Cavium",
        0x46 => "Fujitsu",
        0x48 => "HiSilicon",
        0x4E => "NVIDIA",
        0x50 => "APM",
        0x51 => "Qualcomm",
        0x61 => "Apple",
        0xC0 => "Ampere",
        _ => return None,
    })
}

fn part_name(implementer: u8, part: u16) -> Option<&'static str> {
    Some(match (implementer, part) {
        (0x41, 0xD03) => "Cortex-A53",
        (0x41, 0xD04) => "Cortex-A35",
        (0x41, 0xD05) => "Cortex-A55",
        (0x41, 0xD07) => "Cortex-A57",
        (0x41, 0xD08) => "Cortex-A72",
        (0x41, 0xD09) => "Cortex-A73",
        (0x41, 0xD0A) => "Cortex-A75",
        (0x41, 0xD0B) => "Cortex-A76",
        (0x41, 0xD0C) => "Neoverse N1",
        (0x41, 0xD40) => "Neoverse V1",
        (0x41, 0xD49) => "Neoverse N2",
        (0x41, 0xD4F) => "Neoverse V2",
        (0x43, 0x0AF) => "ThunderX2",
        (0x46, 0x001) => "A64FX",
        (0x48, 0xD01) => "TSV110 (Kunpeng 920)",
        (0xC0, 0xAC3) => "Ampere-1",
        (0x00, 0x051) => "max",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aarch64::table::ArmIdReg;

    fn table(pairs: &[(&str, Option<u64>)]) -> ArmIdTable {
        ArmIdTable {
            regs: pairs
                .iter()
                .map(|(n, v)| ArmIdReg {
                    name: n.to_string(),
                    value: *v,
                })
                .collect(),
        }
    }

    #[test]
    fn lost_gained_changed_by_field_name() {
        // AES 2 -> 0, SHA1 1 -> 1, SHA2 1 -> 2; FP implemented -> not (signed 0 -> 0xF)
        let a = table(&[
            ("ID_AA64ISAR0_EL1", Some(0x11120)),
            ("ID_AA64PFR0_EL1", Some(0x22)),
            ("MIDR_EL1", Some(0x411f_d070)),
        ]);
        let b = table(&[
            ("ID_AA64ISAR0_EL1", Some(0x12100)),
            ("ID_AA64PFR0_EL1", Some(0xF0022)),
            ("MIDR_EL1", Some(0x410f_d083)),
        ]);
        let d = diff_normalized(&a, &b);
        let lines = d.lines();
        assert!(
            lines.contains(&"lost: ID_AA64ISAR0_EL1.AES (2 (AES+PMULL) -> 0 (none))".to_string()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(
                &"gained: ID_AA64ISAR0_EL1.SHA2 (1 (SHA256) -> 2 (SHA256+SHA512))".to_string()
            ),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("lost: ID_AA64PFR0_EL1.FP (0 (implemented) -> 0xf")),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"changed: MIDR_EL1.PartNum (0xd07 -> 0xd08)".to_string()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"changed: MIDR_EL1.Variant (1 -> 0)".to_string()),
            "{lines:#?}"
        );
        assert!(!lines.iter().any(|l| l.contains("SHA1")));
        assert!(!d.is_equivalent());
        assert!(diff_normalized(&a, &a).is_equivalent());
    }

    #[test]
    fn absent_registers_and_mpidr_affinity() {
        let a = table(&[
            ("ID_AA64MMFR3_EL1", Some(0)),
            ("MPIDR_EL1", Some(0x8000_0000)),
        ]);
        let b = table(&[("ID_AA64MMFR3_EL1", None), ("MPIDR_EL1", Some(0x8000_0101))]);
        let d = diff(&a, &b);
        assert_eq!(d.changed.len(), 1, "{d:#?}");
        assert_eq!(
            d.changed[0].line(),
            "changed: ID_AA64MMFR3_EL1 (0x0000000000000000 -> absent)"
        );
        // Aff0 and Aff1 differ: informational only.
        let names: Vec<&str> = d.informational.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(names, ["Aff0", "Aff1"]);
        assert_eq!(diff_normalized(&a, &b).changed.len(), 3);
    }

    #[test]
    fn midr_is_decoded() {
        let m = Midr::decode(0x411f_d070);
        assert_eq!(
            (m.implementer, m.part, m.variant, m.revision),
            (0x41, 0xd07, 1, 0)
        );
        assert_eq!(
            m.describe(),
            "ARM Cortex-A57 r1p0 (implementer 0x41, part 0xd07)"
        );
        assert!(Midr::decode(0x4800_0000)
            .describe()
            .starts_with("HiSilicon unknown part"));
    }
}
