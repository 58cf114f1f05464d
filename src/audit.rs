//! The audit trail: one syslog line per decision, tag `cpuguard`, `key=value` fields.
//!
//! Values come from untrusted XML (domain names), so they are quoted and escaped: a crafted name
//! must not forge fields or split the line. They are also bounded: a value is cut at
//! [`FIELD_CAP`] bytes ([`LONG_FIELD_CAP`] for reasons), marked as cut with its full length, and
//! the whole line at [`LINE_CAP`] bytes, so every line fits in one syslog datagram (a datagram
//! over the socket's limit fails with EMSGSIZE and the decision would never reach syslog) and in
//! rsyslog's default 8 KiB message size. When `/dev/log` is absent the decision still happens;
//! the line goes to stderr instead and the hook says once that syslog is unavailable.
//!
//! [`escape`] is the same escaping for untrusted text cpuguard prints for the operator.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Mutex;

use once_cell::sync::Lazy;
use syslog::{Facility, Formatter3164, Logger, LoggerBackend};

/// The syslog tag of every audit line (`journalctl -t cpuguard`, rsyslog's `programname`).
pub const TAG: &str = "cpuguard";

/// Longest escaped value of a field, in bytes, before it is cut (and marked).
pub const FIELD_CAP: usize = 256;
/// The same for fields that explain a decision (`reason`, `informational`, `changes`).
pub const LONG_FIELD_CAP: usize = 1024;
/// Longest line; beyond it whole fields are dropped and `cut=line` says so. Far below both the
/// datagram limit of a Unix socket (~200 KiB by default) and rsyslog's 8 KiB message size.
pub const LINE_CAP: usize = 4096;

/// The syslog severity of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// `info`: an ordinary decision (allowed, stamped, rewrote).
    Info,
    /// `warning`: the decision stands but the operator should look (a policy let something
    /// through, a record or cache entry discarded, an unknown operation ignored).
    Warning,
    /// `err`: a refusal, or a step that failed (e.g. a stamp that could not be written).
    Error,
}

/// One audit record under construction: `Record::new(..).field("k", v).emit()`.
#[derive(Debug, Clone)]
pub struct Record {
    severity: Severity,
    line: String,
}

impl Record {
    /// Every record carries the phase and the action; callers add domain, uuid, reason and more.
    pub fn new(severity: Severity, phase: &str, action: &str) -> Record {
        let mut r = Record {
            severity,
            line: String::new(),
        };
        r = r.field("phase", phase).field("action", action);
        r
    }

    /// Appends `key=value`, the value quoted and escaped when it needs it and cut at [`FIELD_CAP`]
    /// bytes ([`LONG_FIELD_CAP`] for `reason`, `informational`, `changes`); once the line would
    /// pass [`LINE_CAP`], this and later fields are dropped and `cut=line` ends the line.
    pub fn field(mut self, key: &str, value: &str) -> Record {
        let cap = if matches!(key, "reason" | "informational" | "changes") {
            LONG_FIELD_CAP
        } else {
            FIELD_CAP
        };
        let mut field = String::with_capacity(key.len() + value.len().min(cap) + 8);
        field.push_str(key);
        field.push('=');
        push_value(&mut field, value, cap);
        if self.line.ends_with(" cut=line") {
            return self;
        }
        const MARK: &str = " cut=line";
        if self.line.len() + 1 + field.len() + MARK.len() > LINE_CAP {
            self.line.push_str(MARK);
            return self;
        }
        if !self.line.is_empty() {
            self.line.push(' ');
        }
        self.line.push_str(&field);
        self
    }

    /// [`Record::field`] when `value` is Some; nothing otherwise.
    pub fn opt_field(self, key: &str, value: Option<&str>) -> Record {
        match value {
            Some(v) => self.field(key, v),
            None => self,
        }
    }

    /// The line as built so far, as it will be sent (without the syslog header).
    pub fn line(&self) -> &str {
        &self.line
    }

    /// Sends the line to syslog (or stderr when syslog is unavailable).
    pub fn emit(self) {
        emit_line(self.severity, &self.line);
    }
}

fn is_bare(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/,+@%>".contains(c))
}

/// Plain tokens stay bare; anything else is double-quoted with `\"`, `\\` and control characters
/// escaped, so one record is always one line that splits unambiguously on spaces. Past `cap`
/// bytes the value is cut at a character boundary and ends in `…(cut from N bytes)`.
fn push_value(out: &mut String, value: &str, cap: usize) {
    if value.len() <= cap && is_bare(value) {
        out.push_str(value);
        return;
    }
    out.push('"');
    let start = out.len();
    let mut escaped = String::new();
    for c in value.chars() {
        escaped.clear();
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            c if c.is_control() || is_bidi_control(c) => {
                let _ = write!(escaped, "\\u{{{:x}}}", c as u32);
            }
            c => escaped.push(c),
        }
        if out.len() - start + escaped.len() > cap {
            let _ = write!(out, "…(cut from {} bytes)", value.len());
            break;
        }
        out.push_str(&escaped);
    }
    out.push('"');
}

/// Characters that reorder what a terminal shows (Unicode bidirectional controls): escaped like
/// control characters, so a name cannot display as another.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Untrusted text (a domain name, anything from the XML) as the audit trail writes it, for
/// messages to the operator: plain tokens unchanged, anything else quoted with control
/// characters escaped, so it can neither drive the terminal (ESC, CR) nor split a line.
pub fn escape(value: &str) -> Cow<'_, str> {
    if is_bare(value) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    push_value(&mut out, value, usize::MAX);
    Cow::Owned(out)
}

