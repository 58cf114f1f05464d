//! The destination's `migrate begin` and `restore begin` phases: pin the incoming CPU, note that
//! the next `prepare` is an incoming guest, hand the document back byte for byte otherwise.

use std::io::Read;

use crate::audit::{Record, Severity};
use crate::domain::cpu::{pin_custom, AttributeChange, CpuElement, CpuMode};
use crate::domain::document::{self, DomainDocument};
use crate::hook::{drain, read_limited, strict_config, HookCall, Outcome};
use crate::incoming::{self, IncomingRecord, Origin};

/// What the rewrite did to `<cpu>`, for the audit line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuDecision {
    /// A custom CPU, now pinned (`changes` empty: it already was).
    Pinned {
        /// The `<model>` pinned.
        model: String,
        /// The attributes the pinning changed (`match`, `fallback`).
        changes: Vec<AttributeChange>,
    },
    /// Left as it was; the fingerprint comparison at `prepare` still guards it.
    Unchanged {
        /// The `<cpu mode>` as sent, or `none` when the domain has no `<cpu>`.
        mode: String,
        /// Why it was left alone, for the audit line.
        reason: &'static str,
        /// True when nothing guards the guest CPU (e.g. host-model without a stamp): audited as a
        /// warning.
        warning: bool,
    },
}

impl CpuDecision {
    fn audit(&self, record: Record) -> Record {
        let list = |changes: &[AttributeChange]| {
            changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            CpuDecision::Pinned { model, changes } if changes.is_empty() => record
                .field("mode", "custom")
                .field("model", model)
                .field("reason", "CPU already pinned"),
            CpuDecision::Pinned { model, changes } => record
                .field("mode", "custom")
                .field("model", model)
                .field("changes", &list(changes))
                .field("reason", "pinned the source's custom CPU"),
            CpuDecision::Unchanged { mode, reason, .. } => {
                record.field("mode", mode).field("reason", reason)
            }
        }
    }

    fn action(&self) -> &'static str {
        match self {
            CpuDecision::Pinned { changes, .. } if changes.is_empty() => "unchanged",
            CpuDecision::Pinned { .. } => "rewrote",
            CpuDecision::Unchanged { .. } => "unchanged",
        }
    }

    fn severity(&self) -> Severity {
        match self {
            CpuDecision::Unchanged { warning: true, .. } => Severity::Warning,
            _ => Severity::Info,
        }
    }
}

/// Computes the outgoing document. Only the `<cpu>` element's span is ever replaced.
pub fn rewrite_cpu(doc: &DomainDocument<'_>) -> Result<(String, CpuDecision), String> {
    let unchanged = |mode: &str, reason, warning| {
        Ok((
            doc.text.to_string(),
            CpuDecision::Unchanged {
                mode: mode.to_string(),
                reason,
                warning,
            },
        ))
    };
    let Some(span) = doc.cpu else {
        return unchanged("none", "no <cpu> element: the machine's default CPU", false);
    };
    let cpu = CpuElement::parse(doc.slice(span)).map_err(|e| e.to_string())?;
    let replacement = match cpu.mode {
        CpuMode::Custom => match pin_custom(&cpu) {
            Some((text, changes)) => {
                let model = cpu.model_name().unwrap_or_default().to_string();
                (text, CpuDecision::Pinned { model, changes })
            }
            None => return unchanged("custom", "custom CPU without a model", false),
        },
        // libvirt's ABI check refuses a hook output whose CPU mode differs from the incoming one,
        // so a host-model CPU cannot be swapped for the source's expanded CPU here. (libvirt 9
        // sends a running host-model guest's CPU already expanded to custom.)
        CpuMode::HostModel if doc.stamp.is_some() => {
            return unchanged(
                "host-model",
                "host-model left as sent (libvirt refuses a changed CPU mode); the stamp's fingerprint guards it",
                false,
            )
        }
        CpuMode::HostModel => {
            return unchanged(
                "host-model",
                "host-model left as sent (libvirt refuses a changed CPU mode) and no cpuguard stamp to guard it",
                true,
            )
        }
        CpuMode::HostPassthrough => {
            return unchanged(
                "host-passthrough",
                "host-passthrough has no model to pin; the fingerprint guards it",
                false,
            )
        }
        CpuMode::Maximum => {
            return unchanged(
                "maximum",
                "maximum has no model to pin; the fingerprint guards it",
                false,
            )
        }
        CpuMode::Other(ref mode) => {
            return unchanged(mode, "unknown CPU mode left to libvirt", true);
        }
    };
    let (text, decision) = replacement;
    let mut out = String::with_capacity(doc.text.len() + text.len());
    out.push_str(&doc.text[..span.start]);
    out.push_str(&text);
    out.push_str(&doc.text[span.end..]);
    Ok((out, decision))
}

