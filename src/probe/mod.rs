//! The probe: a generated guest firmware that dumps the CPUID table (and feature MSRs) a guest
//! sees, booted under the domain's own emulator, machine and CPU configuration.

pub mod firmware;
pub mod output;
