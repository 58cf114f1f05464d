//! aarch64 guests on the two-host bed (issue 6): QEMU's `virt` machine under TCG
//! (qemu-system-aarch64), cpuguard's aarch64 heartbeat firmware as the whole guest, cpuguard as
//! both hosts' hook, real `virsh migrate --live`.
//!
//! - A -> B with the same CPU passes: the stamp was written on A, the heartbeat goes on on B from
//!   where it was (`aarch64_guest_with_the_same_cpu_migrates_and_keeps_beating`, and for
//!   `<cpu mode='maximum'/>`).
//! - A destination whose guests see other ID registers (`bed.sh emulator-b set pmu=off`, or
//!   `lpa2=off` for `max`) is refused at B's prepare phase, naming the register fields the
//!   src/aarch64 probe measures as different; the guest keeps running on A and the refusal is in the
//!   bed's syslog. Without cpuguard, QEMU itself fails such a migration only after B's QEMU has
//!   started and the state was sent, with no word of what differs (pinned below).
//!
//! Runs as root; see tests/support/bed.rs. libvirt 9.0 accepts, for an aarch64 TCG domain,
//! `<cpu mode='custom' match='exact'><model>cortex-a57</model></cpu>` (check becomes 'none';
//! check='partial' fails to start: "the CPU is incompatible with host CPU: unknown host CPU") and
//! `<cpu mode='maximum'/>` (`-cpu max`); not host-model ("not supported by hypervisor"), not
//! `<feature>` elements ("unknown CPU feature"); without `<cpu>` it starts a 32-bit cortex-a15.

#[path = "support/bed.rs"]
mod bed;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bed::{
    assert_consecutive_from_zero, bed_sh, last_heartbeat, wait_for_heartbeat_above, Arch, Bed,
    Host, AUDIT_WAIT, HEARTBEAT_WAIT,
};
use cpuguard::aarch64::{self, ArmCpu, ArmProbeConfig, ArmProbeOptions};
use cpuguard::domain::guest::Accel;

const QEMU_ARM: &str = "/usr/bin/qemu-system-aarch64";
/// The heartbeat's period (5/16 s of the guest's virtual count, src/aarch64/probe/firmware.rs).
const HEARTBEAT_PERIOD: Duration = Duration::from_micros(312_500);

const CORTEX_A57: &str =
    "<cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>";
const MAXIMUM: &str = "<cpu mode='maximum'/>";

/// What the src/aarch64 probe says a guest of `cpu` loses, gains or changes when its emulator adds
/// `,cpu_options` to `-cpu` (as `bed.sh emulator-b set` does on B): probed through a wrapper of
/// this test's own, independent of the hook's code path.
fn measured_difference(dir: &Path, cpu: ArmCpu, cpu_options: &str) -> aarch64::Diff {
    let wrapper = dir.join("qemu-system-aarch64-with-options");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nargs=()\nwhile (($#)); do\n  if [[ $1 == -cpu ]]; then args+=(-cpu \"$2,{cpu_options}\"); shift 2; continue; fi\n  args+=(\"$1\"); shift\ndone\nexec {QEMU_ARM} \"${{args[@]}}\"\n"
        ),
    )
    .expect("write the wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod the wrapper");
    let wrapper = wrapper.to_string_lossy().to_string();
    let options = ArmProbeOptions {
        timeout: Duration::from_secs(30),
        allowed_emulators: vec![PathBuf::from(QEMU_ARM), PathBuf::from(&wrapper)],
        work_dir: None,
    };
    let plain = aarch64::probe(
        &ArmProbeConfig::new(QEMU_ARM, Accel::Tcg, cpu.clone()),
        &options,
    )
    .expect("probe without options");
    let changed = aarch64::probe(&ArmProbeConfig::new(&wrapper, Accel::Tcg, cpu), &options)
        .expect("probe through the wrapper");
    aarch64::diff(&plain, &changed)
}

