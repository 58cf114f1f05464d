//! Generates the guest firmware images cpuguard boots as `-bios` (see `src/x86_64/probe/firmware.rs`).
//!
//! Both images are 64 KiB, mapped by QEMU at 0xF0000 (and at the top of 4 GiB) and entered at the
//! reset vector F000:FFF0 in real mode. They stay in real mode: CPUID, RDMSR and port I/O all work
//! there at CPL 0, so no descriptor tables, paging or SeaBIOS are needed, and the probe finishes in
//! a few milliseconds of guest time.
//!
//! Generating them here with an assembler crate means no assembler or toolchain is needed on the
//! hypervisor, and the bytes are reproducible from this file alone.
//!
//! Probe result (src/x86_64/probe/layout.rs has the addresses, parsed by src/x86_64/probe/output.rs): binary
//! records in guest RAM — no I/O exit per value, which under KVM cost ~15 µs per byte — and a
//! summary written last, then PROBE_EXIT_VALUE to isa-debug-exit: QEMU exits with status
//! (value << 1) | 1.
//!
//! A test image keeps the previous wire format, text on port 0xe9 (one line each, lowercase hex),
//! so a test can show both formats yield the same table:
//!   `CPUGUARD-PROBE 1`                                     header, format version
//!   `C <leaf> <subleaf> <eax> <ebx> <ecx> <edx>`          one CPUID answer (8 hex digits each)
//!   `M <index> <value>`                                    MSR read (8 + 16 hex digits)
//!   `X <index>`                                            MSR read raised #GP (absent)
//!   `F`                                                    unexpected CPU exception (fatal)
//!   `END <count>`                                          count = number of C/M/X lines

use std::path::Path;

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use sha2::{Digest, Sha256};

const IMAGE_SIZE: usize = 0x10000;
/// Real-mode segment the image is mapped at (physical 0xF0000).
const ROM_SEGMENT: u16 = 0xF000;
/// Offset of the reset vector inside the image (physical 0xFFFF0).
const RESET_VECTOR: usize = 0xFFF0;
/// Fixed offsets of the exception handlers, so the IVT can be filled with constants.
const GP_HANDLER: u16 = 0xE000;
const FATAL_HANDLER: u16 = 0xE100;
/// Fixed offsets of the 32-bit code of the user-mode pass: its ring-0 entry (a far jump's target)
/// and its ring-3 part (an `iretd`'s).
const USER_PASS: u16 = 0xE200;
const USER_PASS_CPL3: u16 = 0xE400;
/// Linear address of the image (the 1 MiB alias of the ROM).
const ROM_BASE: u32 = 0xF0000;

// The probe's ports, exit values and result layout, shared with the crate.
#[allow(dead_code)]
#[path = "src/x86_64/probe/layout.rs"]
mod layout;
use layout::{
    DEBUGCON_PORT, DEBUG_EXIT_PORT, FATAL_EXIT_VALUE, GDTR_ADDR, GDT_ADDR, KIND_CPUID, KIND_MSR,
    KIND_MSR_ABSENT, LONG_KERNEL_RECORDS_ADDR, PROBE_EXIT_VALUE, RECORDS_ADDR, RECORDS_END,
    RECORD_SIZE, RESULT_ADDR, RESULT_COUNT_OFFSET, RESULT_MAGIC, RESULT_STATUS_OFFSET,
    STATUS_COMPLETE, STATUS_FAULT, STATUS_OVERFLOW, USER_ADDR, USER_COUNT_OFFSET, USER_LEAVES,
    USER_MAGIC, USER_RECORDS_ADDR,
};

const STACK_TOP: u16 = 0x7C00;
/// Line buffer in low RAM, flushed with one `rep outsb` per line (one I/O exit per line under KVM).
const LINE_BUF: u16 = 0x8000;

// Variables in low RAM (DS = 0 throughout).
const V_EAX: u64 = 0x500;
const V_EBX: u64 = 0x504;
const V_ECX: u64 = 0x508;
const V_EDX: u64 = 0x50C;
const V_LEAF: u64 = 0x510;
const V_SUB: u64 = 0x514;
/// Highest sub-leaf to query (count loops) or the sub-leaf bitmap (bitmap loops).
const V_SUBLIM: u64 = 0x518;
const V_LINES: u64 = 0x51C;
const V_GP: u64 = 0x520;
const V_RANGE_LEFT: u64 = 0x524;
const V_MSR: u64 = 0x528;
const V_L1_ECX: u64 = 0x52C;
const V_L7_EDX: u64 = 0x530;
const V_BASIC_MAX: u64 = 0x534;
const V_RANGE_BASE: u64 = 0x538;
/// Set when the record area filled up (RAM sink).
const V_OVERFLOW: u64 = 0x53C;
/// The record being written (RAM sink): kind and up to six values, copied to ES:DI.
const V_REC: u64 = 0x540;

/// Every loop over sub-leaves or leaves is bounded so a hostile or buggy CPUID cannot hang the probe.
const MAX_SUBLEAF: u32 = 63;
const MAX_LEAVES_PER_RANGE: u32 = 0xFF;

