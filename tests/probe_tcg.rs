//! The real probe under TCG: generated firmware, real QEMU, real CPU models.
//!
//! Needs `qemu-system-x86_64` (Debian package qemu-system-x86) at /usr/bin. Everything runs with
//! accel=tcg, so the results do not depend on this machine's KVM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::qemu::RunError;
use cpuguard::x86_64::probe::{self, Firmware, ProbeError, ProbeOptions};
use cpuguard::x86_64::CpuidTable;

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

fn options() -> ProbeOptions {
    ProbeOptions {
        timeout: Duration::from_secs(30),
        allowed_emulators: vec![PathBuf::from(QEMU)],
        accel_override: Some(Accel::Tcg),
        ..ProbeOptions::default()
    }
}

/// A TCG domain with the given `<cpu>` body (empty: no `<cpu>` element) and extra elements.
fn domain(cpu: &str, extra: &str) -> GuestCpuConfig {
    let xml = format!(
        "<domain type='qemu'><name>t</name><memory unit='KiB'>65536</memory>{extra}\
         <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>{cpu}\
         <devices><emulator>{QEMU}</emulator></devices></domain>"
    );
    GuestCpuConfig::from_domain_xml(&xml).unwrap()
}

fn model(name: &str, features: &str) -> GuestCpuConfig {
    domain(
        &format!("<cpu mode='custom' match='exact'><model fallback='forbid'>{name}</model>{features}</cpu>"),
        "",
    )
}

fn run(config: &GuestCpuConfig) -> CpuidTable {
    let started = Instant::now();
    let run = probe::probe_run(config, &options()).unwrap();
    println!(
        "probe wall time {:?} (emulator exit to parse {:?}) for -cpu {}",
        run.wall_time,
        started.elapsed(),
        run.argv
            .iter()
            .skip_while(|a| *a != "-cpu")
            .nth(1)
            .map_or("?", String::as_str)
    );
    run.table
}

fn vendor(t: &CpuidTable) -> String {
    let e = t.get(0, 0).expect("leaf 0 missing");
    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn brand(t: &CpuidTable) -> String {
    let mut bytes = Vec::new();
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        let e = t.get(leaf, 0).expect("brand leaf missing");
        for r in [e.eax, e.ebx, e.ecx, e.edx] {
            bytes.extend(r.to_le_bytes());
        }
    }
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

fn bit(t: &CpuidTable, leaf: u32, subleaf: u32, reg: char, bit: u32) -> bool {
    let e = t
        .get(leaf, subleaf)
        .unwrap_or_else(|| panic!("leaf {leaf:#x}.{subleaf} missing"));
    let value = match reg {
        'a' => e.eax,
        'b' => e.ebx,
        'c' => e.ecx,
        _ => e.edx,
    };
    value & (1 << bit) != 0
}

/// Every leaf the basic and extended maxima announce is present, nothing beyond them.
fn assert_ranges_complete(t: &CpuidTable) {
    let basic_max = t.get(0, 0).unwrap().eax;
    let ext_max = t.get(0x8000_0000, 0).unwrap().eax;
    for leaf in (0..=basic_max).chain(0x8000_0000..=ext_max) {
        assert!(t.get(leaf, 0).is_some(), "leaf {leaf:#x} missing");
    }
    assert!(t
        .entries
        .iter()
        .all(|e| e.leaf <= basic_max || e.leaf >= 0x4000_0000));
    assert!(t.get(basic_max + 1, 0).is_none());
    assert!(t.get(ext_max + 1, 0).is_none());
}

#[test]
fn five_models_report_their_vendor_and_brand() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let cases = [
        ("qemu64", "AuthenticAMD", "QEMU Virtual CPU"),
        ("Nehalem", "GenuineIntel", "Nehalem"),
        ("Haswell-noTSX", "GenuineIntel", "Haswell"),
        ("Skylake-Server", "GenuineIntel", "Skylake"),
        ("EPYC", "AuthenticAMD", "EPYC"),
    ];
    for (name, want_vendor, want_brand) in cases {
        let t = run(&model(name, ""));
        assert_eq!(vendor(&t), want_vendor, "{name}");
        let b = brand(&t);
        assert!(b.contains(want_brand), "{name}: brand {b:?}");
        assert_ranges_complete(&t);
    }
}

