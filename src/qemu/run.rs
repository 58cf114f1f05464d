//! The QEMU runner shared by every architecture's probe: a private work directory, the emulator
//! in its own process group with a wall-time bound, confined (see [`super::confine`]: libvirt's
//! QEMU user, seccomp, clean environment, rlimits), and the output file read back. It knows no
//! architecture: the caller builds the command line and reads the result.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::confine;
use super::emulator::{check_emulator, EmulatorError};

/// How long `qemu --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the emulator's stderr quoted in an error (QEMU puts the reason on the last lines).
const STDERR_TAIL_LINES: usize = 3;

/// What can go wrong running an emulator, whatever the guest architecture.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The emulator path was refused (see [`EmulatorError`]).
    #[error("probe: {0}")]
    Emulator(#[from] EmulatorError),
    /// The XML names no `<emulator>` and the allow-list has no usable entry of the architecture's
    /// file name.
    #[error("probe: domain XML names no <emulator> and none of the allowed emulators is {wanted}")]
    NoEmulator {
        /// The emulator file name looked for, e.g. `qemu-system-aarch64`.
        wanted: &'static str,
    },
    /// The private work directory or a file in it could not be created, written or read.
    #[error("probe: cannot prepare work directory {path:?}: {reason}")]
    WorkDir {
        /// The directory or file concerned.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The emulator process could not be started.
    #[error("probe: cannot start emulator {emulator:?}: {reason}")]
    Spawn {
        /// The emulator executable.
        emulator: PathBuf,
        /// The OS error from spawning it.
        reason: String,
    },
    /// Polling the emulator's exit status failed; its process group was killed.
    #[error("probe: waiting for emulator {emulator:?} failed: {reason}")]
    Wait {
        /// The emulator executable.
        emulator: PathBuf,
        /// The OS error from waiting.
        reason: String,
    },
    /// The emulator outlived the wall-time bound; its process group was killed.
    #[error("probe: emulator {emulator:?} did not finish within the {timeout:?} timeout; its process group was killed")]
    Timeout {
        /// The emulator executable.
        emulator: PathBuf,
        /// The wall-time bound it exceeded.
        timeout: Duration,
    },
    /// The emulator ended with a status the caller does not accept (usually QEMU refusing the
    /// command line: unknown CPU model, no KVM, bad machine).
    #[error("probe: emulator {emulator:?} {status}: {stderr}")]
    EmulatorFailed {
        /// The emulator executable.
        emulator: PathBuf,
        /// How it ended: `exited with status N` or `was killed by signal N`.
        status: String,
        /// Its last few non-empty stderr lines joined with ` | ` (QEMU's reason), or
        /// `no message on stderr`; empty for `--version`.
        stderr: String,
    },
    /// `--version` succeeded but printed nothing but blank lines.
    #[error("probe: `{emulator:?} --version` printed no version line")]
    NoVersion {
        /// The emulator executable.
        emulator: PathBuf,
    },
    /// libvirt's QEMU user could not be determined (qemu.conf names an unknown user or group, or
    /// no default user exists): the probe does not run QEMU as root instead.
    #[error("probe: cannot confine the emulator: {0}")]
    Confine(String),
}

/// Creates `path` (which must not exist) with `size` bytes, sparse, mode 0600, owned by the user
/// a confined QEMU runs as (see `confine`), so QEMU can write it and nobody else can.
pub(crate) fn prepare_qemu_file(path: &Path, size: u64) -> Result<(), RunError> {
    let error = |e: std::io::Error| RunError::WorkDir {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(error)?;
    file.set_len(size).map_err(error)?;
    if let Some(user) = confine::this_host_qemu_user().map_err(RunError::Confine)? {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .map_err(|e| error(e.into()))?;
    }
    Ok(())
}

/// The first line of `<emulator> --version` (e.g. "QEMU emulator version 7.2.22 (...)"), for the
/// host facts and the cache key. The emulator is checked like for a probe.
pub fn emulator_version(emulator: &str, allowed: &[PathBuf]) -> Result<String, RunError> {
    let emulator = check_emulator(emulator, allowed)?;
    executable_version(&emulator)
}

/// The first line of `executable --version`, for a binary the caller has checked (a running
/// domain's `/proc/PID/exe`).
pub fn executable_version(emulator: &Path) -> Result<String, RunError> {
    let emulator = emulator.to_path_buf();
    let work = WorkDir::create(None)?;
    let out_path = work.path.join("version.out");
    let out = File::create(&out_path).map_err(|e| RunError::WorkDir {
        path: out_path.clone(),
        reason: e.to_string(),
    })?;
    let user = confine::this_host_qemu_user().map_err(RunError::Confine)?;
    let mut command = Command::new(&emulator);
    command
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    confine::confine(&mut command, user.as_ref(), VERSION_TIMEOUT.as_secs());
    let status = run_bounded(command, &emulator, VERSION_TIMEOUT)?;
    if !status.success() {
        return Err(RunError::EmulatorFailed {
            emulator,
            status: describe(status),
            stderr: String::new(),
        });
    }
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or(RunError::NoVersion { emulator })
}

/// The checked, canonical emulator path a probe would run: the XML's `<emulator>`, or when it
/// names none, the allow-list entry whose file name is `wanted` (the architecture's QEMU, e.g.
/// `qemu-system-x86_64`).
pub fn resolve_emulator(
    emulator: Option<&str>,
    wanted: &'static str,
    allowed: &[PathBuf],
) -> Result<PathBuf, RunError> {
    match emulator {
        Some(path) => Ok(check_emulator(path, allowed)?),
        None => {
            let found = allowed
                .iter()
                .find(|p| p.file_name().is_some_and(|n| n == wanted))
                .ok_or(RunError::NoEmulator { wanted })?;
            let text = found.to_str().ok_or(RunError::NoEmulator { wanted })?;
            Ok(check_emulator(text, allowed)?)
        }
    }
}

/// What [`run_firmware`] saw.
pub(crate) struct FirmwareRun {
    pub argv: Vec<String>,
    /// The emulator's stderr (its warnings), at most 64 KiB.
    pub stderr: String,
    /// The file the firmware wrote its report to (debugcon or UART).
    pub output: Vec<u8>,
    pub wall_time: Duration,
}

/// One bounded run of a generated firmware, shared by the x86 and aarch64 probes: the image is
/// written into `work`, `argv_for(firmware, output)` builds the command line, stderr is kept for
/// the error message, and the output file is read back when `finished` accepts the exit status.
pub(crate) fn run_firmware<E: From<RunError>>(
    emulator: &Path,
    work: &WorkDir,
    image: &[u8],
    output_name: &str,
    timeout: Duration,
    argv_for: impl FnOnce(&Path, &Path) -> Result<Vec<String>, E>,
    finished: impl FnOnce(ExitStatus) -> bool,
) -> Result<FirmwareRun, E> {
    let work_error = |path: &Path, e: std::io::Error| RunError::WorkDir {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let firmware_path = work.path.join("firmware.bin");
    let output_path = work.path.join(output_name);
    let stderr_path = work.path.join("stderr.log");
    let user = confine::this_host_qemu_user().map_err(RunError::Confine)?;
    std::fs::write(&firmware_path, image).map_err(|e| work_error(&firmware_path, e))?;
    if let Some(user) = &user {
        // QEMU runs as libvirt's QEMU user: it may enter the directory (not list or change
        // it), read the firmware, and write only the output file made for it here.
        let mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| work_error(path, e))
        };
        mode(&work.path, 0o711)?;
        mode(&firmware_path, 0o644)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&output_path)
            .map_err(|e| work_error(&output_path, e))?;
        nix::unistd::chown(
            &output_path,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .map_err(|e| work_error(&output_path, e.into()))?;
    }
    let mut argv = argv_for(&firmware_path, &output_path)?;
    argv.extend(["-sandbox".to_string(), confine::SANDBOX.to_string()]);
    let stderr = File::create(&stderr_path).map_err(|e| work_error(&stderr_path, e))?;
    let started = Instant::now();
    let mut command = Command::new(emulator);
    command
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // CPU time across QEMU's threads, well above what the wall-time bound allows.
    confine::confine(
        &mut command,
        user.as_ref(),
        timeout.as_secs().saturating_mul(4).saturating_add(10),
    );
    let status = run_bounded(command, emulator, timeout)?;
    let wall_time = started.elapsed();
    if !finished(status) {
        return Err(RunError::EmulatorFailed {
            emulator: emulator.to_path_buf(),
            status: describe(status),
            stderr: stderr_tail(&stderr_path),
        }
        .into());
    }
    let output = std::fs::read(&output_path).map_err(|e| work_error(&output_path, e))?;
    let mut stderr = String::new();
    if let Ok(file) = File::open(&stderr_path) {
        let _ = file.take(64 * 1024).read_to_string(&mut stderr);
    }
    Ok(FirmwareRun {
        argv,
        stderr,
        output,
        wall_time,
    })
}

/// Spawns `command` in a new process group and waits at most `timeout`; on expiry kills the
/// whole group (QEMU may have helpers) and reaps the child.
pub(crate) fn run_bounded(
    mut command: Command,
    emulator: &Path,
    timeout: Duration,
) -> Result<ExitStatus, RunError> {
    command.process_group(0);
    let mut child = command.spawn().map_err(|e| RunError::Spawn {
        emulator: emulator.to_path_buf(),
        reason: e.to_string(),
    })?;
    let deadline = Instant::now() + timeout;
    // The probe finishes in tens of milliseconds and every poll interval is added to its wall
    // time: polls stay at most 1 ms apart (a 10 ms cap cost ~10 ms per probe, measured with
    // `cargo bench --bench probe`); a thousand WNOHANG waits a second cost nothing measurable.
    let mut pause = Duration::from_micros(250);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => {
                kill_group(&mut child);
                return Err(RunError::Wait {
                    emulator: emulator.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            kill_group(&mut child);
            return Err(RunError::Timeout {
                emulator: emulator.to_path_buf(),
                timeout,
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

fn kill_group(child: &mut Child) {
    if let Ok(raw) = i32::try_from(child.id()) {
        // The group id is the child's pid (process_group(0)); ESRCH just means it is gone.
        let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    }
    let _ = child.wait();
}

pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended without a status".to_string(),
    }
}

/// The last few non-empty lines of the emulator's stderr, joined into one line.
pub(crate) fn stderr_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let _ = file.take(64 * 1024).read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join(" | ");
    if tail.is_empty() {
        "no message on stderr".to_string()
    } else {
        tail
    }
}

/// A mode-0700 directory that is removed with everything in it when dropped.
pub(crate) struct WorkDir {
    pub(crate) path: PathBuf,
}

impl WorkDir {
    pub(crate) fn create(parent: Option<&Path>) -> Result<WorkDir, RunError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut last_error = String::new();
        for _ in 0..16 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!(
                "cpuguard-probe-{}-{nanos:08x}-{n}",
                std::process::id()
            ));
            // create (not create_all): fails if the name exists, so nobody can pre-plant it.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(WorkDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    last_error = e.to_string();
                }
                Err(e) => {
                    return Err(RunError::WorkDir {
                        path,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Err(RunError::WorkDir {
            path: parent,
            reason: format!("no fresh directory name: {last_error}"),
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dir_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let path = {
            let work = WorkDir::create(Some(parent.path())).unwrap();
            let mode = std::fs::metadata(&work.path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            std::fs::write(work.path.join("x"), b"x").unwrap();
            work.path.clone()
        };
        assert!(!path.exists(), "{} left behind", path.display());
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let mut command = Command::new("/bin/sh");
        // The background grandchild would outlive a kill of only the direct child.
        command.args([
            "-c",
            &format!("sleep 30 & echo $! > {}; wait", pid_file.display()),
        ]);
        let started = Instant::now();
        let err =
            run_bounded(command, Path::new("/bin/sh"), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, RunError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("timeout"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let grandchild = std::fs::read_to_string(&pid_file).unwrap();
        let stat = format!("/proc/{}/stat", grandchild.trim());
        // Gone, or a zombie waiting for init to reap it: either way no longer running.
        for _ in 0..100 {
            match std::fs::read_to_string(&stat) {
                Err(_) => return,
                Ok(s) if s.contains(") Z ") => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        panic!(
            "grandchild {} still running after the timeout",
            grandchild.trim()
        );
    }

    #[test]
    fn exit_status_and_stderr_are_described() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("err");
        std::fs::write(&log, "a\n\nb\nc\nqemu: fatal thing\n").unwrap();
        assert_eq!(stderr_tail(&log), "b | c | qemu: fatal thing");
        let status = Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .status()
            .unwrap();
        assert_eq!(describe(status), "exited with status 3");
    }
}
