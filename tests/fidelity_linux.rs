//! Fidelity: the probe's table equals what a real Linux guest sees (issue 3, "Done when").
//!
//! For five CPU models under TCG, the probe runs, then a Debian kernel with a busybox initramfs
//! boots under the probe's own `-machine`/`-accel`/`-cpu`/`-smp` and runs `cpuid -r`. Both
//! tables are normalized with cpuguard's standard masks and compared over the leaves both
//! enumerate inside the valid ranges (basic 0..=max, hypervisor 0x40000000..=max when present,
//! extended 0x80000000..=max). Out-of-range leaves are not compared: QEMU answers them with the
//! highest basic leaf, which is no leaf of its own.
//!
//! Needs /usr/bin/qemu-system-x86_64 and the files testbed/fetch-linux-guest.sh makes (run it
//! as root first); without them the test skips saying so, or fails under `CI=true`
//! (tests/support/gate.rs).
//! Run: `cargo test --test fidelity_linux -- --nocapture` (prints times and counts per model).

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

#[path = "support/guest_boot.rs"]
mod guest_boot;
#[path = "support/linux_guest.rs"]
mod linux_guest;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::x86_64::dump::parse_dump_as;
use cpuguard::x86_64::normalize::standard_masks;
use cpuguard::x86_64::probe::{probe_run, ProbeOptions};
use cpuguard::x86_64::{
    normalize, parse_dump, CpuidEntry, CpuidTable, DumpFormat, MsrEntry, Register,
};

use linux_guest::LinuxGuest;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const REGISTERS: [Register; 4] = [Register::Eax, Register::Ebx, Register::Ecx, Register::Edx];

/// A Debian kernel boots in ~10 s under TCG here; this is only a bound against a hung guest.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

// No exception beyond cpuguard's standard masks is needed: every raw difference seen (OSXSAVE,
// OSPKE, XCR0-dependent XSAVE size, APIC IDs) is one of them, and the test lists each one it
// used. A new difference therefore fails the test instead of being excused here.

/// One CPU model of the fidelity corpus, as a TCG domain.
struct Case {
    model: &'static str,
    machine: &'static str,
    /// Extra children of `<cpu>` (features, topology).
    cpu_children: &'static str,
    vcpus: u32,
}

/// qemu64 (QEMU's default), Intel generations, and an AMD model; both machine types; one and
/// several vCPUs, so per-vCPU masks and topology leaves are exercised.
const CASES: &[Case] = &[
    Case {
        model: "qemu64",
        machine: "pc-i440fx-7.2",
        cpu_children: "",
        vcpus: 1,
    },
    Case {
        model: "Nehalem",
        machine: "pc-q35-7.2",
        cpu_children: "",
        vcpus: 2,
    },
    Case {
        model: "Haswell-noTSX",
        machine: "pc-i440fx-7.2",
        cpu_children:
            "<feature policy='require' name='pclmuldq'/><feature policy='disable' name='x2apic'/>",
        vcpus: 1,
    },
    Case {
        model: "Skylake-Server",
        machine: "pc-q35-7.2",
        cpu_children: "<topology sockets='1' dies='1' cores='2' threads='1'/>",
        vcpus: 2,
    },
    Case {
        model: "EPYC",
        machine: "pc-q35-7.2",
        cpu_children: "<topology sockets='1' dies='1' cores='1' threads='2'/>",
        vcpus: 2,
    },
];

fn domain_xml(case: &Case) -> String {
    format!(
        "<domain type='qemu'><name>fidelity-{model}</name><memory unit='KiB'>262144</memory>\
         <vcpu placement='static'>{vcpus}</vcpu>\
         <os><type arch='x86_64' machine='{machine}'>hvm</type></os>\
         <cpu mode='custom' match='exact' check='none'>\
         <model fallback='forbid'>{model}</model>{children}</cpu>\
         <devices><emulator>{QEMU}</emulator></devices></domain>",
        model = case.model,
        vcpus = case.vcpus,
        machine = case.machine,
        children = case.cpu_children,
    )
}

/// The valid leaf ranges a table enumerates (from its own leaf 0, 0x40000000 and 0x80000000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ranges {
    basic_max: u32,
    hypervisor_max: Option<u32>,
    extended_max: Option<u32>,
}

