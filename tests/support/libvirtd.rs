//! A private libvirtd for one test, owned by it: started in its own mount and PID namespace, gone
//! when the test ends however it ends.
//!
//! Include it with `#[path = "support/libvirtd.rs"] mod libvirtd;`. The daemon sees empty
//! /etc/libvirt, /run, /var/lib/libvirt and /var/log/libvirt (no hooks, no autostarted domains,
//! no other daemon's sockets), so it neither disturbs nor sees any other libvirtd on the machine.
//! Its QEMU capabilities cache lives under target/ and is kept across runs: libvirt revalidates
//! it against the QEMU binaries, and only the first run pays the cold probe (about a minute).
//!
//! Ownership: `unshare --pid --fork --kill-child` runs the daemon as a PID namespace whose init
//! gets SIGKILL when `unshare` dies, and the kernel then kills every process of the namespace
//! (libvirtd and any QEMU it started for probing). `unshare` itself gets SIGKILL when the test's
//! thread ends (`PR_SET_PDEATHSIG`), so even a test process killed from outside leaves nothing.
//! `Drop` kills it and waits until the namespace's processes are gone.
#![allow(dead_code)] // each test binary uses its own subset

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The last-resort bound on the daemon's first answer: a cold capabilities cache makes libvirtd
/// probe every QEMU binary first (about 50 s on an idle 2-core machine, more under load). A
/// daemon that dies ends the wait at once; this bound only ends a wait on one that hangs.
pub const READY_BOUND: Duration = Duration::from_secs(900);

/// The bound on one `virsh` call once the daemon answers (a few seconds at most, normally).
pub const CALL_BOUND: Duration = Duration::from_secs(120);

const NAMESPACE_SCRIPT: &str = r#"
set -e
D=$1
CACHE=$2
mkdir -p "$D/etc" "$D/run" "$D/lib" "$D/log" "$CACHE"
mount --bind "$D/etc" /etc/libvirt
# All of /run, not /run/libvirt: the latter comes and goes with other daemons on the machine.
mount --bind "$D/run" /run
mount --bind "$D/lib" /var/lib/libvirt
mount --bind "$CACHE" /var/cache/libvirt
mount --bind "$D/log" /var/log/libvirt
# This shell is the namespace's init: it reaps what libvirtd leaves behind and, when killed, takes
# the whole namespace with it.
libvirtd -p "$D/libvirtd.pid" &
wait $!
"#;

/// A running private libvirtd; see the module header.
pub struct PrivateLibvirtd {
    child: Child,
    dir: tempfile::TempDir,
    /// The namespace's init as this machine's PID namespace numbers it.
    init_pid: Option<i32>,
    uri: String,
}

impl PrivateLibvirtd {
    /// Starts the daemon and waits for its first answer (see `READY_BOUND`); reports on stderr
    /// how long that took when it was slow (a cold capabilities cache).
    pub fn start() -> Result<PrivateLibvirtd, String> {
        Self::start_with_qemu_conf(None)
    }

    /// [`start`](Self::start) with this text as the daemon's `/etc/libvirt/qemu.conf` (a test that
    /// starts domains sets `stdio_handler = "file"`: the namespace runs no virtlogd).
    pub fn start_with_qemu_conf(qemu_conf: Option<&str>) -> Result<PrivateLibvirtd, String> {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = tempfile::Builder::new()
            .prefix("cpuguard-private-libvirtd.")
            .tempdir_in(target)
            .map_err(|e| format!("cannot create a directory for the private libvirtd: {e}"))?;
        if let Some(conf) = qemu_conf {
            let etc = dir.path().join("etc");
            std::fs::create_dir_all(&etc)
                .and_then(|()| std::fs::write(etc.join("qemu.conf"), conf))
                .map_err(|e| format!("cannot write the private libvirtd's qemu.conf: {e}"))?;
        }
        let cache = target.join("private-libvirtd-cache");
        let mut command = Command::new("unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "bash",
                "-c",
                NAMESPACE_SCRIPT,
                "private-libvirtd",
            ])
            .arg(dir.path())
            .arg(&cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot run unshare (util-linux) for a private libvirtd: {e}"))?;
        let socket = dir.path().join("run/libvirt/libvirt-sock");
        let mut daemon = PrivateLibvirtd {
            child,
            uri: format!("qemu+unix:///system?socket={}", socket.display()),
            dir,
            init_pid: None,
        };
        daemon.init_pid = daemon.find_init();
        daemon.wait_ready()?;
        Ok(daemon)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespace's init: the only child of `unshare`.
    fn find_init(&self) -> Option<i32> {
        let pid = self.child.id();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            if let Some(first) = children.split_whitespace().next() {
                return first.parse().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(out) = self.virsh_bounded(&["version"], Duration::from_secs(30)) {
                if out.status.success() {
                    break;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("log/libvirtd.log"))
                    .unwrap_or_default();
                return Err(format!(
                    "the private libvirtd exited ({status}) before it answered (needs root, \
                     util-linux, libvirt-daemon-system); its log:\n{log}"
                ));
            }
            if start.elapsed() > READY_BOUND {
                return Err(format!(
                    "the private libvirtd still runs but has not answered after {:?}",
                    start.elapsed()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if start.elapsed() > Duration::from_secs(3) {
            eprintln!(
                "private libvirtd: first answer after {:.1} s (a cold QEMU capabilities cache)",
                start.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// `virsh -c URI ARGS`, killed after `bound`.
    pub fn virsh_bounded(&self, args: &[&str], bound: Duration) -> Result<Output, String> {
        let mut child = Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run virsh: {e}"))?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() > bound => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("virsh {args:?} did not finish within {bound:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("cannot wait for virsh: {e}")),
            }
        }
        child
            .wait_with_output()
            .map_err(|e| format!("cannot read virsh's output: {e}"))
    }

    /// What libvirt puts on QEMU's command line for the domain XML in `file`, on one line (or
    /// libvirt's error), within `CALL_BOUND`.
    pub fn domxml_to_native(&self, file: &Path) -> Result<String, String> {
        let file = file.to_str().ok_or("fixture path is not UTF-8")?;
        let out = self.virsh_bounded(
            &["domxml-to-native", "qemu-argv", "--xml", file],
            CALL_BOUND,
        )?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text.replace('\n', " "))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/libvirt/libvirt-sock")
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        // unshare's death SIGKILLs the namespace's init, and with it every process inside.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = self.init_pid {
            let start = Instant::now();
            // Gone, or a zombie waiting for pid 1 to reap it: either way it runs no more.
            let running = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").starts_with(" Z"))
            };
            while running() && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
