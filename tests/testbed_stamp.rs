//! The stamp describes the running guest (issue 11) on the two-host bed: it names the QEMU
//! process it measured, survives a package upgrade under the running guest (`cpuguard stamp`, as
//! `%post` runs it, keeps it), is measured with the running process's own binary when forced,
//! and a stamp that does not match the running guest is reported as such.
//!
//! Runs as root; see tests/support/bed.rs.

#[path = "support/bed.rs"]
mod bed;

use std::path::Path;
use std::time::Instant;

use bed::{bed_sh, Bed, Host};

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");

/// The value of attribute `name` of cpuguard's stamp element in a domain XML.
fn stamp_attr(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(":stamp ")?;
    let tag = &xml[start..start + xml[start..].find('>')?];
    let key = format!(" {name}=");
    let at = tag.find(&key)? + key.len();
    let quote = tag[at..].chars().next()?;
    let rest = &tag[at + 1..];
    Some(rest[..rest.find(quote)?].to_string())
}

/// The whole stamp element of a domain XML, as `virsh dumpxml` shows it.
fn stamp_element(xml: &str) -> Option<String> {
    let start = xml[..xml.find(":stamp ")?].rfind('<')?;
    let end_tag = "</cpuguard:stamp>";
    let end = xml[start..].find(end_tag)? + start + end_tag.len();
    Some(xml[start..end].to_string())
}

