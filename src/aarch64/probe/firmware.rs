//! The aarch64 probe firmware: a minimal A64 encoder and the program generator, reading the
//! registers of `sysregs::REGISTERS`.
//!
//! This file is compiled twice: by build.rs (`#[path]` module, which writes the image into
//! OUT_DIR) and as `crate::aarch64::probe::firmware` (where the encoder is unit-tested against
//! GNU as). So it uses nothing but its sibling `sysregs` (also included by build.rs) and no
//! dependency.
//!
//! Why a hand encoder: the program needs ~20 instruction forms (MRS/MSR of system registers by
//! encoding, MOVZ/MOVK, STRB, shifts, ADD/SUB immediates, branches, HVC/SMC/ERET). The candidate
//! crate, dynasm, is a proc-macro assembler for run-time code that would add a dependency tree to
//! the build for that handful of fixed 32-bit words; each form here is one line of bit packing,
//! cross-checked against `aarch64-linux-gnu-as` in tests (never needed to build or run).
//!
//! Image (loaded by QEMU `virt` with `-bios` into flash at 0x0, entered at EL1 with the MMU off
//! when neither `virtualization=on` nor `secure=on` is given):
//!   0x0000  branch to the main program
//!   0x0800  VBAR_EL1 vector table (2 KiB aligned, 16 slots of 0x80)
//!   0x1000  main program (register reads, the hex printer, power-off)
//!
//! Output, one line each on the PL011 UART data register at 0x0900_0000 (parsed by
//! src/aarch64/probe/mod.rs):
//!   `CPUGUARD-ARM-PROBE 1`                    header, format version
//!   `E <n>`                                   the exception level the probe runs at (must be 1)
//!   `R S<op0>_<op1>_C<n>_C<m>_<op2> <value>`   one register read, value as 16 lowercase hex digits
//!   `X S<op0>_<op1>_C<n>_C<m>_<op2>`           the read trapped (register absent on this CPU)
//!   `F`                                       an unexpected asynchronous exception (fatal)
//!   `END <count>`                             count = number of R/X lines
//!
//! then PSCI SYSTEM_OFF through `hvc #0` (the virt machine's conduit without EL2), falling back to
//! `smc #0`, then `wfi` forever (the runner's wall-time bound ends that case).

use super::sysregs::{SysReg, REGISTERS};

/// First line of the probe output.
pub const HEADER: &str = "CPUGUARD-ARM-PROBE 1";

const CURRENT_EL: SysReg = SysReg::new("CurrentEL", 3, 0, 4, 2, 2);
const VBAR_EL1: SysReg = SysReg::new("VBAR_EL1", 3, 0, 12, 0, 0);
const ELR_EL1: SysReg = SysReg::new("ELR_EL1", 3, 0, 4, 0, 1);

/// PL011 UART0 of the `virt` machine.
const UART_BASE: u64 = 0x0900_0000;
/// PSCI 0.2 SYSTEM_OFF function id (SMC32 calling convention).
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
const VECTORS: usize = 0x800;
const VECTOR_SLOT: usize = 0x80;
const CODE: usize = 0x1000;
const IMAGE_SIZE: usize = 0x4000;

// Register roles in the generated program.
const X_VALUE: u8 = 0;
const X_DIGIT: u8 = 2;
const X_COUNT: u8 = 3;
const X_UART: u8 = 9;
const X_TMP: u8 = 10;
const X_TRAPPED: u8 = 20;
const X_ELR: u8 = 21;
/// Register number 31 in the operand fields used here means XZR/WZR.
const ZR: u8 = 31;

/// A64 condition codes used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Equal: Z set.
    Eq = 0,
    /// Not equal: Z clear (the hex printer's digit loop).
    Ne = 1,
    /// Unsigned higher: C set and Z clear.
    Hi = 8,
    /// Unsigned lower or same: C clear or Z set (the hex printer's "is a decimal digit" test).
    Ls = 9,
}

/// Encoders for the A64 instructions the probe uses; `x`/`w` in a name is the register width.
pub mod enc {
    use super::{Cond, SysReg};

    fn sysreg_fields(r: &SysReg) -> u32 {
        (u32::from(r.op0 & 0x3) << 19)
            | (u32::from(r.op1 & 0x7) << 16)
            | (u32::from(r.crn & 0xF) << 12)
            | (u32::from(r.crm & 0xF) << 8)
            | (u32::from(r.op2 & 0x7) << 5)
    }

