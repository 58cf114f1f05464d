//! The `prepare begin` phase: every start passes here; only an incoming guest is examined.
//!
//! A normal start costs one `stat` of the incoming record (plus reading an absent or small config
//! file): no XML parsing, no probing. A broken configuration never blocks a normal start.

use std::io::Read;

use crate::audit::{Record, Severity};
use crate::config::Config;
use crate::domain::document;
use crate::hook::{drain, read_limited, HookCall, Outcome};
use crate::incoming;

pub(super) fn run(call: &HookCall, input: &mut dyn Read) -> Outcome {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            // The migrate/restore phase of an incoming guest already refused on this error; a
            // normal start goes on.
            drain(input);
            Record::new(Severity::Warning, "prepare", "ignored")
                .field("domain", &call.domain)
                .field("reason", &format!("configuration error: {e}"))
                .emit();
            return Outcome::ok();
        }
    };
    let record = match incoming::take(&config.runtime_dir, &call.domain, incoming::now()) {
        Ok(Some(r)) => r,
        Ok(None) => {
            drain(input);
            return Outcome::ok();
        }
        Err(e) => {
            drain(input);
            Record::new(Severity::Error, "prepare", "refused")
                .field("domain", &call.domain)
                .field("reason", &e.to_string())
                .emit();
            return Outcome::refused(format!(
                "cpuguard: refusing incoming guest {}: {e}",
                call.domain
            ));
        }
    };
    let refuse = |reason: String| {
        Record::new(Severity::Error, "prepare", "refused")
            .field("domain", &call.domain)
            .field("reason", &reason)
            .emit();
        Outcome::refused(format!(
            "cpuguard: refusing incoming {} of {}: {reason}",
            record.origin.as_str(),
            call.domain
        ))
    };
    let bytes = match read_limited(input, config.max_xml_bytes) {
        Ok((_, true)) => {
            return refuse(format!(
                "domain XML is over the {}-byte limit (max_xml_bytes)",
                config.max_xml_bytes
            ))
        }
        Ok((bytes, false)) => bytes,
        Err(e) => return refuse(format!("cannot read the domain XML: {e}")),
    };
    let uuid = match document::parse_bytes(&bytes, config.max_xml_bytes) {
        Ok(doc) => doc.uuid,
        Err(e) => return refuse(e.to_string()),
    };
    // The fingerprint comparison (source stamp against this host's measurement) plugs in here;
    // until it is built, the incoming guest is let through and the audit trail says so.
    Record::new(Severity::Warning, "prepare", "allowed")
        .field("domain", &call.domain)
        .opt_field("uuid", uuid.as_deref())
        .field("incoming", record.origin.as_str())
        .field(
            "reason",
            "fingerprint comparison is not available in this build",
        )
        .emit();
    Outcome::ok()
}
