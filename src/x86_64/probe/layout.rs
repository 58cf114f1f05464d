//! Where the x86 probe firmware puts its result and how it ends: the facts build.rs (which
//! generates the firmware) and the runner (which reads the result) must agree on, written once.
//! Dependency-free, because build.rs includes this file by path.
//!
//! The result stays in guest RAM: under KVM every byte written to an I/O port is one exit to
//! QEMU (`rep outsb` included: KVM's emulator hands OUTS to user space one element at a time,
//! measured here at ~15 µs a byte on nested KVM), while stores to RAM cost nothing. The runner
//! backs guest RAM with a file and reads the result from it once QEMU has exited.

/// isa-debugcon's port: only the fatal handler still writes there (a human-readable `F`).
pub const DEBUGCON_PORT: u16 = 0xE9;
/// isa-debug-exit's port: QEMU exits with status `(value << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// Written to isa-debug-exit when the probe completed (QEMU exit status 65).
pub const PROBE_EXIT_VALUE: u8 = 0x20;
/// Written when an unexpected CPU exception hit (QEMU exit status 97).
pub const FATAL_EXIT_VALUE: u8 = 0x30;

/// QEMU's exit status for an isa-debug-exit write of `value`.
pub const fn debug_exit_status(value: u8) -> i32 {
    ((value as i32) << 1) | 1
}

/// Physical address of the result summary, written last: [`RESULT_MAGIC`], then the status and
/// the record count as little-endian u32. Guest RAM starts zeroed, so the magic is there only
/// when the firmware got to its end (or to its fatal handler).
pub const RESULT_ADDR: u32 = 0x9000;
/// The 16 bytes that open a finished result summary (the trailing digit is the result format's
/// version).
pub const RESULT_MAGIC: &[u8; 16] = b"CPUGUARD-PROBE 2";
/// Byte offset of the status (one of the `STATUS_*` values) inside the summary.
pub const RESULT_STATUS_OFFSET: u32 = 16;
/// Byte offset of the record count inside the summary.
pub const RESULT_COUNT_OFFSET: u32 = 20;
/// Size in bytes of the whole summary: magic, status, count.
pub const RESULT_SIZE: u32 = 24;

/// Every record was written.
pub const STATUS_COMPLETE: u32 = 0;
/// The record area filled up: the table is incomplete.
pub const STATUS_OVERFLOW: u32 = 1;
/// An unexpected CPU exception hit.
pub const STATUS_FAULT: u32 = 2;

/// Records: [`RECORD_SIZE`] bytes each from [`RECORDS_ADDR`], below [`RECORDS_END`] (real-mode
/// segments 0x1000..0x9000, 16384 records; a probe writes a few hundred).
pub const RECORDS_ADDR: u32 = 0x1_0000;
/// Physical address just past the record area (exclusive); the firmware reports
/// [`STATUS_OVERFLOW`] rather than write here.
pub const RECORDS_END: u32 = 0x9_0000;
/// Eight little-endian u32: the kind, then up to six values, then zero.
pub const RECORD_SIZE: u32 = 32;

/// `C`: leaf, sub-leaf, EAX, EBX, ECX, EDX of one CPUID answer.
pub const KIND_CPUID: u32 = b'C' as u32;
/// `M`: MSR index, low and high halves of its value.
pub const KIND_MSR: u32 = b'M' as u32;
/// `X`: MSR index whose RDMSR raised #GP.
pub const KIND_MSR_ABSENT: u32 = b'X' as u32;

/// The user-mode pass: after the table, the probe enters 32-bit protected mode and, at CPL3,
/// reads these (leaf, sub-leaf) pairs again: a host whose guests' applications see other values
/// than the guest kernel (this machine's paravirtualized KVM shows the host's own CPUID to guest
/// user space) cannot hide its CPU from them. Identification and the main feature words.
pub const USER_LEAVES: [(u32, u32); 4] = [(0, 0), (1, 0), (7, 0), (0x8000_0001, 0)];
/// Summary of the user-mode pass: [`USER_MAGIC`], then the record count (u32); its records
/// (`KIND_CPUID`, [`RECORD_SIZE`] bytes each) follow at [`USER_RECORDS_ADDR`].
pub const USER_ADDR: u32 = 0x9100;
/// The 16 bytes that open the user-mode pass's summary; without them the pass did not run.
pub const USER_MAGIC: &[u8; 16] = b"CPUGUARD-CPL3 1\0";
/// Byte offset of the user-mode pass's record count (u32) inside its summary; the count holds
/// for both its record sets (CPL0 long mode and CPL3).
pub const USER_COUNT_OFFSET: u32 = 16;
/// Physical address of the records read at CPL3, one per [`USER_LEAVES`] pair.
pub const USER_RECORDS_ADDR: u32 = 0x9200;
/// The same leaves read in long mode at CPL0 just before the switch to CPL3 (same record form):
/// shows the real-mode table is what a 64-bit guest kernel sees.
pub const LONG_KERNEL_RECORDS_ADDR: u32 = 0x9300;
/// The GDT of the user-mode pass (flat code and data, ring 0 and ring 3) and its pointer.
pub const GDT_ADDR: u32 = 0x9400;
/// Physical address of the user-mode pass's GDT pointer (limit, then base), which `lgdt` loads.
pub const GDTR_ADDR: u32 = 0x9440;
/// Guest-physical span the runner reads for both summaries and the user-mode records.
pub const SUMMARY_SPAN: u32 = GDT_ADDR - RESULT_ADDR;
