//! Booting a real Linux guest beside the probe, shared by the fidelity tests (x86 and aarch64):
//! the probe's CPU-deciding options copied, a direct-kernel command line, and a run with a
//! wall-time bound (the child leads its own process group, so a timeout kills QEMU and anything
//! it started).
#![allow(dead_code)] // each test binary uses its own subset

use std::fs::File;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// `Ok(Some)` when the child exited, `Ok(None)` after a timeout (group killed and reaped). The
/// child must have been spawned with `process_group(0)`.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) => {}
            Err(e) => {
                kill_group(child);
                return Err(e);
            }
        }
        if Instant::now() >= deadline {
            kill_group(child);
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The child leads its own group (process_group(0)); its id is the group id.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended for an unknown reason".to_string(),
    }
}

/// The last few non-empty lines of `text`, on one line, for error messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(4);
    lines[start..].join(" | ")
}

/// Why a boot did not end in a clean power-off.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("work file {path:?}: {reason}")]
    WorkFile { path: PathBuf, reason: String },
    #[error("cannot start {emulator:?}: {reason}")]
    Spawn { emulator: PathBuf, reason: String },
    #[error("waiting for {emulator:?} failed: {reason}")]
    Wait { emulator: PathBuf, reason: String },
    #[error("did not power off within {timeout:?} (process group killed); serial tail: {tail}")]
    Timeout { timeout: Duration, tail: String },
    #[error("emulator {status}; serial tail: {tail}")]
    Failed { status: String, tail: String },
}

/// What the guest printed on its serial console (line endings normalized) and how long it ran.
pub struct SerialRun {
    pub text: String,
    pub wall_time: Duration,
}

/// A direct-kernel boot: `-nodefaults`, the probe's CPU-deciding options, then memory, kernel,
/// initramfs, command line, and the serial console on stdout.
pub fn kernel_argv(
    cpu_options: &[String],
    memory_mib: u32,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Vec<String> {
    let mut argv: Vec<String> = vec!["-nodefaults".into(), "-no-user-config".into()];
    argv.extend(cpu_options.iter().cloned());
    argv.extend([
        "-m".to_string(),
        memory_mib.to_string(),
        "-kernel".to_string(),
        kernel.to_string_lossy().into_owned(),
        "-initrd".to_string(),
        initrd.to_string_lossy().into_owned(),
        "-append".to_string(),
        cmdline.to_string(),
        // -nodefaults drops the default serial port; the first one goes to stdout.
        "-serial".to_string(),
        "stdio".to_string(),
        "-display".to_string(),
        "none".to_string(),
        "-monitor".to_string(),
        "none".to_string(),
        "-no-reboot".to_string(),
    ]);
    argv
}

/// Runs `emulator argv` with its serial console (stdout) in `work_dir`, waits at most `timeout`
/// (then kills its process group), and returns the console text of a clean exit.
pub fn boot_to_serial(
    emulator: &Path,
    argv: &[String],
    work_dir: &Path,
    timeout: Duration,
) -> Result<SerialRun, BootError> {
    let serial_path = work_dir.join("serial.out");
    let stderr_path = work_dir.join("stderr.log");
    let create = |path: &Path| {
        File::create(path).map_err(|e| BootError::WorkFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    };
    let serial = create(&serial_path)?;
    let stderr = create(&stderr_path)?;
    let mut command = Command::new(emulator);
    command
        .args(argv)
        .stdin(Stdio::null())
        .stdout(serial)
        .stderr(stderr)
        .process_group(0);
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| BootError::Spawn {
        emulator: emulator.to_path_buf(),
        reason: e.to_string(),
    })?;
    let status = wait_bounded(&mut child, timeout).map_err(|e| BootError::Wait {
        emulator: emulator.to_path_buf(),
        reason: e.to_string(),
    });
    let wall_time = started.elapsed();
    let output = std::fs::read(&serial_path).map_err(|e| BootError::WorkFile {
        path: serial_path.clone(),
        reason: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&output).replace("\r\n", "\n");
    let Some(status) = status? else {
        return Err(BootError::Timeout {
            timeout,
            tail: tail(&text),
        });
    };
    if !status.success() {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        return Err(BootError::Failed {
            status: describe(status),
            tail: format!("{} | stderr: {}", tail(&text), tail(&stderr)),
        });
    }
    Ok(SerialRun { text, wall_time })
}

/// The probe's command line lacks what the guest must copy.
#[derive(Debug, thiserror::Error)]
pub enum ArgvError {
    #[error("probe command line has no value after {option}: {argv:?}")]
    DanglingOption { option: String, argv: Vec<String> },
    #[error("probe command line has no {option}: {argv:?}")]
    NoCpuOption {
        option: &'static str,
        argv: Vec<String>,
    },
}

/// The `deciding` option/value pairs of the probe's argv, in its order, so the Linux guest runs
/// with literally the same CPU configuration; each of `required` must be among them.
pub fn cpu_options(
    probe_argv: &[String],
    deciding: &[&str],
    required: &[&'static str],
) -> Result<Vec<String>, ArgvError> {
    let mut out = Vec::new();
    let mut args = probe_argv.iter();
    while let Some(arg) = args.next() {
        if deciding.contains(&arg.as_str()) {
            let value = args.next().ok_or_else(|| ArgvError::DanglingOption {
                option: arg.clone(),
                argv: probe_argv.to_vec(),
            })?;
            // The probe's own RAM plumbing (`-machine memory-backend=…`, with its `-object`) is
            // how the runner reads the result back, not part of the guest's CPU.
            if arg == "-machine" && value.starts_with("memory-backend=") {
                continue;
            }
            out.extend([arg.clone(), value.clone()]);
        }
    }
    for &option in required {
        if !out.iter().any(|a| a == option) {
            return Err(ArgvError::NoCpuOption {
                option,
                argv: probe_argv.to_vec(),
            });
        }
    }
    Ok(out)
}
