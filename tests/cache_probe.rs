//! The cache in front of the real probe (TCG): the first request probes, the next is a hit that
//! returns the same fingerprint, much faster; a corrupted entry is probed again.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cpuguard::cache::{Cache, CacheKey, CacheWarning, Source};
use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::fingerprint::{Fingerprint, HostFacts};
use cpuguard::qemu::emulator::check_emulator;
use cpuguard::qemu::emulator_version;
use cpuguard::x86_64::probe::{probe, ProbeError, ProbeOptions};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

#[test]
fn probe_once_then_hit() {
    if !gate::require(&[Need::Qemu("x86_64")]) {
        return;
    }
    let xml = std::fs::read_to_string("tests/fixtures/domains/tcg-haswell-features.xml")
        .expect("fixture");
    let config = GuestCpuConfig::from_domain_xml(&xml).expect("fixture parses");
    let allowed = vec![PathBuf::from(QEMU)];
    let emulator = check_emulator(QEMU, &allowed).expect("installed qemu acceptable");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open(tmp.path()).expect("open");
    let identity = cache
        .emulator_identity(&emulator, || emulator_version(QEMU, &allowed))
        .expect("qemu --version");
    let version = identity.version.clone();
    assert!(version.contains("QEMU"), "{version}");
    let key = CacheKey::new(&config, Accel::Tcg, identity);
    // The warm path: the version comes from the record, QEMU is not started.
    let again = cache
        .emulator_identity(&emulator, || -> Result<String, ProbeError> {
            panic!("version asked twice")
        })
        .expect("recorded version");
    assert_eq!(CacheKey::new(&config, Accel::Tcg, again), key);
    let opts = ProbeOptions {
        timeout: Duration::from_secs(30),
        allowed_emulators: allowed,
        accel_override: Some(Accel::Tcg),
        ..ProbeOptions::default()
    };
    let measure = || -> Result<Fingerprint, ProbeError> {
        let table = probe(&config, &opts)?;
        let facts = HostFacts::of_this_host(&version, "tcg");
        let canonical = serde_json::to_value(&config).unwrap_or_default();
        Ok(Fingerprint::new(facts, canonical, table))
    };

    let started = Instant::now();
    let first = cache.get_or_measure(&key, measure).expect("probe");
    let probe_time = started.elapsed();
    assert_eq!(first.source, Source::Measured);
    assert!(
        first.fingerprint.x86_raw().map_or(0, |t| t.entries.len()) > 10,
        "a real table: {}",
        first.fingerprint.x86_raw().map_or(0, |t| t.entries.len())
    );

    let started = Instant::now();
    let second = cache
        .get_or_measure(&key, || -> Result<Fingerprint, ProbeError> {
            panic!("a hit must not probe")
        })
        .expect("hit");
    let hit_time = started.elapsed();
    assert_eq!(second.source, Source::Hit);
    assert_eq!(second.fingerprint, first.fingerprint);
    eprintln!("probe + store: {probe_time:?}; cache hit: {hit_time:?}");
    assert!(
        hit_time < probe_time,
        "hit {hit_time:?} not faster than probe {probe_time:?}"
    );

    // Corrupt the stored table: the next request probes again and gets the same digest.
    let entry = cache.entry_path(&key).expect("path");
    let text = std::fs::read_to_string(&entry).expect("entry");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("entry is JSON");
    value["fingerprint"]["raw"]["entries"][0]["eax"] = serde_json::json!(0x7fff_ffffu32);
    std::fs::write(&entry, value.to_string()).expect("corrupt");
    let third = cache.get_or_measure(&key, measure).expect("re-probe");
    assert_eq!(third.source, Source::Measured);
    assert!(matches!(
        third.warnings.as_slice(),
        [CacheWarning::Discarded { .. }]
    ));
    assert_eq!(third.fingerprint.digest, first.fingerprint.digest);
}
