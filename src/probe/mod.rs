//! The probe: a generated guest firmware that dumps the CPUID table (and feature MSRs) a guest
//! sees, booted under the domain's own emulator, machine and CPU configuration.
//!
//! - `firmware`: the images build.rs generates (probe and a heartbeat test guest).
//! - `output`: parsing the probe's debugcon output into a `CpuidTable`.
//! - `qemu_args`: the QEMU command line from a `GuestCpuConfig` (as libvirt would build it).
//! - `emulator`: deciding whether an emulator path from untrusted XML may be run.
//! - `run`: running it with a wall-time bound; `probe()` is the entry point.

pub mod emulator;
pub mod firmware;
pub mod output;
pub mod qemu_args;
pub mod run;

pub use run::{emulator_version, probe, probe_run, Firmware, ProbeError, ProbeOptions, ProbeRun};
