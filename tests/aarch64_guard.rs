//! Issue 6: an aarch64 domain goes through the same operator tools and guard as an x86 one.
//! `cpuguard probe` measures the ID registers (TCG, `qemu-system-aarch64`), the fingerprint is
//! cached, a stamp carries the probe's transcript, and `check` (the prepare hook's verdict),
//! `diff` and `matrix` explain a destination whose QEMU withholds the PMU by register field. The
//! destination's emulator is a wrapper that appends `,pmu=off` to `-cpu`.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::Path;

use cpuguard::fingerprint::Fingerprint;
use cpuguard::view::{Arch, Tables};

#[path = "support/operator.rs"]
mod operator;
use operator::{
    bind_stamps, cpu_option_wrapper, cpuguard, host_config as config, namespaced_stamp, scratch_dir,
};

const QEMU: &str = "/usr/bin/qemu-system-aarch64";
const CPU: &str =
    "<cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57</model></cpu>";

fn domain(emulator: &str, cpu: &str, metadata: &str) -> String {
    bind_stamps(format!(
        "<domain type='qemu'><name>arm1</name><uuid>7d1c0c0d-1080-4d3f-bdac-967d624c94f9</uuid>\
         <metadata>{metadata}</metadata><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
         <os><type arch='aarch64' machine='virt-7.2'>hvm</type></os>{cpu}\
         <devices><emulator>{emulator}</emulator></devices></domain>"
    ))
}

/// Probes the domain (through the cache) and returns the fingerprint.
fn probe(config: &Path, xml: &Path) -> Fingerprint {
    let (code, out, err) = cpuguard(
        config,
        &["probe", "--cached", "--xml", xml.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    Fingerprint::from_json(&out, "probe").expect("fingerprint")
}

/// The stamp a source that measured `fingerprint` writes.
fn stamp(fingerprint: &Fingerprint) -> String {
    namespaced_stamp(
        "arm-src",
        &fingerprint.digest,
        CPU,
        &fingerprint.raw().to_text(),
    )
}

#[test]
fn aarch64_domains_are_probed_stamped_checked_diffed_and_matrixed() {
    if !gate::require(&[Need::Qemu("aarch64"), Need::Root]) {
        return;
    }
    let dir = scratch_dir();
    let wrapper = cpu_option_wrapper(dir.path(), "qemu-aarch64-no-pmu", QEMU, "pmu=off");
    let full = config(dir.path(), "full", QEMU);
    let reduced = config(dir.path(), "reduced", &wrapper);

    // The probe measures ID registers and the cache answers the second time.
    let plain = dir.path().join("plain.xml");
    std::fs::write(&plain, domain(QEMU, CPU, "")).expect("write");
    let source = probe(&full, &plain);
    assert_eq!(source.arch(), Arch::Aarch64);
    let Tables::Aarch64 { raw, masks, .. } = &source.tables else {
        panic!("aarch64 tables expected");
    };
    // cortex-a57: implementer Arm (0x41), part 0xd07.
    let midr = raw.get("MIDR_EL1").expect("MIDR_EL1");
    assert_eq!(
        (midr >> 24, (midr >> 4) & 0xfff),
        (0x41, 0xd07),
        "{midr:#x}"
    );
    assert!(masks.iter().any(|m| m.register == "MPIDR_EL1"), "{masks:?}");
    assert_eq!(
        probe(&full, &plain),
        source,
        "second probe comes from the cache"
    );
    let (code, out, _) = cpuguard(&full, &["cache", "list"], None);
    assert_eq!(code, Some(0));
    assert!(out.contains("\n1 entries"), "{out}");
    assert!(out.contains("custom cortex-a57"), "{out}");

    // Same host, same CPU: go.
    let stamped = stamp(&source);
    let xml = dir.path().join("arm1.xml");
    std::fs::write(&xml, domain(QEMU, CPU, &stamped)).expect("write");
    let xml_arg = xml.to_str().expect("utf-8");
    let (code, out, err) = cpuguard(&full, &["check", "--json", xml_arg], None);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["go"], true, "{v}");
    assert_eq!(v["source_digest"], v["local_digest"]);

    // To a host whose QEMU withholds the PMU: no-go, the register field named as lost.
    let to_reduced = dir.path().join("to-reduced.xml");
    std::fs::write(&to_reduced, domain(&wrapper, CPU, &stamped)).expect("write");
    let (code, out, err) = cpuguard(
        &reduced,
        &["check", to_reduced.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.starts_with("no-go"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim().starts_with("lost: ID_AA64DFR0_EL1.PMUVer")),
        "{out}"
    );

    // Back the other way the guest would only gain the PMU: refused by the default policy.
    let reduced_fp = probe(&reduced, &to_reduced);
    std::fs::write(&xml, domain(QEMU, CPU, &stamp(&reduced_fp))).expect("write");
    let (code, out, _) = cpuguard(&full, &["check", xml_arg], None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("gained: ID_AA64DFR0_EL1.PMUVer"), "{out}");

    // `diff` on the two fingerprints and on the stamp's transcript form.
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, source.to_json().expect("json")).expect("write");
    std::fs::write(&b, reduced_fp.raw().to_text()).expect("write");
    let (a_arg, b_arg) = (a.to_str().expect("utf-8"), b.to_str().expect("utf-8"));
    let (code, out, err) = cpuguard(&full, &["diff", a_arg, b_arg], None);
    assert_eq!(code, Some(1), "{out}{err}");
    // The summary line, then the differences.
    assert!(out.starts_with("different: 1 lost, 0 gained"), "{out}");
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("lost: ID_AA64DFR0_EL1.PMUVer")),
        "{out}"
    );
    let (code, out, _) = cpuguard(&full, &["diff", a_arg, a_arg], None);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("equivalent"), "{out}");
    let (code, out, _) = cpuguard(&full, &["diff", "--json", a_arg, b_arg], None);
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["arch"], "aarch64");
    assert_eq!(v["lost"][0]["field"], "PMUVer", "{v}");
    assert_eq!(v["lost"][0]["register"], "ID_AA64DFR0_EL1", "{v}");
    assert!(v["lost"][0]["a"].is_u64(), "field values are numbers: {v}");
    assert_eq!(v["a"]["arch"], "aarch64", "{v}");
    assert!(v["a"]["midr_el1"].is_u64(), "{v}");

    // The matrix of both hosts' exported caches: one configuration, a no-go each way.
    let mut bundles = Vec::new();
    for (config, host) in [(&full, "hv-arm-old"), (&reduced, "hv-arm-new")] {
        let (code, out, err) = cpuguard(config, &["fingerprint", "export", "--host", host], None);
        assert_eq!(code, Some(0), "{err}");
        let path = dir.path().join(format!("{host}.json"));
        std::fs::write(&path, out).expect("write");
        bundles.push(path.to_str().expect("utf-8").to_string());
    }
    let (code, out, err) = cpuguard(&full, &["matrix", &bundles[0], &bundles[1]], None);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("cortex-a57"), "{out}");
    assert!(
        out.contains("hv-arm-old -> hv-arm-new: lost ID_AA64DFR0_EL1.PMUVer"),
        "{out}"
    );

    // A cross-architecture stamp (an x86 table arriving at an aarch64 domain) is refused too.
    let x86_dump = "00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n";
    let foreign = namespaced_stamp("x86-src", "sha256:00", CPU, x86_dump);
    std::fs::write(&xml, domain(QEMU, CPU, &foreign)).expect("write");
    let (code, out, _) = cpuguard(&full, &["check", xml_arg], None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("architecture (x86_64 -> aarch64)"), "{out}");
}
