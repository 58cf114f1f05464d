//! `cpuguard fingerprint export` and `cpuguard matrix`: every host exports the fingerprints it
//! has measured (its cache), and the matrix says, per guest CPU configuration, which host can
//! receive a VM from which: the verdict the destination's hook would give on the CPUID alone
//! (equivalent after normalization; informational differences never refuse, features only
//! gained refuse like the default `policy.gained_features`).
//!
//! A configuration is the canonical guest CPU configuration of the cache key without the
//! emulator path (hosts install QEMU in different places), so the same domain measured on two
//! hosts meets in one matrix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arch::Arch;
use crate::baseline::HostCpu;
use crate::cache::Cache;
use crate::fingerprint::{compare, Fingerprint};
use crate::view::GuestView;
use crate::x86_64::features::FeatureMap;

/// The `format` every bundle carries, so another JSON file is refused by name.
pub const BUNDLE_FORMAT: &str = "cpuguard-fingerprints";
/// Version 2 added `host_cpu`; version 1 bundles (without it) are still read.
pub const BUNDLE_VERSION: u32 = 2;
/// The oldest bundle version this cpuguard reads.
pub const OLDEST_BUNDLE_VERSION: u32 = 1;
const MAX_BUNDLE_BYTES: u64 = 256 * 1024 * 1024;

/// Why an export, a bundle or a matrix (or a plan's destinations) could not be had.
#[derive(Debug, Error)]
pub enum MatrixError {
    /// The cache could not be listed (export).
    #[error("{0}")]
    Cache(#[from] crate::cache::CacheError),
    /// A cache entry that listed as good could not be read or verified (export).
    #[error("cache entry {path}: cannot read: {reason}")]
    Entry {
        /// The cache entry's file.
        path: PathBuf,
        /// The I/O, JSON or verification error.
        reason: String,
    },
    /// A bundle file could not be read, or is larger than 256 MiB.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The bundle file.
        path: PathBuf,
        /// The I/O error, or the size limit it exceeds.
        reason: String,
    },
    /// The file is not JSON, has no `"format": "cpuguard-fingerprints"`, or does not have a
    /// bundle's layout.
    #[error("{path}: not a cpuguard fingerprint bundle: {reason}")]
    NotABundle {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A bundle of a version this cpuguard does not read.
    #[error("{path}: bundle version {found}, this cpuguard reads versions {OLDEST_BUNDLE_VERSION} to {BUNDLE_VERSION}")]
    Version {
        /// The bundle file.
        path: PathBuf,
        /// Its `version` (0 when absent or not a number).
        found: u32,
    },
    /// A fingerprint in the bundle fails verification (digest, normalization, format version).
    #[error("{path}: entry {index}: {reason}")]
    BadEntry {
        /// The bundle file.
        path: PathBuf,
        /// The entry's index in `entries`, from 0.
        index: usize,
        /// Why it was refused.
        reason: String,
    },
    /// Two bundles name the same host: the matrix names hosts by hostname.
    #[error("{path}: host {host} was already given by {first}")]
    DuplicateHost {
        /// The second bundle naming the host.
        path: PathBuf,
        /// The hostname both carry.
        host: String,
        /// The first bundle naming it.
        first: PathBuf,
    },
    /// The command line named no bundle.
    #[error("no bundles given: name the files `cpuguard fingerprint export` wrote on each host")]
    NoBundles,
    /// The bundle or matrix could not be written as JSON.
    #[error("cannot serialize: {0}")]
    Serialize(serde_json::Error),
}

/// One measured configuration of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleEntry {
    /// The cache key (its `config`, `machine`, `accel`, emulator and host identity).
    pub key: serde_json::Value,
    /// When it was measured, in seconds since the Unix epoch; 0 when the cache did not record it.
    pub measured_at_unix: u64,
    /// The fingerprint, verified when the bundle is read.
    pub fingerprint: Fingerprint,
}

/// What `cpuguard fingerprint export` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// The layout's version, [`OLDEST_BUNDLE_VERSION`] to [`BUNDLE_VERSION`].
    pub version: u32,
    /// The exporting host's name; the matrix and the plan name the host by it.
    pub hostname: String,
    /// The host's CPU as libvirt describes it (host-model of its domain capabilities, or a saved
    /// host CPU), for the baseline `cpuguard plan` computes. Absent in version 1 bundles and
    /// when the exporting host could not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cpu: Option<crate::baseline::HostCpu>,
    /// Every verified entry of the host's cache.
    pub entries: Vec<BundleEntry>,
}

