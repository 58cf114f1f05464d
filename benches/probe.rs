//! What a fingerprint costs: the probe's wall time beside a bare QEMU start-to-quit of the same
//! configuration (same emulator, same -machine/-cpu/-smp, a firmware that exits at once) and
//! beside the floor (the same command line booting a firmware that executes only the CPUIDs and
//! RDMSRs the table needs and exits: what the table's own exits cost on this host), run
//! round-robin in one process, under TCG and under KVM where it is usable; and what a cache hit
//! costs, in-process and as `cpuguard probe --cached`.
//!
//! The aarch64 ID-register probe is measured the same way against a bare `qemu-system-aarch64`
//! start-to-quit whose firmware reads no register (the same generated program, empty list).
//!
//! Run: `cargo bench --bench probe` (optionally `-- ROUNDS`, default 15).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpuguard::config::Config;
use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::measure;
use cpuguard::x86_64::probe::firmware::{EXIT_X86, PROBE_EXIT_STATUS, PROBE_FLOOR_X86};
use cpuguard::x86_64::probe::{probe_run, ProbeOptions};

#[path = "../tests/support/kvm.rs"]
mod kvm;

const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

/// Wall time of one emulator run to its exit, which must be `expected`.
fn timed_run(emulator: &str, argv: &[String], expected: Option<i32>) -> Duration {
    let start = Instant::now();
    let status = Command::new(emulator)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn qemu");
    let took = start.elapsed();
    assert_eq!(status.code(), expected, "bare {emulator} run failed");
    took
}

/// The probe's own command line (`argv` of a probe run: same -machine/-cpu/-smp, devices and
/// file-backed RAM) booting `image` instead, with its files in `work`.
fn bare_run(argv: &[String], image: &Path, work: &Path) -> Duration {
    let mut argv = argv.to_vec();
    let mut bios = false;
    for arg in argv.iter_mut() {
        if bios {
            *arg = image.display().to_string();
        } else if arg.starts_with("file,id=") {
            *arg = format!(
                "file,id=cpuguard-probe,path={}",
                work.join("bare.out").display()
            );
        } else if arg.starts_with("memory-backend-file,") {
            let head = arg
                .split(",mem-path=")
                .next()
                .unwrap_or_default()
                .to_string();
            *arg = format!("{head},mem-path={}", work.join("bare-ram").display());
        }
        bios = arg == "-bios";
    }
    timed_run(EMULATOR, &argv, Some(PROBE_EXIT_STATUS))
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(15);
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let exit_image = work.join("exit.bin");
    let floor_image = work.join("floor.bin");
    std::fs::write(&exit_image, EXIT_X86).expect("exit firmware");
    std::fs::write(&floor_image, PROBE_FLOOR_X86).expect("floor firmware");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/domains");
    let names = [
        "tcg-haswell-features.xml",
        "tcg-epyc-topology.xml",
        "tcg-skylake-current-vcpus.xml",
        "libvirt9-prepare-begin.xml",
    ];
    let configs: Vec<(String, GuestCpuConfig)> = names
        .iter()
        .map(|n| {
            let xml = std::fs::read_to_string(fixtures.join(n)).expect("fixture");
            (
                n.to_string(),
                GuestCpuConfig::from_domain_xml(&xml).expect("guest config"),
            )
        })
        .collect();

    let mut accels = vec![Accel::Tcg];
    match kvm::unusable_reason() {
        None => accels.push(Accel::Kvm),
        Some(reason) => println!("(KVM skipped: {reason})"),
    }
    for accel in accels {
        let accel_name = if accel == Accel::Kvm { "KVM" } else { "TCG" };
        let opts = ProbeOptions {
            timeout: Duration::from_secs(60),
            allowed_emulators: vec![PathBuf::from(EMULATOR)],
            accel_override: Some(accel),
            ..ProbeOptions::default()
        };
        // A configuration this host's QEMU refuses under this accelerator (a model the host CPU
        // cannot run under KVM) is named and left out.
        let runnable: Vec<(&String, &GuestCpuConfig, Vec<String>)> = configs
            .iter()
            .filter_map(|(name, c)| match probe_run(c, &opts) {
                Ok(run) => Some((name, c, run.argv)),
                Err(e) => {
                    println!("({name} under {accel_name} left out: {e})");
                    None
                }
            })
            .collect();
        let n = runnable.len();
        let (mut bare, mut floor, mut probe) = (
            vec![Vec::new(); n],
            vec![Vec::new(); n],
            vec![Vec::new(); n],
        );
        // The previous wire format (text on port 0xe9, an exit per byte under KVM), for the
        // before/after figure.
        let mut text = vec![Vec::new(); n];
        // The probe's time from spawning QEMU to its exit: the rest is the runner's (work
        // directory, image, result, clean-up).
        let mut in_qemu = vec![Vec::new(); n];
        let text_opts = ProbeOptions {
            firmware: cpuguard::x86_64::probe::Firmware::Text,
            ..opts.clone()
        };
        for round in 0..rounds {
            for (i, (_, c, argv)) in runnable.iter().enumerate() {
                // The runs take turns at going first, so whatever the previous run leaves
                // behind (caches, the scheduler) does not always favour the same one.
                for which in (0..4).map(|k| (k + round) % 4) {
                    match which {
                        0 => bare[i].push(bare_run(argv, &exit_image, work)),
                        1 => floor[i].push(bare_run(argv, &floor_image, work)),
                        2 => {
                            let start = Instant::now();
                            probe_run(c, &text_opts).expect("text-format probe");
                            text[i].push(start.elapsed());
                        }
                        _ => {
                            let start = Instant::now();
                            let run = probe_run(c, &opts).expect("probe");
                            probe[i].push(start.elapsed());
                            in_qemu[i].push(run.wall_time);
                        }
                    }
                }
            }
        }
        println!(
            "probe wall time vs bare QEMU start-to-quit and vs the floor (and the previous text wire format), {accel_name}, {rounds} rounds each (median ms)"
        );
        println!(
            "{:<34} {:>10} {:>10} {:>10} {:>8} {:>8} {:>12} {:>12}",
            "configuration",
            "bare QEMU",
            "floor",
            "probe",
            "p/bare",
            "p/floor",
            "probe QEMU",
            "text format"
        );
        for (i, (name, _, _)) in runnable.iter().enumerate() {
            let b = median_ms(&mut bare[i]);
            let f = median_ms(&mut floor[i]);
            let p = median_ms(&mut probe[i]);
            let t = median_ms(&mut text[i]);
            let q = median_ms(&mut in_qemu[i]);
            println!(
                "{name:<34} {b:>10.1} {f:>10.1} {p:>10.1} {:>8.2} {:>8.2} {q:>12.1} {t:>12.1}",
                p / b,
                p / f
            );
        }
        println!();
    }

    aarch64(work, rounds);

    // Cache hit: the hook's warm path, in-process and as a whole `cpuguard probe --cached` exec.
    let mut config = Config {
        cache_dir: work.join("cache"),
        ..Config::default()
    };
    config.probe.emulators = vec![PathBuf::from(EMULATOR)];
    let (_, guest) = &configs[0];
    let cold_start = Instant::now();
    measure::for_guest(guest, &config, Some(Accel::Tcg)).expect("cold measure");
    let cold = cold_start.elapsed();
    let mut hits = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        let m = measure::for_guest(guest, &config, Some(Accel::Tcg)).expect("hit");
        hits.push(start.elapsed());
        assert!(matches!(m.source, cpuguard::cache::Source::Hit));
    }
    let toml = work.join("cpuguard.toml");
    std::fs::write(
        &toml,
        format!(
            "cache_dir = \"{}\"\n[probe]\nemulators = [\"{EMULATOR}\"]\n",
            config.cache_dir.display()
        ),
    )
    .expect("config");
    let xml = fixtures.join(names[0]);
    let mut execs = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_cpuguard"))
            .args(["probe", "--cached", "--tcg", "--xml"])
            .arg(&xml)
            .env("CPUGUARD_CONFIG", &toml)
            .stdout(Stdio::null())
            .status()
            .expect("cpuguard probe");
        execs.push(start.elapsed());
        assert!(out.success());
    }
    println!();
    println!("fingerprint cache ({names0})", names0 = names[0]);
    println!(
        "  miss (version + probe + store), once: {:>8.1} ms",
        cold.as_secs_f64() * 1000.0
    );
    println!(
        "  hit, in-process (median of 50):       {:>8.2} ms",
        median_ms(&mut hits)
    );
    println!(
        "  hit, `cpuguard probe --cached` exec (median of 20): {:>8.2} ms",
        median_ms(&mut execs)
    );
}

