//! What the live-vCPU cross-check adds to a stamp: the same stamp of a running bed guest
//! (`cpuguard::stamp::stamp_domain`, as `cpuguard-libvirt stamp --force` runs it) without the
//! check and with it, with the probe measured (cache emptied before each stamp) and with the
//! fingerprint cached, and the check alone (read the first vCPU through libvirt's QEMU monitor
//! passthrough, compare with the probe), in one run.
//!
//! Run as root: `CPUGUARD_BED_ID=N cargo bench --bench live_vcpu` (optionally `-- ROUNDS`,
//! default 7). Brings the test bed up (host A, TCG guest, 64 MiB) and takes it down again.

#[path = "../tests/support/bed.rs"]
mod bed;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bed::{Bed, Host};
use cpuguard::config::Config;
use cpuguard::fingerprint::Fingerprint;
use cpuguard::live_vcpu;
use cpuguard::stamp::{self, StampError};
use virt::domain::Domain;

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

/// The same check `cpuguard-libvirt` runs (src/bin/cpuguard-libvirt.rs).
fn live_check(dom: &Domain, name: &str, probe: &Fingerprint) -> Result<(), StampError> {
    let mut monitor = |command: &str| {
        dom.qemu_monitor_command(command, 0)
            .map_err(|e| e.to_string())
    };
    let live = live_vcpu::read(&mut monitor).map_err(|reason| StampError::LiveVcpuUnreadable {
        name: name.to_string(),
        reason,
    })?;
    let check = live_vcpu::compare(&live, probe, None);
    if check.agrees() {
        Ok(())
    } else {
        Err(StampError::LiveVcpu {
            name: name.to_string(),
            differences: check.differences,
        })
    }
}

fn no_check(_: &Domain, _: &str, _: &Fingerprint) -> Result<(), StampError> {
    Ok(())
}

fn empty(dir: &PathBuf) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(7);
    if let Some(at) = args.iter().position(|a| a == "--inner") {
        let label = args.get(at + 2).map(String::as_str).unwrap_or("");
        inner(rounds, label);
        return;
    }
    let Some(mut bed) = Bed::up() else {
        eprintln!("live_vcpu bench: the test bed is not available (needs root, libvirt, QEMU)");
        return;
    };
    bed.define_guest(NAME, None);
    let exe = std::env::current_exe().expect("this bench's path");
    let exe = exe.to_string_lossy();
    // The stamps run inside host A's namespaces, as the started hook's `cpuguard-libvirt` does
    // there: the probe's QEMU user comes from A's qemu.conf (the bed runs guests as root).
    let measure = |label: &str| {
        bed.virsh(Host::A, &["start", NAME]).ok();
        let run = bed::bed_sh(&["exec-a", &exe, "--inner", &rounds.to_string(), label]);
        print!("{}", run.stdout);
        assert!(
            run.success,
            "the measurement in host A failed: {}",
            run.stderr
        );
        bed.virsh(Host::A, &["destroy", NAME]).ok();
    };
    measure("libvirt's status files on disk (the bed's /run/libvirt)");
    // libvirt keeps running domains' status under /run/libvirt/qemu, a tmpfs on a real host
    // (this machine has none: the bed's /run/libvirt is a directory on disk). Mounted only in
    // A's namespace, gone with it; unmounted here as soon as the guest is stopped.
    bed::bed_sh(&[
        "exec-a",
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "mode=0700",
        "tmpfs",
        "/run/libvirt/qemu",
    ])
    .ok();
    measure("libvirt's status files on tmpfs (as on a real host)");
    let _ = bed::bed_sh(&["exec-a", "umount", "/run/libvirt/qemu"]);
}

const NAME: &str = "bench-live-vcpu";