    /// MRS Xt, sysreg: reads system register `r` (by its op0/op1/CRn/CRm/op2 encoding) into Xt.
    pub fn mrs(rt: u8, r: &SysReg) -> u32 {
        0xD520_0000 | sysreg_fields(r) | u32::from(rt & 31)
    }
    /// MSR sysreg, Xt: writes Xt to system register `r`.
    pub fn msr(r: &SysReg, rt: u8) -> u32 {
        0xD500_0000 | sysreg_fields(r) | u32::from(rt & 31)
    }
    /// MOVZ Xd, #imm16, LSL #(16*hw)
    pub fn movz_x(rd: u8, imm16: u16, hw: u8) -> u32 {
        0xD280_0000 | (u32::from(hw & 3) << 21) | (u32::from(imm16) << 5) | u32::from(rd & 31)
    }
    /// MOVK Xd, #imm16, LSL #(16*hw)
    pub fn movk_x(rd: u8, imm16: u16, hw: u8) -> u32 {
        0xF280_0000 | (u32::from(hw & 3) << 21) | (u32::from(imm16) << 5) | u32::from(rd & 31)
    }
    /// STRB Wt, \[Xn\]: stores the low byte of Wt at the address in Xn (the UART data register).
    pub fn strb(rt: u8, rn: u8) -> u32 {
        0x3900_0000 | (u32::from(rn & 31) << 5) | u32::from(rt & 31)
    }
    /// LSR Xd, Xn, #shift (UBFM Xd, Xn, #shift, #63)
    pub fn lsr_x(rd: u8, rn: u8, shift: u8) -> u32 {
        0xD340_FC00 | (u32::from(shift & 63) << 16) | (u32::from(rn & 31) << 5) | u32::from(rd & 31)
    }
    /// LSL Xd, Xn, #shift (UBFM Xd, Xn, #(-shift mod 64), #(63-shift)), shift in 1..=63
    pub fn lsl_x(rd: u8, rn: u8, shift: u8) -> u32 {
        let shift = u32::from(shift & 63);
        let immr = (64 - shift) & 63;
        let imms = 63 - shift;
        0xD340_0000 | (immr << 16) | (imms << 10) | (u32::from(rn & 31) << 5) | u32::from(rd & 31)
    }
    fn add_sub_imm(base: u32, rd: u8, rn: u8, imm12: u16) -> u32 {
        base | (u32::from(imm12 & 0xFFF) << 10) | (u32::from(rn & 31) << 5) | u32::from(rd & 31)
    }
    /// ADD Xd, Xn, #imm12 (imm12 in 0..=4095, unshifted).
    pub fn add_x_imm(rd: u8, rn: u8, imm12: u16) -> u32 {
        add_sub_imm(0x9100_0000, rd, rn, imm12)
    }
    /// ADD Wd, Wn, #imm12 (imm12 in 0..=4095, unshifted).
    pub fn add_w_imm(rd: u8, rn: u8, imm12: u16) -> u32 {
        add_sub_imm(0x1100_0000, rd, rn, imm12)
    }
    /// SUBS Xd, Xn, #imm12 (imm12 in 0..=4095, unshifted; sets the flags).
    pub fn subs_x_imm(rd: u8, rn: u8, imm12: u16) -> u32 {
        add_sub_imm(0xF100_0000, rd, rn, imm12)
    }
    /// CMP Wn, #imm12 (SUBS WZR, Wn, #imm12)
    pub fn cmp_w_imm(rn: u8, imm12: u16) -> u32 {
        add_sub_imm(0x7100_0000, super::ZR, rn, imm12)
    }
    /// Branch offsets are in bytes from the branch instruction; None when out of range or not a
    /// multiple of 4.
    fn word_offset(offset: i64, bits: u32) -> Option<u32> {
        if offset % 4 != 0 {
            return None;
        }
        let words = offset / 4;
        let limit = 1i64 << (bits - 1);
        if words < -limit || words >= limit {
            return None;
        }
        Some((words as u32) & ((1u32 << bits) - 1))
    }
    /// B to `offset` bytes from this instruction (±128 MiB); None when out of range or not a
    /// multiple of 4.
    pub fn b(offset: i64) -> Option<u32> {
        word_offset(offset, 26).map(|imm| 0x1400_0000 | imm)
    }
    /// BL to `offset` bytes from this instruction (±128 MiB), return address in X30; None when
    /// out of range or not a multiple of 4.
    pub fn bl(offset: i64) -> Option<u32> {
        word_offset(offset, 26).map(|imm| 0x9400_0000 | imm)
    }
    /// B.cond to `offset` bytes from this instruction (±1 MiB); None when out of range or not a
    /// multiple of 4.
    pub fn b_cond(cond: Cond, offset: i64) -> Option<u32> {
        word_offset(offset, 19).map(|imm| 0x5400_0000 | (imm << 5) | cond as u32)
    }
    /// CBNZ Xt to `offset` bytes from this instruction (±1 MiB); None when out of range or not a
    /// multiple of 4.
    pub fn cbnz_x(rt: u8, offset: i64) -> Option<u32> {
        word_offset(offset, 19).map(|imm| 0xB500_0000 | (imm << 5) | u32::from(rt & 31))
    }
    /// RET: returns to the address in X30.
    pub fn ret() -> u32 {
        0xD65F_03C0
    }
    /// ERET: returns from an exception to ELR_EL1 with the state saved in SPSR_EL1.
    pub fn eret() -> u32 {
        0xD69F_03E0
    }
    /// HVC #imm16: hypervisor call, the `virt` machine's PSCI conduit when the guest has no EL2.
    pub fn hvc(imm16: u16) -> u32 {
        0xD400_0002 | (u32::from(imm16) << 5)
    }
    /// SMC #imm16: secure monitor call, the PSCI conduit with `secure=on`.
    pub fn smc(imm16: u16) -> u32 {
        0xD400_0003 | (u32::from(imm16) << 5)
    }
    /// ISB: instruction synchronization barrier, so a system register write (VBAR_EL1) takes effect
    /// before the next instruction.
    pub fn isb() -> u32 {
        0xD503_3FDF
    }
    /// WFI: waits for an interrupt (the halt loop when PSCI SYSTEM_OFF did not power off).
    pub fn wfi() -> u32 {
        0xD503_207F
    }
    fn data_proc_reg(base: u32, rd: u8, rn: u8, rm: u8) -> u32 {
        base | (u32::from(rm & 31) << 16) | (u32::from(rn & 31) << 5) | u32::from(rd & 31)
    }
    /// ADD Xd, Xn, Xm
    pub fn add_x_reg(rd: u8, rn: u8, rm: u8) -> u32 {
        data_proc_reg(0x8B00_0000, rd, rn, rm)
    }
    /// SUB Xd, Xn, Xm
    pub fn sub_x_reg(rd: u8, rn: u8, rm: u8) -> u32 {
        data_proc_reg(0xCB00_0000, rd, rn, rm)
    }
    /// CMP Xn, Xm (SUBS XZR, Xn, Xm)
    pub fn cmp_x_reg(rn: u8, rm: u8) -> u32 {
        data_proc_reg(0xEB00_0000, super::ZR, rn, rm)
    }
    /// UDIV Xd, Xn, Xm
    pub fn udiv_x(rd: u8, rn: u8, rm: u8) -> u32 {
        data_proc_reg(0x9AC0_0800, rd, rn, rm)
    }
    /// MSUB Xd, Xn, Xm, Xa (Xd = Xa - Xn * Xm)
    pub fn msub_x(rd: u8, rn: u8, rm: u8, ra: u8) -> u32 {
        data_proc_reg(0x9B00_8000, rd, rn, rm) | (u32::from(ra & 31) << 10)
    }
}

