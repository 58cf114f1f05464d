//! Issue 4 on the two-host bed, the cases beyond a plain pass or veto: a VM started before
//! cpuguard was installed (policy, then `cpuguard stamp`), several migrations at once (one probe
//! per distinct CPU configuration), and the faults (emulator missing, probe hanging, cache
//! unwritable or corrupt, syslog down, stamp process killed): each with its documented outcome and
//! no VM lost.
//!
//! Runs as root; see tests/support/bed.rs.

#[path = "support/bed.rs"]
mod bed;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bed::{bed_sh, Bed, Host, AUDIT_WAIT};
use cpuguard::domain::metadata::STAMP_NS;

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");
const NEHALEM: &str =
    "<cpu mode='custom' match='exact' check='partial'><model fallback='forbid'>Nehalem</model></cpu>";

fn host_config(bed: &Bed, host: Host, toml: &str) {
    let dir = bed.state_dir().join(match host {
        Host::A => "a",
        Host::B => "b",
    });
    let path = dir.join("cpuguard-etc/cpuguard.toml");
    fs::write(&path, toml).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn cache_dir(bed: &Bed, host: Host) -> PathBuf {
    bed.state_dir()
        .join(match host {
            Host::A => "a",
            Host::B => "b",
        })
        .join("cpuguard-cache")
}

fn cache_entries(bed: &Bed, host: Host) -> Vec<PathBuf> {
    fs::read_dir(cache_dir(bed, host))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

fn start_stamped(bed: &mut Bed, name: &str, cpu: Option<&str>) {
    bed.define_guest(name, cpu);
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    bed.wait_stamped(Host::A, name, mark);
}

/// The VM runs on B and nothing of it is left on A.
fn assert_on_b(bed: &Bed, name: &str) {
    assert_eq!(
        bed.domain_state(Host::B, name).as_deref(),
        Some("running"),
        "{name} must run on B"
    );
    assert!(
        bed.domain_state(Host::A, name).is_none(),
        "{name} left on A"
    );
}

/// Case 4: a VM started before cpuguard was installed has no stamp. The default policy refuses it
/// and tells the operator what to do; after `cpuguard stamp NAME` on the source it migrates.
#[test]
fn unstamped_vm_is_refused_until_stamped() {
    let Some(mut bed) = Bed::up() else { return };
    let name = "pol-unstamped";
    bed.define_guest(name, None);
    bed.virsh(Host::A, &["start", name]).ok();
    bed.install_hook(Path::new(BIN)); // restarts libvirtd; the running VM is kept
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
    let xml = bed.virsh(Host::A, &["dumpxml", name]).ok();
    assert!(!xml.contains(STAMP_NS), "started before cpuguard: no stamp");

    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "unstamped VM migrated");
    assert!(
        run.stderr.contains(&format!(
            "cpuguard: refusing incoming migration of {name}: the source left no cpuguard stamp"
        )) && run
            .stderr
            .contains(&format!("run `cpuguard stamp {name}` on the source host")),
        "{}",
        run.stderr
    );
    bed.assert_still_on_a(name);
    bed.expect_audit(mark, "prepare", "refused", name);

    // The operator stamps by hand, on the source.
    let stamp = bed_sh(&["exec-a", BIN, "stamp", name]);
    assert!(stamp.success, "cpuguard stamp failed: {}", stamp.stderr);
    assert!(
        stamp.stdout.contains(&format!("stamped {name} sha256:")),
        "{}",
        stamp.stdout
    );
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "stamped VM refused: {}", run.stderr);
    assert_on_b(&bed, name);
}

/// Case 4, other policy: with `policy.unstamped_source = "allow"` on the destination the same VM
/// migrates, and the audit trail says a policy let it through.
#[test]
fn unstamped_vm_passes_when_the_policy_allows() {
    let Some(mut bed) = Bed::up() else { return };
    let name = "pol-allow";
    bed.define_guest(name, None);
    bed.virsh(Host::A, &["start", name]).ok();
    host_config(&bed, Host::B, "[policy]\nunstamped_source = \"allow\"\n");
    bed.install_hook(Path::new(BIN));
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "{}", run.stderr);
    assert_on_b(&bed, name);
    let line = bed
        .wait_audit(
            mark,
            &["phase=prepare", "action=allowed", &format!("domain={name}")],
            AUDIT_WAIT,
        )
        .expect("audit line for the allowed unstamped VM");
    assert!(line.contains("policy.unstamped_source"), "{line}");
}

