//! Parses the probe firmware's result into a [`CpuidTable`]: [`parse_result`] reads the binary
//! records the probe leaves in guest RAM (layout in `super::layout`), [`parse`] the text lines of
//! the previous wire format (port 0xe9, documented in build.rs), kept for the test image that
//! shows both give the same table.
//!
//! The result crosses a process boundary and may be cut short (timeout, crash, full disk), so
//! every record is checked and the count must match: a partial table is never returned, because a
//! partial table would compare as "different" for the wrong reason.

use super::layout::{
    KIND_CPUID, KIND_MSR, KIND_MSR_ABSENT, RECORDS_ADDR, RECORDS_END, RECORD_SIZE,
    RESULT_COUNT_OFFSET, RESULT_MAGIC, RESULT_SIZE, RESULT_STATUS_OFFSET, STATUS_COMPLETE,
    STATUS_FAULT, STATUS_OVERFLOW,
};
use crate::x86_64::{CpuidEntry, CpuidTable, MsrEntry};

/// First line of every probe output; the number is the format version.
pub const HEADER: &str = "CPUGUARD-PROBE 1";

/// Why the probe's result is unusable. The text variants (up to `TrailingText`) are for the
/// previous wire format, the others for the RAM result; each names the line or record at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutputError {
    /// The firmware wrote no text at all.
    #[error("probe output is empty (the firmware printed nothing)")]
    Empty,
    /// A byte that is not ASCII.
    #[error("probe output is not ASCII text at byte {offset}")]
    NotText {
        /// The 0-based byte offset of the first such byte.
        offset: usize,
    },
    /// The first line is not [`HEADER`]: not this probe, or another format version.
    #[error("probe output line 1: expected header {HEADER:?}, found {found:?}")]
    BadHeader {
        /// The first line, cut to 80 characters.
        found: String,
    },
    /// A line that is not a well-formed record.
    #[error("probe output line {line}: {reason}: {text:?}")]
    BadLine {
        /// The 1-based line number.
        line: usize,
        /// What the line should have been.
        reason: &'static str,
        /// The line, cut to 80 characters.
        text: String,
    },
    /// The same (leaf, sub-leaf) reported twice.
    #[error("probe output line {line}: CPUID leaf {leaf:#x} sub-leaf {subleaf:#x} appears twice")]
    DuplicateLeaf {
        /// The 1-based line of the second report.
        line: usize,
        /// The CPUID leaf.
        leaf: u32,
        /// The sub-leaf.
        subleaf: u32,
    },
    /// The same MSR reported twice (read or absent).
    #[error("probe output line {line}: MSR {index:#x} appears twice")]
    DuplicateMsr {
        /// The 1-based line of the second report.
        line: usize,
        /// The MSR's address.
        index: u32,
    },
    /// The firmware's fatal handler ran: an unexpected CPU exception in the guest.
    #[error("probe output line {line}: the guest hit an unexpected CPU exception")]
    GuestFault {
        /// The 1-based line of the handler's `F`.
        line: usize,
    },
    /// The text ends without its `END` line: the run was cut short.
    #[error("probe output is truncated: no END marker after {lines} lines")]
    Truncated {
        /// Lines read, header included.
        lines: usize,
    },
    /// The `END` line's count is not the number of records read.
    #[error("probe output END marker counts {expected} lines but {found} were read")]
    CountMismatch {
        /// The count the `END` line states.
        expected: u32,
        /// The records read between header and `END`.
        found: usize,
    },
    /// Something other than blank lines after `END`.
    #[error("probe output line {line}: text after the END marker: {text:?}")]
    TrailingText {
        /// The 1-based line number.
        line: usize,
        /// The line, cut to 80 characters.
        text: String,
    },
    /// Guest RAM holds no finished result summary (no [`RESULT_MAGIC`]): the firmware did not
    /// get to its end.
    #[error("probe result: the firmware left no result in guest RAM (it did not finish)")]
    NoResult,
    /// The summary's status is [`STATUS_FAULT`]: an unexpected CPU exception in the guest.
    #[error("probe result: the guest hit an unexpected CPU exception after {records} records")]
    Fault {
        /// Records written before the exception.
        records: u32,
    },
    /// The summary's status is [`STATUS_OVERFLOW`]: the record area filled up.
    #[error("probe result: more records than the firmware's area holds; the table is incomplete")]
    Overflow,
    /// The summary's status is none the firmware writes (the value is shown).
    #[error("probe result: unknown status {0}")]
    BadStatus(u32),
    /// The summary's record count exceeds [`MAX_RECORDS`] or the bytes read from the record area.
    #[error("probe result: {count} records claimed but {available} bytes of them were read")]
    ShortRecords {
        /// The record count the summary states.
        count: u32,
        /// Bytes of records available.
        available: usize,
    },
    /// A record whose kind is none of `C`, `M`, `X`.
    #[error("probe result record {index}: unknown kind {kind:#x}")]
    BadRecord {
        /// The 0-based record number.
        index: usize,
        /// The record's first u32.
        kind: u32,
    },
    /// The same (leaf, sub-leaf) recorded twice.
    #[error(
        "probe result record {index}: CPUID leaf {leaf:#x} sub-leaf {subleaf:#x} appears twice"
    )]
    DuplicateRecordLeaf {
        /// The 0-based number of the second record.
        index: usize,
        /// The CPUID leaf.
        leaf: u32,
        /// The sub-leaf.
        subleaf: u32,
    },
    /// The same MSR recorded twice (read or absent).
    #[error("probe result record {index}: MSR {msr:#x} appears twice")]
    DuplicateRecordMsr {
        /// The 0-based number of the second record.
        index: usize,
        /// The MSR's address.
        msr: u32,
    },
}

