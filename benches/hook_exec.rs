//! What one hook call costs libvirt: fork + exec + the phase + exit, measured side by side with a
//! trivial Rust program (the floor) and a trivial program that merely links libvirt (what the hook
//! would cost if it loaded libvirt). Scenarios run round-robin in one process so machine noise
//! hits them alike.
//!
//! Run: `cargo bench --bench hook_exec` (optionally `-- ROUNDS`, default 300). With
//! `CPUGUARD_BENCH_KEEP=1` the work directory (configurations, stamped XML, warm cache) is kept so
//! a scenario can be re-run under `valgrind --tool=callgrind`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Scenario {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    stdin: Option<PathBuf>,
    /// The 1 MiB case is slower by nature; run it every `every`-th round to keep the bench short.
    every: usize,
    /// Environment for this scenario's runs (its own configuration file).
    env: Vec<(String, PathBuf)>,
    /// Arguments of an untimed run before each timed one (the migrate phase that leaves the
    /// incoming record a prepare consumes).
    before: Option<Vec<String>>,
    /// The exit status a correct run ends with (`cpuguard diff` says "different" with 1).
    expect_code: i32,
    samples: Vec<Duration>,
}

impl Scenario {
    fn new(name: &'static str, program: &Path, args: &[&str], stdin: Option<&Path>) -> Self {
        Scenario {
            name,
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: stdin.map(Path::to_path_buf),
            every: 1,
            env: Vec::new(),
            before: None,
            expect_code: 0,
            samples: Vec::new(),
        }
    }
}