/// The versions this cpuguard reads.
fn readable_version(version: u64) -> bool {
    (u64::from(OLDEST_BUNDLE_VERSION)..=u64::from(BUNDLE_VERSION)).contains(&version)
}

/// This host's name as the kernel has it.
pub fn this_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Every verified entry of the cache (entries with a problem are skipped and named in the
/// returned warnings: a lookup would discard them too).
pub fn export(
    cache: &Cache,
    hostname: &str,
    host_cpu: Option<crate::baseline::HostCpu>,
) -> Result<(Bundle, Vec<String>), MatrixError> {
    let mut entries = Vec::new();
    let mut warnings = Vec::new();
    for summary in cache.list()? {
        if let Some(problem) = &summary.problem {
            warnings.push(format!(
                "skipped cache entry {}: {problem}",
                summary.file.display()
            ));
            continue;
        }
        let entry_error = |reason: String| MatrixError::Entry {
            path: summary.file.clone(),
            reason,
        };
        let text =
            std::fs::read_to_string(&summary.file).map_err(|e| entry_error(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| entry_error(e.to_string()))?;
        let fingerprint = value
            .get("fingerprint")
            .cloned()
            .ok_or_else(|| entry_error("no fingerprint".to_string()))?;
        let fingerprint = Fingerprint::from_json(
            &fingerprint.to_string(),
            &summary.file.display().to_string(),
        )
        .map_err(|e| entry_error(e.to_string()))?;
        entries.push(BundleEntry {
            key: value
                .get("key")
                .cloned()
                .ok_or_else(|| entry_error("no key".to_string()))?,
            measured_at_unix: summary.measured_at_unix.unwrap_or(0),
            fingerprint,
        });
    }
    Ok((
        Bundle {
            format: BUNDLE_FORMAT.to_string(),
            version: BUNDLE_VERSION,
            hostname: hostname.to_string(),
            host_cpu,
            entries,
        },
        warnings,
    ))
}

/// Reads and checks a bundle file (each fingerprint is verified like a cache entry).
pub fn load_bundle(path: &Path) -> Result<Bundle, MatrixError> {
    load_bundle_with(path, &mut Verified::new())
}

/// Fingerprint tables already verified, by digest: an entry whose tables equal one of them is
/// verified by that comparison (hosts of one CPU generation export identical fingerprints, and
/// recomputing normalization and digest is most of loading a large fleet's bundles).
pub type Verified = std::collections::HashMap<String, crate::view::Tables>;

/// The typed x86-only layout of a bundle, read in one pass without the tagged-enum buffering
/// [`Fingerprint`]'s flattened tables need; `None` for anything else (aarch64 entries, other
/// versions, damage), which the general path then reads and explains.
fn fast_x86_bundle(text: &str) -> Option<Bundle> {
    #[derive(Deserialize)]
    struct Fp {
        format_version: u32,
        host: crate::fingerprint::HostFacts,
        config: serde_json::Value,
        arch: Arch,
        raw: crate::x86_64::CpuidTable,
        normalized: crate::x86_64::CpuidTable,
        masks: Vec<crate::x86_64::normalize::Mask>,
        digest: String,
    }
    #[derive(Deserialize)]
    struct Entry {
        key: serde_json::Value,
        measured_at_unix: u64,
        fingerprint: Fp,
    }
    #[derive(Deserialize)]
    struct Fast {
        format: String,
        version: u32,
        hostname: String,
        #[serde(default)]
        host_cpu: Option<crate::baseline::HostCpu>,
        entries: Vec<Entry>,
    }
    let fast: Fast = serde_json::from_str(text).ok()?;
    if fast.format != BUNDLE_FORMAT
        || !readable_version(fast.version.into())
        || fast
            .entries
            .iter()
            .any(|e| e.fingerprint.arch != Arch::X86_64)
    {
        return None;
    }
    Some(Bundle {
        format: fast.format,
        version: fast.version,
        hostname: fast.hostname,
        host_cpu: fast.host_cpu,
        entries: fast
            .entries
            .into_iter()
            .map(|e| BundleEntry {
                key: e.key,
                measured_at_unix: e.measured_at_unix,
                fingerprint: Fingerprint {
                    format_version: e.fingerprint.format_version,
                    host: e.fingerprint.host,
                    config: e.fingerprint.config,
                    tables: crate::view::Tables::X86 {
                        raw: e.fingerprint.raw,
                        normalized: e.fingerprint.normalized,
                        masks: e.fingerprint.masks,
                    },
                    digest: e.fingerprint.digest,
                    // The plan compares tables only; why QEMU dropped a feature is not needed,
                    // nor what guest user space sees.
                    filtered: Vec::new(),
                    user_mode: None,
                },
            })
            .collect(),
    })
}

fn load_bundle_with(path: &Path, memo: &mut Verified) -> Result<Bundle, MatrixError> {
    use std::io::Read;
    let read_error = |reason: String| MatrixError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| read_error(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_BUNDLE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| read_error(e.to_string()))?;
    if text.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(read_error(format!("larger than {MAX_BUNDLE_BYTES} bytes")));
    }
    // The common case in one typed pass (a Value tree of a large bundle costs several times
    // its size); anything unexpected goes through the checks below for a precise message.
    if let Some(bundle) = fast_x86_bundle(&text) {
        return verified(path, bundle, memo);
    }
    if let Ok(bundle) = serde_json::from_str::<Bundle>(&text) {
        if bundle.format == BUNDLE_FORMAT && readable_version(bundle.version.into()) {
            return verified(path, bundle, memo);
        }
    }
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| MatrixError::NotABundle {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if value.get("format").and_then(|f| f.as_str()) != Some(BUNDLE_FORMAT) {
        return Err(MatrixError::NotABundle {
            path: path.to_path_buf(),
            reason: format!("no \"format\": \"{BUNDLE_FORMAT}\""),
        });
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if !readable_version(version) {
        return Err(MatrixError::Version {
            path: path.to_path_buf(),
            found: u32::try_from(version).unwrap_or(u32::MAX),
        });
    }
    let bundle: Bundle = serde_json::from_value(value).map_err(|e| MatrixError::NotABundle {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    verified(path, bundle, memo)
}

/// `bundle` once each fingerprint has been verified like a cache entry.
fn verified(path: &Path, bundle: Bundle, memo: &mut Verified) -> Result<Bundle, MatrixError> {
    for (index, entry) in bundle.entries.iter().enumerate() {
        let fp = &entry.fingerprint;
        if fp.format_version == crate::fingerprint::FORMAT_VERSION
            && memo.get(&fp.digest) == Some(&fp.tables)
        {
            continue;
        }
        entry
            .fingerprint
            .verify(&format!("{} entry {index}", path.display()))
            .map_err(|e| MatrixError::BadEntry {
                path: path.to_path_buf(),
                index,
                reason: e.to_string(),
            })?;
        memo.insert(fp.digest.clone(), fp.tables.clone());
    }
    Ok(bundle)
}

/// A file's text, refusing files over `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok(text)
}

/// A destination's fingerprints, reduced to what the plan compares.
pub struct HostViews {
    /// The destination's name, from its bundle.
    pub hostname: String,
    /// What the bundle says of the host's CPU (None in version 1 bundles).
    pub host_cpu: Option<HostCpu>,
    /// configuration (canonical JSON text) -> (digest, measured_at_unix, raw view) of the newest
    /// measurement.
    pub views: HashMap<String, (String, u64, GuestView)>,
}

impl HostViews {
    /// Keeps the newest verified measurement per configuration and drops the rest of the bundle.
    pub fn of(bundle: Bundle) -> HostViews {
        let mut views: HashMap<String, (String, u64, GuestView)> = HashMap::new();
        for entry in bundle.entries {
            let text = configuration_of(&entry.key).to_string();
            let newer = views
                .get(&text)
                .is_none_or(|(_, at, _)| entry.measured_at_unix > *at);
            if newer {
                let raw = entry.fingerprint.raw();
                views.insert(
                    text,
                    (entry.fingerprint.digest, entry.measured_at_unix, raw),
                );
            }
        }
        HostViews {
            hostname: bundle.hostname,
            host_cpu: bundle.host_cpu,
            views,
        }
    }
}

/// Loads destination bundles for a plan, reduced to one view per configuration, on one thread per
/// core, at most four (parsing and verifying fingerprints is most of a large plan's time).
pub fn load_host_views(files: &[PathBuf]) -> Result<Vec<(PathBuf, HostViews)>, MatrixError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let chunk = files.len().div_ceil(threads).max(1);
    let results: Vec<Result<Vec<(PathBuf, HostViews)>, MatrixError>> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = files
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        let mut memo = Verified::new();
                        let mut raw_memo = HashMap::new();
                        part.iter()
                            .map(|f| {
                                if let Some(views) = fast_host_views(f, &mut raw_memo)? {
                                    return Ok((f.clone(), views));
                                }
                                load_bundle_with(f, &mut memo)
                                    .map(|b| (f.clone(), HostViews::of(b)))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(MatrixError::Read {
                            path: PathBuf::from("(bundle loader)"),
                            reason: "a loading thread panicked".to_string(),
                        })
                    })
                })
                .collect()
        });
    let mut out = Vec::with_capacity(files.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// A plan needs only each entry's configuration, time, raw x86 table and digest: those are read
/// (the stored normalization and masks are skipped, not trusted) and the digest is checked by
/// normalizing the raw table again, once per distinct table (`memo`: digest -> raw table
/// verified). `Ok(None)` for anything but a well-formed x86 bundle: the general loader then
/// reads and explains it.
fn fast_host_views(
    path: &Path,
    memo: &mut HashMap<String, crate::x86_64::CpuidTable>,
) -> Result<Option<HostViews>, MatrixError> {
    // Fields not named here (normalized, masks, host, config) are skipped by the parser.
    #[derive(Deserialize)]
    struct Fp {
        format_version: u32,
        arch: Arch,
        raw: crate::x86_64::CpuidTable,
        digest: String,
    }
    #[derive(Deserialize)]
    struct Entry {
        key: serde_json::Value,
        measured_at_unix: u64,
        fingerprint: Fp,
    }
    #[derive(Deserialize)]
    struct Fast {
        format: String,
        version: u32,
        hostname: String,
        #[serde(default)]
        host_cpu: Option<crate::baseline::HostCpu>,
        entries: Vec<Entry>,
    }
    let text = read_bounded(path, MAX_BUNDLE_BYTES).map_err(|reason| MatrixError::Read {
        path: path.to_path_buf(),
        reason,
    })?;
    let Ok(fast) = serde_json::from_str::<Fast>(&text) else {
        return Ok(None);
    };
    drop(text);
    if fast.format != BUNDLE_FORMAT
        || !readable_version(fast.version.into())
        || fast.entries.iter().any(|e| {
            e.fingerprint.arch != Arch::X86_64
                || e.fingerprint.format_version != crate::fingerprint::FORMAT_VERSION
        })
    {
        return Ok(None);
    }
    let mut views = HashMap::new();
    for (index, entry) in fast.entries.into_iter().enumerate() {
        let Fp { raw, digest, .. } = entry.fingerprint;
        let mut raw = raw;
        raw.canonicalize();
        if memo.get(&digest) != Some(&raw) {
            let computed = crate::view::Tables::of(raw.clone().into()).digest();
            if computed != digest {
                return Err(MatrixError::BadEntry {
                    path: path.to_path_buf(),
                    index,
                    reason: format!("digest {digest} recorded, {computed} computed from its table"),
                });
            }
            memo.insert(digest.clone(), raw.clone());
        }
        let text = configuration_of(&entry.key).to_string();
        let newer =
            views
                .get(&text)
                .is_none_or(|(_, at, _): &(String, u64, crate::view::GuestView)| {
                    entry.measured_at_unix > *at
                });
        if newer {
            views.insert(text, (digest, entry.measured_at_unix, raw.into()));
        }
    }
    Ok(Some(HostViews {
        hostname: fast.hostname,
        host_cpu: fast.host_cpu,
        views,
    }))
}

/// The configuration a matrix groups by: the key's canonical guest configuration without the
/// emulator path, and the accelerator the probe ran under.
pub fn configuration_of(key: &serde_json::Value) -> serde_json::Value {
    let mut config = key
        .get("config")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    if let Some(map) = config.as_object_mut() {
        map.remove("emulator");
    }
    serde_json::json!({ "config": config, "accel": key.get("accel") })
}

/// `EPYC-Milan (custom), pc-i440fx-7.2/kvm, 2 vCPUs`.
pub fn label(configuration: &serde_json::Value) -> String {
    let config = &configuration["config"];
    let cpu = &config["cpu"];
    let model = cpu["model"].as_str().unwrap_or("default model");
    let mode = cpu["mode"].as_str().unwrap_or("no <cpu>");
    let machine = config["machine"].as_str().unwrap_or("default machine");
    let accel = configuration["accel"].as_str().unwrap_or("?");
    let vcpus = config["vcpus"].as_u64().unwrap_or(1);
    format!("{model} ({mode}), {machine}/{accel}, {vcpus} vCPUs")
}

/// One source → destination verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    /// The source host.
    pub from: String,
    /// The destination host.
    pub to: String,
    /// True when the destination's hook would let the VM in on the CPUID alone (the views are
    /// equivalent after normalization).
    pub go: bool,
    /// Features the guest would lose: libvirt's names (x86), `REGISTER.Field` (aarch64).
    pub lost: Vec<String>,
    /// Features the guest would gain, named like `lost`.
    pub gained: Vec<String>,
    /// Other differences (vendor, family/model/stepping, leaves), one line each.
    pub changed: Vec<String>,
    /// `go` or `no-go`.
    #[serde(default)]
    pub verdict: String,
    /// The comparison as `cpuguard diff --json` gives it (numbers, masks, echo leaves).
    #[serde(default)]
    pub diff: serde_json::Value,
}

