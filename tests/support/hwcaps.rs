//! What an aarch64 Linux guest reports about its CPU, derived from the ID registers the probe
//! measured: the `/proc/cpuinfo` "Features" names (the kernel's ELF hwcaps) and the identification
//! lines decoded from MIDR_EL1.
//!
//! The rules are Linux 6.1's (the Debian 12 kernel, 6.1.y), from
//! `arch/arm64/kernel/cpufeature.c` `arm64_elf_hwcaps[]`, its `ptr_auth_hwcap_*_matches` lists,
//! `has_user_cpuid_feature()` and `user_feature_fixup()`, and `arch/arm64/kernel/cpuinfo.c`
//! (`hwcap_str[]`, `c_show()`). A hwcap is set when the system-wide ("sanitised") value of its
//! field reaches a minimum; with identical vCPUs that is the value each one reads. Three things
//! besides the field decide it:
//!
//! - the kernel configuration: a hwcap inside `#ifdef CONFIG_ARM64_SVE` (SME, MTE, BTI,
//!   PTR_AUTH) does not exist without it, and the same option hides the field from user space
//!   (`FTR_VISIBLE_IF_IS_ENABLED`), see [`KernelConfig`];
//! - erratum 3194386 (CONFIG_ARM64_ERRATUM_3194386, backported to 6.1.y): on the CPUs it lists
//!   by MIDR the SSBS field is hidden from user space, so no `ssbs`;
//! - two names do not come from a field at all: `cpuid` is set unconditionally (the kernel
//!   emulates user-space MRS of the ID registers), so it is always expected; `evtstrm` is set by
//!   the arch timer driver when it enables the event stream (a kernel command-line option can
//!   turn that off), so it is reported as undecidable rather than guessed.
//!
//! Newer kernels add names (e.g. `mops`, `cssc`, `sme2`); they are not in this table because a
//! 6.1 kernel cannot print them.

// Each test binary that includes this file uses its own part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;

use cpuguard::aarch64::sysregs::{register_def, FieldDef};
use cpuguard::aarch64::{ArmIdTable, Midr};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HwcapError {
    #[error("ID-register table has no readable {register}: cannot derive the hwcaps that need it")]
    MissingRegister { register: &'static str },
    #[error(
        "hwcap rule {hwcap:?} names {register}.{field}, which src/aarch64/sysregs.rs does not define"
    )]
    UnknownField {
        hwcap: &'static str,
        register: &'static str,
        field: &'static str,
    },
    #[error("/proc/cpuinfo line {line}: {reason}: {text:?}")]
    Cpuinfo {
        line: usize,
        reason: &'static str,
        text: String,
    },
    #[error("/proc/cpuinfo processor block starting at line {line} has no {missing:?} line")]
    IncompleteBlock { line: usize, missing: &'static str },
    #[error("/proc/cpuinfo lists no processor")]
    NoProcessor,
}

/// A kernel build option that decides whether some hwcaps exist at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelOption {
    Sve,
    Sme,
    Bti,
    PtrAuth,
    Mte,
}

impl KernelOption {
    pub const ALL: [KernelOption; 5] = [
        KernelOption::Sve,
        KernelOption::Sme,
        KernelOption::Bti,
        KernelOption::PtrAuth,
        KernelOption::Mte,
    ];

    /// The Kconfig symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            KernelOption::Sve => "CONFIG_ARM64_SVE",
            KernelOption::Sme => "CONFIG_ARM64_SME",
            KernelOption::Bti => "CONFIG_ARM64_BTI",
            KernelOption::PtrAuth => "CONFIG_ARM64_PTR_AUTH",
            KernelOption::Mte => "CONFIG_ARM64_MTE",
        }
    }
}

/// The build options of the guest's kernel that change its hwcaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConfig {
    pub sve: bool,
    pub sme: bool,
    pub bti: bool,
    pub ptr_auth: bool,
    pub mte: bool,
    /// CONFIG_ARM64_ERRATUM_3194386: hides SSBS on the CPUs of [`SPEC_SSBS_PARTS`].
    pub erratum_3194386: bool,
}

/// Debian 12's `linux-image-6.1.0-*-arm64` (`/boot/config-6.1.0-*-arm64`): SME is off.
pub const DEBIAN_12_KERNEL: KernelConfig = KernelConfig {
    sve: true,
    sme: false,
    bti: true,
    ptr_auth: true,
    mte: true,
    erratum_3194386: true,
};

impl KernelConfig {
    pub fn enabled(&self, option: KernelOption) -> bool {
        match option {
            KernelOption::Sve => self.sve,
            KernelOption::Sme => self.sme,
            KernelOption::Bti => self.bti,
            KernelOption::PtrAuth => self.ptr_auth,
            KernelOption::Mte => self.mte,
        }
    }

