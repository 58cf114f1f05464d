//! What cpuguard adds to a live migration: the same `virsh migrate --live` between the bed's two
//! libvirt hosts without the hook, with the hook and a cold fingerprint cache on the destination,
//! and with a warm one, in one run (TCG guests, 64 MiB).
//!
//! Run as root: `cargo bench --bench migration` (optionally `-- ROUNDS`, default 5). Brings the
//! test bed up and takes it down again.

#[path = "../tests/support/bed.rs"]
mod bed;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use bed::{Bed, Host};

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

fn timed_migration(bed: &Bed, name: &str, from: Host) -> Duration {
    let start = Instant::now();
    let run = bed.migrate(name, from);
    let took = start.elapsed();
    assert!(run.success, "migration of {name} failed: {}", run.stderr);
    took
}

fn clear_cache(bed: &Bed, host: Host) {
    let h = if host == Host::A { "a" } else { "b" };
    let dir = bed.state_dir().join(h).join("cpuguard-cache");
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let Some(mut bed) = Bed::up() else {
        eprintln!("migration bench: the test bed is not available (needs root, libvirt, QEMU)");
        return;
    };
    let cpuguard = Path::new(env!("CARGO_BIN_EXE_cpuguard"));
    let name = "bench-mig";
    bed.define_guest(name, None);
    bed.virsh(Host::A, &["start", name]).ok();

    // Without cpuguard: no hook on either host.
    let mut without = Vec::new();
    let mut from = Host::A;
    for _ in 0..rounds {
        without.push(timed_migration(&bed, name, from));
        from = from.other();
    }
    // Back to A, then install cpuguard (restarts libvirtd; the VM keeps running) and stamp it.
    if from == Host::B {
        timed_migration(&bed, name, Host::B);
    }
    bed.install_hook(cpuguard);
    let stamp = bed::bed_sh(&["exec-a", &cpuguard.to_string_lossy(), "stamp", name]);
    assert!(stamp.success, "stamp failed: {}", stamp.stderr);

    // Cold: the destination's cache is emptied before each migration.
    let mut cold = Vec::new();
    from = Host::A;
    for _ in 0..rounds {
        clear_cache(&bed, from.other());
        cold.push(timed_migration(&bed, name, from));
        from = from.other();
    }
    // Warm: both hosts have measured this configuration (the loop above left them so).
    let mut warm = Vec::new();
    for _ in 0..rounds {
        warm.push(timed_migration(&bed, name, from));
        from = from.other();
    }
    let (w, c, h) = (
        median_ms(&mut without),
        median_ms(&mut cold),
        median_ms(&mut warm),
    );
    println!("live migration of a 64 MiB TCG guest between the bed's two libvirt hosts, {rounds} each (median ms)");
    println!("  without cpuguard:               {w:>8.1}");
    println!(
        "  with cpuguard, cold cache:      {c:>8.1}  (+{:.1})",
        c - w
    );
    println!(
        "  with cpuguard, warm cache:      {h:>8.1}  (+{:.1})",
        h - w
    );
    drop(bed);
}