const COM1: u16 = 0x3F8;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/x86_64/probe/layout.rs");
    println!("cargo:rerun-if-changed=src/x86_64/subleaves.rs");
    let out_dir = match std::env::var("OUT_DIR") {
        Ok(dir) => dir,
        Err(e) => panic!("build.rs: OUT_DIR is not set: {e}"),
    };
    let probe = write_image(
        &out_dir,
        "probe-x86.bin",
        probe_image(MsrReads::Enumerated, Sink::Ram),
    );
    // The cache key names the probe image by its sha256; hashing 64 KiB at run time cost ~3.3
    // million instructions, a quarter of the warm incoming check (callgrind), so it is done here.
    let digest: String = Sha256::digest(&probe)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let digest_path = Path::new(&out_dir).join("probe-x86.sha256");
    if let Err(e) = std::fs::write(&digest_path, digest) {
        panic!("build.rs: writing {} failed: {e}", digest_path.display());
    }
    write_image(
        &out_dir,
        "probe-msr-selftest-x86.bin",
        probe_image(MsrReads::Selftest, Sink::Ram),
    );
    write_image(
        &out_dir,
        "probe-text-x86.bin",
        probe_image(MsrReads::Enumerated, Sink::Debugcon),
    );
    write_image(
        &out_dir,
        "probe-floor-x86.bin",
        probe_image(MsrReads::Enumerated, Sink::Nowhere),
    );
    write_image(&out_dir, "heartbeat.bin", heartbeat_image());
    write_image(&out_dir, "exit.bin", exit_image());
    write_image(&out_dir, "probe-aarch64.bin", arm_probe_image());
    write_image(&out_dir, "heartbeat-aarch64.bin", arm_heartbeat_image());
}

/// A guest that quits at once through isa-debug-exit: the baseline "bare QEMU start-to-quit" the
/// probe's cost is measured against (benches/probe.rs). Same exit value as the probe.
fn exit_image() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    prologue(&mut a)?;
    a.mov(dx, u32::from(DEBUG_EXIT_PORT))?;
    a.mov(al, u32::from(PROBE_EXIT_VALUE))?;
    a.out(dx, al)?;
    a.hlt()?;
    Ok(layout(a.assemble(0)?, &[]))
}

fn write_image(out_dir: &str, name: &str, image: Result<Vec<u8>, IcedError>) -> Vec<u8> {
    let image = match image {
        Ok(image) => image,
        Err(e) => panic!("build.rs: assembling {name} failed: {e}"),
    };
    let path = Path::new(out_dir).join(name);
    if let Err(e) = std::fs::write(&path, &image) {
        panic!("build.rs: writing {} failed: {e}", path.display());
    }
    image
}

/// Lays out a 64 KiB image: main code at offset 0, handlers at their fixed offsets, and at the reset
/// vector a far jump to F000:0000 (so code runs with CS base 0xF0000, inside the 1 MiB alias).
fn layout(main: Vec<u8>, extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut image = vec![0xF4u8; IMAGE_SIZE]; // hlt everywhere else
    assert!(main.len() < usize::from(GP_HANDLER), "main code too large");
    image[..main.len()].copy_from_slice(&main);
    let mut ends: Vec<(usize, usize)> = Vec::new();
    for (offset, code) in extra {
        let start = usize::from(*offset);
        let end = start + code.len();
        assert!(end < RESET_VECTOR, "handler too large");
        // Fixed offsets: a block grown past the next one's start would be overwritten by it.
        assert!(
            ends.iter().all(|&(s, e)| end <= s || start >= e),
            "code block at {start:#x} overlaps another"
        );
        ends.push((start, end));
        image[start..end].copy_from_slice(code);
    }
    let [seg_lo, seg_hi] = ROM_SEGMENT.to_le_bytes();
    // jmp far F000:0000
    image[RESET_VECTOR..RESET_VECTOR + 5].copy_from_slice(&[0xEA, 0x00, 0x00, seg_lo, seg_hi]);
    image
}

/// Common start: interrupts off, flat low segments, a stack in low RAM.
fn prologue(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cli()?;
    a.cld()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, u32::from(STACK_TOP))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The CPUID probe
// ---------------------------------------------------------------------------------------------

// Which leaves have sub-leaves and how each is enumerated: shared with the crate, which names
// locations by the same list.
#[path = "src/x86_64/subleaves.rs"]
#[allow(dead_code)]
mod subleaves;
use subleaves::{OutReg, Subleaves, SUBLEAF_RULES};

/// Where the generated program keeps the register `reg` of the last CPUID.
fn out_reg_var(reg: OutReg) -> u64 {
    match reg {
        OutReg::Eax => V_EAX,
        OutReg::Ebx => V_EBX,
        OutReg::Ecx => V_ECX,
        OutReg::Edx => V_EDX,
    }
}

struct ProbeLabels {
    hex32: CodeLabel,
    flush: CodeLabel,
    query: CodeLabel,
    query_emit: CodeLabel,
    do_leaf: CodeLabel,
    range: CodeLabel,
    range_if_valid: CodeLabel,
    msr: CodeLabel,
    record: CodeLabel,
}

/// Where the probe puts what it measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// Binary records in guest RAM (src/x86_64/probe/layout.rs): the probe.
    Ram,
    /// Text lines on port 0xe9, one `rep outsb` each: the previous wire format, kept as a test
    /// image.
    Debugcon,
    /// Nowhere: the same CPUIDs and RDMSRs, nothing kept. The floor the probe's cost is measured
    /// against (benches/probe.rs): what the table's own exits cost.
    Nowhere,
}

/// RAM sink: fills V_REC with `kind` and the dwords at `vars`, then writes the record.
fn put_record(
    a: &mut CodeAssembler,
    l: &ProbeLabels,
    kind: u32,
    vars: &[u64],
) -> Result<(), IcedError> {
    a.mov(dword_ptr(V_REC), kind)?;
    for (i, var) in (1u64..).zip(vars) {
        a.mov(eax, dword_ptr(*var))?;
        a.mov(dword_ptr(V_REC + 4 * i), eax)?;
    }
    for i in vars.len() as u64 + 1..8 {
        a.mov(dword_ptr(V_REC + 4 * i), 0u32)?;
    }
    a.call(l.record)
}