impl Ranges {
    fn of(table: &CpuidTable) -> Ranges {
        let max_in = |leaf: u32| {
            table
                .get(leaf, 0)
                .map(|e| e.eax)
                .filter(|&max| max >= leaf && max <= leaf | 0xffff)
        };
        Ranges {
            basic_max: table.get(0, 0).map_or(0, |e| e.eax),
            hypervisor_max: max_in(0x4000_0000),
            extended_max: max_in(0x8000_0000),
        }
    }

    fn contains(&self, leaf: u32) -> bool {
        leaf <= self.basic_max
            || self
                .hypervisor_max
                .is_some_and(|max| (0x4000_0000..=max).contains(&leaf))
            || self
                .extended_max
                .is_some_and(|max| (0x8000_0000..=max).contains(&leaf))
    }
}

/// One register that differs after normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Difference {
    leaf: u32,
    subleaf: u32,
    register: Register,
    probe: u32,
    guest: u32,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPUID.{:#x}.{:#x}:{:?} probe={:#010x} guest={:#010x} (bits {:#010x})",
            self.leaf,
            self.subleaf,
            self.register,
            self.probe,
            self.guest,
            self.probe ^ self.guest
        )
    }
}

#[derive(Debug, Default)]
struct Comparison {
    /// (leaf, sub-leaf) both enumerate inside the valid ranges.
    compared: usize,
    /// Registers that differed raw but are equal once masked: (location, reason).
    masked: Vec<(String, String)>,
    /// Registers still different once masked.
    differences: Vec<Difference>,
    /// Valid entries the guest saw that the probe does not have.
    missing_in_probe: Vec<(u32, u32)>,
    /// Valid entries only the probe enumerates (`cpuid -r` did not ask for them).
    probe_only: Vec<(u32, u32)>,
}

fn why_masked(leaf: u32, subleaf: u32, register: Register, bits: u32) -> String {
    let masks: Vec<String> = standard_masks()
        .into_iter()
        .filter(|m| m.applies_to(leaf, subleaf) && m.register == register && m.bits & bits != 0)
        .map(|m| m.reason)
        .collect();
    masks.join("; ")
}

fn valid_keys(table: &CpuidTable, ranges: &Ranges) -> BTreeSet<(u32, u32)> {
    table
        .entries
        .iter()
        .filter(|e| ranges.contains(e.leaf))
        .map(|e| (e.leaf, e.subleaf))
        .collect()
}

/// Compares raw tables once both are normalized with cpuguard's standard masks.
fn compare(probe_raw: &CpuidTable, guest_raw: &CpuidTable) -> Comparison {
    let (probe, _) = normalize(probe_raw);
    let (guest, _) = normalize(guest_raw);
    let guest_ranges = Ranges::of(guest_raw);
    let probe_keys = valid_keys(probe_raw, &Ranges::of(probe_raw));
    let guest_keys = valid_keys(guest_raw, &guest_ranges);

    let mut out = Comparison {
        missing_in_probe: guest_keys.difference(&probe_keys).copied().collect(),
        probe_only: probe_keys.difference(&guest_keys).copied().collect(),
        ..Comparison::default()
    };
    for &(leaf, subleaf) in guest_keys.intersection(&probe_keys) {
        out.compared += 1;
        let (Some(p), Some(g), Some(p_raw), Some(g_raw)) = (
            probe.get(leaf, subleaf),
            guest.get(leaf, subleaf),
            probe_raw.get(leaf, subleaf),
            guest_raw.get(leaf, subleaf),
        ) else {
            continue;
        };
        for register in REGISTERS {
            let (pv, gv) = (p.reg(register), g.reg(register));
            if pv != gv {
                out.differences.push(Difference {
                    leaf,
                    subleaf,
                    register,
                    probe: pv,
                    guest: gv,
                });
            } else if p_raw.reg(register) != g_raw.reg(register) {
                let bits = p_raw.reg(register) ^ g_raw.reg(register);
                out.masked.push((
                    format!(
                        "CPUID.{leaf:#x}.{subleaf:#x}:{register:?} bits {bits:#010x} (probe {:#010x}, guest {:#010x})",
                        p_raw.reg(register),
                        g_raw.reg(register)
                    ),
                    why_masked(leaf, subleaf, register, bits),
                ));
            }
        }
    }
    out
}

