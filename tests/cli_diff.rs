//! `cpuguard diff` through the built binary, on the seed dumps and this machine's `cpuid -r`.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");

fn diff(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("diff")
        .args(args)
        .output()
        .expect("run cpuguard diff");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/cpuid/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn seed001_third_case_names_lost_and_gained_features() {
    let (code, out, err) = diff(&[
        &fixture("seed001-case3-src.txt"),
        &fixture("seed001-case3-dst.txt"),
    ]);
    assert_eq!(code, Some(1), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"lost: vmx (CPUID.0x1:ECX[5])"), "{out}");
    assert!(
        lines.contains(&"lost: tsc_adjust (CPUID.0x7.0:EBX[1])"),
        "{out}"
    );
    assert!(lines.contains(&"gained: vme (CPUID.0x1:EDX[1])"), "{out}");

    let (code, json, _) = diff(&[
        "--json",
        &fixture("seed001-case3-src.txt"),
        &fixture("seed001-case3-dst.txt"),
    ]);
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["gained"][0]["name"], "vme");
    assert_eq!(v["gained"][0]["register"], "edx");
    assert_eq!(v["gained"][0]["bit"], 1);
}

#[test]
fn informational_only_is_equivalent() {
    let (code, out, err) = diff(&[
        &fixture("seed002-timing-src.txt"),
        &fixture("seed002-timing-dst.txt"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("equivalent"), "{out}");
    assert!(out.contains("informational: TSC frequency"), "{out}");
}

#[test]
fn this_machines_cpuid_tool_output_equals_itself() {
    if !gate::require(&[Need::Tool("cpuid")]) {
        return;
    }
    let dump = Command::new("cpuid")
        .args(["-r", "-1"])
        .output()
        .expect("run cpuid -r -1");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("host.txt");
    std::fs::write(&path, &dump.stdout).expect("write");
    let p = path.to_string_lossy().to_string();
    let (code, out, err) = diff(&[&p, &p]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.txt");
    std::fs::write(&junk, "hello\n").expect("write");
    let j = junk.to_string_lossy().to_string();
    for args in [
        vec![j.as_str(), j.as_str()],
        vec!["/nonexistent/a", j.as_str()],
    ] {
        let (code, out, err) = diff(&args);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(out.is_empty());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.starts_with("cpuguard: "), "{err}");
    }
}

#[test]
fn json_has_verdict_identities_numbers_and_schema_version() {
    let (code, json, err) = diff(&[
        "--json",
        &fixture("seed001-case3-src.txt"),
        &fixture("seed001-case3-dst.txt"),
    ]);
    assert_eq!(code, Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["verdict"], "different");
    assert_eq!(v["equivalent"], false);
    for side in ["a", "b"] {
        assert_eq!(v[side]["vendor"], "GenuineIntel", "{v:#}");
        assert_eq!(v[side]["family"], 6, "{v:#}");
        assert!(v[side]["model"].is_u64(), "{v:#}");
        assert!(v[side]["input"]
            .as_str()
            .is_some_and(|s| s.ends_with(".txt")));
    }
    assert_eq!(v["summary"]["lost"], 2);
    assert_eq!(v["summary"]["gained"], 1);
    let lost = &v["lost"][1];
    assert_eq!(lost["name"], "tsc_adjust");
    assert_eq!(lost["leaf"], 7);
    assert_eq!(lost["subleaf"], 0);
    assert_eq!(lost["register"], "ebx");
    assert_eq!(lost["bit"], 1);
    assert_eq!(lost["text"], "lost: tsc_adjust (CPUID.0x7.0:EBX[1])");
    for list in ["changed", "informational", "masked", "echo_leaves"] {
        assert!(v[list].is_array(), "{list}: {v:#}");
    }
    // The text form opens with the same counts.
    let (_, text, _) = diff(&[
        &fixture("seed001-case3-src.txt"),
        &fixture("seed001-case3-dst.txt"),
    ]);
    assert_eq!(
        text.lines().next(),
        Some("different: 2 lost, 1 gained, 0 changed, 0 informational, 0 masked"),
        "{text}"
    );
}

#[test]
fn json_informational_difference_has_numbers_and_mask_reason() {
    let (code, json, err) = diff(&[
        "--json",
        &fixture("seed002-timing-src.txt"),
        &fixture("seed002-timing-dst.txt"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["verdict"], "equivalent");
    let info = &v["informational"][0];
    assert_eq!(info["leaf"], 0x4000_0010u32);
    assert_eq!(info["register"], "eax");
    assert_eq!(info["a"], 0x0027_ac40);
    assert_eq!(info["b"], 0x0027_ac3d);
    assert!(
        info["mask_reason"]
            .as_str()
            .is_some_and(|r| r.contains("TSC frequency")),
        "{info:#}"
    );
}

#[test]
fn json_errors_are_json_objects_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.txt");
    std::fs::write(&junk, "hello\n").expect("write");
    let j = junk.to_string_lossy().to_string();
    for args in [
        vec!["--json", j.as_str(), j.as_str()],
        vec!["--json", "/nonexistent/a", j.as_str()],
        vec!["--json", "--no-such-flag", j.as_str()],
    ] {
        let (code, out, err) = diff(&args);
        assert_eq!(code, Some(2), "{args:?}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is JSON");
        assert_eq!(v["schema_version"], 1);
        let message = v["error"].as_str().expect("error string");
        assert!(!message.is_empty());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[test]
fn a_probe_with_echo_leaves_appended_is_still_equivalent() {
    // A real probe (TCG) written as a dump, then the same dump plus the echo answers `cpuid -r`
    // collects (0x20000000, 0x80860000, 0xc0000000: the highest basic leaf again).
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cpuguard.toml");
    std::fs::write(
        &config,
        format!(
            "cache_dir = \"{0}/cache\"\nruntime_dir = \"{0}/run\"\n[probe]\nemulators = [\"/usr/bin/qemu-system-x86_64\"]\n",
            dir.path().display()
        ),
    )
    .expect("config");
    let xml = dir.path().join("d.xml");
    std::fs::write(
        &xml,
        "<domain type='qemu'><name>echo</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>\
         <cpu mode='custom' match='exact'><model fallback='forbid'>Haswell-noTSX</model></cpu>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>",
    )
    .expect("xml");
    let out = Command::new(BIN)
        .env("CPUGUARD_CONFIG", &config)
        .args(["probe", "--tcg", "--xml"])
        .arg(&xml)
        .output()
        .expect("probe");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe json");
    assert_eq!(fp["schema_version"], 1);
    assert_eq!(fp["identity"]["vendor"], "GenuineIntel");
    let probe = dir.path().join("probe.json");
    std::fs::write(&probe, &out.stdout).expect("write");
    let entries = fp["raw"]["entries"].as_array().expect("entries");
    let max = entries[0]["eax"].as_u64().expect("max basic") as u32;
    let top = entries
        .iter()
        .rfind(|e| e["leaf"].as_u64() == Some(u64::from(max)))
        .expect("highest basic leaf");
    let regs: Vec<u64> = ["eax", "ebx", "ecx", "edx"]
        .iter()
        .map(|r| top[r].as_u64().expect("reg"))
        .collect();
    let mut dump = String::new();
    for e in entries {
        let n = |k: &str| e[k].as_u64().expect("number");
        dump.push_str(&format!(
            "{:08x} {:08x}: {:08x} {:08x} {:08x} {:08x}\n",
            n("leaf"),
            n("subleaf"),
            n("eax"),
            n("ebx"),
            n("ecx"),
            n("edx")
        ));
    }
    let plain = dump.clone();
    for leaf in [0x2000_0000u32, 0x8086_0000, 0xc000_0000] {
        dump.push_str(&format!(
            "{leaf:08x} 00000000: {:08x} {:08x} {:08x} {:08x}\n",
            regs[0], regs[1], regs[2], regs[3]
        ));
    }
    let echo = dir.path().join("echo.txt");
    std::fs::write(&echo, &dump).expect("write");
    let (p, e) = (
        probe.to_string_lossy().to_string(),
        echo.to_string_lossy().to_string(),
    );
    let (code, out, err) = diff(&["--verbose", &p, &e]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("equivalent: "), "{out}");
    assert!(out.contains("not compared on B: "), "{out}");
    assert!(out.contains("0x20000000.0"), "{out}");

    // The comparison is not weakened: a changed declared leaf is still a difference.
    let changed = plain.replacen(
        &format!("{:08x}", regs[1]),
        &format!("{:08x}", regs[1] ^ 0x10),
        1,
    );
    std::fs::write(&echo, changed).expect("write");
    let (code, out, _) = diff(&[&p, &e]);
    assert_eq!(code, Some(1), "{out}");
}
