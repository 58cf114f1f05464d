//! Hiding what legitimately differs between two hosts that give a guest the same CPU.
//!
//! Only per-vCPU identity, bits that mirror guest OS state, and the hypervisor's timing leaf are
//! masked. Everything else the guest can read (cache and TLB leaves, family/model/stepping, brand
//! string, maximum leaves, topology the domain configuration decides) stays, because a guest may
//! act on it and a change in it is a change of CPU.

use serde::{Deserialize, Serialize};

use super::table::{CpuidTable, Register};

/// Bits of one register that normalization clears, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    /// The CPUID leaf the mask applies to.
    pub leaf: u32,
    /// `None` masks every sub-leaf of `leaf`.
    pub subleaf: Option<u32>,
    /// The register of that leaf whose bits are cleared.
    pub register: Register,
    /// The bits cleared (set bits here are cleared in the table), e.g. `0xff00_0000` for
    /// CPUID.1:EBX\[31:24\].
    pub bits: u32,
    /// Why those bits may differ between hosts giving a guest the same CPU, shown to operators.
    pub reason: String,
    /// Differences under an informational mask are reported to the operator but never make two
    /// tables different.
    pub informational: bool,
}

impl Mask {
    fn new(
        leaf: u32,
        subleaf: Option<u32>,
        register: Register,
        bits: u32,
        reason: &str,
        informational: bool,
    ) -> Self {
        Mask {
            leaf,
            subleaf,
            register,
            bits,
            reason: reason.to_string(),
            informational,
        }
    }

    /// True when this mask covers (`leaf`, `subleaf`).
    pub fn applies_to(&self, leaf: u32, subleaf: u32) -> bool {
        self.leaf == leaf && self.subleaf.is_none_or(|s| s == subleaf)
    }
}

/// The masks cpuguard applies, each with its reason.
pub fn standard_masks() -> Vec<Mask> {
    use Register::*;
    vec![
        Mask::new(
            0x1,
            Some(0),
            Ebx,
            0xff00_0000,
            "initial APIC ID (CPUID.1:EBX[31:24]) names the vCPU that executed CPUID, not the CPU",
            false,
        ),
        Mask::new(
            0xb,
            None,
            Edx,
            0xffff_ffff,
            "x2APIC ID (CPUID.0xB:EDX) names the vCPU that executed CPUID, not the CPU",
            false,
        ),
        Mask::new(
            0x1f,
            None,
            Edx,
            0xffff_ffff,
            "x2APIC ID (CPUID.0x1F:EDX) names the vCPU that executed CPUID, not the CPU",
            false,
        ),
        Mask::new(
            0x8000_001e,
            Some(0),
            Eax,
            0xffff_ffff,
            "extended APIC ID (CPUID.0x8000001E:EAX) names the vCPU that executed CPUID, not the CPU",
            false,
        ),
        Mask::new(
            0x8000_001e,
            Some(0),
            Ebx,
            0xff,
            "core ID (CPUID.0x8000001E:EBX[7:0]) names the core of the vCPU that executed CPUID; seen differing between CPU 0 and CPU 1 of one host",
            false,
        ),
        Mask::new(
            0x8000_001e,
            Some(0),
            Ecx,
            0xff,
            "node ID (CPUID.0x8000001E:ECX[7:0]) names the node of the vCPU that executed CPUID, not the CPU",
            false,
        ),
        Mask::new(
            0x1,
            Some(0),
            Ecx,
            1 << 27,
            "OSXSAVE (CPUID.1:ECX[27]) mirrors CR4.OSXSAVE, set by the guest OS, not offered by the CPU",
            false,
        ),
        Mask::new(
            0x7,
            Some(0),
            Ecx,
            1 << 4,
            "OSPKE (CPUID.7.0:ECX[4]) mirrors CR4.PKE, set by the guest OS, not offered by the CPU",
            false,
        ),
        Mask::new(
            0xd,
            Some(0),
            Ebx,
            0xffff_ffff,
            "XSAVE area size for the components enabled in XCR0 (CPUID.0xD.0:EBX) follows guest state",
            false,
        ),
        Mask::new(
            0xd,
            Some(1),
            Ebx,
            0xffff_ffff,
            "XSAVE area size for XCR0|IA32_XSS (CPUID.0xD.1:EBX) follows guest state",
            false,
        ),
        Mask::new(
            0x4000_0010,
            Some(0),
            Eax,
            0xffff_ffff,
            "TSC frequency in kHz (CPUID.0x40000010:EAX) is measured per host; informational",
            true,
        ),
        Mask::new(
            0x4000_0010,
            Some(0),
            Ebx,
            0xffff_ffff,
            "local APIC bus frequency in kHz (CPUID.0x40000010:EBX) is per host; informational",
            true,
        ),
    ]
}

/// Applies [`standard_masks`]: returns the canonicalized, masked table and the masks that matched
/// an entry of it. Idempotent.
pub fn normalize(table: &CpuidTable) -> (CpuidTable, Vec<Mask>) {
    normalize_with(table, &standard_masks())
}