/// Which of the feature MSR groups the probe reads CPUID enumerates (the guest's view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsrGroups {
    /// IA32_ARCH_CAPABILITIES (0x10a): CPUID.7.0:EDX[29].
    arch_capabilities: bool,
    /// IA32_CORE_CAPABILITIES (0xcf): CPUID.7.0:EDX[30].
    core_capabilities: bool,
    /// IA32_PERF_CAPABILITIES (0x345): CPUID.1:ECX[15] (PDCM).
    perf_capabilities: bool,
    /// VMX capability MSRs (0x480..=0x493): CPUID.1:ECX[5].
    vmx: bool,
}

impl std::fmt::Display for MsrGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.arch_capabilities, "ARCH_CAPABILITIES"),
            (self.core_capabilities, "CORE_CAPABILITIES"),
            (self.perf_capabilities, "PERF_CAPABILITIES"),
            (self.vmx, "VMX"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        if names.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", names.join(","))
        }
    }
}

fn enumerated_msrs(guest: &CpuidTable) -> MsrGroups {
    let bit = |leaf, subleaf, register, n: u32| {
        guest
            .get(leaf, subleaf)
            .is_some_and(|e| e.reg(register) & (1 << n) != 0)
    };
    MsrGroups {
        arch_capabilities: bit(7, 0, Register::Edx, 29),
        core_capabilities: bit(7, 0, Register::Edx, 30),
        perf_capabilities: bit(1, 0, Register::Ecx, 15),
        vmx: bit(1, 0, Register::Ecx, 5),
    }
}

/// The MSR groups the probe read (or tried: `absent` lists enumerated MSRs that raised #GP).
fn probe_msrs(msrs: &[MsrEntry], absent: &[u32]) -> MsrGroups {
    let indices: BTreeSet<u32> = msrs
        .iter()
        .map(|m| m.index)
        .chain(absent.iter().copied())
        .collect();
    MsrGroups {
        arch_capabilities: indices.contains(&0x10a),
        core_capabilities: indices.contains(&0xcf),
        perf_capabilities: indices.contains(&0x345),
        vmx: indices.range(0x480..=0x493).next().is_some(),
    }
}

/// Adds the sub-leaves the guest read one by one to its `cpuid -r` table. Each requested one must
/// be there, and one `cpuid -r` also listed must agree with it (after masks: `-1` may run on
/// another vCPU). Returns the merged table and how many entries the extra reads added.
fn merge_extra(
    guest_raw: &CpuidTable,
    extra_text: &str,
    requested: &[(u32, u32)],
    problems: &mut Vec<String>,
) -> (CpuidTable, usize) {
    let mut merged = guest_raw.clone();
    if requested.is_empty() {
        return (merged, 0);
    }
    let extra = match parse_dump_as(extra_text, DumpFormat::CpuidTool) {
        Ok(table) => table,
        Err(e) => {
            problems.push(format!("guest extra sub-leaves: {e}"));
            return (merged, 0);
        }
    };
    let mut added = 0;
    for &(leaf, subleaf) in requested {
        let Some(entry) = extra.get(leaf, subleaf) else {
            problems.push(format!(
                "guest did not report requested sub-leaf {leaf:#x}.{subleaf:#x}"
            ));
            continue;
        };
        match guest_raw.get(leaf, subleaf) {
            Some(listed) => {
                let one = |e: &CpuidEntry| {
                    normalize(&CpuidTable {
                        entries: vec![*e],
                        msrs: Vec::new(),
                    })
                    .0
                };
                if one(listed) != one(entry) {
                    problems.push(format!(
                        "guest `cpuid -r` and `cpuid -l` disagree on {leaf:#x}.{subleaf:#x}: {listed:?} vs {entry:?}"
                    ));
                }
            }
            None => {
                merged.entries.push(*entry);
                added += 1;
            }
        }
    }
    merged.canonicalize();
    (merged, added)
}