#[test]
fn feature_bits_follow_the_model_and_the_policies() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let qemu64 = run(&model("qemu64", ""));
    let skylake = run(&model("Skylake-Server", ""));
    // AVX2 (7.0:EBX[5]) and CLWB (7.0:EBX[24]): Skylake-Server has them (TCG emulates both).
    assert!(bit(&skylake, 7, 0, 'b', 5), "Skylake-Server lacks avx2");
    assert!(bit(&skylake, 7, 0, 'b', 24), "Skylake-Server lacks clwb");
    assert!(!bit(&qemu64, 1, 0, 'c', 28), "qemu64 has avx");
    assert!(
        qemu64.get(7, 0).is_none_or(|e| e.ebx & (1 << 5) == 0),
        "qemu64 has avx2"
    );

    let haswell = run(&model("Haswell-noTSX", ""));
    let without = run(&model(
        "Haswell-noTSX",
        "<feature policy='disable' name='aes'/><feature policy='disable' name='avx2'/>",
    ));
    assert!(bit(&haswell, 1, 0, 'c', 25), "Haswell-noTSX lacks aes");
    assert!(!bit(&without, 1, 0, 'c', 25), "disabled aes still visible");
    assert!(bit(&haswell, 7, 0, 'b', 5));
    assert!(!bit(&without, 7, 0, 'b', 5), "disabled avx2 still visible");
    // And nothing else in leaf 1 ECX changed.
    let diff = haswell.get(1, 0).unwrap().ecx ^ without.get(1, 0).unwrap().ecx;
    assert_eq!(diff, 1 << 25);

    // qemu64 does not have SSSE3 (1:ECX[9]); requiring it (TCG emulates it) makes it appear.
    let with = run(&model("qemu64", "<feature policy='require' name='ssse3'/>"));
    assert!(!bit(&qemu64, 1, 0, 'c', 9));
    assert!(bit(&with, 1, 0, 'c', 9), "required ssse3 missing");
}

#[test]
fn two_runs_give_the_same_table() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let config = model("EPYC", "");
    let a = run(&config);
    let b = run(&config);
    assert!(a.entries.len() > 40, "only {} entries", a.entries.len());
    assert_eq!(a, b);
    // libvirt's cpu_map marks MONITOR removed from EPYC, so it is off as libvirt would start it
    // (QEMU's EPYC model alone has it, and TCG emulates it).
    assert!(!bit(&a, 1, 0, 'c', 3), "EPYC shows monitor");
}

#[test]
fn an_i686_domain_runs_its_own_emulator() {
    if !gate::require(&[Need::Qemu("x86_64"), Need::Qemu("i386")]) {
        return;
    }
    let xml = std::fs::read_to_string("tests/fixtures/domains/tcg-i686-opteron-g3.xml").unwrap();
    let config = GuestCpuConfig::from_domain_xml(&xml).unwrap();
    let i386 = "/usr/bin/qemu-system-i386";
    let opts = ProbeOptions {
        allowed_emulators: vec![PathBuf::from(QEMU), PathBuf::from(i386)],
        ..options()
    };
    let run = probe::probe_run(&config, &opts).unwrap();
    assert_eq!(run.emulator, PathBuf::from(i386));
    assert_eq!(vendor(&run.table), "AuthenticAMD");
    assert!(
        brand(&run.table).contains("Opteron"),
        "{}",
        brand(&run.table)
    );
    // A 32-bit emulator offers no long mode (0x80000001:EDX[29]).
    assert!(!bit(&run.table, 0x8000_0001, 0, 'd', 29));
    let x86_64 = run_with(&config_with_emulator(&xml, QEMU), &opts);
    assert!(
        bit(&x86_64, 0x8000_0001, 0, 'd', 29),
        "x86_64 Opteron_G3 lacks lm"
    );
}

