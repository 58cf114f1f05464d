//! Running the probe: a private work directory, the emulator in its own process group with a
//! wall-time bound, confined (see [`super::confine`]: libvirt's QEMU user, seccomp, clean
//! environment, rlimits), guest RAM backed by a file in that directory, and the result the
//! firmware left in it parsed into a [`CpuidTable`].

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
use serde::{Deserialize, Serialize};

use super::confine;
use super::emulator::{check_emulator, EmulatorError};
use super::firmware::{
    HEARTBEAT_X86, PROBE_EXIT_STATUS, PROBE_FATAL_STATUS, PROBE_MSR_SELFTEST_X86, PROBE_TEXT_X86,
    PROBE_X86,
};
use super::output::{self, OutputError};
use super::qemu_args::{check_model_available, default_emulator, probe_args, ArgsError};
use crate::cpuid::CpuidTable;
use crate::domain::guest::{Accel, GuestCpuConfig};
use crate::fingerprint::UserModeCpuid;

/// How long `qemu --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the emulator's stderr quoted in an error (QEMU puts the reason on the last lines).
const STDERR_TAIL_LINES: usize = 3;

/// Which generated firmware to boot; anything but `Probe` exists for tests of the runner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Probe,
    /// The probe plus unconditional reads of MSRs that do and do not exist (exercises #GP).
    MsrSelftest,
    /// Never exits: exercises the wall-time bound.
    Heartbeat,
    /// The probe with the previous wire format (text on port 0xe9): shows both formats agree.
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOptions {
    /// Wall-time bound for one emulator run; on expiry its whole process group is killed.
    pub timeout: Duration,
    /// Emulators that may be run: libvirt's capabilities emulators plus the config's allow-list.
    pub allowed_emulators: Vec<PathBuf>,
    /// Run under this accelerator instead of the domain's (tests use TCG for KVM domains).
    pub accel_override: Option<Accel>,
    /// Where the private work directory is created (default: the system temp directory).
    pub work_dir: Option<PathBuf>,
    pub firmware: Firmware,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            timeout: Duration::from_secs(10),
            allowed_emulators: Vec::new(),
            accel_override: None,
            work_dir: None,
            firmware: Firmware::Probe,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe: {0}")]
    Args(#[from] ArgsError),
    #[error("probe: {0}")]
    Emulator(#[from] EmulatorError),
    #[error("probe: domain XML names no <emulator> and none of the allowed emulators is {wanted}")]
    NoEmulator { wanted: &'static str },
    #[error("probe: cannot prepare work directory {path:?}: {reason}")]
    WorkDir { path: PathBuf, reason: String },
    #[error("probe: cannot start emulator {emulator:?}: {reason}")]
    Spawn { emulator: PathBuf, reason: String },
    #[error("probe: waiting for emulator {emulator:?} failed: {reason}")]
    Wait { emulator: PathBuf, reason: String },
    #[error("probe: emulator {emulator:?} did not finish within the {timeout:?} timeout; its process group was killed")]
    Timeout {
        emulator: PathBuf,
        timeout: Duration,
    },
    #[error("probe: emulator {emulator:?} {status}: {stderr}")]
    EmulatorFailed {
        emulator: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("probe: output of emulator {emulator:?} is unusable: {source}")]
    Output {
        emulator: PathBuf,
        #[source]
        source: OutputError,
    },
    #[error("probe: `{emulator:?} --version` printed no version line")]
    NoVersion { emulator: PathBuf },
    #[error("{0}")]
    Aarch64(Box<crate::arm::ArmProbeError>),
    #[error("probe: cannot confine the emulator: {0}")]
    Confine(String),
}

/// One completed probe run with what it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    pub table: CpuidTable,
    /// MSRs CPUID enumerates but whose read raised #GP.
    pub absent_msrs: Vec<u32>,
    /// The user-mode pass: CPUID at CPL3 against the table (`None` for an image without it).
    pub user_mode: Option<UserModeCpuid>,
    /// The user-mode pass's leaves as read in long mode at CPL0 (empty without long mode).
    pub long_mode_kernel: Vec<crate::cpuid::CpuidEntry>,
    pub emulator: PathBuf,
    pub argv: Vec<String>,
    pub wall_time: Duration,
    /// Features QEMU filtered out of the requested CPU because the host (or TCG) lacks them,
    /// from its warnings: what the guest does not get although its configuration asks for it.
    pub filtered: Vec<String>,
}

/// Measures the CPUID table a guest with `config` sees on this host.
pub fn probe(config: &GuestCpuConfig, opts: &ProbeOptions) -> Result<CpuidTable, ProbeError> {
    probe_run(config, opts).map(|run| run.table)
}

/// Like [`probe`], with the emulator, argv and wall time of the run.
pub fn probe_run(config: &GuestCpuConfig, opts: &ProbeOptions) -> Result<ProbeRun, ProbeError> {
    probe_run_with(config, opts, None)
}

/// Like [`probe_run`], executing `executable` (checked by the caller) in place of the resolved,
/// checked `<emulator>`.
pub fn probe_run_with(
    config: &GuestCpuConfig,
    opts: &ProbeOptions,
    executable: Option<&Path>,
) -> Result<ProbeRun, ProbeError> {
    let emulator = resolve_emulator(config, &opts.allowed_emulators)?;
    let emulator = executable.map(Path::to_path_buf).unwrap_or(emulator);
    let work = WorkDir::create(opts.work_dir.as_deref())?;
    let firmware = match opts.firmware {
        Firmware::Probe => PROBE_X86,
        Firmware::MsrSelftest => PROBE_MSR_SELFTEST_X86,
        Firmware::Heartbeat => HEARTBEAT_X86,
        Firmware::Text => PROBE_TEXT_X86,
    };
    let accel = opts.accel_override.unwrap_or(config.accel);
    let ram_path = work.path.join("guest-ram");
    // isa-debug-exit: the probe's own status when it finished, its fatal status when a CPU
    // exception hit (the result then says so); anything else is QEMU refusing the config.
    let run = run_firmware(
        &emulator,
        &work,
        firmware,
        "debugcon.out",
        opts.timeout,
        |firmware, output| {
            let mut argv = probe_args(config, accel, firmware, output)?;
            argv.extend(ram_file_args(&argv, &ram_path)?);
            Ok::<_, ProbeError>(argv)
        },
        |status| matches!(status.code(), Some(PROBE_EXIT_STATUS | PROBE_FATAL_STATUS)),
    )
    // Only a run that failed can have met a missing `fallback='allow'` model: asking the emulator
    // for its model list first would cost every such probe one more QEMU exec (~45 ms).
    .or_else(|run_error| {
        check_fallback_model(config, &emulator)?;
        Err(run_error)
    })?;
    let (argv, bytes, wall_time) = (run.argv, run.output, run.wall_time);
    let output_error = |source| ProbeError::Output {
        emulator: emulator.clone(),
        source,
    };
    let (parsed, user) = if opts.firmware == Firmware::Text {
        (output::parse(&bytes).map_err(output_error)?, None)
    } else {
        let (summary, records) = read_result(&ram_path)?;
        let parsed = output::parse_result(&summary, &records).map_err(output_error)?;
        // The probe images end with the user-mode pass and exit from it: a finished table
        // without its result is not the probe's.
        let user =
            output::parse_user(&summary).ok_or_else(|| output_error(OutputError::NoResult))?;
        (parsed, Some(user))
    };
    let user_mode = user
        .as_ref()
        .map(|(_, user)| UserModeCpuid::compare(&parsed.table, user));
    let long_mode_kernel = user.map(|(kernel, _)| kernel).unwrap_or_default();
    Ok(ProbeRun {
        table: parsed.table,
        absent_msrs: parsed.absent_msrs,
        user_mode,
        long_mode_kernel,
        emulator,
        argv,
        wall_time,
        filtered: filtered_features(&run.stderr),
    })
}

/// A custom `<model fallback='allow'>` (persistent definitions; live XML says `forbid`) is
/// started by libvirt as named only when the emulator has the model: ask the emulator, so that a
/// failed probe of a missing model says so instead of quoting QEMU's error.
fn check_fallback_model(config: &GuestCpuConfig, emulator: &Path) -> Result<(), ProbeError> {
    let allow = config
        .cpu
        .as_ref()
        .is_some_and(|c| c.model.is_some() && c.fallback.as_deref() == Some("allow"));
    if allow {
        let models = super::models::qemu_cpu_models(emulator)?;
        check_model_available(config, &emulator.display().to_string(), &models)?;
    }
    Ok(())
}

/// Guest RAM backed by `path` (shared, so the guest's stores reach the file and stay there after
/// QEMU exits): the probe leaves its result in RAM instead of writing it to an I/O port, which
/// under KVM costs an exit per byte. The size is the `-m` of `argv`, which the backend must
/// match. Nothing guest-visible changes: the same RAM, only backed by a file. The file is made
/// here at its full size (sparse), writable by the QEMU user only, so a confined QEMU needs to
/// create or extend nothing in the work directory.
fn ram_file_args(argv: &[String], path: &Path) -> Result<Vec<String>, ProbeError> {
    let mib = argv
        .iter()
        .position(|a| a == "-m")
        .and_then(|i| argv.get(i + 1))
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ProbeError::WorkDir {
            path: path.to_path_buf(),
            reason: "the probe command line has no plain `-m MiB` to size its RAM file".into(),
        })?;
    let size = mib
        .parse::<u64>()
        .ok()
        .and_then(|m| m.checked_mul(1024 * 1024))
        .ok_or_else(|| ProbeError::WorkDir {
            path: path.to_path_buf(),
            reason: format!("the probe command line's `-m {mib}` is out of range"),
        })?;
    prepare_qemu_file(path, size)?;
    let path = path.to_str().ok_or_else(|| ProbeError::WorkDir {
        path: path.to_path_buf(),
        reason: "not valid UTF-8".into(),
    })?;
    Ok(vec![
        "-object".to_string(),
        // QEMU option values escape a comma by doubling it.
        format!(
            "memory-backend-file,id=cpuguard-ram,size={mib}M,share=on,mem-path={}",
            path.replace(',', ",,")
        ),
        "-machine".to_string(),
        "memory-backend=cpuguard-ram".to_string(),
    ])
}

/// The summary and the records the firmware left in the RAM file: two positioned reads of a few
/// KiB, whatever the RAM size.
fn read_result(path: &Path) -> Result<(Vec<u8>, Vec<u8>), ProbeError> {
    use std::os::unix::fs::FileExt;
    let error = |e: std::io::Error| ProbeError::WorkDir {
        path: path.to_path_buf(),
        reason: format!("reading the probe result: {e}"),
    };
    let file = File::open(path).map_err(error)?;
    let read = |(offset, len): (u64, usize)| -> Result<Vec<u8>, ProbeError> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map_err(error)?;
        Ok(buf)
    };
    let summary = read(output::result_span())?;
    let records = match output::summary_count(&summary) {
        Some(count) => read(output::records_span(count))?,
        None => Vec::new(),
    };
    Ok((summary, records))
}

