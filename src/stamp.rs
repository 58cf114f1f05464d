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
use crate::domain::metadata::{stamp_element_bound, Stamp, StampBinding, STAMP_KEY, STAMP_NS};
use crate::measure;

/// Why a domain was not stamped; each names the domain (or the URI) and the reason, on one line.
#[derive(Debug, Error)]
pub enum StampError {
    /// The libvirt connection could not be opened, or its domains not listed.
    #[error("cannot connect to {uri}: {reason}")]
    Connect {
        /// The connection URI (`stamp.uri`).
        uri: String,
        /// libvirt's message, on one line.
        reason: String,
    },
    /// A libvirt call on the domain failed (lookup, live XML, metadata).
    #[error("domain {name}: {reason}")]
    Libvirt {
        /// The domain's name.
        name: String,
        /// libvirt's message, on one line.
        reason: String,
    },
    /// The domain is not running, so there is no guest CPU to stamp.
    #[error("domain {name} is not running")]
    NotRunning {
        /// The domain's name.
        name: String,
    },
    /// The domain's live XML could not be read as a domain.
    #[error("domain {name}: live XML: {reason}")]
    Xml {
        /// The domain's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The probe could not measure the guest CPU on this host.
    #[error("domain {name}: cannot measure the guest CPU: {reason}")]
    Measure {
        /// The domain's name.
        name: String,
        /// The probe's or the cache's error.
        reason: String,
    },
    /// The domain's QEMU process could not be identified, or was replaced while it was measured.
    #[error("domain {name}: cannot identify its QEMU process: {reason}")]
    Process {
        /// The domain's name.
        name: String,
        /// Why, on one line.
        reason: String,
    },
    /// `stamp.key_file` exists but cannot be used; refused rather than writing an unsigned stamp.
    #[error("domain {name}: not stamped: the fleet key cannot be used: {reason}")]
    Key {
        /// The domain's name.
        name: String,
        /// Why the key cannot be used.
        reason: String,
    },
    /// The running vCPU does not show what the probe measured (e.g. a wrapper added `-cpu`
    /// options), so a stamp would lie.
    #[error("domain {name}: not stamped: the running vCPU differs from the probe: {}", differences.join("; "))]
    LiveVcpu {
        /// The domain's name.
        name: String,
        /// One line per difference between the running vCPU and the probe.
        differences: Vec<String>,
    },
    /// The running vCPU could not be read through QEMU's monitor.
    #[error("domain {name}: not stamped: cannot read the running vCPU: {reason}")]
    LiveVcpuUnreadable {
        /// The domain's name.
        name: String,
        /// Why, on one line.
        reason: String,
    },
}

/// Checks the running guest against the probe's fingerprint before its stamp is written:
/// `cpuguard-libvirt` reads the live vCPU through QEMU's monitor (see [`crate::live_vcpu`]).
/// A stamp is written only when it returns `Ok`.
pub type LiveCheck<'a> =
    &'a dyn Fn(&Domain, &str, &crate::fingerprint::Fingerprint) -> Result<(), StampError>;

/// What was stamped, or kept.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// The domain's name.
    pub name: String,
    /// The stamp's fingerprint digest (`sha256:…`).
    pub digest: String,
    /// True when the fingerprint came from the cache (or a kept stamp), false when it was measured
    /// by this call.
    pub cached: bool,
    /// True when the stamp already described the running QEMU process and was left alone.
    pub kept: bool,
    /// The QEMU process the stamp describes.
    pub process: crate::process::QemuProcess,
    /// The stamp found before a re-stamp: its digest and whether it described this process.
    pub previous: Option<Previous>,
}

/// The stamp a re-stamp replaced.
#[derive(Debug, Clone)]
pub struct Previous {
    /// Its fingerprint digest (`sha256:…`); None when it had none.
    pub digest: Option<String>,
    /// True when it described the same QEMU process (so a different digest means the guest's CPU is
    /// not what was stamped).
    pub same_process: bool,
}

