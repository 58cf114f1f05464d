//! The fingerprint cache under concurrency and on an unwritable directory, through the public API.
//!
//! Process tests re-run this test binary on their own test (`--exact NAME`) with
//! `CPUGUARD_CACHE_TEST_ROLE` set: the re-run test then plays one helper process, parameterized
//! through environment variables, instead of the parent. The helpers are therefore no tests of
//! their own (nothing to skip or ignore), and the ordinary suite never runs them alone.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cpuguard::cache::{Cache, CacheError, CacheKey, CacheWarning, Source};
use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::fingerprint::{Fingerprint, HostFacts};
use cpuguard::x86_64::table::{CpuidEntry, CpuidTable};

/// Set (to a helper's name) in a helper process; see the module comment.
const ENV_ROLE: &str = "CPUGUARD_CACHE_TEST_ROLE";
const ENV_DIR: &str = "CPUGUARD_CACHE_TEST_DIR";
const ENV_MODEL: &str = "CPUGUARD_CACHE_TEST_MODEL";
const ENV_GO: &str = "CPUGUARD_CACHE_TEST_GO";

/// How long a measurement takes in these tests: long enough that every concurrent caller
/// arrives while it runs.
const MEASURE_TIME: Duration = Duration::from_millis(300);

fn key(model: &str) -> CacheKey {
    let xml = format!(
        "<domain type='qemu'><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <cpu mode='custom'><model>{model}</model></cpu></domain>"
    );
    let config = GuestCpuConfig::from_domain_xml(&xml).expect("test XML parses");
    // Any file serves as the emulator binary's identity; this binary is the same for every
    // helper process.
    let exe = std::env::current_exe().expect("current exe");
    CacheKey::for_this_host(&config, Accel::Tcg, &exe, "test emulator").expect("key")
}

fn fingerprint(marker: u32) -> Fingerprint {
    let table = CpuidTable {
        entries: vec![
            CpuidEntry {
                leaf: 0,
                subleaf: 0,
                eax: 1,
                ebx: 0x756e6547,
                ecx: 0x6c65746e,
                edx: 0x49656e69,
            },
            CpuidEntry {
                leaf: 1,
                subleaf: 0,
                eax: 0x000306c1,
                ebx: 0,
                ecx: marker,
                edx: 0x178bfbff,
            },
        ],
        msrs: vec![],
    };
    Fingerprint::new(HostFacts::default(), serde_json::Value::Null, table)
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read cache dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".lock") || n.ends_with(".tmp"))
        .collect()
}

/// Runs `callers` threads, each opening the cache on its own and asking for `models[i % len]`
/// at the same instant. Returns (measure calls, most measurements seen running at once,
/// sources).
fn race_threads(dir: &Path, models: &[&str], callers: usize) -> (usize, usize, Vec<Source>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(callers));
    let handles: Vec<_> = (0..callers)
        .map(|i| {
            let (calls, running, peak, barrier) = (
                calls.clone(),
                running.clone(),
                peak.clone(),
                barrier.clone(),
            );
            let dir = dir.to_path_buf();
            let model = models[i % models.len()].to_string();
            std::thread::spawn(move || {
                let cache = Cache::open(&dir).expect("open");
                let k = key(&model);
                barrier.wait();
                let got = cache
                    .get_or_measure(&k, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(MEASURE_TIME);
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(fingerprint(i as u32))
                    })
                    .expect("get_or_measure");
                assert!(got.warnings.is_empty(), "{:?}", got.warnings);
                (model, got.source, got.fingerprint)
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    // Every caller of one model got the one measurement.
    for model in models {
        let digests: Vec<&str> = results
            .iter()
            .filter(|(m, _, _)| m == model)
            .map(|(_, _, f)| f.digest.as_str())
            .collect();
        assert!(
            digests.windows(2).all(|w| w[0] == w[1]),
            "{model}: {digests:?}"
        );
    }
    let sources = results.into_iter().map(|(_, s, _)| s).collect();
    (
        calls.load(Ordering::SeqCst),
        peak.load(Ordering::SeqCst),
        sources,
    )
}

#[test]
fn eight_threads_one_key_measure_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (calls, _, sources) = race_threads(tmp.path(), &["Haswell-noTSX"], 8);
    assert_eq!(calls, 1);
    assert_eq!(
        sources.iter().filter(|s| **s == Source::Measured).count(),
        1
    );
    assert_eq!(sources.iter().filter(|s| **s == Source::Hit).count(), 7);
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
    assert_eq!(
        Cache::open(tmp.path())
            .expect("open")
            .list()
            .expect("list")
            .len(),
        1
    );
}

#[test]
fn two_keys_measure_twice_and_in_parallel() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let (calls, peak, sources) = race_threads(tmp.path(), &["EPYC", "Nehalem"], 8);
    assert_eq!(calls, 2);
    assert_eq!(
        sources.iter().filter(|s| **s == Source::Measured).count(),
        2
    );
    assert_eq!(peak, 2, "different keys must not wait for each other");
    assert!(
        started.elapsed() < MEASURE_TIME * 2,
        "took {:?}",
        started.elapsed()
    );
    assert!(leftovers(tmp.path()).is_empty());
    assert_eq!(
        Cache::open(tmp.path())
            .expect("open")
            .clear()
            .expect("clear"),
        2
    );
}