/// Creates `path` (which must not exist) with `size` bytes, sparse, mode 0600, owned by the user
/// a confined QEMU runs as (see `confine`), so QEMU can write it and nobody else can.
fn prepare_qemu_file(path: &Path, size: u64) -> Result<(), ProbeError> {
    let error = |e: std::io::Error| ProbeError::WorkDir {
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
    if let Some(user) = confine::this_host_qemu_user().map_err(ProbeError::Confine)? {
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
pub fn emulator_version(emulator: &str, allowed: &[PathBuf]) -> Result<String, ProbeError> {
    let emulator = check_emulator(emulator, allowed)?;
    executable_version(&emulator)
}

/// The first line of `executable --version`, for a binary the caller has checked (a running
/// domain's `/proc/PID/exe`).
pub fn executable_version(emulator: &Path) -> Result<String, ProbeError> {
    let emulator = emulator.to_path_buf();
    let work = WorkDir::create(None)?;
    let out_path = work.path.join("version.out");
    let out = File::create(&out_path).map_err(|e| ProbeError::WorkDir {
        path: out_path.clone(),
        reason: e.to_string(),
    })?;
    let user = confine::this_host_qemu_user().map_err(ProbeError::Confine)?;
    let mut command = Command::new(&emulator);
    command
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    confine::confine(&mut command, user.as_ref(), VERSION_TIMEOUT.as_secs());
    let status = run_bounded(command, &emulator, VERSION_TIMEOUT)?;
    if !status.success() {
        return Err(ProbeError::EmulatorFailed {
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
        .ok_or(ProbeError::NoVersion { emulator })
}

/// The checked, canonical emulator path a probe of `config` would run: the XML's `<emulator>`, or
/// when it names none, the allow-list entry named like the architecture's QEMU.
pub fn resolve_emulator(
    config: &GuestCpuConfig,
    allowed: &[PathBuf],
) -> Result<PathBuf, ProbeError> {
    match &config.emulator {
        Some(path) => Ok(check_emulator(path, allowed)?),
        None => {
            let wanted = default_emulator(&config.arch)?;
            let found = allowed
                .iter()
                .find(|p| p.file_name().is_some_and(|n| n == wanted))
                .ok_or(ProbeError::NoEmulator { wanted })?;
            let text = found.to_str().ok_or(ProbeError::NoEmulator { wanted })?;
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
pub(crate) fn run_firmware<E: From<ProbeError>>(
    emulator: &Path,
    work: &WorkDir,
    image: &[u8],
    output_name: &str,
    timeout: Duration,
    argv_for: impl FnOnce(&Path, &Path) -> Result<Vec<String>, E>,
    finished: impl FnOnce(ExitStatus) -> bool,
) -> Result<FirmwareRun, E> {
    let work_error = |path: &Path, e: std::io::Error| ProbeError::WorkDir {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let firmware_path = work.path.join("firmware.bin");
    let output_path = work.path.join(output_name);
    let stderr_path = work.path.join("stderr.log");
    let user = confine::this_host_qemu_user().map_err(ProbeError::Confine)?;
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
        return Err(ProbeError::EmulatorFailed {
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
) -> Result<ExitStatus, ProbeError> {
    command.process_group(0);
    let mut child = command.spawn().map_err(|e| ProbeError::Spawn {
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
                return Err(ProbeError::Wait {
                    emulator: emulator.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            kill_group(&mut child);
            return Err(ProbeError::Timeout {
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

/// The features QEMU's warnings say it dropped, one line each: `avx2: the host lacks it
/// (CPUID.07H:EBX [bit 5])`. QEMU (without `enforce`, as libvirt starts it) warns
/// `host doesn't support requested feature: CPUID.07H:EBX.avx2 [bit 5]` (KVM) or `TCG doesn't
/// support …` and starts the guest without the feature.
pub fn filtered_features(stderr: &str) -> Vec<String> {
    const MARK: &str = " doesn't support requested feature: ";
    let mut out: Vec<String> = stderr
        .lines()
        .filter_map(|line| {
            let at = line.find(MARK)?;
            let who = line[..at].rsplit(": ").next()?.trim();
            let what = line[at + MARK.len()..].trim();
            // CPUID.07H:EBX.avx2 [bit 5]: the name follows the register (it may hold dots).
            let (location, rest) = what.split_once(':')?;
            let (register, named) = rest.split_once('.')?;
            let (name, bit) = named.split_once(' ').unwrap_or((named, ""));
            let lacker = if who == "host" { "the host" } else { who };
            Some(format!(
                "{name}: {lacker} lacks it ({location}:{register}{}{bit})",
                if bit.is_empty() { "" } else { " " }
            ))
        })
        .collect();
    out.sort();
    out.dedup();
    out
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
    pub(crate) fn create(parent: Option<&Path>) -> Result<WorkDir, ProbeError> {
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
                    return Err(ProbeError::WorkDir {
                        path,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Err(ProbeError::WorkDir {
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
        assert!(matches!(err, ProbeError::Timeout { .. }), "{err}");
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

    /// The RAM file is sized from the probe command line's own `-m` and made here at that size
    /// (private, sparse), so the two cannot disagree; a command line without a plain `-m` is an
    /// error, not a guess.
    #[test]
    fn ram_file_follows_the_command_lines_memory_size() {
        use std::os::unix::fs::PermissionsExt;
        let xml = "<domain type='qemu'><os><type arch='x86_64'>hvm</type></os></domain>";
        let config = GuestCpuConfig::from_domain_xml(xml).unwrap();
        let argv = probe_args(
            &config,
            Accel::Tcg,
            Path::new("/w/fw.bin"),
            Path::new("/w/out"),
        )
        .unwrap();
        let mib = &argv[argv.iter().position(|a| a == "-m").unwrap() + 1];
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a,b")).unwrap();
        let ram = dir.path().join("a,b").join("ram");
        let extra = ram_file_args(&argv, &ram).unwrap();
        let escaped = ram.display().to_string().replace(',', ",,");
        assert_eq!(
            extra,
            vec![
                "-object".to_string(),
                format!(
                    "memory-backend-file,id=cpuguard-ram,size={mib}M,share=on,mem-path={escaped}"
                ),
                "-machine".to_string(),
                "memory-backend=cpuguard-ram".to_string(),
            ]
        );
        let meta = std::fs::metadata(&ram).unwrap();
        assert_eq!(meta.len(), mib.parse::<u64>().unwrap() << 20);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Made once: a second run into the same path is refused, not reused.
        assert!(ram_file_args(&argv, &ram).is_err());
        let no_size: Vec<String> = argv.iter().filter(|a| *a != "-m").cloned().collect();
        assert!(ram_file_args(&no_size, &dir.path().join("other")).is_err());
    }

    #[test]
    fn missing_emulator_is_named() {
        let xml = "<domain type='qemu'><os><type arch='x86_64'>hvm</type></os></domain>";
        let config = GuestCpuConfig::from_domain_xml(xml).unwrap();
        let err = probe(&config, &ProbeOptions::default()).unwrap_err();
        assert!(err.to_string().contains("qemu-system-x86_64"), "{err}");
    }
}