impl Stamped {
    /// One line for the operator: what was done and why.
    pub fn describe(&self) -> String {
        let p = &self.process;
        if self.kept {
            return format!(
                "kept {} {}: the stamp describes the running QEMU process (pid {}, started at tick \
                 {} of this boot); `--force` re-measures",
                self.name, self.digest, p.pid, p.start_time
            );
        }
        let how = if self.cached { "cached" } else { "measured" };
        let mut line = format!("stamped {} {} ({how})", self.name, self.digest);
        match &self.previous {
            Some(prev) if prev.same_process => {
                if prev.digest.as_deref() != Some(self.digest.as_str()) {
                    line.push_str(&format!(
                        "; the running guest differs from the stamp: it said {}",
                        prev.digest.as_deref().unwrap_or("no digest")
                    ));
                } else {
                    line.push_str("; the running guest matches the stamp it replaced");
                }
            }
            Some(prev) => line.push_str(&format!(
                "; replaced a stamp of another QEMU process ({})",
                prev.digest.as_deref().unwrap_or("no digest")
            )),
            None => {}
        }
        line
    }
}

/// Opens the libvirt connection `uri` (e.g. `qemu:///system`).
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

/// Measures and stamps one running domain. Without `force`, a stamp that already describes the
/// domain's running QEMU process is kept: that process's guest CPU cannot have changed, while a
/// new measurement would describe whatever the host's emulator, microcode and kernel give a
/// *new* process now (a package upgrade under running guests).
pub fn stamp_domain(
    conn: &Connect,
    name: &str,
    config: &Config,
    force: bool,
    live_check: LiveCheck,
) -> Result<Stamped, StampError> {
    let dom = conn
        .lookup_domain_by_name(name)
        .map_err(|e| libvirt_err(name, e))?;
    stamp(&dom, name, config, force, live_check)
}

/// The QEMU process running `dom`: QEMU's own monitor names its vCPU threads
/// (`query-cpus-fast`), and a thread's `Tgid` is its process. This asks libvirt rather than
/// reading libvirt's private pid files; libvirt marks the domain "tainted: custom-monitor" in
/// its log the first time (a note, nothing changes for the guest).
pub fn qemu_process(dom: &Domain, name: &str) -> Result<crate::process::QemuProcess, StampError> {
    let err = |reason: String| StampError::Process {
        name: name.to_string(),
        reason,
    };
    let reply = dom
        .qemu_monitor_command(r#"{"execute":"query-cpus-fast"}"#, 0)
        .map_err(|e| err(format!("query-cpus-fast: {}", one_line(&e.to_string()))))?;
    let value: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| err(format!("query-cpus-fast: unreadable reply: {e}")))?;
    let tid = value
        .get("return")
        .and_then(|r| r.as_array())
        .and_then(|cpus| cpus.first())
        .and_then(|cpu| cpu.get("thread-id"))
        .and_then(|t| t.as_u64())
        .and_then(|t| u32::try_from(t).ok())
        .ok_or_else(|| err("query-cpus-fast: no vCPU thread-id in the reply".to_string()))?;
    let pid = crate::process::thread_group_of(tid).map_err(err)?;
    crate::process::QemuProcess::of(pid).map_err(err)
}

