//! CPUID dumps in the formats operators already have.
//!
//! * kvm-unit-tests `x86/cpuid.flat` style (seeds 001 and 002):
//!   `LLLLLLLL SSSSSSSS: EAX EBX ECX EDX`, optionally under a `Leaf Subleaf EAX ...` header and
//!   with the one-character prefixes of a unified diff. cpuguard also writes this format, plus
//!   `msr IIIIIIII: VVVVVVVVVVVVVVVV` lines of its own so a written dump loses nothing.
//! * the Debian `cpuid` tool's `cpuid -r`: `CPU 0:` (or `CPU:` with `-1`) followed by
//!   `   0x00000000 0x00: eax=0x... ebx=0x... ecx=0x... edx=0x...`; only the first CPU is read.
//!
//! Lines that cannot be data (headers, test chatter, diff headers) are skipped; a line that looks
//! like data but does not parse is an error naming its line number.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::table::{CpuidEntry, CpuidTable, MsrEntry};

/// A CPUID dump format cpuguard reads (see the module header for each one's lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DumpFormat {
    /// kvm-unit-tests `x86/cpuid.flat` lines, `LLLLLLLL SSSSSSSS: EAX EBX ECX EDX` (also what
    /// cpuguard writes, with its `msr` lines); `"kvm-unit-tests"` in JSON.
    KvmUnitTests,
    /// The Debian `cpuid` tool's `cpuid -r` output; `"cpuid-tool"` in JSON.
    CpuidTool,
}

/// Why a CPUID dump was not read; each names the line at fault where there is one.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// A line that looks like data does not parse.
    #[error("CPUID dump line {line}: {reason}: '{text}'")]
    Line {
        /// The 1-based line number in the dump.
        line: usize,
        /// What is wrong with it.
        reason: String,
        /// The line as it stands in the dump.
        text: String,
    },
    /// One leaf (or MSR) is listed twice with different values, so which one holds is unknown.
    #[error(
        "CPUID dump line {line}: {what} is listed again with other values (first at line {first})"
    )]
    Conflict {
        /// The 1-based line of the second listing.
        line: usize,
        /// The 1-based line of the first.
        first: usize,
        /// Which entry, e.g. `leaf 0x7 sub-leaf 0x0` or `MSR 0x10a`.
        what: String,
    },
    /// The text has both `-` and `+` data lines: a diff of two dumps, not one dump.
    #[error("CPUID dump line {line}: this is a diff of two dumps ('-' and '+' lines); give each side as its own dump")]
    IsDiff {
        /// The 1-based line where both kinds had been seen.
        line: usize,
    },
    /// Not one CPUID line in either format.
    #[error("CPUID dump has no CPUID lines (expected 'LLLLLLLL SSSSSSSS: EAX EBX ECX EDX' lines or 'cpuid -r' output)")]
    Empty,
}

/// Which format `text` is in, if it contains any CPUID line at all.
pub fn detect_format(text: &str) -> Option<DumpFormat> {
    let mut kvm_unit_tests = false;
    for line in text.lines() {
        let body = line.trim();
        if body.starts_with("0x") && body.contains("eax=") {
            return Some(DumpFormat::CpuidTool);
        }
        if looks_like_kut_data(strip_diff_prefix(line)) {
            kvm_unit_tests = true;
        }
    }
    kvm_unit_tests.then_some(DumpFormat::KvmUnitTests)
}

/// Parses a dump in either format (detected from its content).
pub fn parse_dump(text: &str) -> Result<CpuidTable, DumpError> {
    let format = detect_format(text).ok_or(DumpError::Empty)?;
    parse_dump_as(text, format)
}

/// Parses a dump known to be in `format`.
pub fn parse_dump_as(text: &str, format: DumpFormat) -> Result<CpuidTable, DumpError> {
    let mut builder = Builder::default();
    match format {
        DumpFormat::KvmUnitTests => {
            let mut removed = None;
            let mut added = None;
            for (index, line) in text.lines().enumerate() {
                let number = index + 1;
                let body = strip_diff_prefix(line);
                if !looks_like_kut_data(body) {
                    continue;
                }
                match line.trim_start().chars().next() {
                    Some('-') => removed = removed.or(Some(number)),
                    Some('+') => added = added.or(Some(number)),
                    _ => {}
                }
                if removed.is_some() && added.is_some() {
                    return Err(DumpError::IsDiff { line: number });
                }
                builder.add(parse_kut_line(body, number, line)?, number)?;
            }
        }
        DumpFormat::CpuidTool => {
            let mut seen_data = false;
            for (index, line) in text.lines().enumerate() {
                let number = index + 1;
                let body = line.trim();
                if body.starts_with("CPU") && body.ends_with(':') {
                    if seen_data {
                        break; // only the first CPU: the others differ only in APIC IDs
                    }
                    continue;
                }
                if !body.starts_with("0x") {
                    continue;
                }
                builder.add(parse_cpuid_tool_line(body, number, line)?, number)?;
                seen_data = true;
            }
        }
    }
    builder.finish()
}

