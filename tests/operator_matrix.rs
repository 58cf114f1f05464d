//! `cpuguard fingerprint export` and `cpuguard matrix` on real fingerprints: the probe runs under
//! TCG for two "hosts", each with its own cache. Host B's emulator is a wrapper that takes `avx2`
//! away from every `-cpu` (how the test bed makes a different destination on one machine), so a
//! guest moving from A to B would lose it.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::{Path, PathBuf};

#[path = "support/operator.rs"]
mod operator;
use operator::{cpu_option_wrapper, host_config, scratch_dir};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

struct Host {
    config: PathBuf,
    emulator: String,
}

fn host(dir: &Path, name: &str, emulator: &str) -> Host {
    Host {
        config: host_config(dir, name, emulator),
        emulator: emulator.to_string(),
    }
}

fn domain(dir: &Path, host: &Host, model: &str) -> PathBuf {
    let path = dir.join(format!("{model}-{}.xml", host.emulator.len()));
    std::fs::write(
        &path,
        format!(
            "<domain type='qemu'><name>m</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>\
             <cpu mode='custom' match='exact'><model fallback='forbid'>{model}</model></cpu>\
             <devices><emulator>{}</emulator></devices></domain>",
            host.emulator
        ),
    )
    .expect("write domain");
    path
}

fn cpuguard(host: &Host, args: &[&str]) -> (Option<i32>, String, String) {
    operator::cpuguard(&host.config, args, None)
}

#[test]
fn matrix_of_two_hosts_from_real_probes() {
    if !gate::require(&[Need::Qemu("x86_64"), Need::Root]) {
        return;
    }
    let dir = scratch_dir();
    let wrapper = cpu_option_wrapper(dir.path(), "qemu-no-avx2", QEMU, "avx2=off");

    let a = host(dir.path(), "a", QEMU);
    let b = host(dir.path(), "b", &wrapper);
    for (h, model) in [
        (&a, "Haswell-noTSX"),
        (&a, "Nehalem"),
        (&b, "Haswell-noTSX"),
    ] {
        let xml = domain(dir.path(), h, model);
        let (code, out, err) = cpuguard(
            h,
            &["probe", "--cached", "--xml", xml.to_str().expect("utf-8")],
        );
        assert_eq!(code, Some(0), "probe {model}: {err}");
        assert!(out.contains("\"digest\""), "{out}");
    }

    let mut bundles = Vec::new();
    for (h, name, count) in [(&a, "hv-a", 2), (&b, "hv-b", 1)] {
        let (code, out, err) = cpuguard(h, &["fingerprint", "export", "--host", name]);
        assert_eq!(code, Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("bundle JSON");
        assert_eq!(v["format"], "cpuguard-fingerprints");
        assert_eq!(v["hostname"], name);
        assert_eq!(v["entries"].as_array().map(Vec::len), Some(count), "{out}");
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, out).expect("write bundle");
        bundles.push(path.to_str().expect("utf-8").to_string());
    }
    // Without --host the bundle names this machine.
    let (_, out, _) = cpuguard(&a, &["fingerprint", "export"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("bundle JSON");
    assert_eq!(
        v["hostname"].as_str(),
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .as_deref()
    );

    let mut args = vec!["matrix", "--json"];
    args.extend(bundles.iter().map(String::as_str));
    let (code, out, err) = cpuguard(&a, &args);
    assert_eq!(code, Some(1), "a no-go pair exists: {err}");
    let m: serde_json::Value = serde_json::from_str(&out).expect("matrix JSON");
    let configurations = m["configurations"].as_array().expect("configurations");
    assert_eq!(configurations.len(), 2, "{out}");
    let haswell = configurations
        .iter()
        .find(|c| {
            c["label"]
                .as_str()
                .is_some_and(|l| l.starts_with("Haswell-noTSX"))
        })
        .expect("Haswell configuration");
    assert_eq!(haswell["hosts"], serde_json::json!(["hv-a", "hv-b"]));
    let pair = |from: &str| {
        haswell["pairs"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["from"] == from))
            .expect("pair")
            .clone()
    };
    assert_eq!(pair("hv-a")["go"], false);
    assert_eq!(pair("hv-a")["lost"], serde_json::json!(["avx2"]));
    assert_eq!(pair("hv-b")["gained"], serde_json::json!(["avx2"]));
    assert_eq!(m["schema_version"], 1);
    assert_eq!(pair("hv-a")["verdict"], "no-go");
    assert_eq!(pair("hv-a")["diff"]["equivalent"], false);
    assert_eq!(pair("hv-a")["diff"]["lost"][0]["leaf"], 7);
    assert_eq!(pair("hv-a")["diff"]["lost"][0]["bit"], 5);
    assert_eq!(haswell["identities"]["hv-a"]["vendor"], "GenuineIntel");
    let nehalem = configurations
        .iter()
        .find(|c| {
            c["label"]
                .as_str()
                .is_some_and(|l| l.starts_with("Nehalem"))
        })
        .expect("Nehalem configuration");
    assert_eq!(nehalem["hosts"], serde_json::json!(["hv-a"]));

    let mut args = vec!["matrix"];
    args.extend(bundles.iter().map(String::as_str));
    let (code, out, _) = cpuguard(&a, &args);
    assert_eq!(code, Some(1));
    assert!(out.contains("hv-a -> hv-b: lost avx2"), "{out}");
    assert!(out.contains("not measured on: hv-b"), "{out}");

    // Only the pairs that agree: the same bundle under two names is a go both ways.
    let (_, text, _) = cpuguard(&a, &["fingerprint", "export", "--host", "hv-a2"]);
    let a2 = dir.path().join("hv-a2.json");
    std::fs::write(&a2, text).expect("write");
    let (code, out, err) = cpuguard(&a, &["matrix", &bundles[0], a2.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{out}{err}");

    // Errors: one line, exit 2.
    for (args, expected) in [
        (vec!["matrix"], "no bundles given"),
        (
            vec!["matrix", "/nonexistent.json"],
            "/nonexistent.json: cannot read",
        ),
        (vec!["matrix", &bundles[0], &bundles[0]], "already given by"),
    ] {
        let (code, out, err) = cpuguard(&a, &args);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{expected} not in {err}");
    }
}