/// Waits until NAME's stamp on `host` was written by that host (`host` attribute).
fn wait_stamp_by(bed: &Bed, host: Host, name: &str, stamper: &str) -> String {
    let start = Instant::now();
    loop {
        let xml = bed.virsh(host, &["dumpxml", name]).ok();
        if stamp_attr(&xml, "host").as_deref() == Some(stamper) {
            return xml;
        }
        assert!(
            start.elapsed() < bed::stamp_wait(),
            "{name} on {host:?} not stamped by {stamper}: {:?}",
            stamp_attr(&xml, "host")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Issue 11's upgrade case: a guest runs on B; B's emulator changes for new processes (what a
/// QEMU package upgrade does); `cpuguard stamp NAME` keeps the stamp of the running process,
/// `--force` re-measures it with the binary the process really runs (same digest), a stamp that
/// does not match the running guest is named as such, and the guest migrates back to A.
#[test]
fn stamp_survives_an_emulator_upgrade_under_the_running_guest() {
    let Some(mut bed) = Bed::up() else { return };
    let name = "stamp-upgrade";
    bed.install_hook(Path::new(BIN));
    bed.define_guest(name, None);
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    let on_a = bed.wait_stamped(Host::A, name, mark);
    let digest = stamp_attr(&on_a, "digest").expect("digest");
    for attr in ["pid", "pid-start", "boot-id", "emulator", "uuid"] {
        assert!(stamp_attr(&on_a, attr).is_some(), "no {attr} in the stamp");
    }
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "migration to B: {}", run.stderr);
    let on_b = wait_stamp_by(&bed, Host::B, name, "cpuguard-bed-b");
    assert_eq!(
        stamp_attr(&on_b, "digest").as_deref(),
        Some(digest.as_str())
    );
    let pid = stamp_attr(&on_b, "pid").expect("pid");
    assert_ne!(stamp_attr(&on_a, "pid").as_deref(), Some(pid.as_str()));

    // The upgrade: new QEMU processes on B lack SSE3; the running guest still has it.
    bed_sh(&["emulator-b", "set", "-pni"]).ok();
    let kept = bed_sh(&["exec-b", BIN, "stamp", name]);
    assert!(kept.success, "cpuguard stamp: {}", kept.stderr);
    assert!(
        kept.stdout.contains(&format!(
            "kept {name} {digest}: the stamp describes the running QEMU process (pid {pid},"
        )),
        "{}",
        kept.stdout
    );
    let xml = bed.virsh(Host::B, &["dumpxml", name]).ok();
    assert_eq!(stamp_attr(&xml, "digest").as_deref(), Some(digest.as_str()));

    // --force measures again, with the binary the running process runs: still the same CPU.
    let forced = bed_sh(&["exec-b", BIN, "stamp", "--force", name]);
    assert!(forced.success, "cpuguard stamp --force: {}", forced.stderr);
    assert!(
        forced.stdout.contains(&format!("stamped {name} {digest}"))
            && forced
                .stdout
                .contains("the running guest matches the stamp it replaced"),
        "{}",
        forced.stdout
    );

    // A stamp of this process that does not say what the guest has is named as such by --force.
    let element = stamp_element(&xml).expect("stamp element");
    // `virsh metadata --set` takes the element without its namespace (libvirt adds it).
    let ns = format!(
        " xmlns:cpuguard=\"{}\"",
        cpuguard::domain::metadata::STAMP_NS
    );
    let forged = element
        .replace(&digest, "sha256:0000")
        .replace(&ns, "")
        .replace("cpuguard:stamp", "stamp");
    let set = bed.virsh(
        Host::B,
        &[
            "metadata",
            name,
            "--live",
            "--uri",
            cpuguard::domain::metadata::STAMP_NS,
            "--key",
            "cpuguard",
            "--set",
            &forged,
        ],
    );
    assert!(set.success, "virsh metadata --set: {}", set.stderr);
    let forced = bed_sh(&["exec-b", BIN, "stamp", "--force", name]);
    assert!(
        forced.stdout.contains(&format!(
            "stamped {name} {digest} (cached); the running guest differs from the stamp: it said sha256:0000"
        )),
        "{}",
        forced.stdout
    );

    let back = bed.migrate(name, Host::B);
    assert!(back.success, "migration back to A refused: {}", back.stderr);
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));
}

/// Issue 11, "bind it": a stamp copied from another running domain (anyone with `virsh metadata
/// --live` can) is refused at the destination with its own message, the guest staying on A; the
/// source's own re-stamp repairs it.
#[test]
fn stamp_copied_from_another_domain_is_refused() {
    let Some(mut bed) = Bed::up() else { return };
    let (donor, name) = ("stamp-donor", "stamp-copied");
    bed.install_hook(Path::new(BIN));
    bed.define_guest(donor, None);
    bed.define_guest(name, None);
    for guest in [donor, name] {
        let mark = bed.audit_mark();
        bed.virsh(Host::A, &["start", guest]).ok();
        bed.wait_stamped(Host::A, guest, mark);
    }
    let donor_xml = bed.virsh(Host::A, &["dumpxml", donor]).ok();
    let ns = format!(
        " xmlns:cpuguard=\"{}\"",
        cpuguard::domain::metadata::STAMP_NS
    );
    let copied = stamp_element(&donor_xml)
        .expect("donor stamp")
        .replace(&ns, "")
        .replace("cpuguard:stamp", "stamp");
    let set = bed.virsh(
        Host::A,
        &[
            "metadata",
            name,
            "--live",
            "--uri",
            cpuguard::domain::metadata::STAMP_NS,
            "--key",
            "cpuguard",
            "--set",
            &copied,
        ],
    );
    assert!(set.success, "virsh metadata --set: {}", set.stderr);
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "a copied stamp was accepted");
    assert!(
        run.stderr.contains(&format!(
            "cpuguard: refusing incoming migration of {name}: the stamp belongs to another domain"
        )),
        "{}",
        run.stderr
    );
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));

    // The copied stamp names another process: `cpuguard stamp` replaces it, and it migrates.
    let restamp = bed_sh(&["exec-a", BIN, "stamp", name]);
    assert!(
        restamp
            .stdout
            .contains("replaced a stamp of another QEMU process"),
        "{}",
        restamp.stdout
    );
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "re-stamped guest refused: {}", run.stderr);
}