/// A branch waiting for its label's address.
#[derive(Debug, Clone, Copy)]
enum Fixup {
    B,
    Bl,
    BCond(Cond),
    Cbnz(u8),
}

/// A tiny one-pass assembler: words plus labels resolved at the end.
#[derive(Debug, Default)]
pub struct Asm {
    words: Vec<u32>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, usize, Fixup)>,
}

/// A label created by [`Asm::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

impl Asm {
    /// Appends one instruction word.
    pub fn emit(&mut self, word: u32) {
        self.words.push(word);
    }
    /// Byte offset of the next word from the start of the image.
    pub fn offset(&self) -> usize {
        self.words.len() * 4
    }
    /// A new label, unbound until [`Asm::bind`]; branches to it may come before the bind.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    /// Binds `label` to the current offset (the next word emitted).
    pub fn bind(&mut self, label: Label) {
        if let Some(slot) = self.labels.get_mut(label.0) {
            *slot = Some(self.words.len() * 4);
        }
    }
    fn branch(&mut self, label: Label, kind: Fixup) {
        self.fixups.push((self.words.len(), label.0, kind));
        self.words.push(0);
    }
    /// Emits B to `label` (resolved by [`Asm::finish`]).
    pub fn b(&mut self, label: Label) {
        self.branch(label, Fixup::B);
    }
    /// Emits BL to `label` (resolved by [`Asm::finish`]).
    pub fn bl(&mut self, label: Label) {
        self.branch(label, Fixup::Bl);
    }
    /// Emits B.cond to `label` (resolved by [`Asm::finish`]).
    pub fn b_cond(&mut self, cond: Cond, label: Label) {
        self.branch(label, Fixup::BCond(cond));
    }
    /// Emits CBNZ Xt to `label` (resolved by [`Asm::finish`]).
    pub fn cbnz_x(&mut self, rt: u8, label: Label) {
        self.branch(label, Fixup::Cbnz(rt));
    }
    /// Pads with zero words up to byte offset `to`.
    pub fn align_to(&mut self, to: usize) -> Result<(), String> {
        if self.offset() > to {
            return Err(format!(
                "code is {:#x} bytes, past the fixed offset {to:#x}",
                self.offset()
            ));
        }
        while self.offset() < to {
            self.words.push(0);
        }
        Ok(())
    }
    /// Loads a 64-bit constant with MOVZ and as many MOVK as needed.
    pub fn mov_x(&mut self, rd: u8, value: u64) {
        self.emit(enc::movz_x(rd, (value & 0xFFFF) as u16, 0));
        for hw in 1..4u8 {
            let part = ((value >> (16 * u32::from(hw))) & 0xFFFF) as u16;
            if part != 0 {
                self.emit(enc::movk_x(rd, part, hw));
            }
        }
    }
    /// Writes `text` to the UART one byte at a time (no data section, no PC-relative loads).
    pub fn print(&mut self, text: &str) {
        for byte in text.bytes() {
            self.emit(enc::movz_x(X_TMP, u16::from(byte), 0));
            self.emit(enc::strb(X_TMP, X_UART));
        }
    }
    /// Resolves every branch; returns the little-endian bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, String> {
        for (at, label, kind) in std::mem::take(&mut self.fixups) {
            let target = self
                .labels
                .get(label)
                .copied()
                .flatten()
                .ok_or_else(|| format!("label {label} is never bound"))?;
            let offset = target as i64 - (at * 4) as i64;
            let word = match kind {
                Fixup::B => enc::b(offset),
                Fixup::Bl => enc::bl(offset),
                Fixup::BCond(cond) => enc::b_cond(cond, offset),
                Fixup::Cbnz(rt) => enc::cbnz_x(rt, offset),
            }
            .ok_or_else(|| format!("branch at {:#x} cannot reach {target:#x}", at * 4))?;
            self.words[at] = word;
        }
        Ok(self.words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }
}