    /// Reads the options from a kernel `.config` (`/boot/config-*`); an option that is absent or
    /// `# ... is not set` is off.
    pub fn from_kconfig(text: &str) -> KernelConfig {
        let on = |symbol: &str| {
            text.lines()
                .any(|l| l.trim() == format!("{symbol}=y").as_str())
        };
        KernelConfig {
            sve: on(KernelOption::Sve.symbol()),
            sme: on(KernelOption::Sme.symbol()),
            bti: on(KernelOption::Bti.symbol()),
            ptr_auth: on(KernelOption::PtrAuth.symbol()),
            mte: on(KernelOption::Mte.symbol()),
            erratum_3194386: on("CONFIG_ARM64_ERRATUM_3194386"),
        }
    }
}

/// Arm Ltd. part numbers of `erratum_spec_ssbs_list` (cpu_errata.c, 6.1.y): Cortex-A76, A77,
/// A78, A78C, A710, A715, A720, A725, X1, X1C, X2, X3, X4, X925, Neoverse N1, N2, N3, V1, V2,
/// V3, V3AE; all variants and revisions.
pub const SPEC_SSBS_PARTS: &[u16] = &[
    0xD0B, 0xD0D, 0xD41, 0xD4B, 0xD47, 0xD4D, 0xD81, 0xD87, 0xD44, 0xD4C, 0xD48, 0xD4E, 0xD82,
    0xD85, 0xD0C, 0xD49, 0xD8E, 0xD40, 0xD4F, 0xD84, 0xD83,
];
const ARM_LTD: u8 = 0x41;

/// "`register.field` >= `min`", the field read as the kernel reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldRule {
    pub register: &'static str,
    /// The field's name in src/aarch64/sysregs.rs `REGISTERS`, whose bits it is (the kernel's
    /// `*_SHIFT` and width are the same, by definition of the field).
    pub field: &'static str,
    /// FTR_SIGNED: 0xF reads as -1 ("not implemented").
    pub signed: bool,
    pub min: i64,
}

impl FieldRule {
    /// The field's value as the kernel compares it, `field` being the rule's field.
    pub fn value(&self, field: &FieldDef, register: u64) -> i64 {
        let raw = field.extract(register);
        if self.signed && field.width < 64 && raw >> (field.width - 1) & 1 == 1 {
            raw as i64 - (1i64 << field.width)
        } else {
            raw as i64
        }
    }

    /// `ID_AA64ISAR0_EL1.AES >= 2`
    pub fn describe(&self) -> String {
        let sign = if self.signed { " (signed)" } else { "" };
        format!("{}.{} >= {}{sign}", self.register, self.field, self.min)
    }
}

