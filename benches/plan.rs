//! What a fleet plan costs at scale: `cpuguard plan` over 2,000 VMs (20 source inventories of
//! 100) × 200 destination bundles × 50 CPU configurations, printed beside the targets (2 s,
//! 200 MB peak RSS).
//!
//! The bundles are generated from one real probe table (TCG, Skylake-Server): each of four CPU
//! generations withholds one more leaf-7 feature, each configuration (vCPU count 1..=50) adds its
//! own topology bits, so the 10,000 destination fingerprints and the 2,000 stamps are distinct,
//! verified and compared like real ones. The files are written pretty-printed, as `cpuguard
//! fingerprint export` writes them, each with its host's CPU (one of four generations) so that
//! the baseline of every blocked group is computed too. The plan runs as the real binary (`--json` to /dev/null,
//! then the text form); peak RSS is the child's `ru_maxrss`, CPU time its user + system time.
//!
//! Run: `cargo bench --bench plan` (as root: the template probe runs only root-owned emulators).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpuguard::baseline::{CpuDef, HostCpu, HostSource};
use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::fingerprint::{Fingerprint, HostFacts};
use cpuguard::matrix::{Bundle, BundleEntry, BUNDLE_FORMAT, BUNDLE_VERSION};
use cpuguard::plan::{Inventory, InventoryDomain, InventoryStamp, INVENTORY_FORMAT};
use cpuguard::x86_64::probe::{probe_run, ProbeOptions};
use cpuguard::x86_64::CpuidTable;

const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");
const SOURCES: usize = 20;
const VMS_PER_SOURCE: usize = 100;
const DESTINATIONS: usize = 200;
const CONFIGURATIONS: u32 = 50;
const GENERATIONS: usize = 4;
const TARGET_SECS: f64 = 2.0;
const TARGET_MB: f64 = 200.0;

fn domain_xml(vcpus: u32) -> String {
    format!(
        "<domain type='qemu'><name>vm</name><memory unit='KiB'>65536</memory><vcpu>{vcpus}</vcpu>\
         <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>\
         <cpu mode='custom' match='exact'><model fallback='forbid'>Skylake-Server</model></cpu>\
         <devices><emulator>{EMULATOR}</emulator></devices></domain>"
    )
}

/// The template table for generation `generation` and configuration `config`.
fn table(template: &CpuidTable, generation: usize, config: u32) -> CpuidTable {
    let mut t = template.clone();
    for e in &mut t.entries {
        if e.leaf == 7 && e.subleaf == 0 {
            // Each older generation lacks one more of the template's leaf-7 EBX features
            // (its highest set bits: named features such as avx2, bmi2, erms).
            let set: Vec<u32> = (0..32).rev().filter(|b| e.ebx & (1 << b) != 0).collect();
            for (g, bit) in set.iter().take(GENERATIONS - 1).enumerate() {
                if generation > g {
                    e.ebx &= !(1 << bit);
                }
            }
        }
        if e.leaf == 1 {
            // Logical processor count (EBX[23:16]) follows the configuration's vCPUs.
            e.ebx = (e.ebx & !0x00ff_0000) | ((config & 0xff) << 16);
        }
    }
    t
}

fn host(name: &str) -> HostFacts {
    HostFacts {
        hostname: name.to_string(),
        kernel_release: "6.1.0".into(),
        cpu_model_name: "generated".into(),
        microcode: "0x1".into(),
        qemu_version: "7.2.0".into(),
        accelerator: "tcg".into(),
    }
}

/// The host CPU (libvirt's host-model, as `cpuguard fingerprint export` records it) of a host
/// of `generation`: each older generation lacks one more feature, so every blocked group's
/// baseline is computed from four distinct CPUs.
fn host_cpu(name: &str, generation: usize) -> HostCpu {
    let mut required: Vec<String> = ["avx512f", "clflushopt", "pku", "invtsc", "x2apic"]
        .iter()
        .map(|f| f.to_string())
        .collect();
    required.drain(..generation.min(GENERATIONS - 1));
    required.sort();
    HostCpu {
        origin: name.to_string(),
        source: HostSource::DomainCapabilities,
        arch: "x86_64".to_string(),
        cpu: CpuDef {
            model: Some("Skylake-Server-IBRS".to_string()),
            vendor: Some("Intel".to_string()),
            required,
            disabled: vec!["hle".to_string(), "rtm".to_string()],
        },
    }
}

/// Peak RSS (MB) and CPU time (user + system, s) of the finished children.
fn children_usage() -> (f64, f64) {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (
        usage.max_rss() as f64 / 1024.0,
        secs(usage.user_time()) + secs(usage.system_time()),
    )
}

const CHILD_ENV: &str = "CPUGUARD_PLAN_BENCH_CHILD";

