//! The bed's guard scenarios with `<domain type='kvm'>` guests (issue 13, part 2): what a guest
//! sees under KVM is QEMU's model filtered by KVM's supported CPUID, plus KVM's paravirtual leaves
//! (0x40000000+), which TCG guests never have.
//!
//! Each test gates on KVM first (the shared gate, tests/support/gate.rs, boots a firmware under
//! `-accel kvm` as root, which is who the bed's libvirt runs QEMU as: testbed/bed.sh sets
//! `user = "root"`); where KVM is unusable it prints why and runs nothing (testbed_guard.rs covers the same refusals
//! under TCG). The guests are firmware guests (cpuguard's heartbeat): a Linux guest does not boot
//! under every nested KVM.
//!
//! A host whose guests' user space sees other CPUID values than their kernel is refused by default
//! (`policy.user_mode_cpuid`): one test pins that verdict as the probe reports it; the others set
//! the policy to "allow" on both hosts, so that they test the comparison itself.
//!
//! Runs as root; see tests/support/bed.rs.

#[path = "support/bed.rs"]
mod bed;

use std::path::Path;

use bed::{bed_sh, Bed, Host, Run, HEARTBEAT_WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");

/// The seeds' CPU (seed 001: Haswell-noTSX), as a libvirt user defines it.
const HASWELL: &str =
    "<cpu mode='custom' match='exact' check='partial'><model fallback='forbid'>Haswell-noTSX</model></cpu>";

/// A host-passthrough CPU as users define it, and the same with `arch-capabilities` disabled
/// (some KVM hosts cannot set its MSR, 0x10a, and QEMU aborts the start).
const PASSTHROUGH: &str = "<cpu mode='host-passthrough' check='none'/>";
const PASSTHROUGH_NO_ARCH_CAPABILITIES: &str = "<cpu mode='host-passthrough' check='none'>\
     <feature policy='disable' name='arch-capabilities'/></cpu>";

/// Both hosts let a user-mode CPUID difference through, so that the verdict is the comparison's.
const ALLOW_USER_MODE: &str = "[policy]\nuser_mode_cpuid = \"allow\"\n";

/// The bed with cpuguard as both hooks, or None when KVM (or the bed, see `Bed::up`) cannot be
/// used here. `destination_cpu_options`: what B's guests get appended to their `-cpu`.
fn kvm_bed(destination_cpu_options: Option<&str>, allow_user_mode: bool) -> Option<Bed> {
    if !bed::gate::require(&[bed::gate::Need::Kvm]) {
        return None;
    }
    let bed = Bed::up()?;
    bed.install_hook(Path::new(BIN));
    if allow_user_mode {
        bed.write_host_config(Host::A, ALLOW_USER_MODE);
        bed.write_host_config(Host::B, ALLOW_USER_MODE);
    }
    if let Some(options) = destination_cpu_options {
        bed_sh(&["emulator-b", "set", options]).ok();
    }
    Some(bed)
}

/// Defines NAME as a KVM guest with `cpu`, starts it on A and waits for its stamp; returns A's
/// live XML with the stamp.
fn start_stamped(bed: &mut Bed, name: &str, cpu: &str) -> String {
    bed.define_guest_kvm(name, Some(cpu));
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    bed.wait_stamped(Host::A, name, mark)
}

/// The registers of `leaf`.`subleaf` in the source's stamped CPUID table (the stamp's `<table>`
/// child, dump lines `LLLLLLLL SSSSSSSS: EAX EBX ECX EDX`).
fn stamped_leaf(live_xml: &str, leaf: u32, subleaf: u32) -> Option<[u32; 4]> {
    let prefix = format!("{leaf:08x} {subleaf:08x}:");
    let line = live_xml
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))?;
    let words: Vec<u32> = line[prefix.len()..]
        .split_whitespace()
        .filter_map(|w| u32::from_str_radix(w, 16).ok())
        .collect();
    <[u32; 4]>::try_from(words).ok()
}

/// The 12-character vendor string of leaf 0 (EBX, EDX, ECX).
fn vendor(regs: [u32; 4]) -> String {
    [regs[1], regs[3], regs[2]]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .map(char::from)
        .collect()
}