/// Where a hwcap comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwcapSource {
    /// One field reaching a minimum.
    Field(FieldRule),
    /// Any of these fields reaching its minimum (`HWCAP_MULTI_CAP`).
    AnyOf(&'static [FieldRule]),
    /// Set by every kernel of this version, whatever the registers say.
    Always { why: &'static str },
    /// Not decided by the ID registers.
    NotFromIdRegisters { why: &'static str },
}

/// One `/proc/cpuinfo` Features name and its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HwcapDef {
    pub name: &'static str,
    pub source: HwcapSource,
    /// The `#ifdef` around the rule (and the option gating the field's user visibility).
    pub config: Option<KernelOption>,
}

const fn f(register: &'static str, field: &'static str, min: i64) -> FieldRule {
    FieldRule {
        register,
        field,
        signed: false,
        min,
    }
}
const fn signed(register: &'static str, field: &'static str, min: i64) -> FieldRule {
    FieldRule {
        register,
        field,
        signed: true,
        min,
    }
}
/// A one-bit field: set or not.
const fn bit(register: &'static str, field: &'static str) -> FieldRule {
    FieldRule {
        register,
        field,
        signed: false,
        min: 1,
    }
}
const fn cap(name: &'static str, rule: FieldRule) -> HwcapDef {
    HwcapDef {
        name,
        source: HwcapSource::Field(rule),
        config: None,
    }
}
const fn cap_if(name: &'static str, option: KernelOption, rule: FieldRule) -> HwcapDef {
    HwcapDef {
        name,
        source: HwcapSource::Field(rule),
        config: Some(option),
    }
}

const ISAR0: &str = "ID_AA64ISAR0_EL1";
const ISAR1: &str = "ID_AA64ISAR1_EL1";
const ISAR2: &str = "ID_AA64ISAR2_EL1";
const PFR0: &str = "ID_AA64PFR0_EL1";
const PFR1: &str = "ID_AA64PFR1_EL1";
const ZFR0: &str = "ID_AA64ZFR0_EL1";
const SMFR0: &str = "ID_AA64SMFR0_EL1";
const MMFR0: &str = "ID_AA64MMFR0_EL1";
const MMFR1: &str = "ID_AA64MMFR1_EL1";
const MMFR2: &str = "ID_AA64MMFR2_EL1";

/// `ptr_auth_hwcap_addr_matches`: QARMA5 (APA), QARMA3 (APA3) or IMPDEF (API) address auth.
const PACA: &[FieldRule] = &[f(ISAR1, "APA", 1), f(ISAR2, "APA3", 1), f(ISAR1, "API", 1)];
/// `ptr_auth_hwcap_gen_matches`: generic auth, same three algorithms.
const PACG: &[FieldRule] = &[f(ISAR1, "GPA", 1), f(ISAR2, "GPA3", 1), f(ISAR1, "GPI", 1)];

/// Linux 6.1's hwcaps in `hwcap_str[]` order, which is the order `/proc/cpuinfo` prints them.
pub const HWCAPS: &[HwcapDef] = &[
    cap("fp", signed(PFR0, "FP", 0)),
    cap("asimd", signed(PFR0, "AdvSIMD", 0)),
    HwcapDef {
        name: "evtstrm",
        source: HwcapSource::NotFromIdRegisters {
            why: "set by the arch timer driver when it enables the timer event stream \
                  (CONFIG_ARM_ARCH_TIMER_EVTSTREAM, clocksource.arm_arch_timer.evtstrm=)",
        },
        config: None,
    },
    cap("aes", f(ISAR0, "AES", 1)),
    cap("pmull", f(ISAR0, "AES", 2)),
    cap("sha1", f(ISAR0, "SHA1", 1)),
    cap("sha2", f(ISAR0, "SHA2", 1)),
    cap("crc32", f(ISAR0, "CRC32", 1)),
    cap("atomics", f(ISAR0, "Atomic", 2)),
    cap("fphp", signed(PFR0, "FP", 1)),
    cap("asimdhp", signed(PFR0, "AdvSIMD", 1)),
    HwcapDef {
        name: "cpuid",
        source: HwcapSource::Always {
            why: "setup_elf_hwcaps() always sets it: the kernel emulates EL0 reads of the ID \
                  registers",
        },
        config: None,
    },
    cap("asimdrdm", f(ISAR0, "RDM", 1)),
    cap("jscvt", f(ISAR1, "JSCVT", 1)),
    cap("fcma", f(ISAR1, "FCMA", 1)),
    cap("lrcpc", f(ISAR1, "LRCPC", 1)),
    cap("dcpop", f(ISAR1, "DPB", 1)),
    cap("sha3", f(ISAR0, "SHA3", 1)),
    cap("sm3", f(ISAR0, "SM3", 1)),
    cap("sm4", f(ISAR0, "SM4", 1)),
    cap("asimddp", f(ISAR0, "DP", 1)),
    cap("sha512", f(ISAR0, "SHA2", 2)),
    cap_if("sve", KernelOption::Sve, f(PFR0, "SVE", 1)),
    cap("asimdfhm", f(ISAR0, "FHM", 1)),
    cap("dit", f(PFR0, "DIT", 1)),
    cap("uscat", f(MMFR2, "AT", 1)),
    cap("ilrcpc", f(ISAR1, "LRCPC", 2)),
    cap("flagm", f(ISAR0, "TS", 1)),
    cap("ssbs", f(PFR1, "SSBS", 2)),
    cap("sb", f(ISAR1, "SB", 1)),
    HwcapDef {
        name: "paca",
        source: HwcapSource::AnyOf(PACA),
        config: Some(KernelOption::PtrAuth),
    },
    HwcapDef {
        name: "pacg",
        source: HwcapSource::AnyOf(PACG),
        config: Some(KernelOption::PtrAuth),
    },
    cap("dcpodp", f(ISAR1, "DPB", 2)),
    cap_if("sve2", KernelOption::Sve, f(ZFR0, "SVEver", 1)),
    cap_if("sveaes", KernelOption::Sve, f(ZFR0, "AES", 1)),
    cap_if("svepmull", KernelOption::Sve, f(ZFR0, "AES", 2)),
    cap_if("svebitperm", KernelOption::Sve, f(ZFR0, "BitPerm", 1)),
    cap_if("svesha3", KernelOption::Sve, f(ZFR0, "SHA3", 1)),
    cap_if("svesm4", KernelOption::Sve, f(ZFR0, "SM4", 1)),
    cap("flagm2", f(ISAR0, "TS", 2)),
    cap("frint", f(ISAR1, "FRINTTS", 1)),
    cap_if("svei8mm", KernelOption::Sve, f(ZFR0, "I8MM", 1)),
    cap_if("svef32mm", KernelOption::Sve, f(ZFR0, "F32MM", 1)),
    cap_if("svef64mm", KernelOption::Sve, f(ZFR0, "F64MM", 1)),
    cap_if("svebf16", KernelOption::Sve, f(ZFR0, "BF16", 1)),
    cap("i8mm", f(ISAR1, "I8MM", 1)),
    cap("bf16", f(ISAR1, "BF16", 1)),
    cap("dgh", f(ISAR1, "DGH", 1)),
    cap("rng", f(ISAR0, "RNDR", 1)),
    cap_if("bti", KernelOption::Bti, f(PFR1, "BT", 1)),
    cap_if("mte", KernelOption::Mte, f(PFR1, "MTE", 2)),
    cap("ecv", f(MMFR0, "ECV", 1)),
    cap("afp", f(MMFR1, "AFP", 1)),
    cap("rpres", f(ISAR2, "RPRES", 1)),
    cap_if("mte3", KernelOption::Mte, f(PFR1, "MTE", 3)),
    cap_if("sme", KernelOption::Sme, f(PFR1, "SME", 1)),
    // SMFR0: I16I64 and I8I32 are 4-bit fields whose only "implemented" value is 0b1111.
    cap_if("smei16i64", KernelOption::Sme, f(SMFR0, "I16I64", 0xF)),
    cap_if("smef64f64", KernelOption::Sme, bit(SMFR0, "F64F64")),
    cap_if("smei8i32", KernelOption::Sme, f(SMFR0, "I8I32", 0xF)),
    cap_if("smef16f32", KernelOption::Sme, bit(SMFR0, "F16F32")),
    cap_if("smeb16f32", KernelOption::Sme, bit(SMFR0, "B16F32")),
    cap_if("smef32f32", KernelOption::Sme, bit(SMFR0, "F32F32")),
    cap_if("smefa64", KernelOption::Sme, bit(SMFR0, "FA64")),
    // 6.1's ID_AA64ISAR2_EL1_WFxT_IMP is 0b0010.
    cap("wfxt", f(ISAR2, "WFxT", 2)),
    cap("ebf16", f(ISAR1, "BF16", 2)),
    cap_if("sveebf16", KernelOption::Sve, f(ZFR0, "BF16", 2)),
];

/// The hwcap definition by Features name.
pub fn hwcap_def(name: &str) -> Option<&'static HwcapDef> {
    HWCAPS.iter().find(|h| h.name == name)
}