/// Appends the fixed text to the line buffer at ES:DI.
fn put_str(a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    for byte in text.bytes() {
        a.mov(byte_ptr(di), u32::from(byte))?;
        a.inc(di)?;
    }
    Ok(())
}

/// Appends " " and the dword at `var` as 8 hex digits.
fn put_var(a: &mut CodeAssembler, l: &ProbeLabels, var: u64) -> Result<(), IcedError> {
    put_str(a, " ")?;
    a.mov(eax, dword_ptr(var))?;
    a.call(l.hex32)?;
    Ok(())
}

/// Which MSRs the probe reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MsrReads {
    /// The real probe: each feature MSR only where CPUID enumerates it.
    Enumerated,
    /// A test image: a fixed list read unconditionally, so the RDMSR path and the #GP handler can
    /// be exercised under TCG (which enumerates none of the feature MSRs).
    Selftest,
}

/// MSRs the selftest image reads: APIC_BASE and EFER exist on every x86-64 CPU QEMU models;
/// 0x480 (VMX basic) does not exist without VMX; 0x4D000000 is not an MSR at all.
const SELFTEST_MSRS: [u32; 4] = [0x1B, 0xC000_0080, 0x480, 0x4D00_0000];

fn probe_image(msr_reads: MsrReads, sink: Sink) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    let mut l = ProbeLabels {
        hex32: a.create_label(),
        flush: a.create_label(),
        query: a.create_label(),
        query_emit: a.create_label(),
        do_leaf: a.create_label(),
        range: a.create_label(),
        range_if_valid: a.create_label(),
        msr: a.create_label(),
        record: a.create_label(),
    };

    // ---- entry ----
    prologue(&mut a)?;
    // IVT: every exception vector to the fatal handler, #GP (13) to the RDMSR skipper.
    a.xor(bx, bx)?;
    a.mov(cx, 32u32)?;
    let mut ivt_loop = a.create_label();
    a.set_label(&mut ivt_loop)?;
    a.mov(word_ptr(bx), u32::from(FATAL_HANDLER))?;
    a.mov(word_ptr(bx + 2), u32::from(ROM_SEGMENT))?;
    a.add(bx, 4)?;
    a.dec(cx)?;
    a.jnz(ivt_loop)?;
    a.mov(word_ptr(13 * 4), u32::from(GP_HANDLER))?;
    for var in [V_LINES, V_GP, V_L1_ECX, V_L7_EDX, V_BASIC_MAX, V_OVERFLOW] {
        a.mov(dword_ptr(var), 0u32)?;
    }
    match sink {
        Sink::Debugcon => {
            a.mov(di, u32::from(LINE_BUF))?;
            put_str(&mut a, "CPUGUARD-PROBE 1")?;
            a.call(l.flush)?;
            a.mov(dword_ptr(V_LINES), 0u32)?;
        }
        Sink::Nowhere => {}
        Sink::Ram => {
            // Records go to ES:DI; DS stays 0 for the variables.
            a.mov(ax, RECORDS_ADDR >> 4)?;
            a.mov(es, ax)?;
            a.xor(di, di)?;
        }
    }

    // Basic, hypervisor and extended ranges; a second hypervisor range at 0x40000100 exists when
    // QEMU exposes Hyper-V leaves at 0x40000000 and moves KVM's there; 0xC0000000 is Centaur/Zhaoxin.
    for (base, always) in [
        (0u32, true),
        (0x4000_0000, true),
        (0x4000_0100, false),
        (0x8000_0000, true),
        (0xC000_0000, false),
    ] {
        a.mov(dword_ptr(V_LEAF), base)?;
        a.call(if always { l.range } else { l.range_if_valid })?;
    }

    // Facts that decide which MSRs exist.
    a.mov(dword_ptr(V_LEAF), 0u32)?;
    a.mov(dword_ptr(V_SUB), 0u32)?;
    a.call(l.query)?;
    a.mov(eax, dword_ptr(V_EAX))?;
    a.mov(dword_ptr(V_BASIC_MAX), eax)?;
    a.mov(dword_ptr(V_LEAF), 1u32)?;
    a.call(l.query)?;
    a.mov(eax, dword_ptr(V_ECX))?;
    a.mov(dword_ptr(V_L1_ECX), eax)?;
    let mut no_leaf7 = a.create_label();
    a.cmp(dword_ptr(V_BASIC_MAX), 7u32)?;
    a.jb(no_leaf7)?;
    a.mov(dword_ptr(V_LEAF), 7u32)?;
    a.call(l.query)?;
    a.mov(eax, dword_ptr(V_EDX))?;
    a.mov(dword_ptr(V_L7_EDX), eax)?;
    a.set_label(&mut no_leaf7)?;

    if msr_reads == MsrReads::Selftest {
        for index in SELFTEST_MSRS {
            a.mov(dword_ptr(V_MSR), index)?;
            a.call(l.msr)?;
        }
    }

    // (MSR, CPUID fact variable, bit) — each MSR is read only where CPUID enumerates it.
    let msr_rules: [(u32, u64, u32); 3] = [
        (0x10A, V_L7_EDX, 29), // IA32_ARCH_CAPABILITIES
        (0xCF, V_L7_EDX, 30),  // IA32_CORE_CAPABILITIES
        (0x345, V_L1_ECX, 15), // IA32_PERF_CAPABILITIES (PDCM)
    ];
    for (index, var, bit) in msr_rules {
        let mut skip = a.create_label();
        a.test(dword_ptr(var), 1u32 << bit)?;
        a.jz(skip)?;
        a.mov(dword_ptr(V_MSR), index)?;
        a.call(l.msr)?;
        a.set_label(&mut skip)?;
    }
    // VMX capability MSRs when VMX is exposed (CPUID.1:ECX[5]); some exist only when others say
    // so, and the #GP handler records those that do not.
    let mut no_vmx = a.create_label();
    a.test(dword_ptr(V_L1_ECX), 1u32 << 5)?;
    a.jz(no_vmx)?;
    for index in 0x480u32..=0x493 {
        a.mov(dword_ptr(V_MSR), index)?;
        a.call(l.msr)?;
    }
    a.set_label(&mut no_vmx)?;

    match sink {
        Sink::Debugcon => {
            // End marker with the line count, then exit.
            put_str(&mut a, "END")?;
            put_var(&mut a, &l, V_LINES)?;
            a.call(l.flush)?;
        }
        Sink::Ram => {
            // Status and count, then the magic last: it marks a finished result.
            let mut full = a.create_label();
            let mut status_set = a.create_label();
            a.cmp(dword_ptr(V_OVERFLOW), 0u32)?;
            a.jne(full)?;
            a.mov(
                dword_ptr(u64::from(RESULT_ADDR + RESULT_STATUS_OFFSET)),
                STATUS_COMPLETE,
            )?;
            a.jmp(status_set)?;
            a.set_label(&mut full)?;
            a.mov(
                dword_ptr(u64::from(RESULT_ADDR + RESULT_STATUS_OFFSET)),
                STATUS_OVERFLOW,
            )?;
            a.set_label(&mut status_set)?;
            a.mov(eax, dword_ptr(V_LINES))?;
            a.mov(dword_ptr(u64::from(RESULT_ADDR + RESULT_COUNT_OFFSET)), eax)?;
            put_magic(&mut a)?;
        }
        Sink::Nowhere => {}
    }
    if sink != Sink::Debugcon {
        // The user-mode pass runs in long mode and ends the probe (it exits from CPL3). A CPU
        // without long mode (an i686 guest's) gets an empty pass: nothing compared.
        let mut no_long_mode = a.create_label();
        a.mov(eax, 0x8000_0000u32)?;
        a.cpuid()?;
        a.cmp(eax, 0x8000_0001u32)?;
        a.jb(no_long_mode)?;
        a.mov(eax, 0x8000_0001u32)?;
        a.cpuid()?;
        a.test(edx, 1u32 << 29)?;
        a.jz(no_long_mode)?;
        enter_user_pass(&mut a)?;
        a.set_label(&mut no_long_mode)?;
        a.mov(dword_ptr(u64::from(USER_ADDR + USER_COUNT_OFFSET)), 0u32)?;
        put_user_magic(&mut a)?;
    }
    a.mov(al, u32::from(PROBE_EXIT_VALUE))?;
    a.out(u32::from(DEBUG_EXIT_PORT), al)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;

    // ---- hex32: EAX as 8 hex digits at ES:DI ----
    a.set_label(&mut l.hex32)?;
    a.push(ecx)?;
    a.push(edx)?;
    a.mov(ecx, 8u32)?;
    let mut digit = a.create_label();
    let mut decimal = a.create_label();
    a.set_label(&mut digit)?;
    a.rol(eax, 4)?;
    a.mov(dl, al)?;
    a.and(dl, 0x0F)?;
    a.add(dl, i32::from(b'0'))?;
    a.cmp(dl, i32::from(b'9'))?;
    a.jbe(decimal)?;
    a.add(dl, i32::from(b'a' - b'9' - 1))?;
    a.set_label(&mut decimal)?;
    a.mov(byte_ptr(di), dl)?;
    a.inc(di)?;
    a.dec(ecx)?;
    a.jnz(digit)?;
    a.pop(edx)?;
    a.pop(ecx)?;
    a.ret()?;

    // ---- flush: terminate the line, send it to port 0xe9, count it ----
    a.set_label(&mut l.flush)?;
    a.mov(byte_ptr(di), u32::from(b'\n'))?;
    a.inc(di)?;
    a.mov(cx, di)?;
    a.sub(cx, i32::from(LINE_BUF))?;
    a.mov(si, u32::from(LINE_BUF))?;
    a.mov(dx, u32::from(DEBUGCON_PORT))?;
    a.rep().outsb()?;
    a.mov(di, u32::from(LINE_BUF))?;
    a.inc(dword_ptr(V_LINES))?;
    a.ret()?;

    // ---- query: CPUID(V_LEAF, V_SUB) into V_EAX..V_EDX ----
    a.set_label(&mut l.query)?;
    a.mov(eax, dword_ptr(V_LEAF))?;
    a.mov(ecx, dword_ptr(V_SUB))?;
    a.cpuid()?;
    a.mov(dword_ptr(V_EAX), eax)?;
    a.mov(dword_ptr(V_EBX), ebx)?;
    a.mov(dword_ptr(V_ECX), ecx)?;
    a.mov(dword_ptr(V_EDX), edx)?;
    a.ret()?;

    // ---- query_emit: query, then one "C" line ----
    a.set_label(&mut l.query_emit)?;
    a.call(l.query)?;
    let answer = [V_LEAF, V_SUB, V_EAX, V_EBX, V_ECX, V_EDX];
    match sink {
        Sink::Debugcon => {
            put_str(&mut a, "C")?;
            for var in answer {
                put_var(&mut a, &l, var)?;
            }
            a.call(l.flush)?;
        }
        Sink::Ram => put_record(&mut a, &l, KIND_CPUID, &answer)?,
        Sink::Nowhere => {}
    }
    a.ret()?;

    // ---- record: V_REC (kind + 7 dwords) to ES:DI, count it, advance; full area: flag it ----
    a.set_label(&mut l.record)?;
    let mut room = a.create_label();
    let mut advanced = a.create_label();
    a.mov(ax, es)?;
    a.cmp(ax, RECORDS_END >> 4)?;
    a.jb(room)?;
    a.mov(dword_ptr(V_OVERFLOW), 1u32)?;
    a.ret()?;
    a.set_label(&mut room)?;
    for i in 0..u64::from(RECORD_SIZE / 4) {
        a.mov(eax, dword_ptr(V_REC + 4 * i))?;
        a.mov(dword_ptr(di + 4 * i as i32).es(), eax)?;
    }
    a.inc(dword_ptr(V_LINES))?;
    // 64 KiB is a whole number of records: when DI wraps, move ES on by 64 KiB.
    a.add(di, RECORD_SIZE as i32)?;
    a.jnz(advanced)?;
    a.mov(ax, es)?;
    a.add(ax, 0x1000)?;
    a.mov(es, ax)?;
    a.set_label(&mut advanced)?;
    a.ret()?;

    // ---- do_leaf: every sub-leaf of V_LEAF ----
    a.set_label(&mut l.do_leaf)?;
    a.mov(dword_ptr(V_SUB), 0u32)?;
    a.mov(eax, dword_ptr(V_LEAF))?;
    let rules = SUBLEAF_RULES;
    let mut rule_labels = Vec::new();
    for (leaf, _) in rules {
        let label = a.create_label();
        a.cmp(eax, *leaf)?;
        a.je(label)?;
        rule_labels.push(label);
    }
    a.call(l.query_emit)?;
    a.ret()?;
    for ((_, rule), mut label) in rules.iter().zip(rule_labels) {
        a.set_label(&mut label)?;
        emit_subleaf_rule(&mut a, &l, *rule)?;
    }

    // ---- range: V_LEAF = base; base entry, then base+1..=EAX (bounded) ----
    a.set_label(&mut l.range)?;
    a.mov(dword_ptr(V_SUB), 0u32)?;
    a.mov(eax, dword_ptr(V_LEAF))?;
    a.mov(dword_ptr(V_RANGE_BASE), eax)?;
    a.call(l.query_emit)?;
    a.mov(eax, dword_ptr(V_EAX))?;
    a.sub(eax, dword_ptr(V_RANGE_BASE))?;
    let mut in_bounds = a.create_label();
    a.cmp(eax, MAX_LEAVES_PER_RANGE)?;
    a.jbe(in_bounds)?;
    // A maximum below the base or far above it is not a range (e.g. TCG answers an unknown
    // hypervisor leaf with the highest basic leaf): record only the base entry.
    a.xor(eax, eax)?;
    a.set_label(&mut in_bounds)?;
    a.mov(dword_ptr(V_RANGE_LEFT), eax)?;
    let mut range_next = a.create_label();
    let mut range_done = a.create_label();
    a.set_label(&mut range_next)?;
    a.cmp(dword_ptr(V_RANGE_LEFT), 0u32)?;
    a.je(range_done)?;
    a.dec(dword_ptr(V_RANGE_LEFT))?;
    a.inc(dword_ptr(V_LEAF))?;
    a.call(l.do_leaf)?;
    a.jmp(range_next)?;
    a.set_label(&mut range_done)?;
    a.ret()?;

    // ---- range_if_valid: the range only if its base answers with a maximum inside it ----
    a.set_label(&mut l.range_if_valid)?;
    a.mov(dword_ptr(V_SUB), 0u32)?;
    a.call(l.query)?;
    a.mov(eax, dword_ptr(V_EAX))?;
    a.sub(eax, dword_ptr(V_LEAF))?;
    let mut invalid = a.create_label();
    a.cmp(eax, MAX_LEAVES_PER_RANGE)?;
    a.ja(invalid)?;
    a.call(l.range)?;
    a.set_label(&mut invalid)?;
    a.ret()?;

    // ---- msr: RDMSR(V_MSR) → "M" or "X" line ----
    a.set_label(&mut l.msr)?;
    a.mov(byte_ptr(V_GP), 0u32)?;
    a.mov(ecx, dword_ptr(V_MSR))?;
    a.xor(eax, eax)?;
    a.xor(edx, edx)?;
    // Must stay the 2-byte 0F 32: the #GP handler resumes 2 bytes after the faulting instruction.
    a.rdmsr()?;
    let mut absent = a.create_label();
    a.cmp(byte_ptr(V_GP), 0u32)?;
    a.jne(absent)?;
    a.mov(dword_ptr(V_EAX), eax)?;
    a.mov(dword_ptr(V_EDX), edx)?;
    match sink {
        Sink::Debugcon => {
            put_str(&mut a, "M")?;
            put_var(&mut a, &l, V_MSR)?;
            put_var(&mut a, &l, V_EDX)?;
            a.mov(eax, dword_ptr(V_EAX))?;
            a.call(l.hex32)?;
            a.call(l.flush)?;
        }
        Sink::Ram => put_record(&mut a, &l, KIND_MSR, &[V_MSR, V_EAX, V_EDX])?,
        Sink::Nowhere => {}
    }
    a.ret()?;
    a.set_label(&mut absent)?;
    match sink {
        Sink::Debugcon => {
            put_str(&mut a, "X")?;
            put_var(&mut a, &l, V_MSR)?;
            a.call(l.flush)?;
        }
        Sink::Ram => put_record(&mut a, &l, KIND_MSR_ABSENT, &[V_MSR])?,
        Sink::Nowhere => {}
    }
    a.ret()?;

    let main = a.assemble(0)?;
    Ok(layout(
        main,
        &[
            (GP_HANDLER, gp_handler()?),
            (FATAL_HANDLER, fatal_handler()?),
            (USER_PASS, user_pass_entry()?),
            (USER_PASS_CPL3, user_pass()?),
        ],
    ))
}