/// The most records the firmware's area holds: a count above it is not the firmware's.
pub const MAX_RECORDS: u32 = (RECORDS_END - RECORDS_ADDR) / RECORD_SIZE;

/// Guest-physical offset and length of the summaries (the table's and the user-mode pass's, with
/// the latter's records): what the runner reads first from the RAM file.
pub fn result_span() -> (u64, usize) {
    (
        u64::from(super::layout::RESULT_ADDR),
        super::layout::SUMMARY_SPAN as usize,
    )
}

/// The CPUID answers the user-mode pass read in long mode at CPL0 and at CPL3, from the bytes of
/// [`result_span`]; `None` when the pass left no result (an image without it).
pub fn parse_user(span: &[u8]) -> Option<(Vec<CpuidEntry>, Vec<CpuidEntry>)> {
    use super::layout::LONG_KERNEL_RECORDS_ADDR;
    Some((
        parse_user_records(span, LONG_KERNEL_RECORDS_ADDR)?,
        parse_user_records(span, super::layout::USER_RECORDS_ADDR)?,
    ))
}

fn parse_user_records(span: &[u8], records_addr: u32) -> Option<Vec<CpuidEntry>> {
    use super::layout::{RESULT_ADDR, USER_ADDR, USER_COUNT_OFFSET, USER_MAGIC};
    let at = |addr: u32| usize::try_from(addr - RESULT_ADDR).ok();
    let summary = span.get(at(USER_ADDR)?..at(USER_ADDR)? + USER_MAGIC.len() + 4)?;
    if &summary[..USER_MAGIC.len()] != USER_MAGIC {
        return None;
    }
    let count = usize::try_from(le32(summary, USER_COUNT_OFFSET as usize)).ok()?;
    let size = RECORD_SIZE as usize;
    let start = at(records_addr)?;
    let records = span.get(start..start.checked_add(count.checked_mul(size)?)?)?;
    records
        .chunks_exact(size)
        .map(|r| {
            let field = |i: usize| le32(r, 4 * i);
            (field(0) == KIND_CPUID).then(|| CpuidEntry {
                leaf: field(1),
                subleaf: field(2),
                eax: field(3),
                ebx: field(4),
                ecx: field(5),
                edx: field(6),
            })
        })
        .collect()
}

/// The record area to read for a summary's count (bounded by the area itself).
pub fn records_span(count: u32) -> (u64, usize) {
    let count = count.min(MAX_RECORDS);
    (
        u64::from(RECORDS_ADDR),
        count as usize * RECORD_SIZE as usize,
    )
}

/// The record count a summary announces, if it is a finished result's.
pub fn summary_count(summary: &[u8]) -> Option<u32> {
    if summary.len() < RESULT_SIZE as usize || &summary[..RESULT_MAGIC.len()] != RESULT_MAGIC {
        return None;
    }
    Some(le32(summary, RESULT_COUNT_OFFSET as usize))
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Parses the RAM result: the summary at `RESULT_ADDR` and the bytes read from `RECORDS_ADDR`.
/// The table comes back canonicalized, exactly as [`parse`] gives it for the same answers.
pub fn parse_result(summary: &[u8], records: &[u8]) -> Result<ProbeOutput, OutputError> {
    let count = summary_count(summary).ok_or(OutputError::NoResult)?;
    match le32(summary, RESULT_STATUS_OFFSET as usize) {
        STATUS_COMPLETE => {}
        STATUS_FAULT => return Err(OutputError::Fault { records: count }),
        STATUS_OVERFLOW => return Err(OutputError::Overflow),
        other => return Err(OutputError::BadStatus(other)),
    }
    let size = RECORD_SIZE as usize;
    let needed = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(size))
        .filter(|&n| count <= MAX_RECORDS && n <= records.len())
        .ok_or(OutputError::ShortRecords {
            count,
            available: records.len(),
        })?;
    let mut out = ProbeOutput::default();
    let mut seen_leaves = std::collections::HashSet::new();
    let mut seen_msrs = std::collections::HashSet::new();
    for (index, record) in records[..needed].chunks_exact(size).enumerate() {
        let field = |i: usize| le32(record, 4 * i);
        match field(0) {
            KIND_CPUID => {
                let (leaf, subleaf) = (field(1), field(2));
                if !seen_leaves.insert((leaf, subleaf)) {
                    return Err(OutputError::DuplicateRecordLeaf {
                        index,
                        leaf,
                        subleaf,
                    });
                }
                out.table.entries.push(CpuidEntry {
                    leaf,
                    subleaf,
                    eax: field(3),
                    ebx: field(4),
                    ecx: field(5),
                    edx: field(6),
                });
            }
            KIND_MSR | KIND_MSR_ABSENT => {
                let msr = field(1);
                if !seen_msrs.insert(msr) {
                    return Err(OutputError::DuplicateRecordMsr { index, msr });
                }
                if field(0) == KIND_MSR {
                    let value = (u64::from(field(3)) << 32) | u64::from(field(2));
                    out.table.msrs.push(MsrEntry { index: msr, value });
                } else {
                    out.absent_msrs.push(msr);
                }
            }
            kind => return Err(OutputError::BadRecord { index, kind }),
        }
    }
    out.table.canonicalize();
    out.absent_msrs.sort_unstable();
    Ok(out)
}