/// Issue 11, "sign it": with the fleet key on both hosts and `stamp.require_signature` on B, a
/// signed stamp migrates; one edited after signing (here: its host, as a forger would) is refused
/// with its own message and audited (`action=signature`, a warning); `--force` repairs it.
#[test]
fn forged_stamp_is_refused_when_signatures_are_required() {
    let Some(mut bed) = Bed::up() else { return };
    let name = "stamp-signed";
    bed.install_hook(Path::new(BIN));
    let generate = bed_sh(&["exec-a", BIN, "key", "generate"]);
    assert!(
        generate.success,
        "cpuguard key generate: {}",
        generate.stderr
    );
    let etc = |h: &str| bed.state_dir().join(h).join("cpuguard-etc");
    let key = std::fs::read(etc("a").join("fleet.key")).expect("key on A");
    {
        use std::os::unix::fs::PermissionsExt;
        let on_b = etc("b").join("fleet.key");
        std::fs::write(&on_b, &key).expect("key on B");
        std::fs::set_permissions(&on_b, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::write(
        etc("b").join("cpuguard.toml"),
        "[stamp]\nrequire_signature = true\n",
    )
    .expect("config on B");

    bed.define_guest(name, None);
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    let xml = bed.wait_stamped(Host::A, name, mark);
    assert!(
        stamp_attr(&xml, "signature").is_some_and(|s| s.starts_with("hmac-sha256:")),
        "unsigned stamp"
    );

    let ns = format!(
        " xmlns:cpuguard=\"{}\"",
        cpuguard::domain::metadata::STAMP_NS
    );
    let forged = stamp_element(&xml)
        .expect("stamp")
        .replace("host=\"cpuguard-bed-a\"", "host=\"hv-forged\"")
        .replace(&ns, "")
        .replace("cpuguard:stamp", "stamp");
    let set = bed.virsh(
        Host::A,
        &[
            "metadata",
            name,
            "--live",
            "--uri",
            cpuguard::domain::metadata::STAMP_NS,
            "--key",
            "cpuguard",
            "--set",
            &forged,
        ],
    );
    assert!(set.success, "virsh metadata --set: {}", set.stderr);
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(!run.success, "a forged stamp was accepted");
    assert!(
        run.stderr.contains(&format!(
            "cpuguard: refusing incoming migration of {name}: the stamp's signature does not match this fleet's key"
        )),
        "{}",
        run.stderr
    );
    let domain = format!("domain={name}");
    assert!(
        bed.wait_audit(
            mark,
            &["phase=prepare", "action=signature", &domain],
            bed::AUDIT_WAIT
        )
        .is_some(),
        "no action=signature audit line"
    );
    assert_eq!(bed.domain_state(Host::A, name).as_deref(), Some("running"));

    let restamp = bed_sh(&["exec-a", BIN, "stamp", "--force", name]);
    assert!(restamp.success, "{}", restamp.stderr);
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "re-signed stamp refused: {}", run.stderr);
}

/// Issue 11: a `started` phase that cannot stamp removes any earlier stamp. Here the guest
/// arrives on B with A's stamp (which describes A's QEMU process) and B cannot stamp (its fleet
/// key is readable by others, which cpuguard refuses to sign with): A's stamp must not stay and
/// travel on, so B removes it and the guest is refused as unstamped on its way back.
#[test]
fn started_phase_that_cannot_stamp_removes_an_earlier_stamp() {
    let Some(mut bed) = Bed::up() else { return };
    let name = "stamp-removed";
    bed.install_hook(Path::new(BIN));
    bed.define_guest(name, None);
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    bed.wait_stamped(Host::A, name, mark);
    {
        use std::os::unix::fs::PermissionsExt;
        let key = bed.state_dir().join("b/cpuguard-etc/fleet.key");
        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert!(run.success, "migration to B: {}", run.stderr);
    let domain = format!("domain={name}");
    let line = bed.wait_audit(
        mark,
        &[
            "phase=stamp",
            "action=failed",
            &domain,
            "earlier_stamp=removed",
        ],
        bed::AUDIT_WAIT,
    );
    assert!(
        line.as_deref().is_some_and(|l| l.contains("chmod 600")),
        "no failed stamp with the earlier stamp removed: {line:?}\n{}",
        bed.audit_lines_since(mark).join("\n")
    );
    let xml = bed.virsh(Host::B, &["dumpxml", name]).ok();
    assert!(
        !xml.contains(cpuguard::domain::metadata::STAMP_NS),
        "A's stamp survived B's failed stamp"
    );
    let back = bed.migrate(name, Host::B);
    assert!(
        back.stderr.contains(
            "cpuguard: refusing incoming migration of stamp-removed: the source left no cpuguard stamp"
        ),
        "{}",
        back.stderr
    );
}
