//! The security review's attacks (issue 12, `../shared/notes/security-review/repro-*.sh`), each
//! performed against the built `cpuguard` binary with real QEMU (TCG) and, for the audit trail,
//! the test bed's real rsyslogd; each test asserts the defence.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cpuguard::fingerprint::Fingerprint;

#[path = "support/operator.rs"]
mod operator;
use operator::{
    bind_stamps, cpu_option_wrapper, cpuguard, host_config, namespaced_stamp, scratch_dir, BIN,
};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const UUID: &str = "06c0c0dc-1080-4d3f-bdac-967d624c94f9";
const OTHER_UUID: &str = "aaaaaaaa-0000-0000-0000-000000000000";
const CPU: &str =
    "<cpu mode='custom' match='exact'><model fallback='forbid'>Haswell-noTSX</model></cpu>";
const NOBODY: u32 = 65534;

/// A domain XML whose stamps (if any) are bound to it, as a current source writes them.
fn domain(name: &str, uuid: &str, emulator: &str, metadata: &str) -> String {
    bind_stamps(format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <metadata>{metadata}</metadata><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>{CPU}\
         <devices><emulator>{emulator}</emulator></devices></domain>"
    ))
}

fn root_only() -> bool {
    gate::require(&[Need::Root, Need::Qemu("x86_64")])
}

/// A stamp holding what `config`'s host measures for the domain (as the source's hook would
/// write it), for a domain whose emulator is `emulator`.
fn stamp_from(config: &Path, emulator: &str, dir: &Path, host: &str) -> String {
    let plain = dir.join("plain.xml");
    fs::write(&plain, domain("web1", UUID, emulator, "")).expect("write");
    let (code, out, err) = cpuguard(
        config,
        &["probe", "--xml", plain.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    let fp = Fingerprint::from_json(&out, "probe").expect("fingerprint");
    namespaced_stamp(host, &fp.digest, CPU, &fp.raw().to_text())
}

/// `cpuguard hook qemu ARGS` with `config`, stdin fed from a thread; killed if it outlives
/// `limit` (a hang is what some attacks aim for), and killed on drop whatever happens.
struct Hook {
    child: Child,
}

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct HookOut {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Wall time of the whole call, for the tests whose attack is a hang.
    #[allow(dead_code)]
    elapsed: Duration,
}

fn hook(config: &Path, args: &[&str], stdin: &[u8], limit: Duration) -> HookOut {
    let started = Instant::now();
    let mut hook = Hook {
        child: Command::new(BIN)
            .env("CPUGUARD_CONFIG", config)
            .arg("hook")
            .arg("qemu")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cpuguard"),
    };
    let mut input = hook.child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out_pipe = hook.child.stdout.take().expect("stdout");
    let mut err_pipe = hook.child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let code = loop {
        if let Some(status) = hook.child.try_wait().expect("wait") {
            break status.code();
        }
        assert!(
            started.elapsed() < limit,
            "cpuguard hook {args:?} still running after {limit:?}: it hangs"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let _ = writer.join();
    HookOut {
        code,
        stdout: String::from_utf8_lossy(&out_reader.join().expect("stdout")).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().expect("stderr")).into_owned(),
        elapsed,
    }
}

const LIMIT: Duration = Duration::from_secs(60);

fn incoming_dir(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("{host}-run/incoming"))
}

fn record_file(dir: &Path, host: &str, name: &str) -> PathBuf {
    cpuguard::incoming::record_path(&dir.join(format!("{host}-run")), name)
}

// --- 3. the runtime directory ------------------------------------------------------------------

/// repro-05, first step: a runtime directory owned by `nobody`, mode 0777, was accepted.
#[test]
fn runtime_dir_owned_by_another_user_is_refused() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    let run = dir.path().join("dst-run");
    fs::create_dir_all(run.join("incoming")).expect("mkdir");
    for d in [run.clone(), run.join("incoming")] {
        nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(NOBODY)), None).expect("chown");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let xml = domain("web1", UUID, QEMU, "");
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    assert!(
        out.stderr.starts_with(&format!(
            "cpuguard: refusing incoming migration of web1: runtime directory {}: owned by uid 65534",
            run.display()
        )),
        "{}",
        out.stderr
    );
}

