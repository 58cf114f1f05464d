//! The CPUID table a guest sees: every (leaf, sub-leaf) the probe read, plus the feature MSRs.
//!
//! This is the unit of measurement cpuguard compares. It is deliberately plain data: the probe
//! fills it, normalization masks it, the diff explains it, the cache stores it as JSON.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One CPUID query and its answer. `subleaf` is the ECX input (0 for leaves without sub-leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// The CPUID leaf queried (EAX input), e.g. `0x7` or `0x8000_0001`.
    pub leaf: u32,
    /// The sub-leaf queried (ECX input); 0 for leaves without sub-leaves.
    pub subleaf: u32,
    /// EAX as the guest read it for this (leaf, sub-leaf).
    pub eax: u32,
    /// EBX as the guest read it for this (leaf, sub-leaf).
    pub ebx: u32,
    /// ECX as the guest read it for this (leaf, sub-leaf).
    pub ecx: u32,
    /// EDX as the guest read it for this (leaf, sub-leaf).
    pub edx: u32,
}

/// One model-specific register read by the guest (only MSRs whose presence CPUID enumerates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MsrEntry {
    /// The MSR's address (the ECX input of RDMSR), e.g. `0x10A` for IA32_ARCH_CAPABILITIES.
    pub index: u32,
    /// The 64-bit value RDMSR returned in the guest.
    pub value: u64,
}

/// The 32-bit registers of a CPUID answer, in the order the SDM names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    /// EAX (serialized as `"eax"`).
    Eax,
    /// EBX (serialized as `"ebx"`).
    Ebx,
    /// ECX (serialized as `"ecx"`).
    Ecx,
    /// EDX (serialized as `"edx"`).
    Edx,
}

impl CpuidEntry {
    /// The value of register `r` in this answer.
    pub fn reg(&self, r: Register) -> u32 {
        match r {
            Register::Eax => self.eax,
            Register::Ebx => self.ebx,
            Register::Ecx => self.ecx,
            Register::Edx => self.edx,
        }
    }

    /// Register `r` of this answer, writable (how normalization masks bits in place).
    pub fn reg_mut(&mut self, r: Register) -> &mut u32 {
        match r {
            Register::Eax => &mut self.eax,
            Register::Ebx => &mut self.ebx,
            Register::Ecx => &mut self.ecx,
            Register::Edx => &mut self.edx,
        }
    }
}

/// Everything the guest read, sorted by (leaf, subleaf) and by MSR index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidTable {
    /// Every CPUID (leaf, sub-leaf) answer the guest read, one per pair once canonicalized.
    pub entries: Vec<CpuidEntry>,
    /// The feature MSRs the guest read, sorted by index once canonicalized; JSON without an
    /// `msrs` key reads as an empty list.
    #[serde(default)]
    pub msrs: Vec<MsrEntry>,
}

impl CpuidTable {
    /// Sorts and de-duplicates so two tables compare entry by entry.
    pub fn canonicalize(&mut self) {
        self.entries.sort();
        self.entries.dedup_by_key(|e| (e.leaf, e.subleaf));
        self.msrs.sort();
        self.msrs.dedup_by_key(|m| m.index);
    }

    /// The answer for (`leaf`, `subleaf`), or `None` when the guest did not read it. Expects a
    /// canonicalized table (it binary-searches).
    pub fn get(&self, leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
        self.entries
            .binary_search_by_key(&(leaf, subleaf), |e| (e.leaf, e.subleaf))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The value of MSR `index`, or `None` when the guest did not read it. Expects a
    /// canonicalized table (it binary-searches).
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs
            .binary_search_by_key(&index, |m| m.index)
            .ok()
            .map(|i| self.msrs[i].value)
    }

    /// The text a digest of this (normalized) table is computed over, `version` being the
    /// fingerprint format's. Fixed here rather than borrowed from the dump writers so that a
    /// change of dump format cannot silently change every digest.
    pub fn canonical_text(&self, version: u32) -> String {
        let mut table = self.clone();
        table.canonicalize();
        // Written in place (one allocation, not one per line): the hook computes this on its
        // warm path. Writing to a String cannot fail.
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
}