/// The probe image (16 KiB; QEMU pads the 64 MiB flash with zeros).
pub fn probe_image() -> Result<Vec<u8>, String> {
    program(REGISTERS)
}

/// The probe program reading `regs` in order (tests use other lists, e.g. a register that traps
/// at EL1, to exercise the vector table).
pub fn program(regs: &[SysReg]) -> Result<Vec<u8>, String> {
    let mut a = Asm::default();
    let hex64 = a.label();
    let power_off = a.label();
    let start = a.label();

    // The reset address (flash offset 0) holds only a branch over the vector table, which must
    // be 2 KiB aligned.
    a.b(start);
    // Vector table: the synchronous slots (current EL with SP_EL0 / SP_ELx, lower EL) resume
    // after the faulting instruction and flag it; IRQ/FIQ/SError cannot be expected with DAIF
    // masked from reset, so they are reported as fatal.
    a.align_to(VECTORS)?;
    for slot in 0..16 {
        a.align_to(VECTORS + slot * VECTOR_SLOT)?;
        if slot % 4 == 0 {
            a.emit(enc::mrs(X_ELR, &ELR_EL1));
            a.emit(enc::add_x_imm(X_ELR, X_ELR, 4));
            a.emit(enc::msr(&ELR_EL1, X_ELR));
            a.emit(enc::movz_x(X_TRAPPED, 1, 0));
            a.emit(enc::eret());
        } else {
            a.print("F\n");
            a.b(power_off);
        }
    }
    a.align_to(CODE)?;
    a.bind(start);
    a.mov_x(X_UART, UART_BASE);
    a.mov_x(X_TMP, VECTORS as u64);
    a.emit(enc::msr(&VBAR_EL1, X_TMP));
    a.emit(enc::isb());
    a.print(HEADER);
    a.print("\nE ");
    a.emit(enc::mrs(X_VALUE, &CURRENT_EL));
    a.emit(enc::lsr_x(X_VALUE, X_VALUE, 2));
    a.emit(enc::add_w_imm(X_VALUE, X_VALUE, u16::from(b'0')));
    a.emit(enc::strb(X_VALUE, X_UART));
    a.print("\n");

    for reg in regs {
        let absent = a.label();
        let next = a.label();
        a.emit(enc::movz_x(X_TRAPPED, 0, 0));
        a.emit(enc::mrs(X_VALUE, reg));
        a.cbnz_x(X_TRAPPED, absent);
        a.print(&format!("R {} ", reg.encoding()));
        a.bl(hex64);
        a.print("\n");
        a.b(next);
        a.bind(absent);
        a.print(&format!("X {}\n", reg.encoding()));
        a.bind(next);
    }
    a.print(&format!("END {}\n", regs.len()));

    a.bind(power_off);
    a.mov_x(X_VALUE, PSCI_SYSTEM_OFF);
    a.emit(enc::hvc(0));
    // Only reached when hvc is not the PSCI conduit (then it traps and is skipped like an absent
    // register, or returns an error code): try the secure monitor.
    a.mov_x(X_VALUE, PSCI_SYSTEM_OFF);
    a.emit(enc::smc(0));
    let halt = a.label();
    a.bind(halt);
    a.emit(enc::wfi());
    a.b(halt);

    // Prints X_VALUE as 16 hex digits; clobbers X_VALUE, X_DIGIT, X_COUNT.
    a.bind(hex64);
    a.emit(enc::movz_x(X_COUNT, 16, 0));
    let digit = a.label();
    let store = a.label();
    a.bind(digit);
    a.emit(enc::lsr_x(X_DIGIT, X_VALUE, 60));
    a.emit(enc::lsl_x(X_VALUE, X_VALUE, 4));
    a.emit(enc::add_w_imm(X_DIGIT, X_DIGIT, u16::from(b'0')));
    a.emit(enc::cmp_w_imm(X_DIGIT, u16::from(b'9')));
    a.b_cond(Cond::Ls, store);
    a.emit(enc::add_w_imm(X_DIGIT, X_DIGIT, u16::from(b'a' - b'9' - 1)));
    a.bind(store);
    a.emit(enc::strb(X_DIGIT, X_UART));
    a.emit(enc::subs_x_imm(X_COUNT, X_COUNT, 1));
    a.b_cond(Cond::Ne, digit);
    a.emit(enc::ret());

    a.align_to(IMAGE_SIZE)?;
    a.finish()
}

