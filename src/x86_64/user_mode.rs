//! The x86 probe's user-mode pass: CPUID read at CPL3 (where 64-bit guest applications run)
//! against the table read at CPL0. A fact of the host (KVM's CPUID faulting, a hypervisor's
//! user-mode view), kept beside a fingerprint, never in its digest.

use serde::{Deserialize, Serialize};

use super::table::{CpuidEntry, CpuidTable};

/// The probe's user-mode pass: CPUID read at CPL3 against the table read at CPL0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserModeCpuid {
    /// The (leaf, sub-leaf) pairs compared; empty when the guest CPU has no long mode (the
    /// pass runs where 64-bit guest applications run).
    pub compared: Vec<(u32, u32)>,
    /// Those whose answer differs at CPL3.
    pub differing: Vec<UserModeDifference>,
}

/// One leaf whose CPL3 answer is not the kernel's: EAX, EBX, ECX, EDX at each level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserModeDifference {
    /// The CPUID leaf (EAX input).
    pub leaf: u32,
    /// The sub-leaf (ECX input); 0 for leaves without sub-leaves.
    pub subleaf: u32,
    /// EAX, EBX, ECX, EDX as the guest kernel read them (CPL0).
    pub kernel: [u32; 4],
    /// EAX, EBX, ECX, EDX as guest user space read them (CPL3).
    pub user: [u32; 4],
}

impl UserModeCpuid {
    /// Compares the CPL3 answers with the CPL0 table; a leaf the table lacks (beyond the maximum
    /// leaf) is not compared.
    pub fn compare(table: &CpuidTable, user: &[CpuidEntry]) -> Self {
        let regs = |e: &CpuidEntry| [e.eax, e.ebx, e.ecx, e.edx];
        let mut out = UserModeCpuid {
            compared: Vec::new(),
            differing: Vec::new(),
        };
        for u in user {
            let Some(k) = table.get(u.leaf, u.subleaf) else {
                continue;
            };
            out.compared.push((u.leaf, u.subleaf));
            if regs(k) != regs(u) {
                out.differing.push(UserModeDifference {
                    leaf: u.leaf,
                    subleaf: u.subleaf,
                    kernel: regs(k),
                    user: regs(u),
                });
            }
        }
        out
    }

    /// True when any compared leaf answers user space differently from the kernel.
    pub fn differs(&self) -> bool {
        !self.differing.is_empty()
    }

    /// One line per differing leaf: `CPUID.0x1.0: kernel eax=… ebx=… ecx=… edx=… / user eax=…`
    /// (registers in 8-digit hex).
    pub fn lines(&self) -> Vec<String> {
        self.differing
            .iter()
            .map(|d| {
                let show = |r: [u32; 4]| {
                    format!(
                        "eax={:08x} ebx={:08x} ecx={:08x} edx={:08x}",
                        r[0], r[1], r[2], r[3]
                    )
                };
                format!(
                    "CPUID.{:#x}.{}: kernel {} / user {}",
                    d.leaf,
                    d.subleaf,
                    show(d.kernel),
                    show(d.user)
                )
            })
            .collect()
    }
}