/// Case 5: four migrations at once, two CPU configurations: every one passes, and B measures each
/// configuration once (its cache ends with two entries; two measurements in its audit trail).
#[test]
fn concurrent_migrations_measure_each_configuration_once() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(BIN));
    let guests = [
        ("conc-q1", None),
        ("conc-q2", None),
        ("conc-n1", Some(NEHALEM)),
        ("conc-n2", Some(NEHALEM)),
    ];
    let before = bed.audit_mark();
    for (name, cpu) in guests {
        start_stamped(&mut bed, name, cpu);
    }
    // A's stamp lines (A measuring for itself) must be in before the count starts.
    for (name, _) in guests {
        assert!(bed
            .wait_audit(
                before,
                &["phase=stamp", "action=stamped", &format!("domain={name}")],
                AUDIT_WAIT
            )
            .is_some());
    }
    // B has measured nothing yet.
    for f in cache_entries(&bed, Host::B) {
        let _ = fs::remove_file(f);
    }
    let mark = bed.audit_mark();
    let runs: Vec<(String, bed::Run)> = std::thread::scope(|s| {
        let handles: Vec<_> = guests
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let bed = &bed;
                // Concurrent incoming migrations each need their own port on B.
                let migrate_uri = format!("tcp://{}:{}", Host::B.addr(), 49160 + i);
                s.spawn(move || {
                    let run = bed.virsh(
                        Host::A,
                        &[
                            "migrate",
                            "--live",
                            "--persistent",
                            "--undefinesource",
                            name,
                            &Host::B.tcp_uri(),
                            "--migrateuri",
                            &migrate_uri,
                        ],
                    );
                    (name.to_string(), run)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("migration thread"))
            .collect()
    });
    for (name, run) in &runs {
        assert!(run.success, "{name}: {}", run.stderr);
        assert_on_b(&bed, name);
    }
    for (name, _) in &guests {
        assert!(bed
            .wait_audit(
                mark,
                &["phase=prepare", "action=allowed", &format!("domain={name}")],
                AUDIT_WAIT
            )
            .is_some());
    }
    // Every fingerprint B needed (prepare, and the stamps B writes after arrival) came from two
    // measurements; everything else was a cache hit. B's stamps come from detached processes:
    // wait for each one's line before counting.
    for (name, _) in &guests {
        assert!(
            bed.wait_audit(
                mark,
                &["phase=stamp", "action=stamped", &format!("domain={name}")],
                bed::stamp_wait()
            )
            .is_some(),
            "B did not stamp {name} after its arrival"
        );
    }
    let lines = bed.audit_lines_since(mark);
    let measured = lines
        .iter()
        .filter(|l| l.contains("fingerprint=measured"))
        .count();
    assert_eq!(measured, 2, "measurements on B:\n{}", lines.join("\n"));
    assert_eq!(cache_entries(&bed, Host::B).len(), 2);
}

/// Case 6: the destination's emulator is missing (on B only, the emulator path is /dev/null):
/// libvirt refuses the incoming migration itself, before any hook phase; the VM stays on A.
#[test]
fn destination_without_its_emulator_keeps_the_vm_on_the_source() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(BIN));
    let name = "fault-emu";
    start_stamped(&mut bed, name, None);
    bed_sh(&[
        "exec-b",
        "mount",
        "--bind",
        "/dev/null",
        "/usr/bin/qemu-system-x86_64",
    ])
    .ok();
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "migrated to a host without its emulator");
    assert!(
        run.stderr.contains("/usr/bin/qemu-system-x86_64"),
        "{}",
        run.stderr
    );
    bed.assert_still_on_a(name);
}

