//! Which CPUID leaves have sub-leaves (an ECX input), and how each is enumerated, as the SDM
//! (vol. 2A, CPUID) and the AMD APM (vol. 3) define them: written once for the probe generator
//! (build.rs, which emits one enumeration per rule) and for the crate (which writes a location
//! `CPUID.0x7.0` or just `CPUID.0x1`). Dependency-free, because build.rs includes this file by
//! path.

/// A CPUID output register, as the rules name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutReg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// How the sub-leaves of one leaf are discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subleaves {
    /// Sub-leaves 0..=EAX of sub-leaf 0.
    MaxInEax,
    /// Sub-leaves 0..=N.
    Fixed(u32),
    /// Sub-leaves from 0 (or from `first`) until `(reg & mask) == 0`, that terminating one included.
    Until {
        /// The first sub-leaf tested for the end; those below it are always queried (SGX: 0, 1).
        first: u32,
        /// The register tested on each sub-leaf's answer.
        reg: OutReg,
        /// The bits of `reg` that are all zero in the terminating sub-leaf.
        mask: u32,
    },
    /// Sub-leaf 0, then sub-leaf i for each bit i (1..=31) set in `reg` of sub-leaf 0.
    Bitmap {
        /// The register of sub-leaf 0 that holds the bitmap of further sub-leaves.
        reg: OutReg,
    },
}

/// Leaves with sub-leaves, ascending. Every leaf not listed is queried with sub-leaf 0 only.
pub const SUBLEAF_RULES: &[(u32, Subleaves)] = &[
    // Deterministic cache parameters: until cache type EAX[4:0] == 0.
    (
        0x4,
        Subleaves::Until {
            first: 0,
            reg: OutReg::Eax,
            mask: 0x1F,
        },
    ),
    (0x7, Subleaves::MaxInEax),
    // Extended topology: until level type ECX[15:8] == 0.
    (
        0xB,
        Subleaves::Until {
            first: 0,
            reg: OutReg::Ecx,
            mask: 0xFF00,
        },
    ),
    // XSAVE components: all 64 (what exists follows XCR0/XSS bitmaps; absent ones read 0).
    (0xD, Subleaves::Fixed(63)),
    // RDT monitoring: sub-leaf i for resource bit i of EDX.
    (0xF, Subleaves::Bitmap { reg: OutReg::Edx }),
    // RDT allocation: sub-leaf i for resource bit i of EBX.
    (0x10, Subleaves::Bitmap { reg: OutReg::Ebx }),
    // SGX: sub-leaves 0 and 1, then EPC sections from 2 until type EAX[3:0] == 0.
    (
        0x12,
        Subleaves::Until {
            first: 2,
            reg: OutReg::Eax,
            mask: 0xF,
        },
    ),
    (0x14, Subleaves::MaxInEax),
    (0x17, Subleaves::MaxInEax),
    (0x18, Subleaves::MaxInEax),
    // PCONFIG: until target type EAX[11:0] == 0.
    (
        0x1B,
        Subleaves::Until {
            first: 0,
            reg: OutReg::Eax,
            mask: 0xFFF,
        },
    ),
    (0x1D, Subleaves::MaxInEax),
    (0x1E, Subleaves::MaxInEax),
    // V2 extended topology: until level type ECX[15:8] == 0.
    (
        0x1F,
        Subleaves::Until {
            first: 0,
            reg: OutReg::Ecx,
            mask: 0xFF00,
        },
    ),
    (0x20, Subleaves::MaxInEax),
    // Architectural performance monitoring extended: EAX of sub-leaf 0 is a sub-leaf bitmap.
    (0x23, Subleaves::Bitmap { reg: OutReg::Eax }),
    (0x24, Subleaves::MaxInEax),
    // AMD cache topology: until cache type EAX[4:0] == 0.
    (
        0x8000_001D,
        Subleaves::Until {
            first: 0,
            reg: OutReg::Eax,
            mask: 0x1F,
        },
    ),
    // AMD platform QoS enforcement: sub-leaf i for bit i of EBX.
    (0x8000_0020, Subleaves::Bitmap { reg: OutReg::Ebx }),
    // AMD extended CPU topology: until level type ECX[15:8] == 0.
    (
        0x8000_0026,
        Subleaves::Until {
            first: 0,
            reg: OutReg::Ecx,
            mask: 0xFF00,
        },
    ),
];

/// True for a leaf whose ECX input selects a sub-leaf.
pub fn leaf_has_subleaves(leaf: u32) -> bool {
    SUBLEAF_RULES
        .binary_search_by_key(&leaf, |(l, _)| *l)
        .is_ok()
}
