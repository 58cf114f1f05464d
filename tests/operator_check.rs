//! `cpuguard check` on real stamped domain XML: the stamp carries a fingerprint the probe really
//! measured (TCG) on the "source"; `check` runs as the candidate destination would. The second
//! host's emulator is a wrapper that takes `avx2` away from every `-cpu`.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::Path;

use cpuguard::fingerprint::Fingerprint;

#[path = "support/operator.rs"]
mod operator;
use operator::{
    bind_stamps, cpu_option_wrapper, cpuguard, host_config as config, namespaced_stamp, scratch_dir,
};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const CPU: &str =
    "<cpu mode='custom' match='exact'><model fallback='forbid'>Haswell-noTSX</model></cpu>";

fn domain(emulator: &str, metadata: &str) -> String {
    bind_stamps(format!(
        "<domain type='qemu'><name>web1</name><uuid>06c0c0dc-1080-4d3f-bdac-967d624c94f9</uuid>\
         <metadata>{metadata}</metadata><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>{CPU}\
         <devices><emulator>{emulator}</emulator></devices></domain>"
    ))
}

/// The source's stamp as libvirt shows it in the domain XML (namespaced by the API).
fn stamped(config: &Path, emulator: &str, dir: &Path) -> String {
    let plain = dir.join("plain.xml");
    std::fs::write(&plain, domain(emulator, "")).expect("write");
    let (code, out, err) = cpuguard(
        config,
        &["probe", "--cached", "--xml", plain.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    let fingerprint = Fingerprint::from_json(&out, "probe").expect("fingerprint");
    namespaced_stamp(
        "hv-src",
        &fingerprint.digest,
        CPU,
        &fingerprint.raw().to_text(),
    )
}

#[test]
fn check_gives_the_hooks_verdict_without_migrating() {
    if !gate::require(&[Need::Qemu("x86_64"), Need::Root]) {
        return;
    }
    let dir = scratch_dir();
    let wrapper = cpu_option_wrapper(dir.path(), "qemu-no-avx2", QEMU, "avx2=off");
    let full = config(dir.path(), "full", QEMU);
    let reduced = config(dir.path(), "reduced", &wrapper);

    // Same host, same CPU: go.
    let stamp_full = stamped(&full, QEMU, dir.path());
    let xml = dir.path().join("web1.xml");
    std::fs::write(&xml, domain(QEMU, &stamp_full)).expect("write");
    let xml_arg = xml.to_str().expect("utf-8");
    let (code, out, err) = cpuguard(&full, &["check", "--xml", xml_arg], None);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("go: web1"), "{out}");

    // The positional form and stdin (`virsh dumpxml … | ssh dst cpuguard check -`).
    let (code, out, _) = cpuguard(&full, &["check", xml_arg], None);
    assert_eq!(code, Some(0), "{out}");
    let text = std::fs::read_to_string(&xml).expect("read");
    let (code, out, err) = cpuguard(&full, &["check", "-", "--json"], Some(&text));
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["go"], true);
    assert_eq!(v["domain"], "web1");
    assert_eq!(v["source_digest"], v["local_digest"]);

    // To a host whose QEMU withholds avx2: no-go, the lost feature named.
    let to_reduced = dir.path().join("to-reduced.xml");
    std::fs::write(&to_reduced, domain(&wrapper, &stamp_full)).expect("write");
    let (code, out, err) = cpuguard(
        &reduced,
        &["check", to_reduced.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.starts_with("no-go"), "{out}");
    assert!(out.contains("avx2"), "{out}");
    let (code, out, _) = cpuguard(
        &reduced,
        &["check", "--json", to_reduced.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["go"], false);
    assert_ne!(v["source_digest"], v["local_digest"]);
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["verdict"], "no-go");
    assert_eq!(v["equivalent"], false);
    assert_eq!(v["source"]["vendor"], "GenuineIntel", "{v:#}");
    assert_eq!(v["destination"]["vendor"], "GenuineIntel", "{v:#}");
    let lost = &v["diff"]["lost"][0];
    assert_eq!(lost["name"], "avx2", "{v:#}");
    assert_eq!(
        (lost["leaf"].as_u64(), lost["bit"].as_u64()),
        (Some(7), Some(5))
    );
    assert_eq!(lost["register"], "ebx");

    // Back the other way the guest would only gain avx2: refused by default policy too.
    let stamp_reduced = stamped(&reduced, &wrapper, dir.path());
    std::fs::write(&xml, domain(QEMU, &stamp_reduced)).expect("write");
    let (code, out, _) = cpuguard(&full, &["check", xml_arg], None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("avx2"), "{out}");

    // Bad input: exit 2, one line naming the file.
    let bad = dir.path().join("bad.xml");
    std::fs::write(&bad, "<domain><name>x</name>").expect("write");
    let (code, out, err) = cpuguard(&full, &["check", bad.to_str().expect("utf-8")], None);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bad.xml"), "{err}");
    // With --json the error is a JSON object on stdout too.
    let (code, out, _) = cpuguard(
        &full,
        &["check", "--json", bad.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(2), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("error JSON");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("bad.xml")),
        "{v}"
    );
}

/// Issue 11, part 5: QEMU drops a requested feature the host (here TCG) lacks and only warns.
/// `probe` lists it under `filtered`, and `check` of a guest whose source had it names it in the
/// refusal (the source's stamp is that of a host with VMX: its measured table with the bit set).
#[test]
fn probe_and_check_name_the_features_qemu_dropped() {
    if !gate::require(&[Need::Qemu("x86_64"), Need::Root]) {
        return;
    }
    const VMX_CPU: &str =
        "<cpu mode='custom' match='exact'><model fallback='forbid'>Haswell-noTSX</model>\
                           <feature policy='require' name='vmx'/></cpu>";
    // Built without a stamp, then stamped and bound for this configuration.
    let with_cpu = |metadata: &str| {
        bind_stamps(domain(QEMU, "").replace(CPU, VMX_CPU).replace(
            "<metadata></metadata>",
            &format!("<metadata>{metadata}</metadata>"),
        ))
    };
    let dir = scratch_dir();
    let cfg = config(dir.path(), "tcg", QEMU);
    let plain = dir.path().join("vmx.xml");
    std::fs::write(&plain, with_cpu("")).expect("write");
    let (code, out, err) = cpuguard(
        &cfg,
        &["probe", "--xml", plain.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    let fingerprint = Fingerprint::from_json(&out, "probe").expect("fingerprint");
    // TCG also lacks some of Haswell's own features (pcid, x2apic, …): each is listed.
    assert!(
        fingerprint
            .filtered
            .contains(&"vmx: TCG lacks it (CPUID.01H:ECX [bit 5])".to_string()),
        "{out}"
    );
    assert!(out.contains("\"filtered\""), "{out}");

    // The source's guest had VMX (leaf 1 ECX bit 5).
    let table: String = fingerprint
        .raw()
        .to_text()
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("00000001 00000000: ") else {
                return format!("{line}\n");
            };
            let mut regs: Vec<u32> = rest
                .split_whitespace()
                .map(|r| u32::from_str_radix(r, 16).expect("hex"))
                .collect();
            regs[2] |= 1 << 5;
            format!(
                "00000001 00000000: {:08x} {:08x} {:08x} {:08x}\n",
                regs[0], regs[1], regs[2], regs[3]
            )
        })
        .collect();
    assert_ne!(table, fingerprint.raw().to_text(), "leaf 1 not found");
    let stamp = namespaced_stamp("hv-kvm", "sha256:00", VMX_CPU, &table);
    let xml = dir.path().join("vmx-stamped.xml");
    std::fs::write(&xml, with_cpu(&stamp)).expect("write");
    let (code, out, err) = cpuguard(&cfg, &["check", xml.to_str().expect("utf-8")], None);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("lost: vmx (CPUID.0x1:ECX[5])"), "{out}");
    assert!(
        out.contains("QEMU dropped vmx: TCG lacks it (CPUID.01H:ECX [bit 5])"),
        "{out}"
    );
}
