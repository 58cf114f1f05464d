//! Running QEMU for a probe, whatever the guest architecture: which emulator may be run, as whom
//! and under which limits, the bounded run itself, and the CPU models an emulator offers. Each
//! architecture builds its own command line and reads its own result (`crate::x86_64::probe`,
//! `crate::aarch64::probe`); nothing here knows either.
//!
//! - `emulator`: deciding whether an emulator path from untrusted XML may be run.
//! - `confine`: who and under which limits the probe's QEMU runs (libvirt's QEMU user, seccomp).
//! - `run`: the work directory, the bounded run, `--version`, and [`RunError`].
//! - `models`: the CPU models an emulator has (for libvirt's `fallback='allow'` rule).

pub mod confine;
pub mod emulator;
pub mod models;
pub mod run;

pub use run::{emulator_version, executable_version, resolve_emulator, RunError};
