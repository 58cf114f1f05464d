//! This host's fingerprint for a domain: the guest CPU configuration from the XML, the emulator
//! checks, the cache, and the probe when the cache has nothing.
//!
//! Runs inside the prepare hook, so nothing here talks to libvirt: the emulators libvirt knows
//! come from libvirt's own QEMU capabilities cache files, which list each probed `<emulator>`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quick_xml::events::Event;
use quick_xml::reader::Reader;
use thiserror::Error;

use crate::cache::{Cache, CacheError, CacheKey, CacheWarning, Source};
use crate::config::Config;
use crate::domain::guest::{Accel, GuestCpuConfig, GuestError};
use crate::fingerprint::{Fingerprint, HostFacts};
use crate::probe::{probe_view_running, resolve_emulator, ProbeError, ProbeOptions};
use crate::qemu::emulator::EmulatorError;
use crate::qemu::{emulator_version, executable_version, RunError};
use crate::x86_64::probe::args::accel_name;

/// Where libvirt keeps what it learnt probing each emulator (one XML file per binary).
pub const LIBVIRT_QEMU_CAPS_DIR: &str = "/var/cache/libvirt/qemu/capabilities";

/// Why this host's fingerprint for a domain could not be had.
#[derive(Debug, Error)]
pub enum MeasureError {
    /// The domain XML is malformed, or gives no guest CPU configuration cpuguard can probe.
    #[error("domain XML: {0}")]
    Guest(#[from] GuestError),
    /// The emulator was refused or its version could not be read, or a probe run without the
    /// cache failed.
    #[error("{0}")]
    Probe(#[from] ProbeError),
    /// The cache failed in a way it does not bypass (the emulator cannot be stat'ed, the key
    /// cannot be serialized), or a probe run through it failed ([`CacheError::Measure`] carries
    /// the probe's error).
    #[error("{0}")]
    Cache(#[from] CacheError),
}

impl From<RunError> for MeasureError {
    /// Running `--version` is part of the probe, for the operator as for the audit trail.
    fn from(e: RunError) -> Self {
        MeasureError::Probe(e.into())
    }
}

/// A fingerprint and how it was obtained.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// This host's fingerprint for the guest's CPU configuration.
    pub fingerprint: Fingerprint,
    /// A cache hit, or measured by this call.
    pub source: Source,
    /// What the cache found wrong or could not do on the way (audited; never a verdict).
    pub warnings: Vec<CacheWarning>,
    /// The emulator the fingerprint is for: the domain's `<emulator>`, resolved and allowed.
    pub emulator: PathBuf,
}

/// The emulators a probe may run: those libvirt has probed (its capabilities cache) plus the
/// configuration's allow-list.
pub fn allowed_emulators(config: &Config) -> Vec<PathBuf> {
    let mut list = libvirt_capability_emulators(Path::new(LIBVIRT_QEMU_CAPS_DIR));
    list.extend(config.probe.emulators.iter().cloned());
    list.sort();
    list.dedup();
    list
}

/// Reads the `<emulator>` of every file in libvirt's QEMU capabilities cache. Unreadable or
/// unexpected files are skipped: they only shrink the allow-list.
pub fn libvirt_capability_emulators(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("xml") {
            continue;
        }
        if let Some(emulator) = first_emulator_element(&path) {
            out.push(emulator);
        }
    }
    out
}

fn first_emulator_element(path: &Path) -> Option<PathBuf> {
    // The element is on the second line; read only the head of files that run to 200 KB or more.
    let mut head = Vec::with_capacity(16 * 1024);
    fs::File::open(path)
        .ok()?
        .take(16 * 1024)
        .read_to_end(&mut head)
        .ok()?;
    let mut reader = Reader::from_reader(head.as_slice());
    let mut buf = Vec::new();
    let mut inside = false;
    loop {
        match reader.read_event_into(&mut buf).ok()? {
            Event::Start(e) if e.local_name().as_ref() == b"emulator" => inside = true,
            Event::Text(t) if inside => {
                let value = t.unescape().ok()?.trim().to_string();
                return Path::new(&value)
                    .is_absolute()
                    .then(|| PathBuf::from(value));
            }
            Event::End(_) if inside => return None,
            Event::Eof => return None,
            _ => {}
        }
        buf.clear();
    }
}

/// This host's fingerprint for the CPU a domain XML describes: from the cache, or measured by
/// the probe (once per configuration, whatever the concurrency) and stored.
pub fn for_domain_xml(xml: &str, config: &Config) -> Result<Measurement, MeasureError> {
    let guest = GuestCpuConfig::from_domain_xml(xml)?;
    for_guest(&guest, config, None)
}

/// This host's fingerprint for a *running* domain: probed with the binary its QEMU process runs
/// (`executable`, that process's `/proc/PID/exe`), which after a package upgrade is no longer
/// the file at the `<emulator>` path. The `<emulator>` is still resolved and checked against the
/// allow-list (the process was started by libvirt from it), and the running binary must be a
/// root-owned regular file nobody else can write, like any emulator the probe runs.
pub fn for_running_domain(
    xml: &str,
    config: &Config,
    executable: &Path,
) -> Result<Measurement, MeasureError> {
    let guest = GuestCpuConfig::from_domain_xml(xml)?;
    check_running_binary(executable)?;
    for_guest_with(&guest, config, None, Some(executable))
}

fn check_running_binary(path: &Path) -> Result<(), ProbeError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |reason: String| {
        ProbeError::Run(RunError::Emulator(EmulatorError::Inaccessible {
            path: path.display().to_string(),
            reason,
        }))
    };
    let meta = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != 0 {
        return Err(bad(format!("owned by uid {}, not root", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// This host's fingerprint for `guest`: from the cache, or probed and cached. An unusable cache
/// is bypassed (a warning says so) rather than failing the measurement. `accel_override`
/// measures under another accelerator than the domain's (`kvm`, `tcg`).
pub fn for_guest(
    guest: &GuestCpuConfig,
    config: &Config,
    accel_override: Option<Accel>,
) -> Result<Measurement, MeasureError> {
    for_guest_with(guest, config, accel_override, None)
}

fn for_guest_with(
    guest: &GuestCpuConfig,
    config: &Config,
    accel_override: Option<Accel>,
    executable: Option<&Path>,
) -> Result<Measurement, MeasureError> {
    let allowed = allowed_emulators(config);
    let emulator = resolve_emulator(guest, &allowed)?;
    let accel = accel_override.unwrap_or(guest.accel);
    let opts = ProbeOptions {
        timeout: Duration::from_secs(config.probe.timeout_secs),
        allowed_emulators: allowed.clone(),
        accel_override,
        ..ProbeOptions::default()
    };
    let version = || match executable {
        Some(exe) => executable_version(exe),
        None => emulator_version(&emulator.to_string_lossy(), &allowed),
    };
    let cache = match Cache::from_config(config) {
        Ok(c) => c,
        Err(e) => {
            // An unusable cache must not decide a migration: measure without it, and say so.
            let version = version()?;
            let fingerprint = measure_now(guest, &opts, &version, accel, executable)?;
            return Ok(Measurement {
                fingerprint,
                source: Source::Measured,
                warnings: vec![CacheWarning::Bypassed {
                    dir: config.cache_dir.clone(),
                    reason: e.to_string(),
                }],
                emulator,
            });
        }
    };
    // `--version` costs tens of milliseconds (QEMU loads its libraries), more than the warm-path
    // budget: the cache remembers it per binary, keyed by the file's identity.
    let identity =
        cache.running_emulator_identity(&emulator, executable.unwrap_or(&emulator), version)?;
    let version = identity.version.clone();
    let key = CacheKey::new(guest, accel, identity);
    let obtained = cache.get_or_measure_or_bypass(&key, || {
        measure_now(guest, &opts, &version, accel, executable)
    })?;
    // What opening the cache repaired (a directory others could write) is audited too.
    let mut warnings = cache.open_warnings().to_vec();
    warnings.extend(obtained.warnings);
    Ok(Measurement {
        fingerprint: obtained.fingerprint,
        source: obtained.source,
        warnings,
        emulator,
    })
}

/// Probes now, bypassing the cache (`cpuguard probe`).
pub fn probe_now(
    guest: &GuestCpuConfig,
    config: &Config,
    accel_override: Option<Accel>,
) -> Result<Fingerprint, MeasureError> {
    let allowed = allowed_emulators(config);
    let emulator = resolve_emulator(guest, &allowed)?;
    let version = emulator_version(&emulator.to_string_lossy(), &allowed)?;
    let accel = accel_override.unwrap_or(guest.accel);
    let opts = ProbeOptions {
        timeout: Duration::from_secs(config.probe.timeout_secs),
        allowed_emulators: allowed,
        accel_override,
        ..ProbeOptions::default()
    };
    Ok(measure_now(guest, &opts, &version, accel, None)?)
}

fn measure_now(
    guest: &GuestCpuConfig,
    opts: &ProbeOptions,
    version: &str,
    accel: Accel,
    executable: Option<&Path>,
) -> Result<Fingerprint, ProbeError> {
    let (raw, filtered, user_mode) = probe_view_running(guest, opts, executable)?;
    let config = serde_json::to_value(guest).unwrap_or(serde_json::Value::Null);
    let mut fingerprint = Fingerprint::new(
        HostFacts::of_this_host(version, accel_name(accel)),
        config,
        raw,
    );
    fingerprint.filtered = filtered;
    fingerprint.user_mode = user_mode;
    Ok(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_emulators_from_libvirt_capability_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("a.xml"),
            "<qemuCaps>\n  <emulator>/usr/bin/qemu-system-x86_64</emulator>\n  <qemuctime>1</qemuctime>\n</qemuCaps>\n",
        )
        .expect("write");
        fs::write(
            dir.path().join("b.xml"),
            "<qemuCaps><emulator>relative/qemu</emulator></qemuCaps>",
        )
        .expect("write");
        fs::write(dir.path().join("c.xml"), "not xml <<<").expect("write");
        fs::write(dir.path().join("d.txt"), "<emulator>/bin/sh</emulator>").expect("write");
        let found = libvirt_capability_emulators(dir.path());
        assert_eq!(found, vec![PathBuf::from("/usr/bin/qemu-system-x86_64")]);
        assert!(libvirt_capability_emulators(Path::new("/nonexistent")).is_empty());
    }
}
