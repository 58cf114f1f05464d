//! The source's stamp: this host's fingerprint for a running domain, written into the domain's
//! live `<metadata>` through the libvirt API, so that it travels with every migration.
//!
//! Only `cpuguard-libvirt` calls this: the hook never loads libvirt (deadlock risk while libvirt
//! waits for the hook, and ~15x the exec cost). After a start the hook detaches that process;
//! libvirt may still be finishing the start job when it connects, hence the bounded retries.

use std::thread::sleep;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::audit::{Record, Severity};
use crate::config::Config;
use crate::domain::document::DomainDocument;
use crate::domain::metadata::{stamp_element, STAMP_KEY, STAMP_NS};
use crate::measure;

#[derive(Debug, Error)]
pub enum StampError {
    #[error("cannot connect to {uri}: {reason}")]
    Connect { uri: String, reason: String },
    #[error("domain {name}: {reason}")]
    Libvirt { name: String, reason: String },
    #[error("domain {name} is not running")]
    NotRunning { name: String },
    #[error("domain {name}: live XML: {reason}")]
    Xml { name: String, reason: String },
    #[error("domain {name}: cannot measure the guest CPU: {reason}")]
    Measure { name: String, reason: String },
}

/// What was stamped.
#[derive(Debug, Clone)]
pub struct Stamped {
    pub name: String,
    pub digest: String,
    pub cached: bool,
}

pub fn connect(uri: &str) -> Result<Connect, StampError> {
    Connect::open(Some(uri)).map_err(|e| StampError::Connect {
        uri: uri.to_string(),
        reason: one_line(&e.to_string()),
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn libvirt_err(name: &str, e: virt::error::Error) -> StampError {
    StampError::Libvirt {
        name: name.to_string(),
        reason: one_line(&e.to_string()),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for the stamp's `time` attribute.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Measures and stamps one running domain.
pub fn stamp_domain(conn: &Connect, name: &str, config: &Config) -> Result<Stamped, StampError> {
    let dom = conn
        .lookup_domain_by_name(name)
        .map_err(|e| libvirt_err(name, e))?;
    stamp(&dom, name, config)
}

fn stamp(dom: &Domain, name: &str, config: &Config) -> Result<Stamped, StampError> {
    if !dom.is_active().map_err(|e| libvirt_err(name, e))? {
        return Err(StampError::NotRunning {
            name: name.to_string(),
        });
    }
    // The live XML: its <cpu> is what QEMU really runs (host-model already expanded).
    let xml = dom.xml_desc(0).map_err(|e| libvirt_err(name, e))?;
    let doc = DomainDocument::parse(&xml).map_err(|e| StampError::Xml {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    let cpu = doc.cpu.map(|s| doc.slice(s)).unwrap_or("");
    let m = measure::for_domain_xml(&xml, config).map_err(|e| StampError::Measure {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let element = stamp_element(
        &host,
        &rfc3339_now(),
        &m.fingerprint.digest,
        cpu,
        &m.fingerprint.raw().to_text(),
    );
    dom.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(&element),
        Some(STAMP_KEY),
        Some(STAMP_NS),
        sys::VIR_DOMAIN_AFFECT_LIVE,
    )
    .map_err(|e| libvirt_err(name, e))?;
    Ok(Stamped {
        name: name.to_string(),
        digest: m.fingerprint.digest,
        cached: matches!(m.source, crate::cache::Source::Hit),
    })
}

/// Stamps every running domain; one (name, result) per domain.
pub type StampResults = Vec<(String, Result<Stamped, StampError>)>;

pub fn stamp_all(conn: &Connect, config: &Config) -> Result<StampResults, StampError> {
    let domains = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(|e| StampError::Connect {
            uri: config.stamp.uri.clone(),
            reason: one_line(&e.to_string()),
        })?;
    Ok(domains
        .iter()
        .map(|dom| {
            let name = dom.name().unwrap_or_default();
            let result = stamp(dom, &name, config);
            (name, result)
        })
        .collect())
}

/// The detached process after a start: retries while libvirt finishes the start job (the domain
/// may not be visible or its job may still hold it), then stamps once. Audited either way.
pub fn stamp_after_start(name: &str, config: &Config) -> Result<Stamped, StampError> {
    let interval = Duration::from_millis(config.stamp.retry_interval_ms);
    let mut last = None;
    for attempt in 0..=config.stamp.retries {
        if attempt > 0 {
            sleep(interval);
        }
        let result = connect(&config.stamp.uri).and_then(|conn| stamp_domain(&conn, name, config));
        match result {
            Ok(s) => return Ok(s),
            // A measurement failure will not heal by waiting.
            Err(e @ StampError::Measure { .. }) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(StampError::NotRunning {
        name: name.to_string(),
    }))
}

/// One audit line for a stamp attempt.
pub fn audit(name: &str, result: &Result<Stamped, StampError>, trigger: &str) {
    match result {
        Ok(s) => Record::new(Severity::Info, "stamp", "stamped")
            .field("domain", name)
            .field("digest", &s.digest)
            .field("fingerprint", if s.cached { "cached" } else { "measured" })
            .field("trigger", trigger)
            .emit(),
        Err(e) => Record::new(Severity::Error, "stamp", "failed")
            .field("domain", name)
            .field("trigger", trigger)
            .field("reason", &e.to_string())
            .emit(),
    }
}