// ---------------------------------------------------------------------------------------------
// The heartbeat test guest (the test bed's aarch64 migration guest)
// ---------------------------------------------------------------------------------------------

/// Generic timer frequency, read only to pace the heartbeat (CNTFRQ_EL0).
const CNTFRQ_EL0: SysReg = SysReg::new("CNTFRQ_EL0", 3, 3, 14, 0, 0);
/// Virtual count (CNTVCT_EL0): QEMU derives it from its virtual clock, which a migration carries
/// over, so the pace goes on unchanged on the destination.
const CNTVCT_EL0: SysReg = SysReg::new("CNTVCT_EL0", 3, 3, 14, 0, 2);
/// QEMU 7.2's generic timer frequency, used should CNTFRQ_EL0 read 0 (no firmware above EL1 set
/// it): without it the guest would print as fast as it can.
const FALLBACK_TIMER_HZ: u64 = 62_500_000;
/// Digits of the counter printed per line, as the x86 heartbeat (build.rs).
const HEARTBEAT_DIGITS: u32 = 6;

// Register roles in the heartbeat program. All of its state is in these registers (and the PC):
// nothing outside what a live migration carries.
const HB_DELAY: u8 = 12;
const HB_TICKS: u8 = 13;
const HB_POWER: u8 = 14;
const HB_DIGIT: u8 = 15;
const HB_TEN: u8 = 16;
const HB_QUOTIENT: u8 = 17;
const HB_COUNTER: u8 = 19;
const HB_SINCE: u8 = 20;
const HB_NOW: u8 = 21;

