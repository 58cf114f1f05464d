//! Setting aside what differs per vCPU rather than per CPU model, so that equal CPUs compare equal.

use serde::{Deserialize, Serialize};

use super::table::ArmIdTable;

/// Bits set aside by [`normalize`], reported beside the comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    /// Register the bits belong to (`MPIDR_EL1`).
    pub register: String,
    /// The masked bits, in place in the register (e.g. [`MPIDR_AFFINITY`]).
    pub bits: u64,
    /// The value of those bits before masking.
    pub original: u64,
    /// Why these bits are set aside, one line for the operator.
    pub reason: String,
}

/// MPIDR_EL1 affinity fields Aff0..Aff3 (bits 7:0, 15:8, 23:16, 39:32).
pub const MPIDR_AFFINITY: u64 = 0xFF_00FF_FFFF;

/// Masks what differs per vCPU rather than per CPU model: the MPIDR_EL1 affinity fields are the
/// vCPU's position in the guest topology (the probe runs one vCPU, a guest's vCPUs each read
/// their own, and KVM derives them from the vCPU index), so they say nothing about what the guest
/// can run. MT and U stay: they describe the topology's kind. Nothing else is masked.
pub fn normalize(table: &ArmIdTable) -> (ArmIdTable, Vec<Mask>) {
    let mut out = table.clone();
    let mut masks = Vec::new();
    for reg in &mut out.regs {
        if reg.name == "MPIDR_EL1" {
            if let Some(value) = reg.value.as_mut() {
                masks.push(Mask {
                    register: reg.name.clone(),
                    bits: MPIDR_AFFINITY,
                    original: *value & MPIDR_AFFINITY,
                    reason: "MPIDR_EL1 affinity (Aff0-Aff3) is the vCPU's topology position, \
                             different on every vCPU"
                        .to_string(),
                });
                *value &= !MPIDR_AFFINITY;
            }
        }
    }
    out.canonicalize();
    (out, masks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aarch64::table::ArmIdReg;

    #[test]
    fn normalize_masks_only_mpidr_affinity() {
        let table = ArmIdTable {
            regs: vec![
                ArmIdReg {
                    name: "ID_AA64PFR0_EL1".into(),
                    value: Some(0xFF_00FF_FFFF),
                },
                ArmIdReg {
                    name: "MPIDR_EL1".into(),
                    value: Some(0x1_8100_0203),
                },
            ],
        };
        let (n, masks) = normalize(&table);
        assert_eq!(n.get("MPIDR_EL1"), Some(0x8100_0000));
        assert_eq!(n.get("ID_AA64PFR0_EL1"), Some(0xFF_00FF_FFFF));
        assert_eq!(masks.len(), 1);
        assert_eq!(masks[0].original, 0x1_0000_0203);
        // canonical order: MPIDR (probe position 2) before PFR0 (3)
        assert_eq!(n.regs[0].name, "MPIDR_EL1");
    }
}
