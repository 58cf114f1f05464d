//! The two-host libvirt test bed (testbed/bed.sh) driven from integration tests.
//!
//! Include it with `#[path = "support/bed.rs"] mod bed;`. One bed at a time: `Bed::up()` takes a
//! process-wide lock (cargo runs the tests of a binary in parallel threads) and an exclusive
//! `flock` on the bed's session lock file (other test binaries, other people's `cargo test` on the
//! same machine), held until the `Bed` is dropped. Dropping it (also while a failed test unwinds)
//! destroys and undefines the guests the test defined and takes the bed down.

// Each test binary uses a different subset of these helpers. (Declared here, so an including file
// must not repeat `#[allow(dead_code)]` on its `mod bed;`: clippy rejects the duplicate.)
#![allow(dead_code)]

#[path = "gate.rs"]
pub mod gate;
use gate::Need;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};
use std::time::{Duration, Instant};

static BED_LOCK: Mutex<()> = Mutex::new(());

/// How long an audit line may take to reach the audit file after the decision that wrote it
/// (rsyslogd writes asynchronously). A line that is there ends the wait at once; the bound only
/// ends a wait for a line that never comes (syslog gone), so it is generous, not a guess at this
/// machine's speed.
pub const AUDIT_WAIT: Duration = Duration::from_secs(60);

/// How long a running heartbeat guest may take to print its next line. It prints several a
/// second; under TCG on a loaded machine a guest can stall for seconds, and a found line ends
/// the wait at once, so the bound is generous.
pub const HEARTBEAT_WAIT: Duration = Duration::from_secs(60);

/// The bound on waiting for a guest's stamp, derived from the stamp process's own bounds: it
/// retries while libvirt finishes the start job (`stamp.retries` x `stamp.retry_interval_ms`),
/// then runs one probe bounded by `probe.timeout_secs`, and audits its failure when it gives up.
/// `Bed::wait_stamped` ends as soon as the stamp or that failure is seen; this bound, three times
/// the process's own, only catches a stamp process that died without a word.
pub fn stamp_wait() -> Duration {
    let config = cpuguard::config::Config::default();
    let retrying = Duration::from_millis(
        u64::from(config.stamp.retries).saturating_mul(config.stamp.retry_interval_ms),
    );
    3 * (retrying + Duration::from_secs(config.probe.timeout_secs))
}

/// Which bed this process drives (`CPUGUARD_BED_ID`, 0-99, default 0; see testbed/bed.sh):
/// several beds run side by side, each on its own loopback addresses and state directory.
pub fn bed_id() -> u8 {
    std::env::var("CPUGUARD_BED_ID")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|&id| id < 100)
        .unwrap_or(0)
}

/// A guest architecture of the bed (`bed.sh define-guest --arch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// testbed/guest.xml.in: `pc` machine, the x86 heartbeat on COM1.
    X86_64,
    /// testbed/guest-aarch64.xml.in: `virt` machine, the aarch64 heartbeat on the PL011.
    Aarch64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    A,
    B,
}

impl Host {
    fn virsh_subcommand(self) -> &'static str {
        match self {
            Host::A => "virsh-a",
            Host::B => "virsh-b",
        }
    }

    pub fn other(self) -> Host {
        match self {
            Host::A => Host::B,
            Host::B => Host::A,
        }
    }

    /// The host's loopback address in this bed (bed.sh `host_addr`).
    pub fn addr(self) -> String {
        let last = match self {
            Host::A => 1,
            Host::B => 2,
        };
        format!("127.0.{}.{last}", bed_id())
    }

    /// The host's libvirt as seen from the other host (and from any client on this machine).
    pub fn tcp_uri(self) -> String {
        format!("qemu+tcp://{}:16510/system", self.addr())
    }

    /// Where the host's QEMU listens for an incoming migration stream.
    pub fn migrate_uri(self) -> String {
        let port = match self {
            Host::A => 49153,
            Host::B => 49152,
        };
        format!("tcp://{}:{port}", self.addr())
    }
}