/// A root-owned runtime directory that others could write to is narrowed, and what it held
/// (possibly planted) is discarded.
#[test]
fn too_open_runtime_dir_is_narrowed_and_emptied() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    let xml = domain("web1", UUID, QEMU, "");
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let incoming = incoming_dir(dir.path(), "dst");
    fs::set_permissions(&incoming, fs::Permissions::from_mode(0o777)).expect("chmod");
    // The record that was there may have been replaced by anyone: a normal start of web1 (no
    // stamp) is not judged on it.
    let out = hook(
        &config,
        &["web1", "prepare", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mode = fs::metadata(&incoming).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(fs::read_dir(&incoming).expect("dir").count(), 0);
}

/// repro-05, second step: deleting the record turned an incoming migration into an unchecked
/// start. The prepare-phase XML of a running guest carries its stamp (live metadata only), so
/// without the record it is still judged, and a destination that loses avx2 refuses it.
#[test]
fn deleted_record_does_not_let_a_stamped_guest_through_unchecked() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let wrapper = cpu_option_wrapper(dir.path(), "qemu-no-avx2", QEMU, "avx2=off");
    let dst = host_config(dir.path(), "dst", &wrapper);
    // The source measured the full CPU: its stamp comes from a probe through plain QEMU.
    let full = host_config(dir.path(), "full", QEMU);
    let stamp = stamp_from(&full, QEMU, dir.path(), "hv-src");
    let xml = domain("web1", UUID, &wrapper, &stamp);

    let out = hook(
        &dst,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let record = record_file(dir.path(), "dst", "web1");
    assert!(record.exists());
    fs::remove_file(&record).expect("the attacker deletes the record");

    let out = hook(
        &dst,
        &["web1", "prepare", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("cpuguard: refusing incoming guest of web1: the guest CPU would change"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("lost: avx2"), "{}", out.stderr);

    // An ordinary start of a definition (no stamp: libvirt keeps it in live metadata only)
    // is still a normal start.
    let cold = domain("web1", UUID, &wrapper, "");
    let out = hook(
        &dst,
        &["web1", "prepare", "begin", "-"],
        cold.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// repro-05, last steps: a FIFO at a record path hung every start of that name and the migrate
/// phase of every domain (the sweep read every record).
#[test]
fn a_fifo_at_a_record_path_hangs_nothing() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    let xml = domain("web1", UUID, QEMU, "");
    // The migrate phase creates the directory; then a FIFO replaces web1's record.
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let record = record_file(dir.path(), "dst", "web1");
    fs::remove_file(&record).expect("rm");
    nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");

    let quick = Duration::from_secs(10);
    let out = hook(
        &config,
        &["web1", "prepare", "begin", "-"],
        xml.as_bytes(),
        quick,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("is not a regular file (a FIFO)"),
        "{}",
        out.stderr
    );

    nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
    let other = domain("db2", OTHER_UUID, QEMU, "");
    let out = hook(
        &config,
        &["db2", "migrate", "begin", "-"],
        other.as_bytes(),
        quick,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!record.exists(), "the sweep removed the FIFO");
}

/// `incoming_ttl_secs = 0` failed open (every record expired at once); below the minimum is a
/// configuration error now, which stops incoming migrations with the file and key named.
#[test]
fn incoming_ttl_below_the_minimum_is_a_configuration_error() {
    let dir = scratch_dir();
    let config = dir.path().join("c.toml");
    fs::write(
        &config,
        format!(
            "runtime_dir = \"{}\"\nincoming_ttl_secs = 0\n",
            dir.path().join("run").display()
        ),
    )
    .expect("write");
    let (code, _, err) = cpuguard(&config, &["config"], None);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!(
            "{}: incoming_ttl_secs: must be at least 60",
            config.display()
        )),
        "{err}"
    );
    let xml = domain("web1", UUID, QEMU, "");
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("incoming_ttl_secs"), "{}", out.stderr);
}

// --- 4. leftover records -----------------------------------------------------------------------

/// repro-06: a record left by a migration that failed after `migrate begin` made the next
/// ordinary start of another domain with that name refused. Records are matched by UUID.
#[test]
fn a_leftover_record_does_not_refuse_another_domain_of_that_name() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    let incoming = domain("web1", UUID, QEMU, "");
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        incoming.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // The migration fails here; another web1 (another UUID, no stamp) is started.
    let other = domain("web1", OTHER_UUID, QEMU, "");
    let out = hook(
        &config,
        &["web1", "prepare", "begin", "-"],
        other.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!record_file(dir.path(), "dst", "web1").exists(), "consumed");

    // The record's own domain is still judged (unstamped: refused by the default policy).
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        incoming.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = hook(
        &config,
        &["web1", "prepare", "begin", "-"],
        incoming.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.starts_with(
            "cpuguard: refusing incoming migration of web1: the source left no cpuguard stamp"
        ),
        "{}",
        out.stderr
    );
}