/// Applies `masks` (see [`normalize`]).
pub fn normalize_with(table: &CpuidTable, masks: &[Mask]) -> (CpuidTable, Vec<Mask>) {
    let mut out = table.clone();
    out.canonicalize();
    let mut applied = Vec::new();
    for mask in masks {
        let mut matched = false;
        for entry in out
            .entries
            .iter_mut()
            .filter(|e| mask.applies_to(e.leaf, e.subleaf))
        {
            *entry.reg_mut(mask.register) &= !mask.bits;
            matched = true;
        }
        if matched {
            applied.push(mask.clone());
        }
    }
    (out, applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::table::CpuidEntry;

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

    fn table(entries: Vec<CpuidEntry>) -> CpuidTable {
        CpuidTable {
            entries,
            msrs: Vec::new(),
        }
    }

    #[test]
    fn masks_apic_ids_and_guest_state_bits() {
        let raw = table(vec![
            entry(0x1, 0, [0x000306c1, 0x05080800, 0xfffa3223, 0x178bfbff]),
            entry(0x7, 0, [0, 0x7ab, 0x10, 0]),
            entry(0xb, 0, [1, 2, 0x100, 5]),
            entry(0xb, 1, [4, 8, 0x201, 5]),
            entry(0xd, 0, [7, 0x340, 0x340, 0]),
            entry(0xd, 1, [0xf, 0x3c0, 0, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0x4000_0010, 0, [0x0027ac40, 0x000f4240, 0, 0]),
        ]);
        let (norm, applied) = normalize(&raw);
        let leaf1 = norm.get(1, 0).unwrap();
        assert_eq!(leaf1.eax, 0x000306c1, "family/model/stepping must stay");
        assert_eq!(leaf1.ebx, 0x00080800, "only EBX[31:24] is masked");
        assert_eq!(leaf1.ecx, 0xfffa3223 & !(1 << 27));
        assert_eq!(leaf1.edx, 0x178bfbff);
        assert_eq!(norm.get(7, 0).unwrap().ecx, 0);
        assert_eq!(norm.get(7, 0).unwrap().ebx, 0x7ab);
        assert_eq!(norm.get(0xb, 1).unwrap().edx, 0);
        assert_eq!(norm.get(0xb, 1).unwrap().ebx, 8, "topology stays");
        assert_eq!(norm.get(0xd, 0).unwrap().ebx, 0);
        assert_eq!(norm.get(0xd, 0).unwrap().ecx, 0x340, "maximum size stays");
        assert_eq!(norm.get(0xd, 2).unwrap().ebx, 0x240, "component sizes stay");
        assert_eq!(norm.get(0x4000_0010, 0).unwrap().eax, 0);
        assert!(applied
            .iter()
            .any(|m| m.leaf == 0x4000_0010 && m.informational));
        assert!(
            !applied.iter().any(|m| m.leaf == 0x1f),
            "no 0x1F entry to mask"
        );
        assert!(applied.iter().all(|m| !m.reason.is_empty()));
    }

    #[test]
    fn masks_per_vcpu_ids_of_amd_and_v2_topology_leaves() {
        let raw = table(vec![
            entry(0x1f, 0, [1, 1, 0x100, 3]),
            entry(0x1f, 1, [5, 2, 0x201, 3]),
            entry(0x8000_001e, 0, [3, 0x0000_0101, 0x0000_0300, 0]),
        ]);
        let (norm, applied) = normalize(&raw);
        assert_eq!(norm.get(0x1f, 1).unwrap().edx, 0);
        assert_eq!(norm.get(0x1f, 1).unwrap().eax, 5, "shift width is topology");
        let ext = norm.get(0x8000_001e, 0).unwrap();
        assert_eq!(ext.eax, 0, "extended APIC ID");
        assert_eq!(
            ext.ebx, 0x100,
            "threads per core (EBX[15:8]) stays, core ID goes"
        );
        assert_eq!(
            ext.ecx, 0x300,
            "nodes per processor (ECX[10:8]) stays, node ID goes"
        );
        assert_eq!(applied.len(), 4);
    }

    #[test]
    fn normalization_is_idempotent_and_canonical() {
        let raw = table(vec![
            entry(0x7, 0, [0, 0x7ab, 0x10, 0]),
            entry(0x1, 0, [0x000306c1, 0x05080800, 0xfffa3223, 0x178bfbff]),
        ]);
        let (once, masks_once) = normalize(&raw);
        let (twice, masks_twice) = normalize(&once);
        assert_eq!(once, twice);
        assert_eq!(masks_once, masks_twice);
        assert_eq!(once.entries[0].leaf, 1, "sorted by leaf");
    }

    #[test]
    fn cache_and_identity_leaves_are_never_masked() {
        let untouched = [
            0x0,
            0x2,
            0x4,
            0x8000_0000,
            0x8000_0002,
            0x8000_0005,
            0x8000_0006,
            0x8000_001d,
        ];
        for mask in standard_masks() {
            assert!(
                !untouched.contains(&mask.leaf),
                "leaf {:#x} is masked",
                mask.leaf
            );
        }
        let raw = table(untouched.iter().map(|&l| entry(l, 0, [!0; 4])).collect());
        let (norm, applied) = normalize(&raw);
        assert_eq!(norm, raw);
        assert!(applied.is_empty());
    }

    #[test]
    fn masks_round_trip_through_json() {
        let masks = standard_masks();
        let json = serde_json::to_string(&masks).unwrap();
        let back: Vec<Mask> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, masks);
        assert!(json.contains("\"subleaf\":null"));
    }
}
