//! Real live migrations between two libvirt daemons on this machine (testbed/bed.sh), with a hook
//! installed on both hosts and a real rsyslogd receiving the audit lines.
//!
//! Runs as root (the bed starts libvirtd and uses mount namespaces); see tests/support/bed.rs.
//! Guests are TCG (domain type='qemu'), so nothing here depends on this machine's KVM.

#[path = "support/bed.rs"]
mod bed;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bed::{wait_for_heartbeat_above, Bed, Host, AUDIT_WAIT, HEARTBEAT_WAIT};

/// The `<cpu ...>` start tag and the `<model ...>` start tag of a domain XML (whitespace
/// normalized), enough to check the attributes cpuguard pins.
fn cpu_tags(xml: &str) -> (String, String) {
    let tag = |name: &str| -> String {
        let open = format!("<{name} ");
        let start = xml
            .find(&open)
            .unwrap_or_else(|| panic!("no <{name}> element in domain XML:\n{xml}"));
        let end = xml[start..]
            .find('>')
            .unwrap_or_else(|| panic!("unterminated <{name}> element in domain XML:\n{xml}"));
        xml[start..start + end + 1]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (tag("cpu"), tag("model"))
}

/// The highest `heartbeat NNNNNN` counter in the guest's serial file.
/// Writes a bash hook (the test bed's plumbing check, independent of cpuguard's code) into the
/// bed's state directory: it logs every call with `logger -t cpuguard` and, at the migrate phase,
/// writes back the incoming XML passed through `sed_expr`.
fn write_bash_hook(bed: &Bed, name: &str, sed_expr: &str) -> PathBuf {
    let dir = bed.state_dir().join("test-hooks");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let path = dir.join(name);
    let script = format!(
        "#!/bin/bash\n\
         xml=$(cat)\n\
         logger -t cpuguard \"phase=$2 action=seen domain=$1 host=$(hostname)\"\n\
         if [[ $2 == migrate ]]; then printf '%s\\n' \"$xml\" | sed \"{sed_expr}\"; fi\n\
         exit 0\n"
    );
    fs::write(&path, script).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    path
}

fn start_on_a(bed: &Bed, name: &str) {
    bed.virsh(Host::A, &["start", name]).ok();
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
}

/// Starts NAME on A under cpuguard and waits for the stamp its `started` hook writes (through a
/// detached helper) into the live metadata: the destination refuses unstamped sources by default.
fn start_stamped_on_a(bed: &Bed, name: &str) {
    let mark = bed.audit_mark();
    start_on_a(bed, name);
    bed.wait_stamped(Host::A, name, mark);
}

/// The acceptance test of issues 2 and 4 (compatible hosts): the freshly built cpuguard is both
/// hosts' hook; a live migration A -> B goes through, the guest keeps running on B (its serial
/// output goes on from where it was), B's live CPU is pinned, and the destination's audit lines
/// (migrate, prepare) are in the real syslog.
#[test]
fn live_migration_through_the_cpuguard_hook() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(env!("CARGO_BIN_EXE_cpuguard")));
    let name = "cg-migrate-1";
    bed.define_guest(name, None);
    start_stamped_on_a(&bed, name);
    let serial = bed.serial_path(name);
    let heartbeat = bed.firmware_kind() == "heartbeat";
    let before = if heartbeat {
        let seen = wait_for_heartbeat_above(&serial, None, HEARTBEAT_WAIT);
        assert!(
            seen.is_some(),
            "guest {name} printed no heartbeat on A ({})",
            serial.display()
        );
        seen
    } else {
        None
    };

    let mark = bed.audit_mark();
    let started = Instant::now();
    let run = bed.migrate(name, Host::A);
    let took = started.elapsed();
    assert!(
        run.success,
        "virsh migrate of {name} A -> B failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    eprintln!("live migration of {name} A -> B took {took:?}");

    assert_eq!(bed.domain_state(Host::B, name).as_deref(), Some("running"));
    assert_eq!(
        bed.domain_state(Host::A, name),
        None,
        "{name} must be gone from A after --undefinesource"
    );

    // The migrate hook's output becomes B's live definition (see the plumbing test below); the
    // persistent (--inactive) definition comes from the source's config, untouched by the hook.
    let live = bed.virsh(Host::B, &["dumpxml", name]).ok();
    let (cpu, model) = cpu_tags(&live);
    assert!(cpu.contains("mode='custom'"), "B's live cpu: {cpu}");
    assert!(cpu.contains("check='full'"), "B's live cpu: {cpu}");
    assert!(cpu.contains("match='exact'"), "B's live cpu: {cpu}");
    assert!(
        model.contains("fallback='forbid'"),
        "B's live model: {model}"
    );

    // libvirt 9 hands the migrate phase the running guest's CPU with match='exact' and
    // fallback='forbid' already (only check='partial' is downgraded, and that cpuguard must not
    // touch): cpuguard audits it as already pinned ("unchanged") rather than "rewrote".
    let domain = format!("domain={name}");
    let migrate_line = bed.wait_audit(mark, &["phase=migrate", &domain], AUDIT_WAIT);
    let lines_since = || bed.audit_lines_since(mark).join("\n");
    let migrate_line = migrate_line.unwrap_or_else(|| {
        panic!(
            "no `phase=migrate {domain}` line in {}; lines since the migration:\n{}",
            bed.audit_log().display(),
            lines_since()
        )
    });
    assert!(
        migrate_line.contains(" cpuguard[") || migrate_line.contains(" cpuguard:"),
        "audit line not tagged cpuguard: {migrate_line}"
    );
    assert!(
        migrate_line.contains("action=rewrote") || migrate_line.contains("action=unchanged"),
        "migrate phase neither pinned nor found pinned: {migrate_line}"
    );
    let prepare_line = bed.wait_audit(
        mark,
        &[
            "phase=prepare",
            "action=allowed",
            &domain,
            "incoming=migrate",
        ],
        AUDIT_WAIT,
    );
    assert!(
        prepare_line.is_some(),
        "no `phase=prepare action=allowed {domain} incoming=migrate` line; lines since the migration:\n{}",
        lines_since()
    );

    if heartbeat {
        let after = wait_for_heartbeat_above(&serial, before, HEARTBEAT_WAIT);
        assert!(
            after > before,
            "guest {name} stopped printing after the migration (last heartbeat {before:?}, now {after:?})"
        );
        let text = fs::read_to_string(&serial).unwrap_or_default();
        assert_eq!(
            text.matches("heartbeat 000000").count(),
            1,
            "guest {name} restarted instead of migrating (counter went back to 0)"
        );
    }
}