fn config_with_emulator(xml: &str, emulator: &str) -> GuestCpuConfig {
    let xml = xml.replace("/usr/bin/qemu-system-i386", emulator);
    GuestCpuConfig::from_domain_xml(&xml).unwrap()
}

fn run_with(config: &GuestCpuConfig, opts: &ProbeOptions) -> CpuidTable {
    probe::probe_run(config, opts).unwrap().table
}

#[test]
fn topology_shows_in_the_topology_leaf() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let config = domain(
        "<cpu mode='custom'><model>Skylake-Server</model>\
         <topology sockets='1' dies='1' cores='2' threads='2'/></cpu>",
        "<vcpu placement='static'>4</vcpu>",
    );
    // On q35 as well: the firmware must not depend on the chipset.
    let config = GuestCpuConfig {
        machine: Some("pc-q35-7.2".to_string()),
        ..config
    };
    let t = run(&config);
    // Leaf 0xB: SMT level reports 2 logical processors, core level 4; then the terminator.
    assert_eq!(t.get(0xB, 0).unwrap().ebx & 0xFFFF, 2);
    assert_eq!(t.get(0xB, 1).unwrap().ebx & 0xFFFF, 4);
    assert_eq!(t.get(0xB, 2).unwrap().ecx & 0xFF00, 0);
    assert!(t.get(0xB, 3).is_none(), "sub-leaf walk did not stop");
    // Leaf 4 walks until its null cache type and stops there.
    let last = t.entries.iter().filter(|e| e.leaf == 4).count() as u32;
    assert!(last >= 4);
    assert_eq!(t.get(4, last - 1).unwrap().eax & 0x1F, 0);
    // 0xD has all 64 sub-leaves; XSAVE component 2 (AVX) is 256 bytes.
    assert_eq!(t.entries.iter().filter(|e| e.leaf == 0xD).count(), 64);
    assert_eq!(t.get(0xD, 2).unwrap().eax, 256);
}

#[test]
fn the_libvirt_prepare_sample_runs_under_tcg() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let xml = std::fs::read_to_string("tests/fixtures/domains/libvirt9-prepare-begin.xml").unwrap();
    let config = GuestCpuConfig::from_domain_xml(&xml).unwrap();
    assert_eq!(config.accel, Accel::Kvm);
    let t = run(&config);
    assert_eq!(vendor(&t), "AuthenticAMD");
    assert!(brand(&t).contains("EPYC-Milan"), "{}", brand(&t));
    // The sample disables pni (1:ECX[0]) and avx2 (7.0:EBX[5]).
    assert!(!bit(&t, 1, 0, 'c', 0), "disabled pni visible");
    assert!(!bit(&t, 7, 0, 'b', 5), "disabled avx2 visible");
    // It requires hypervisor (1:ECX[31]).
    assert!(bit(&t, 1, 0, 'c', 31));
}

/// The probe's result moved from text lines on port 0xe9 to records in guest RAM. Fingerprints
/// and stamps measured with the old wire format must still compare equal: for each
/// configuration, the previous format's image (same CPUID walk, text output) and the probe give
/// the same table, the same stored text (what a stamp carries) and the same digest. Under TCG,
/// and under KVM where it is usable.
#[test]
fn the_ram_result_equals_the_previous_text_format() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    use cpuguard::view::GuestView;
    use cpuguard::x86_64::dump::write_dump;
    let mut accels = vec![(Accel::Tcg, "tcg")];
    if gate::require_part("its KVM half", &[Need::Kvm]) {
        accels.push((Accel::Kvm, "kvm"));
    }
    for (accel, accel_name) in accels {
        let configs = match accel {
            Accel::Tcg => vec![
                model("qemu64", ""),
                model("Haswell-noTSX", ""),
                model("EPYC", ""),
                model(
                    "Skylake-Client",
                    "<feature policy='disable' name='tsc-deadline'/>",
                ),
            ],
            // Models this host's KVM can run whatever the host CPU (qemu64 and the host's own).
            Accel::Kvm => vec![model("qemu64", ""), model("kvm64", "")],
        };
        for config in configs {
            let measure = |firmware| {
                let opts = ProbeOptions {
                    firmware,
                    accel_override: Some(accel),
                    ..options()
                };
                probe::probe_run(&config, &opts).unwrap().table
            };
            let (ram, text) = (measure(Firmware::Probe), measure(Firmware::Text));
            let cpu = config.cpu.as_ref().and_then(|c| c.model.clone());
            assert!(ram.entries.len() > 10, "{cpu:?} {accel_name}: {ram:?}");
            assert_eq!(
                write_dump(&ram),
                write_dump(&text),
                "{cpu:?} under {accel_name}: stored text differs between wire formats"
            );
            assert_eq!(ram, text);
            assert_eq!(
                GuestView::X86(ram.clone()).digest(),
                GuestView::X86(text).digest()
            );
            println!(
                "{cpu:?} under {accel_name}: {} leaves, same table",
                ram.entries.len()
            );
        }
    }
}