/// Text cpuguard wrote for the operator with untrusted parts inside (error messages quoting the
/// XML, vendor strings from a stamp): every control character but the line breaks cpuguard put
/// there is escaped, as a last line of defence for the terminal `virsh` prints it on.
pub fn sanitize_message(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| (c.is_control() && c != '\n') || is_bidi_control(c))
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if (c.is_control() && c != '\n') || is_bidi_control(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

enum Sink {
    Syslog(Box<Logger<LoggerBackend, Formatter3164>>),
    Stderr,
}

static SINK: Lazy<Mutex<Sink>> = Lazy::new(|| Mutex::new(open_sink()));

/// Lines meant for stderr while stderr is deferred (see [`defer_stderr`]).
static DEFERRED: Mutex<Option<Vec<String>>> = Mutex::new(None);

/// Holds back what the audit trail would write to stderr until [`flush_deferred`]. The hook
/// uses it so that the first line libvirt shows the operator is cpuguard's verdict, not a note
/// that syslog is down.
pub fn defer_stderr() {
    let mut d = DEFERRED.lock().unwrap_or_else(|p| p.into_inner());
    d.get_or_insert_with(Vec::new);
}

/// Writes (and stops deferring) the held-back stderr lines.
pub fn flush_deferred() {
    let lines = DEFERRED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    for line in lines {
        eprintln!("{line}");
    }
}

fn to_stderr(line: String) {
    let mut d = DEFERRED.lock().unwrap_or_else(|p| p.into_inner());
    match d.as_mut() {
        Some(held) => held.push(line),
        None => eprintln!("{line}"),
    }
}

fn open_sink() -> Sink {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: TAG.into(),
        pid: std::process::id(),
    };
    match syslog::unix(formatter) {
        Ok(logger) => Sink::Syslog(Box::new(logger)),
        Err(e) => {
            to_stderr(format!(
                "cpuguard: syslog is unavailable ({e}); audit lines go to stderr"
            ));
            Sink::Stderr
        }
    }
}

fn emit_line(severity: Severity, line: &str) {
    let mut sink = match SINK.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    let sent = match &mut *sink {
        Sink::Syslog(logger) => {
            let r = match severity {
                Severity::Info => logger.info(line),
                Severity::Warning => logger.warning(line),
                Severity::Error => logger.err(line),
            };
            match r {
                Ok(()) => true,
                Err(e) => {
                    // The daemon went away after we connected: say so once, then use stderr.
                    to_stderr(format!(
                        "cpuguard: syslog write failed ({e}); audit lines go to stderr"
                    ));
                    *sink = Sink::Stderr;
                    false
                }
            }
        }
        Sink::Stderr => false,
    };
    if !sent {
        to_stderr(format!("{TAG}: audit: {line}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_one_unambiguous_line() {
        let r = Record::new(Severity::Info, "migrate", "rewrote")
            .field("domain", "web 1\"\nphase=forged")
            .field("uuid", "06c0c0dc-1080-4d3f-bdac-967d624c94f9")
            .field("changes", "cpu.check:partial->full")
            .opt_field("absent", None)
            .field("empty", "");
        assert_eq!(
            r.line(),
            "phase=migrate action=rewrote domain=\"web 1\\\"\\nphase=forged\" uuid=06c0c0dc-1080-4d3f-bdac-967d624c94f9 changes=cpu.check:partial->full empty=\"\""
        );
        assert!(!r.line().contains('\n'));
    }

    #[test]
    fn control_characters_are_escaped() {
        let r = Record::new(Severity::Warning, "p", "a").field("x", "a\u{1b}[31mb");
        assert_eq!(r.line(), "phase=p action=a x=\"a\\u{1b}[31mb\"");
    }

    #[test]
    fn fields_and_lines_are_capped_and_marked() {
        let long = "h".repeat(300_000);
        let r = Record::new(Severity::Info, "prepare", "allowed")
            .field("source_host", &long)
            .field("reason", &"r".repeat(5000));
        let at = r.line().find("source_host=").expect("field");
        let end = r.line().find(" reason=").expect("next field");
        let host = &r.line()[at..end];
        assert!(
            host.len() <= "source_host=\"\"".len() + FIELD_CAP + 40,
            "{}",
            host.len()
        );
        assert!(host.ends_with("…(cut from 300000 bytes)\""), "{host}");
        assert!(r.line().contains("…(cut from 5000 bytes)"));
        // Escapes count towards the cap and are never split.
        let r = Record::new(Severity::Info, "p", "a").field("x", &"\u{1b}".repeat(1000));
        assert!(
            r.line().contains("\\u{1b}…(cut from 1000 bytes)"),
            "{}",
            r.line()
        );
        // However many fields, the line stays under LINE_CAP and says it was cut.
        let mut r = Record::new(Severity::Info, "p", "a");
        for i in 0..100 {
            r = r.field(&format!("f{i}"), &"v".repeat(1000));
        }
        assert!(r.line().len() <= LINE_CAP, "{}", r.line().len());
        assert!(r.line().ends_with(" cut=line"));
    }

    #[test]
    fn operator_text_is_escaped_like_syslog() {
        assert_eq!(escape("guest1"), "guest1");
        assert_eq!(escape("a\u{1b}[2J\rb"), "\"a\\u{1b}[2J\\u{d}b\"");
        assert_eq!(sanitize_message("x\n  y\u{7}"), "x\n  y\\u{7}");
        assert_eq!(escape("a\u{202e}b"), "\"a\\u{202e}b\"");
    }
}