/// Defines NAME (aarch64, `cpu_xml`) on A with cpuguard as both hooks, starts it, waits for the
/// stamp its `started` hook writes and for the first heartbeat; returns the last counter seen.
fn start_stamped_aarch64(bed: &mut Bed, name: &str, cpu_xml: &str) -> u64 {
    bed.define_guest_arch(name, Some(cpu_xml), Arch::Aarch64);
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
    let stamped = bed.wait_stamped(Host::A, name, mark);
    let domain = format!("domain={name}");
    // The source measured the guest's ID registers (the aarch64 probe's table), not CPUID.
    assert!(
        stamped.contains(aarch64::probe::firmware::HEADER),
        "the stamp of {name} carries no aarch64 ID-register table:\n{stamped}"
    );
    assert!(
        bed.wait_audit(
            mark,
            &["phase=stamp", "action=stamped", &domain],
            AUDIT_WAIT
        )
        .is_some(),
        "no `phase=stamp action=stamped {domain}` audit line; lines since the start:\n{}",
        bed.audit_lines_since(mark).join("\n")
    );
    assert_eq!(
        bed.firmware_kind_of(Arch::Aarch64),
        "heartbeat",
        "the bed's aarch64 guests do not run cpuguard's heartbeat firmware"
    );
    let serial = bed.serial_path(name);
    wait_for_heartbeat_above(&serial, None, HEARTBEAT_WAIT).unwrap_or_else(|| {
        panic!(
            "aarch64 guest {name} printed no heartbeat on A ({})",
            serial.display()
        )
    })
}

/// A -> B between hosts with the same CPU: the migration passes through cpuguard, the guest runs
/// on B with the same CPU, its heartbeat goes on from where it was.
fn assert_same_cpu_migration(cpu_xml: &str, name: &str) {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(env!("CARGO_BIN_EXE_cpuguard")));
    let before = start_stamped_aarch64(&mut bed, name, cpu_xml);

    let mark = bed.audit_mark();
    let started = Instant::now();
    let run = bed.migrate(name, Host::A);
    let took = started.elapsed();
    assert!(
        run.success,
        "virsh migrate of aarch64 guest {name} A -> B failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    eprintln!("live migration of aarch64 guest {name} A -> B took {took:?}");
    assert_eq!(bed.domain_state(Host::B, name).as_deref(), Some("running"));
    assert_eq!(bed.domain_state(Host::A, name), None, "{name} still on A");

    let serial = bed.serial_path(name);
    let mark_b = last_heartbeat(&serial);
    let after = wait_for_heartbeat_above(&serial, mark_b, HEARTBEAT_WAIT);
    assert!(
        after > mark_b && after > Some(before),
        "heartbeat of {name} stopped after the migration (before {before}, at the end of the \
         migration {mark_b:?}, then {after:?})"
    );
    assert_consecutive_from_zero(&serial);

    let domain = format!("domain={name}");
    assert!(
        bed.wait_audit(
            mark,
            &[
                "phase=prepare",
                "action=allowed",
                &domain,
                "incoming=migrate"
            ],
            AUDIT_WAIT
        )
        .is_some(),
        "no `phase=prepare action=allowed {domain} incoming=migrate` line; lines since:\n{}",
        bed.audit_lines_since(mark).join("\n")
    );
    let live_b = bed.virsh(Host::B, &["dumpxml", name]).ok();
    assert!(
        live_b.contains("arch='aarch64'"),
        "B's live XML is not aarch64:\n{live_b}"
    );
}

/// Issue 6, first half: cortex-a57, same CPU on both hosts.
#[test]
fn aarch64_guest_with_the_same_cpu_migrates_and_keeps_beating() {
    assert_same_cpu_migration(CORTEX_A57, "cg-arm-a57-same");
}

/// `<cpu mode='maximum'/>` (`-cpu max`, every feature TCG has), same CPU on both hosts.
#[test]
fn aarch64_maximum_guest_with_the_same_cpu_migrates() {
    assert_same_cpu_migration(MAXIMUM, "cg-arm-max-same");
}