fn fmt_keys(keys: &[(u32, u32)]) -> String {
    keys.iter()
        .map(|(l, s)| format!("{l:#x}.{s:#x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn probe_options() -> ProbeOptions {
    ProbeOptions {
        timeout: Duration::from_secs(60),
        allowed_emulators: vec![PathBuf::from(QEMU)],
        accel_override: Some(Accel::Tcg),
        ..ProbeOptions::default()
    }
}

const CPUGUARD: &str = env!("CARGO_BIN_EXE_cpuguard");

/// Runs `cpuguard` with a private configuration (QEMU allowed, cache in `dir`).
fn run_cpuguard(dir: &Path, args: &[&str]) -> Result<(Option<i32>, String, String), String> {
    let config = dir.join("cpuguard.toml");
    std::fs::write(
        &config,
        format!(
            "cache_dir = \"{}\"\nruntime_dir = \"{}\"\n[probe]\nemulators = [\"{QEMU}\"]\n",
            dir.join("cache").display(),
            dir.join("run").display()
        ),
    )
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let out = std::process::Command::new(CPUGUARD)
        .env("CPUGUARD_CONFIG", &config)
        .args(args)
        .output()
        .map_err(|e| format!("{CPUGUARD}: {e}"))?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// One `cpuguard diff` run: (direction, exit code, equivalent, `--verbose` text).
type CliVerdict = (String, Option<i32>, bool, String);

/// `cpuguard probe --tcg` of the case's domain, then `cpuguard diff --json` of it against the
/// guest's `cpuid -r` text in both directions: (direction, exit code, equivalent, text output).
fn cli_diff_verdicts(
    case: &Case,
    guest_dump: &str,
    work: &Path,
) -> Result<Vec<CliVerdict>, String> {
    let dir = work.join(format!("cli-{}", case.model));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let xml = dir.join("domain.xml");
    std::fs::write(&xml, domain_xml(case)).map_err(|e| e.to_string())?;
    let xml = xml.to_string_lossy().into_owned();
    let (code, probe_json, err) = run_cpuguard(&dir, &["probe", "--xml", &xml, "--tcg"])?;
    if code != Some(0) {
        return Err(format!(
            "{}: cpuguard probe: exit {code:?}: {err}",
            case.model
        ));
    }
    let probe = dir.join("probe.json");
    let guest = dir.join("guest-cpuid-r.txt");
    std::fs::write(&probe, &probe_json).map_err(|e| e.to_string())?;
    std::fs::write(&guest, guest_dump).map_err(|e| e.to_string())?;
    let (probe, guest) = (
        probe.to_string_lossy().into_owned(),
        guest.to_string_lossy().into_owned(),
    );
    let mut out = Vec::new();
    for (direction, a, b) in [
        ("probe -> guest", &probe, &guest),
        ("guest -> probe", &guest, &probe),
    ] {
        let (code, json, err) = run_cpuguard(&dir, &["diff", "--json", a, b])?;
        let v: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| format!("{}: diff --json: {e}: {json}{err}", case.model))?;
        let (_, text, _) = run_cpuguard(&dir, &["diff", "--verbose", a, b])?;
        // Not vacuous: the guest's `cpuid -r` has echo leaves the comparison left out.
        let echoes = v["echo_leaves"].as_array().map_or(0, Vec::len);
        if echoes == 0 {
            return Err(format!(
                "{}: no echo leaf seen in `cpuid -r`: {text}",
                case.model
            ));
        }
        out.push((
            direction.to_string(),
            code,
            v["equivalent"] == true && v["verdict"] == "equivalent",
            text,
        ));
    }
    Ok(out)
}

/// Runs one case; `Err` holds every problem found for it.
fn check_case(case: &Case, guest: &LinuxGuest, work: &Path) -> Result<String, String> {
    let config = GuestCpuConfig::from_domain_xml(&domain_xml(case))
        .map_err(|e| format!("{}: domain XML: {e}", case.model))?;
    let probe = probe_run(&config, &probe_options())
        .map_err(|e| format!("{}: probe failed: {e}", case.model))?;
    let options =
        linux_guest::cpu_options(&probe.argv).map_err(|e| format!("{}: {e}", case.model))?;
    // `cpuid -r` lists every leaf but only the sub-leaves it knows to be in use; the guest reads
    // the probe's other sub-leaves one by one, so every probe entry is checked.
    let extra: Vec<(u32, u32)> = valid_keys(&probe.table, &Ranges::of(&probe.table))
        .into_iter()
        .filter(|&(_, subleaf)| subleaf != 0)
        .collect();
    let run = linux_guest::boot(
        Path::new(QEMU),
        guest,
        &options,
        &extra,
        work,
        GUEST_TIMEOUT,
    )
    .map_err(|e| format!("{}: {e}", case.model))?;
    let mut problems = Vec::new();
    let guest_raw = parse_dump(&run.output.dump)
        .map_err(|e| format!("{}: guest `cpuid -r`: {e}", case.model))?;
    let (guest_merged, read_individually) =
        merge_extra(&guest_raw, &run.output.extra, &extra, &mut problems);
    if Ranges::of(&probe.table) != Ranges::of(&guest_raw) {
        problems.push(format!(
            "valid ranges differ: probe {:?}, guest {:?}",
            Ranges::of(&probe.table),
            Ranges::of(&guest_raw)
        ));
    }
    let result = compare(&probe.table, &guest_merged);
    if result.compared == 0 {
        problems.push("no entry compared".to_string());
    }
    if !result.missing_in_probe.is_empty() {
        problems.push(format!(
            "probe misses valid entries the guest saw: {}",
            fmt_keys(&result.missing_in_probe)
        ));
    }
    if !result.probe_only.is_empty() {
        problems.push(format!(
            "probe entries the guest never reported: {}",
            fmt_keys(&result.probe_only)
        ));
    }
    for d in &result.differences {
        problems.push(format!("differs after masks: {d}"));
    }

    // The comparison is not vacuous on real data: one flipped bit in the probe's table is found.
    if let Some(flip) = probe.table.get(1, 0).map(|e| e.ecx ^ 1) {
        let mut mutated = probe.table.clone();
        if let Some(e) = mutated
            .entries
            .iter_mut()
            .find(|e| e.leaf == 1 && e.subleaf == 0)
        {
            e.ecx = flip;
        }
        let seen = compare(&mutated, &guest_merged).differences;
        if !seen
            .iter()
            .any(|d| d.leaf == 1 && d.register == Register::Ecx && (d.probe ^ d.guest) & 1 == 1)
        {
            problems.push(format!(
                "a flipped CPUID.1:ECX[0] went unnoticed (differences: {seen:?})"
            ));
        }
    }

    // The operator's view of the same comparison: `cpuguard diff` between the guest's own
    // `cpuid -r` output (echo leaves such as 0x20000000 and 0xc0000000 included) and
    // `cpuguard probe --tcg` of the same domain says "equivalent", exit 0, both ways.
    let verdicts = cli_diff_verdicts(case, &run.output.dump, work)?;
    for (direction, code, equivalent, text) in &verdicts {
        if *code != Some(0) || !equivalent {
            problems.push(format!(
                "cpuguard diff {direction}: exit {code:?}, not equivalent:\n{text}"
            ));
        }
    }

    // The probe reads a feature MSR exactly when the CPUID the guest sees enumerates it.
    let expected = enumerated_msrs(&guest_merged);
    let read = probe_msrs(&probe.table.msrs, &probe.absent_msrs);
    if expected != read {
        problems.push(format!(
            "feature MSRs enumerated by the guest's CPUID: {expected}; read by the probe: {read}"
        ));
    }

    // Every vCPU of the guest must look the same once masked: the per-vCPU masks are complete.
    let cpus = linux_guest::split_cpus(&run.output.dump);
    if cpus.len() != case.vcpus as usize {
        problems.push(format!(
            "guest `cpuid -r` listed {} CPUs, the domain has {}",
            cpus.len(),
            case.vcpus
        ));
    }
    for (index, text) in cpus.iter().enumerate().skip(1) {
        match parse_dump(text) {
            Ok(table) => {
                let other = compare(&guest_raw, &table);
                if !other.differences.is_empty()
                    || !other.missing_in_probe.is_empty()
                    || !other.probe_only.is_empty()
                {
                    problems.push(format!(
                        "guest CPU {index} differs from CPU 0 after masks: {} (entries only on one: {} / {})",
                        other
                            .differences
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        fmt_keys(&other.missing_in_probe),
                        fmt_keys(&other.probe_only)
                    ));
                }
            }
            Err(e) => problems.push(format!("guest CPU {index} dump: {e}")),
        }
    }

    let mut report = format!(
        "{model:<15} {cpu_options}\n  guest: {QEMU} {guest_argv}\n  linux boot {boot:>8.2?}  probe {probe:>8.2?}  \
         compared {compared} (of which {individually} read by `cpuid -l -s`)  masked {masked}  \
         differing {differing}  missing-in-probe {missing}  probe-only {only} [{only_list}]  \
         probe MSRs {msr_count} (enumerated: {expected})\n",
        msr_count = probe.table.msrs.len(),
        cpu_options = options.join(" "),
        guest_argv = run.argv.join(" "),
        individually = read_individually,
        model = case.model,
        boot = run.wall_time,
        probe = probe.wall_time,
        compared = result.compared,
        masked = result.masked.len(),
        differing = result.differences.len(),
        missing = result.missing_in_probe.len(),
        only = result.probe_only.len(),
        only_list = fmt_keys(&result.probe_only),
    );
    for (location, reason) in &result.masked {
        report.push_str(&format!("    masked {location}: {reason}\n"));
    }
    if problems.is_empty() {
        Ok(report)
    } else {
        Err(format!(
            "{report}  PROBLEMS ({}):\n    {}",
            case.model,
            problems.join("\n    ")
        ))
    }
}

#[test]
fn probe_table_equals_linux_guest_cpuid_for_five_models() {
    let guest = LinuxGuest::locate();
    if !gate::require(&[
        Need::Qemu("x86_64"),
        Need::Fetched(
            "testbed/fetch-linux-guest.sh",
            guest.as_ref().err().map(ToString::to_string),
        ),
    ]) {
        return;
    }
    let guest = guest.unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut failures = Vec::new();
    // One model at a time: the machine has two cores and the times printed should mean something.
    for case in CASES {
        match check_case(case, &guest, work.path()) {
            Ok(report) => println!("{report}"),
            Err(report) => {
                println!("{report}");
                failures.push(report);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} models differ from the Linux guest:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

mod comparison {
    use super::*;

    fn table(entries: &[(u32, u32, [u32; 4])]) -> CpuidTable {
        let mut t = CpuidTable {
            entries: entries
                .iter()
                .map(|&(leaf, subleaf, r)| CpuidEntry {
                    leaf,
                    subleaf,
                    eax: r[0],
                    ebx: r[1],
                    ecx: r[2],
                    edx: r[3],
                })
                .collect(),
            msrs: Vec::new(),
        };
        t.canonicalize();
        t
    }

    #[test]
    fn ranges_follow_each_table_and_ignore_a_clamped_hypervisor_leaf() {
        let t = table(&[
            (0, 0, [0xd, 0, 0, 0]),
            // TCG without a hypervisor interface answers 0x40000000 with leaf 0xd: no range.
            (0x4000_0000, 0, [0x7, 0x340, 0x340, 0]),
            (0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
        ]);
        let r = Ranges::of(&t);
        assert_eq!(r.basic_max, 0xd);
        assert_eq!(r.hypervisor_max, None);
        assert_eq!(r.extended_max, Some(0x8000_0008));
        assert!(r.contains(0xd) && !r.contains(0xe));
        assert!(!r.contains(0x4000_0000));
        assert!(r.contains(0x8000_0008) && !r.contains(0x8000_0009));
        assert!(!r.contains(0x8086_0000) && !r.contains(0xc000_0000));
    }

    #[test]
    fn masked_bits_are_equal_and_named_other_bits_differ() {
        let probe = table(&[
            (0, 0, [0x1, 1, 2, 3]),
            (1, 0, [0x306c1, 0x0000_0800, 0x0000_0201, 0]),
        ]);
        // Guest: OSXSAVE set by its kernel, APIC ID 1, and one real difference in ECX bit 0.
        let guest = table(&[
            (0, 0, [0x1, 1, 2, 3]),
            (1, 0, [0x306c1, 0x0100_0800, 0x0800_0200, 0]),
            (0xc000_0000, 0, [9, 9, 9, 9]),
        ]);
        let c = compare(&probe, &guest);
        assert_eq!(c.compared, 2);
        assert_eq!(c.masked.len(), 1, "{:?}", c.masked);
        assert!(c.masked[0].1.contains("initial APIC ID"), "{:?}", c.masked);
        assert_eq!(
            c.differences,
            vec![Difference {
                leaf: 1,
                subleaf: 0,
                register: Register::Ecx,
                probe: 0x201,
                guest: 0x200,
            }],
            "OSXSAVE is masked, bit 0 is not"
        );
        assert!(c.missing_in_probe.is_empty(), "0xc0000000 is out of range");
    }

    #[test]
    fn a_valid_leaf_only_the_guest_saw_is_missing_in_probe() {
        let probe = table(&[(0, 0, [0x4, 0, 0, 0]), (4, 0, [0x121, 0, 0, 0])]);
        let guest = table(&[
            (0, 0, [0x4, 0, 0, 0]),
            (4, 0, [0x121, 0, 0, 0]),
            (4, 1, [0x122, 0, 0, 0]),
            (2, 0, [1, 0, 0, 0]),
        ]);
        let c = compare(&probe, &guest);
        assert_eq!(c.missing_in_probe, vec![(2, 0), (4, 1)]);
        let c = compare(&guest, &probe);
        assert_eq!(c.probe_only, vec![(2, 0), (4, 1)]);
        assert!(c.missing_in_probe.is_empty());
    }

    #[test]
    fn extra_sub_leaves_fill_gaps_and_must_all_be_reported() {
        let listed = table(&[(0, 0, [0xd, 0, 0, 0]), (0xd, 0, [7, 0x240, 0x340, 0])]);
        let extra = "0x0000000d 0x02: eax=0x00000100 ebx=0x00000240 ecx=0x00000000 edx=0x00000000\n\
                     0x0000000d 0x00: eax=0x00000007 ebx=0x00000340 ecx=0x00000340 edx=0x00000000\n";
        let mut problems = Vec::new();
        let (merged, added) = merge_extra(&listed, extra, &[(0xd, 0), (0xd, 2)], &mut problems);
        // 0xD.0 EBX differs but is masked (XCR0-dependent size), so the two reads agree.
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(added, 1);
        assert_eq!(merged.get(0xd, 2).map(|e| e.eax), Some(0x100));
        let (_, added) = merge_extra(&listed, extra, &[(0xd, 3)], &mut problems);
        assert_eq!(added, 0);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("0xd.0x3"), "{problems:?}");
    }

    #[test]
    fn msr_groups_follow_their_cpuid_bits() {
        let none = table(&[(1, 0, [0, 0, 0, 0]), (7, 0, [0, 0, 0, 0])]);
        let all = table(&[
            (1, 0, [0, 0, (1 << 15) | (1 << 5), 0]),
            (7, 0, [0, 0, 0, (1 << 29) | (1 << 30)]),
        ]);
        let off = MsrGroups {
            arch_capabilities: false,
            core_capabilities: false,
            perf_capabilities: false,
            vmx: false,
        };
        let on = MsrGroups {
            arch_capabilities: true,
            core_capabilities: true,
            perf_capabilities: true,
            vmx: true,
        };
        assert_eq!(enumerated_msrs(&none), off);
        assert_eq!(enumerated_msrs(&all), on);
        assert_eq!(probe_msrs(&[], &[]), off);
        let read: Vec<MsrEntry> = [0x10a, 0x345, 0x485]
            .iter()
            .map(|&index| MsrEntry { index, value: 1 })
            .collect();
        assert_eq!(probe_msrs(&read, &[0xcf]), on);
    }

    #[test]
    fn corpus_is_five_models_and_each_domain_parses() {
        let models: BTreeMap<&str, u32> = CASES.iter().map(|c| (c.model, c.vcpus)).collect();
        assert!(models.len() >= 5, "{models:?}");
        for case in CASES {
            let config = GuestCpuConfig::from_domain_xml(&domain_xml(case))
                .unwrap_or_else(|e| panic!("{}: {e}", case.model));
            assert_eq!(config.accel, Accel::Tcg);
            assert_eq!(config.vcpus, case.vcpus);
            assert_eq!(
                config.cpu.as_ref().and_then(|c| c.model.as_deref()),
                Some(case.model)
            );
        }
    }
}
