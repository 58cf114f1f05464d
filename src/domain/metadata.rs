//! cpuguard's elements inside a domain's `<metadata>`.
//!
//! libvirt keeps one element per namespace URI in `<metadata>` (`virDomainSetMetadata` replaces it
//! whole), so the source's stamp and the operator's per-domain policy live under two URIs: writing a
//! new stamp must never erase an opt-out. Elements are recognised by URI, never by prefix.
//!
//! ```xml
//! <metadata>
//!   <cpuguard:stamp xmlns:cpuguard="http://cpuguard.dev/xmlns/stamp/1"
//!                   version="1" host="hv-old-01" time="2026-11-22T05:00:00Z" digest="sha256:…"
//!                   uuid="…" config="sha256:…" pid="4242" pid-start="987654" boot-id="…"
//!                   emulator="DEV:INODE:SIZE:MTIME" signature="hmac-sha256:…">
//!     <cpu mode='custom' match='exact' check='full'>…the source's live, expanded CPU…</cpu>
//!     <table>…the source guest's raw CPUID table, kvm-unit-tests dump lines…</table>
//!   </cpuguard:stamp>
//!   <cpuguard-policy:policy xmlns:cpuguard-policy="http://cpuguard.dev/xmlns/policy/1"
//!                           guard="off" reason="ticket 4711"/>
//! </metadata>
//! ```

use quick_xml::events::Event;
use quick_xml::reader::Reader;

use crate::domain::document::{attribute, Span};

/// Namespace of the source's stamp (fingerprint digest, expanded CPU, host, time).
pub const STAMP_NS: &str = "http://cpuguard.dev/xmlns/stamp/1";
/// Namespace of the operator's per-domain policy (opt-out).
pub const POLICY_NS: &str = "http://cpuguard.dev/xmlns/policy/1";

/// Which of cpuguard's two metadata elements an element is, by its namespace URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// The source's stamp, [`STAMP_NS`].
    Stamp,
    /// The operator's per-domain policy, [`POLICY_NS`].
    Policy,
}

/// The cpuguard namespace `uri` names, compared byte for byte; None for any other URI.
pub fn classify_namespace(uri: &[u8]) -> Option<Namespace> {
    if uri == STAMP_NS.as_bytes() {
        Some(Namespace::Stamp)
    } else if uri == POLICY_NS.as_bytes() {
        Some(Namespace::Policy)
    } else {
        None
    }
}

/// Version of the stamp element's content.
pub const STAMP_VERSION: &str = "1";
/// The prefix libvirt gives the stamp element (`virsh metadata --key`).
pub const STAMP_KEY: &str = "cpuguard";
/// The prefix for the policy element.
pub const POLICY_KEY: &str = "cpuguard-policy";

/// What the hook reads back from a stamp element (the document was already checked whole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    /// `version`: the stamp format ([`STAMP_VERSION`] for every stamp written so far).
    pub version: Option<String>,
    /// `host`: the source host's name when it stamped.
    pub host: Option<String>,
    /// `time`: when the source stamped, RFC 3339 UTC (e.g. `2026-11-22T05:00:00Z`).
    pub time: Option<String>,
    /// Digest of the source's normalized table (`sha256:…`), as the source computed it.
    pub digest: Option<String>,
    /// Span of the stamped `<cpu>` child, relative to the stamp element's text.
    pub cpu: Option<Span>,
    /// The `<table>` child's text: the source guest's raw CPUID table as dump lines.
    pub table: Option<String>,
    /// The domain UUID the stamp was measured for (absent in stamps before issue 11).
    pub uuid: Option<String>,
    /// Digest of the canonical CPU configuration measured (absent before issue 11).
    pub config: Option<String>,
    /// The QEMU process measured: pid, its start time, the boot id, its binary's identity.
    pub pid: Option<String>,
    /// `pid-start`: the process's start time, clock ticks after boot (`/proc/PID/stat` field 22).
    pub pid_start: Option<String>,
    /// `boot-id`: the source host's boot id (`/proc/sys/kernel/random/boot_id`) when it stamped.
    pub boot_id: Option<String>,
    /// `emulator`: `DEV:INODE:SIZE:MTIME` of the QEMU binary the process runs.
    pub emulator: Option<String>,
    /// `hmac-sha256:…` over [`crate::signature::canonical_content`] with the fleet key.
    pub signature: Option<String>,
}

/// What a new stamp element says beyond the fingerprint (all optional: a stamp without them is
/// what cpuguard before issue 11 wrote).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StampBinding {
    /// The domain's UUID (lower-case, hyphenated, as libvirt prints it).
    pub uuid: Option<String>,
    /// [`crate::domain::guest::GuestCpuConfig::binding_digest`] of the configuration measured
    /// (`sha256:…`).
    pub config: Option<String>,
    /// The QEMU process whose guest was measured; its pid, start time, boot id and binary go into
    /// the stamp.
    pub process: Option<crate::process::QemuProcess>,
    /// `hmac-sha256:…` (see `src/signature.rs`), when the host has a fleet key.
    pub signature: Option<String>,
}

