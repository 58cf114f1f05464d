//! The aarch64 system registers the probe reads, one table: each register's name, its MRS
//! encoding (what the probe program reads and prints) and its fields (from the Arm ARM,
//! DDI 0487, what a difference is explained by). Dependency-free, because build.rs includes this
//! file by path for the probe generator (`probe/firmware.rs`).
//!
//! Field kinds follow the Arm "ID register scheme" (DDI 0487 D19.1.3): most 4-bit feature fields
//! are unsigned and a higher value means more capability; a few are signed (0xF = not
//! implemented, e.g. ID_AA64PFR0_EL1.FP). Identification and cache-geometry fields (MIDR, CTR,
//! CLIDR, DCZID) have no order: a difference there is "changed", never "lost"/"gained".

/// How a field's values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Feature field, higher = more capability.
    Unsigned,
    /// Feature field read as two's complement: -1 (0xF) = not implemented, 0 = implemented, ...
    Signed,
    /// Identification or geometry: values are not ordered.
    Identity,
}

/// One field of an ID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDef {
    /// Field name as the Arm ARM spells it (`AES`, `PartNum`).
    pub name: &'static str,
    /// Bit position of the field's least significant bit in the register (0..=63).
    pub lsb: u8,
    /// Field width in bits (4 for most feature fields, up to 64).
    pub width: u8,
    /// How values of this field compare (decides "lost"/"gained" versus "changed").
    pub kind: FieldKind,
    /// Meaning of some values, for explanations (`2` -> `AES+PMULL`).
    pub values: &'static [(u64, &'static str)],
}

impl FieldDef {
    /// The field's bits in place in the register (`width` ones shifted left by `lsb`).
    pub fn mask(&self) -> u64 {
        if self.width >= 64 {
            u64::MAX
        } else {
            ((1u64 << self.width) - 1) << self.lsb
        }
    }

    /// The raw field value (unsigned, as stored).
    pub fn extract(&self, register: u64) -> u64 {
        (register & self.mask()) >> self.lsb
    }

    /// The value used for ordering: sign-extended for [`FieldKind::Signed`].
    pub fn ordinal(&self, register: u64) -> i64 {
        let raw = self.extract(register);
        match self.kind {
            FieldKind::Signed if self.width < 64 && raw >> (self.width - 1) & 1 == 1 => {
                raw as i64 - (1i64 << self.width)
            }
            _ => raw as i64,
        }
    }

    /// `raw` in hex with its meaning when the table knows it: `0x2 (AES+PMULL)` or just `0x2`.
    pub fn describe(&self, raw: u64) -> String {
        match self.values.iter().find(|(v, _)| *v == raw) {
            Some((_, meaning)) => format!("{raw:#x} ({meaning})"),
            None => format!("{raw:#x}"),
        }
    }
}

/// One system register: its name, its MRS encoding and (for the ID registers) its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysReg {
    /// Architectural register name (`ID_AA64ISAR0_EL1`), as the Arm ARM and reports spell it.
    pub name: &'static str,
    /// MRS encoding field op0 (3 for every register read here).
    pub op0: u8,
    /// MRS encoding field op1 (0..=7).
    pub op1: u8,
    /// MRS encoding field CRn (0..=15).
    pub crn: u8,
    /// MRS encoding field CRm (0..=15).
    pub crm: u8,
    /// MRS encoding field op2 (0..=7).
    pub op2: u8,
    /// Empty for the registers the probe program uses but does not report.
    pub fields: &'static [FieldDef],
}

impl SysReg {
    /// A register by its encoding, without fields.
    pub const fn new(name: &'static str, op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> SysReg {
        SysReg {
            name,
            op0,
            op1,
            crn,
            crm,
            op2,
            fields: &[],
        }
    }

    /// The same register described by `fields`.
    pub const fn with_fields(self, fields: &'static [FieldDef]) -> SysReg {
        SysReg { fields, ..self }
    }

    /// The generic assembler spelling, `S3_0_C0_C4_0`: what the probe prints and what GNU as
    /// accepts for any register.
    pub fn encoding(&self) -> String {
        format!(
            "S{}_{}_C{}_C{}_{}",
            self.op0, self.op1, self.crn, self.crm, self.op2
        )
    }

