//! The `prepare begin` phase: every start passes here; only an incoming guest is examined.
//!
//! A normal start costs one `stat` of the incoming record, the runtime directory's checks and a
//! scan of the XML for cpuguard's stamp namespace (plus reading an absent or small config file):
//! no XML parsing, no probing. A broken configuration never blocks a normal start.
//!
//! An incoming guest is known by its record (left by `migrate begin` / `restore begin`, matched by
//! UUID) or, when the record is missing, by a cpuguard stamp in the XML: the stamp lives only in
//! a running domain's live metadata, so a definition started cold does not carry one.

use std::io::Read;

use crate::audit::escape;
use crate::audit::{Record, Severity};
use crate::cache::Source;
use crate::config::Config;
use crate::domain::document::{self, DomainDocument};
use crate::domain::metadata::STAMP_NS;
use crate::domain::metadata::{DomainPolicy, Stamp};
use crate::guard::{judge_loading_names, Decision, Incoming};
use crate::hook::{drain, read_limited, HookCall, Outcome};
use crate::incoming::{self, Claim, Origin};
use crate::measure::{self, Measurement};
use crate::x86_64::FeatureMap;

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
    let name = escape(&call.domain);
    let refuse_as = |origin: Origin, reason: String| {
        Record::new(Severity::Error, "prepare", "refused")
            .field("domain", &call.domain)
            .field("incoming", origin.as_str())
            .field("reason", &reason)
            .emit();
        Outcome::refused(format!(
            "cpuguard: refusing {} of {name}: {reason}",
            origin.describe()
        ))
    };
    // A runtime directory someone else can write to cannot say whether this start is incoming:
    // its records are not consulted (the stamp below still is).
    let dir_ok = match incoming::check_dir(&config.runtime_dir) {
        Ok(0) => true,
        Ok(discarded) => {
            super::audit_narrowed_runtime_dir(
                "prepare",
                &call.domain,
                &config.runtime_dir,
                discarded,
            );
            true
        }
        Err(e) => {
            Record::new(Severity::Warning, "prepare", "ignored")
                .field("domain", &call.domain)
                .field("reason", &format!("incoming records not consulted: {e}"))
                .emit();
            false
        }
    };
    let has_record = dir_ok && incoming::present(&config.runtime_dir, &call.domain);
    let (bytes, over) = match read_limited(input, config.max_xml_bytes) {
        Ok(r) => r,
        Err(e) if has_record => {
            return refuse_as(Origin::Migrate, format!("cannot read the domain XML: {e}"))
        }
        Err(_) => return Outcome::ok(),
    };
    // The common case, a normal start: no record and no stamp in the XML. A substring search,
    // no parsing.
    let mentions_stamp = contains(&bytes, STAMP_NS.as_bytes());
    if !has_record && !mentions_stamp {
        return Outcome::ok();
    }
    if over {
        return refuse_as(
            Origin::Migrate,
            format!(
                "domain XML is over the {}-byte limit (max_xml_bytes)",
                config.max_xml_bytes
            ),
        );
    }
    let doc = match document::parse_bytes(&bytes, config.max_xml_bytes) {
        Ok(doc) => doc,
        Err(e) => return refuse_as(Origin::Migrate, e.to_string()),
    };
    let claim = if has_record {
        match incoming::take(
            &config.runtime_dir,
            &call.domain,
            doc.uuid.as_deref(),
            incoming::now(),
        ) {
            Ok(claim) => claim,
            Err(e) => return refuse_as(Origin::Migrate, e.to_string()),
        }
    } else {
        Claim::None
    };
    let origin = match claim {
        Claim::Matched(record) => record.origin,
        other => {
            if let Claim::Stale(why) = &other {
                // A migration that failed after `migrate begin` left it: not this start's.
                Record::new(Severity::Warning, "prepare", "discarded")
                    .field("domain", &call.domain)
                    .opt_field("uuid", doc.uuid.as_deref())
                    .field("reason", why)
                    .emit();
            }
            if doc.stamp.is_none() {
                return Outcome::ok();
            }
            // libvirt keeps cpuguard's stamp only in a running domain's live metadata: XML that
            // carries one is a running guest's, arriving without its record (deleted, expired,
            // or the runtime directory unusable). Judged as incoming rather than let through.
            Origin::Inferred
        }
    };
    let refuse = |reason: String| refuse_as(origin, reason);
    if let Err(reason) = super::commandline_cpu(&doc, &config, "prepare", &call.domain) {
        return refuse(reason);
    }
    let assessment = match assess(&doc, &call.domain, origin, &config) {
        Ok(a) => a,
        Err(e) => return refuse(e),
    };
    let Assessment {
        decision,
        stamp,
        measured,
        signature_problem,
    } = assessment;
    if let Some(reason) = &signature_problem {
        Record::new(Severity::Warning, "prepare", "signature")
            .field("domain", &call.domain)
            .opt_field("uuid", doc.uuid.as_deref())
            .opt_field(
                "source_host",
                stamp.as_ref().and_then(|s| s.host.as_deref()),
            )
            .field("reason", reason)
            .emit();
    }

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
            .field("incoming", origin.as_str())
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

