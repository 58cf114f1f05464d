//! The probe, whatever the architecture: what a guest with a domain's CPU configuration sees of
//! its CPU, measured under the domain's own emulator, machine and accelerator. Dispatches on
//! [`Arch`] to the CPUID probe (`crate::x86_64::probe`) or the ID-register probe
//! (`crate::aarch64::probe`); both run QEMU through `crate::qemu`.

use std::path::{Path, PathBuf};

use crate::aarch64::{ArmProbeConfig, ArmProbeOptions};
use crate::arch::Arch;
use crate::domain::guest::GuestCpuConfig;
use crate::qemu::run::RunError;
use crate::view::GuestView;
use crate::x86_64::UserModeCpuid;

/// The options of a probe of any architecture (the `firmware` choice only exists for x86).
pub use crate::x86_64::probe::{Firmware, ProbeOptions};

/// What can go wrong probing a guest: the architecture's probe, or the runner before it.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The x86 CPUID probe failed.
    #[error(transparent)]
    X86(#[from] crate::x86_64::probe::ProbeError),
    /// The aarch64 ID-register probe failed (including a CPU configuration it cannot reproduce).
    #[error(transparent)]
    Aarch64(#[from] crate::aarch64::ProbeError),
    /// No usable emulator before either probe ran: the XML names none and none is allowed for the
    /// architecture, or the one it names is refused.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// The checked, canonical emulator a probe of `config` runs: the XML's `<emulator>`, or when it
/// names none, the allow-listed QEMU of the domain's architecture.
pub fn resolve_emulator(
    config: &GuestCpuConfig,
    allowed: &[PathBuf],
) -> Result<PathBuf, ProbeError> {
    Ok(crate::qemu::resolve_emulator(
        config.emulator.as_deref(),
        config.arch.qemu_system(),
        allowed,
    )?)
}

/// Measures what a guest with `config` sees of its CPU: CPUID (x86) or the ID registers
/// (aarch64), under the same emulator checks, accelerator override and wall-time bound.
pub fn probe_view(config: &GuestCpuConfig, opts: &ProbeOptions) -> Result<GuestView, ProbeError> {
    probe_view_running(config, opts, None).map(|(view, _, _)| view)
}

/// [`probe_view`] with the features QEMU filtered (x86) and what the x86 probe's user-mode pass
/// found (CPUID at CPL3 against the table; `None` on aarch64), executing `executable` instead of
/// the domain's `<emulator>` (which is still resolved and checked): a running domain's own
/// binary, `/proc/PID/exe`, already checked by the caller, which still runs after a package
/// upgrade replaced the file at the `<emulator>` path.
pub fn probe_view_running(
    config: &GuestCpuConfig,
    opts: &ProbeOptions,
    executable: Option<&Path>,
) -> Result<(GuestView, Vec<String>, Option<UserModeCpuid>), ProbeError> {
    match config.arch {
        Arch::X86_64 | Arch::I686 => {
            let run = crate::x86_64::probe::probe_run_with(config, opts, executable)?;
            Ok((GuestView::X86(run.table), run.filtered, run.user_mode))
        }
        Arch::Aarch64 => {
            // The emulator is resolved (and checked) as for x86, so a domain naming none gets
            // the allow-listed qemu-system-aarch64 rather than an error.
            let emulator = resolve_emulator(config, &opts.allowed_emulators)?;
            let mut resolved = config.clone();
            resolved.emulator = Some(emulator.to_string_lossy().into_owned());
            let mut arm = ArmProbeConfig::from_guest(&resolved)?;
            if let Some(accel) = opts.accel_override {
                arm.accel = accel;
            }
            let arm_opts = ArmProbeOptions {
                timeout: opts.timeout,
                allowed_emulators: opts.allowed_emulators.clone(),
                work_dir: opts.work_dir.clone(),
            };
            let run = crate::aarch64::probe::probe_run_with(&arm, &arm_opts, executable)?;
            Ok((GuestView::Aarch64(run.table), Vec::new(), None))
        }
    }
}