pub(super) fn run(call: &HookCall, input: &mut dyn Read) -> Outcome {
    let origin = if call.operation == "restore" {
        Origin::Restore
    } else {
        Origin::Migrate
    };
    let refuse = |uuid: Option<&str>, reason: String| {
        Record::new(Severity::Error, origin.as_str(), "refused")
            .field("domain", &call.domain)
            .opt_field("uuid", uuid)
            .field("reason", &reason)
            .emit();
        Outcome::refused(format!(
            "cpuguard: refusing {} of {}: {reason}",
            origin.describe(),
            crate::audit::escape(&call.domain)
        ))
    };

    let config = match strict_config() {
        Ok(c) => c,
        Err(e) => {
            drain(input);
            return refuse(None, e);
        }
    };
    let (bytes, over) = match read_limited(input, config.max_xml_bytes) {
        Ok(r) => r,
        Err(e) => return refuse(None, format!("cannot read the domain XML: {e}")),
    };
    if over {
        return refuse(
            None,
            format!(
                "domain XML is over the {}-byte limit (max_xml_bytes)",
                config.max_xml_bytes
            ),
        );
    }
    let doc = match document::parse_bytes(&bytes, config.max_xml_bytes) {
        Ok(d) => d,
        Err(e) => return refuse(None, e.to_string()),
    };
    let uuid = doc.uuid.as_deref();
    if let Err(reason) = super::commandline_cpu(&doc, &config, origin.as_str(), &call.domain) {
        return refuse(uuid, reason);
    }
    let (text, decision) = match rewrite_cpu(&doc) {
        Ok(r) => r,
        Err(e) => return refuse(uuid, e),
    };
    let now = incoming::now();
    let record = IncomingRecord {
        domain: call.domain.clone(),
        uuid: doc.uuid.clone(),
        origin,
        created: now,
        expires: now.saturating_add(config.incoming_ttl_secs),
    };
    match incoming::check_dir(&config.runtime_dir) {
        Ok(0) => {}
        Ok(discarded) => super::audit_narrowed_runtime_dir(
            origin.as_str(),
            &call.domain,
            &config.runtime_dir,
            discarded,
        ),
        Err(e) => return refuse(uuid, e.to_string()),
    }
    if let Err(e) = incoming::write(&config.runtime_dir, &record) {
        return refuse(uuid, e.to_string());
    }
    decision
        .audit(
            Record::new(decision.severity(), origin.as_str(), decision.action())
                .field("domain", &call.domain)
                .opt_field("uuid", uuid),
        )
        .emit();
    Outcome {
        status: super::EXIT_OK,
        stdout: text.into_bytes(),
        stderr: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(xml: &str) -> (String, CpuDecision) {
        let doc = DomainDocument::parse(xml).expect("parses");
        rewrite_cpu(&doc).expect("rewrites")
    }

    #[test]
    fn real_sample_is_pinned_and_nothing_else_changes() {
        let xml = include_str!("../../tests/fixtures/xml/libvirt9-migrate-begin.xml");
        let (out, decision) = rewrite(xml);
        // Already match='exact' and fallback='forbid': pinned as it is, byte for byte.
        assert!(matches!(
            &decision,
            CpuDecision::Pinned { model, changes } if model == "EPYC-Milan" && changes.is_empty()
        ));
        assert_eq!(out, xml);
        // A looser CPU is pinned; `check` is never touched.
        let loose = xml
            .replacen("match='exact'", "match='minimum'", 1)
            .replacen("fallback='forbid'", "fallback='allow'", 1);
        let (out, decision) = rewrite(&loose);
        assert_eq!(out, xml);
        assert!(matches!(&decision, CpuDecision::Pinned { changes, .. } if changes.len() == 2));
    }

    #[test]
    fn passthrough_maximum_and_absent_cpu_are_left_alone() {
        for xml in [
            "<domain><cpu mode='host-passthrough' check='none' migratable='on'/></domain>",
            "<domain><cpu mode='maximum'/></domain>",
            "<domain><name>x</name></domain>",
            "<domain><cpu><topology sockets='1' cores='1' threads='1'/></cpu></domain>",
            // Seed 003: aarch64 hosts run host-passthrough only; the fingerprint guards them.
            "<domain type='kvm'><os><type arch='aarch64' machine='virt-7.2'>hvm</type></os>\
             <cpu mode='host-passthrough' check='none'/></domain>",
        ] {
            let (out, decision) = rewrite(xml);
            assert_eq!(out, xml);
            assert!(matches!(decision, CpuDecision::Unchanged { .. }), "{xml}");
        }
    }

    #[test]
    fn host_model_without_stamp_is_a_warning() {
        let xml = "<domain><cpu mode='host-model' check='partial'/></domain>";
        let (out, decision) = rewrite(xml);
        assert_eq!(out, xml);
        assert_eq!(decision.severity(), Severity::Warning);
    }

    #[test]
    fn host_model_is_never_swapped() {
        let xml = format!(
            "<domain>\n  <cpu mode='host-model' check='partial'/>\n  <metadata>\n    <cg:stamp xmlns:cg=\"{}\" digest='sha256:ab'>\n      <cpu mode='custom' match='exact' check='full'>\n        <model fallback='forbid'>Nehalem</model>\n      </cpu>\n    </cg:stamp>\n  </metadata>\n</domain>",
            crate::domain::metadata::STAMP_NS
        );
        let (out, decision) = rewrite(&xml);
        assert_eq!(out, xml);
        assert_eq!(decision.severity(), Severity::Info);
    }

    /// Hostile input: thousands of byte-level mutations of the real sample (deletions,
    /// duplications, quotes, angle brackets, ampersands, multi-byte characters) never panic, and
    /// whatever the rewrite accepts comes back as a document that parses again.
    #[test]
    fn mutated_documents_never_panic() {
        let base = include_str!("../../tests/fixtures/xml/libvirt9-migrate-begin.xml");
        let inserts = [
            "'",
            "\"",
            "<",
            ">",
            "&",
            "&amp;",
            "/>",
            "</cpu>",
            "<cpu>",
            "é",
            "\u{1F600}",
            "=",
            " ",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0;
        for _ in 0..3000 {
            let mut doc = base.to_string();
            for _ in 0..(1 + next() % 4) {
                let mut at = (next() as usize) % doc.len();
                while !doc.is_char_boundary(at) {
                    at -= 1;
                }
                match next() % 3 {
                    0 => {
                        let mut end = (at + 1 + (next() as usize) % 8).min(doc.len());
                        while !doc.is_char_boundary(end) {
                            end += 1;
                        }
                        doc.replace_range(at..end, "");
                    }
                    1 => doc.insert_str(at, inserts[(next() as usize) % inserts.len()]),
                    _ => {
                        let mut end = (at + (next() as usize) % 64).min(doc.len());
                        while !doc.is_char_boundary(end) {
                            end += 1;
                        }
                        let copy = doc[at..end].to_string();
                        doc.insert_str(at, &copy);
                    }
                }
            }
            let Ok(parsed) = DomainDocument::parse(&doc) else {
                continue;
            };
            if let Ok((out, _)) = rewrite_cpu(&parsed) {
                accepted += 1;
                DomainDocument::parse(&out).expect("accepted output parses again");
            }
        }
        assert!(
            accepted > 100,
            "mutations too destructive to test the rewrite: {accepted}"
        );
    }
}
