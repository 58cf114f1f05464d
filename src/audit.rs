//! The audit trail: one syslog line per decision, tag `cpuguard`, `key=value` fields.
//!
//! Values come from untrusted XML (domain names), so they are quoted and escaped: a crafted name
//! must not forge fields or split the line. When `/dev/log` is absent the decision still happens;
//! the line goes to stderr instead and the hook says once that syslog is unavailable.

use std::fmt::Write as _;
use std::sync::Mutex;

use once_cell::sync::Lazy;
use syslog::{Facility, Formatter3164, Logger, LoggerBackend};

pub const TAG: &str = "cpuguard";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
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

    pub fn field(mut self, key: &str, value: &str) -> Record {
        if !self.line.is_empty() {
            self.line.push(' ');
        }
        self.line.push_str(key);
        self.line.push('=');
        push_value(&mut self.line, value);
        self
    }

    pub fn opt_field(self, key: &str, value: Option<&str>) -> Record {
        match value {
            Some(v) => self.field(key, v),
            None => self,
        }
    }

    pub fn line(&self) -> &str {
        &self.line
    }

    /// Sends the line to syslog (or stderr when syslog is unavailable).
    pub fn emit(self) {
        emit_line(self.severity, &self.line);
    }
}

/// Plain tokens stay bare; anything else is double-quoted with `\"`, `\\` and control characters
/// escaped, so one record is always one line that splits unambiguously on spaces.
fn push_value(out: &mut String, value: &str) {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/,+@%>".contains(c));
    if bare {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
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
}