/// Descriptors: 64-bit ring-0 code, ring-0 data, 64-bit ring-3 code, ring-3 data (selectors
/// 0x08..0x20).
const GDT: [u64; 5] = [
    0,
    0x00AF_9A00_0000_FFFF,
    0x00CF_9200_0000_FFFF,
    0x00AF_FA00_0000_FFFF,
    0x00CF_F200_0000_FFFF,
];
const KERNEL_CODE: u32 = 0x08;
const KERNEL_DATA: u32 = 0x10;
const USER_CODE: u32 = 0x18 | 3;
const USER_DATA: u32 = 0x20 | 3;
/// Page tables of the user-mode pass: one PML4, PDPT and PD entry, the first 2 MiB identity
/// mapped with user access (the ROM's 1 MiB alias and the result area lie in it).
const PML4_ADDR: u32 = 0xA000;
const PDPT_ADDR: u32 = 0xB000;
const PD_ADDR: u32 = 0xC000;
/// Present, writable, user.
const PAGE_TABLE_FLAGS: u32 = 0x7;
/// Present, writable, user, 2 MiB page.
const LARGE_PAGE_FLAGS: u32 = 0x87;
const MSR_EFER: u32 = 0xC000_0080;

/// Real mode to long mode at the user-mode pass (no way back: it exits QEMU). Long mode because
/// that is where guest applications run (a 32-bit protected-mode ring 3 does not even start on
/// this machine's paravirtualized KVM: the `iretd` to CPL3 never completes).
fn enter_user_pass(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cli()?;
    for (i, descriptor) in (0u64..).zip(GDT) {
        let at = u64::from(GDT_ADDR) + 8 * i;
        a.mov(dword_ptr(at), descriptor as u32)?;
        a.mov(dword_ptr(at + 4), (descriptor >> 32) as u32)?;
    }
    a.mov(word_ptr(u64::from(GDTR_ADDR)), (GDT.len() * 8 - 1) as u32)?;
    a.mov(dword_ptr(u64::from(GDTR_ADDR) + 2), GDT_ADDR)?;
    a.lgdt(ptr(u64::from(GDTR_ADDR)))?;
    // Guest RAM starts zeroed: only entry 0 of each table is written.
    for (table, entry) in [
        (PML4_ADDR, PDPT_ADDR | PAGE_TABLE_FLAGS),
        (PDPT_ADDR, PD_ADDR | PAGE_TABLE_FLAGS),
        (PD_ADDR, LARGE_PAGE_FLAGS),
    ] {
        a.mov(dword_ptr(u64::from(table)), entry)?;
        a.mov(dword_ptr(u64::from(table) + 4), 0u32)?;
    }
    a.mov(eax, cr4)?;
    a.or(eax, 1 << 5)?; // PAE
    a.mov(cr4, eax)?;
    a.mov(eax, PML4_ADDR)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.or(eax, 1 << 8)?; // LME
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0001u32 as i32)?; // PG, PE
    a.mov(cr0, eax)?;
    // jmp far KERNEL_CODE:(ROM_BASE + USER_PASS), 32-bit offset (66 EA): lands in 64-bit mode.
    let target = (ROM_BASE + u32::from(USER_PASS)).to_le_bytes();
    a.db(&[
        0x66,
        0xEA,
        target[0],
        target[1],
        target[2],
        target[3],
        KERNEL_CODE as u8,
        0,
    ])?;
    Ok(())
}