// --- 5. cache entries --------------------------------------------------------------------------

/// repro-07: an entry owned by `nobody`, mode 0666, holding the source's fingerprint under the
/// destination's key let an avx2-losing migration through; a too-open cache directory was
/// narrowed keeping what it held.
#[test]
fn cache_entries_others_could_write_are_never_trusted() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let wrapper = cpu_option_wrapper(dir.path(), "qemu-no-avx2", QEMU, "avx2=off");
    let full = host_config(dir.path(), "full", QEMU);
    let dst = host_config(dir.path(), "dst", &wrapper);
    let stamp = stamp_from(&full, QEMU, dir.path(), "hv-src");
    let honest = dir.path().join("honest.xml");
    fs::write(&honest, domain("web1", UUID, &wrapper, &stamp)).expect("write");
    let honest = honest.to_str().expect("utf-8");

    // The destination's own, honest measurement: no-go.
    let cache = dir.path().join("dst-cache");
    fs::create_dir(&cache).expect("mkdir");
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o700)).expect("chmod");
    let (code, out, err) = cpuguard(&dst, &["check", honest], None);
    assert_eq!(code, Some(1), "{out}{err}");
    let entries: Vec<PathBuf> = fs::read_dir(&cache)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];

    // The attack: the source's fingerprint planted in the destination's entry.
    let source_fp = {
        let plain = dir.path().join("plain.xml");
        let (code, out, err) = cpuguard(
            &full,
            &["probe", "--cached", "--xml", plain.to_str().expect("utf-8")],
            None,
        );
        assert_eq!(code, Some(0), "{err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("json")
    };
    let plant = |mode: u32, owner: u32| {
        let mut stored: serde_json::Value =
            serde_json::from_slice(&fs::read(entry).expect("read")).expect("json");
        stored["fingerprint"] = source_fp.clone();
        fs::write(entry, serde_json::to_vec(&stored).expect("json")).expect("write");
        nix::unistd::chown(entry, Some(nix::unistd::Uid::from_raw(owner)), None).expect("chown");
        fs::set_permissions(entry, fs::Permissions::from_mode(mode)).expect("chmod");
    };

    // Owned by nobody, mode 0666: moved aside, measured again, still no-go.
    plant(0o666, NOBODY);
    let (code, out, err) = cpuguard(&dst, &["check", honest], None);
    assert_eq!(code, Some(1), "a planted entry was trusted: {out}{err}");
    assert!(out.contains("lost: avx2"), "{out}");
    assert!(
        cache
            .join(entry.file_name().expect("name"))
            .with_extension("corrupt")
            .exists(),
        "moved aside"
    );

    // Root-owned but world-writable: the same.
    plant(0o666, 0);
    let (code, out, err) = cpuguard(&dst, &["check", honest], None);
    assert_eq!(code, Some(1), "{out}{err}");

    // Root-owned, 0600, but the directory was 0777 while it was planted: narrowing the
    // directory quarantines it.
    plant(0o600, 0);
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).expect("chmod");
    let (code, out, err) = cpuguard(&dst, &["check", honest], None);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(
        fs::metadata(&cache).expect("meta").permissions().mode() & 0o777,
        0o700
    );

    // And the hook audits it: the prepare phase reports the discarded entry.
    plant(0o666, NOBODY);
    let xml = fs::read(honest).expect("read");
    let out = hook(&dst, &["web1", "migrate", "begin", "-"], &xml, LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = hook(&dst, &["web1", "prepare", "begin", "-"], &xml, LIMIT);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("lost: avx2"), "{}", out.stderr);
}

// --- 8. untrusted text on stderr ----------------------------------------------------------------