/// Builds the stamp element handed to `virDomainSetMetadata` (libvirt adds the namespace).
pub fn stamp_element(
    host: &str,
    time: &str,
    digest: &str,
    cpu_xml: &str,
    table_dump: &str,
) -> String {
    stamp_element_bound(
        host,
        time,
        digest,
        cpu_xml,
        table_dump,
        &StampBinding::default(),
    )
}

/// [`stamp_element`] with the domain and process it was measured for. The version stays 1: the
/// new attributes are optional, so a destination running an older cpuguard still reads it.
pub fn stamp_element_bound(
    host: &str,
    time: &str,
    digest: &str,
    cpu_xml: &str,
    table_dump: &str,
    binding: &StampBinding,
) -> String {
    let mut extra = String::new();
    let mut add = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            extra.push_str(&format!(" {name}='{}'", escape_attr(&v)));
        }
    };
    add("uuid", binding.uuid.clone());
    add("config", binding.config.clone());
    if let Some(p) = &binding.process {
        add("pid", Some(p.pid.to_string()));
        add("pid-start", Some(p.start_time.to_string()));
        add("boot-id", Some(p.boot_id.clone()));
        add("emulator", Some(p.exe.clone()));
    }
    add("signature", binding.signature.clone());
    format!(
        "<stamp version='{STAMP_VERSION}' host='{}' time='{}' digest='{}'{extra}>\n{}\n<table>\n{}</table>\n</stamp>",
        escape_attr(host),
        escape_attr(time),
        escape_attr(digest),
        cpu_xml.trim(),
        quick_xml::escape::escape(table_dump)
    )
}

fn escape_attr(s: &str) -> String {
    quick_xml::escape::escape(s).replace('\'', "&apos;")
}

impl Stamp {
    /// True when this stamp was measured for exactly `process` (same pid, start time, boot and
    /// binary): that process's guest CPU has not changed since, so the stamp stays valid.
    pub fn describes(&self, process: &crate::process::QemuProcess) -> bool {
        self.pid.as_deref() == Some(process.pid.to_string().as_str())
            && self.pid_start.as_deref() == Some(process.start_time.to_string().as_str())
            && self.boot_id.as_deref() == Some(process.boot_id.as_str())
            && self.emulator.as_deref() == Some(process.exe.as_str())
    }

    /// Reads the stamp element's attributes and locates its `<cpu>` child. `text` is exactly the
    /// stamp element as located by [`crate::domain::document::DomainDocument`].
    pub fn read(text: &str) -> Stamp {
        let mut stamp = Stamp::default();
        let mut reader = Reader::from_str(text);
        reader.config_mut().trim_text(false);
        let mut depth = 0usize;
        let mut cpu_start: Option<(usize, usize)> = None;
        let mut in_table = false;
        let mut table = String::new();
        loop {
            let start = reader.buffer_position() as usize;
            let Ok(event) = reader.read_event() else {
                // Cannot happen for a span of a checked document; a partial stamp is just absent.
                return stamp;
            };
            let end = reader.buffer_position() as usize;
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let empty = matches!(event, Event::Empty(_));
                    if depth == 0 {
                        stamp.version = attribute(e, "version");
                        stamp.host = attribute(e, "host");
                        stamp.time = attribute(e, "time");
                        stamp.digest = attribute(e, "digest");
                        stamp.uuid = attribute(e, "uuid");
                        stamp.config = attribute(e, "config");
                        stamp.pid = attribute(e, "pid");
                        stamp.pid_start = attribute(e, "pid-start");
                        stamp.boot_id = attribute(e, "boot-id");
                        stamp.emulator = attribute(e, "emulator");
                        stamp.signature = attribute(e, "signature");
                    } else if depth == 1 && e.local_name().as_ref() == b"table" {
                        in_table = !empty;
                        if empty {
                            stamp.table.get_or_insert_with(String::new);
                        }
                    } else if depth == 1 && e.local_name().as_ref() == b"cpu" {
                        if empty {
                            stamp.cpu.get_or_insert(Span {
                                start,
                                tag_end: end,
                                end,
                            });
                        } else {
                            cpu_start = Some((start, end));
                        }
                    }
                    if !empty {
                        depth += 1;
                    }
                }
                Event::Text(t) if in_table && depth == 2 => {
                    if let Ok(text) = t.unescape() {
                        table.push_str(&text);
                    }
                }
                Event::CData(t) if in_table && depth == 2 => {
                    table.push_str(&String::from_utf8_lossy(&t));
                }
                Event::End(_) => {
                    depth = depth.saturating_sub(1);
                    if depth == 1 && in_table {
                        in_table = false;
                        stamp.table.get_or_insert(std::mem::take(&mut table));
                    }
                    if depth == 1 {
                        if let Some((start, tag_end)) = cpu_start.take() {
                            stamp.cpu.get_or_insert(Span {
                                start,
                                tag_end,
                                end,
                            });
                        }
                    }
                }
                Event::Eof => return stamp,
                _ => {}
            }
        }
    }
}