/// What a command printed, and whether it succeeded.
#[derive(Debug, Clone)]
pub struct Run {
    pub command: String,
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(command: String, output: Output) -> Run {
        Run {
            command,
            success: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// The stdout of a command that must have succeeded.
    pub fn ok(self) -> String {
        assert!(
            self.success,
            "`{}` failed ({:?}):\nstdout: {}\nstderr: {}",
            self.command, self.code, self.stdout, self.stderr
        );
        self.stdout
    }
}

pub fn bed_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed/bed.sh")
}

/// The bed needs root (daemons, mount namespaces), libvirt, rsyslog and both emulators: a
/// missing one skips the test saying so, or fails it under `CI=true` (tests/support/gate.rs).
pub fn prerequisites_met() -> bool {
    gate::require(&[
        Need::Root,
        Need::Libvirt,
        Need::Rsyslog,
        Need::Qemu("x86_64"),
        Need::Qemu("aarch64"),
    ])
}

/// Runs `testbed/bed.sh ARGS`, with the cpuguard binary under test available to it (it writes the
/// heartbeat firmware).
pub fn bed_sh(args: &[&str]) -> Run {
    let script = bed_script();
    let command = format!("{} {}", script.display(), args.join(" "));
    let output = Command::new(&script)
        .args(args)
        .env("CPUGUARD_BIN", env!("CARGO_BIN_EXE_cpuguard"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    Run::from_output(command, output)
}

/// The bed's state directory, as bed.sh computes it.
pub fn state_dir() -> PathBuf {
    std::env::var_os("CPUGUARD_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| match bed_id() {
            0 => PathBuf::from("/var/tmp/cpuguard-testbed"),
            id => PathBuf::from(format!("/var/tmp/cpuguard-testbed-{id}")),
        })
}

/// Blocks until no other process uses the bed (the lock is released when the file is closed,
/// also when a test process dies).
fn session_lock() -> Flock<fs::File> {
    let dir = state_dir();
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let path = dir.join(".session-lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("cannot lock {}: {e}", path.display()))
}

pub struct Bed {
    guests: Vec<String>,
    // Dropped after `drop` has taken the bed down (fields drop after Drop::drop).
    _session: Flock<fs::File>,
    _lock: MutexGuard<'static, ()>,
}

impl Bed {
    /// Brings the bed up (both hosts, syslog) without any hook installed. None when a
    /// prerequisite is missing outside CI (see `prerequisites_met`).
    pub fn up() -> Option<Bed> {
        // A test that panicked while holding the lock has already taken its bed down (Drop).
        let lock = BED_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !prerequisites_met() {
            return None;
        }
        let bed = Bed {
            guests: Vec::new(),
            _session: session_lock(),
            _lock: lock,
        };
        bed_sh(&["up"]).ok();
        // A previous test of this binary may have left a hook behind.
        bed_sh(&["uninstall-hook"]).ok();
        Some(bed)
    }

    pub fn install_hook(&self, binary: &Path) {
        let path = binary.to_string_lossy();
        bed_sh(&["install-hook", &path]).ok();
    }

    pub fn virsh(&self, host: Host, args: &[&str]) -> Run {
        let mut full = vec![host.virsh_subcommand()];
        full.extend_from_slice(args);
        bed_sh(&full)
    }

    /// Defines NAME on host A from testbed/guest.xml.in, with `cpu_xml` as its `<cpu>` element
    /// (the bed's default, qemu64 with check='partial', when None). The guest is destroyed and
    /// undefined on both hosts when the bed is dropped.
    pub fn define_guest(&mut self, name: &str, cpu_xml: Option<&str>) -> PathBuf {
        self.define_guest_arch(name, cpu_xml, Arch::X86_64)
    }

    /// Defines NAME on host A for `arch` (aarch64: from testbed/guest-aarch64.xml.in, the bed's
    /// default CPU cortex-a57 when `cpu_xml` is None). Cleaned up like `define_guest`.
    pub fn define_guest_arch(&mut self, name: &str, cpu_xml: Option<&str>, arch: Arch) -> PathBuf {
        self.define_guest_with(name, cpu_xml, &["--arch", arch.name()])
    }

    /// Defines NAME on host A as an x86_64 `<domain type='kvm'>` (the bed's guest under this
    /// machine's KVM; `bed.sh define-guest --virt-type kvm`). Cleaned up like `define_guest`.
    pub fn define_guest_kvm(&mut self, name: &str, cpu_xml: Option<&str>) -> PathBuf {
        self.define_guest_with(name, cpu_xml, &["--arch", "x86_64", "--virt-type", "kvm"])
    }

    fn define_guest_with(
        &mut self,
        name: &str,
        cpu_xml: Option<&str>,
        arch_args: &[&str],
    ) -> PathBuf {
        self.guests.push(name.to_string());
        let run = match cpu_xml {
            None => bed_sh(&[&["define-guest", name][..], arch_args].concat()),
            Some(xml) => {
                let file = self
                    .state_dir()
                    .join("guests")
                    .join(format!("{name}.cpu.xml"));
                fs::create_dir_all(file.parent().unwrap_or(Path::new("/")))
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", file.display()));
                fs::write(&file, xml)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
                let file = file.to_string_lossy();
                bed_sh(&[&["define-guest", name, &file][..], arch_args].concat())
            }
        };
        PathBuf::from(run.ok().trim())
    }

    /// `virsh migrate --live --persistent --undefinesource NAME` from `from` to the other host.
    pub fn migrate(&self, name: &str, from: Host) -> Run {
        let to = from.other();
        let (uri, migrate_uri) = (to.tcp_uri(), to.migrate_uri());
        self.virsh(
            from,
            &[
                "migrate",
                "--live",
                "--persistent",
                "--undefinesource",
                name,
                &uri,
                "--migrateuri",
                &migrate_uri,
            ],
        )
    }

    /// The domain's state on `host` ("running", "shut off", ...), or None if it is not defined
    /// there.
    pub fn domain_state(&self, host: Host, name: &str) -> Option<String> {
        let run = self.virsh(host, &["domstate", name]);
        if run.success {
            Some(run.stdout.trim().to_string())
        } else {
            None
        }
    }

    /// Waits until the live XML of NAME on `host` contains `needle`; returns the XML when it did.
    pub fn wait_live_xml(
        &self,
        host: Host,
        name: &str,
        needle: &str,
        timeout: Duration,
    ) -> Option<String> {
        let start = Instant::now();
        loop {
            let run = self.virsh(host, &["dumpxml", name]);
            if run.success && run.stdout.contains(needle) {
                return Some(run.stdout);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the stamp the `started` hook's detached process writes into NAME's live XML on
    /// `host`, and returns that XML. Fails at once, with the stamp process's audit line, when the
    /// process reports a failure (audit lines after `mark`); see `stamp_wait` for the bound.
    pub fn wait_stamped(&self, host: Host, name: &str, mark: u64) -> String {
        let bound = stamp_wait();
        let start = Instant::now();
        let domain = format!("domain={name}");
        loop {
            let run = self.virsh(host, &["dumpxml", name]);
            if run.success && run.stdout.contains(cpuguard::domain::metadata::STAMP_NS) {
                if start.elapsed() > Duration::from_secs(5) {
                    eprintln!(
                        "{name} was stamped {:?} after the wait began",
                        start.elapsed()
                    );
                }
                return run.stdout;
            }
            let lines = self.audit_lines_since(mark);
            let failed = lines.iter().find(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.contains(&"action=failed")
                    && words.contains(&domain.as_str())
                    && (words.contains(&"phase=stamp") || words.contains(&"phase=started"))
            });
            if let Some(line) = failed {
                panic!("stamping {name} on {host:?} failed: {line}");
            }
            assert!(
                start.elapsed() < bound,
                "{name} on {host:?} has no stamp after {:?} and its stamp process reported \
                 nothing; audit lines of it:\n{}",
                start.elapsed(),
                lines
                    .iter()
                    .filter(|l| l.contains(&domain))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        state_dir()
    }

    /// Writes `toml` as `host`'s cpuguard configuration (its hook reads it as
    /// /etc/cpuguard/cpuguard.toml at every call, so it takes effect at the next hook call).
    pub fn write_host_config(&self, host: Host, toml: &str) {
        let host_dir = match host {
            Host::A => "a",
            Host::B => "b",
        };
        let path = self
            .state_dir()
            .join(host_dir)
            .join("cpuguard-etc/cpuguard.toml");
        fs::write(&path, toml).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    pub fn serial_path(&self, name: &str) -> PathBuf {
        self.state_dir()
            .join("guests")
            .join(format!("{name}.serial"))
    }

    /// "heartbeat" when guests run cpuguard's heartbeat firmware, "hlt" for the placeholder.
    pub fn firmware_kind(&self) -> String {
        self.firmware_kind_of(Arch::X86_64)
    }

    /// "heartbeat" when `arch`'s guests run cpuguard's heartbeat firmware, else the placeholder's
    /// kind ("hlt" for x86_64, "wfi" for aarch64).
    pub fn firmware_kind_of(&self, arch: Arch) -> String {
        bed_sh(&["firmware-kind", "--arch", arch.name()])
            .ok()
            .trim()
            .to_string()
    }

    pub fn audit_log(&self) -> PathBuf {
        PathBuf::from(bed_sh(&["audit-log"]).ok().trim())
    }

    /// The current end of the audit file: lines after it are the ones this test caused.
    pub fn audit_mark(&self) -> u64 {
        fs::metadata(self.audit_log()).map(|m| m.len()).unwrap_or(0)
    }

    pub fn audit_lines_since(&self, mark: u64) -> Vec<String> {
        let path = self.audit_log();
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&path) {
            if file.seek(SeekFrom::Start(mark)).is_ok() {
                // rsyslog writes whole lines; a torn last line is simply read again next poll.
                let _ = file.read_to_string(&mut text);
            }
        }
        text.lines().map(str::to_string).collect()
    }

    /// Waits (rsyslog writes asynchronously) for an audit line after `mark` that has every one of
    /// `fields` (e.g. "phase=migrate", "domain=g1").
    pub fn wait_audit(&self, mark: u64, fields: &[&str], timeout: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            let found = self.audit_lines_since(mark).into_iter().find(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                fields.iter().all(|f| words.contains(f))
            });
            if found.is_some() || start.elapsed() > timeout {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Bed {
    /// A refused migration left the guest where it was: still running on A, nothing of it on B.
    pub fn assert_still_on_a(&self, name: &str) {
        assert_eq!(
            self.domain_state(Host::A, name).as_deref(),
            Some("running"),
            "{name} must keep running on A"
        );
        assert_eq!(
            self.domain_state(Host::B, name),
            None,
            "{name} must leave nothing on B"
        );
    }

    /// `run` (a `virsh migrate` to B) was refused before B's QEMU started: libvirt's own CPU
    /// check never ran, and the guest is still on A only.
    pub fn assert_refused_before_b_started(&self, name: &str, run: &Run) {
        assert!(!run.success, "the migration of {name} to B was not refused");
        assert!(
            !run.stderr.contains("guest CPU doesn't match specification"),
            "libvirt's own check ran, so B's QEMU was started before the refusal:\n{}",
            run.stderr
        );
        self.assert_still_on_a(name);
    }

    /// The audit line `phase=PHASE action=ACTION domain=NAME` after `mark`, waited for; fails
    /// with every line logged since `mark` when it does not come.
    pub fn expect_audit(&self, mark: u64, phase: &str, action: &str, name: &str) -> String {
        let fields = [
            format!("phase={phase}"),
            format!("action={action}"),
            format!("domain={name}"),
        ];
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        self.wait_audit(mark, &fields, AUDIT_WAIT)
            .unwrap_or_else(|| {
                panic!(
                    "no `{}` audit line; lines since:\n{}",
                    fields.join(" "),
                    self.audit_lines_since(mark).join("\n")
                )
            })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for name in &self.guests {
            for host in [Host::A, Host::B] {
                let _ = self.virsh(host, &["destroy", name]);
                let _ = self.virsh(host, &["undefine", name]);
            }
        }
        let down = bed_sh(&["down"]);
        if !down.success {
            eprintln!("bed.sh down failed: {}", down.stderr);
        }
    }
}

// The heartbeat guests' serial output (x86 COM1 or aarch64 PL011, same format).

/// Every `heartbeat N` counter in the serial file, in order; a line still being written is left
/// out (its digits so far would read as another number).
pub fn heartbeats(serial: &Path) -> Vec<u64> {
    let text = fs::read_to_string(serial).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|l| l.trim().strip_prefix("heartbeat ")?.parse::<u64>().ok())
        .collect()
}

pub fn last_heartbeat(serial: &Path) -> Option<u64> {
    heartbeats(serial).into_iter().max()
}

pub fn wait_for_heartbeat_above(
    serial: &Path,
    above: Option<u64>,
    timeout: Duration,
) -> Option<u64> {
    let start = Instant::now();
    loop {
        let now = last_heartbeat(serial);
        if now.is_some() && now > above {
            return now;
        }
        if start.elapsed() > timeout {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The counters are 0, 1, 2, ... without a gap or a repeat: the guest never restarted and no
/// state was lost or replayed.
pub fn assert_consecutive_from_zero(serial: &Path) {
    let seen = heartbeats(serial);
    let expected: Vec<u64> = (0..seen.len() as u64).collect();
    assert_eq!(
        seen,
        expected,
        "heartbeat counters in {} are not 0, 1, 2, ...",
        serial.display()
    );
}