/// The refusal text printed the domain name raw: ESC sequences and CR reached the operator's
/// terminal through `virsh`. Escaped now as in syslog.
#[test]
fn names_on_stderr_are_escaped_as_in_syslog() {
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    let name = "web\u{1b}[2J\u{1b}[31mOK\rweb2";
    for (phase, xml) in [
        ("migrate", "<domain><name>x</name>".to_string()),
        ("migrate", "<nodomain/>".to_string()),
    ] {
        let out = hook(&config, &[name, phase, "begin", "-"], xml.as_bytes(), LIMIT);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(
            !out.stderr.contains('\u{1b}') && !out.stderr.contains('\r'),
            "raw control characters on stderr: {:?}",
            out.stderr
        );
        assert!(
            out.stderr.starts_with(
                "cpuguard: refusing incoming migration of \"web\\u{1b}[2J\\u{1b}[31mOK\\u{d}web2\": "
            ),
            "{:?}",
            out.stderr
        );
    }
    // An unknown operation's warning names it the same way.
    let out = hook(
        &config,
        &[name, "te\u{1b}]0;x\u{7}", "begin", "-"],
        b"",
        LIMIT,
    );
    assert_eq!(out.code, Some(0));
    assert!(
        !out.stderr.contains('\u{1b}') && !out.stderr.contains('\u{7}'),
        "{:?}",
        out.stderr
    );
}

// --- 1. audit lines reach syslog whatever their fields -----------------------------------------

/// The test bed's rsyslogd writes cpuguard's lines to this file (`testbed/bed.sh syslog-up`).
fn audit_log() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed/bed.sh");
    let out = Command::new(&script)
        .arg("audit-log")
        .output()
        .expect("testbed/bed.sh audit-log");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        Path::new("/dev/log").exists() && path.exists(),
        "no syslog daemon: run `testbed/bed.sh syslog-up` (testbed/run-tests.sh does)"
    );
    path
}