/// The refusal as the operator sees it (stderr of `virsh migrate`), and what must hold after it:
/// the guest still runs on A, nothing is left on B, libvirt's own check never ran (cpuguard
/// refused before B's QEMU started), and the audit trail has the refusal with `audit_names` in it.
fn assert_refused(bed: &Bed, name: &str, mark: u64, run: &Run, audit_names: &str) {
    let expected = format!("cpuguard: refusing incoming migration of {name}:");
    assert!(
        run.stderr.contains(&expected),
        "virsh migrate did not show cpuguard's refusal (`{expected}`):\n{}",
        run.stderr
    );
    bed.assert_refused_before_b_started(name, run);
    let line = bed.expect_audit(mark, "prepare", "refused", name);
    assert!(
        line.contains(audit_names),
        "the audit line does not name `{audit_names}`: {line}"
    );
}

/// The refusal lists `line` among its differences.
fn assert_names(run: &Run, line: &str) {
    assert!(
        run.stderr.lines().any(|l| l.trim().starts_with(line)),
        "the refusal does not name `{line}`:\n{}",
        run.stderr
    );
}

/// The guest runs on B, is gone from A, and its heartbeat goes on there.
fn assert_migrated(bed: &Bed, name: &str, before: Option<u64>) -> String {
    assert_eq!(bed.domain_state(Host::B, name).as_deref(), Some("running"));
    assert_eq!(bed.domain_state(Host::A, name), None, "{name} left on A");
    if bed.firmware_kind() == "heartbeat" {
        let serial = bed.serial_path(name);
        let after = bed::wait_for_heartbeat_above(&serial, before, HEARTBEAT_WAIT);
        assert!(
            after > before,
            "{name}'s heartbeat did not go on on B (last before {before:?}, now {after:?})"
        );
        bed::assert_consecutive_from_zero(&serial);
    }
    bed.virsh(Host::B, &["dumpxml", name]).ok()
}

/// Same CPU on both hosts: the migration passes, and B runs the source's live CPU with libvirt's
/// `check='full'` (applied from the migration cookie after the migrate phase).
#[test]
fn kvm_same_cpu_passes_and_the_destination_runs_it_check_full() {
    let Some(mut bed) = kvm_bed(None, true) else {
        return;
    };
    let name = "kvm-same";
    start_stamped(&mut bed, name, HASWELL);
    let before = bed::wait_for_heartbeat_above(&bed.serial_path(name), None, HEARTBEAT_WAIT);
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(
        run.success,
        "same-CPU KVM migration refused: {}",
        run.stderr
    );
    let live = assert_migrated(&bed, name, before);
    assert!(
        live.contains("<domain type='kvm'"),
        "B does not run {name} under KVM:\n{live}"
    );
    assert!(
        live.contains("<cpu mode='custom' match='exact' check='full'>"),
        "B's live CPU of {name} is not check='full':\n{live}"
    );
    bed.expect_audit(mark, "prepare", "allowed", name);
}