/// The user-mode pass, 64-bit, ring 0: an `iretq` to CPL3 with IOPL 3 (so the exit port needs
/// no return to ring 0, and no TSS or IDT is needed). An exception in the pass has no handler:
/// QEMU ends with a triple fault (-no-reboot), which the runner reports as a failed probe.
fn user_pass_entry() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(ax, KERNEL_DATA)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(esp, u32::from(STACK_TOP))?;
    put_cpuid_records(&mut a, LONG_KERNEL_RECORDS_ADDR)?;
    a.push(USER_DATA as i32)?;
    a.push(i32::from(STACK_TOP) - 0x400)?;
    a.push(0x3002)?; // RFLAGS: IOPL 3, interrupts off
    a.push(USER_CODE as i32)?;
    a.push((ROM_BASE + u32::from(USER_PASS_CPL3)) as i32)?;
    a.iretq()?;
    a.assemble(u64::from(ROM_BASE) + u64::from(USER_PASS))
}

/// The ring-3 part of the user-mode pass (see [`user_pass_entry`]): the USER_LEAVES queried at
/// CPL3 into records, the count and the magic, and the exit.
fn user_pass() -> Result<Vec<u8>, IcedError> {
    let base = u64::from(ROM_BASE) + u64::from(USER_PASS_CPL3);
    let mut a = CodeAssembler::new(64)?;
    put_cpuid_records(&mut a, USER_RECORDS_ADDR)?;
    a.mov(
        dword_ptr(u64::from(USER_ADDR + USER_COUNT_OFFSET)),
        USER_LEAVES.len() as u32,
    )?;
    put_user_magic(&mut a)?;
    a.mov(al, u32::from(PROBE_EXIT_VALUE))?;
    a.out(u32::from(DEBUG_EXIT_PORT), al)?;
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.jmp(spin)?;
    a.assemble(base)
}