fn stamp(
    dom: &Domain,
    name: &str,
    config: &Config,
    force: bool,
    live_check: LiveCheck,
) -> Result<Stamped, StampError> {
    if !dom.is_active().map_err(|e| libvirt_err(name, e))? {
        return Err(StampError::NotRunning {
            name: name.to_string(),
        });
    }
    let process = qemu_process(dom, name)?;
    // The live XML: its <cpu> is what QEMU really runs (host-model already expanded).
    let xml = dom.xml_desc(0).map_err(|e| libvirt_err(name, e))?;
    let doc = DomainDocument::parse(&xml).map_err(|e| StampError::Xml {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    let previous = doc.stamp.map(|s| Stamp::read(doc.slice(s)));
    // A key that is there but unusable is an error rather than a silently unsigned stamp.
    let key =
        crate::signature::load_key(&config.stamp.key_file).map_err(|reason| StampError::Key {
            name: name.to_string(),
            reason,
        })?;
    // With a key, only a stamp signed with it is kept (an edited one names the right process
    // but not what was measured).
    let trusted = |p: &Stamp| {
        key.as_ref()
            .is_none_or(|k| crate::signature::verify(k, p) == crate::signature::Verification::Valid)
    };
    if let Some(prev) = previous
        .as_ref()
        .filter(|p| p.describes(&process) && trusted(p))
    {
        if !force {
            if let Some(digest) = &prev.digest {
                return Ok(Stamped {
                    name: name.to_string(),
                    digest: digest.clone(),
                    cached: true,
                    kept: true,
                    process,
                    previous: None,
                });
            }
        }
    }
    let cpu = doc.cpu.map(|s| doc.slice(s)).unwrap_or("");
    // The running process's own binary: after a package upgrade the file at <emulator> is
    // another QEMU, which would measure another CPU than this guest has.
    let m = measure::for_running_domain(&xml, config, &process.exe_path()).map_err(|e| {
        StampError::Measure {
            name: name.to_string(),
            reason: e.to_string(),
        }
    })?;
    // The probe rebuilt the guest's CPU from the XML and the binary; what the running QEMU was
    // really given (a wrapper's extra options) only the running vCPU tells.
    live_check(dom, name, &m.fingerprint)?;
    // A guest restarted while it was measured is another process: its stamp would lie.
    let after = qemu_process(dom, name)?;
    if after != process {
        return Err(StampError::Process {
            name: name.to_string(),
            reason: format!(
                "the QEMU process changed while it was measured (pid {} -> {})",
                process.pid, after.pid
            ),
        });
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let guest = crate::domain::guest::GuestCpuConfig::from_domain_xml(&xml).map_err(|e| {
        StampError::Xml {
            name: name.to_string(),
            reason: e.to_string(),
        }
    })?;
    let mut binding = StampBinding {
        uuid: doc.uuid.clone(),
        config: Some(guest.binding_digest()),
        process: Some(process.clone()),
        signature: None,
    };
    let (time, table) = (rfc3339_now(), m.fingerprint.raw().to_text());
    let render = |binding: &StampBinding| {
        stamp_element_bound(&host, &time, &m.fingerprint.digest, cpu, &table, binding)
    };
    let mut element = render(&binding);
    // With a fleet key, sign what the destination will read back.
    if let Some(key) = &key {
        binding.signature = Some(crate::signature::sign(key, &Stamp::read(&element)));
        element = render(&binding);
    }
    dom.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(&element),
        Some(STAMP_KEY),
        Some(STAMP_NS),
        sys::VIR_DOMAIN_AFFECT_LIVE,
    )
    .map_err(|e| libvirt_err(name, e))?;
    let previous = previous.map(|p| Previous {
        same_process: p.describes(&process),
        digest: p.digest,
    });
    Ok(Stamped {
        name: name.to_string(),
        digest: m.fingerprint.digest,
        cached: matches!(m.source, crate::cache::Source::Hit),
        kept: false,
        process,
        previous,
    })
}

/// Removes the stamp from a domain's live metadata (a `started` phase that could not stamp:
/// an earlier stamp, e.g. one copied into the persistent definition, must not travel).
pub fn remove_stamp(name: &str, config: &Config) -> Result<(), StampError> {
    let conn = connect(&config.stamp.uri)?;
    let dom = conn
        .lookup_domain_by_name(name)
        .map_err(|e| libvirt_err(name, e))?;
    dom.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        None,
        None,
        Some(STAMP_NS),
        sys::VIR_DOMAIN_AFFECT_LIVE,
    )
    .map_err(|e| libvirt_err(name, e))
}

/// One (domain name, outcome) per running domain, as [`stamp_all`] returns them.
pub type StampResults = Vec<(String, Result<Stamped, StampError>)>;

/// Stamps every running domain on `conn`, each as [`stamp_domain`] would. Only listing the domains
/// fails the whole call; each domain's own outcome is in the results.
pub fn stamp_all(
    conn: &Connect,
    config: &Config,
    force: bool,
    live_check: LiveCheck,
) -> Result<StampResults, StampError> {
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
            let result = stamp(dom, &name, config, force, live_check);
            (name, result)
        })
        .collect())
}

