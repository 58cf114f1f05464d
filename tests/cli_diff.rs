//! `cpuguard diff` through the built binary, on the seed dumps and this machine's `cpuid -r`.

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
    let dump = Command::new("cpuid").args(["-r", "-1"]).output();
    let Ok(dump) = dump else {
        assert!(std::env::var_os("CI").is_none(), "cpuid tool missing in CI");
        return;
    };
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