/// Whether `needle` occurs in `haystack` (a plain scan: the hook's warm path needs no index).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The verdict on an incoming guest and what it was based on.
pub struct Assessment {
    /// Allow or refuse, with the reason and the operator's message.
    pub decision: Decision,
    /// The source's stamp as read from the prepare XML; None when there is none.
    pub stamp: Option<Stamp>,
    /// This host's measurement for the guest: None when no measurement was needed (opted out,
    /// unstamped, or refused on the signature first), Err(reason) when it failed.
    pub measured: Option<Result<Measurement, String>>,
    /// Why the stamp's signature was not accepted, when it was not (audited as a warning).
    pub signature_problem: Option<String>,
}

/// Checks the stamp's signature against this host's fleet key: Err(reason) when the stamp must
/// be refused. A wrong signature is always refused (forged, edited, or another fleet's key); an
/// unsigned stamp only under `stamp.require_signature`.
fn check_signature(stamp: &Stamp, config: &Config) -> Result<(), String> {
    use crate::signature::{load_key, verify, Verification};
    let required = config.stamp.require_signature;
    let key = match load_key(&config.stamp.key_file) {
        Ok(key) => key,
        Err(e) if required || stamp.signature.is_some() => {
            return Err(format!("cannot check the stamp's signature: {e}"))
        }
        Err(_) => return Ok(()),
    };
    let Some(key) = key else {
        return if required {
            Err(format!(
                "stamp.require_signature is set but there is no fleet key at {}",
                config.stamp.key_file.display()
            ))
        } else {
            Ok(())
        };
    };
    match verify(&key, stamp) {
        Verification::Valid => Ok(()),
        Verification::Invalid => Err(
            "the stamp's signature does not match this fleet's key (forged, edited, or signed \
             with another key)"
                .to_string(),
        ),
        Verification::Unsigned if required => {
            Err("the stamp is not signed (stamp.require_signature = true)".to_string())
        }
        Verification::Unsigned => Ok(()),
    }
}

/// Judges an incoming domain document on this host: its stamp, this host's fingerprint for the
/// CPU it carries (cache or probe), the policies. Shared by the hook and `cpuguard check`.
pub fn assess(
    doc: &DomainDocument<'_>,
    domain: &str,
    origin: Origin,
    config: &Config,
) -> Result<Assessment, String> {
    let stamp = doc.stamp.map(|s| Stamp::read(doc.slice(s)));
    let opt_out = doc
        .policy
        .map(|p| DomainPolicy::read(doc.slice(p)))
        .unwrap_or_default();
    // Measure only when the verdict depends on it: an opted-out or unstamped guest needs no probe.
    let opted_out = opt_out.guard_off && config.policy.allow_domain_opt_out;
    if let (Some(s), false) = (stamp.as_ref(), opted_out) {
        if let Err(reason) = check_signature(s, config) {
            let (verb, domain) = (origin.describe(), crate::audit::escape(domain));
            let message = format!(
                "cpuguard: refusing {verb} of {domain}: {reason}\n  run `cpuguard stamp --force \
                 {domain}` on the source host (with the fleet key in place) and migrate again"
            );
            return Ok(Assessment {
                decision: Decision::Refuse {
                    reason: reason.clone(),
                    message,
                },
                stamp,
                measured: None,
                signature_problem: Some(reason),
            });
        }
    }
    let measured = if opted_out || stamp.is_none() {
        None
    } else {
        Some(measure::for_domain_xml(doc.text, config).map_err(|e| e.to_string()))
    };
    // What the stamp must be bound to: this domain, and the CPU configuration it arrives with.
    let config_digest = crate::domain::guest::GuestCpuConfig::from_domain_xml(doc.text)
        .ok()
        .map(|g| g.binding_digest());
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
        uuid: doc.uuid.as_deref(),
        config_digest: config_digest.as_deref(),
        opt_out: &opt_out,
        local: match &measured {
            Some(Ok(m)) => Ok(&m.fingerprint),
            Some(Err(e)) => Err(e.clone()),
            None => Err("not measured".to_string()),
        },
        config_path: &config_path,
    };
    let decision = judge_loading_names(&inc, &config.policy, || {
        FeatureMap::load_default().map_err(|e| format!("cannot name CPU features: {e}"))
    });
    Ok(Assessment {
        decision,
        stamp,
        measured,
        signature_problem: None,
    })
}
