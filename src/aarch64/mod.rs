//! The aarch64 guest's view of its CPU: the ID registers, measured by a generated firmware booted
//! on QEMU's `virt` machine.
//!
//! - `sysregs`: the registers the probe reads, one table of name, encoding and fields (shared
//!   with build.rs).
//! - `table`: [`ArmIdTable`], the registers as a guest read them.
//! - `normalize`: what is set aside as per-vCPU ([`Mask`]).
//! - `diff`: field-level explanation of two tables (lost / gained / changed / informational).
//! - `probe`: the firmware generator, the QEMU command line, the bounded run and the parser.

pub mod diff;
pub mod normalize;
pub mod probe;
pub mod sysregs;
pub mod table;

pub use diff::{diff, diff_normalized, ChangeKind, Diff, Midr, RegisterChange};
pub use normalize::{normalize, Mask};
pub use probe::{
    probe, probe_run, ArmCpu, ArmProbeConfig, ArmProbeOptions, ArmProbeRun, ProbeError,
};
pub use table::{ArmIdReg, ArmIdTable};
