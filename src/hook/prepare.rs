//! The `prepare begin` phase: every start passes here; only an incoming guest is examined.
//!
//! A normal start costs one `stat` of the incoming record (plus reading an absent or small config
//! file): no XML parsing, no probing. A broken configuration never blocks a normal start.

use std::io::Read;

use crate::audit::{Record, Severity};
use crate::cache::Source;
use crate::config::Config;
use crate::cpuid::FeatureMap;
use crate::domain::document::{self, DomainDocument};
use crate::domain::metadata::{DomainPolicy, Stamp};
use crate::guard::{judge, Decision, Incoming};
use crate::hook::{drain, read_limited, HookCall, Outcome};
use crate::incoming::{self, Origin};
use crate::measure::{self, Measurement};

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
    let doc = match document::parse_bytes(&bytes, config.max_xml_bytes) {
        Ok(doc) => doc,
        Err(e) => return refuse(e.to_string()),
    };
    let assessment = match assess(&doc, &call.domain, record.origin, &config) {
        Ok(a) => a,
        Err(e) => return refuse(e),
    };
    let Assessment {
        decision,
        stamp,
        measured,
    } = assessment;

    if let Some(Ok(m)) = &measured {
        for warning in &m.warnings {
            Record::new(Severity::Warning, "prepare", "cache")
                .field("domain", &call.domain)
                .field("reason", &warning.to_string())
                .emit();
        }
    }
    let base = |severity, action| {
        Record::new(severity, "prepare", action)
            .field("domain", &call.domain)
            .opt_field("uuid", doc.uuid.as_deref())
            .field("incoming", record.origin.as_str())
            .opt_field(
                "source_host",
                stamp.as_ref().and_then(|s| s.host.as_deref()),
            )
            .opt_field(
                "source_digest",
                stamp.as_ref().and_then(|s| s.digest.as_deref()),
            )
            .opt_field(
                "local_digest",
                measured
                    .as_ref()
                    .and_then(|m| m.as_ref().ok())
                    .map(|m| m.fingerprint.digest.as_str()),
            )
            .opt_field(
                "fingerprint",
                measured
                    .as_ref()
                    .and_then(|m| m.as_ref().ok())
                    .map(|m| match m.source {
                        Source::Hit => "cached",
                        Source::Measured => "measured",
                    }),
            )
    };
    match decision {
        Decision::Allow {
            reason,
            informational,
            by_policy,
        } => {
            let severity = if by_policy {
                Severity::Warning
            } else {
                Severity::Info
            };
            let mut rec = base(severity, "allowed").field("reason", &reason);
            if !informational.is_empty() {
                rec = rec.field("informational", &informational.join("; "));
            }
            rec.emit();
            Outcome::ok()
        }
        Decision::Refuse { reason, message } => {
            base(Severity::Error, "refused")
                .field("reason", &reason)
                .emit();
            Outcome::refused(message)
        }
    }
}

/// The verdict on an incoming guest and what it was based on.
pub struct Assessment {
    pub decision: Decision,
    pub stamp: Option<Stamp>,
    pub measured: Option<Result<Measurement, String>>,
}

/// Judges an incoming domain document on this host: its stamp, this host's fingerprint for the
/// CPU it carries (cache or probe), the policies. Shared by the hook and `cpuguard check`.
pub fn assess(
    doc: &DomainDocument<'_>,
    domain: &str,
    origin: Origin,
    config: &Config,
) -> Result<Assessment, String> {
    let features =
        FeatureMap::load_default().map_err(|e| format!("cannot name CPU features: {e}"))?;
    let stamp = doc.stamp.map(|s| Stamp::read(doc.slice(s)));
    let opt_out = doc
        .policy
        .map(|p| DomainPolicy::read(doc.slice(p)))
        .unwrap_or_default();
    // Measure only when the verdict depends on it: an opted-out or unstamped guest needs no probe.
    let opted_out = opt_out.guard_off && config.policy.allow_domain_opt_out;
    let measured = if opted_out || stamp.is_none() {
        None
    } else {
        Some(measure::for_domain_xml(doc.text, config).map_err(|e| e.to_string()))
    };
    let this_host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "this host".to_string());
    let config_path = Config::path().display().to_string();
    let inc = Incoming {
        domain,
        this_host: &this_host,
        origin,
        stamp: stamp.as_ref(),
        opt_out: &opt_out,
        local: match &measured {
            Some(Ok(m)) => Ok(&m.fingerprint),
            Some(Err(e)) => Err(e.clone()),
            None => Err("not measured".to_string()),
        },
        config_path: &config_path,
    };
    let decision = judge(&inc, &config.policy, &features);
    Ok(Assessment {
        decision,
        stamp,
        measured,
    })
}