/// The helper of `processes_measure_once_per_key` (see the module comment): waits for the go
/// file, then asks for `$CPUGUARD_CACHE_TEST_MODEL`, logging each measurement as a line in
/// `measurements.log`.
fn process_helper() {
    let (Some(dir), Some(model), Some(go)) = (
        std::env::var_os(ENV_DIR),
        std::env::var(ENV_MODEL).ok(),
        std::env::var_os(ENV_GO),
    ) else {
        panic!("helper mode needs {ENV_DIR}, {ENV_MODEL} and {ENV_GO}");
    };
    let dir = PathBuf::from(dir);
    let go = PathBuf::from(go);
    let cache = Cache::open(&dir.join("cache")).expect("open");
    let k = key(&model);
    fs::write(dir.join(format!("ready.{}", std::process::id())), b"").expect("ready file");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !go.exists() {
        assert!(Instant::now() < deadline, "no go signal");
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = cache
        .get_or_measure(&k, || {
            let mut log = OpenOptions::new()
                .append(true)
                .create(true)
                .open(dir.join("measurements.log"))?;
            // One write(2) per line: with O_APPEND it cannot interleave with another
            // process's line (writeln! may split a line over several writes).
            log.write_all(format!("{model} {}\n", std::process::id()).as_bytes())?;
            std::thread::sleep(MEASURE_TIME);
            Ok::<_, std::io::Error>(fingerprint(std::process::id()))
        })
        .expect("get_or_measure");
    println!(
        "RESULT {model} {} {}",
        match got.source {
            Source::Hit => "hit",
            Source::Measured => "measured",
        },
        got.fingerprint.digest
    );
}

#[test]
fn processes_measure_once_per_key() {
    if std::env::var(ENV_ROLE).is_ok_and(|role| role == "process_helper") {
        return process_helper();
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let go = tmp.path().join("go");
    let models = ["EPYC", "EPYC", "EPYC", "Nehalem", "Nehalem", "Nehalem"];
    let children: Vec<_> = models
        .iter()
        .map(|model| {
            Command::new(&exe)
                .args(["--exact", "processes_measure_once_per_key", "--nocapture"])
                .env(ENV_ROLE, "process_helper")
                .env(ENV_DIR, tmp.path())
                .env(ENV_MODEL, model)
                .env(ENV_GO, &go)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn helper")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = fs::read_dir(tmp.path())
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .map(|e| e.file_name().to_string_lossy().starts_with("ready."))
                    .unwrap_or(false)
            })
            .count();
        if ready == models.len() {
            break;
        }
        assert!(Instant::now() < deadline, "helpers not ready: {ready}");
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::write(&go, b"").expect("go");
    let mut results = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("wait helper");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "helper failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("helper printed no result: {stdout}"))
            .to_string();
        let fields: Vec<String> = line.split(' ').map(str::to_string).collect();
        assert_eq!(fields.len(), 3, "{line}");
        results.push(fields);
    }
    let log = fs::read_to_string(tmp.path().join("measurements.log")).expect("log");
    let mut measured: Vec<&str> = log
        .lines()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    measured.sort();
    assert_eq!(
        measured,
        vec!["EPYC", "Nehalem"],
        "one probe per configuration"
    );
    for model in ["EPYC", "Nehalem"] {
        let mine: Vec<&Vec<String>> = results.iter().filter(|r| r[0] == model).collect();
        assert_eq!(mine.len(), 3);
        assert_eq!(mine.iter().filter(|r| r[1] == "measured").count(), 1);
        assert!(mine.iter().all(|r| r[2] == mine[0][2]), "{mine:?}");
    }
    assert!(leftovers(&tmp.path().join("cache")).is_empty());
}

/// The helper of `read_only_cache_directory`: runs inside a private mount namespace, opens the
/// cache, then makes `$CPUGUARD_CACHE_TEST_DIR` a read-only bind mount (as a full or remounted
/// file system would be) and checks every operation.
fn read_only_helper() {
    let dir = PathBuf::from(std::env::var_os(ENV_DIR).expect("helper mode needs the dir"));
    let cache = Cache::open(&dir).expect("open while writable");
    for args in [
        vec!["--bind".into(), dir.clone(), dir.clone()],
        vec!["-o".into(), "remount,bind,ro".into(), dir.clone()],
    ] {
        let status = Command::new("mount").args(&args).status().expect("mount");
        assert!(status.success(), "mount {args:?}");
    }

    let err = Cache::open(&dir).expect_err("read-only directory accepted");
    assert!(matches!(err, CacheError::NotWritable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cache directory {}: not writable", dir.display())),
        "{msg}"
    );
    let err = Cache::open(&dir.join("sub")).expect_err("directory created on a read-only mount");
    assert!(
        matches!(err, CacheError::CreateDir { .. }) && err.to_string().contains("sub"),
        "{err}"
    );

    // The entry stored before still answers.
    let hit = cache
        .get_or_measure(&key("EPYC"), || -> Result<Fingerprint, std::io::Error> {
            panic!("a hit must not measure")
        })
        .expect("hit on a read-only cache");
    assert_eq!(hit.source, Source::Hit);

    // A miss cannot lock: a clear error, or a measurement without the cache.
    let err = cache
        .get_or_measure(&key("Nehalem"), || Ok::<_, std::io::Error>(fingerprint(1)))
        .expect_err("locked a read-only directory");
    assert!(matches!(err, CacheError::Lock { .. }), "{err}");
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
    let got = cache
        .get_or_measure_or_bypass(&key("Nehalem"), || Ok::<_, std::io::Error>(fingerprint(2)))
        .expect("bypass");
    assert_eq!(
        (got.source, got.fingerprint),
        (Source::Measured, fingerprint(2))
    );
    assert!(
        matches!(got.warnings.as_slice(), [CacheWarning::Bypassed { .. }]),
        "{:?}",
        got.warnings
    );
    println!("RO-CHECKED");
}

#[test]
fn read_only_cache_directory() {
    if std::env::var(ENV_ROLE).is_ok_and(|role| role == "read_only_helper") {
        return read_only_helper();
    }
    // A read-only bind mount in a private mount namespace.
    if !gate::require(&[Need::Root, Need::Tool("unshare")]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cache");
    let cache = Cache::open(&dir).expect("open");
    cache
        .get_or_measure(&key("EPYC"), || Ok::<_, std::io::Error>(fingerprint(7)))
        .expect("seed an entry");
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new("/usr/bin/unshare")
        .args(["-m", "--propagation", "private", "--"])
        .arg(&exe)
        .args(["--exact", "read_only_cache_directory", "--nocapture"])
        .env(ENV_ROLE, "read_only_helper")
        .env(ENV_DIR, &dir)
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let no_namespace = (!out.status.success() && stderr.contains("unshare failed"))
        .then(|| stderr.trim().to_string());
    if !gate::require(&[Need::MountNamespace(no_namespace)]) {
        return;
    }
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("RO-CHECKED"), "{stdout}");
    // Outside the namespace the directory stays writable, and the bypassed measurement was not
    // stored.
    let got = cache
        .get_or_measure(&key("Nehalem"), || Ok::<_, std::io::Error>(fingerprint(3)))
        .expect("measure");
    assert_eq!(
        (got.source, got.fingerprint),
        (Source::Measured, fingerprint(3))
    );
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
}
