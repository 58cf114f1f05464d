//! Parses what the probe firmware prints on port 0xe9 (format documented in build.rs) into a
//! [`CpuidTable`].
//!
//! The output crosses a process boundary and may be cut short (timeout, crash, full disk), so
//! every line is checked and the `END` marker's line count must match: a partial table is never
//! returned, because a partial table would compare as "different" for the wrong reason.

use crate::cpuid::{CpuidEntry, CpuidTable, MsrEntry};

/// First line of every probe output; the number is the format version.
pub const HEADER: &str = "CPUGUARD-PROBE 1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutputError {
    #[error("probe output is empty (the firmware printed nothing)")]
    Empty,
    #[error("probe output is not ASCII text at byte {offset}")]
    NotText { offset: usize },
    #[error("probe output line 1: expected header {HEADER:?}, found {found:?}")]
    BadHeader { found: String },
    #[error("probe output line {line}: {reason}: {text:?}")]
    BadLine {
        line: usize,
        reason: &'static str,
        text: String,
    },
    #[error("probe output line {line}: CPUID leaf {leaf:#x} sub-leaf {subleaf:#x} appears twice")]
    DuplicateLeaf {
        line: usize,
        leaf: u32,
        subleaf: u32,
    },
    #[error("probe output line {line}: MSR {index:#x} appears twice")]
    DuplicateMsr { line: usize, index: u32 },
    #[error("probe output line {line}: the guest hit an unexpected CPU exception")]
    GuestFault { line: usize },
    #[error("probe output is truncated: no END marker after {lines} lines")]
    Truncated { lines: usize },
    #[error("probe output END marker counts {expected} lines but {found} were read")]
    CountMismatch { expected: u32, found: usize },
    #[error("probe output line {line}: text after the END marker: {text:?}")]
    TrailingText { line: usize, text: String },
}

/// What the probe reported besides the table: MSRs whose read raised #GP although CPUID
/// enumerates them (a hypervisor inconsistency worth reporting, not a table entry).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeOutput {
    pub table: CpuidTable,
    pub absent_msrs: Vec<u32>,
}

/// Parses the complete output; the table comes back canonicalized.
pub fn parse(bytes: &[u8]) -> Result<ProbeOutput, OutputError> {
    if let Some(offset) = bytes.iter().position(|b| !b.is_ascii()) {
        return Err(OutputError::NotText { offset });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| OutputError::NotText {
        offset: e.valid_up_to(),
    })?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let header = match lines.next() {
        None => return Err(OutputError::Empty),
        Some((_, l)) => l,
    };
    if header != HEADER {
        return Err(OutputError::BadHeader {
            found: truncate(header),
        });
    }

    let mut out = ProbeOutput::default();
    let mut records = 0usize;
    let mut end: Option<u32> = None;
    let mut seen_leaves = std::collections::HashSet::new();
    let mut seen_msrs = std::collections::HashSet::new();
    for (line, text) in lines.by_ref() {
        let bad = |reason: &'static str| OutputError::BadLine {
            line,
            reason,
            text: truncate(text),
        };
        let fields: Vec<&str> = text.split(' ').collect();
        match fields.first().copied() {
            Some("C") => {
                let [leaf, subleaf, eax, ebx, ecx, edx] = hex_fields::<6>(&fields[1..], 8)
                    .ok_or_else(|| bad("expected `C` and six 8-digit hex fields"))?;
                if !seen_leaves.insert((leaf, subleaf)) {
                    return Err(OutputError::DuplicateLeaf {
                        line,
                        leaf,
                        subleaf,
                    });
                }
                out.table.entries.push(CpuidEntry {
                    leaf,
                    subleaf,
                    eax,
                    ebx,
                    ecx,
                    edx,
                });
            }
            Some("M") => {
                if fields.len() != 3 || fields[2].len() != 16 {
                    return Err(bad("expected `M`, an 8-digit index and a 16-digit value"));
                }
                let [index] = hex_fields::<1>(&fields[1..2], 8)
                    .ok_or_else(|| bad("MSR index is not 8 hex digits"))?;
                let value = parse_hex_u64(fields[2]).ok_or_else(|| bad("MSR value is not hex"))?;
                if !seen_msrs.insert(index) {
                    return Err(OutputError::DuplicateMsr { line, index });
                }
                out.table.msrs.push(MsrEntry { index, value });
            }
            Some("X") => {
                let [index] = hex_fields::<1>(&fields[1..], 8)
                    .ok_or_else(|| bad("expected `X` and an 8-digit MSR index"))?;
                if !seen_msrs.insert(index) {
                    return Err(OutputError::DuplicateMsr { line, index });
                }
                out.absent_msrs.push(index);
            }
            Some("F") if fields.len() == 1 => return Err(OutputError::GuestFault { line }),
            // The fatal handler starts its line with a newline, so a cut line precedes it.
            Some("") if fields.len() == 1 => continue,
            Some("END") => {
                let [count] = hex_fields::<1>(&fields[1..], 8)
                    .ok_or_else(|| bad("expected `END` and an 8-digit line count"))?;
                end = Some(count);
                break;
            }
            _ => return Err(bad("unknown record")),
        }
        records += 1;
    }
    let Some(expected) = end else {
        return Err(OutputError::Truncated { lines: records + 1 });
    };
    if let Some((line, text)) = lines.find(|(_, l)| !l.trim().is_empty()) {
        return Err(OutputError::TrailingText {
            line,
            text: truncate(text),
        });
    }
    if usize::try_from(expected).ok() != Some(records) {
        return Err(OutputError::CountMismatch {
            expected,
            found: records,
        });
    }

    out.table.canonicalize();
    out.absent_msrs.sort_unstable();
    Ok(out)
}