/// Case 6: an emulator libvirt will run but cpuguard must not (group-writable: anyone in the group
/// could replace what root executes): the destination cannot measure, and the default
/// `policy.probe_failure` refuses at prepare, naming the reason; the VM stays on A.
#[test]
fn destination_that_cannot_run_the_probe_refuses() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(BIN));
    let name = "fault-probe";
    start_stamped(&mut bed, name, None);
    let copy = bed.state_dir().join("b/qemu-group-writable");
    fs::copy("/usr/bin/qemu-system-x86_64", &copy).expect("copy emulator");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o775)).expect("chmod");
    let copy_s = copy.to_string_lossy().to_string();
    bed_sh(&[
        "exec-b",
        "mount",
        "--bind",
        &copy_s,
        "/usr/bin/qemu-system-x86_64",
    ])
    .ok();
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "migrated without a measurement");
    assert!(
        run.stderr.contains(&format!(
            "cpuguard: refusing incoming migration of {name}: cannot measure this host's guest CPU"
        )) && run.stderr.contains("writable by group or others"),
        "{}",
        run.stderr
    );
    bed.assert_still_on_a(name);
    bed.expect_audit(mark, "prepare", "refused", name);
    let _ = fs::remove_file(&copy);
}

/// Case 6: a probe that hangs is killed at `probe.timeout_secs` and the migration refused.
#[test]
fn hanging_probe_times_out_and_refuses() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(BIN));
    let name = "fault-hang";
    start_stamped(&mut bed, name, None);
    host_config(&bed, Host::B, "[probe]\ntimeout_secs = 2\n");
    // On B only: an emulator that hangs when started as cpuguard's probe (the only user of
    // isa-debug-exit) and behaves normally otherwise.
    let d = bed.state_dir().join("b");
    let real = d.join("qemu-real-hang");
    fs::write(&real, b"").expect("mount point");
    let wrapper = d.join("qemu-hang");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nfor a in \"$@\"; do [[ $a == *isa-debug-exit* ]] && exec sleep 600; done\nexport QEMU_MODULE_DIR=/usr/lib/x86_64-linux-gnu/qemu\nexec -a /usr/bin/qemu-system-x86_64 {} -L /usr/share/qemu \"$@\"\n",
            real.display()
        ),
    )
    .expect("wrapper");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let real_s = real.to_string_lossy().to_string();
    let wrapper_s = wrapper.to_string_lossy().to_string();
    bed_sh(&[
        "exec-b",
        "mount",
        "--bind",
        "/usr/bin/qemu-system-x86_64",
        &real_s,
    ])
    .ok();
    bed_sh(&[
        "exec-b",
        "mount",
        "--bind",
        &wrapper_s,
        "/usr/bin/qemu-system-x86_64",
    ])
    .ok();

    let started = std::time::Instant::now();
    let run = bed.migrate(name, Host::A);
    let took = started.elapsed();
    assert!(!run.success, "migrated with a hanging probe");
    assert!(
        run.stderr.contains("cannot measure this host's guest CPU") && run.stderr.contains("2s"),
        "{}",
        run.stderr
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    bed.assert_still_on_a(name);
    // The hung probe's process group was killed: no `sleep 600` is left behind.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 600$"])
        .output()
        .expect("pgrep");
    assert!(ps.stdout.is_empty(), "hung probe left behind");
}

/// Case 6: an unwritable cache directory does not decide the migration: measured without it,
/// audited as a bypass.
#[test]
fn unwritable_cache_is_bypassed() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(BIN));
    let name = "fault-rocache";
    start_stamped(&mut bed, name, None);
    bed_sh(&[
        "exec-b",
        "mount",
        "--bind",
        "/var/cache/cpuguard",
        "/var/cache/cpuguard",
    ])
    .ok();
    bed_sh(&[
        "exec-b",
        "mount",
        "-o",
        "remount,bind,ro",
        "/var/cache/cpuguard",
    ])
    .ok();
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "{}", run.stderr);
    assert_on_b(&bed, name);
    let line = bed
        .wait_audit(
            mark,
            &["phase=prepare", "action=cache", &format!("domain={name}")],
            AUDIT_WAIT,
        )
        .expect("cache bypass audited");
    assert!(line.contains("bypassed"), "{line}");
}