/// Default policy: where B's probe sees guest user space (CPL3) read other CPUID values than the
/// guest kernel (CPL0), the migration is refused and the refusal says so, leaf by leaf; where it
/// does not, the same migration passes. Which one is decided from B's probe, not from this machine.
#[test]
fn kvm_default_policy_refuses_a_destination_whose_guest_user_space_sees_the_host_cpu() {
    let Some(mut bed) = kvm_bed(None, false) else {
        return;
    };
    let name = "kvm-usermode";
    let live = start_stamped(&mut bed, name, HASWELL);
    let xml_file = bed
        .state_dir()
        .join("guests")
        .join(format!("{name}.live.xml"));
    std::fs::write(&xml_file, &live)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", xml_file.display()));
    // The probe runs only emulators B's libvirt has probed (its capabilities cache), which it
    // does when it first needs them: at the migration's prepare phase at the latest.
    bed.virsh(
        Host::B,
        &[
            "domcapabilities",
            "--virttype",
            "kvm",
            "--emulatorbin",
            "/usr/bin/qemu-system-x86_64",
        ],
    )
    .ok();
    let probe = bed_sh(&["exec-b", BIN, "probe", "--xml", &xml_file.to_string_lossy()]).ok();
    let fingerprint: serde_json::Value = serde_json::from_str(&probe)
        .unwrap_or_else(|e| panic!("B's probe printed no JSON ({e}):\n{probe}"));
    let differing: Vec<(u64, u64)> = fingerprint["user_mode"]["differing"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|e| {
                    (
                        e["leaf"].as_u64().unwrap_or(0),
                        e["subleaf"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    eprintln!("B's probe: guest user space differs from the guest kernel in leaves {differing:x?}");

    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    if differing.is_empty() {
        assert!(
            run.success,
            "refused although user space sees the guest's CPU: {}",
            run.stderr
        );
        assert_migrated(&bed, name, None);
        return;
    }
    let says = "shows guest user space (CPL3) other CPUID values than the guest kernel (CPL0)";
    assert_refused(&bed, name, mark, &run, says);
    assert!(run.stderr.contains(says), "{}", run.stderr);
    for (leaf, subleaf) in differing {
        assert_names(&run, &format!("CPUID.{leaf:#x}.{subleaf}: kernel "));
    }
    assert!(
        run.stderr.contains("policy.user_mode_cpuid = \"allow\""),
        "the refusal does not name the policy that decided it:\n{}",
        run.stderr
    );
}

/// The seeds' silent migration: B's guests lose `x2apic` and `tsc-deadline` (QEMU itself
/// completes such a migration and the running guest's CPUID.1:ECX changes).
#[test]
fn kvm_refuses_a_destination_whose_guests_lose_x2apic_and_tsc_deadline() {
    let Some(mut bed) = kvm_bed(Some("-x2apic,-tsc-deadline"), true) else {
        return;
    };
    let name = "kvm-x2apic";
    let live = start_stamped(&mut bed, name, HASWELL);
    let ecx = stamped_leaf(&live, 1, 0).map_or(0, |r| r[2]);
    assert!(
        ecx & (1 << 21) != 0 && ecx & (1 << 24) != 0,
        "the source guest has no x2apic/tsc-deadline to lose (CPUID.1:ECX {ecx:#010x})"
    );
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert_refused(&bed, name, mark, &run, "x2apic,tsc-deadline");
    assert_names(&run, "lost: x2apic (CPUID.0x1:ECX[21])");
    assert_names(&run, "lost: tsc-deadline (CPUID.0x1:ECX[24])");
}

/// B's guests see another brand string (`model-id`), which libvirt does not check at all.
#[test]
fn kvm_refuses_a_destination_whose_guests_see_another_model_id() {
    let other = "cpuguard bed other CPU";
    let options = format!("model-id={other}");
    let Some(mut bed) = kvm_bed(Some(&options), true) else {
        return;
    };
    let name = "kvm-model-id";
    start_stamped(&mut bed, name, HASWELL);
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert_refused(&bed, name, mark, &run, "brand string");
    assert_names(
        &run,
        "changed: brand string (CPUID.0x80000002-0x80000004): '",
    );
    assert!(
        run.stderr.contains(&format!("-> '{other}'")),
        "{}",
        run.stderr
    );
}

/// B's guests see the other vendor than the source's guests do (whichever the source has).
#[test]
fn kvm_refuses_a_destination_whose_guests_see_another_vendor() {
    let Some(mut bed) = kvm_bed(None, true) else {
        return;
    };
    let name = "kvm-vendor";
    let live = start_stamped(&mut bed, name, HASWELL);
    let source = stamped_leaf(&live, 0, 0)
        .map(vendor)
        .unwrap_or_else(|| panic!("the stamp has no leaf 0:\n{live}"));
    let other = if source == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    bed_sh(&["emulator-b", "set", &format!("vendor={other}")]).ok();
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert_refused(&bed, name, mark, &run, "vendor");
    assert_names(
        &run,
        &format!("changed: vendor (CPUID.0x0:EBX,EDX,ECX): '{source}' -> '{other}'"),
    );
}

/// Defines and starts NAME on A with a host-passthrough CPU, as users write it first; where this
/// host's KVM cannot start that (e.g. QEMU aborts setting the arch-capabilities MSR), with
/// `arch-capabilities` disabled. Returns the CPU element that started.
fn start_host_passthrough(bed: &mut Bed, name: &str) -> &'static str {
    for cpu in [PASSTHROUGH, PASSTHROUGH_NO_ARCH_CAPABILITIES] {
        bed.define_guest_kvm(name, Some(cpu));
        let mark = bed.audit_mark();
        let start = bed.virsh(Host::A, &["start", name]);
        if start.success {
            bed.wait_stamped(Host::A, name, mark);
            return cpu;
        }
        eprintln!("{cpu} does not start here: {}", start.stderr.trim());
        // The next definition gets another UUID: libvirt refuses it while this one exists.
        bed.virsh(Host::A, &["undefine", name]).ok();
    }
    panic!("no host-passthrough guest starts under this KVM, with or without arch-capabilities");
}

/// A host-passthrough guest passes to an identical destination, and is refused by one whose
/// guests would differ (here: without x2apic).
#[test]
fn kvm_host_passthrough_passes_to_an_identical_destination_and_is_refused_by_another() {
    let Some(mut bed) = kvm_bed(None, true) else {
        return;
    };
    let name = "kvm-passthrough";
    let cpu = start_host_passthrough(&mut bed, name);
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(
        run.success,
        "host-passthrough to an identical B refused: {}",
        run.stderr
    );
    let live = assert_migrated(&bed, name, None);
    assert!(
        live.contains("<cpu mode='host-passthrough'"),
        "B does not run {name} host-passthrough:\n{live}"
    );
    bed.expect_audit(mark, "prepare", "allowed", name);

    bed_sh(&["emulator-b", "set", "-x2apic"]).ok();
    let name = "kvm-passthrough-2";
    bed.define_guest_kvm(name, Some(cpu));
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    bed.wait_stamped(Host::A, name, mark);
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert_refused(&bed, name, mark, &run, "x2apic");
    assert_names(&run, "lost: x2apic (CPUID.0x1:ECX[21])");
}

/// KVM's paravirtual feature bits (QEMU's property names, CPUID.0x40000001:EAX) that QEMU can
/// turn off per guest.
const KVM_PV_FEATURES: [(u32, &str); 11] = [
    (6, "kvm-pv-eoi"),
    (5, "kvm-steal-time"),
    (4, "kvm-asyncpf"),
    (1, "kvm-nopiodelay"),
    (7, "kvm-pv-unhalt"),
    (9, "kvm-pv-tlb-flush"),
    (11, "kvm-pv-ipi"),
    (12, "kvm-poll-control"),
    (13, "kvm-pv-sched-yield"),
    (14, "kvm-asyncpf-int"),
    (24, "kvmclock-stable-bit"),
];

/// The KVM leaves are compared, not masked: B's guests lack one paravirtual feature the source's
/// guests have (the first of `KVM_PV_FEATURES` the source's stamp shows), and the refusal names
/// the leaf, the register and the feature.
#[test]
fn kvm_refuses_a_destination_whose_kvm_paravirtual_leaves_differ() {
    let Some(mut bed) = kvm_bed(None, true) else {
        return;
    };
    let name = "kvm-pv-leaves";
    let live = start_stamped(&mut bed, name, HASWELL);
    let signature = stamped_leaf(&live, 0x4000_0000, 0)
        .unwrap_or_else(|| panic!("the KVM guest's stamp has no leaf 0x40000000:\n{live}"));
    assert_eq!(
        [signature[1], signature[2], signature[3]],
        [0x4b4d_564b, 0x564b_4d56, 0x0000_004d],
        "leaf 0x40000000 of a KVM guest does not carry KVM's signature"
    );
    let features = stamped_leaf(&live, 0x4000_0001, 0).map_or(0, |r| r[0]);
    let (_, feature) = KVM_PV_FEATURES
        .iter()
        .find(|(bit, _)| features & (1 << bit) != 0)
        .unwrap_or_else(|| {
            panic!("the source guest has no KVM feature QEMU can turn off (0x40000001:EAX {features:#010x})")
        });
    bed_sh(&["emulator-b", "set", &format!("{feature}=off")]).ok();
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert_refused(&bed, name, mark, &run, "KVM paravirtual features");
    let prefix = "changed: KVM paravirtual features (CPUID.0x40000001:EAX): ";
    let line = run
        .stderr
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("the refusal does not name `{prefix}`:\n{}", run.stderr));
    let (source, destination) = line[prefix.len()..]
        .split_once(" -> ")
        .unwrap_or_else(|| panic!("not `A -> B`: {line}"));
    let has = |side: &str| {
        side.trim_start_matches('[')
            .split([' ', ']'])
            .any(|w| w == *feature)
    };
    assert!(
        has(source) && !has(destination),
        "`{feature}` is not what the refusal shows lost: {line}"
    );
}