/// The verdicts for one guest CPU configuration between every host that measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigurationMatrix {
    /// The configuration in one line (see [`label`]).
    pub label: String,
    /// The configuration itself, as [`configuration_of`] gives it.
    pub configuration: serde_json::Value,
    /// Hosts that measured this configuration, sorted.
    pub hosts: Vec<String>,
    /// Each measuring host's CPU as the guest sees it (vendor, brand, family/model/stepping).
    #[serde(default)]
    pub identities: BTreeMap<String, serde_json::Value>,
    /// Every ordered pair of distinct hosts in `hosts`.
    pub pairs: Vec<Pair>,
}

/// What `cpuguard matrix` answers: for each configuration, which host can receive a VM from which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matrix {
    /// The JSON output's [`crate::report::SCHEMA_VERSION`].
    #[serde(default)]
    pub schema_version: u32,
    /// Every host of every bundle, sorted.
    pub hosts: Vec<String>,
    /// One per configuration measured anywhere, sorted by label.
    pub configurations: Vec<ConfigurationMatrix>,
}

impl Matrix {
    /// True when every measured pair would be let through.
    pub fn all_go(&self) -> bool {
        self.configurations
            .iter()
            .all(|c| c.pairs.iter().all(|p| p.go))
    }

    /// One table per configuration: rows are sources, columns destinations.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for c in &self.configurations {
            out.push_str(&format!("configuration: {}\n", c.label));
            let missing: Vec<&str> = self
                .hosts
                .iter()
                .filter(|h| !c.hosts.contains(h))
                .map(String::as_str)
                .collect();
            let width = c.hosts.iter().map(String::len).max().unwrap_or(0).max(9);
            let cells: Vec<Vec<String>> = c
                .hosts
                .iter()
                .map(|from| {
                    c.hosts
                        .iter()
                        .map(|to| {
                            if from == to {
                                return "-".to_string();
                            }
                            c.pairs
                                .iter()
                                .find(|p| &p.from == from && &p.to == to)
                                .map_or("?".to_string(), cell)
                        })
                        .collect()
                })
                .collect();
            let col = cells
                .iter()
                .flatten()
                .map(String::len)
                .chain(c.hosts.iter().map(String::len))
                .max()
                .unwrap_or(1);
            let mut header = format!("  {:width$}", "from \\ to");
            for h in &c.hosts {
                header.push_str(&format!("  {h:col$}"));
            }
            out.push_str(header.trim_end());
            out.push('\n');
            for (from, row) in c.hosts.iter().zip(&cells) {
                let mut line = format!("  {from:width$}");
                for v in row {
                    line.push_str(&format!("  {v:col$}"));
                }
                out.push_str(line.trim_end());
                out.push('\n');
            }
            for p in c.pairs.iter().filter(|p| !p.go) {
                let mut why = Vec::new();
                if !p.lost.is_empty() {
                    why.push(format!("lost {}", p.lost.join(",")));
                }
                if !p.gained.is_empty() {
                    why.push(format!("gained {}", p.gained.join(",")));
                }
                why.extend(p.changed.iter().cloned());
                out.push_str(&format!("  {} -> {}: {}\n", p.from, p.to, why.join("; ")));
            }
            if !missing.is_empty() {
                out.push_str(&format!("  not measured on: {}\n", missing.join(", ")));
            }
            out.push('\n');
        }
        out
    }
}

