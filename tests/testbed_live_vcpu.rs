//! The live-vCPU cross-check of a stamp (issue 11) on the two-host bed: a running guest whose
//! QEMU was given another CPU than the domain XML and the running binary describe (an emulator
//! wrapper adding `-cpu` options, which the probe cannot reproduce) gets no stamp, the audit line
//! names what differs, and its migration is refused by default; the same guest started without
//! the wrapper is stamped. Also: features the destination's QEMU filtered are named in a refusal.
//!
//! Runs as root; see tests/support/bed.rs.

#[path = "support/bed.rs"]
mod bed;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bed::{bed_sh, Bed, Host};

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");
const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Host B's x86 emulator replaced, inside B's namespace only, by a bash wrapper that runs
/// `rewrite` (bash code editing the array `args`) and execs a copy of the real QEMU. The copy
/// lives in a tree shaped like /usr (bin/, lib/…/qemu, share/qemu), so QEMU finds its modules
/// and ROMs relative to its own path as it does at /usr/bin: the cross-check's probe runs that
/// copy through /proc/PID/exe, without the wrapper's options. Unmounted when dropped.
struct WrappedEmulatorB {
    dir: PathBuf,
}

impl WrappedEmulatorB {
    fn new(bed: &Bed, rewrite: &str) -> WrappedEmulatorB {
        let dir = bed.state_dir().join("b").join("live-vcpu-wrapper");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).expect("wrapper dir");
        std::fs::create_dir_all(dir.join("lib/x86_64-linux-gnu")).expect("wrapper lib dir");
        std::fs::create_dir_all(dir.join("share")).expect("wrapper share dir");
        std::os::unix::fs::symlink(
            "/usr/lib/x86_64-linux-gnu/qemu",
            dir.join("lib/x86_64-linux-gnu/qemu"),
        )
        .expect("modules link");
        std::os::unix::fs::symlink("/usr/share/qemu", dir.join("share/qemu")).expect("ROM link");
        let real = dir.join("bin/qemu-system-x86_64");
        std::fs::copy(QEMU, &real).expect("copy of the real QEMU");
        let script = dir.join("wrapper");
        std::fs::write(
            &script,
            format!(
                "#!/bin/bash\n# cpuguard tests/testbed_live_vcpu.rs: host B's QEMU with other options.\n\
                 args=(\"$@\")\n{rewrite}\nexec {} \"${{args[@]}}\"\n",
                real.display()
            ),
        )
        .expect("wrapper script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let script = script.to_string_lossy();
        bed_sh(&["exec-b", "mount", "--bind", &script, QEMU]).ok();
        WrappedEmulatorB { dir }
    }
}

