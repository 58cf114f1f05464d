//! The aarch64 ID-register probe under TCG: generated firmware, real `qemu-system-aarch64`, real
//! CPU models of QEMU's `virt` machine.
//!
//! Needs `qemu-system-aarch64` (Debian package qemu-system-arm) and, for the x86 timing line,
//! `qemu-system-x86_64`.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cpuguard::aarch64::{self, ArmCpu, ArmIdTable, ArmProbeConfig, ArmProbeOptions, Midr};
use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::view::GuestView;

const QEMU_ARM: &str = "/usr/bin/qemu-system-aarch64";
const QEMU_X86: &str = "/usr/bin/qemu-system-x86_64";

fn options() -> ArmProbeOptions {
    ArmProbeOptions {
        timeout: Duration::from_secs(30),
        allowed_emulators: vec![PathBuf::from(QEMU_ARM)],
        work_dir: None,
    }
}

fn config(cpu: ArmCpu) -> ArmProbeConfig {
    ArmProbeConfig::new(QEMU_ARM, Accel::Tcg, cpu)
}

fn model(name: &str) -> ArmProbeConfig {
    config(ArmCpu::Model(name.to_string()))
}

/// Probes twice, checks both runs agree, prints the wall times.
fn stable(config: &ArmProbeConfig) -> ArmIdTable {
    let first = aarch64::probe_run(config, &options()).unwrap();
    let second = aarch64::probe_run(config, &options()).unwrap();
    println!(
        "aarch64 probe wall time {:?} / {:?} for -cpu {:?}",
        first.wall_time, second.wall_time, config.cpu
    );
    assert_eq!(
        first.table, second.table,
        "two runs of {:?} differ",
        config.cpu
    );
    assert_eq!(first.table.regs.len(), aarch64::sysregs::REGISTERS.len());
    first.table
}

fn field(table: &ArmIdTable, reg: &str, name: &str) -> u64 {
    let def = aarch64::sysregs::register_def(reg).unwrap();
    let f = def.fields.iter().find(|f| f.name == name).unwrap();
    f.extract(table.get(reg).unwrap_or_else(|| panic!("{reg} absent")))
}

#[test]
fn models_are_stable_identified_and_differ_by_field() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    let a57 = stable(&model("cortex-a57"));
    let a72 = stable(&model("cortex-a72"));
    let a53 = stable(&model("cortex-a53"));
    let max = stable(&config(ArmCpu::Max));

    // MIDR part numbers match the models.
    for (table, part, name) in [
        (&a57, 0xd07, "Cortex-A57"),
        (&a72, 0xd08, "Cortex-A72"),
        (&a53, 0xd03, "Cortex-A53"),
    ] {
        let midr = Midr::decode(table.get("MIDR_EL1").unwrap());
        assert_eq!(midr.implementer, 0x41);
        assert_eq!(midr.part, part);
        assert!(midr.describe().contains(name), "{}", midr.describe());
    }

    // `max` has SVE, the Cortex models do not; all of them have FP (signed field: 0 or 1).
    assert_eq!(field(&a57, "ID_AA64PFR0_EL1", "SVE"), 0);
    assert_eq!(field(&a53, "ID_AA64PFR0_EL1", "SVE"), 0);
    assert!(field(&max, "ID_AA64PFR0_EL1", "SVE") >= 1);
    assert_ne!(field(&a57, "ID_AA64PFR0_EL1", "FP"), 0xF);
    // Registers newer than the A57 (Armv8.0) read as zero in the ID space, they do not trap.
    for reg in [
        "ID_AA64ZFR0_EL1",
        "ID_AA64SMFR0_EL1",
        "ID_AA64MMFR3_EL1",
        "ID_AA64ISAR2_EL1",
    ] {
        assert_eq!(a57.get(reg), Some(0), "{reg} on cortex-a57");
    }
    // Without virtualization=on / secure=on the guest sees no EL2 or EL3.
    assert_eq!(field(&a57, "ID_AA64PFR0_EL1", "EL2"), 0);
    assert_eq!(field(&a57, "ID_AA64PFR0_EL1", "EL3"), 0);
    // The MPIDR of vCPU 0: affinity 0, RES1 bit 31 set.
    assert_eq!(
        a57.get("MPIDR_EL1").unwrap() & aarch64::normalize::MPIDR_AFFINITY,
        0
    );
    assert_ne!(a57.get("MPIDR_EL1").unwrap() & (1 << 31), 0);

    let digests = [&a57, &a72, &a53, &max].map(|t| GuestView::from(t.clone()).digest());
    for (i, a) in digests.iter().enumerate() {
        for b in &digests[i + 1..] {
            assert_ne!(a, b, "two models share a fingerprint");
        }
    }

    // A57 -> max: the diff names SVE as gained; max -> A57 names it lost, with the ISA fields.
    let up = aarch64::diff(&a57, &max);
    let up_lines = up.lines();
    println!("cortex-a57 -> max:\n  {}", up_lines.join("\n  "));
    assert!(up_lines
        .iter()
        .any(|l| l.starts_with("gained: ID_AA64PFR0_EL1.SVE (0 (none) -> 1")));
    assert!(
        up.lost.is_empty()
            || up
                .lost
                .iter()
                .all(|c| c.register != "ID_AA64PFR0_EL1" || c.field != "SVE")
    );
    let down = aarch64::diff(&max, &a57);
    let down_lines = down.lines();
    assert!(down_lines
        .iter()
        .any(|l| l.starts_with("lost: ID_AA64PFR0_EL1.SVE (1")));
    // max has SHA3 and atomics (LSE), the A57 neither: both named as lost.
    assert!(
        down_lines
            .iter()
            .any(|l| l.starts_with("lost: ID_AA64ISAR0_EL1.SHA3")),
        "{down_lines:#?}"
    );
    assert!(
        down_lines
            .iter()
            .any(|l| l.starts_with("lost: ID_AA64ISAR0_EL1.Atomic")),
        "{down_lines:#?}"
    );

    // A57 -> A72: same features under QEMU, different identity: only "changed" MIDR fields.
    let sideways = aarch64::diff(&a57, &a72);
    println!(
        "cortex-a57 -> cortex-a72:\n  {}",
        sideways.lines().join("\n  ")
    );
    assert!(!sideways.is_equivalent());
    assert!(sideways.changed.iter().any(|c| c.register == "MIDR_EL1"
        && c.field == "PartNum"
        && c.a == "0xd07"
        && c.b == "0xd08"));

    // A57 -> A53: the A53 has a smaller L1 data cache line (CTR_EL0.CWG/ERG differ) and other MMU
    // features; whatever differs is explained field by field, never as a bare register.
    let a53_diff = aarch64::diff(&a57, &a53);
    println!(
        "cortex-a57 -> cortex-a53:\n  {}",
        a53_diff.lines().join("\n  ")
    );
    assert!(!a53_diff.is_equivalent());
    for c in a53_diff
        .lost
        .iter()
        .chain(&a53_diff.gained)
        .chain(&a53_diff.changed)
    {
        assert!(!c.field.is_empty(), "unexplained change {}", c.line());
    }

    assert!(aarch64::diff(&a57, &a57).is_equivalent());
}