fn rustc(src: &str, out: &Path, extra: &[&str]) -> bool {
    let file = out.with_extension("rs");
    if fs::write(&file, src).is_err() {
        return false;
    }
    Command::new("rustc")
        .args(["-C", "opt-level=3", "--edition", "2021", "-o"])
        .arg(out)
        .arg(&file)
        .args(extra)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A domain XML of about `size` bytes: the real libvirt sample plus another application's metadata.
fn domain_xml(size: usize) -> String {
    let sample = include_str!("../tests/fixtures/xml/libvirt9-migrate-begin.xml");
    if size <= sample.len() {
        return sample.to_string();
    }
    let mut meta = String::from("  <metadata>\n    <app:data xmlns:app='urn:example:app'>\n");
    let mut i = 0;
    while sample.len() + meta.len() + 64 < size {
        meta.push_str(&format!(
            "      <app:item id='{i}'>payload {i:08}</app:item>\n"
        ));
        i += 1;
    }
    meta.push_str("    </app:data>\n  </metadata>\n");
    sample.replacen("  <cpu ", &format!("{meta}  <cpu "), 1)
}

fn run_once(s: &Scenario) -> Duration {
    if let Some(before) = &s.before {
        let mut setup = Scenario::new(s.name, &s.program, &[], s.stdin.as_deref());
        setup.env = s.env.clone();
        exec(&setup, before);
    }
    exec(s, &s.args)
}

fn exec(s: &Scenario, args: &[String]) -> Duration {
    let stdin = match &s.stdin {
        Some(p) => fs::File::open(p).map(Stdio::from).unwrap_or(Stdio::null()),
        None => Stdio::null(),
    };
    let mut command = Command::new(&s.program);
    command
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in &s.env {
        command.env(key, value);
    }
    let start = Instant::now();
    let status = command.status();
    let elapsed = start.elapsed();
    match status {
        Ok(st) if st.code() == Some(s.expect_code) => elapsed,
        other => panic!("{}: run failed: {other:?}", s.name),
    }
}

fn stats(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(samples[samples.len() / 2]);
    let p95 = ms(samples[(samples.len() * 95 / 100).min(samples.len() - 1)]);
    let mean = samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64;
    (median, mean, p95)
}

/// The prepare phase of an incoming guest with a stamp and a warm fingerprint cache: the whole
/// check cpuguard adds to a migration (parse, cache hit, compare, audit). Each timed prepare
/// follows an untimed migrate phase that leaves the incoming record; it runs interleaved with the
/// trivial binary like every other scenario.
fn incoming_check(cpuguard: &Path, work: &Path) -> Option<Scenario> {
    use cpuguard::config::Config;
    use cpuguard::domain::metadata::{stamp_element_bound, StampBinding};

    let emulator = "/usr/bin/qemu-system-x86_64";
    if !Path::new(emulator).exists() {
        println!("(incoming check skipped: no {emulator})");
        return None;
    }
    // The stamp is bound to the domain (UUID and CPU configuration), as a current source writes
    // it: an unbound stamp is refused by default (policy.unbound_stamp).
    const UUID: &str = "2f4e8c1a-6b3d-4a59-8e7f-0c1d2e3f4a5b";
    let xml = include_str!("../tests/fixtures/domains/tcg-haswell-features.xml").replacen(
        "</name>",
        &format!("</name>\n  <uuid>{UUID}</uuid>"),
        1,
    );
    let xml = xml.as_str();
    let mut config = Config {
        cache_dir: work.join("cache"),
        runtime_dir: work.join("run-incoming"),
        ..Config::default()
    };
    config.probe.emulators = vec![PathBuf::from(emulator)];
    let m = cpuguard::measure::for_domain_xml(xml, &config).expect("measure the fixture");
    let binding = StampBinding {
        uuid: Some(UUID.to_string()),
        config: Some(
            cpuguard::domain::guest::GuestCpuConfig::from_domain_xml(xml)
                .expect("guest config")
                .binding_digest(),
        ),
        ..StampBinding::default()
    };
    let stamp = stamp_element_bound(
        "bench-source",
        "2026-01-01T00:00:00Z",
        &m.fingerprint.digest,
        "",
        &m.fingerprint.raw().to_text(),
        &binding,
    )
    .replacen(
        "<stamp ",
        &format!(
            "<cg:stamp xmlns:cg='{}' ",
            cpuguard::domain::metadata::STAMP_NS
        ),
        1,
    )
    .replacen("</stamp>", "</cg:stamp>", 1);
    let stamped = xml.replacen(
        "</domain>",
        &format!("<metadata>{stamp}</metadata>\n</domain>"),
        1,
    );
    let xml_path = work.join("stamped.xml");
    fs::write(&xml_path, &stamped).expect("stamped xml");
    let toml = work.join("incoming.toml");
    fs::write(
        &toml,
        format!(
            "cache_dir = \"{}\"\nruntime_dir = \"{}\"\n[probe]\nemulators = [\"{emulator}\"]\n",
            config.cache_dir.display(),
            config.runtime_dir.display()
        ),
    )
    .expect("config");
    let hook = |phase: &str| -> Vec<String> {
        ["hook", "qemu", "bench-stamped", phase, "begin", "-"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let mut scenario = Scenario::new(
        "hook prepare, incoming, stamped, warm cache",
        cpuguard,
        &[],
        Some(&xml_path),
    );
    scenario.args = hook("prepare");
    scenario.before = Some(hook("migrate"));
    scenario.env = vec![("CPUGUARD_CONFIG".to_string(), toml)];
    Some(scenario)
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let work = std::env::temp_dir().join(format!("cpuguard-bench-{}", std::process::id()));
    fs::create_dir_all(&work).expect("bench work dir");
    let cpuguard = PathBuf::from(env!("CARGO_BIN_EXE_cpuguard"));

    let trivial = work.join("trivial");
    assert!(
        rustc("fn main() {}\n", &trivial, &[]),
        "rustc could not build the trivial baseline"
    );
    // Reference only: a trivial program that links libvirt (needs libvirt-dev). It calls one
    // libvirt function behind a condition that is never true so the library is really loaded.
    let with_libvirt = work.join("trivial-libvirt");
    let libvirt_src = "extern \"C\" { fn virGetVersion(l: *mut u64, t: *const i8, v: *mut u64) -> i32; }\n\
        fn main() { if std::env::args().count() > 99 { unsafe { virGetVersion(std::ptr::null_mut(), std::ptr::null(), std::ptr::null_mut()); } } }\n";
    let have_libvirt = rustc(libvirt_src, &with_libvirt, &["-l", "virt"]);

    // In production the runtime directory is /run (tmpfs); use tmpfs here too when there is one,
    // so the record's fsync costs what it costs on a hypervisor.
    let shm = Path::new("/dev/shm");
    let run_dir = if shm.is_dir() {
        shm.join(format!("cpuguard-bench-{}", std::process::id()))
    } else {
        work.join("run")
    };
    let config = work.join("cpuguard.toml");
    fs::write(
        &config,
        format!("runtime_dir = \"{}\"\n", run_dir.display()),
    )
    .expect("bench config");
    std::env::set_var("CPUGUARD_CONFIG", &config);
    let xml_4k = work.join("domain-4k.xml");
    let xml_1m = work.join("domain-1m.xml");
    fs::write(&xml_4k, domain_xml(4096)).expect("4k xml");
    fs::write(&xml_1m, domain_xml(1024 * 1024)).expect("1m xml");

    // Distinct names: a migrate run leaves an incoming record that the same name's next prepare
    // would consume, and that prepare must measure a normal start.
    let hook = |phase: &str| -> Vec<String> {
        let name = if phase == "migrate" {
            "bench-incoming"
        } else {
            "bench-normal"
        };
        ["hook", "qemu", name, phase, "begin", "-"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let stdin_4k = Some(xml_4k.as_path());
    let small_dumps = [
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/cpuid/seed001-case3-src.txt"
        ),
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/cpuid/seed001-case3-dst.txt"
        ),
    ];
    let mut scenarios = vec![
        Scenario::new("trivial Rust binary", &trivial, &[], stdin_4k),
        Scenario::new("cpuguard --version", &cpuguard, &["--version"], None),
        Scenario::new(
            "hook no-op phase (stopped), 4 KiB XML",
            &cpuguard,
            &[],
            stdin_4k,
        ),
        Scenario::new(
            "hook prepare, normal start, 4 KiB XML",
            &cpuguard,
            &[],
            stdin_4k,
        ),
        Scenario::new("hook migrate phase, 4 KiB XML", &cpuguard, &[], stdin_4k),
        Scenario::new(
            "hook migrate phase, 1 MiB XML",
            &cpuguard,
            &[],
            Some(&xml_1m),
        ),
        // Two 30-line kvm-unit-tests dumps (seed 001 case 3) that differ: names looked up in
        // libvirt's feature map, exit 1 for "different".
        Scenario::new("cpuguard diff, two 30-line dumps", &cpuguard, &[], None),
    ];
    scenarios[2].args = hook("stopped");
    scenarios[3].args = hook("prepare");
    scenarios[4].args = hook("migrate");
    scenarios[5].args = hook("migrate");
    scenarios[5].every = 5;
    scenarios[6].args = ["diff", small_dumps[0], small_dumps[1]]
        .iter()
        .map(|s| s.to_string())
        .collect();
    scenarios[6].expect_code = 1;
    if let Some(incoming) = incoming_check(&cpuguard, &work) {
        scenarios.push(incoming);
    }
    if have_libvirt {
        let mut linked = Scenario::new(
            "trivial Rust binary linking libvirt",
            &with_libvirt,
            &[],
            None,
        );
        linked.every = 3;
        scenarios.push(linked);
    }

    // Warm the page cache before measuring.
    for s in &scenarios {
        run_once(s);
    }
    for round in 0..rounds {
        for s in scenarios.iter_mut() {
            if round % s.every == 0 {
                let d = run_once(s);
                s.samples.push(d);
            }
        }
    }

    let base = {
        let mut t = scenarios[0].samples.clone();
        stats(&mut t).0
    };
    println!("cpuguard hook exec cost, {rounds} rounds (wall time per fork+exec+exit, ms)");
    println!(
        "{:<42} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "scenario", "runs", "median", "mean", "p95", "x trivial"
    );
    for s in scenarios.iter_mut() {
        let runs = s.samples.len();
        let (median, mean, p95) = stats(&mut s.samples);
        println!(
            "{:<42} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.2}",
            s.name,
            runs,
            median,
            mean,
            p95,
            median / base
        );
    }
    if !have_libvirt {
        println!("(libvirt-linked baseline skipped: rustc -l virt failed; install libvirt-dev)");
    }
    if std::env::var_os("CPUGUARD_BENCH_KEEP").is_some() {
        // For profiling one scenario by hand, e.g. under valgrind --tool=callgrind.
        println!("kept {} and {}", work.display(), run_dir.display());
        return;
    }
    let _ = fs::remove_dir_all(&work);
    let _ = fs::remove_dir_all(&run_dir);
}