    /// Bits that no field describes (RES0/RES1 or fields newer than this table).
    pub fn unnamed_bits(&self) -> u64 {
        !self.fields.iter().fold(0u64, |acc, f| acc | f.mask())
    }
}

const fn u(name: &'static str, lsb: u8, width: u8) -> FieldDef {
    FieldDef {
        name,
        lsb,
        width,
        kind: FieldKind::Unsigned,
        values: &[],
    }
}
const fn uv(
    name: &'static str,
    lsb: u8,
    width: u8,
    values: &'static [(u64, &'static str)],
) -> FieldDef {
    FieldDef {
        name,
        lsb,
        width,
        kind: FieldKind::Unsigned,
        values,
    }
}
const fn s(name: &'static str, lsb: u8, values: &'static [(u64, &'static str)]) -> FieldDef {
    FieldDef {
        name,
        lsb,
        width: 4,
        kind: FieldKind::Signed,
        values,
    }
}
const fn id(name: &'static str, lsb: u8, width: u8) -> FieldDef {
    FieldDef {
        name,
        lsb,
        width,
        kind: FieldKind::Identity,
        values: &[],
    }
}

const EL_SUPPORT: &[(u64, &str)] = &[
    (0, "not implemented"),
    (1, "AArch64 only"),
    (2, "AArch64 and AArch32"),
];
const FP_SIMD: &[(u64, &str)] = &[
    (0, "implemented"),
    (1, "implemented with half-precision"),
    (0xF, "not implemented"),
];
const NONE_IMPL: &[(u64, &str)] = &[(0, "none"), (1, "implemented")];

/// Every register the probe reads, in output order, with its MRS encoding and its fields.
/// Unallocated encodings in the ID space (op0=3, op1=0, CRn=0, CRm=0..7) read as zero per the
/// Arm ARM, so registers newer than the guest's CPU model (MMFR3, SMFR0 on a Cortex-A57) read as
/// 0 instead of trapping; the probe's vector table still records a trap as "absent" should a
/// hypervisor choose to inject one.
pub const REGISTERS: &[SysReg] = &[
    SysReg::new("MIDR_EL1", 3, 0, 0, 0, 0).with_fields(&[
        id("Revision", 0, 4),
        id("PartNum", 4, 12),
        id("Architecture", 16, 4),
        id("Variant", 20, 4),
        id("Implementer", 24, 8),
    ]),
    SysReg::new("REVIDR_EL1", 3, 0, 0, 0, 6).with_fields(&[id("REVIDR", 0, 64)]),
    SysReg::new("MPIDR_EL1", 3, 0, 0, 0, 5).with_fields(&[
        id("Aff0", 0, 8),
        id("Aff1", 8, 8),
        id("Aff2", 16, 8),
        id("MT", 24, 1),
        id("U", 30, 1),
        id("Aff3", 32, 8),
    ]),
    SysReg::new("ID_AA64PFR0_EL1", 3, 0, 0, 4, 0).with_fields(&[
        uv("EL0", 0, 4, EL_SUPPORT),
        uv("EL1", 4, 4, EL_SUPPORT),
        uv("EL2", 8, 4, EL_SUPPORT),
        uv("EL3", 12, 4, EL_SUPPORT),
        s("FP", 16, FP_SIMD),
        s("AdvSIMD", 20, FP_SIMD),
        uv(
            "GIC",
            24,
            4,
            &[(0, "no system registers"), (1, "GICv3/4"), (3, "GICv4.1")],
        ),
        uv("RAS", 28, 4, &[(0, "none"), (1, "RAS"), (2, "RASv1p1")]),
        uv("SVE", 32, 4, NONE_IMPL),
        u("SEL2", 36, 4),
        u("MPAM", 40, 4),
        u("AMU", 44, 4),
        u("DIT", 48, 4),
        u("RME", 52, 4),
        u("CSV2", 56, 4),
        u("CSV3", 60, 4),
    ]),
    SysReg::new("ID_AA64PFR1_EL1", 3, 0, 0, 4, 1).with_fields(&[
        uv("BT", 0, 4, NONE_IMPL),
        uv(
            "SSBS",
            4,
            4,
            &[
                (0, "none"),
                (1, "PSTATE.SSBS"),
                (2, "PSTATE.SSBS and MSR/MRS"),
            ],
        ),
        uv(
            "MTE",
            8,
            4,
            &[
                (0, "none"),
                (1, "EL0 instructions"),
                (2, "MTE2"),
                (3, "MTE3"),
            ],
        ),
        u("RAS_frac", 12, 4),
        u("MPAM_frac", 16, 4),
        uv("SME", 24, 4, &[(0, "none"), (1, "SME"), (2, "SME2")]),
        u("RNDR_trap", 28, 4),
        u("CSV2_frac", 32, 4),
        u("NMI", 36, 4),
        u("MTE_frac", 40, 4),
        u("GCS", 44, 4),
        u("THE", 48, 4),
        u("MTEX", 52, 4),
        u("DF2", 56, 4),
        u("PFAR", 60, 4),
    ]),
    SysReg::new("ID_AA64ZFR0_EL1", 3, 0, 0, 4, 4).with_fields(&[
        uv("SVEver", 0, 4, &[(0, "SVE"), (1, "SVE2"), (2, "SVE2.1")]),
        uv(
            "AES",
            4,
            4,
            &[(0, "none"), (1, "AESE etc."), (2, "and PMULL128")],
        ),
        u("BitPerm", 16, 4),
        u("BF16", 20, 4),
        u("B16B16", 24, 4),
        u("SHA3", 32, 4),
        u("SM4", 40, 4),
        u("I8MM", 44, 4),
        u("F32MM", 52, 4),
        u("F64MM", 56, 4),
    ]),
    SysReg::new("ID_AA64SMFR0_EL1", 3, 0, 0, 4, 5).with_fields(&[
        u("F32F32", 32, 1),
        u("BI32I32", 33, 1),
        u("B16F32", 34, 1),
        u("F16F32", 35, 1),
        u("I8I32", 36, 4),
        u("F8F32", 40, 1),
        u("F8F16", 41, 1),
        u("F16F16", 42, 1),
        u("B16B16", 43, 1),
        u("I16I32", 44, 4),
        u("F64F64", 48, 1),
        u("I16I64", 52, 4),
        u("SMEver", 56, 4),
        u("LUTv2", 60, 1),
        u("FA64", 63, 1),
    ]),
    SysReg::new("ID_AA64DFR0_EL1", 3, 0, 0, 5, 0).with_fields(&[
        u("DebugVer", 0, 4),
        u("TraceVer", 4, 4),
        uv(
            "PMUVer",
            8,
            4,
            &[
                (0, "none"),
                (1, "PMUv3"),
                (4, "PMUv3p1"),
                (5, "PMUv3p4"),
                (6, "PMUv3p5"),
                (7, "PMUv3p7"),
                (8, "PMUv3p8"),
                (9, "PMUv3p9"),
                (0xF, "IMPLEMENTATION DEFINED"),
            ],
        ),
        u("BRPs", 12, 4),
        u("PMSS", 16, 4),
        u("WRPs", 20, 4),
        u("SEBEP", 24, 4),
        u("CTX_CMPs", 28, 4),
        u("PMSVer", 32, 4),
        s(
            "DoubleLock",
            36,
            &[(0, "implemented"), (0xF, "not implemented")],
        ),
        u("TraceFilt", 40, 4),
        u("TraceBuffer", 44, 4),
        s("MTPMU", 48, &[]),
        u("BRBE", 52, 4),
        u("ExtTrcBuff", 56, 4),
        u("HPMN0", 60, 4),
    ]),
    // Its fields are all from Armv8.9/9.4 extensions no QEMU 7.2 model has; compared whole.
    SysReg::new("ID_AA64DFR1_EL1", 3, 0, 0, 5, 1).with_fields(&[u("DFR1", 0, 64)]),
    SysReg::new("ID_AA64ISAR0_EL1", 3, 0, 0, 6, 0).with_fields(&[
        uv("AES", 4, 4, &[(0, "none"), (1, "AES"), (2, "AES+PMULL")]),
        uv("SHA1", 8, 4, NONE_IMPL),
        uv(
            "SHA2",
            12,
            4,
            &[(0, "none"), (1, "SHA256"), (2, "SHA256+SHA512")],
        ),
        uv("CRC32", 16, 4, NONE_IMPL),
        uv("Atomic", 20, 4, &[(0, "none"), (2, "LSE"), (3, "LSE128")]),
        u("TME", 24, 4),
        uv("RDM", 28, 4, NONE_IMPL),
        uv("SHA3", 32, 4, NONE_IMPL),
        uv("SM3", 36, 4, NONE_IMPL),
        uv("SM4", 40, 4, NONE_IMPL),
        uv("DP", 44, 4, NONE_IMPL),
        uv("FHM", 48, 4, NONE_IMPL),
        uv("TS", 52, 4, &[(0, "none"), (1, "FlagM"), (2, "FlagM2")]),
        u("TLB", 56, 4),
        uv("RNDR", 60, 4, NONE_IMPL),
    ]),
    SysReg::new("ID_AA64ISAR1_EL1", 3, 0, 0, 6, 1).with_fields(&[
        u("DPB", 0, 4),
        u("APA", 4, 4),
        u("API", 8, 4),
        u("JSCVT", 12, 4),
        u("FCMA", 16, 4),
        u("LRCPC", 20, 4),
        u("GPA", 24, 4),
        u("GPI", 28, 4),
        u("FRINTTS", 32, 4),
        u("SB", 36, 4),
        u("SPECRES", 40, 4),
        u("BF16", 44, 4),
        u("DGH", 48, 4),
        u("I8MM", 52, 4),
        u("XS", 56, 4),
        u("LS64", 60, 4),
    ]),
    SysReg::new("ID_AA64ISAR2_EL1", 3, 0, 0, 6, 2).with_fields(&[
        u("WFxT", 0, 4),
        u("RPRES", 4, 4),
        u("GPA3", 8, 4),
        u("APA3", 12, 4),
        u("MOPS", 16, 4),
        u("BC", 20, 4),
        u("PAC_frac", 24, 4),
        u("CLRBHB", 28, 4),
        u("SYSREG_128", 32, 4),
        u("SYSINSTR_128", 36, 4),
        u("PRFMSLC", 40, 4),
        u("RPRFM", 48, 4),
        u("CSSC", 52, 4),
        u("LUT", 56, 4),
        u("ATS1A", 60, 4),
    ]),
    SysReg::new("ID_AA64MMFR0_EL1", 3, 0, 0, 7, 0).with_fields(&[
        uv(
            "PARange",
            0,
            4,
            &[
                (0, "32 bits"),
                (1, "36 bits"),
                (2, "40 bits"),
                (3, "42 bits"),
                (4, "44 bits"),
                (5, "48 bits"),
                (6, "52 bits"),
            ],
        ),
        uv("ASIDBits", 4, 4, &[(0, "8 bits"), (2, "16 bits")]),
        u("BigEnd", 8, 4),
        u("SNSMem", 12, 4),
        u("BigEndEL0", 16, 4),
        u("TGran16", 20, 4),
        s("TGran64", 24, &[(0, "supported"), (0xF, "not supported")]),
        s(
            "TGran4",
            28,
            &[(0, "supported"), (1, "52-bit"), (0xF, "not supported")],
        ),
        u("TGran16_2", 32, 4),
        u("TGran64_2", 36, 4),
        u("TGran4_2", 40, 4),
        u("ExS", 44, 4),
        u("FGT", 56, 4),
        u("ECV", 60, 4),
    ]),
    SysReg::new("ID_AA64MMFR1_EL1", 3, 0, 0, 7, 1).with_fields(&[
        u("HAFDBS", 0, 4),
        uv("VMIDBits", 4, 4, &[(0, "8 bits"), (2, "16 bits")]),
        u("VH", 8, 4),
        u("HPDS", 12, 4),
        u("LO", 16, 4),
        u("PAN", 20, 4),
        u("SpecSEI", 24, 4),
        u("XNX", 28, 4),
        u("TWED", 32, 4),
        u("ETS", 36, 4),
        u("HCX", 40, 4),
        u("AFP", 44, 4),
        u("nTLBPA", 48, 4),
        u("TIDCP1", 52, 4),
        u("CMOW", 56, 4),
        u("ECBHB", 60, 4),
    ]),
    SysReg::new("ID_AA64MMFR2_EL1", 3, 0, 0, 7, 2).with_fields(&[
        u("CnP", 0, 4),
        u("UAO", 4, 4),
        u("LSM", 8, 4),
        u("IESB", 12, 4),
        uv("VARange", 16, 4, &[(0, "48 bits"), (1, "52 bits")]),
        u("CCIDX", 20, 4),
        u("NV", 24, 4),
        u("ST", 28, 4),
        u("AT", 32, 4),
        u("IDS", 36, 4),
        u("FWB", 40, 4),
        u("TTL", 48, 4),
        u("BBM", 52, 4),
        u("EVT", 56, 4),
        u("E0PD", 60, 4),
    ]),
    SysReg::new("ID_AA64MMFR3_EL1", 3, 0, 0, 7, 3).with_fields(&[
        u("TCRX", 0, 4),
        u("SCTLRX", 4, 4),
        u("S1PIE", 8, 4),
        u("S2PIE", 12, 4),
        u("S1POE", 16, 4),
        u("S2POE", 20, 4),
        u("AIE", 24, 4),
        u("MEC", 28, 4),
        u("D128", 32, 4),
        u("D128_2", 36, 4),
        u("SNERR", 40, 4),
        u("ANERR", 44, 4),
        u("SDERR", 52, 4),
        u("ADERR", 56, 4),
        u("Spec_FPACC", 60, 4),
    ]),
    SysReg::new("CTR_EL0", 3, 3, 0, 0, 1).with_fields(&[
        id("IminLine", 0, 4),
        id("L1Ip", 14, 2),
        id("DminLine", 16, 4),
        id("ERG", 20, 4),
        id("CWG", 24, 4),
        id("IDC", 28, 1),
        id("DIC", 29, 1),
        id("TminLine", 32, 6),
    ]),
    SysReg::new("DCZID_EL0", 3, 3, 0, 0, 7).with_fields(&[id("BS", 0, 4), id("DZP", 4, 1)]),
    SysReg::new("CLIDR_EL1", 3, 1, 0, 0, 1).with_fields(&[
        id("Ctype1", 0, 3),
        id("Ctype2", 3, 3),
        id("Ctype3", 6, 3),
        id("Ctype4", 9, 3),
        id("Ctype5", 12, 3),
        id("Ctype6", 15, 3),
        id("Ctype7", 18, 3),
        id("LoUIS", 21, 3),
        id("LoC", 24, 3),
        id("LoUU", 27, 3),
        id("ICB", 30, 3),
    ]),
];

/// The definition of a register by name.
pub fn register_def(name: &str) -> Option<&'static SysReg> {
    REGISTERS.iter().find(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probed_register_has_a_definition_and_fields_do_not_overlap() {
        for def in REGISTERS {
            let mut seen = 0u64;
            for f in def.fields {
                assert!(
                    f.width > 0 && u32::from(f.lsb) + u32::from(f.width) <= 64,
                    "{}.{}",
                    def.name,
                    f.name
                );
                assert_eq!(seen & f.mask(), 0, "{}.{} overlaps", def.name, f.name);
                seen |= f.mask();
            }
        }
        assert!(REGISTERS.iter().all(|r| !r.fields.is_empty()));
    }

    #[test]
    fn field_extraction_and_sign() {
        let isar0 = register_def("ID_AA64ISAR0_EL1").unwrap();
        let aes = isar0.fields.iter().find(|f| f.name == "AES").unwrap();
        // Cortex-A57 under QEMU: 0x11120 -> AES=2
        assert_eq!(aes.extract(0x11120), 2);
        assert_eq!(aes.describe(2), "0x2 (AES+PMULL)");
        let pfr0 = register_def("ID_AA64PFR0_EL1").unwrap();
        let fp = pfr0.fields.iter().find(|f| f.name == "FP").unwrap();
        assert_eq!(fp.ordinal(0xF << 16), -1);
        assert_eq!(fp.ordinal(1 << 16), 1);
        let sve = pfr0.fields.iter().find(|f| f.name == "SVE").unwrap();
        assert_eq!(sve.extract(0x1201_0011_2011_0022), 1);
        assert_eq!(pfr0.unnamed_bits(), 0);
        let midr = register_def("MIDR_EL1").unwrap();
        let part = midr.fields.iter().find(|f| f.name == "PartNum").unwrap();
        assert_eq!(part.extract(0x411f_d070), 0xd07);
    }
}