/// The operator's per-domain policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainPolicy {
    /// `guard="off"`: cpuguard lets this domain migrate anywhere (audited every time).
    pub guard_off: bool,
    /// `reason`: the operator's note on why, quoted in the audit line of each opted-out migration.
    pub reason: Option<String>,
}

impl DomainPolicy {
    /// Reads the policy element's `guard` and `reason` attributes; `text` is exactly the policy
    /// element. Anything unreadable is the default policy (guard on).
    pub fn read(text: &str) -> DomainPolicy {
        let mut reader = Reader::from_str(text);
        while let Ok(event) = reader.read_event() {
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    return DomainPolicy {
                        guard_off: attribute(e, "guard").as_deref() == Some("off"),
                        reason: attribute(e, "reason"),
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        DomainPolicy::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stamp_attributes_and_cpu() {
        let text = format!(
            "<g:stamp xmlns:g='{STAMP_NS}' version='1' host='a' digest='sha256:00'>\n  <cpu mode='custom'><model>qemu64</model></cpu><other><cpu/></other></g:stamp>"
        );
        let stamp = Stamp::read(&text);
        assert_eq!(stamp.host.as_deref(), Some("a"));
        assert_eq!(stamp.digest.as_deref(), Some("sha256:00"));
        let cpu = stamp.cpu.expect("cpu child");
        assert_eq!(
            &text[cpu.start..cpu.end],
            "<cpu mode='custom'><model>qemu64</model></cpu>"
        );
    }

    #[test]
    fn stamp_element_round_trips() {
        let cpu = "<cpu mode='custom' match='exact' check='full'><model fallback='forbid'>Nehalem</model></cpu>";
        let el = stamp_element(
            "hv'a<",
            "2026-11-22T05:00:00Z",
            "sha256:ab",
            cpu,
            "00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n",
        );
        let stamp = Stamp::read(&el);
        assert_eq!(stamp.host.as_deref(), Some("hv'a<"));
        assert_eq!(stamp.digest.as_deref(), Some("sha256:ab"));
        assert_eq!(stamp.version.as_deref(), Some(STAMP_VERSION));
        let span = stamp.cpu.expect("cpu");
        assert_eq!(&el[span.start..span.end], cpu);
        assert_eq!(
            stamp.table.as_deref().map(str::trim),
            Some("00000000 00000000: 0000000d 756e6547 6c65746e 49656e69")
        );
    }

    #[test]
    fn bound_stamp_round_trips_and_describes_its_process() {
        let process = crate::process::QemuProcess {
            pid: 4242,
            start_time: 987654,
            boot_id: "b0b0".into(),
            exe: "2049:17:100:5".into(),
        };
        let binding = StampBinding {
            uuid: Some("6a1f3c2e-0b7d-4e58-9c11-a0a0a0a0a00a".into()),
            config: Some("sha256:cc".into()),
            process: Some(process.clone()),
            signature: None,
        };
        let el = stamp_element_bound("a", "t", "sha256:ab", "<cpu/>", "", &binding);
        let stamp = Stamp::read(&el);
        assert_eq!(stamp.uuid, binding.uuid);
        assert_eq!(stamp.config.as_deref(), Some("sha256:cc"));
        assert!(stamp.describes(&process));
        for other in [
            crate::process::QemuProcess {
                pid: 4243,
                ..process.clone()
            },
            crate::process::QemuProcess {
                start_time: 1,
                ..process.clone()
            },
            crate::process::QemuProcess {
                boot_id: "other".into(),
                ..process.clone()
            },
            crate::process::QemuProcess {
                exe: "2049:18:100:5".into(),
                ..process.clone()
            },
        ] {
            assert!(!stamp.describes(&other), "{other:?}");
        }
        // A stamp from before issue 11 describes no process.
        let old = Stamp::read(&stamp_element("a", "t", "sha256:ab", "<cpu/>", ""));
        assert!(!old.describes(&process));
        assert_eq!(old.uuid, None);
    }

    #[test]
    fn policy_defaults_to_guarded() {
        assert!(!DomainPolicy::read("<p:policy xmlns:p='x'/>").guard_off);
        let p = DomainPolicy::read("<p:policy guard='off' reason='ticket 1'/>");
        assert!(p.guard_off);
        assert_eq!(p.reason.as_deref(), Some("ticket 1"));
    }
}