/// 64-bit: the USER_LEAVES as CPUID records from `at`.
fn put_cpuid_records(a: &mut CodeAssembler, at: u32) -> Result<(), IcedError> {
    a.mov(edi, at)?;
    for (leaf, subleaf) in USER_LEAVES {
        a.mov(eax, leaf)?;
        a.mov(ecx, subleaf)?;
        a.cpuid()?;
        a.mov(dword_ptr(rdi), KIND_CPUID)?;
        a.mov(dword_ptr(rdi + 4), leaf)?;
        a.mov(dword_ptr(rdi + 8), subleaf)?;
        a.mov(dword_ptr(rdi + 12), eax)?;
        a.mov(dword_ptr(rdi + 16), ebx)?;
        a.mov(dword_ptr(rdi + 20), ecx)?;
        a.mov(dword_ptr(rdi + 24), edx)?;
        a.mov(dword_ptr(rdi + 28), 0u32)?;
        a.add(edi, RECORD_SIZE as i32)?;
    }
    Ok(())
}

/// Emits the sub-leaf walk for one leaf (V_LEAF set, V_SUB = 0), ending in `ret`.
fn emit_subleaf_rule(
    a: &mut CodeAssembler,
    l: &ProbeLabels,
    rule: Subleaves,
) -> Result<(), IcedError> {
    let mut done = a.create_label();
    match rule {
        Subleaves::MaxInEax | Subleaves::Fixed(_) => {
            a.call(l.query_emit)?;
            match rule {
                Subleaves::Fixed(last) => a.mov(dword_ptr(V_SUBLIM), last)?,
                _ => {
                    let mut capped = a.create_label();
                    a.mov(eax, dword_ptr(V_EAX))?;
                    a.cmp(eax, MAX_SUBLEAF)?;
                    a.jbe(capped)?;
                    a.mov(eax, MAX_SUBLEAF)?;
                    a.set_label(&mut capped)?;
                    a.mov(dword_ptr(V_SUBLIM), eax)?;
                }
            }
            let mut next = a.create_label();
            a.set_label(&mut next)?;
            a.mov(eax, dword_ptr(V_SUB))?;
            a.cmp(eax, dword_ptr(V_SUBLIM))?;
            a.jae(done)?;
            a.inc(dword_ptr(V_SUB))?;
            a.call(l.query_emit)?;
            a.jmp(next)?;
        }
        Subleaves::Until { first, reg, mask } => {
            // Sub-leaves below `first` are always defined (SGX 0 and 1).
            for _ in 0..first {
                a.call(l.query_emit)?;
                a.inc(dword_ptr(V_SUB))?;
            }
            a.call(l.query_emit)?;
            let mut check = a.create_label();
            a.set_label(&mut check)?;
            a.test(dword_ptr(out_reg_var(reg)), mask)?;
            a.jz(done)?;
            a.cmp(dword_ptr(V_SUB), MAX_SUBLEAF)?;
            a.jae(done)?;
            a.inc(dword_ptr(V_SUB))?;
            a.call(l.query_emit)?;
            a.jmp(check)?;
        }
        Subleaves::Bitmap { reg } => {
            a.call(l.query_emit)?;
            a.mov(eax, dword_ptr(out_reg_var(reg)))?;
            a.mov(dword_ptr(V_SUBLIM), eax)?;
            let mut next = a.create_label();
            a.set_label(&mut next)?;
            a.inc(dword_ptr(V_SUB))?;
            a.cmp(dword_ptr(V_SUB), 32u32)?;
            a.jae(done)?;
            a.mov(ecx, dword_ptr(V_SUB))?;
            a.mov(eax, dword_ptr(V_SUBLIM))?;
            a.shr(eax, cl)?;
            a.test(al, 1)?;
            a.jz(next)?;
            a.call(l.query_emit)?;
            a.jmp(next)?;
        }
    }
    a.set_label(&mut done)?;
    a.ret()?;
    Ok(())
}