#[test]
fn smp_changes_only_the_masked_affinity_fields_of_vcpu0() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    let one = stable(&model("cortex-a72"));
    let mut four = model("cortex-a72");
    four.vcpus = 4;
    let four = aarch64::probe(&four, &options()).unwrap();
    let d = aarch64::diff(&one, &four);
    assert!(d.is_equivalent(), "{:#?}", d.lines());
}

#[test]
fn a_model_qemu_does_not_know_is_an_emulator_error_naming_it() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    let err = aarch64::probe(&model("cortex-z99"), &options()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("cortex-z99"), "{text}");
}

#[test]
fn an_emulator_outside_the_allow_list_is_refused() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    let mut opts = options();
    opts.allowed_emulators.clear();
    let err = aarch64::probe(&model("cortex-a57"), &opts).unwrap_err();
    assert!(matches!(err, aarch64::ProbeError::Emulator(_)), "{err}");
}

#[test]
fn probe_time_beside_the_x86_probe() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    let mut arm_times = Vec::new();
    for cpu in ["cortex-a57", "cortex-a72", "cortex-a53", "max"] {
        let cfg = if cpu == "max" {
            config(ArmCpu::Max)
        } else {
            model(cpu)
        };
        let run = aarch64::probe_run(&cfg, &options()).unwrap();
        arm_times.push((cpu, run.wall_time));
    }
    let x86 = if gate::require_part("the x86 probe beside it", &[Need::Qemu("x86_64")]) {
        let xml = format!(
            "<domain type='qemu'><name>t</name><memory unit='KiB'>65536</memory>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os>\
             <cpu mode='custom' match='exact'><model fallback='forbid'>EPYC</model></cpu>\
             <devices><emulator>{QEMU_X86}</emulator></devices></domain>"
        );
        let config = GuestCpuConfig::from_domain_xml(&xml).unwrap();
        let opts = cpuguard::x86_64::probe::ProbeOptions {
            timeout: Duration::from_secs(30),
            allowed_emulators: vec![PathBuf::from(QEMU_X86)],
            accel_override: Some(Accel::Tcg),
            ..Default::default()
        };
        let started = Instant::now();
        let run = cpuguard::x86_64::probe::probe_run(&config, &opts).unwrap();
        assert!(started.elapsed() >= run.wall_time);
        Some(run.wall_time)
    } else {
        None
    };
    for (cpu, t) in &arm_times {
        println!(
            "probe wall time: aarch64 -cpu {cpu:<10} {:>7.1} ms (TCG)",
            t.as_secs_f64() * 1e3
        );
        assert!(*t < Duration::from_secs(10), "{cpu} took {t:?}");
    }
    if let Some(t) = x86 {
        println!(
            "probe wall time: x86_64  -cpu EPYC       {:>7.1} ms (TCG)",
            t.as_secs_f64() * 1e3
        );
    }
}