/// Issue 6, second half: B's guests would see other ID registers. The refusal names every field
/// the src/aarch64 probe measures as different (`expected_subjects` must be among them).
fn assert_refused_naming_fields(
    name: &str,
    cpu_xml: &str,
    cpu: ArmCpu,
    cpu_options: &str,
    expected_subjects: &[&str],
) {
    let Some(mut bed) = Bed::up() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let measured = measured_difference(dir.path(), cpu, cpu_options);
    assert!(
        !measured.is_equivalent(),
        "-cpu ...,{cpu_options} changes no ID register field"
    );
    let subjects: Vec<String> = measured
        .lost
        .iter()
        .chain(&measured.gained)
        .chain(&measured.changed)
        .map(|c| c.subject())
        .collect();
    for expected in expected_subjects {
        assert!(
            subjects.iter().any(|s| s == expected),
            "the probe does not measure {expected} as changed by {cpu_options}: {subjects:?}"
        );
    }

    bed.install_hook(Path::new(env!("CARGO_BIN_EXE_cpuguard")));
    bed_sh(&["emulator-b", "set", cpu_options, "--arch", "aarch64"]).ok();
    start_stamped_aarch64(&mut bed, name, cpu_xml);

    let mark = bed.audit_mark();
    let started = Instant::now();
    let run = bed.migrate(name, Host::A);
    eprintln!(
        "refused migration of {name} returned after {:?}",
        started.elapsed()
    );
    assert!(!run.success, "migration of {name} to the changed B passed");
    eprintln!("virsh migrate said:\n{}", run.stderr.trim_end());
    let expected =
        format!("cpuguard: refusing incoming migration of {name}: the guest CPU would change on");
    assert!(
        run.stderr.contains(&expected),
        "virsh migrate did not show cpuguard's refusal (`{expected}`):\n{}",
        run.stderr
    );
    for (kind, changes) in [
        ("lost", &measured.lost),
        ("gained", &measured.gained),
        ("changed", &measured.changed),
    ] {
        for change in changes {
            let line = format!("{kind}: {}", change.subject());
            assert!(
                run.stderr.contains(&line),
                "the refusal does not say `{line}`:\n{}",
                run.stderr
            );
        }
    }
    // Refused at prepare, before B's QEMU started: QEMU's own late failure never happened.
    assert!(
        !run.stderr.contains("unexpectedly failed"),
        "B's QEMU was started and the migration failed there, not at cpuguard:\n{}",
        run.stderr
    );
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
    assert_eq!(bed.domain_state(Host::B, name), None, "{name} left on B");
    let serial = bed.serial_path(name);
    let at_refusal = last_heartbeat(&serial);
    assert!(
        wait_for_heartbeat_above(&serial, at_refusal, HEARTBEAT_WAIT) > at_refusal,
        "{name} stopped beating on A after the refused migration"
    );
    let domain = format!("domain={name}");
    let line = bed.wait_audit(
        mark,
        &["phase=prepare", "action=refused", &domain],
        AUDIT_WAIT,
    );
    let line = line.unwrap_or_else(|| {
        panic!(
            "no `phase=prepare action=refused {domain}` audit line; lines since:\n{}",
            bed.audit_lines_since(mark).join("\n")
        )
    });
    assert!(
        line.contains(" cpuguard[") || line.contains(" cpuguard:"),
        "audit line not tagged cpuguard: {line}"
    );
}

/// cortex-a57 on B without its PMU: ID_AA64DFR0_EL1.PMUVer 1 -> 0.
#[test]
fn aarch64_destination_without_the_pmu_is_refused_naming_the_field() {
    assert_refused_naming_fields(
        "cg-arm-a57-nopmu",
        CORTEX_A57,
        ArmCpu::Model("cortex-a57".to_string()),
        "pmu=off",
        &["ID_AA64DFR0_EL1.PMUVer"],
    );
}