/// Fidelity of the real-mode table for a 64-bit guest kernel: the pass's leaves read in long
/// mode at CPL0 are the table's.
fn assert_long_mode_kernel_is_the_table(run: &probe::ProbeRun, accel: &str) {
    assert_eq!(run.long_mode_kernel.len(), 4, "{accel}");
    for entry in &run.long_mode_kernel {
        assert_eq!(
            Some(entry),
            run.table.get(entry.leaf, entry.subleaf),
            "{accel}: CPUID.{:#x}.{} in long mode at CPL0 is not the real-mode table's",
            entry.leaf,
            entry.subleaf
        );
    }
}

/// The probe's user-mode pass: CPUID at CPL3 against the table read at CPL0. Under TCG both
/// levels see QEMU's model. Under KVM (where usable) each leaf's CPL3 answer must be either the
/// guest kernel's or, on a host that lets guest user space execute CPUID without trapping (this
/// machine's paravirtualized KVM does), the host's own answer as this test process reads it —
/// anything else would be a probe error — and the probe reports a difference exactly when some
/// leaf is not the kernel's. The test prints which kind of host this is.
#[test]
fn user_mode_cpuid_is_compared_with_the_kernels() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let tcg = probe::probe_run(&model("Haswell-noTSX", ""), &options()).unwrap();
    assert_long_mode_kernel_is_the_table(&tcg, "tcg");
    let user = tcg.user_mode.expect("the probe runs the user-mode pass");
    assert_eq!(
        user.compared,
        vec![(0, 0), (1, 0), (7, 0), (0x8000_0001, 0)]
    );
    assert!(!user.differs(), "TCG: {:?}", user.lines());

    if !gate::require_part("its KVM half", &[Need::Kvm]) {
        return;
    }
    let opts = ProbeOptions {
        accel_override: Some(Accel::Kvm),
        ..options()
    };
    // qemu64: a model whose identification differs from any modern host CPU's.
    let run = probe::probe_run(&model("qemu64", ""), &opts).unwrap();
    assert_long_mode_kernel_is_the_table(&run, "kvm");
    let user = run.user_mode.expect("the probe runs the user-mode pass");
    assert_eq!(user.compared.len(), 4);
    let host = |leaf: u32, subleaf: u32| {
        // SAFETY-free: CPUID is always available on x86_64.
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    };
    for d in &user.differing {
        let mut h = host(d.leaf, d.subleaf);
        let mut u = d.user;
        if d.leaf == 1 {
            // Per-CPU and per-OS bits: the APIC ID (EBX[31:24]) and OSXSAVE (ECX[27]).
            for r in [&mut h, &mut u] {
                r[1] &= 0x00FF_FFFF;
                r[2] &= !(1 << 27);
            }
        }
        assert_eq!(
            u, h,
            "CPUID.{:#x}.{} at CPL3 is neither the guest kernel's nor the host's",
            d.leaf, d.subleaf
        );
    }
    if user.differs() {
        println!(
            "this host's KVM shows guest user space the host's CPUID ({} of 4 leaves differ): {}",
            user.differing.len(),
            user.lines().join("; ")
        );
    } else {
        println!("this host's KVM: guest user space sees the guest kernel's CPUID");
    }
}