/// Why a hwcap is expected absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbsentReason {
    /// The field(s) are below the minimum: `ID_AA64ISAR0_EL1.AES = 0, needs >= 1`.
    Field(String),
    /// The kernel is built without the option (the field may well advertise the feature).
    KernelConfig(KernelOption),
    /// An erratum workaround hides the field from user space on this CPU.
    Erratum(&'static str),
}

/// The expectation for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expectation {
    Present(String),
    Absent(AbsentReason),
    Undecidable(&'static str),
}

/// One hwcap's expectation, with the field values that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwcapExpectation {
    pub name: &'static str,
    pub expectation: Expectation,
    /// The ID-register fields advertise it (whatever the kernel configuration and errata say).
    pub advertised: bool,
}

/// What `/proc/cpuinfo` should say, for every hwcap Linux 6.1 knows, in cpuinfo order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedFeatures {
    pub hwcaps: Vec<HwcapExpectation>,
}

/// Features line against expectation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureComparison {
    /// Expected present, not printed.
    pub missing: Vec<&'static str>,
    /// Printed, expected absent (with the reason).
    pub unexpected: Vec<(&'static str, AbsentReason)>,
    /// Printed, but not a Linux 6.1 hwcap name at all.
    pub unknown: Vec<String>,
    /// Undecidable names the guest printed.
    pub undecidable_present: Vec<&'static str>,
    /// Derivable names compared.
    pub compared: usize,
}

impl FeatureComparison {
    pub fn agrees(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.unknown.is_empty()
    }
}