/// The heartbeat image (16 KiB, same layout as the probe: entered at flash offset 0 at EL1): prints
/// `heartbeat NNNNNN\r\n` (the x86 heartbeat's format) on the PL011 forever, one line every
/// 5/16 s of the guest's virtual count. Busy-waits on CNTVCT_EL0 instead of sleeping in WFI: a
/// timer interrupt would need the GIC set up, for a guest whose only job is to show it still runs.
/// An unexpected exception prints `F` and stops the heartbeat, which a test sees as the counter
/// no longer growing.
pub fn heartbeat_image() -> Result<Vec<u8>, String> {
    let mut a = Asm::default();
    let start = a.label();
    let halt = a.label();

    a.b(start);
    a.align_to(VECTORS)?;
    for slot in 0..16 {
        a.align_to(VECTORS + slot * VECTOR_SLOT)?;
        a.print("F\n");
        a.b(halt);
    }
    a.align_to(CODE)?;
    a.bind(start);
    a.mov_x(X_UART, UART_BASE);
    a.mov_x(X_TMP, VECTORS as u64);
    a.emit(enc::msr(&VBAR_EL1, X_TMP));
    a.emit(enc::isb());

    // HB_DELAY = frequency / 4 + frequency / 16 ticks (5/16 s, near the x86 heartbeat's 0.33 s).
    let have_frequency = a.label();
    a.emit(enc::mrs(HB_DELAY, &CNTFRQ_EL0));
    a.cbnz_x(HB_DELAY, have_frequency);
    a.mov_x(HB_DELAY, FALLBACK_TIMER_HZ);
    a.bind(have_frequency);
    a.emit(enc::lsr_x(HB_TICKS, HB_DELAY, 4));
    a.emit(enc::lsr_x(HB_DELAY, HB_DELAY, 2));
    a.emit(enc::add_x_reg(HB_DELAY, HB_DELAY, HB_TICKS));
    a.emit(enc::movz_x(HB_TEN, 10, 0));
    a.emit(enc::movz_x(HB_COUNTER, 0, 0));

    let line = a.label();
    a.bind(line);
    a.print("heartbeat ");
    // Most significant digit first: digit = (counter / 10^k) mod 10, k = 5..0.
    a.mov_x(HB_POWER, 10u64.pow(HEARTBEAT_DIGITS - 1));
    for _ in 0..HEARTBEAT_DIGITS {
        a.emit(enc::udiv_x(HB_DIGIT, HB_COUNTER, HB_POWER));
        a.emit(enc::udiv_x(HB_QUOTIENT, HB_DIGIT, HB_TEN));
        a.emit(enc::msub_x(HB_DIGIT, HB_QUOTIENT, HB_TEN, HB_DIGIT));
        a.emit(enc::add_w_imm(HB_DIGIT, HB_DIGIT, u16::from(b'0')));
        a.emit(enc::strb(HB_DIGIT, X_UART));
        a.emit(enc::udiv_x(HB_POWER, HB_POWER, HB_TEN));
    }
    a.print("\r\n");
    a.emit(enc::add_x_imm(HB_COUNTER, HB_COUNTER, 1));

    // Wait until HB_DELAY ticks have passed. The unsigned difference also ends the wait should the
    // count ever jump backwards (it wraps to a huge value).
    a.emit(enc::mrs(HB_SINCE, &CNTVCT_EL0));
    let wait = a.label();
    a.bind(wait);
    a.emit(enc::mrs(HB_NOW, &CNTVCT_EL0));
    a.emit(enc::sub_x_reg(HB_NOW, HB_NOW, HB_SINCE));
    a.emit(enc::cmp_x_reg(HB_DELAY, HB_NOW));
    a.b_cond(Cond::Hi, wait);
    a.b(line);

    a.bind(halt);
    a.emit(enc::wfi());
    a.b(halt);

    a.align_to(IMAGE_SIZE)?;
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const GNU_AS: &str = "aarch64-linux-gnu-as";
    const GNU_OBJCOPY: &str = "aarch64-linux-gnu-objcopy";

    /// Assembles `source` with GNU as into raw little-endian words (None when binutils for
    /// aarch64 is not installed: `apt-get install binutils-aarch64-linux-gnu`).
    fn gnu_words(source: &str) -> Option<Vec<u32>> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t.s");
        let obj = dir.path().join("t.o");
        let bin = dir.path().join("t.bin");
        std::fs::write(&src, source).unwrap();
        let status = Command::new(GNU_AS)
            .arg("-march=armv9-a+sme")
            .arg("-o")
            .arg(&obj)
            .arg(&src)
            .status()
            .ok()?;
        assert!(status.success(), "{GNU_AS} rejected:\n{source}");
        let status = Command::new(GNU_OBJCOPY)
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .unwrap();
        assert!(status.success());
        let bytes = std::fs::read(&bin).unwrap();
        Some(
            bytes
                .chunks(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    #[test]
    fn every_encoding_matches_gnu_as() {
        let vbar = VBAR_EL1;
        let mut cases: Vec<(String, u32)> = vec![
            ("movz x9, #0x900, lsl #16".into(), enc::movz_x(9, 0x900, 1)),
            ("movz x20, #0".into(), enc::movz_x(20, 0, 0)),
            (
                "movk x0, #0x8400, lsl #16".into(),
                enc::movk_x(0, 0x8400, 1),
            ),
            (
                "movk x5, #0xbeef, lsl #48".into(),
                enc::movk_x(5, 0xbeef, 3),
            ),
            ("strb w10, [x9]".into(), enc::strb(10, 9)),
            ("lsr x2, x0, #60".into(), enc::lsr_x(2, 0, 60)),
            ("lsr x0, x0, #2".into(), enc::lsr_x(0, 0, 2)),
            ("lsl x0, x0, #4".into(), enc::lsl_x(0, 0, 4)),
            ("lsl x7, x3, #63".into(), enc::lsl_x(7, 3, 63)),
            ("add w2, w2, #48".into(), enc::add_w_imm(2, 2, 48)),
            ("add x21, x21, #4".into(), enc::add_x_imm(21, 21, 4)),
            ("subs x3, x3, #1".into(), enc::subs_x_imm(3, 3, 1)),
            ("cmp w2, #57".into(), enc::cmp_w_imm(2, 57)),
            ("ret".into(), enc::ret()),
            ("eret".into(), enc::eret()),
            ("hvc #0".into(), enc::hvc(0)),
            ("smc #0".into(), enc::smc(0)),
            ("isb".into(), enc::isb()),
            ("wfi".into(), enc::wfi()),
            ("msr vbar_el1, x10".into(), enc::msr(&vbar, 10)),
            ("mrs x21, elr_el1".into(), enc::mrs(21, &ELR_EL1)),
            ("msr elr_el1, x21".into(), enc::msr(&ELR_EL1, 21)),
            ("mrs x0, currentel".into(), enc::mrs(0, &CURRENT_EL)),
        ];
        for reg in REGISTERS {
            // By generic encoding, and by name where this binutils knows it.
            cases.push((format!("mrs x0, {}", reg.encoding()), enc::mrs(0, reg)));
            // binutils 2.40 does not know MMFR3 by name.
            if reg.name != "ID_AA64MMFR3_EL1" {
                cases.push((format!("mrs x0, {}", reg.name), enc::mrs(0, reg)));
            }
        }
        // Branches: each line at word i jumps to label `t` at word 8.
        let branches: Vec<(String, u32)> = vec![
            ("b t".into(), enc::b(32).unwrap()),
            ("bl t".into(), enc::bl(28).unwrap()),
            ("b.ls t".into(), enc::b_cond(Cond::Ls, 24).unwrap()),
            ("b.ne t".into(), enc::b_cond(Cond::Ne, 20).unwrap()),
            ("b.eq t".into(), enc::b_cond(Cond::Eq, 16).unwrap()),
            ("b.hi t".into(), enc::b_cond(Cond::Hi, 12).unwrap()),
            ("cbnz x20, t".into(), enc::cbnz_x(20, 8).unwrap()),
            ("b back".into(), enc::b(-28).unwrap()),
        ];
        let mut source = String::from(".text\n");
        for (text, _) in &cases {
            source.push_str(text);
            source.push('\n');
        }
        source.push_str("back:\n");
        for (text, _) in &branches {
            source.push_str(text);
            source.push('\n');
        }
        source.push_str("t: nop\n");
        let Some(words) = gnu_words(&source) else {
            panic!("{GNU_AS} not found: apt-get install binutils-aarch64-linux-gnu");
        };
        let ours: Vec<(String, u32)> = cases.into_iter().chain(branches).collect();
        assert_eq!(words.len(), ours.len() + 1);
        for ((text, word), gnu) in ours.iter().zip(&words) {
            assert_eq!(*word, *gnu, "{text}: ours {word:#010x}, GNU as {gnu:#010x}");
        }
    }

    #[test]
    fn branch_range_is_checked() {
        assert!(enc::b(2).is_none());
        assert!(enc::b_cond(Cond::Ne, 1 << 21).is_none());
        assert!(enc::b_cond(Cond::Ne, (1 << 20) - 4).is_some());
        assert!(enc::cbnz_x(0, -(1 << 20)).is_some());
        assert!(enc::cbnz_x(0, -(1 << 20) - 4).is_none());
    }

    #[test]
    fn unbound_label_is_an_error() {
        let mut a = Asm::default();
        let l = a.label();
        a.b(l);
        assert!(a.finish().unwrap_err().contains("never bound"));
    }

    #[test]
    fn image_layout() {
        let image = probe_image().unwrap();
        assert_eq!(image.len(), IMAGE_SIZE);
        let word = |at: usize| {
            u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]])
        };
        // The reset address branches over the vectors to the code, which loads the UART base.
        assert_eq!(word(0), enc::b(CODE as i64).unwrap());
        assert_eq!(word(CODE), enc::movz_x(X_UART, 0, 0));
        // Synchronous vector slots start by reading ELR_EL1.
        assert_eq!(word(VECTORS), enc::mrs(X_ELR, &ELR_EL1));
        assert_eq!(word(VECTORS + 4 * VECTOR_SLOT), enc::mrs(X_ELR, &ELR_EL1));
        let words: Vec<u32> = (CODE..IMAGE_SIZE).step_by(4).map(word).collect();
        for reg in REGISTERS {
            assert!(
                words.contains(&enc::mrs(X_VALUE, reg)),
                "{} not read",
                reg.name
            );
        }
        assert!(words.contains(&enc::hvc(0)));
    }

    #[test]
    fn encodings_are_unique() {
        let mut seen: Vec<String> = REGISTERS.iter().map(SysReg::encoding).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), REGISTERS.len());
    }

    #[test]
    fn heartbeat_encodings_match_gnu_as() {
        let cases: Vec<(&str, u32)> = vec![
            ("add x12, x12, x13", enc::add_x_reg(12, 12, 13)),
            ("sub x21, x21, x20", enc::sub_x_reg(21, 21, 20)),
            ("cmp x12, x21", enc::cmp_x_reg(12, 21)),
            ("udiv x15, x19, x14", enc::udiv_x(15, 19, 14)),
            ("udiv x14, x14, x16", enc::udiv_x(14, 14, 16)),
            ("msub x15, x17, x16, x15", enc::msub_x(15, 17, 16, 15)),
            ("msub x1, x2, x3, x4", enc::msub_x(1, 2, 3, 4)),
            ("mrs x12, cntfrq_el0", enc::mrs(12, &CNTFRQ_EL0)),
            ("mrs x21, cntvct_el0", enc::mrs(21, &CNTVCT_EL0)),
        ];
        let mut source = String::from(".text\n");
        for (text, _) in &cases {
            source.push_str(text);
            source.push('\n');
        }
        let Some(words) = gnu_words(&source) else {
            panic!("{GNU_AS} not found: apt-get install binutils-aarch64-linux-gnu");
        };
        assert_eq!(words.len(), cases.len());
        for ((text, word), gnu) in cases.iter().zip(&words) {
            assert_eq!(*word, *gnu, "{text}: ours {word:#010x}, GNU as {gnu:#010x}");
        }
    }

    #[test]
    fn heartbeat_image_layout() {
        let image = heartbeat_image().unwrap();
        assert_eq!(image.len(), IMAGE_SIZE);
        let word = |at: usize| {
            u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]])
        };
        assert_eq!(word(0), enc::b(CODE as i64).unwrap());
        assert_eq!(word(CODE), enc::movz_x(X_UART, 0, 0));
        let words: Vec<u32> = (CODE..IMAGE_SIZE).step_by(4).map(word).collect();
        // Paced by the virtual count, and never powers off (no PSCI call).
        assert!(words.contains(&enc::mrs(HB_NOW, &CNTVCT_EL0)));
        assert!(!words.contains(&enc::hvc(0)));
        assert!(!words.contains(&enc::smc(0)));
        assert_ne!(image, probe_image().unwrap());
    }
}
