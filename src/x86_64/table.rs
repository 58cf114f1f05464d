//! The CPUID table a guest sees: every (leaf, sub-leaf) the probe read, plus the feature MSRs.
//!
//! This is the unit of measurement cpuguard compares. It is deliberately plain data: the probe
//! fills it, normalization masks it, the diff explains it, the cache stores it as JSON.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One CPUID query and its answer. `subleaf` is the ECX input (0 for leaves without sub-leaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub leaf: u32,
    pub subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// One model-specific register read by the guest (only MSRs whose presence CPUID enumerates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub value: u64,
}

/// The 32-bit registers of a CPUID answer, in the order the SDM names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl CpuidEntry {
    pub fn reg(&self, r: Register) -> u32 {
        match r {
            Register::Eax => self.eax,
            Register::Ebx => self.ebx,
            Register::Ecx => self.ecx,
            Register::Edx => self.edx,
        }
    }

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
    pub entries: Vec<CpuidEntry>,
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

    pub fn get(&self, leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
        self.entries
            .binary_search_by_key(&(leaf, subleaf), |e| (e.leaf, e.subleaf))
            .ok()
            .map(|i| &self.entries[i])
    }

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