impl Drop for WrappedEmulatorB {
    fn drop(&mut self) {
        let _ = bed_sh(&["exec-b", "umount", QEMU]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The process id of NAME's QEMU on `host`: its first vCPU thread's thread group.
fn qemu_pid(bed: &Bed, host: Host, name: &str) -> u32 {
    let reply = bed
        .virsh(
            host,
            &[
                "qemu-monitor-command",
                name,
                r#"{"execute":"query-cpus-fast"}"#,
            ],
        )
        .ok();
    let value: serde_json::Value = serde_json::from_str(&reply).expect("query-cpus-fast reply");
    let tid = value["return"][0]["thread-id"]
        .as_u64()
        .expect("vCPU thread-id");
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).expect("vCPU status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|t| t.trim().parse().ok())
        .expect("Tgid")
}

/// B's emulator is a wrapper that gives new guests `-cpu …,-pni,stepping=9,model-id=…`; a guest
/// started there runs the real QEMU (its /proc/PID/exe, which the probe runs, is the ELF binary,
/// not the script) with a CPU the probe cannot rebuild: libvirt reads the feature flip back into
/// the live XML (so the probe has it too), not the stepping or the model-id. The started phase's
/// stamp must fail, naming both; the guest keeps no stamp, `cpuguard stamp` by hand says why, and
/// A refuses it as unstamped. Started again without the wrapper, the same guest is stamped.
#[test]
fn a_running_vcpu_that_differs_from_the_probe_gets_no_stamp() {
    let Some(mut bed) = Bed::up() else { return };
    let name = "live-vcpu-wrapped";
    bed.install_hook(Path::new(BIN));
    let xml_path = bed.define_guest(
        name,
        Some("<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>"),
    );
    let xml_path = xml_path.to_string_lossy();
    bed.virsh(Host::A, &["undefine", name]).ok();
    bed.virsh(Host::B, &["define", &xml_path]).ok();
    let wrapper = WrappedEmulatorB::new(
        &bed,
        r#"for i in "${!args[@]}"; do
    if [[ ${args[$i]} == -cpu ]]; then args[$((i + 1))]+=",-pni,stepping=9,model-id=Wrapped CPU"; fi
done"#,
    );

    let mark = bed.audit_mark();
    let started = std::time::Instant::now();
    bed.virsh(Host::B, &["start", name]).ok();
    let domain = format!("domain={name}");
    let line = bed.wait_audit(
        mark,
        &["phase=stamp", "action=failed", &domain, "trigger=started"],
        bed::stamp_wait(),
    );
    let line = line.unwrap_or_else(|| {
        panic!(
            "no failed stamp of {name} {:?} after its start:\n{}",
            started.elapsed(),
            bed.audit_lines_since(mark).join("\n")
        )
    });
    for expected in [
        "the running vCPU differs from the probe",
        "family/model/stepping (CPUID.0x1:EAX): running 15/107/9, probe 15/107/1",
        r#"model-id (CPUID.0x80000002-4): running \"Wrapped CPU\", probe \"QEMU Virtual CPU version 2.5+\""#,
    ] {
        assert!(line.contains(expected), "{expected:?} not in {line}");
    }
    let pid = qemu_pid(&bed, Host::B, name);
    let exe = std::fs::read(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe");
    assert!(
        exe.starts_with(b"\x7fELF"),
        "the guest's /proc/PID/exe is not the real QEMU binary"
    );
    let xml = bed.virsh(Host::B, &["dumpxml", name]).ok();
    assert!(
        !xml.contains(cpuguard::domain::metadata::STAMP_NS),
        "a guest the probe cannot reproduce was stamped"
    );
    // libvirt read the feature flip back into the live XML (even with check='none'), so the
    // probe, built from the live XML, reproduced it: only what libvirt does not read back differs.
    assert!(
        xml.contains("<feature policy='disable' name='pni'/>"),
        "libvirt did not record -pni in the live XML"
    );
    // `cpuguard stamp` by hand says the same and leaves no stamp either.
    let by_hand = bed_sh(&["exec-b", BIN, "stamp", name]);
    assert_eq!(by_hand.code, Some(1), "{}", by_hand.stdout);
    assert!(
        by_hand
            .stderr
            .contains("not stamped: the running vCPU differs from the probe"),
        "{}",
        by_hand.stderr
    );
    let back = bed.migrate(name, Host::B);
    assert!(!back.success, "the unstamped guest migrated");
    assert!(
        back.stderr.contains(&format!(
            "cpuguard: refusing incoming migration of {name}: the source left no cpuguard stamp"
        )),
        "{}",
        back.stderr
    );
    assert_eq!(bed.domain_state(Host::B, name).as_deref(), Some("running"));

    // The normal case: without the wrapper the probe rebuilds the guest's CPU, and it is stamped.
    drop(wrapper);
    bed.virsh(Host::B, &["destroy", name]).ok();
    let mark = bed.audit_mark();
    bed.virsh(Host::B, &["start", name]).ok();
    let stamped = bed.wait_audit(
        mark,
        &["phase=stamp", "action=stamped", &domain, "trigger=started"],
        bed::stamp_wait(),
    );
    assert!(
        stamped.is_some(),
        "the consistent guest was not stamped:\n{}",
        bed.audit_lines_since(mark).join("\n")
    );
    let xml = bed.virsh(Host::B, &["dumpxml", name]).ok();
    assert!(xml.contains(cpuguard::domain::metadata::STAMP_NS));
}

/// Issue 11 item 6, "filtered features named in a refusal": B's QEMU runs its guests under this
/// machine's KVM instead of TCG (a wrapper turning `-accel tcg` into `-accel kvm`), and this KVM
/// lacks SSE3 (`pni`), so QEMU drops it from the qemu64 CPU A's guest has. B's probe goes through
/// the same wrapper: the refusal of A's guest says B's QEMU dropped pni.
#[test]
fn a_feature_the_destinations_qemu_filtered_is_named_in_the_refusal() {
    // The destination's QEMU filters under KVM: the shared gate skips (or fails under CI) without it.
    if !bed::gate::require(&[bed::gate::Need::Kvm]) {
        return;
    }
    let Some(mut bed) = Bed::up() else { return };
    let name = "live-vcpu-filtered";
    bed.install_hook(Path::new(BIN));
    bed.define_guest(name, None);
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    bed.wait_stamped(Host::A, name, mark);
    // This machine's KVM lets guest user space read the host's CPUID (policy.user_mode_cpuid
    // would refuse B first); that is not what this test is about.
    bed.write_host_config(Host::B, "[policy]\nuser_mode_cpuid = \"allow\"\n");
    let _wrapper = WrappedEmulatorB::new(
        &bed,
        r#"for i in "${!args[@]}"; do
    args[$i]=${args[$i]//accel=tcg/accel=kvm}
    if [[ ${args[$i]} == tcg && $i -gt 0 && ${args[$((i - 1))]} == -accel ]]; then args[$i]=kvm; fi
done"#,
    );
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "migration to B's KVM passed");
    assert!(
        run.stderr.contains(&format!(
            "cpuguard: refusing incoming migration of {name}: the guest CPU would change on"
        )) && run
            .stderr
            .contains("QEMU dropped pni: the host lacks it (CPUID.01H:ECX [bit 0])"),
        "{}",
        run.stderr
    );
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
}
