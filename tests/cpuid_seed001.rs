//! The seed dumps through the CPUID model: seed 001's three migrations must be explained as
//! losing `vmx` and `tsc_adjust` (and gaining `vme` in the third), seed 002's TSC-frequency leaf
//! must be only informational, and this machine's real `cpuid -r` output must parse.
//!
//! Fixtures in tests/fixtures/cpuid/ are the diff hunks pasted in seeds 001/002 (`*.diff`) and
//! each side of them (`*-src.txt`, `*-dst.txt`): the lines shown, nothing invented.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::{Path, PathBuf};
use std::process::Command;

use cpuguard::fingerprint::diff_inputs;
use cpuguard::x86_64::diff::{diff, Side};
use cpuguard::x86_64::dump::{parse_dump, parse_unified_diff};
use cpuguard::x86_64::features::{FeatureBit, FeatureMap, DEFAULT_X86_FEATURES_PATH};
use cpuguard::x86_64::normalize::normalize;
use cpuguard::x86_64::table::{CpuidTable, Register};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cpuid")
        .join(name)
}

fn load(name: &str) -> CpuidTable {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    parse_dump(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

fn features() -> FeatureMap {
    FeatureMap::load(Path::new(DEFAULT_X86_FEATURES_PATH)).unwrap_or_else(|e| {
        panic!("these tests need libvirt's installed CPU map (apt install libvirt-daemon): {e}")
    })
}

fn cpuid_bit(leaf: u32, subleaf: u32, register: Register, bit: u8) -> FeatureBit {
    FeatureBit::Cpuid {
        leaf,
        subleaf,
        register,
        bit,
    }
}

/// (name, location) pairs of one side of a diff.
fn named(changes: &[cpuguard::x86_64::diff::FeatureChange]) -> Vec<(String, FeatureBit)> {
    changes
        .iter()
        .map(|c| (c.name.clone(), c.location))
        .collect()
}

fn vmx() -> (String, FeatureBit) {
    ("vmx".to_string(), cpuid_bit(0x1, 0, Register::Ecx, 5))
}

fn tsc_adjust() -> (String, FeatureBit) {
    (
        "tsc_adjust".to_string(),
        cpuid_bit(0x7, 0, Register::Ebx, 1),
    )
}

#[test]
fn seed001_cases_1_and_2_lose_vmx_and_tsc_adjust() {
    let map = features();
    for case in ["seed001-case1", "seed001-case2"] {
        let src = load(&format!("{case}-src.txt"));
        let dst = load(&format!("{case}-dst.txt"));
        let d = diff(&src, &dst, &map);
        assert!(!d.is_equivalent(), "{case}");
        assert_eq!(named(&d.lost), vec![vmx(), tsc_adjust()], "{case}: {d}");
        assert!(d.lost.iter().all(|c| c.side == Side::Lost));
        assert!(d.gained.is_empty(), "{case}: {d}");
        assert!(d.fields.is_empty(), "{case}: {d}");
        assert!(d.informational.is_empty(), "{case}: {d}");
        assert_eq!(
            d.to_string(),
            "different: 2 lost, 0 gained, 0 changed, 0 informational, 0 masked\n\
             lost: vmx (CPUID.0x1:ECX[5])\nlost: tsc_adjust (CPUID.0x7.0:EBX[1])\n",
            "{case}"
        );
        // The other direction is the same bits, gained.
        let back = diff(&dst, &src, &map);
        assert!(back.lost.is_empty());
        assert_eq!(named(&back.gained), vec![vmx(), tsc_adjust()], "{case}");
    }
}

#[test]
fn seed001_case3_also_gains_vme_on_the_destination() {
    let map = features();
    let src = load("seed001-case3-src.txt");
    let dst = load("seed001-case3-dst.txt");
    let d = diff(&src, &dst, &map);
    assert_eq!(named(&d.lost), vec![vmx(), tsc_adjust()], "{d}");
    // vme is CPUID.1:EDX bit 1 (mask 0x2: 078bfbfd -> 078bfbff). The seed's note writes
    // "vme(CPUID.0x1:EDX[2])", giving the mask value where the bit number belongs.
    assert_eq!(
        named(&d.gained),
        vec![("vme".to_string(), cpuid_bit(0x1, 0, Register::Edx, 1))],
        "{d}"
    );
    assert_eq!(d.gained[0].side, Side::Gained);
    assert!(d.fields.is_empty(), "{d}");
    assert!(
        d.to_string().contains("gained: vme (CPUID.0x1:EDX[1])\n"),
        "{d}"
    );
}

#[test]
fn seed_diff_hunks_split_into_the_fixture_sides() {
    for case in [
        "seed001-case1",
        "seed001-case2",
        "seed001-case3",
        "seed002-timing",
    ] {
        let text = std::fs::read_to_string(fixture(&format!("{case}.diff"))).unwrap();
        let (old, new) = parse_unified_diff(&text).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(old, load(&format!("{case}-src.txt")), "{case}");
        assert_eq!(new, load(&format!("{case}-dst.txt")), "{case}");
        assert_ne!(old, new, "{case}: a seed diff shows a difference");
        // A whole diff handed over as one dump is refused, not half-read.
        assert!(parse_dump(&text).is_err(), "{case}");
    }
}

#[test]
fn seed002_tsc_frequency_is_informational_only() {
    let map = features();
    let src = load("seed002-timing-src.txt");
    let dst = load("seed002-timing-dst.txt");
    assert_ne!(src, dst);
    let d = diff(&src, &dst, &map);
    assert!(d.is_equivalent(), "{d}");
    assert_eq!(d.informational.len(), 1, "{d}");
    let info = &d.informational[0];
    assert_eq!(info.field, "TSC frequency");
    assert_eq!(info.location.as_deref(), Some("CPUID.0x40000010:EAX"));
    assert_eq!(info.a, format!("{} kHz", 0x0027ac40));
    assert_eq!(info.b, format!("{} kHz", 0x0027ac3d));
    let text = d.to_string();
    assert!(
        text.starts_with("equivalent: 0 lost, 0 gained, 0 changed, 1 informational"),
        "{text}"
    );
    assert!(text.contains("\ninformational: TSC frequency"), "{text}");
}

#[test]
fn diff_inputs_on_seed_files() {
    let map = features();
    let d = diff_inputs(
        &fixture("seed001-case3-src.txt"),
        &fixture("seed001-case3-dst.txt"),
        &map,
    )
    .unwrap();
    assert_eq!(d.lost_names().len(), 2);
    assert_eq!(d.gained_names().len(), 1);
    let same = diff_inputs(
        &fixture("seed001-case1-src.txt"),
        &fixture("seed001-case1-src.txt"),
        &map,
    )
    .unwrap();
    assert!(same.is_equivalent());
}

/// Runs the Debian `cpuid` tool (the caller has passed `Need::Tool("cpuid")`).
fn cpuid_tool(args: &[&str]) -> String {
    match Command::new("cpuid").args(args).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => panic!(
            "cpuid {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run cpuid {args:?}: {e}"),
    }
}

#[test]
fn parses_this_machines_cpuid_r() {
    if !gate::require(&[Need::Tool("cpuid")]) {
        return;
    }
    let single = cpuid_tool(&["-r", "-1"]);
    let table = parse_dump(&single).unwrap();
    let data_lines = single
        .lines()
        .filter(|l| l.trim_start().starts_with("0x"))
        .count();
    assert_eq!(table.entries.len(), data_lines);
    let leaf0 = table.get(0, 0).expect("leaf 0 present");
    let mut vendor = Vec::new();
    for word in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
        vendor.extend_from_slice(&word.to_le_bytes());
    }
    let vendor = String::from_utf8_lossy(&vendor).into_owned();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(line) = cpuinfo.lines().find(|l| l.starts_with("vendor_id")) {
        assert!(line.ends_with(&vendor), "{line} vs {vendor}");
    }
    assert!(table.get(1, 0).is_some());

    // Every CPU of `cpuid -r` describes the same CPU: after normalization (APIC IDs, core IDs
    // masked) the first and the second must be identical.
    let all = cpuid_tool(&["-r"]);
    let first = parse_dump(&all).unwrap();
    if let Some(second_start) = all.find("\nCPU 1:") {
        let second = parse_dump(&all[second_start + 1..]).unwrap();
        assert_eq!(first.entries.len(), second.entries.len());
        assert_eq!(normalize(&first).0, normalize(&second).0);
    }
    assert_eq!(normalize(&first).0, normalize(&table).0);
    let d = diff(&first, &table, &features());
    assert!(d.is_equivalent(), "{d}");
}