/// The detached process after a start: retries while libvirt finishes the start job (the domain
/// may not be visible or its job may still hold it), then stamps once. Audited either way.
pub fn stamp_after_start(
    name: &str,
    config: &Config,
    live_check: LiveCheck,
) -> Result<Stamped, StampError> {
    let interval = Duration::from_millis(config.stamp.retry_interval_ms);
    let mut last = None;
    for attempt in 0..=config.stamp.retries {
        if attempt > 0 {
            sleep(interval);
        }
        // After a start there is a new process: always measure it.
        let result = connect(&config.stamp.uri)
            .and_then(|conn| stamp_domain(&conn, name, config, true, live_check));
        match result {
            Ok(s) => return Ok(s),
            // A measurement failure, an unusable key or a running vCPU that differs from the
            // probe will not heal by waiting.
            Err(
                e @ (StampError::Measure { .. }
                | StampError::Key { .. }
                | StampError::LiveVcpu { .. }),
            ) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(StampError::NotRunning {
        name: name.to_string(),
    }))
}

/// One audit line for a stamp attempt after a start, which on failure removed (or tried to
/// remove) any earlier stamp.
pub fn audit_after_start(
    name: &str,
    result: &Result<Stamped, StampError>,
    removal: Option<&Result<(), StampError>>,
) {
    audit_with_removal(name, result, removal, "started")
}

/// One audit line for a stamp attempt that, on failure, removed (or tried to remove) any
/// earlier stamp.
pub fn audit_with_removal(
    name: &str,
    result: &Result<Stamped, StampError>,
    removal: Option<&Result<(), StampError>>,
    trigger: &str,
) {
    match (result, removal) {
        (Err(e), Some(removal)) => Record::new(Severity::Error, "stamp", "failed")
            .field("domain", name)
            .field("trigger", trigger)
            .field("reason", &e.to_string())
            .field(
                "earlier_stamp",
                &match removal {
                    Ok(()) => "removed".to_string(),
                    Err(r) => format!("not removed: {r}"),
                },
            )
            .emit(),
        _ => audit(name, result, trigger),
    }
}

/// One audit line for a stamp attempt.
pub fn audit(name: &str, result: &Result<Stamped, StampError>, trigger: &str) {
    match result {
        Ok(s) if s.kept => Record::new(Severity::Info, "stamp", "kept")
            .field("domain", name)
            .field("digest", &s.digest)
            .field("pid", &s.process.pid.to_string())
            .field("trigger", trigger)
            .emit(),
        Ok(s) => {
            let mut rec = Record::new(Severity::Info, "stamp", "stamped")
                .field("domain", name)
                .field("digest", &s.digest)
                .field("fingerprint", if s.cached { "cached" } else { "measured" })
                .field("pid", &s.process.pid.to_string())
                .field("trigger", trigger);
            if let Some(prev) = &s.previous {
                if prev.same_process && prev.digest.as_deref() != Some(s.digest.as_str()) {
                    rec = rec.field("previous_digest", prev.digest.as_deref().unwrap_or("none"));
                }
            }
            rec.emit()
        }
        Err(e) => Record::new(Severity::Error, "stamp", "failed")
            .field("domain", name)
            .field("trigger", trigger)
            .field("reason", &e.to_string())
            .emit(),
    }
}