/// In the measuring child: runs `cpuguard plan ARGS`, prints `SECONDS PEAK_RSS_MB`.
fn measure_child() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let start = Instant::now();
    let status = Command::new(BIN)
        .arg("plan")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("run cpuguard plan");
    let took = start.elapsed().as_secs_f64();
    // Generations differ, so some VMs cannot go everywhere: exit 1 is the expected verdict.
    assert_eq!(status.code(), Some(1), "cpuguard plan failed");
    let (rss, cpu) = children_usage();
    println!("{took} {rss} {cpu}");
}

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return measure_child();
    }
    let configs: Vec<GuestCpuConfig> = (1..=CONFIGURATIONS)
        .map(|v| GuestCpuConfig::from_domain_xml(&domain_xml(v)).expect("domain"))
        .collect();
    let options = ProbeOptions {
        timeout: Duration::from_secs(60),
        allowed_emulators: vec![PathBuf::from(EMULATOR)],
        accel_override: Some(Accel::Tcg),
        ..ProbeOptions::default()
    };
    let template = probe_run(&configs[0], &options)
        .expect("template probe (run as root with qemu-system-x86 installed)")
        .table;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Instant::now();

    // Destination bundles: host i is of generation i % GENERATIONS and measured everything.
    let mut bundle_files = Vec::new();
    let fingerprints: Vec<Vec<Fingerprint>> = (0..GENERATIONS)
        .map(|g| {
            configs
                .iter()
                .enumerate()
                .map(|(c, config)| {
                    Fingerprint::new(
                        host("generated"),
                        serde_json::to_value(config).expect("config"),
                        table(&template, g, c as u32 + 1),
                    )
                })
                .collect()
        })
        .collect();
    for i in 0..DESTINATIONS {
        let name = format!("new-{i:03}");
        let entries = configs
            .iter()
            .zip(&fingerprints[i % GENERATIONS])
            .map(|(config, fp)| BundleEntry {
                key: serde_json::json!({ "config": config, "accel": config.accel }),
                measured_at_unix: 1,
                fingerprint: fp.clone(),
            })
            .collect();
        let bundle = Bundle {
            format: BUNDLE_FORMAT.into(),
            version: BUNDLE_VERSION,
            hostname: name.clone(),
            host_cpu: Some(host_cpu(&name, i % GENERATIONS)),
            entries,
        };
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&bundle).expect("json")).expect("write");
        bundle_files.push(path);
    }
    // Source inventories: source s is of generation s % GENERATIONS; VM v has configuration
    // v % CONFIGURATIONS and the stamp its source measured for it.
    let mut inventory_files = Vec::new();
    for s in 0..SOURCES {
        let g = s % GENERATIONS;
        let domains = (0..VMS_PER_SOURCE)
            .map(|v| {
                let c = v % CONFIGURATIONS as usize;
                let fp = &fingerprints[g][c];
                InventoryDomain {
                    name: format!("vm-{s:02}-{v:03}"),
                    uuid: None,
                    running: true,
                    label: cpuguard::matrix::label(&cpuguard::plan::configuration(&configs[c])),
                    config: configs[c].clone(),
                    stamp: Some(InventoryStamp {
                        host: Some(format!("old-{s:02}")),
                        time: None,
                        digest: Some(fp.digest.clone()),
                        table: fp.raw().to_text(),
                    }),
                }
            })
            .collect();
        let inventory = Inventory {
            format: INVENTORY_FORMAT.into(),
            version: cpuguard::plan::INVENTORY_VERSION,
            hostname: format!("old-{s:02}"),
            taken_at: "2026-11-22T05:00:00Z".into(),
            host_cpu: Some(host_cpu(&format!("old-{s:02}"), g)),
            domains,
        };
        let path = dir.path().join(format!("old-{s:02}-vms.json"));
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&inventory).expect("json"),
        )
        .expect("write");
        inventory_files.push(path);
    }
    let bytes: u64 = bundle_files
        .iter()
        .chain(&inventory_files)
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    println!(
        "generated {} VMs in {SOURCES} inventories, {DESTINATIONS} bundles × {CONFIGURATIONS} configurations \
         ({:.0} MB of JSON, template table of {} leaves) in {:.1} s",
        SOURCES * VMS_PER_SOURCE,
        bytes as f64 / 1e6,
        template.entries.len(),
        setup.elapsed().as_secs_f64()
    );

    for form in ["--json", "text"] {
        let mut args: Vec<&Path> = inventory_files.iter().map(PathBuf::as_path).collect();
        let to: Vec<&Path> = bundle_files.iter().map(PathBuf::as_path).collect();
        args.push(Path::new("--to"));
        args.extend(to);
        if form == "--json" {
            args.push(Path::new("--json"));
        }
        // The plan runs under a fresh copy of this bench whose only child it is, so that
        // RUSAGE_CHILDREN's peak is the plan's and not the template probe's QEMU.
        let out = Command::new(std::env::current_exe().expect("this bench"))
            .env(CHILD_ENV, "1")
            .args(&args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run the measuring child");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut numbers = text.split_whitespace().map(|n| n.parse::<f64>());
        let (Some(Ok(took)), Some(Ok(rss)), Some(Ok(cpu))) =
            (numbers.next(), numbers.next(), numbers.next())
        else {
            panic!("measuring child: {text}");
        };
        // CPU time beside the wall clock: on a machine shared with other work the wall clock
        // also counts waiting for a core.
        println!(
            "plan ({form}): {took:.2} s (target < {TARGET_SECS} s; CPU time {cpu:.2} s), peak RSS {rss:.0} MB (target < {TARGET_MB} MB) — {}",
            if took < TARGET_SECS && rss < TARGET_MB {
                "within target"
            } else {
                "OVER TARGET"
            }
        );
    }
}