/// Exactly N fields, each exactly `digits` lowercase/uppercase hex digits.
fn hex_fields<const N: usize>(fields: &[&str], digits: usize) -> Option<[u32; N]> {
    if fields.len() != N {
        return None;
    }
    let mut values = [0u32; N];
    for (value, field) in values.iter_mut().zip(fields) {
        if field.len() != digits || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *value = u32::from_str_radix(field, 16).ok()?;
    }
    Some(values)
}

fn parse_hex_u64(field: &str) -> Option<u64> {
    if !field.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(field, 16).ok()
}

/// Error messages quote at most the start of a bad line, so a garbled dump stays one line.
fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        [
            HEADER,
            "C 00000000 00000000 0000000d 756e6547 6c65746e 49656e69",
            "C 00000007 00000000 00000000 019803a9 00000008 20000000",
            "C 00000001 00000000 00050654 00040800 f6d83203 178bfbfd",
            "M 0000010a 000000000000002b",
            "X 00000345",
            "END 00000005",
            "",
        ]
        .join("\n")
    }

    #[test]
    fn parses_a_complete_dump_sorted() {
        let out = parse(sample().as_bytes()).unwrap();
        let leaves: Vec<u32> = out.table.entries.iter().map(|e| e.leaf).collect();
        assert_eq!(leaves, vec![0, 1, 7]);
        let leaf0 = out.table.get(0, 0).unwrap();
        assert_eq!(leaf0.ebx, 0x756e_6547);
        assert_eq!(out.table.get(7, 0).unwrap().edx, 0x2000_0000);
        assert_eq!(out.table.msr(0x10a), Some(0x2b));
        assert_eq!(out.table.msr(0x345), None);
        assert_eq!(out.absent_msrs, vec![0x345]);
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let full = sample();
        // Cutting anywhere before the END line's last digit must fail.
        let end_at = full.find("END").unwrap() + "END 0000000".len();
        for cut in 0..end_at {
            assert!(
                parse(&full.as_bytes()[..cut]).is_err(),
                "cut at {cut} was accepted"
            );
        }
        assert!(matches!(
            parse(&full.as_bytes()[..full.find("END").unwrap()]),
            Err(OutputError::Truncated { .. })
        ));
    }

    #[test]
    fn count_mismatch_is_detected() {
        let text = sample().replace("END 00000005", "END 00000006");
        assert_eq!(
            parse(text.as_bytes()),
            Err(OutputError::CountMismatch {
                expected: 6,
                found: 5
            })
        );
    }

    #[test]
    fn garbled_lines_are_rejected_with_their_line_number() {
        let text = sample().replace("019803a9", "0198z3a9");
        match parse(text.as_bytes()) {
            Err(OutputError::BadLine { line, .. }) => assert_eq!(line, 3),
            other => panic!("expected BadLine, got {other:?}"),
        }
        let text = sample().replace("C 00000001", "Q 00000001");
        assert!(matches!(
            parse(text.as_bytes()),
            Err(OutputError::BadLine { line: 4, .. })
        ));
        let mut bytes = sample().into_bytes();
        bytes[30] = 0xff;
        assert_eq!(parse(&bytes), Err(OutputError::NotText { offset: 30 }));
    }

    #[test]
    fn header_duplicates_fault_and_trailing_text() {
        assert_eq!(parse(b""), Err(OutputError::Empty));
        assert!(matches!(
            parse(b"SeaBIOS (version 1.16)\n"),
            Err(OutputError::BadHeader { .. })
        ));
        let dup = sample().replace("C 00000001 00000000", "C 00000000 00000000");
        assert!(matches!(
            parse(dup.as_bytes()),
            Err(OutputError::DuplicateLeaf {
                leaf: 0,
                subleaf: 0,
                ..
            })
        ));
        let fault =
            format!("{HEADER}\nC 00000000 00000000 0000000d 00000000 00000000 00000000\n\nF\n");
        assert!(matches!(
            parse(fault.as_bytes()),
            Err(OutputError::GuestFault { line: 4 })
        ));
        let trailing = format!("{}garbage\n", sample());
        assert!(matches!(
            parse(trailing.as_bytes()),
            Err(OutputError::TrailingText { line: 8, .. })
        ));
    }
}