/// Writes [`USER_MAGIC`] at USER_ADDR (any bitness: absolute dword stores).
fn put_user_magic(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (offset, chunk) in (0u64..).step_by(4).zip(USER_MAGIC.chunks(4)) {
        let mut word = [0u8; 4];
        word.copy_from_slice(chunk);
        a.mov(
            dword_ptr(u64::from(USER_ADDR) + offset),
            u32::from_le_bytes(word),
        )?;
    }
    Ok(())
}

/// Writes [`RESULT_MAGIC`] at RESULT_ADDR (DS = 0): the result is complete from here on.
fn put_magic(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (offset, chunk) in (0u64..).step_by(4).zip(RESULT_MAGIC.chunks(4)) {
        let mut word = [0u8; 4];
        word.copy_from_slice(chunk);
        a.mov(
            dword_ptr(u64::from(RESULT_ADDR) + offset),
            u32::from_le_bytes(word),
        )?;
    }
    Ok(())
}

/// #GP in real mode pushes FLAGS, CS, IP (no error code); the only instruction expected to fault is
/// the 2-byte RDMSR, so resume after it and flag the MSR as absent.
fn gp_handler() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.push(bp)?;
    a.mov(bp, sp)?;
    a.add(word_ptr(bp + 2), 2)?;
    a.mov(byte_ptr(V_GP), 1u32)?;
    a.pop(bp)?;
    a.iret()?;
    a.assemble(u64::from(GP_HANDLER))
}

/// Any other exception means the probe cannot be trusted: say so and exit with a distinct status,
/// instead of running off into zeroed memory until the wall-time bound.
fn fatal_handler() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(eax, dword_ptr(V_LINES))?;
    a.mov(dword_ptr(u64::from(RESULT_ADDR + RESULT_COUNT_OFFSET)), eax)?;
    a.mov(
        dword_ptr(u64::from(RESULT_ADDR + RESULT_STATUS_OFFSET)),
        STATUS_FAULT,
    )?;
    put_magic(&mut a)?;
    a.mov(dx, u32::from(DEBUGCON_PORT))?;
    for byte in b"\nF\n" {
        a.mov(al, u32::from(*byte))?;
        a.out(dx, al)?;
    }
    a.mov(al, u32::from(FATAL_EXIT_VALUE))?;
    a.out(u32::from(DEBUG_EXIT_PORT), al)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;
    a.assemble(u64::from(FATAL_HANDLER))
}