/// Splits a unified diff of two kvm-unit-tests dumps (as pasted in seeds 001 and 002) into the
/// old side (context and `-` lines) and the new side (context and `+` lines).
pub fn parse_unified_diff(text: &str) -> Result<(CpuidTable, CpuidTable), DumpError> {
    let mut old = Builder::default();
    let mut new = Builder::default();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.starts_with("---") || line.starts_with("+++") || line.starts_with("@@") {
            continue;
        }
        let (to_old, to_new) = match line.chars().next() {
            Some('-') => (true, false),
            Some('+') => (false, true),
            _ => (true, true),
        };
        let body = strip_diff_prefix(line);
        if !looks_like_kut_data(body) {
            continue;
        }
        let data = parse_kut_line(body, number, line)?;
        if to_old {
            old.add(data, number)?;
        }
        if to_new {
            new.add(data, number)?;
        }
    }
    Ok((old.finish()?, new.finish()?))
}

/// Writes `table` as kvm-unit-tests style lines under the usual header (MSRs last).
pub fn write_dump(table: &CpuidTable) -> String {
    let mut table = table.clone();
    table.canonicalize();
    let mut out = String::from("   Leaf      Subleaf       EAX        EBX        ECX        EDX\n");
    for e in &table.entries {
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "{:08x} {:08x}: {:08x} {:08x} {:08x} {:08x}",
            e.leaf, e.subleaf, e.eax, e.ebx, e.ecx, e.edx
        );
    }
    for m in &table.msrs {
        let _ = writeln!(out, "msr {:08x}: {:016x}", m.index, m.value);
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Data {
    Cpuid(CpuidEntry),
    Msr(MsrEntry),
}

#[derive(Default)]
struct Builder {
    table: CpuidTable,
    cpuid_lines: HashMap<(u32, u32), (usize, CpuidEntry)>,
    msr_lines: HashMap<u32, (usize, u64)>,
}

impl Builder {
    fn add(&mut self, data: Data, line: usize) -> Result<(), DumpError> {
        match data {
            Data::Cpuid(entry) => {
                let key = (entry.leaf, entry.subleaf);
                if let Some(&(first, previous)) = self.cpuid_lines.get(&key) {
                    if previous != entry {
                        return Err(DumpError::Conflict {
                            line,
                            first,
                            what: format!("leaf {:#x} sub-leaf {:#x}", entry.leaf, entry.subleaf),
                        });
                    }
                    return Ok(());
                }
                self.cpuid_lines.insert(key, (line, entry));
                self.table.entries.push(entry);
            }
            Data::Msr(msr) => {
                if let Some(&(first, previous)) = self.msr_lines.get(&msr.index) {
                    if previous != msr.value {
                        return Err(DumpError::Conflict {
                            line,
                            first,
                            what: format!("MSR {:#x}", msr.index),
                        });
                    }
                    return Ok(());
                }
                self.msr_lines.insert(msr.index, (line, msr.value));
                self.table.msrs.push(msr);
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<CpuidTable, DumpError> {
        if self.table.entries.is_empty() {
            return Err(DumpError::Empty);
        }
        self.table.canonicalize();
        Ok(self.table)
    }
}

/// The line without surrounding blanks and without one leading diff marker (`+`, `-`).
fn strip_diff_prefix(line: &str) -> &str {
    let body = line.trim();
    match body.strip_prefix(['+', '-']) {
        Some(rest) if !rest.starts_with(['+', '-']) => rest.trim_start(),
        _ => body,
    }
}

/// Whether a (prefix-stripped) line is meant as data: it starts with an 8-digit hex word and a
/// blank, or is one of cpuguard's `msr` lines.
fn looks_like_kut_data(body: &str) -> bool {
    // `get`, not indexing: byte 4 of untrusted text need not be a char boundary.
    if body
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("msr "))
    {
        return true;
    }
    let bytes = body.as_bytes();
    bytes.len() > 8
        && bytes[..8].iter().all(u8::is_ascii_hexdigit)
        && bytes[8].is_ascii_whitespace()
}

fn line_error(line: usize, text: &str, reason: impl Into<String>) -> DumpError {
    let mut text = text.trim().to_string();
    if text.len() > 100 {
        let mut cut = 100;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    DumpError::Line {
        line,
        reason: reason.into(),
        text,
    }
}

fn hex_u32(token: &str) -> Option<u32> {
    let digits = token
        .strip_prefix("0x")
        .or_else(|| token.strip_prefix("0X"))
        .unwrap_or(token);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

fn hex_u64(token: &str) -> Option<u64> {
    let digits = token
        .strip_prefix("0x")
        .or_else(|| token.strip_prefix("0X"))
        .unwrap_or(token);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

fn parse_kut_line(body: &str, line: usize, original: &str) -> Result<Data, DumpError> {
    let tokens: Vec<&str> = body.split_whitespace().collect();
    if tokens
        .first()
        .is_some_and(|t| t.eq_ignore_ascii_case("msr"))
    {
        let [_, index, value] = tokens.as_slice() else {
            return Err(line_error(line, original, "expected 'msr IIIIIIII: VALUE'"));
        };
        let index = index
            .strip_suffix(':')
            .and_then(hex_u32)
            .ok_or_else(|| line_error(line, original, "MSR index is not 'IIIIIIII:' hex"))?;
        let value = hex_u64(value)
            .ok_or_else(|| line_error(line, original, "MSR value is not a 64-bit hex number"))?;
        return Ok(Data::Msr(MsrEntry { index, value }));
    }
    let [leaf, subleaf, eax, ebx, ecx, edx] = tokens.as_slice() else {
        return Err(line_error(
            line,
            original,
            format!(
                "expected 6 words 'LLLLLLLL SSSSSSSS: EAX EBX ECX EDX', found {}",
                tokens.len()
            ),
        ));
    };
    let leaf = hex_u32(leaf).ok_or_else(|| line_error(line, original, "leaf is not hex"))?;
    let subleaf = subleaf
        .strip_suffix(':')
        .and_then(hex_u32)
        .ok_or_else(|| line_error(line, original, "sub-leaf is not 'SSSSSSSS:' hex"))?;
    let mut regs = [0u32; 4];
    for (slot, (token, name)) in
        regs.iter_mut()
            .zip([(eax, "EAX"), (ebx, "EBX"), (ecx, "ECX"), (edx, "EDX")])
    {
        *slot = hex_u32(token).ok_or_else(|| {
            line_error(line, original, format!("{name} is not a 32-bit hex word"))
        })?;
    }
    Ok(Data::Cpuid(CpuidEntry {
        leaf,
        subleaf,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
    }))
}

fn parse_cpuid_tool_line(body: &str, line: usize, original: &str) -> Result<Data, DumpError> {
    let tokens: Vec<&str> = body.split_whitespace().collect();
    let [leaf, subleaf, rest @ ..] = tokens.as_slice() else {
        return Err(line_error(
            line,
            original,
            "expected '0xLEAF 0xSUB: eax=.. ebx=.. ecx=.. edx=..'",
        ));
    };
    let leaf = hex_u32(leaf).ok_or_else(|| line_error(line, original, "leaf is not 0x hex"))?;
    let subleaf = subleaf
        .strip_suffix(':')
        .and_then(hex_u32)
        .ok_or_else(|| line_error(line, original, "sub-leaf is not '0xSS:' hex"))?;
    let mut regs: [Option<u32>; 4] = [None; 4];
    for token in rest {
        let Some((name, value)) = token.split_once('=') else {
            return Err(line_error(
                line,
                original,
                format!("'{token}' is not REG=VALUE"),
            ));
        };
        let slot = match name {
            "eax" => 0,
            "ebx" => 1,
            "ecx" => 2,
            "edx" => 3,
            _ => {
                return Err(line_error(
                    line,
                    original,
                    format!("unknown register '{name}'"),
                ))
            }
        };
        regs[slot] = Some(hex_u32(value).ok_or_else(|| {
            line_error(line, original, format!("{name} is not a 32-bit hex word"))
        })?);
    }
    let [Some(eax), Some(ebx), Some(ecx), Some(edx)] = regs else {
        return Err(line_error(
            line,
            original,
            "needs all of eax=, ebx=, ecx=, edx=",
        ));
    };
    Ok(Data::Cpuid(CpuidEntry {
        leaf,
        subleaf,
        eax,
        ebx,
        ecx,
        edx,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUT: &str =
        "enabling apic\n    Leaf      Subleaf       EAX        EBX        ECX        EDX\n\
00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n\
00000001 00000000: 000306c1 00000800 f7fa3223 078bfbff\n\
00000007 00000000: 00000000 000007ab 00000000 00000000\n\
SUMMARY: 1 tests\n";

    const CPUID_TOOL: &str = "CPU 0:\n   0x00000000 0x00: eax=0x00000010 ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65\n   0x00000007 0x00: eax=0x00000000 ebx=0x219c07ab ecx=0x0040069c edx=0x88000010\nCPU 1:\n   0x00000000 0x00: eax=0x00000011 ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65\n";

    #[test]
    fn parses_kvm_unit_tests_dump_skipping_chatter() {
        assert_eq!(detect_format(KUT), Some(DumpFormat::KvmUnitTests));
        let table = parse_dump(KUT).unwrap();
        assert_eq!(table.entries.len(), 3);
        let leaf1 = table.get(1, 0).unwrap();
        assert_eq!(
            (leaf1.eax, leaf1.ebx, leaf1.ecx, leaf1.edx),
            (0x000306c1, 0x800, 0xf7fa3223, 0x078bfbff)
        );
        assert_eq!(table.get(7, 0).unwrap().ebx, 0x7ab);
    }

    #[test]
    fn parses_first_cpu_of_cpuid_tool_output() {
        assert_eq!(detect_format(CPUID_TOOL), Some(DumpFormat::CpuidTool));
        let table = parse_dump(CPUID_TOOL).unwrap();
        assert_eq!(table.entries.len(), 2);
        assert_eq!(
            table.get(0, 0).unwrap().eax,
            0x10,
            "CPU 1's values must not be read"
        );
        assert_eq!(table.get(7, 0).unwrap().edx, 0x88000010);
        let single = CPUID_TOOL.replace("CPU 0:", "CPU:");
        assert_eq!(parse_dump(&single).unwrap(), table);
    }

    #[test]
    fn write_then_parse_round_trips_with_msrs() {
        let mut table = parse_dump(KUT).unwrap();
        table.msrs.push(MsrEntry {
            index: 0x10a,
            value: 0x1_0000_002b,
        });
        let text = write_dump(&table);
        assert!(text.contains("00000001 00000000: 000306c1 00000800 f7fa3223 078bfbff"));
        assert_eq!(parse_dump(&text).unwrap(), table);
    }

    #[test]
    fn bad_data_lines_name_their_line() {
        let text = "00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n00000001 00000000: 000306c1 zz 1 2\n";
        let err = parse_dump(text).unwrap_err();
        assert!(matches!(err, DumpError::Line { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("line 2") && err.to_string().contains("EBX"));
        let short = "00000001 00000000: 000306c1 00000800\n";
        let err = parse_dump(short).unwrap_err();
        assert!(err.to_string().contains("found 4"), "{err}");
        let tool = "CPU:\n   0x00000001 0x00: eax=0x1 ebx=0x2 ecx=0x3\n";
        let err = parse_dump(tool).unwrap_err();
        assert!(matches!(err, DumpError::Line { line: 2, .. }), "{err}");
        assert!(matches!(parse_dump("hello\n"), Err(DumpError::Empty)));
        assert!(matches!(parse_dump(""), Err(DumpError::Empty)));
    }

    #[test]
    fn conflicting_duplicates_are_rejected() {
        let text = "00000001 00000000: 00000001 00000000 00000000 00000000\n00000001 00000000: 00000002 00000000 00000000 00000000\n";
        let err = parse_dump(text).unwrap_err();
        assert!(
            matches!(
                err,
                DumpError::Conflict {
                    line: 2,
                    first: 1,
                    ..
                }
            ),
            "{err}"
        );
        let same = "00000001 00000000: 00000001 00000000 00000000 00000000\n 00000001 00000000: 00000001 00000000 00000000 00000000\n";
        assert_eq!(parse_dump(same).unwrap().entries.len(), 1);
    }

    #[test]
    fn diff_input_is_split_or_refused() {
        let diff = "--- a.txt\n+++ b.txt\n@@ -1,3 +1,3 @@\n 00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n-00000001 00000000: 000306c1 00000800 f7fa3223 078bfbff\n+00000001 00000000: 000306c1 00000800 f7fa3203 078bfbff\n";
        let err = parse_dump(diff).unwrap_err();
        assert!(matches!(err, DumpError::IsDiff { line: 6 }), "{err}");
        let (old, new) = parse_unified_diff(diff).unwrap();
        assert_eq!(old.entries.len(), 2);
        assert_eq!(new.entries.len(), 2);
        assert_eq!(old.get(1, 0).unwrap().ecx, 0xf7fa3223);
        assert_eq!(new.get(1, 0).unwrap().ecx, 0xf7fa3203);
        assert_eq!(old.get(0, 0), new.get(0, 0));
        // One side's lines alone (a hunk pasted with its prefixes) parse as a dump.
        let one_side = " 00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n-00000001 00000000: 000306c1 00000800 f7fa3223 078bfbff\n";
        assert_eq!(parse_dump(one_side).unwrap(), old);
    }
}
