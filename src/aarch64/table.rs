//! What an aarch64 guest sees of its CPU: the ID registers it read, by name, in probe order.

use serde::{Deserialize, Serialize};

use super::sysregs::REGISTERS;

/// One register as the guest read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmIdReg {
    /// Architectural name, e.g. `ID_AA64ISAR0_EL1`.
    pub name: String,
    /// `None`: the read trapped (the register is absent for this guest).
    pub value: Option<u64>,
}

/// What an aarch64 guest sees of its CPU: the probed ID registers, in probe order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmIdTable {
    /// The registers read, one entry each; [`ArmIdTable::canonicalize`] puts them in probe order.
    pub regs: Vec<ArmIdReg>,
}

impl ArmIdTable {
    /// The value of a register; `None` when absent or not in the table.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.regs
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.value)
    }

    /// Orders the registers as the probe reads them (unknown names last, by name), so equal views
    /// serialize and digest equally.
    pub fn canonicalize(&mut self) {
        let rank = |name: &str| {
            REGISTERS
                .iter()
                .position(|r| r.name == name)
                .unwrap_or(usize::MAX)
        };
        self.regs
            .sort_by(|a, b| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
    }

    /// The text a digest of this (normalized) table is computed over, `version` being the
    /// fingerprint format's. Fixed here rather than borrowed from the transcript writer so that
    /// a change of that format cannot silently change every digest.
    pub fn canonical_text(&self, version: u32) -> String {
        let mut table = self.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What the real digest (`crate::view::Tables::digest`) hashes.
    #[test]
    fn digest_ignores_order_and_sees_values() {
        let a = ArmIdTable {
            regs: vec![
                ArmIdReg {
                    name: "CTR_EL0".into(),
                    value: Some(1),
                },
                ArmIdReg {
                    name: "MIDR_EL1".into(),
                    value: Some(2),
                },
            ],
        };
        let mut b = a.clone();
        b.regs.reverse();
        assert_eq!(a.canonical_text(2), b.canonical_text(2));
        b.regs[0].value = None;
        assert_ne!(a.canonical_text(2), b.canonical_text(2));
    }
}
