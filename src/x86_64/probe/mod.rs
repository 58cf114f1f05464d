//! The x86 probe: a generated firmware that dumps the CPUID table (and feature MSRs) a guest sees,
//! booted under the domain's own emulator, machine and CPU configuration by the shared runner
//! ([`crate::qemu::run`]), with guest RAM backed by a file in the run's work directory and the
//! result the firmware left in it parsed into a [`CpuidTable`].
//!
//! - `args`: the QEMU command line from a `GuestCpuConfig` (as libvirt would build it).
//! - `firmware`: the images build.rs generates (probe and test guests).
//! - `layout`: where the probe leaves its result in guest RAM, its ports and exit values (shared
//!   with build.rs).
//! - `output`: parsing the probe's result (RAM records, or the text of the previous format).

pub mod args;
pub mod firmware;
pub mod layout;
pub mod output;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::args::{check_model_available, probe_args, ArgsError};
use self::firmware::{
    HEARTBEAT_X86, PROBE_EXIT_STATUS, PROBE_FATAL_STATUS, PROBE_MSR_SELFTEST_X86, PROBE_TEXT_X86,
    PROBE_X86,
};
use self::output::OutputError;
use super::user_mode::UserModeCpuid;
use super::{CpuidEntry, CpuidTable};
use crate::domain::guest::{Accel, GuestCpuConfig};
use crate::qemu::run::{prepare_qemu_file, resolve_emulator, run_firmware, RunError, WorkDir};

/// Which generated firmware to boot; anything but `Probe` exists for tests of the runner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// The probe itself: the CPUID table, feature MSRs and user-mode pass (the default).
    #[default]
    Probe,
    /// The probe plus unconditional reads of MSRs that do and do not exist (exercises #GP).
    MsrSelftest,
    /// Never exits: exercises the wall-time bound.
    Heartbeat,
    /// The probe with the previous wire format (text on port 0xe9): shows both formats agree.
    Text,
}

/// How to run a probe: bounds, allowed emulators, and the test knobs.
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
    /// Which firmware to boot: [`Firmware::Probe`] except in tests of the runner.
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

/// What can go wrong probing an x86 guest: its command line, its result, or the run itself.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The domain's CPU configuration cannot be turned into a QEMU command line.
    #[error("probe: {0}")]
    Args(#[from] ArgsError),
    /// The emulator ran but the result the probe left is missing or malformed.
    #[error("probe: output of emulator {emulator:?} is unusable: {source}")]
    Output {
        /// The emulator that ran the probe.
        emulator: PathBuf,
        /// What is wrong with the result.
        #[source]
        source: OutputError,
    },
    /// The run itself failed: no usable emulator, the work directory, spawning, a timeout or an
    /// unexpected exit (the shared runner's error).
    #[error(transparent)]
    Run(#[from] RunError),
}

/// One completed probe run with what it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    /// The CPUID table and feature MSRs the guest read, canonicalized, not yet normalized.
    pub table: CpuidTable,
    /// MSRs CPUID enumerates but whose read raised #GP.
    pub absent_msrs: Vec<u32>,
    /// The user-mode pass: CPUID at CPL3 against the table (`None` for an image without it).
    pub user_mode: Option<UserModeCpuid>,
    /// The user-mode pass's leaves as read in long mode at CPL0 (empty without long mode).
    pub long_mode_kernel: Vec<CpuidEntry>,
    /// The emulator binary that ran the probe.
    pub emulator: PathBuf,
    /// Its arguments (without the emulator itself), as run.
    pub argv: Vec<String>,
    /// Wall time of the emulator run, from start to exit.
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
    let emulator = resolve_emulator(
        config.emulator.as_deref(),
        config.arch.qemu_system(),
        &opts.allowed_emulators,
    )?;
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
    .map_err(|run_error| match check_fallback_model(config, &emulator) {
        // Only "the model is missing" explains the failure better than QEMU's own message; a
        // model list that cannot be read says nothing about it, so QEMU's error stands.
        Err(missing @ ProbeError::Args(ArgsError::FallbackModelMissing { .. })) => missing,
        _ => run_error,
    })?;
    let (argv, bytes, wall_time) = (run.argv, run.output, run.wall_time);
    let output_error = |source| ProbeError::Output {
        emulator: emulator.clone(),
        source,
    };
    let (parsed, user) = if opts.firmware == Firmware::Text {
        (self::output::parse(&bytes).map_err(output_error)?, None)
    } else {
        let (summary, records) = read_result(&ram_path)?;
        let parsed = self::output::parse_result(&summary, &records).map_err(output_error)?;
        // The probe images end with the user-mode pass and exit from it: a finished table
        // without its result is not the probe's.
        let user = self::output::parse_user(&summary)
            .ok_or_else(|| output_error(OutputError::NoResult))?;
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
        let models = crate::qemu::models::qemu_cpu_models(emulator)?;
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
        .ok_or_else(|| RunError::WorkDir {
            path: path.to_path_buf(),
            reason: "the probe command line has no plain `-m MiB` to size its RAM file".into(),
        })?;
    let size = mib
        .parse::<u64>()
        .ok()
        .and_then(|m| m.checked_mul(1024 * 1024))
        .ok_or_else(|| RunError::WorkDir {
            path: path.to_path_buf(),
            reason: format!("the probe command line's `-m {mib}` is out of range"),
        })?;
    prepare_qemu_file(path, size)?;
    let path = path.to_str().ok_or_else(|| RunError::WorkDir {
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
    let error = |e: std::io::Error| RunError::WorkDir {
        path: path.to_path_buf(),
        reason: format!("reading the probe result: {e}"),
    };
    let file = File::open(path).map_err(error)?;
    let read = |(offset, len): (u64, usize)| -> Result<Vec<u8>, ProbeError> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map_err(error)?;
        Ok(buf)
    };
    let summary = read(self::output::result_span())?;
    let records = match self::output::summary_count(&summary) {
        Some(count) => read(self::output::records_span(count))?,
        None => Vec::new(),
    };
    Ok((summary, records))
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

#[cfg(test)]
mod tests {
    use super::*;

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
