//! A Hygon (`Dhyana`) guest through the existing x86 probe under TCG, and the cross-vendor
//! comparison with an AMD `EPYC` guest (issue 6: refused with both vendors named).
//!
//! Needs `qemu-system-x86_64` (Debian package qemu-system-x86).

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::PathBuf;
use std::time::Duration;

use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::x86_64::diff::diff;
use cpuguard::x86_64::features::FeatureMap;
use cpuguard::x86_64::probe::{self, ProbeOptions};
use cpuguard::x86_64::CpuidTable;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

fn options() -> ProbeOptions {
    ProbeOptions {
        timeout: Duration::from_secs(30),
        allowed_emulators: vec![PathBuf::from(QEMU)],
        accel_override: Some(Accel::Tcg),
        ..ProbeOptions::default()
    }
}

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/domains")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vendor(t: &CpuidTable) -> String {
    let e = t.get(0, 0).expect("leaf 0 missing");
    [e.ebx, e.edx, e.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .map(char::from)
        .collect()
}

fn probe_xml(xml: &str) -> CpuidTable {
    let config = GuestCpuConfig::from_domain_xml(xml).unwrap();
    let run = probe::probe_run(&config, &options()).unwrap();
    println!(
        "x86 probe wall time {:?}: {}",
        run.wall_time,
        run.argv.join(" ")
    );
    run.table
}

fn dhyana() -> CpuidTable {
    let xml = fixture("tcg-dhyana.xml");
    assert!(xml.contains("<model fallback='forbid'>Dhyana</model>"));
    probe_xml(&xml)
}

fn intel() -> CpuidTable {
    let xml = fixture("tcg-dhyana.xml")
        .replace(">Dhyana<", ">Skylake-Client<")
        .replace("<vendor>Hygon</vendor>", "<vendor>Intel</vendor>");
    probe_xml(&xml)
}

fn epyc() -> CpuidTable {
    // Same machine and topology as the Dhyana fixture; only the model (and so the vendor) differs.
    let xml = fixture("tcg-dhyana.xml")
        .replace(">Dhyana<", ">EPYC<")
        .replace("<vendor>Hygon</vendor>", "<vendor>AMD</vendor>");
    assert!(xml.contains(">EPYC<"));
    probe_xml(&xml)
}

#[test]
fn dhyana_guest_sees_hygon_and_is_stable() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let first = dhyana();
    assert_eq!(vendor(&first), "HygonGenuine");
    // Dhyana is family 0x18 (AMD Zen 1 under Hygon's own family number).
    let eax = first.get(1, 0).expect("leaf 1 missing").eax;
    let family = ((eax >> 8) & 0xF) + ((eax >> 20) & 0xFF);
    assert_eq!(family, 0x18, "leaf 1 eax {eax:#x}");
    assert_eq!(first, dhyana(), "two Dhyana probes differ");
}

#[test]
fn hygon_to_amd_is_refused_with_both_vendors_named() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let map = FeatureMap::load_default().unwrap();
    let hygon = dhyana();
    let amd = epyc();
    assert_eq!(vendor(&amd), "AuthenticAMD");

    let d = diff(&hygon, &amd, &map);
    let text = d.to_string();
    println!("Dhyana -> EPYC:\n{text}");
    assert!(
        !d.is_equivalent(),
        "a cross-vendor move must not be equivalent"
    );
    let vendor_line = text
        .lines()
        .find(|l| l.starts_with("changed: vendor"))
        .unwrap_or_else(|| panic!("no vendor line in:\n{text}"));
    assert!(
        vendor_line.contains("'HygonGenuine' -> 'AuthenticAMD'"),
        "{vendor_line}"
    );

    // And the other way round.
    let back = diff(&amd, &hygon, &map).to_string();
    assert!(back.contains("'AuthenticAMD' -> 'HygonGenuine'"), "{back}");
}

/// Every ordered pair of Intel, AMD and Hygon guests through the prepare phase's verdict: refused,
/// and the operator's message names both vendors.
#[test]
fn every_cross_vendor_move_is_refused_by_the_guard_naming_both_vendors() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    use cpuguard::config::PolicyConfig;
    use cpuguard::domain::metadata::{DomainPolicy, Stamp};
    use cpuguard::fingerprint::{Fingerprint, HostFacts};
    use cpuguard::guard::{judge, Decision, Incoming};
    use cpuguard::incoming::Origin;

    let map = FeatureMap::load_default().unwrap();
    let guests = [
        ("GenuineIntel", intel()),
        ("AuthenticAMD", epyc()),
        ("HygonGenuine", dhyana()),
    ];
    for (name, table) in &guests {
        assert_eq!(&vendor(table), name);
    }
    let policy = PolicyConfig::default();
    let opt_out = DomainPolicy::default();
    for (source_vendor, source) in &guests {
        let stamp = Stamp {
            table: Some(cpuguard::view::GuestView::from(source.clone()).to_text()),
            uuid: Some("u1".into()),
            config: Some("sha256:c1".into()),
            ..Stamp::default()
        };
        for (dest_vendor, dest) in &guests {
            let local =
                Fingerprint::new(HostFacts::default(), serde_json::Value::Null, dest.clone());
            let incoming = Incoming {
                domain: "vm1",
                this_host: "hv-new",
                origin: Origin::Migrate,
                stamp: Some(&stamp),
                uuid: Some("u1"),
                config_digest: Some("sha256:c1"),
                opt_out: &opt_out,
                local: Ok(&local),
                config_path: "/etc/cpuguard/cpuguard.toml",
            };
            let decision = judge(&incoming, &policy, &map);
            if source_vendor == dest_vendor {
                assert!(
                    matches!(decision, Decision::Allow { .. }),
                    "{source_vendor} -> itself: {decision:?}"
                );
                continue;
            }
            let Decision::Refuse { message, .. } = decision else {
                panic!("{source_vendor} -> {dest_vendor} allowed");
            };
            let expected = format!("'{source_vendor}' -> '{dest_vendor}'");
            assert!(
                message
                    .lines()
                    .any(|l| l.contains("changed: vendor") && l.contains(&expected)),
                "{source_vendor} -> {dest_vendor}:\n{message}"
            );
        }
    }
}