/// A -> B -> A with cpuguard on both hosts: the guest comes back running, with its CPU pinned.
#[test]
fn round_trip_through_the_cpuguard_hook() {
    let Some(mut bed) = Bed::up() else { return };
    bed.install_hook(Path::new(env!("CARGO_BIN_EXE_cpuguard")));
    let name = "cg-roundtrip-1";
    bed.define_guest(name, None);
    start_stamped_on_a(&bed, name);
    let xml_on_a = bed.virsh(Host::A, &["dumpxml", name]).ok();
    let cpu_on_a = cpu_tags(&xml_on_a);
    let stamp_on_a = stamp_attrs(&xml_on_a);
    assert_eq!(stamp_on_a.0, "cpuguard-bed-a", "stamped by A");

    let there = bed.migrate(name, Host::A);
    assert!(there.success, "A -> B failed: {}", there.stderr);
    let back = bed.migrate(name, Host::B);
    assert!(back.success, "B -> A failed: {}", back.stderr);

    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
    assert_eq!(bed.domain_state(Host::B, name), None);
    let cpu_back = cpu_tags(&bed.virsh(Host::A, &["dumpxml", name]).ok());
    assert_eq!(
        cpu_back, cpu_on_a,
        "the live CPU of {name} changed over the round trip"
    );
    // Back on A, A re-stamps it after the start: A's host name, a later time, the same digest.
    let deadline = std::time::Instant::now() + bed::stamp_wait();
    let stamp_back = loop {
        let stamp = stamp_attrs(&bed.virsh(Host::A, &["dumpxml", name]).ok());
        if stamp.0 == "cpuguard-bed-a" && stamp.1 != stamp_on_a.1 {
            break stamp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} was not re-stamped on A: {stamp:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        stamp_back.2, stamp_on_a.2,
        "the digest changed over the round trip"
    );
}

/// (host, time, digest) of cpuguard's stamp in a domain XML (empty strings when absent).
fn stamp_attrs(xml: &str) -> (String, String, String) {
    let Some(start) = xml.find(":stamp ") else {
        return Default::default();
    };
    let tag = &xml[start..xml[start..].find('>').map_or(xml.len(), |e| start + e)];
    let attr = |k: &str| {
        tag.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
            .unwrap_or_default()
    };
    (attr("host"), attr("time"), attr("digest"))
}

/// The bed's own plumbing, independent of cpuguard's code, and the libvirt behaviour the hook is
/// built on: the migrate hook's stdout becomes the destination's *live* definition (a marker it
/// adds shows in `virsh dumpxml` on B, not in `--inactive`), and its syslog lines reach the file.
#[test]
fn migrate_hook_output_becomes_the_destination_live_xml() {
    let Some(mut bed) = Bed::up() else { return };
    let hook = write_bash_hook(
        &bed,
        "marker-hook",
        "s|</name>|</name><description>cpuguard-bed-marker</description>|",
    );
    bed.install_hook(&hook);
    let name = "cg-plumbing-1";
    bed.define_guest(name, None);
    start_on_a(&bed, name);
    let mark = bed.audit_mark();

    let run = bed.migrate(name, Host::A);
    assert!(run.success, "virsh migrate failed: {}", run.stderr);
    let live = bed.virsh(Host::B, &["dumpxml", name]).ok();
    let inactive = bed.virsh(Host::B, &["dumpxml", "--inactive", name]).ok();
    assert!(
        live.contains("cpuguard-bed-marker"),
        "marker missing from B's live XML:\n{live}"
    );
    assert!(
        !inactive.contains("cpuguard-bed-marker"),
        "marker unexpectedly in B's persistent XML:\n{inactive}"
    );
    // This hook leaves <cpu> alone, yet B's live CPU is check='full': libvirt applies the source's
    // live CPU (carried in the migration cookie) after the migrate phase.
    let (cpu, _) = cpu_tags(&live);
    assert!(cpu.contains("check='full'"), "B's live cpu: {cpu}");
    let (inactive_cpu, _) = cpu_tags(&inactive);
    assert!(
        inactive_cpu.contains("check='partial'"),
        "B's persistent cpu: {inactive_cpu}"
    );

    // Only B (the destination) runs the hook for an incoming migration, inside its namespace.
    let domain = format!("domain={name}");
    let migrate = bed.wait_audit(mark, &["phase=migrate", &domain], AUDIT_WAIT);
    assert!(
        migrate
            .as_deref()
            .is_some_and(|l| l.contains("host=cpuguard-bed-b")),
        "no migrate-phase line from host B: {migrate:?}"
    );
    let prepare = bed.wait_audit(mark, &["phase=prepare", &domain], AUDIT_WAIT);
    assert!(prepare.is_some(), "no prepare-phase line for {name}");
}

/// libvirt 9 compares the migrate hook's `<cpu check=...>` with the source's and aborts the
/// migration when they differ (ABI stability check): the hook can pin `fallback` but must leave
/// `check` as it came. The source keeps running.
#[test]
fn libvirt_refuses_a_migrate_hook_that_changes_cpu_check() {
    let Some(mut bed) = Bed::up() else { return };
    let hook = write_bash_hook(&bed, "check-hook", "s/check='partial'/check='full'/");
    bed.install_hook(&hook);
    let name = "cg-check-1";
    bed.define_guest(name, None);
    start_on_a(&bed, name);

    let run = bed.migrate(name, Host::A);
    assert!(
        !run.success,
        "migration with a changed cpu check unexpectedly succeeded"
    );
    assert!(
        run.stderr
            .contains("Target CPU check full does not match source partial"),
        "unexpected error: {}",
        run.stderr
    );
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
    assert_eq!(bed.domain_state(Host::B, name), None);
}

/// The veto channel the fingerprint guard uses, with a bash hook: a non-zero exit at `prepare` on
/// the destination aborts the migration, `virsh migrate` shows the hook's stderr, the guest keeps
/// running on the source and nothing is left on the destination.
#[test]
fn prepare_hook_failure_aborts_the_migration_and_the_source_keeps_running() {
    let Some(mut bed) = Bed::up() else { return };
    let dir = bed.state_dir().join("test-hooks");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let hook = dir.join("veto-hook");
    fs::write(
        &hook,
        "#!/bin/bash\n\
         xml=$(cat)\n\
         if [[ $2 == migrate ]]; then printf '%s\\n' \"$xml\"; fi\n\
         if [[ $2 == prepare && $(hostname) == cpuguard-bed-b ]]; then\n\
         echo \"bed-veto: refusing incoming migration of $1\" >&2\n\
         exit 1\n\
         fi\n\
         exit 0\n",
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", hook.display()));
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", hook.display()));
    bed.install_hook(&hook);
    let name = "cg-veto-1";
    bed.define_guest(name, None);
    start_on_a(&bed, name);

    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "the vetoed migration succeeded");
    assert!(
        run.stderr
            .contains(&format!("bed-veto: refusing incoming migration of {name}")),
        "virsh did not show the hook's message: {}",
        run.stderr
    );
    bed.assert_still_on_a(name);
}

/// `bed.sh emulator-b` makes B a host whose guests see a different CPU (the destinations of issue
/// 4). Without cpuguard's guard: a lost feature is caught by libvirt's own check only after B's
/// QEMU started; a different brand string is not noticed at all.
#[test]
fn emulator_b_gives_destination_guests_a_different_cpu() {
    let Some(mut bed) = Bed::up() else { return };
    let hook = write_bash_hook(&bed, "passthrough-hook", "");
    bed.install_hook(&hook);
    let name = "cg-emulator-1";
    bed.define_guest(name, None);
    start_on_a(&bed, name);

    bed::bed_sh(&["emulator-b", "set", "-pni"]).ok();
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "migration to a B without pni succeeded");
    assert!(
        run.stderr.contains("missing features: pni"),
        "{}",
        run.stderr
    );
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
    assert_eq!(bed.domain_state(Host::B, name), None);

    let brand = "cpuguard bed other CPU";
    bed::bed_sh(&["emulator-b", "set", &format!("model-id={brand}")]).ok();
    let run = bed.migrate(name, Host::A);
    bed::bed_sh(&["emulator-b", "reset"]).ok();
    assert!(
        run.success,
        "libvirt refused a brand-string change: {}",
        run.stderr
    );
    assert_eq!(bed.domain_state(Host::B, name).as_deref(), Some("running"));
    let pidfile = bed.state_dir().join(format!("b/run/qemu/{name}.pid"));
    let pid = fs::read_to_string(&pidfile)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", pidfile.display()));
    let cmdline = fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(&format!("model-id={brand}")),
        "B's QEMU did not get the wrapper's -cpu options: {cmdline}"
    );
}