/// `max` on B without FEAT_LPA2: a change of ID_AA64MMFR0_EL1 only, with the same system
/// registers on both sides.
#[test]
fn aarch64_maximum_destination_without_lpa2_is_refused_naming_the_fields() {
    assert_refused_naming_fields(
        "cg-arm-max-nolpa2",
        MAXIMUM,
        ArmCpu::Max,
        "lpa2=off",
        &["ID_AA64MMFR0_EL1.TGran4", "ID_AA64MMFR0_EL1.TGran16"],
    );
}

/// What the bed shows without cpuguard (the reason for the hook): libvirt does not compare an
/// aarch64 guest's CPU with what B's QEMU would give it; QEMU refuses the incoming CPU state only
/// after B's QEMU has started and the state was sent, with no word of what differs.
#[test]
fn without_cpuguard_qemu_fails_a_changed_aarch64_destination_late_and_unexplained() {
    let Some(mut bed) = Bed::up() else { return };
    bed_sh(&["emulator-b", "set", "pmu=off", "--arch", "aarch64"]).ok();
    let name = "cg-arm-unguarded";
    bed.define_guest_arch(name, Some(CORTEX_A57), Arch::Aarch64);
    bed.virsh(Host::A, &["start", name]).ok();
    let serial = bed.serial_path(name);
    assert!(wait_for_heartbeat_above(&serial, None, HEARTBEAT_WAIT).is_some());
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "migration of {name} to B with pmu=off passed");
    assert!(
        run.stderr.contains("unexpectedly failed") && !run.stderr.contains("PMU"),
        "expected QEMU's late, unexplained failure:\n{}",
        run.stderr
    );
    let log = bed
        .state_dir()
        .join("b/log/qemu")
        .join(format!("{name}.log"));
    let log = fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert!(
        log.contains("error while loading state") && log.contains("'cpu'"),
        "B's QEMU did not start and fail on the incoming CPU state:\n{log}"
    );
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
}

/// The aarch64 heartbeat firmware itself, under plain qemu-system-aarch64 (no libvirt): the
/// x86 heartbeat's line format on the PL011, counters 0, 1, 2, ..., paced by the virtual count
/// (never faster than one line per period).
#[test]
fn aarch64_heartbeat_firmware_counts_on_the_pl011() {
    if !bed::gate::require(&[bed::gate::Need::Qemu("aarch64")]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let firmware = dir.path().join("heartbeat-aarch64.bin");
    fs::write(&firmware, aarch64::probe::HEARTBEAT_AARCH64).expect("write firmware");
    let serial = dir.path().join("serial.out");
    let started = Instant::now();
    let mut child = Command::new(QEMU_ARM)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "virt,accel=tcg",
            "-cpu",
            "cortex-a57",
            "-m",
            "64",
            "-bios",
        ])
        .arg(&firmware)
        .arg("-chardev")
        .arg(format!("file,id=serial,path={}", serial.display()))
        .args(["-serial", "chardev:serial"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-system-aarch64");
    std::thread::sleep(Duration::from_secs(3));
    child.kill().expect("stop our QEMU");
    let elapsed = started.elapsed();
    let status = child.wait().expect("reap our QEMU");
    let text = fs::read_to_string(&serial).expect("serial output");
    assert!(
        status.code().is_none(),
        "QEMU exited on its own ({status}) instead of running until killed; output:\n{text}"
    );
    // QEMU was killed at any point of a line: only complete lines count.
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    let lines: Vec<&str> = complete.split_terminator("\r\n").collect();
    for line in &lines {
        let digits = line.strip_prefix("heartbeat ").unwrap_or("");
        assert!(
            digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()),
            "not a `heartbeat NNNNNN` line: {line:?} in {text:?}"
        );
    }
    assert_consecutive_from_zero(&serial);
    let max_lines = (elapsed.as_secs_f64() / HEARTBEAT_PERIOD.as_secs_f64()) as usize + 1;
    assert!(
        lines.len() >= 2 && lines.len() <= max_lines,
        "{} heartbeat lines in {elapsed:?} (expected 2..={max_lines})",
        lines.len()
    );
}