const EMULATOR_AARCH64: &str = "/usr/bin/qemu-system-aarch64";

/// The aarch64 probe beside a bare start-to-quit, per CPU model, round-robin.
fn aarch64(work: &Path, rounds: usize) {
    use cpuguard::aarch64::probe::firmware;
    use cpuguard::aarch64::probe::probe_args;
    use cpuguard::aarch64::{ArmCpu, ArmProbeConfig, ArmProbeOptions};
    if !Path::new(EMULATOR_AARCH64).exists() {
        println!("\naarch64: {EMULATOR_AARCH64} missing, skipped");
        return;
    }
    let bare_image = work.join("exit-aarch64.bin");
    std::fs::write(&bare_image, firmware::program(&[]).expect("empty program")).expect("write");
    let models = ["cortex-a57", "cortex-a72", "cortex-a53", "max"];
    let configs: Vec<ArmProbeConfig> = models
        .iter()
        .map(|m| {
            let cpu = if *m == "max" {
                ArmCpu::Max
            } else {
                ArmCpu::Model(m.to_string())
            };
            ArmProbeConfig::new(EMULATOR_AARCH64, Accel::Tcg, cpu)
        })
        .collect();
    let opts = ArmProbeOptions {
        timeout: Duration::from_secs(60),
        allowed_emulators: vec![PathBuf::from(EMULATOR_AARCH64)],
        work_dir: None,
    };
    // PSCI SYSTEM_OFF: QEMU exits 0.
    let bare_run = |c: &ArmProbeConfig| {
        let argv = probe_args(c, &bare_image, &work.join("bare-aarch64.out")).expect("argv");
        timed_run(EMULATOR_AARCH64, &argv, Some(0))
    };
    let mut bare: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    let mut probe: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    for c in &configs {
        bare_run(c);
        cpuguard::aarch64::probe(c, &opts).expect("warm-up aarch64 probe");
    }
    for _ in 0..rounds {
        for (i, c) in configs.iter().enumerate() {
            bare[i].push(bare_run(c));
            let start = Instant::now();
            cpuguard::aarch64::probe(c, &opts).expect("aarch64 probe");
            probe[i].push(start.elapsed());
        }
    }
    println!();
    println!("aarch64 ID-register probe vs bare QEMU start-to-quit, TCG virt, {rounds} rounds (median ms)");
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "cpu model", "bare QEMU", "probe", "ratio"
    );
    for (i, m) in models.iter().enumerate() {
        let b = median_ms(&mut bare[i]);
        let p = median_ms(&mut probe[i]);
        println!("{m:<34} {b:>10.1} {p:>10.1} {:>8.2}", p / b);
    }
}
