//! cpuguard: refuse live migrations of KVM guests whose CPU would change.
//!
//! The library holds every domain concept; `src/main.rs` only dispatches between the libvirt hook
//! protocol and the operator CLI. Nothing in this crate links libvirt, so the hook path stays as
//! cheap as a trivial binary (libvirt costs ~14 ms per exec just to load).

// Shipped code fails with an error naming its input, never with a panic; unit tests (cfg(test))
// fail by panicking, so the rule stops there.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod aarch64;
pub mod arch;
pub mod audit;
pub mod baseline;
pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod fingerprint;
pub mod fsutil;
pub mod guard;
pub mod helper;
pub mod hook;
pub mod incoming;
pub mod install;
pub mod inventory;
pub mod live_vcpu;
pub mod matrix;
pub mod measure;
pub mod plan;
pub mod probe;
pub mod process;
pub mod qemu;
pub mod report;
pub mod signature;
pub mod stamp;
pub mod view;
pub mod x86_64;
