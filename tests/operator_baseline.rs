//! `cpuguard baseline` through the built binaries (cpuguard execs cpuguard-libvirt) on real
//! host CPUs: this machine's domain capabilities and libvirt's captures of other generations
//! (tests/fixtures/domcaps/README.md). libvirt computes through its embedded QEMU driver
//! (`qemu:///embed?root=DIR`: no daemon is started or touched) under TCG.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/domcaps/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

fn baseline(root: &std::path::Path, args: &[&str]) -> Run {
    let hypervisor = format!("qemu:///embed?root={}", root.display());
    let out = Command::new(BIN)
        .env("CPUGUARD_CONFIG", "/nonexistent/cpuguard.toml")
        .args([
            "baseline",
            "--hypervisor",
            &hypervisor,
            "--virttype",
            "qemu",
        ])
        .args(args)
        .output()
        .expect("run cpuguard baseline");
    Run {
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.out).unwrap_or_else(|e| panic!("{e}: {}", run.out))
}

fn host<'a>(report: &'a serde_json::Value, suffix: &str) -> &'a serde_json::Value {
    report["hosts"]
        .as_array()
        .and_then(|hosts| {
            hosts
                .iter()
                .find(|h| h["origin"].as_str().is_some_and(|o| o.ends_with(suffix)))
        })
        .unwrap_or_else(|| panic!("no host {suffix} in {report}"))
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// One embedded driver root for every scenario: libvirt probes QEMU once per root (~4 s).
#[test]
fn baseline_of_real_hosts() {
    // libvirt's embedded QEMU driver needs root here.
    if !gate::require(&[Need::Root, Need::Qemu("x86_64")]) {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");

    // Three Intel generations: Core 2 (2007), Xeon E5 v3 (Haswell), Core i5 Skylake.
    let run = baseline(
        root.path(),
        &[
            "--json",
            &fixture("core2-e6850-host.xml"),
            &fixture("xeon-e5-2630-host.xml"),
            &fixture("core-i5-6600-skylake-host.xml"),
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.err);
    let report = json(&run);
    let required = names(&report["cpu"]["required"]);
    let disabled = names(&report["cpu"]["disabled"]);
    assert!(!required.contains(&"invtsc".to_string()), "{required:?}");
    assert!(disabled.contains(&"invtsc".to_string()), "{disabled:?}");
    // The oldest host bounds the pool: its VMs give up nothing, the newer ones do.
    assert!(names(&host(&report, "core2-e6850-host.xml")["gives_up"]).is_empty());
    let xeon = names(&host(&report, "xeon-e5-2630-host.xml")["gives_up"]);
    let skylake = names(&host(&report, "core-i5-6600-skylake-host.xml")["gives_up"]);
    for f in ["avx2", "aes", "sse4.2"] {
        assert!(xeon.contains(&f.to_string()), "{f} {xeon:?}");
        assert!(skylake.contains(&f.to_string()), "{f} {skylake:?}");
    }
    // Skylake has clflushopt, the Xeon E5 v3 does not: only Skylake gives it up.
    assert!(skylake.contains(&"clflushopt".to_string()), "{skylake:?}");
    assert!(!xeon.contains(&"clflushopt".to_string()), "{xeon:?}");
    let cpu_xml = report["cpu_xml"].as_str().expect("cpu_xml");
    assert!(cpu_xml.starts_with("<cpu mode='custom' match='exact' check='full'>"));
    assert!(cpu_xml.contains("<feature policy='disable' name='invtsc'/>"));

    // The text form: the same <cpu>, after a comment with each host's cost.
    let run = baseline(
        root.path(),
        &[
            &fixture("core2-e6850-host.xml"),
            &fixture("xeon-e5-2630-host.xml"),
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.err);
    assert!(
        run.out
            .starts_with("<!-- cpuguard baseline of 2 hosts (x86_64)"),
        "{}",
        run.out
    );
    assert!(run
        .out
        .contains("core2-e6850-host.xml (core2duo): gives up nothing"));
    assert!(run
        .out
        .contains("xeon-e5-2630-host.xml (Haswell-noTSX): gives up "));
    let element = &run.out[run.out.find("<cpu ").expect("cpu element")..];
    assert!(element.trim_end().ends_with("</cpu>"), "{element}");

    // This machine's domain capabilities (host-model EPYC-Milan with many features disabled by
    // its nested KVM) and an EPYC 7601 (Zen 1): the disabled features stay out of the baseline.
    let run = baseline(
        root.path(),
        &[
            "--json",
            &fixture("this-host-epyc-milan-pvm-domcaps.xml"),
            &fixture("epyc-7601-host.xml"),
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.err);
    let report = json(&run);
    let required = names(&report["cpu"]["required"]);
    for f in ["invtsc", "avx2", "sse4.2", "pclmuldq"] {
        assert!(!required.contains(&f.to_string()), "{f} in {required:?}");
    }
    assert_eq!(
        host(&report, "this-host-epyc-milan-pvm-domcaps.xml")["source"],
        "domain-capabilities"
    );
    let zen1 = names(&host(&report, "epyc-7601-host.xml")["gives_up"]);
    assert!(zen1.contains(&"avx2".to_string()), "{zen1:?}");

    // A live host through a libvirt URI: the embedded driver's own domain capabilities.
    let live = format!("qemu:///embed?root={}", root.path().display());
    let run = baseline(
        root.path(),
        &["--json", &live, &fixture("epyc-7601-host.xml")],
    );
    assert_eq!(run.code, Some(0), "{}", run.err);
    let report = json(&run);
    assert_eq!(host(&report, &live)["source"], "domain-capabilities");

    // Intel and AMD cannot share a CPU model: libvirt's refusal, on one line.
    let run = baseline(
        root.path(),
        &[
            &fixture("core2-e6850-host.xml"),
            &fixture("epyc-7601-host.xml"),
        ],
    );
    assert_eq!(run.code, Some(2), "{}", run.out);
    assert!(run.err.contains("CPU vendors do not match"), "{}", run.err);
    assert_eq!(run.err.trim_end().lines().count(), 1, "{}", run.err);
    assert!(run.out.is_empty());
}

fn one_line_error(run: &Run, expected: &str) {
    assert_eq!(run.code, Some(2), "{}", run.out);
    assert!(run.out.is_empty(), "{}", run.out);
    let err = run.err.trim_end();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("cpuguard: "), "{err}");
    assert!(err.contains(expected), "{expected} not in {err}");
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("embed");
    one_line_error(&baseline(&root, &[]), "no hosts given");
    let missing = dir.path().join("missing.xml");
    one_line_error(
        &baseline(&root, &[missing.to_str().expect("utf-8")]),
        &format!("{}: cannot read", missing.display()),
    );
    let arm = dir.path().join("arm.xml");
    std::fs::write(
        &arm,
        "<cpu><arch>aarch64</arch><model>cortex-a57</model></cpu>",
    )
    .expect("write");
    one_line_error(
        &baseline(
            &root,
            &[
                &fixture("core2-e6850-host.xml"),
                arm.to_str().expect("utf-8"),
            ],
        ),
        "architecture aarch64, but",
    );
    let domain = dir.path().join("domain.xml");
    std::fs::write(&domain, "<domain type='kvm'><name>x</name></domain>").expect("write");
    one_line_error(
        &baseline(&root, &[domain.to_str().expect("utf-8")]),
        "no host CPU in it",
    );
    // Nothing listens on port 1: the URI is named in the error.
    one_line_error(
        &baseline(&root, &["qemu+tcp://127.0.0.1:1/system"]),
        "cannot connect to qemu+tcp://127.0.0.1:1/system",
    );
}