/// What the probe reported besides the table: MSRs whose read raised #GP although CPUID
/// enumerates them (a hypervisor inconsistency worth reporting, not a table entry).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeOutput {
    /// The CPUID answers and readable MSRs, canonicalized.
    pub table: CpuidTable,
    /// MSRs whose read raised #GP, ascending.
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

    fn summary(status: u32, count: u32) -> Vec<u8> {
        let mut s = RESULT_MAGIC.to_vec();
        s.extend(status.to_le_bytes());
        s.extend(count.to_le_bytes());
        s
    }

    fn record(words: &[u32]) -> Vec<u8> {
        let mut r: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        r.resize(RECORD_SIZE as usize, 0);
        r
    }

    /// The records of `sample()`, in the same order.
    fn sample_records() -> Vec<u8> {
        [
            record(&[KIND_CPUID, 0, 0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69]),
            record(&[KIND_CPUID, 7, 0, 0, 0x019803a9, 8, 0x20000000]),
            record(&[KIND_CPUID, 1, 0, 0x50654, 0x40800, 0xf6d83203, 0x178bfbfd]),
            record(&[KIND_MSR, 0x10a, 0x2b, 0]),
            record(&[KIND_MSR_ABSENT, 0x345]),
        ]
        .concat()
    }

    #[test]
    fn ram_records_give_the_text_formats_table() {
        let ram = parse_result(&summary(STATUS_COMPLETE, 5), &sample_records()).unwrap();
        assert_eq!(ram, parse(sample().as_bytes()).unwrap());
        // A high MSR half lands in the high bits.
        let high = record(&[KIND_MSR, 0x10a, 0x2b, 0x1]);
        let out = parse_result(&summary(STATUS_COMPLETE, 1), &high).unwrap();
        assert_eq!(out.table.msr(0x10a), Some(0x1_0000_002b));
    }

    #[test]
    fn unfinished_faulted_short_or_garbled_results_are_errors() {
        let records = sample_records();
        assert_eq!(parse_result(&[0; 24], &records), Err(OutputError::NoResult));
        assert_eq!(
            parse_result(&summary(STATUS_FAULT, 2), &records),
            Err(OutputError::Fault { records: 2 })
        );
        assert_eq!(
            parse_result(&summary(STATUS_OVERFLOW, 5), &records),
            Err(OutputError::Overflow)
        );
        assert_eq!(
            parse_result(&summary(7, 5), &records),
            Err(OutputError::BadStatus(7))
        );
        assert!(matches!(
            parse_result(&summary(STATUS_COMPLETE, 6), &records),
            Err(OutputError::ShortRecords { count: 6, .. })
        ));
        assert!(matches!(
            parse_result(&summary(STATUS_COMPLETE, u32::MAX), &records),
            Err(OutputError::ShortRecords { .. })
        ));
        let mut bad = records.clone();
        bad[RECORD_SIZE as usize] = b'Q';
        assert_eq!(
            parse_result(&summary(STATUS_COMPLETE, 5), &bad),
            Err(OutputError::BadRecord {
                index: 1,
                kind: u32::from(b'Q')
            })
        );
        let dup = [record(&[KIND_CPUID, 1]), record(&[KIND_CPUID, 1])].concat();
        assert!(matches!(
            parse_result(&summary(STATUS_COMPLETE, 2), &dup),
            Err(OutputError::DuplicateRecordLeaf { index: 1, .. })
        ));
        // Fewer records than were read is fine: only `count` are looked at.
        assert_eq!(
            parse_result(&summary(STATUS_COMPLETE, 3), &records)
                .unwrap()
                .table
                .entries
                .len(),
            3
        );
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