impl ExpectedFeatures {
    /// Names expected present, in cpuinfo order.
    pub fn present(&self) -> Vec<&'static str> {
        self.names(|e| matches!(e, Expectation::Present(_)))
    }

    /// Names expected absent, in cpuinfo order.
    pub fn absent(&self) -> Vec<&'static str> {
        self.names(|e| matches!(e, Expectation::Absent(_)))
    }

    /// Names the ID registers cannot decide, with why.
    pub fn undecidable(&self) -> Vec<(&'static str, &'static str)> {
        self.hwcaps
            .iter()
            .filter_map(|h| match h.expectation {
                Expectation::Undecidable(why) => Some((h.name, why)),
                _ => None,
            })
            .collect()
    }

    /// Names whose fields advertise the feature but that the kernel will not print (kernel
    /// configuration, errata), with the reason.
    pub fn advertised_but_hidden(&self) -> Vec<(&'static str, AbsentReason)> {
        self.hwcaps
            .iter()
            .filter_map(|h| match &h.expectation {
                Expectation::Absent(reason) if h.advertised => Some((h.name, reason.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&HwcapExpectation> {
        self.hwcaps.iter().find(|h| h.name == name)
    }

    fn names(&self, keep: impl Fn(&Expectation) -> bool) -> Vec<&'static str> {
        self.hwcaps
            .iter()
            .filter(|h| keep(&h.expectation))
            .map(|h| h.name)
            .collect()
    }

    /// Compares the names a guest printed with the expectation.
    pub fn compare<S: AsRef<str>>(&self, features: &[S]) -> FeatureComparison {
        let shown: BTreeSet<&str> = features.iter().map(AsRef::as_ref).collect();
        let mut out = FeatureComparison::default();
        for h in &self.hwcaps {
            match &h.expectation {
                Expectation::Present(_) => {
                    out.compared += 1;
                    if !shown.contains(h.name) {
                        out.missing.push(h.name);
                    }
                }
                Expectation::Absent(reason) => {
                    out.compared += 1;
                    if shown.contains(h.name) {
                        out.unexpected.push((h.name, reason.clone()));
                    }
                }
                Expectation::Undecidable(_) => {
                    if shown.contains(h.name) {
                        out.undecidable_present.push(h.name);
                    }
                }
            }
        }
        out.unknown = shown
            .iter()
            .filter(|name| hwcap_def(name).is_none())
            .map(|name| name.to_string())
            .collect();
        out
    }

    /// The Features line (without `Features\t:`) the kernel would print, given which
    /// undecidable names it printed.
    pub fn features_line(&self, undecidable_shown: &[&str]) -> String {
        self.hwcaps
            .iter()
            .filter(|h| match h.expectation {
                Expectation::Present(_) => true,
                Expectation::Absent(_) => false,
                Expectation::Undecidable(_) => undecidable_shown.contains(&h.name),
            })
            .map(|h| h.name)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// [`expected_features_for`] with the Debian 12 kernel's configuration.
pub fn expected_features(table: &ArmIdTable) -> Result<ExpectedFeatures, HwcapError> {
    expected_features_for(table, &DEBIAN_12_KERNEL)
}

/// The Features a Linux 6.1 kernel built with `config` prints for a CPU with the ID registers of
/// `table` (every vCPU alike).
pub fn expected_features_for(
    table: &ArmIdTable,
    config: &KernelConfig,
) -> Result<ExpectedFeatures, HwcapError> {
    let midr = table
        .get("MIDR_EL1")
        .map(Midr::decode)
        .ok_or(HwcapError::MissingRegister {
            register: "MIDR_EL1",
        })?;
    let ssbs_erratum_cpu = spec_ssbs_erratum(&midr);
    let mut hwcaps = Vec::with_capacity(HWCAPS.len());
    for def in HWCAPS {
        let rules: &[FieldRule] = match &def.source {
            HwcapSource::Field(rule) => std::slice::from_ref(rule),
            HwcapSource::AnyOf(rules) => rules,
            HwcapSource::Always { why } => {
                hwcaps.push(HwcapExpectation {
                    name: def.name,
                    expectation: Expectation::Present(format!("always: {why}")),
                    advertised: true,
                });
                continue;
            }
            HwcapSource::NotFromIdRegisters { why } => {
                hwcaps.push(HwcapExpectation {
                    name: def.name,
                    expectation: Expectation::Undecidable(why),
                    advertised: false,
                });
                continue;
            }
        };
        let mut met = None;
        let mut shortfalls = Vec::new();
        for rule in rules {
            let field = rule_field(def.name, rule)?;
            let register = table
                .get(rule.register)
                .ok_or(HwcapError::MissingRegister {
                    register: rule.register,
                })?;
            let value = rule.value(field, register);
            if value >= rule.min {
                met = Some(format!("{}.{} = {value}", rule.register, rule.field));
                break;
            }
            shortfalls.push(format!(
                "{}.{} = {value}, needs >= {}",
                rule.register, rule.field, rule.min
            ));
        }
        let advertised = met.is_some();
        let hidden_by_config = def.config.filter(|option| !config.enabled(*option));
        let expectation = match (met, hidden_by_config) {
            (None, _) => Expectation::Absent(AbsentReason::Field(shortfalls.join("; "))),
            (Some(_), Some(option)) => Expectation::Absent(AbsentReason::KernelConfig(option)),
            (Some(_), None)
                if def.name == "ssbs" && config.erratum_3194386 && ssbs_erratum_cpu =>
            {
                Expectation::Absent(AbsentReason::Erratum(
                    "erratum 3194386 (SSBS not fully self-synchronizing) hides SSBS from user space",
                ))
            }
            (Some(why), None) => Expectation::Present(why),
        };
        hwcaps.push(HwcapExpectation {
            name: def.name,
            expectation,
            advertised,
        });
    }
    Ok(ExpectedFeatures { hwcaps })
}

/// The rule's field as src/aarch64/sysregs.rs defines it.
fn rule_field(hwcap: &'static str, rule: &FieldRule) -> Result<&'static FieldDef, HwcapError> {
    let unknown = HwcapError::UnknownField {
        hwcap,
        register: rule.register,
        field: rule.field,
    };
    let def = register_def(rule.register).ok_or_else(|| unknown.clone())?;
    def.fields
        .iter()
        .find(|fd| fd.name == rule.field)
        .ok_or(unknown)
}

/// Whether erratum 3194386's workaround applies to this CPU.
pub fn spec_ssbs_erratum(midr: &Midr) -> bool {
    midr.implementer == ARM_LTD && SPEC_SSBS_PARTS.contains(&midr.part)
}

/// The identification lines `/proc/cpuinfo` prints for one CPU, as `c_show()` formats them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuinfoIdentity {
    /// `CPU implementer\t: 0x41`
    pub implementer: u8,
    /// Always 8 on arm64: `c_show()` prints a constant, not MIDR_EL1.Architecture (0xF).
    pub architecture: u8,
    pub variant: u8,
    pub part: u16,
    pub revision: u8,
}

impl CpuinfoIdentity {
    /// What the kernel prints for a CPU whose MIDR_EL1 is `midr`.
    pub fn from_midr(midr: u64) -> CpuinfoIdentity {
        let m = Midr::decode(midr);
        CpuinfoIdentity {
            implementer: m.implementer,
            architecture: 8,
            variant: m.variant,
            part: m.part,
            revision: m.revision,
        }
    }

    /// The five lines, byte for byte as the kernel prints them.
    pub fn lines(&self) -> [String; 5] {
        [
            format!("CPU implementer\t: 0x{:02x}", self.implementer),
            format!("CPU architecture: {}", self.architecture),
            format!("CPU variant\t: 0x{:x}", self.variant),
            format!("CPU part\t: 0x{:03x}", self.part),
            format!("CPU revision\t: {}", self.revision),
        ]
    }
}

/// One `processor` block of `/proc/cpuinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuinfoCpu {
    pub processor: u32,
    /// The Features names, in printed order.
    pub features: Vec<String>,
    pub identity: CpuinfoIdentity,
}

/// Parses an arm64 `/proc/cpuinfo` (native, not the 32-bit compat personality).
pub fn parse_cpuinfo(text: &str) -> Result<Vec<CpuinfoCpu>, HwcapError> {
    #[derive(Default)]
    struct Partial {
        processor: Option<u32>,
        features: Option<Vec<String>>,
        implementer: Option<u8>,
        architecture: Option<u8>,
        variant: Option<u8>,
        part: Option<u16>,
        revision: Option<u8>,
        first_line: usize,
    }
    fn finish(p: Partial) -> Result<CpuinfoCpu, HwcapError> {
        let missing = |what: &'static str| HwcapError::IncompleteBlock {
            line: p.first_line,
            missing: what,
        };
        Ok(CpuinfoCpu {
            processor: p.processor.ok_or_else(|| missing("processor"))?,
            features: p.features.clone().ok_or_else(|| missing("Features"))?,
            identity: CpuinfoIdentity {
                implementer: p.implementer.ok_or_else(|| missing("CPU implementer"))?,
                architecture: p.architecture.ok_or_else(|| missing("CPU architecture"))?,
                variant: p.variant.ok_or_else(|| missing("CPU variant"))?,
                part: p.part.ok_or_else(|| missing("CPU part"))?,
                revision: p.revision.ok_or_else(|| missing("CPU revision"))?,
            },
        })
    }
    let mut cpus = Vec::new();
    let mut current: Option<Partial> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let raw = raw.trim_end_matches('\r');
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |reason: &'static str| HwcapError::Cpuinfo {
            line,
            reason,
            text: raw.to_string(),
        };
        let (key, value) = raw.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let (key, value) = (key.trim(), value.trim());
        let hex8 = |v: &str| {
            v.strip_prefix("0x")
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("not a 0x-prefixed byte"))
        };
        if key == "processor" {
            if let Some(done) = current.take() {
                cpus.push(finish(done)?);
            }
            current = Some(Partial {
                processor: Some(value.parse().map_err(|_| bad("bad processor number"))?),
                first_line: line,
                ..Partial::default()
            });
            continue;
        }
        let Some(p) = current.as_mut() else {
            // Lines before the first processor (none on arm64) carry nothing per-CPU.
            continue;
        };
        match key {
            "Features" => p.features = Some(value.split_whitespace().map(str::to_string).collect()),
            "CPU implementer" => p.implementer = Some(hex8(value)?),
            "CPU architecture" => {
                p.architecture = Some(value.parse().map_err(|_| bad("bad architecture"))?)
            }
            "CPU variant" => p.variant = Some(hex8(value)?),
            "CPU part" => {
                p.part = Some(
                    value
                        .strip_prefix("0x")
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                        .ok_or_else(|| bad("not a 0x-prefixed part number"))?,
                )
            }
            "CPU revision" => p.revision = Some(value.parse().map_err(|_| bad("bad revision"))?),
            // BogoMIPS and anything newer kernels add.
            _ => {}
        }
    }
    if let Some(done) = current.take() {
        cpus.push(finish(done)?);
    }
    if cpus.is_empty() {
        return Err(HwcapError::NoProcessor);
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpuguard::aarch64::ArmIdReg;

    /// A table with every register the rules read, zero unless given.
    fn table(midr: u64, values: &[(&str, u64)]) -> ArmIdTable {
        let mut regs = vec![ArmIdReg {
            name: "MIDR_EL1".into(),
            value: Some(midr),
        }];
        for reg in [
            ISAR0, ISAR1, ISAR2, PFR0, PFR1, ZFR0, SMFR0, MMFR0, MMFR1, MMFR2,
        ] {
            let value = values
                .iter()
                .find(|(n, _)| *n == reg)
                .map_or(0, |(_, v)| *v);
            regs.push(ArmIdReg {
                name: reg.into(),
                value: Some(value),
            });
        }
        ArmIdTable { regs }
    }

    const A57_MIDR: u64 = 0x411f_d070;

    #[test]
    fn every_rule_names_an_idregs_field_with_the_kernels_bits() {
        for def in HWCAPS {
            let rules: &[FieldRule] = match &def.source {
                HwcapSource::Field(r) => std::slice::from_ref(r),
                HwcapSource::AnyOf(r) => r,
                _ => &[],
            };
            for rule in rules {
                let field = rule_field(def.name, rule).unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    rule.min >= 0 && rule.min < (1 << field.width),
                    "{}",
                    def.name
                );
            }
        }
        let mut names: Vec<&str> = HWCAPS.iter().map(|h| h.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), HWCAPS.len(), "duplicate hwcap name");
        // hwcap_str[] in 6.1 has 66 entries, fp .. sveebf16.
        assert_eq!(HWCAPS.len(), 66);
    }

    #[test]
    fn an_armv8_0_crypto_cpu_gets_the_base_set() {
        // Cortex-A57 as QEMU 7.2 models it: PFR0 FP=0 AdvSIMD=0, ISAR0 AES=2 SHA1=1 SHA2=1 CRC32=1.
        let t = table(A57_MIDR, &[(PFR0, 0x1111), (ISAR0, 0x11120)]);
        let e = expected_features(&t).unwrap();
        assert_eq!(
            e.present(),
            ["fp", "asimd", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid"]
        );
        assert_eq!(e.undecidable().len(), 1);
        assert_eq!(e.undecidable()[0].0, "evtstrm");
        assert_eq!(
            e.features_line(&["evtstrm"]),
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
        );
        let shown = [
            "fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid",
        ];
        let c = e.compare(&shown);
        assert!(c.agrees(), "{c:?}");
        assert_eq!(c.undecidable_present, ["evtstrm"]);
        assert_eq!(c.compared, HWCAPS.len() - 1);
    }

    #[test]
    fn signed_fields_and_minimums() {
        // FP = 0xF: not implemented (-1), so neither fp nor fphp; AdvSIMD = 1: asimd + asimdhp.
        let t = table(A57_MIDR, &[(PFR0, 0x10_0000 | 0xF_0000)]);
        let e = expected_features(&t).unwrap();
        assert!(matches!(
            e.get("fp").unwrap().expectation,
            Expectation::Absent(AbsentReason::Field(_))
        ));
        let present = e.present();
        assert!(present.contains(&"asimd") && present.contains(&"asimdhp"));
        assert!(!present.contains(&"fphp"));
        // AES = 1: aes only; SHA2 = 2: sha2 and sha512; Atomic = 1 is not LSE.
        let t = table(A57_MIDR, &[(ISAR0, (1 << 4) | (2 << 12) | (1 << 20))]);
        let present = expected_features(&t).unwrap().present();
        assert!(present.contains(&"aes") && !present.contains(&"pmull"));
        assert!(present.contains(&"sha2") && present.contains(&"sha512"));
        assert!(!present.contains(&"atomics"));
        // WFxT = 1 is not 6.1's IMP value (2).
        let t = table(A57_MIDR, &[(ISAR2, 1)]);
        assert!(!expected_features(&t).unwrap().present().contains(&"wfxt"));
        let t = table(A57_MIDR, &[(ISAR2, 2)]);
        assert!(expected_features(&t).unwrap().present().contains(&"wfxt"));
    }

    #[test]
    fn pointer_auth_takes_any_algorithm() {
        let e = expected_features(&table(A57_MIDR, &[])).unwrap();
        assert!(matches!(
            &e.get("paca").unwrap().expectation,
            Expectation::Absent(AbsentReason::Field(why)) if why.contains("APA3") && why.contains("API")
        ));
        // QARMA3 only (ISAR2.APA3, GPA3): paca and pacg.
        let t = table(A57_MIDR, &[(ISAR2, (1 << 12) | (1 << 8))]);
        let present = expected_features(&t).unwrap().present();
        assert!(present.contains(&"paca") && present.contains(&"pacg"));
        // IMPDEF address auth without generic auth.
        let t = table(A57_MIDR, &[(ISAR1, 1 << 8)]);
        let present = expected_features(&t).unwrap().present();
        assert!(present.contains(&"paca") && !present.contains(&"pacg"));
        // A kernel without CONFIG_ARM64_PTR_AUTH prints neither.
        let config = KernelConfig {
            ptr_auth: false,
            ..DEBIAN_12_KERNEL
        };
        let e = expected_features_for(&t, &config).unwrap();
        assert_eq!(
            e.advertised_but_hidden(),
            [("paca", AbsentReason::KernelConfig(KernelOption::PtrAuth))]
        );
    }

    #[test]
    fn sme_is_advertised_but_hidden_by_debians_config() {
        let t = table(
            A57_MIDR,
            &[
                (PFR1, 1 << 24),
                (SMFR0, (1 << 63) | (0xF << 52) | (1 << 32)),
            ],
        );
        let hidden: Vec<&str> = expected_features(&t)
            .unwrap()
            .advertised_but_hidden()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(hidden, ["sme", "smei16i64", "smef32f32", "smefa64"]);
        let with_sme = KernelConfig {
            sme: true,
            ..DEBIAN_12_KERNEL
        };
        let present = expected_features_for(&t, &with_sme).unwrap().present();
        assert!(present.contains(&"sme") && present.contains(&"smefa64"));
        assert!(!present.contains(&"smei8i32"));
    }

    #[test]
    fn ssbs_needs_ssbs2_and_is_hidden_on_erratum_cpus() {
        let pfr1 = (PFR1, 2 << 4);
        let a57 = expected_features(&table(A57_MIDR, &[pfr1])).unwrap();
        assert!(a57.present().contains(&"ssbs"));
        // Neoverse N1 r3p1.
        let n1 = expected_features(&table(0x413f_d0c1, &[pfr1])).unwrap();
        assert!(matches!(
            n1.get("ssbs").unwrap().expectation,
            Expectation::Absent(AbsentReason::Erratum(_))
        ));
        let one = expected_features(&table(A57_MIDR, &[(PFR1, 1 << 4)])).unwrap();
        assert!(!one.present().contains(&"ssbs"));
    }

    #[test]
    fn a_missing_register_is_an_error_naming_it() {
        let mut t = table(A57_MIDR, &[]);
        t.regs.retain(|r| r.name != ZFR0);
        let err = expected_features(&t).unwrap_err();
        assert_eq!(err, HwcapError::MissingRegister { register: ZFR0 });
        assert!(err.to_string().contains("ID_AA64ZFR0_EL1"));
    }

    #[test]
    fn comparison_names_each_kind_of_disagreement() {
        let e = expected_features(&table(A57_MIDR, &[(PFR0, 0), (ISAR0, 0x10)])).unwrap();
        let c = e.compare(&["fp", "asimd", "cpuid", "sha1", "frobnicate"]);
        assert!(!c.agrees());
        assert_eq!(c.missing, ["aes"]);
        assert_eq!(c.unexpected.len(), 1);
        assert_eq!(c.unexpected[0].0, "sha1");
        assert_eq!(c.unknown, ["frobnicate"]);
    }

    #[test]
    fn kconfig_parsing() {
        let text = "CONFIG_ARM64_SVE=y\n# CONFIG_ARM64_SME is not set\nCONFIG_ARM64_BTI=y\n\
                    CONFIG_ARM64_PTR_AUTH=y\nCONFIG_ARM64_PTR_AUTH_KERNEL=y\nCONFIG_ARM64_MTE=y\n\
                    CONFIG_ARM64_ERRATUM_3194386=y\n";
        assert_eq!(KernelConfig::from_kconfig(text), DEBIAN_12_KERNEL);
        let none = KernelConfig::from_kconfig("CONFIG_ARM64_SVE=n\nCONFIG_ARM64_SVE_X=y\n");
        for option in KernelOption::ALL {
            assert!(!none.enabled(option), "{}", option.symbol());
        }
    }

    #[test]
    fn cpuinfo_identity_lines_follow_c_show() {
        let id = CpuinfoIdentity::from_midr(0x410f_d034);
        assert_eq!(
            id.lines(),
            [
                "CPU implementer\t: 0x41",
                "CPU architecture: 8",
                "CPU variant\t: 0x0",
                "CPU part\t: 0xd03",
                "CPU revision\t: 4",
            ]
        );
        // QEMU's max: implementer 0, part 0x051, MIDR.Architecture 0xF but cpuinfo says 8.
        let max = CpuinfoIdentity::from_midr(0x000f_0510);
        assert_eq!(max.lines()[0], "CPU implementer\t: 0x00");
        assert_eq!(max.lines()[3], "CPU part\t: 0x051");
        assert_eq!(max.architecture, 8);
    }

    #[test]
    fn cpuinfo_parses_each_processor() {
        let text = "processor\t: 0\nBogoMIPS\t: 125.00\nFeatures\t: fp asimd evtstrm cpuid\n\
                    CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\n\
                    CPU part\t: 0xd07\nCPU revision\t: 0\n\n\
                    processor\t: 1\nBogoMIPS\t: 125.00\nFeatures\t: fp asimd evtstrm cpuid\n\
                    CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\n\
                    CPU part\t: 0xd07\nCPU revision\t: 0\n\n";
        let cpus = parse_cpuinfo(text).unwrap();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[1].processor, 1);
        assert_eq!(cpus[0].features, ["fp", "asimd", "evtstrm", "cpuid"]);
        assert_eq!(cpus[0].identity, CpuinfoIdentity::from_midr(A57_MIDR));
        let err = parse_cpuinfo("processor\t: 0\nFeatures\t: fp\n").unwrap_err();
        assert!(err.to_string().contains("CPU implementer"), "{err}");
        assert_eq!(parse_cpuinfo(""), Err(HwcapError::NoProcessor));
        let err = parse_cpuinfo("processor\t: 0\nCPU part\t: d07\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