fn cell(p: &Pair) -> String {
    if p.go {
        "go".to_string()
    } else if !p.lost.is_empty() {
        format!("lost {}", p.lost.len())
    } else if !p.gained.is_empty() {
        format!("gained {}", p.gained.len())
    } else {
        "differs".to_string()
    }
}

/// Builds the matrix from named bundles (`(file, bundle)`); hosts are named by their bundle's
/// hostname, which must be unique.
pub fn build(bundles: &[(PathBuf, Bundle)], features: &FeatureMap) -> Result<Matrix, MatrixError> {
    if bundles.is_empty() {
        return Err(MatrixError::NoBundles);
    }
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    for (path, bundle) in bundles {
        if let Some(first) = seen.insert(&bundle.hostname, path) {
            return Err(MatrixError::DuplicateHost {
                path: path.clone(),
                host: bundle.hostname.clone(),
                first: first.to_path_buf(),
            });
        }
    }
    // configuration (as canonical JSON text) -> host -> fingerprint (the newest measurement).
    let mut groups: BTreeMap<String, (serde_json::Value, BTreeMap<String, &BundleEntry>)> =
        BTreeMap::new();
    for (_, bundle) in bundles {
        for entry in &bundle.entries {
            let configuration = configuration_of(&entry.key);
            let text = configuration.to_string();
            let group = groups
                .entry(text)
                .or_insert_with(|| (configuration, BTreeMap::new()));
            let slot = group.1.entry(bundle.hostname.clone()).or_insert(entry);
            if entry.measured_at_unix > slot.measured_at_unix {
                *slot = entry;
            }
        }
    }
    let mut configurations = Vec::new();
    for (configuration, hosts) in groups.into_values() {
        let mut pairs = Vec::new();
        for (from, a) in &hosts {
            for (to, b) in &hosts {
                if from == to {
                    continue;
                }
                let d = compare(&a.fingerprint, &b.fingerprint, features);
                pairs.push(Pair {
                    from: from.clone(),
                    to: to.clone(),
                    go: d.is_equivalent(),
                    lost: d.lost_names(),
                    gained: d.gained_names(),
                    changed: d.changed_lines(),
                    verdict: if d.is_equivalent() { "go" } else { "no-go" }.to_string(),
                    diff: crate::report::diff(&d),
                });
            }
        }
        configurations.push(ConfigurationMatrix {
            label: label(&configuration),
            configuration,
            hosts: hosts.keys().cloned().collect(),
            identities: hosts
                .iter()
                .map(|(h, e)| (h.clone(), crate::report::identity(&e.fingerprint.raw())))
                .collect(),
            pairs,
        });
    }
    configurations.sort_by(|a, b| a.label.cmp(&b.label));
    let mut all_hosts: Vec<String> = bundles.iter().map(|(_, b)| b.hostname.clone()).collect();
    all_hosts.sort();
    Ok(Matrix {
        schema_version: crate::report::SCHEMA_VERSION,
        hosts: all_hosts,
        configurations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::HostFacts;
    use crate::x86_64::table::{CpuidEntry, CpuidTable};

    fn fingerprint(ecx: u32) -> Fingerprint {
        let raw = CpuidTable {
            entries: vec![
                CpuidEntry {
                    leaf: 0,
                    subleaf: 0,
                    eax: 1,
                    ebx: 0x756e_6547,
                    ecx: 0x6c65_746e,
                    edx: 0x4965_6e69,
                },
                CpuidEntry {
                    leaf: 1,
                    subleaf: 0,
                    eax: 0x306c3,
                    ebx: 0,
                    ecx,
                    edx: 0,
                },
            ],
            msrs: vec![],
        };
        Fingerprint::new(HostFacts::default(), serde_json::Value::Null, raw)
    }

    fn bundle(host: &str, emulator: &str, ecx: u32) -> Bundle {
        Bundle {
            format: BUNDLE_FORMAT.into(),
            version: BUNDLE_VERSION,
            hostname: host.into(),
            host_cpu: None,
            entries: vec![BundleEntry {
                key: serde_json::json!({
                    "config": {"emulator": emulator, "machine": "pc", "vcpus": 2,
                               "cpu": {"model": "Haswell-noTSX", "mode": "custom"}},
                    "accel": "tcg"
                }),
                measured_at_unix: 1,
                fingerprint: fingerprint(ecx),
            }],
        }
    }

    fn features() -> FeatureMap {
        FeatureMap::parse(
            "<cpus><feature name='vmx'><cpuid eax_in='0x01' ecx='0x00000020'/></feature></cpus>",
            "test",
        )
        .expect("map")
    }

    #[test]
    fn same_configuration_meets_across_emulator_paths() {
        let bundles = vec![
            (
                PathBuf::from("a.json"),
                bundle("a", "/usr/bin/qemu-system-x86_64", 0x20),
            ),
            (
                PathBuf::from("b.json"),
                bundle("b", "/usr/libexec/qemu-kvm", 0),
            ),
            (
                PathBuf::from("c.json"),
                bundle("c", "/usr/bin/qemu-system-x86_64", 0x20),
            ),
        ];
        let m = build(&bundles, &features()).expect("build");
        assert_eq!(m.configurations.len(), 1);
        let c = &m.configurations[0];
        assert_eq!(c.label, "Haswell-noTSX (custom), pc/tcg, 2 vCPUs");
        assert_eq!(c.pairs.len(), 6);
        let pair = |f: &str, t: &str| {
            c.pairs
                .iter()
                .find(|p| p.from == f && p.to == t)
                .expect("pair")
                .clone()
        };
        assert!(pair("a", "c").go);
        assert_eq!(pair("a", "b").lost, vec!["vmx"]);
        assert_eq!(pair("b", "a").gained, vec!["vmx"]);
        assert!(!pair("b", "a").go, "gained only is refused by default");
        assert!(!m.all_go());
        let text = m.to_text();
        assert!(text.contains("a -> b: lost vmx"), "{text}");
        assert!(text.contains("b -> a: gained vmx"), "{text}");
        assert!(text.lines().all(|l| l == l.trim_end()), "{text:?}");
        assert!(
            text.contains("  from \\ to  a         b         c\n"),
            "{text}"
        );
    }

    #[test]
    fn duplicate_hosts_and_no_bundles_are_errors() {
        let bundles = vec![
            (PathBuf::from("a.json"), bundle("a", "/q", 0)),
            (PathBuf::from("a2.json"), bundle("a", "/q", 0)),
        ];
        let e = build(&bundles, &features()).expect_err("dup");
        assert_eq!(e.to_string(), "a2.json: host a was already given by a.json");
        assert!(matches!(
            build(&[], &features()),
            Err(MatrixError::NoBundles)
        ));
    }

    #[test]
    fn bundles_round_trip_and_tampering_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.json");
        let b = bundle("a", "/q", 0x20);
        std::fs::write(&path, serde_json::to_string(&b).expect("json")).expect("write");
        assert_eq!(load_bundle(&path).expect("load"), b);
        let mut bad = b.clone();
        if let crate::view::Tables::X86 { raw, .. } = &mut bad.entries[0].fingerprint.tables {
            raw.entries[1].ecx = 0;
        }
        std::fs::write(&path, serde_json::to_string(&bad).expect("json")).expect("write");
        let e = load_bundle(&path).expect_err("tampered");
        assert!(
            e.to_string()
                .starts_with(&format!("{}: entry 0:", path.display())),
            "{e}"
        );
        std::fs::write(&path, "{\"format\":\"other\"}").expect("write");
        assert!(matches!(
            load_bundle(&path),
            Err(MatrixError::NotABundle { .. })
        ));
        let e = load_bundle(&dir.path().join("missing")).expect_err("missing");
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn version_1_bundles_load_without_a_host_cpu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.json");
        let mut v = serde_json::to_value(bundle("a", "/q", 0x20)).expect("json");
        assert!(v.get("host_cpu").is_none(), "absent, not null: {v}");
        v["version"] = serde_json::json!(1);
        std::fs::write(&path, v.to_string()).expect("write");
        let loaded = load_bundle(&path).expect("version 1");
        assert_eq!((loaded.version, loaded.host_cpu), (1, None));
        let views = load_host_views(std::slice::from_ref(&path)).expect("views");
        assert!(views[0].1.host_cpu.is_none());
        v["version"] = serde_json::json!(BUNDLE_VERSION + 1);
        std::fs::write(&path, v.to_string()).expect("write");
        let e = load_bundle(&path).expect_err("newer");
        assert!(
            e.to_string()
                .ends_with("this cpuguard reads versions 1 to 2"),
            "{e}"
        );
    }
}