// ---------------------------------------------------------------------------------------------
// The heartbeat test guest
// ---------------------------------------------------------------------------------------------

/// Writes "heartbeat NNNNNN\r\n" to COM1 forever, with ~0.3 s of PIT-timed delay between lines, so
/// a serial log grows slowly and steadily (tests of migration and of timeouts use it).
fn heartbeat_image() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    let mut putc = a.create_label();
    let mut delay = a.create_label();

    prologue(&mut a)?;
    // COM1: 115200 8N1, FIFOs on.
    for (port, value) in [
        (3u16, 0x80u32),
        (0, 0x01),
        (1, 0x00),
        (3, 0x03),
        (2, 0xC7),
        (4, 0x03),
    ] {
        a.mov(dx, u32::from(COM1 + port))?;
        a.mov(al, value)?;
        a.out(dx, al)?;
    }
    a.xor(ebx, ebx)?;
    let mut line = a.create_label();
    a.set_label(&mut line)?;
    for byte in b"heartbeat " {
        a.mov(ah, u32::from(*byte))?;
        a.call(putc)?;
    }
    // Six decimal digits of the counter, least significant first into RAM at 0x600..0x606.
    a.mov(eax, ebx)?;
    a.mov(esi, 10u32)?;
    for i in (0..6u64).rev() {
        a.xor(edx, edx)?;
        a.div(esi)?;
        a.add(dl, i32::from(b'0'))?;
        a.mov(byte_ptr(0x600 + i), dl)?;
    }
    for i in 0..6u64 {
        a.mov(ah, byte_ptr(0x600 + i))?;
        a.call(putc)?;
    }
    for byte in b"\r\n" {
        a.mov(ah, u32::from(*byte))?;
        a.call(putc)?;
    }
    a.inc(ebx)?;
    a.call(delay)?;
    a.jmp(line)?;

    // putc: AH to COM1 once the transmitter holds nothing (bounded wait).
    a.set_label(&mut putc)?;
    a.mov(cx, 0xFFFFu32)?;
    a.mov(dx, u32::from(COM1 + 5))?;
    let mut wait = a.create_label();
    let mut ready = a.create_label();
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jnz(ready)?;
    a.dec(cx)?;
    a.jnz(wait)?;
    a.set_label(&mut ready)?;
    a.mov(al, ah)?;
    a.mov(dx, u32::from(COM1))?;
    a.out(dx, al)?;
    a.ret()?;

    // delay: 6 one-shots of PIT channel 2 (65535 / 1.193182 MHz = 55 ms each), polled through
    // port 0x61 bit 5; timed by the virtual PIT, so the rate does not depend on host speed.
    a.set_label(&mut delay)?;
    a.mov(si, 6u32)?;
    let mut shot = a.create_label();
    a.set_label(&mut shot)?;
    a.mov(al, 0xB0u32)?; // channel 2, lo/hi byte, mode 0, binary
    a.out(0x43u32, al)?;
    a.mov(al, 0xFFu32)?;
    a.out(0x42u32, al)?;
    a.out(0x42u32, al)?;
    a.in_(al, 0x61u32)?;
    a.and(al, 0xFC)?;
    a.or(al, 0x01)?; // gate on, speaker off
    a.out(0x61u32, al)?;
    // Bounded so a machine without a working PIT still produces lines, just at another pace.
    a.mov(ecx, 0x0040_0000u32)?;
    let mut poll = a.create_label();
    let mut expired = a.create_label();
    a.set_label(&mut poll)?;
    a.in_(al, 0x61u32)?;
    a.test(al, 0x20)?;
    a.jnz(expired)?;
    a.dec(ecx)?;
    a.jnz(poll)?;
    a.set_label(&mut expired)?;
    a.dec(si)?;
    a.jnz(shot)?;
    a.ret()?;

    let main = a.assemble(0)?;
    Ok(layout(main, &[]))
}

// ---------------------------------------------------------------------------------------------
// The aarch64 ID-register probe (src/aarch64/probe/firmware.rs holds the encoder and the program, shared
// with the library so both are unit-tested there)
// ---------------------------------------------------------------------------------------------

// The shared files also carry library API the build script does not call. The register table
// is the firmware's sibling module here as in the crate.
#[allow(dead_code)]
#[path = "src/aarch64/probe/firmware.rs"]
mod arm_firmware;
#[allow(dead_code)]
#[path = "src/aarch64/sysregs.rs"]
mod sysregs;

/// The aarch64 probe for QEMU's `virt` machine (`-bios`, entered at EL1 in flash at 0x0).
fn arm_probe_image() -> Result<Vec<u8>, IcedError> {
    println!("cargo:rerun-if-changed=src/aarch64/probe/firmware.rs");
    println!("cargo:rerun-if-changed=src/aarch64/sysregs.rs");
    match arm_firmware::probe_image() {
        Ok(image) => Ok(image),
        Err(e) => panic!("build.rs: assembling probe-aarch64.bin failed: {e}"),
    }
}

/// The aarch64 heartbeat test guest (test bed), same entry as the probe.
fn arm_heartbeat_image() -> Result<Vec<u8>, IcedError> {
    match arm_firmware::heartbeat_image() {
        Ok(image) => Ok(image),
        Err(e) => panic!("build.rs: assembling heartbeat-aarch64.bin failed: {e}"),
    }
}
