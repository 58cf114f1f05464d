//! The probe: a generated guest firmware that dumps the CPUID table (and feature MSRs) a guest
//! sees, booted under the domain's own emulator, machine and CPU configuration.
//!
//! - `firmware`: the images build.rs generates (probe and a heartbeat test guest).
//! - `layout`: where the probe leaves its result in guest RAM, its ports and exit values (shared
//!   with build.rs).
//! - `output`: parsing the probe's result (RAM records, or the text of the previous format) into
//!   a `CpuidTable`.
//! - `qemu_args`: the QEMU command line from a `GuestCpuConfig` (as libvirt would build it).
//! - `emulator`: deciding whether an emulator path from untrusted XML may be run.
//! - `models`: the CPU models an emulator has (for libvirt's `fallback='allow'` rule).
//! - `confine`: who and under which limits the probe's QEMU runs (libvirt's QEMU user, seccomp).
//! - `run`: running it with a wall-time bound; `probe()` is the x86 entry point.
//!
//! [`probe_view`] is the entry point for every architecture: aarch64 domains go to the
//! ID-register probe in `crate::arm`, which shares the runner.

pub mod confine;
pub mod emulator;
pub mod firmware;
pub mod layout;
pub mod models;
pub mod output;
pub mod qemu_args;
pub mod run;

pub use run::{emulator_version, probe, probe_run, Firmware, ProbeError, ProbeOptions, ProbeRun};

use crate::arm::{ArmProbeConfig, ArmProbeOptions};
use crate::domain::guest::GuestCpuConfig;
use crate::fingerprint::UserModeCpuid;
use crate::guest_view::GuestView;

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
    executable: Option<&std::path::Path>,
) -> Result<(GuestView, Vec<String>, Option<UserModeCpuid>), ProbeError> {
    if config.arch != "aarch64" {
        return run::probe_run_with(config, opts, executable)
            .map(|r| (GuestView::X86(r.table), r.filtered, r.user_mode));
    }
    let arm_error = |e| ProbeError::Aarch64(Box::new(e));
    // The emulator is resolved (and checked) as for x86, so a domain naming none gets the
    // allow-listed qemu-system-aarch64 rather than an error.
    let emulator = run::resolve_emulator(config, &opts.allowed_emulators)?;
    let mut resolved = config.clone();
    resolved.emulator = Some(emulator.to_string_lossy().into_owned());
    let mut arm = ArmProbeConfig::from_guest(&resolved).map_err(arm_error)?;
    if let Some(accel) = opts.accel_override {
        arm.accel = accel;
    }
    let arm_opts = ArmProbeOptions {
        timeout: opts.timeout,
        allowed_emulators: opts.allowed_emulators.clone(),
        work_dir: opts.work_dir.clone(),
    };
    crate::arm::probe::probe_run_with(&arm, &arm_opts, executable)
        .map(|r| (GuestView::Aarch64(r.table), Vec::new(), None))
        .map_err(arm_error)
}