fn inner(rounds: usize, label: &str) {
    let name = NAME;
    let work = tempfile::tempdir().expect("work dir");
    let mut config = Config {
        cache_dir: work.path().join("cache"),
        runtime_dir: work.path().join("run"),
        ..Config::default()
    };
    config.stamp.uri = Host::A.tcp_uri();
    config.stamp.key_file = work.path().join("no-fleet.key");
    config.probe.emulators = vec![PathBuf::from("/usr/bin/qemu-system-x86_64")];
    let conn = stamp::connect(&config.stamp.uri).expect("connect to host A");
    let dom = conn.lookup_domain_by_name(name).expect("bench domain");

    let stamp_once = |check: stamp::LiveCheck, clear: bool| {
        if clear {
            empty(&config.cache_dir);
        }
        let start = Instant::now();
        let result = stamp::stamp_domain(&conn, name, &config, true, check);
        let took = start.elapsed();
        match result {
            Ok(s) => assert_eq!(s.cached, !clear, "cache state of {name}"),
            Err(e) => panic!("stamp of {name}: {e}"),
        }
        took
    };
    // One untimed stamp: libvirt's first monitor passthrough marks the domain tainted, and the
    // first probe warms the page cache for QEMU.
    stamp_once(&live_check, true);

    let (mut measured_without, mut measured_with) = (Vec::new(), Vec::new());
    let (mut cached_without, mut cached_with) = (Vec::new(), Vec::new());
    let mut check_alone = Vec::new();
    let (mut one_command, mut one_call) = (Vec::new(), Vec::new());
    // The probe's fingerprint for the check alone (a cache hit).
    let probe = {
        let xml = dom.xml_desc(0).expect("live XML");
        let process = stamp::qemu_process(&dom, name).expect("QEMU process");
        cpuguard::measure::for_running_domain(&xml, &config, &process.exe_path())
            .expect("fingerprint")
            .fingerprint
    };
    for _ in 0..rounds {
        measured_without.push(stamp_once(&no_check, true));
        measured_with.push(stamp_once(&live_check, true));
        cached_without.push(stamp_once(&no_check, false));
        cached_with.push(stamp_once(&live_check, false));
        let start = Instant::now();
        live_check(&dom, name, &probe).expect("the bench guest agrees with its probe");
        check_alone.push(start.elapsed());
        let start = Instant::now();
        dom.qemu_monitor_command(r#"{"execute":"query-status"}"#, 0)
            .expect("query-status");
        one_command.push(start.elapsed());
        let start = Instant::now();
        dom.info().expect("domain info");
        one_call.push(start.elapsed());
    }
    let (mw, mc) = (
        median_ms(&mut measured_without),
        median_ms(&mut measured_with),
    );
    let (cw, cc) = (median_ms(&mut cached_without), median_ms(&mut cached_with));
    let alone = median_ms(&mut check_alone);
    println!("live-vCPU cross-check, {label}: {rounds} rounds, medians (TCG guest qemu64, 1 vCPU, 64 MiB, bed host A):");
    println!("  stamp, probe measured:  without check {mw:8.1} ms   with check {mc:8.1} ms   (+{:.1} ms)", mc - mw);
    println!("  stamp, cache hit:       without check {cw:8.1} ms   with check {cc:8.1} ms   (+{:.1} ms)", cc - cw);
    println!(
        "  one QMP command through libvirt (query-status): {:.2} ms; one libvirt call without a \
         monitor job (virDomainGetInfo): {:.2} ms",
        median_ms(&mut one_command),
        median_ms(&mut one_call)
    );
    // What libvirt does around each monitor command: a modify job whose start and end each
    // rewrite the domain's status XML with fsync, under /run/libvirt/qemu (tmpfs on a real host;
    // on the bed a directory on disk).
    let status = std::fs::read(format!("/run/libvirt/qemu/{name}.xml")).unwrap_or_default();
    let save = |dir: &str| {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let path = format!("{dir}/cpuguard-bench-status.xml");
            let start = Instant::now();
            let mut file = std::fs::File::create(&path).expect("status copy");
            std::io::Write::write_all(&mut file, &status).expect("write");
            file.sync_all().expect("fsync");
            samples.push(start.elapsed());
            let _ = std::fs::remove_file(&path);
        }
        median_ms(&mut samples)
    };
    println!(
        "  libvirt's status save ({} bytes, write + fsync): {:.2} ms in /run/libvirt/qemu, \
         {:.2} ms in /dev/shm (tmpfs)",
        status.len(),
        save("/run/libvirt/qemu"),
        save("/dev/shm")
    );
    println!("  the check alone (10 QMP commands through libvirt + compare): {alone:.2} ms (target: under 50 ms)");
}