/// Case 6: a corrupt cache entry is never trusted: discarded (audited) and re-measured.
#[test]
fn corrupt_cache_entry_is_remeasured() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(BIN));
    let first = "fault-corrupt1";
    start_stamped(&mut bed, first, None);
    assert!(bed.migrate(first, Host::A).success);
    let entries = cache_entries(&bed, Host::B);
    assert!(!entries.is_empty(), "B cached the configuration");
    for e in &entries {
        let text = fs::read_to_string(e).expect("entry");
        fs::write(e, &text[..text.len() / 2]).expect("truncate");
    }
    let second = "fault-corrupt2";
    start_stamped(&mut bed, second, None);
    let mark = bed.audit_mark();
    let run = bed.migrate(second, Host::A);
    assert!(run.success, "{}", run.stderr);
    assert_on_b(&bed, second);
    let line = bed
        .wait_audit(
            mark,
            &["action=cache", &format!("domain={second}")],
            AUDIT_WAIT,
        )
        .expect("discarded entry audited");
    assert!(line.contains("discarded"), "{line}");
    assert!(bed
        .wait_audit(
            mark,
            &[
                "phase=prepare",
                "action=allowed",
                "fingerprint=measured",
                &format!("domain={second}")
            ],
            AUDIT_WAIT
        )
        .is_some());
}

/// Case 6: syslog down: the hook still decides (here: lets a compatible VM through) and no VM is
/// lost.
#[test]
fn syslog_down_does_not_stop_the_guard() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(BIN));
    let name = "fault-syslog";
    start_stamped(&mut bed, name, None);
    // Inside B only: /dev/log now leads nowhere.
    bed_sh(&["exec-b", "mount", "--bind", "/dev/null", "/dev/log"]).ok();
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "{}", run.stderr);
    assert_on_b(&bed, name);
}

/// Case 6: the stamp process killed before it wrote: no stamp, the VM runs on, the default policy
/// refuses; a `cpuguard stamp` by hand repairs it.
#[test]
fn killed_stamp_process_leaves_no_stamp_and_is_repaired_by_hand() {
    let Some(mut bed) = Bed::up() else { return };
    // A's stamp helper waits before it starts, so the test can kill it midway.
    let d = bed.state_dir().join("a");
    let slow = d.join("slow-stamp");
    let real = Path::new(BIN)
        .parent()
        .map(|p| p.join("cpuguard-libvirt"))
        .expect("helper path");
    fs::write(
        &slow,
        format!("#!/bin/bash\nsleep 30\nexec {} \"$@\"\n", real.display()),
    )
    .expect("slow helper");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&slow, fs::Permissions::from_mode(0o755)).expect("chmod");
    host_config(
        &bed,
        Host::A,
        &format!("[stamp]\nhelper = \"{}\"\n", slow.display()),
    );
    bed.install_hook(Path::new(BIN));
    let name = "fault-stampkill";
    bed.define_guest(name, None);
    bed.virsh(Host::A, &["start", name]).ok();
    std::thread::sleep(Duration::from_secs(2));
    let killed = std::process::Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("slow-stamp stamp --after-start -- {name}"),
        ])
        .status()
        .expect("pkill");
    assert!(killed.success(), "the stamp process was not running");
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
    let run = bed.migrate(name, Host::A);
    assert!(
        !run.success && run.stderr.contains("the source left no cpuguard stamp"),
        "{}",
        run.stderr
    );
    bed.assert_still_on_a(name);
    host_config(&bed, Host::A, "");
    let stamp = bed_sh(&["exec-a", BIN, "stamp", name]);
    assert!(stamp.success, "{}", stamp.stderr);
    assert!(bed.migrate(name, Host::A).success);
    assert_on_b(&bed, name);
}