/// The vector table: a register that does not exist at EL1 (HCR_EL2 traps as UNDEFINED there) is
/// reported as absent and the probe carries on to the next read and a clean power-off.
#[test]
fn a_trapping_read_is_reported_absent_and_the_probe_continues() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    use aarch64::probe::firmware::{program, HEADER};
    use aarch64::sysregs::SysReg;
    const HCR_EL2: SysReg = SysReg::new("HCR_EL2", 3, 4, 1, 1, 0);
    let regs = [
        aarch64::sysregs::REGISTERS[0],
        HCR_EL2,
        aarch64::sysregs::REGISTERS[3],
    ];
    let image = program(&regs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let firmware = dir.path().join("fw.bin");
    let out = dir.path().join("serial.out");
    std::fs::write(&firmware, image).unwrap();
    let argv = aarch64::probe::probe_args(&model("cortex-a57"), &firmware, &out).unwrap();
    let status = std::process::Command::new("timeout")
        .arg("30")
        .arg(QEMU_ARM)
        .args(&argv)
        .status()
        .unwrap();
    assert!(status.success(), "QEMU {status}");
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], HEADER);
    assert_eq!(lines[1], "E 1");
    assert!(
        lines[2].starts_with("R S3_0_C0_C0_0 00000000411fd07"),
        "{text}"
    );
    assert_eq!(lines[3], "X S3_4_C1_C1_0", "{text}");
    assert!(lines[4].starts_with("R S3_0_C0_C4_0 "), "{text}");
    assert_eq!(lines[5], "END 3");
    // The product parser wants every probed register: this partial list is refused.
    assert!(aarch64::probe::parse(text.as_bytes()).is_err());
}

/// The path the later wiring takes: a domain XML, its GuestCpuConfig, the probe config.
#[test]
fn a_domain_xml_probes_like_the_model() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    let xml = format!(
        "<domain type='qemu'><name>arm1</name><memory unit='KiB'>65536</memory><vcpu>2</vcpu>\
         <os><type arch='aarch64' machine='virt-7.2'>hvm</type></os>\
         <cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>\
         <devices><emulator>{QEMU_ARM}</emulator></devices></domain>"
    );
    let guest = GuestCpuConfig::from_domain_xml(&xml).unwrap();
    let config = ArmProbeConfig::from_guest(&guest).unwrap();
    assert_eq!(config.vcpus, 2);
    let from_xml = aarch64::probe(&config, &options()).unwrap();
    let direct = aarch64::probe(&model("cortex-a57"), &options()).unwrap();
    assert!(aarch64::diff(&direct, &from_xml).is_equivalent());
    assert_eq!(Midr::decode(from_xml.get("MIDR_EL1").unwrap()).part, 0xd07);
}

/// `<cpu><feature>` and `<features><pmu>` reach `-cpu` as libvirt puts them there, and the probe
/// sees their effect: SVE and the PMU disappear from the ID registers.
#[test]
fn domain_features_and_pmu_switch_change_what_the_probe_sees() {
    if !gate::require(&[Need::Qemu("aarch64")]) {
        return;
    }
    let xml = |features: &str, cpu_children: &str| {
        format!(
            "<domain type='qemu'><name>arm1</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
             <os><type arch='aarch64' machine='virt-7.2'>hvm</type></os>\
             <features>{features}</features><cpu mode='maximum'>{cpu_children}</cpu>\
             <devices><emulator>{QEMU_ARM}</emulator></devices></domain>"
        )
    };
    let probe_xml = |text: String| {
        let guest = GuestCpuConfig::from_domain_xml(&text).unwrap();
        aarch64::probe(&ArmProbeConfig::from_guest(&guest).unwrap(), &options()).unwrap()
    };
    let plain = probe_xml(xml("", ""));
    let no_sve = probe_xml(xml("", "<feature policy='disable' name='sve'/>"));
    let no_pmu = probe_xml(xml("<pmu state='off'/>", ""));
    assert_ne!(field(&plain, "ID_AA64PFR0_EL1", "SVE"), 0, "max has SVE");
    assert_eq!(field(&no_sve, "ID_AA64PFR0_EL1", "SVE"), 0);
    assert_ne!(
        field(&plain, "ID_AA64DFR0_EL1", "PMUVer"),
        0,
        "max has a PMU"
    );
    assert_eq!(field(&no_pmu, "ID_AA64DFR0_EL1", "PMUVer"), 0);
    let d = aarch64::diff(&plain, &no_sve);
    assert!(
        d.lost.iter().any(|c| c.subject() == "ID_AA64PFR0_EL1.SVE"),
        "{:?}",
        d.lines()
    );
}