/// Waits (rsyslog writes asynchronously) for a line of `log` after byte `mark` with every field.
fn wait_audit(log: &Path, mark: u64, fields: &[&str]) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let bytes = fs::read(log).unwrap_or_default();
        let tail = String::from_utf8_lossy(bytes.get(mark as usize..).unwrap_or_default());
        if let Some(line) = tail.lines().find(|l| fields.iter().all(|f| l.contains(f))) {
            return Some(line.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// repro-02: a 300 KB stamp `host` attribute (or a long tag name in an error) made the syslog
/// datagram too large (EMSGSIZE) and the decision reached only stderr, which libvirt drops on
/// success. Fields are capped and marked; every line is found in the real syslog.
#[test]
fn oversized_audit_fields_still_reach_syslog() {
    if !root_only() {
        return;
    }
    let log = audit_log();
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    let unique = format!(
        "audit{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let huge_host = "h".repeat(300_000);
    let stamp = stamp_from(&config, QEMU, dir.path(), &huge_host);
    let xml = domain(&unique, UUID, QEMU, &stamp);
    let mark = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let out = hook(
        &config,
        &[&unique, "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = hook(
        &config,
        &[&unique, "prepare", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        !out.stderr.contains("audit:"),
        "the audit line fell back to stderr: {}",
        &out.stderr[..out.stderr.len().min(300)]
    );
    let domain_field = format!("domain={unique} ");
    let line = wait_audit(
        &log,
        mark,
        &[
            "phase=prepare action=allowed",
            &domain_field,
            "(cut from 300000 bytes)",
        ],
    )
    .expect("the allowed decision is in syslog");
    assert!(
        line.len() <= cpuguard::audit::LINE_CAP + 200,
        "{}",
        line.len()
    );

    // A refusal whose reason quotes a 300 KB tag name.
    let tag = "t".repeat(300_000);
    let bad = format!("<domain><{tag}></x></domain>");
    let name2 = format!("{unique}tag");
    let out = hook(
        &config,
        &[&name2, "migrate", "begin", "-"],
        bad.as_bytes(),
        LIMIT,
    );
    assert_eq!(
        out.code,
        Some(1),
        "{}",
        &out.stderr[..out.stderr.len().min(300)]
    );
    let domain_field = format!("domain={name2} ");
    wait_audit(
        &log,
        mark,
        &["phase=migrate action=refused", &domain_field, "cut from"],
    )
    .expect("the refusal is in syslog");
}

// --- 2. the stamp table and the difference output are bounded ---------------------------------

/// A stamp like [`stamp_from`]'s with `extra` lines appended to its table.
fn stamp_with_extra(config: &Path, dir: &Path, extra: &str) -> String {
    let plain = dir.join("plain.xml");
    fs::write(&plain, domain("web1", UUID, QEMU, "")).expect("write");
    let (code, out, err) = cpuguard(
        config,
        &["probe", "--cached", "--xml", plain.to_str().expect("utf-8")],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    let fp = Fingerprint::from_json(&out, "probe").expect("fingerprint");
    let table = format!("{}{extra}", fp.raw().to_text());
    namespaced_stamp("hv-src", &fp.digest, CPU, &table)
}

/// Leaves no CPU has, `count` of them, each with every register set: one difference per
/// register when compared.
/// Sub-leaves of leaf 0x1 the destination does not have: within the basic range every CPU
/// declares, so each one is compared (leaves outside a declared range are echoes, never compared).
fn bogus_leaves(count: u32) -> String {
    (0..count)
        .map(|i| {
            format!(
                "00000001 {:08x}: ffffffff ffffffff ffffffff ffffffff\n",
                0x100 + i
            )
        })
        .collect()
}

/// repro-04: a 15 MB stamp table cost the prepare hook ~4 s, ~600 MB and ~93 MB of stderr. Over
/// the documented limit the stamp is refused as malformed at once; within it, the refusal lists
/// at most MAX_DIFF_LINES differences.
#[test]
fn huge_stamp_tables_and_long_difference_lists_are_bounded() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);

    let huge = stamp_with_extra(&config, dir.path(), &bogus_leaves(300_000));
    assert!(huge.len() > 14_000_000);
    let xml = domain("web1", UUID, QEMU, &huge);
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = hook(
        &config,
        &["web1", "prepare", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.starts_with(
            "cpuguard: refusing incoming migration of web1: the source's cpuguard stamp is malformed: its table is "
        ) && out.stderr.contains(" bytes, over the 65536-byte limit"),
        "{}",
        &out.stderr[..out.stderr.len().min(400)]
    );
    assert!(
        out.stderr.len() < 4096,
        "{} bytes of stderr",
        out.stderr.len()
    );

    // 800 leaves the destination does not have: within the table limits, thousands of
    // differences, of which the message lists the first MAX_DIFF_LINES.
    let many = stamp_with_extra(&config, dir.path(), &bogus_leaves(800));
    let xml = domain("web1", UUID, QEMU, &many);
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = hook(
        &config,
        &["web1", "prepare", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    let limit = cpuguard::guard::MAX_DIFF_LINES;
    assert!(
        lines.len() <= limit + 4,
        "{} lines of stderr: {}",
        lines.len(),
        &out.stderr[..out.stderr.len().min(400)]
    );
    // Cut either by the line limit or within a folded line (equal raw values share one line).
    assert!(
        lines
            .iter()
            .any(|l| l.contains("more differences") || l.contains(" more: ")),
        "{}",
        &out.stderr[..out.stderr.len().min(2000)]
    );
}

// --- 7. the probe's QEMU is confined ------------------------------------------------------------

/// repro-09: the probe's QEMU ran as uid 0, unconfined, with the caller's whole environment. A
/// wrapper emulator reports who it runs as, its environment, limits and arguments, then execs
/// the real QEMU: the probe still measures, as libvirt's QEMU user under seccomp.
#[test]
fn probe_qemu_runs_as_libvirts_qemu_user_sandboxed_with_a_clean_environment() {
    if !root_only() {
        return;
    }
    let user = cpuguard::qemu::confine::this_host_qemu_user()
        .expect("libvirt's QEMU user exists (libvirt is installed)")
        .expect("root resolves a user");
    assert_ne!(user.uid, 0);
    let dir = scratch_dir();
    let report = dir.path().join("report");
    fs::create_dir(&report).expect("mkdir");
    nix::unistd::chown(&report, Some(nix::unistd::Uid::from_raw(user.uid)), None).expect("chown");
    let wrapper = dir.path().join("qemu-report");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nr={r}/$$\n{{ echo \"uid=$(id -u)\"; echo \"groups=$(id -G)\"; echo \"core=$(ulimit -c)\"; \
             echo \"nofile=$(ulimit -n)\"; echo \"fsize=$(ulimit -f)\"; env | sed 's/^/env:/'; \
             printf 'arg:%s\\n' \"$@\"; }} > \"$r\"\nexec {QEMU} \"$@\"\n",
            r = report.display()
        ),
    )
    .expect("wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let wrapper = wrapper.to_str().expect("utf-8");
    let config = host_config(dir.path(), "dst", wrapper);
    let xml = dir.path().join("d.xml");
    fs::write(&xml, domain("web1", UUID, wrapper, "")).expect("write");
    let out = Command::new(BIN)
        .env("CPUGUARD_CONFIG", &config)
        .env("CPUGUARD_CANARY", "secret-from-the-caller")
        .args(["probe", "--xml", xml.to_str().expect("utf-8")])
        .output()
        .expect("run cpuguard probe");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Fingerprint::from_json(&String::from_utf8_lossy(&out.stdout), "probe").expect("measured");

    let reports: Vec<String> = fs::read_dir(&report)
        .expect("dir")
        .flatten()
        .map(|e| fs::read_to_string(e.path()).expect("report"))
        .collect();
    // `--version` and the probe itself.
    assert_eq!(reports.len(), 2, "{reports:?}");
    let probe = reports
        .iter()
        .find(|r| r.contains("arg:-bios"))
        .expect("the probe run");
    assert!(probe.contains(&format!("uid={}\n", user.uid)), "{probe}");
    assert!(probe.contains("core=0\n"), "{probe}");
    assert!(probe.contains("nofile=1024\n"), "{probe}");
    assert!(
        probe.contains(&format!(
            "arg:-sandbox\narg:{}\n",
            cpuguard::qemu::confine::SANDBOX
        )),
        "{probe}"
    );
    assert_eq!(
        cpuguard::qemu::confine::SANDBOX,
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    );
    for report in &reports {
        assert!(!report.contains("uid=0\n"), "{report}");
        assert!(!report.contains("CPUGUARD_CANARY"), "{report}");
        let env: Vec<&str> = report
            .lines()
            .filter_map(|l| l.strip_prefix("env:"))
            // What bash itself sets.
            .filter(|l| !["PWD=", "SHLVL=", "_="].iter().any(|p| l.starts_with(p)))
            .collect();
        assert_eq!(env, ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "{report}");
    }
}

/// repro-09 (p15): `<feature name='start-powered-off'/>` is a QEMU CPU property, not a CPU
/// feature, and was passed to QEMU as one. Only libvirt's CPU feature names are accepted.
#[test]
fn only_libvirt_cpu_feature_names_reach_the_probe() {
    if !root_only() {
        return;
    }
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    for (feature, refused) in [
        ("start-powered-off", true),
        ("x-force-features", true),
        ("avx2", false),
        ("tsc_adjust", false),
    ] {
        let xml = dir.path().join("f.xml");
        fs::write(
            &xml,
            format!(
                "<domain type='qemu'><name>f</name><vcpu>1</vcpu>\
                 <os><type arch='x86_64' machine='pc'>hvm</type></os>\
                 <cpu mode='custom'><model>Haswell-noTSX</model><feature policy='disable' name='{feature}'/></cpu>\
                 <devices><emulator>{QEMU}</emulator></devices></domain>"
            ),
        )
        .expect("write");
        let (code, _, err) = cpuguard(
            &config,
            &["probe", "--xml", xml.to_str().expect("utf-8")],
            None,
        );
        if refused {
            assert_eq!(code, Some(2), "{feature}: {err}");
            assert!(
                err.contains(&format!(
                    "domain CPU <feature name={feature:?}> is not one of libvirt's CPU feature names"
                )),
                "{feature}: {err}"
            );
            assert!(err.lines().next().unwrap_or("").contains(feature), "{err}");
        } else {
            assert_eq!(code, Some(0), "{feature}: {err}");
        }
    }
}

// --- 9. <qemu:commandline> touching the CPU ------------------------------------------------------

fn with_commandline(args: &[&str]) -> String {
    let args: String = args
        .iter()
        .map(|a| format!("<qemu:arg value='{a}'/>"))
        .collect();
    domain("web1", UUID, QEMU, "").replace(
        "</domain>",
        &format!(
            "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>{args}</qemu:commandline></domain>"
        ),
    )
}

/// `<qemu:commandline>` arguments that change the guest CPU (`-cpu`, `-global` on the CPU) are
/// invisible to the stamp and to this host's measurement: refused by default, allowed (and
/// audited) only by `policy.qemu_commandline_cpu = "allow"`.
#[test]
fn qemu_commandline_cpu_arguments_are_refused_by_default() {
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    for args in [
        &["-cpu", "host"][..],
        &["-global", "Haswell-noTSX-x86_64-cpu.avx2=off"][..],
        &["-global", "driver=host-x86_64-cpu,property=pmu,value=on"][..],
        &["-device", "Haswell-noTSX-x86_64-cpu,socket-id=1"][..],
        &["-overcommit", "cpu-pm=on"][..],
    ] {
        let xml = with_commandline(args);
        for phase in ["migrate", "restore"] {
            let out = hook(
                &config,
                &["web1", phase, "begin", "-"],
                xml.as_bytes(),
                LIMIT,
            );
            assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
            assert!(out.stdout.is_empty());
            assert!(
                out.stderr
                    .contains("<qemu:commandline> changes the guest CPU")
                    && out.stderr.contains(args[0])
                    && out
                        .stderr
                        .contains("policy.qemu_commandline_cpu = \"allow\""),
                "{args:?}: {}",
                out.stderr
            );
        }
    }
    // Arguments that do not touch the CPU pass.
    let xml = with_commandline(&["-device", "virtio-rng-pci"]);
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // The policy key lets them through (the audit line says so; the verdict goes on).
    let mut text = fs::read_to_string(&config).expect("read");
    text.push_str("[policy]\nqemu_commandline_cpu = \"allow\"\n");
    fs::write(&config, text).expect("write");
    let xml = with_commandline(&["-cpu", "host"]);
    let out = hook(
        &config,
        &["web1", "migrate", "begin", "-"],
        xml.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

// --- 6. parsing stays linear -----------------------------------------------------------------------

/// repro-08: 40,000 namespace declarations on one element, or 400,000 nested elements each
/// declaring one, made the migrate phase quadratic (seconds to over a minute). The parser's
/// bounds (attributes per element, namespaces in scope, depth) refuse them with a one-line
/// reason; `cargo bench --bench hostile_xml` times the worst inputs the bounds still accept.
#[test]
fn quadratic_parsing_inputs_are_refused_by_the_parsers_bounds() {
    let dir = scratch_dir();
    let config = host_config(dir.path(), "dst", QEMU);
    let base = domain("big", UUID, QEMU, "");
    let decls: String = (0..40_000)
        .map(|i| format!("xmlns:p{i:06}=\"u\" "))
        .collect();
    let many_ns = base.replace(
        "<metadata></metadata>",
        &format!("<metadata><m:x xmlns:m=\"urn:m\" {decls}/></metadata>"),
    );
    let n = 400_000;
    let deep = base.replace(
        "<metadata></metadata>",
        &format!(
            "<metadata>{}{}</metadata>",
            "<a xmlns:q='urn:x'>".repeat(n),
            "</a>".repeat(n)
        ),
    );
    let attrs: String = (0..40_000).map(|i| format!(" a{i}=\"\"")).collect();
    let many_attrs = base.replace(
        "<metadata></metadata>",
        &format!("<metadata><m:x xmlns:m=\"urn:m\"{attrs}/></metadata>"),
    );
    for (xml, reason) in [
        (many_ns, "attributes at byte"),
        (deep, "namespace declarations in scope at byte"),
        (many_attrs, "more than 128 attributes"),
    ] {
        for phase in ["migrate", "restore"] {
            let out = hook(
                &config,
                &["big", phase, "begin", "-"],
                xml.as_bytes(),
                LIMIT,
            );
            assert_eq!(out.code, Some(1), "{}", out.stderr);
            // One line (audit lines follow only when syslog is down).
            let first = out.stderr.lines().next().unwrap_or("");
            assert!(first.contains(reason), "{}", out.stderr);
        }
    }
    // Nesting beyond libxml2's (and so libvirt's) 256 levels, without any declaration.
    let deep = base.replace(
        "<metadata></metadata>",
        &format!(
            "<metadata>{}{}</metadata>",
            "<a>".repeat(300),
            "</a>".repeat(300)
        ),
    );
    let out = hook(
        &config,
        &["big", "migrate", "begin", "-"],
        deep.as_bytes(),
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("deeper than 256"), "{}", out.stderr);
}