#[test]
fn msr_lines_reach_the_table() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let opts = ProbeOptions {
        firmware: Firmware::MsrSelftest,
        ..options()
    };
    let run = probe::probe_run(&model("qemu64", ""), &opts).unwrap();
    let apic_base = run.table.msr(0x1B).expect("APIC_BASE missing");
    // Enabled (bit 11), bootstrap processor (bit 8), at the architectural default address.
    assert_eq!(apic_base & 0xFFFF_F900, 0xFEE0_0900, "{apic_base:#x}");
    assert!(run.table.msr(0xC000_0080).is_some(), "EFER missing");
    // The real probe reads no MSR under TCG: TCG enumerates none of the feature MSRs.
    let plain = probe::probe(&model("qemu64", ""), &options()).unwrap();
    assert!(plain.msrs.is_empty(), "{:?}", plain.msrs);
    assert_eq!(plain.entries, run.table.entries);
}

#[test]
fn absent_msrs_are_survived_under_kvm_when_available() {
    if !gate::require(&[Need::Qemu("x86_64"), Need::Kvm]) {
        return;
    }
    // TCG answers every RDMSR, so only KVM raises #GP.
    let opts = ProbeOptions {
        firmware: Firmware::MsrSelftest,
        accel_override: Some(Accel::Kvm),
        timeout: Duration::from_secs(20),
        ..options()
    };
    let run = probe::probe_run(&model("qemu64", ""), &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.absent_msrs, vec![0x480, 0x4D00_0000]);
    assert!(run.table.msr(0x1B).is_some());
}

#[test]
fn a_hanging_guest_is_killed_at_the_timeout() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let opts = ProbeOptions {
        firmware: Firmware::Heartbeat,
        timeout: Duration::from_secs(1),
        ..options()
    };
    let started = Instant::now();
    let err = probe::probe(&model("qemu64", ""), &opts).unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, ProbeError::Run(RunError::Timeout { .. })),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("timeout") && message.contains("1s"),
        "{message}"
    );
    assert!(elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5));
    println!("timeout after {elapsed:?}: {message}");
}

#[test]
fn emulators_outside_the_allow_list_are_not_run() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let opts = ProbeOptions {
        allowed_emulators: vec![PathBuf::from("/usr/bin/qemu-system-i386")],
        ..options()
    };
    let err = probe::probe(&model("qemu64", ""), &opts).unwrap_err();
    assert!(err.to_string().contains("allow-list"), "{err}");
}

#[test]
fn qemu_refusing_the_configuration_is_reported_with_its_message() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let err = probe::probe(&model("NoSuchModel", ""), &options()).unwrap_err();
    match &err {
        ProbeError::Run(RunError::EmulatorFailed { stderr, .. }) => {
            assert!(stderr.contains("NoSuchModel"), "{stderr}")
        }
        other => panic!("expected EmulatorFailed, got {other}"),
    }
}

#[test]
fn emulator_version_is_read() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let version = cpuguard::qemu::emulator_version(QEMU, &[PathBuf::from(QEMU)]).unwrap();
    assert!(version.starts_with("QEMU emulator version "), "{version}");
}

#[test]
fn a_missing_fallback_allow_model_is_named_and_a_present_one_costs_no_model_query() {
    let allow = |name: &str| {
        domain(
            &format!(
                "<cpu mode='custom' match='exact'><model fallback='allow'>{name}</model></cpu>"
            ),
            "",
        )
    };
    // A model the emulator lacks: libvirt would substitute one, which cpuguard does not reproduce.
    let err = probe::probe(&allow("NoSuchModel"), &options()).unwrap_err();
    assert!(
        err.to_string().contains("NoSuchModel") && err.to_string().contains("fallback"),
        "expected the fallback refusal, got: {err}"
    );
    // A model it has: probed as named, the same table as with fallback='forbid'.
    assert_eq!(
        run(&allow("Nehalem")).entries,
        run(&model("Nehalem", "")).entries
    );
}
