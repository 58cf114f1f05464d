//! The fingerprint cache: one measured [`Fingerprint`] per distinct guest CPU configuration on this
//! host, so that only the first migration of a configuration pays for a probe.
//!
//! Layout of the cache directory (root-only, mode 0700):
//!
//! - `<digest>.json`: one entry; `<digest>` is the sha256 hex of the [`CacheKey`]'s canonical JSON.
//!   The entry stores the key itself, and a lookup compares it with the key asked for: a hash
//!   collision or a file renamed by hand is a miss, never a wrong answer.
//! - `<digest>.lock`: exists only while a process measures that key; it is held with `flock` and
//!   removed by its holder before unlocking (see [`KeyLock`] for why that is safe).
//! - `<digest>.corrupt`: the last entry of that key that failed verification, kept for the
//!   operator (one per key at most, replaced by the next).
//! - `.<digest>.json.<pid>.tmp`: a write in progress ([`crate::fsutil::write_atomic`]); one left
//!   by a killed process is removed the next time that key is locked, or by [`Cache::clear`].
//! - `<digest>.emulator`: an emulator binary's version, keyed by the binary's metadata
//!   ([`Cache::emulator_identity`]), so the warm path does not start QEMU just to ask it.
//!
//! Concurrency: readers never lock (entries appear by atomic rename, so a reader sees a whole old
//! file or a whole new one). A miss takes the key's exclusive lock, looks again (another process
//! may have measured meanwhile), and only then measures: concurrent callers for one key measure
//! once, different keys proceed in parallel. A bad entry is only moved aside under the lock, so
//! a process cannot remove a good entry that another has just renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use once_cell::sync::Lazy;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::domain::guest::{Accel, GuestCpuConfig};
use crate::fingerprint::{Fingerprint, FingerprintError, FORMAT_VERSION};

/// Version of the entry layout and of the key's serialization. Part of every digest, so a new
/// layout never reads an old file; an entry claiming another version is treated as foreign.
pub const CACHE_FORMAT: u32 = 1;

/// How long a caller waits for another process measuring the same key before giving up, when
/// the cache is not opened from a [`Config`]. A probe is bounded by its own timeout (default
/// 30 s), so this only trips when the holder is stuck outside the probe (e.g. stopped).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(75);

/// Larger entries are not fingerprints (a real one is ~100 KiB); refused before parsing.
const MAX_ENTRY_BYTES: u64 = 16 * 1024 * 1024;

const ENTRY_EXT: &str = "json";
const LOCK_EXT: &str = "lock";
const QUARANTINE_EXT: &str = "corrupt";
const EMULATOR_EXT: &str = "emulator";
/// What [`classify`] calls a temporary file of an entry, and of an emulator record.
const ENTRY_TMP: &str = "tmp";
const EMULATOR_TMP: &str = "emulator-tmp";

/// Kernel module parameters that change which CPUID bits KVM offers (nested virtualization
/// exposes `vmx`/`svm`; the PMU switch decides leaf 0xA). They can change without a reboot or a
/// kernel update, so they are part of the key.
const KVM_PARAMETERS: &[&str] = &[
    "/sys/module/kvm_intel/parameters/nested",
    "/sys/module/kvm_amd/parameters/nested",
    "/sys/module/kvm/parameters/enable_pmu",
];

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache directory {path}: cannot create: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cache directory {path}: {reason}")]
    UnsafeDir { path: PathBuf, reason: String },
    #[error("cache directory {path}: not writable: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
    #[error("cache directory {path}: cannot list: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("cache lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cache lock {path}: another process has been measuring this configuration for {waited:?}; giving up")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("cache file {path}: cannot remove: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cache key: emulator {path}: cannot stat: {source}")]
    Emulator { path: PathBuf, source: io::Error },
    #[error("cache key: cannot serialize: {0}")]
    Serialize(serde_json::Error),
    #[error("measuring {what}: {source}")]
    Measure {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("measuring {what}: the measured fingerprint is invalid: {source}")]
    InvalidMeasurement {
        what: String,
        source: FingerprintError,
    },
}

impl CacheError {
    /// True when the measuring closure failed (the probe), as opposed to the cache itself; the
    /// closure's own error is the `source` of [`CacheError::Measure`] (downcast it if needed).
    pub fn is_measure_failure(&self) -> bool {
        matches!(
            self,
            CacheError::Measure { .. } | CacheError::InvalidMeasurement { .. }
        )
    }
}

/// Which emulator binary measured an entry.
///
/// The binary is identified by its metadata (device, inode, size, mtime, ctime), not by hashing
/// it: sha256 of this machine's 18 MB `qemu-system-x86_64` took ~84 ms (`sha256sum`, hyperfine),
/// more than the whole warm-path budget of the hook (50 ms), while a stat is microseconds. A
/// package upgrade replaces the file by rename (new inode, new ctime), and ctime cannot be set
/// back from user space, so an in-place rewrite is caught too; a spurious change (chmod) only
/// costs one re-probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EmulatorIdentity {
    pub path: String,
    /// First line of `<emulator> --version`.
    pub version: String,
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl EmulatorIdentity {
    /// Stats `path` (following symlinks: the identity is the binary that will run).
    pub fn of(path: &Path, version: &str) -> Result<Self, CacheError> {
        let meta = fs::metadata(path).map_err(|source| CacheError::Emulator {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(EmulatorIdentity {
            path: path.display().to_string(),
            version: version.to_string(),
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        })
    }
}

/// The host facts below QEMU that change what a guest sees.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostIdentity {
    /// `uname -r`: KVM's supported CPUID is the kernel's.
    pub kernel_release: String,
    /// `/proc/cpuinfo` `microcode` (may disable features, e.g. TSX); `unknown` where the kernel
    /// does not report it (inside many VMs).
    pub microcode: String,
    /// `/proc/cpuinfo` `model name`: a host whose CPU changed under the same kernel (a VM host
    /// migrated itself, a board swap) must not reuse entries.
    pub cpu_model: String,
    /// `(parameter file, value)` of [`KVM_PARAMETERS`] that exist on this host.
    pub kvm_parameters: Vec<(String, String)>,
}

impl HostIdentity {
    pub fn of_this_host() -> Self {
        let kernel_release = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let (cpu_model, microcode) = first_processor_facts(Path::new("/proc/cpuinfo"));
        let kvm_parameters = KVM_PARAMETERS
            .iter()
            .filter_map(|p| {
                fs::read_to_string(p)
                    .ok()
                    .map(|v| (p.to_string(), v.trim().to_string()))
            })
            .collect();
        HostIdentity {
            kernel_release: or_unknown(kernel_release),
            microcode: or_unknown(microcode),
            cpu_model: or_unknown(cpu_model),
            kvm_parameters,
        }
    }
}

fn or_unknown(value: String) -> String {
    if value.is_empty() {
        "unknown".to_string()
    } else {
        value
    }
}

/// `model name` and `microcode` of the first processor. Reads only up to the first blank line:
/// on hosts with hundreds of CPUs the whole of `/proc/cpuinfo` takes milliseconds to generate.
fn first_processor_facts(path: &Path) -> (String, String) {
    let Ok(file) = File::open(path) else {
        return (String::new(), String::new());
    };
    let mut block = String::new();
    for line in BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() && !block.is_empty() {
            break;
        }
        block.push_str(&line);
        block.push('\n');
    }
    crate::fingerprint::cpuinfo_facts(&block)
}

/// What cpuguard itself contributes: another probe image may enumerate other leaves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProbeIdentity {
    pub cpuguard_version: String,
    /// sha256 hex of the probe firmware image.
    pub firmware_sha256: String,
}

static THIS_PROBE: Lazy<ProbeIdentity> = Lazy::new(|| ProbeIdentity {
    cpuguard_version: env!("CARGO_PKG_VERSION").to_string(),
    firmware_sha256: crate::probe::firmware::PROBE_X86_SHA256.to_string(),
});

impl ProbeIdentity {
    pub fn this_build() -> Self {
        THIS_PROBE.clone()
    }
}

/// Everything that changes what a guest sees, i.e. when two measurements may share an entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheKey {
    /// The canonical CPU configuration (sorted, defaults spelled out by its parser).
    pub config: GuestCpuConfig,
    pub emulator: EmulatorIdentity,
    /// The machine type the probe runs (the domain's `<os><type machine>`).
    pub machine: Option<String>,
    /// The accelerator the probe runs under (may differ from the domain's in tests).
    pub accel: Accel,
    pub host: HostIdentity,
    pub probe: ProbeIdentity,
}

impl CacheKey {
    /// The key for measuring `config` on this host under `accel` with the emulator binary
    /// `emulator` (the path the probe will execute, after its checks) of version
    /// `emulator_version`.
    pub fn for_this_host(
        config: &GuestCpuConfig,
        accel: Accel,
        emulator: &Path,
        emulator_version: &str,
    ) -> Result<Self, CacheError> {
        Ok(CacheKey::new(
            config,
            accel,
            EmulatorIdentity::of(emulator, emulator_version)?,
        ))
    }

    /// The key for measuring `config` on this host under `accel` with the emulator `emulator`
    /// (e.g. from [`Cache::emulator_identity`], which avoids starting QEMU for its version).
    pub fn new(config: &GuestCpuConfig, accel: Accel, emulator: EmulatorIdentity) -> Self {
        CacheKey {
            config: config.clone(),
            emulator,
            machine: config.machine.clone(),
            accel,
            host: HostIdentity::of_this_host(),
            probe: ProbeIdentity::this_build(),
        }
    }

    /// The JSON the digest covers. serde_json writes struct fields in declaration order and the
    /// configuration's lists are sorted by its parser, so equal keys give equal text.
    pub fn canonical_json(&self) -> Result<String, CacheError> {
        serde_json::to_string(self).map_err(CacheError::Serialize)
    }

    /// sha256 hex (64 characters) of the format version line and [`CacheKey::canonical_json`]:
    /// the entry's file name.
    pub fn digest(&self) -> Result<String, CacheError> {
        Ok(digest_text(&self.canonical_json()?))
    }

    /// One line for messages and listings: `Haswell-noTSX (custom), pc/tcg, /usr/bin/qemu-…`.
    pub fn summary(&self) -> String {
        let (model, mode) = model_and_mode(&self.config);
        format!(
            "{} ({}), {}/{}, {}",
            model.as_deref().unwrap_or("default model"),
            mode.as_deref().unwrap_or("no <cpu>"),
            self.machine.as_deref().unwrap_or("default machine"),
            accel_name(self.accel),
            self.emulator.path
        )
    }
}

fn digest_text(canonical_json: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("cpuguard cache key v{CACHE_FORMAT}\n").as_bytes());
    hasher.update(canonical_json.as_bytes());
    hex::encode(hasher.finalize())
}

fn model_and_mode(config: &GuestCpuConfig) -> (Option<String>, Option<String>) {
    match &config.cpu {
        None => (None, None),
        Some(cpu) => (
            cpu.model.clone(),
            serde_json::to_value(cpu.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string)),
        ),
    }
}

fn accel_name(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    }
}

/// The file as written. Key and fingerprint are kept as JSON values when reading so that a
/// layout change is reported as a foreign entry rather than a parse error deep inside.
#[derive(Debug, Serialize, Deserialize)]
struct StoredEntry {
    cache_format: u32,
    measured_at_unix: u64,
    key: serde_json::Value,
    fingerprint: serde_json::Value,
}

/// Why an entry was not trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "detail")]
pub enum EntryProblem {
    /// The file exists but could not be read.
    Unreadable(String),
    /// Not JSON, truncated, wrong fields, or a fingerprint whose digest or normalization does not
    /// match its table.
    Corrupt(String),
    /// Written by another cache or fingerprint format version.
    ForeignVersion(String),
    /// A valid entry for another key (hash collision or a file renamed by hand).
    KeyMismatch,
    /// Not a file cpuguard could have written: not a regular file, a symlink, owned by another
    /// user, or writable by group or others. Whatever it says, someone else could have said it.
    Untrusted(String),
}

impl std::fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryProblem::Unreadable(reason) => write!(f, "unreadable: {reason}"),
            EntryProblem::Corrupt(reason) => write!(f, "corrupt: {reason}"),
            EntryProblem::ForeignVersion(reason) => write!(f, "foreign version: {reason}"),
            EntryProblem::KeyMismatch => {
                write!(f, "stored for another configuration (key mismatch)")
            }
            EntryProblem::Untrusted(reason) => write!(f, "untrusted: {reason}"),
        }
    }
}

/// Something the caller should audit; none of these changes the answer, which is always a
/// verified or freshly measured fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum CacheWarning {
    /// A bad entry was found and not trusted; it was moved to `moved_to` (None: it could not be
    /// moved aside nor removed, and will be overwritten).
    Discarded {
        file: PathBuf,
        problem: EntryProblem,
        moved_to: Option<PathBuf>,
    },
    /// The fresh measurement could not be stored; the next caller measures again.
    NotStored { file: PathBuf, reason: String },
    /// The cache could not be used at all (see [`Cache::get_or_measure_or_bypass`]); the
    /// fingerprint was measured without it and not stored.
    Bypassed { dir: PathBuf, reason: String },
    /// The directory was writable by others (mode `mode`): narrowed to 0700, and the `moved`
    /// entries it held were moved aside (anyone could have planted them), to be measured again.
    Quarantined {
        dir: PathBuf,
        mode: u32,
        moved: usize,
    },
}

impl std::fmt::Display for CacheWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheWarning::Discarded {
                file,
                problem,
                moved_to: Some(to),
            } => write!(
                f,
                "cache entry {} discarded ({problem}); moved to {}",
                file.display(),
                to.display()
            ),
            CacheWarning::Discarded {
                file,
                problem,
                moved_to: None,
            } => write!(
                f,
                "cache entry {} discarded ({problem}); it could not be moved aside",
                file.display()
            ),
            CacheWarning::Bypassed { dir, reason } => write!(
                f,
                "fingerprint cache {} bypassed ({reason}); measured without it",
                dir.display()
            ),
            CacheWarning::Quarantined { dir, mode, moved } => write!(
                f,
                "fingerprint cache {} had mode {mode:04o}: narrowed to 0700, its {moved} entr{} moved aside and measured again when needed",
                dir.display(),
                if *moved == 1 { "y" } else { "ies" }
            ),
            CacheWarning::NotStored { file, reason } => write!(
                f,
                "cache entry {} not stored: {reason}; the next migration measures again",
                file.display()
            ),
        }
    }
}

/// Where a fingerprint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A verified entry (possibly written moments ago by a concurrent caller).
    Hit,
    /// Measured by this call.
    Measured,
}

/// Result of [`Cache::get`].
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    pub fingerprint: Option<Fingerprint>,
    pub warnings: Vec<CacheWarning>,
}

/// Result of [`Cache::get_or_measure`].
#[derive(Debug, Clone, PartialEq)]
pub struct Obtained {
    pub fingerprint: Fingerprint,
    pub source: Source,
    pub warnings: Vec<CacheWarning>,
}

/// One entry as `cpuguard cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySummary {
    /// The key digest (file stem).
    pub digest: String,
    pub file: PathBuf,
    pub model: Option<String>,
    pub mode: Option<String>,
    pub emulator: Option<String>,
    pub emulator_version: Option<String>,
    pub machine: Option<String>,
    pub accel: Option<String>,
    pub measured_at_unix: Option<u64>,
    /// The fingerprint's own digest (`sha256:…`).
    pub fingerprint_digest: Option<String>,
    /// None when the entry verifies (its key digests to its file name and its fingerprint is
    /// intact); otherwise why a lookup would discard it.
    pub problem: Option<EntryProblem>,
}

/// The fingerprint cache in one directory. Cheap to open; holds no file open between calls.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    lock_timeout: Duration,
    /// What opening found and repaired (a too-open directory), for the caller to audit.
    opened: Vec<CacheWarning>,
}

impl Cache {
    /// Opens (creating it, mode 0700) the cache directory `dir`. The directory decides whether a
    /// migration is allowed, so it must be a directory owned by this process's user and writable
    /// by nobody else; an existing one with broader permissions is narrowed to 0700, one owned by
    /// someone else is refused.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let narrowed = crate::fsutil::private_dir(dir).map_err(|e| match e {
            crate::fsutil::DirError::Create(source) => CacheError::CreateDir {
                path: dir.to_path_buf(),
                source,
            },
            crate::fsutil::DirError::Narrow { source, .. } => CacheError::NotWritable {
                path: dir.to_path_buf(),
                source,
            },
            other => CacheError::UnsafeDir {
                path: dir.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        // access(2) reports a read-only file system even to root, which mode bits do not.
        nix::unistd::access(
            dir,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(|errno| CacheError::NotWritable {
            path: dir.to_path_buf(),
            source: io::Error::from(errno),
        })?;
        let mut cache = Cache {
            dir: dir.to_path_buf(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            opened: Vec::new(),
        };
        if let Some(mode) = narrowed {
            let moved = cache.quarantine_all()?;
            cache.opened.push(CacheWarning::Quarantined {
                dir: dir.to_path_buf(),
                mode,
                moved,
            });
        }
        Ok(cache)
    }

    /// What [`Cache::open`] found and repaired; empty for a healthy directory.
    pub fn open_warnings(&self) -> &[CacheWarning] {
        &self.opened
    }

    /// After narrowing a directory others could write to: every entry is moved aside and every
    /// emulator record removed, since any of them may have been planted.
    fn quarantine_all(&self) -> Result<usize, CacheError> {
        let mut moved = 0;
        for (digest, ext, path) in self.scan()? {
            match ext.as_str() {
                ENTRY_EXT => {
                    let aside = self.file(&digest, QUARANTINE_EXT);
                    match fs::rename(&path, &aside) {
                        Ok(()) => moved += 1,
                        Err(_) => remove_if_present(&path)?,
                    }
                }
                EMULATOR_EXT | EMULATOR_TMP | ENTRY_TMP => remove_if_present(&path)?,
                _ => {}
            }
        }
        Ok(moved)
    }

    /// Opens `config.cache_dir`, waiting for a concurrent measurement at most twice the probe
    /// timeout plus slack (the holder may run `--version` and a probe).
    pub fn from_config(config: &Config) -> Result<Cache, CacheError> {
        let wait = Duration::from_secs(
            config
                .probe
                .timeout_secs
                .saturating_mul(2)
                .saturating_add(15),
        );
        Ok(Cache::open(&config.cache_dir)?.with_lock_timeout(wait))
    }

    pub fn with_lock_timeout(mut self, timeout: Duration) -> Cache {
        self.lock_timeout = timeout;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity of the emulator binary `path`. Its version comes from an earlier call when
    /// the binary's metadata (device, inode, size, mtime, ctime) is unchanged, otherwise from
    /// `version()` (e.g. [`crate::probe::emulator_version`]), which starts QEMU: ~22 ms here,
    /// half the hook's warm-path budget. The version is only a label in the key (the metadata
    /// identifies the binary), so reusing it is as safe as the key itself. Failing to record
    /// the version is silent: the next call asks again.
    pub fn emulator_identity<E>(
        &self,
        path: &Path,
        version: impl FnOnce() -> Result<String, E>,
    ) -> Result<EmulatorIdentity, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.running_emulator_identity(path, path, version)
    }

    /// Like [`Cache::emulator_identity`] for the binary at `stat_path` (a running domain's
    /// `/proc/PID/exe`) recorded under the path `path` (its `<emulator>`): while the file at
    /// `path` is that binary the key is the one a new process would get, and once a package
    /// replaced it the key differs by the file's identity, as it must.
    pub fn running_emulator_identity<E>(
        &self,
        path: &Path,
        stat_path: &Path,
        version: impl FnOnce() -> Result<String, E>,
    ) -> Result<EmulatorIdentity, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut identity = EmulatorIdentity::of(stat_path, "")?;
        identity.path = path.display().to_string();
        let stat_json = serde_json::to_string(&identity).map_err(CacheError::Serialize)?;
        let mut hasher = Sha256::new();
        hasher.update(format!("cpuguard emulator v{CACHE_FORMAT}\n").as_bytes());
        hasher.update(stat_json.as_bytes());
        let record = self.file(&hex::encode(hasher.finalize()), EMULATOR_EXT);
        if let Ok(Some(text)) = read_limited(&record) {
            if let Ok(stored) = serde_json::from_str::<EmulatorIdentity>(&text) {
                let same_binary = EmulatorIdentity {
                    version: String::new(),
                    ..stored.clone()
                } == identity;
                if same_binary && !stored.version.is_empty() {
                    return Ok(stored);
                }
            }
        }
        identity.version = version().map_err(|e| CacheError::Measure {
            what: format!("the version of emulator {}", path.display()),
            source: e.into(),
        })?;
        if let Ok(text) = serde_json::to_vec(&identity) {
            let _ = crate::fsutil::write_atomic(&record, &text, 0o600);
        }
        Ok(identity)
    }

    /// The entry file for `key` (whether or not it exists).
    pub fn entry_path(&self, key: &CacheKey) -> Result<PathBuf, CacheError> {
        Ok(self.file(&key.digest()?, ENTRY_EXT))
    }

    fn file(&self, digest: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{digest}.{ext}"))
    }

    /// The verified entry for `key`, if any. A bad entry is moved aside (under the key's lock),
    /// reported in `warnings`, and answered as a miss.
    pub fn get(&self, key: &CacheKey) -> Result<Lookup, CacheError> {
        let prepared = Prepared::new(self, key)?;
        match prepared.read() {
            EntryRead::Good(fingerprint) => {
                return Ok(Lookup {
                    fingerprint: Some(*fingerprint),
                    warnings: Vec::new(),
                })
            }
            EntryRead::Missing => {
                return Ok(Lookup {
                    fingerprint: None,
                    warnings: Vec::new(),
                })
            }
            EntryRead::Bad(_) => {}
        }
        let _lock = self.lock(&prepared.digest)?;
        let mut warnings = Vec::new();
        let fingerprint = prepared.read_locked(&mut warnings);
        Ok(Lookup {
            fingerprint,
            warnings,
        })
    }

    /// The fingerprint for `key`: a verified entry, or else `measure()`'s result, stored
    /// atomically. Concurrent callers for one key (threads or processes) call `measure` once;
    /// the others wait for the key's lock and then read the stored entry.
    ///
    /// Errors: the cache itself ([`CacheError::Lock`], [`CacheError::LockTimeout`]), or the
    /// measurement ([`CacheError::Measure`], whose source is `measure`'s error). Failing to store
    /// a good measurement is not an error but a [`CacheWarning::NotStored`].
    pub fn get_or_measure<E>(
        &self,
        key: &CacheKey,
        measure: impl FnOnce() -> Result<Fingerprint, E>,
    ) -> Result<Obtained, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.obtain(key, measure, false)
    }

    /// Like [`Cache::get_or_measure`], for callers to whom the cache is only a shortcut (the
    /// hook deciding a migration): when the key's lock cannot be taken (directory turned
    /// unwritable or read-only, disk full, another measurer stuck past the lock timeout) it
    /// measures without the cache and reports [`CacheWarning::Bypassed`] instead of failing.
    /// Only the measurement itself can then fail.
    pub fn get_or_measure_or_bypass<E>(
        &self,
        key: &CacheKey,
        measure: impl FnOnce() -> Result<Fingerprint, E>,
    ) -> Result<Obtained, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.obtain(key, measure, true)
    }

    fn obtain<E>(
        &self,
        key: &CacheKey,
        measure: impl FnOnce() -> Result<Fingerprint, E>,
        bypass: bool,
    ) -> Result<Obtained, CacheError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let prepared = Prepared::new(self, key)?;
        if let EntryRead::Good(fingerprint) = prepared.read() {
            return Ok(Obtained {
                fingerprint: *fingerprint,
                source: Source::Hit,
                warnings: Vec::new(),
            });
        }
        let mut warnings = Vec::new();
        let lock = match self.lock(&prepared.digest) {
            Ok(lock) => Some(lock),
            Err(e) if bypass => {
                warnings.push(CacheWarning::Bypassed {
                    dir: self.dir.clone(),
                    reason: e.to_string(),
                });
                None
            }
            Err(e) => return Err(e),
        };
        if lock.is_some() {
            if let Some(fingerprint) = prepared.read_locked(&mut warnings) {
                return Ok(Obtained {
                    fingerprint,
                    source: Source::Hit,
                    warnings,
                });
            }
        }
        let fingerprint = measure().map_err(|e| CacheError::Measure {
            what: key.summary(),
            source: e.into(),
        })?;
        fingerprint
            .verify("measured")
            .map_err(|source| CacheError::InvalidMeasurement {
                what: key.summary(),
                source,
            })?;
        // Without the lock another process may be writing this entry: leave it to them.
        if lock.is_some() {
            if let Err(reason) = prepared.store(&fingerprint) {
                warnings.push(CacheWarning::NotStored {
                    file: prepared.entry.clone(),
                    reason,
                });
            }
        }
        Ok(Obtained {
            fingerprint,
            source: Source::Measured,
            warnings,
        })
    }

    /// Every entry in the directory, sorted by digest, each checked as a lookup would check it
    /// (except against a caller's key: its stored key must digest to its file name).
    pub fn list(&self) -> Result<Vec<EntrySummary>, CacheError> {
        let mut out = Vec::new();
        for (digest, ext, path) in self.scan()? {
            if ext == ENTRY_EXT {
                out.push(summarize(&digest, &path));
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Removes every entry, moved-aside entry and emulator record, and the lock and temporary files of keys no
    /// one is measuring right now (those being measured are left to their measurer). Returns
    /// the number of entries (`.json`) removed.
    pub fn clear(&self) -> Result<usize, CacheError> {
        let mut removed = 0;
        let mut digests = Vec::new();
        for (digest, ext, path) in self.scan()? {
            match ext.as_str() {
                // Emulator records are written without a lock (concurrent writers write the
                // same text), so there is no writer to wait for.
                ENTRY_EXT | QUARANTINE_EXT | EMULATOR_EXT | EMULATOR_TMP => {
                    remove_if_present(&path)?;
                    if ext == ENTRY_EXT {
                        removed += 1;
                    }
                }
                _ => digests.push(digest),
            }
        }
        digests.sort();
        digests.dedup();
        for digest in digests {
            // Holding the lock means no one is writing this key: its temp files are stale, and
            // the lock file is removed when the guard drops.
            if let Some(lock) = self.try_lock(&digest)? {
                self.remove_stale_temps(&digest)?;
                drop(lock);
            }
        }
        Ok(removed)
    }

    /// (digest, extension, path) of every file cpuguard names in the directory: entries,
    /// locks, moved-aside entries, and temporary files (extension `tmp`).
    fn scan(&self) -> Result<Vec<(String, String, PathBuf)>, CacheError> {
        let list_error = |source| CacheError::List {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(list_error)? {
            let item = item.map_err(list_error)?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some((digest, ext)) = classify(name) {
                out.push((digest, ext, item.path()));
            }
        }
        Ok(out)
    }

    fn remove_stale_temps(&self, digest: &str) -> Result<(), CacheError> {
        for (d, ext, path) in self.scan()? {
            if d == digest && ext == ENTRY_TMP {
                remove_if_present(&path)?;
            }
        }
        Ok(())
    }

    /// Takes the key's lock, waiting at most `lock_timeout`.
    fn lock(&self, digest: &str) -> Result<KeyLock, CacheError> {
        let path = self.file(digest, LOCK_EXT);
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(lock) = self.try_lock(digest)? {
                return Ok(lock);
            }
            let waited = started.elapsed();
            if waited >= self.lock_timeout {
                return Err(CacheError::LockTimeout { path, waited });
            }
            // Polling rather than a blocking flock keeps the wait bounded without signals; the
            // holder is a probe of ~0.1 s, so a pause of at most 25 ms costs little.
            std::thread::sleep(pause.min(self.lock_timeout.saturating_sub(waited)));
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    /// The key's lock if no one holds it, None if someone does.
    fn try_lock(&self, digest: &str) -> Result<Option<KeyLock>, CacheError> {
        let path = self.file(digest, LOCK_EXT);
        let lock_error = |source| CacheError::Lock {
            path: path.clone(),
            source,
        };
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc_o_nofollow())
                .open(&path)
                .map_err(lock_error)?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, Errno::EINTR)) => continue,
                Err((_, errno)) => return Err(lock_error(io::Error::from(errno))),
            };
            // The previous holder may have unlinked the file between our open and our flock:
            // then we hold a lock no one else can see, and must lock the current file instead.
            let held = lock.metadata().map_err(lock_error)?;
            match fs::symlink_metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Some(KeyLock { path, lock }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(lock_error(e)),
            }
        }
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// An exclusive `flock` on `<digest>.lock`. Dropping it unlinks the file *before* unlocking:
/// a waiter that opened the old file then finds, after locking it, that the path no longer
/// names its file and starts over (see [`Cache::try_lock`]), so two holders never coexist and
/// no lock file outlives its use.
struct KeyLock {
    path: PathBuf,
    lock: Flock<File>,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let ours = match (self.lock.metadata(), fs::symlink_metadata(&self.path)) {
            (Ok(held), Ok(now)) => held.dev() == now.dev() && held.ino() == now.ino(),
            _ => false,
        };
        if ours {
            // Best effort: a lock file left behind is harmless and removed by the next holder.
            let _ = fs::remove_file(&self.path);
        }
        // The flock is released when `self.lock` is dropped, after this.
    }
}

/// Splits `<64 hex>.<ext>` or `.<64 hex>.json.<pid>.tmp` names; anything else is not ours.
fn classify(name: &str) -> Option<(String, String)> {
    let is_digest = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(rest) = name.strip_prefix('.') {
        let rest = rest.strip_suffix(".tmp")?;
        let (digest, rest) = rest.split_once('.')?;
        let (ext, pid) = rest.split_once('.')?;
        let kind = match ext {
            ENTRY_EXT => ENTRY_TMP,
            EMULATOR_EXT => EMULATOR_TMP,
            _ => return None,
        };
        if is_digest(digest) && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
            return Some((digest.to_string(), kind.to_string()));
        }
        return None;
    }
    let (digest, ext) = name.split_once('.')?;
    if is_digest(digest) && [ENTRY_EXT, LOCK_EXT, QUARANTINE_EXT, EMULATOR_EXT].contains(&ext) {
        return Some((digest.to_string(), ext.to_string()));
    }
    None
}

fn remove_if_present(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

enum EntryRead {
    Good(Box<Fingerprint>),
    Missing,
    Bad(EntryProblem),
}

/// One key's digest, its expected stored form, and its files.
struct Prepared<'a> {
    cache: &'a Cache,
    digest: String,
    key_value: serde_json::Value,
    entry: PathBuf,
}

impl<'a> Prepared<'a> {
    fn new(cache: &'a Cache, key: &CacheKey) -> Result<Self, CacheError> {
        let digest = key.digest()?;
        let key_value = serde_json::to_value(key).map_err(CacheError::Serialize)?;
        let entry = cache.file(&digest, ENTRY_EXT);
        Ok(Prepared {
            cache,
            digest,
            key_value,
            entry,
        })
    }

    fn read(&self) -> EntryRead {
        let text = match read_limited(&self.entry) {
            Ok(Some(text)) => text,
            Ok(None) => return EntryRead::Missing,
            Err(problem) => return EntryRead::Bad(problem),
        };
        match check_entry(&text, Some(&self.key_value), &self.entry) {
            Ok((fingerprint, _)) => EntryRead::Good(Box::new(fingerprint)),
            Err(problem) => EntryRead::Bad(problem),
        }
    }

    /// Under the key's lock: the entry if good; a bad one is moved aside and reported.
    fn read_locked(&self, warnings: &mut Vec<CacheWarning>) -> Option<Fingerprint> {
        match self.read() {
            EntryRead::Good(fingerprint) => Some(*fingerprint),
            EntryRead::Missing => None,
            EntryRead::Bad(problem) => {
                let aside = self.cache.file(&self.digest, QUARANTINE_EXT);
                let moved_to = match fs::rename(&self.entry, &aside) {
                    Ok(()) => Some(aside),
                    Err(_) => None,
                };
                warnings.push(CacheWarning::Discarded {
                    file: self.entry.clone(),
                    problem,
                    moved_to,
                });
                None
            }
        }
    }

    /// Under the key's lock: writes the entry (fsync, rename, fsync of the directory).
    fn store(&self, fingerprint: &Fingerprint) -> Result<(), String> {
        // Only a killed writer of this key can have left these, and it no longer runs: we hold
        // the lock.
        self.cache
            .remove_stale_temps(&self.digest)
            .map_err(|e| e.to_string())?;
        let fingerprint = serde_json::to_value(fingerprint).map_err(|e| e.to_string())?;
        let measured_at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let stored = StoredEntry {
            cache_format: CACHE_FORMAT,
            measured_at_unix,
            key: self.key_value.clone(),
            fingerprint,
        };
        let text = serde_json::to_vec_pretty(&stored).map_err(|e| e.to_string())?;
        crate::fsutil::write_atomic(&self.entry, &text, 0o600).map_err(|e| e.to_string())?;
        // The rename is durable only once the directory is synced; failing that only risks a
        // miss after a crash, so it is not an error.
        if let Ok(dir) = File::open(&self.cache.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// The file's text; None when it does not exist. Read as a file cpuguard wrote must be (see
/// [`crate::fsutil::read_trusted`]): an entry someone else owns or can write is not trusted.
fn read_limited(path: &Path) -> Result<Option<String>, EntryProblem> {
    use crate::fsutil::FileProblem;
    let bytes = match crate::fsutil::read_trusted(path, MAX_ENTRY_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(FileProblem::TooLarge { .. }) => {
            return Err(EntryProblem::Corrupt(format!(
                "larger than {MAX_ENTRY_BYTES} bytes"
            )))
        }
        Err(problem @ (FileProblem::Open(_) | FileProblem::Read(_))) => {
            return Err(EntryProblem::Unreadable(problem.to_string()))
        }
        Err(problem) => return Err(EntryProblem::Untrusted(problem.to_string())),
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| EntryProblem::Corrupt("not UTF-8".to_string()))
}

/// Verifies an entry's text: its format, its key (against `expected` when given), and its
/// fingerprint. Returns the fingerprint and the stored entry.
/// An entry of the current formats, read straight into its types: the hook's warm path. Parsing
/// into `serde_json::Value` first and converting after cost ~3 million instructions, half of the
/// warm incoming check (callgrind); anything this does not accept goes through the
/// value-by-value path of [`check_entry`], which says what is wrong with it.
#[derive(Deserialize)]
struct CurrentEntry {
    cache_format: u32,
    measured_at_unix: u64,
    key: serde_json::Value,
    fingerprint: Fingerprint,
}

fn check_entry(
    text: &str,
    expected: Option<&serde_json::Value>,
    path: &Path,
) -> Result<(Fingerprint, StoredEntry), EntryProblem> {
    if let Ok(entry) = serde_json::from_str::<CurrentEntry>(text) {
        if entry.cache_format == CACHE_FORMAT
            && entry.fingerprint.format_version == FORMAT_VERSION
            && expected.is_none_or(|expected| &entry.key == expected)
        {
            let origin = path.display().to_string();
            entry.fingerprint.verify(&origin).map_err(|e| match e {
                FingerprintError::Version { .. } => EntryProblem::ForeignVersion(e.to_string()),
                other => EntryProblem::Corrupt(other.to_string()),
            })?;
            let stored = StoredEntry {
                cache_format: entry.cache_format,
                measured_at_unix: entry.measured_at_unix,
                key: entry.key,
                fingerprint: serde_json::Value::Null,
            };
            return Ok((entry.fingerprint, stored));
        }
    }
    check_entry_by_value(text, expected, path)
}

/// [`check_entry`] one field at a time, so a foreign or damaged entry is classified (foreign
/// version, key mismatch, corrupt) rather than reported as a parse error deep inside.
fn check_entry_by_value(
    text: &str,
    expected: Option<&serde_json::Value>,
    path: &Path,
) -> Result<(Fingerprint, StoredEntry), EntryProblem> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| EntryProblem::Corrupt(e.to_string()))?;
    match value
        .get("cache_format")
        .and_then(serde_json::Value::as_u64)
    {
        Some(v) if v == u64::from(CACHE_FORMAT) => {}
        Some(v) => {
            return Err(EntryProblem::ForeignVersion(format!(
                "cache_format {v}, expected {CACHE_FORMAT}"
            )))
        }
        None => {
            return Err(EntryProblem::Corrupt(
                "no numeric cache_format field".to_string(),
            ))
        }
    }
    let mut stored: StoredEntry =
        serde_json::from_value(value).map_err(|e| EntryProblem::Corrupt(e.to_string()))?;
    if let Some(expected) = expected {
        if &stored.key != expected {
            return Err(EntryProblem::KeyMismatch);
        }
    }
    // Checked like Fingerprint::from_json (version first, then layout, then its invariants),
    // without printing the value back to text to parse it again: this is the hook's warm path.
    let origin = path.display().to_string();
    let fingerprint_value = std::mem::take(&mut stored.fingerprint);
    match fingerprint_value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
    {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        found => {
            return Err(EntryProblem::ForeignVersion(format!(
                "fingerprint format_version {}, expected {FORMAT_VERSION}",
                found.map_or_else(|| "(missing)".to_string(), |v| v.to_string())
            )))
        }
    }
    let fingerprint: Fingerprint = serde_json::from_value(fingerprint_value)
        .map_err(|e| EntryProblem::Corrupt(format!("fingerprint: {e}")))?;
    fingerprint.verify(&origin).map_err(|e| match e {
        FingerprintError::Version { .. } => EntryProblem::ForeignVersion(e.to_string()),
        other => EntryProblem::Corrupt(other.to_string()),
    })?;
    Ok((fingerprint, stored))
}

fn summarize(digest: &str, path: &Path) -> EntrySummary {
    let mut summary = EntrySummary {
        digest: digest.to_string(),
        file: path.to_path_buf(),
        model: None,
        mode: None,
        emulator: None,
        emulator_version: None,
        machine: None,
        accel: None,
        measured_at_unix: None,
        fingerprint_digest: None,
        problem: None,
    };
    let text = match read_limited(path) {
        Ok(Some(text)) => text,
        Ok(None) => {
            summary.problem = Some(EntryProblem::Unreadable("removed while listing".into()));
            return summary;
        }
        Err(problem) => {
            summary.problem = Some(problem);
            return summary;
        }
    };
    let (fingerprint, stored) = match check_entry(&text, None, path) {
        Ok(pair) => pair,
        Err(problem) => {
            summary.problem = Some(problem);
            return summary;
        }
    };
    summary.measured_at_unix = Some(stored.measured_at_unix);
    summary.fingerprint_digest = Some(fingerprint.digest);
    match serde_json::from_value::<CacheKey>(stored.key) {
        Ok(key) => {
            let (model, mode) = model_and_mode(&key.config);
            summary.model = model;
            summary.mode = mode;
            summary.emulator = Some(key.emulator.path.clone());
            summary.emulator_version = Some(key.emulator.version.clone());
            summary.machine = key.machine.clone();
            summary.accel = Some(accel_name(key.accel).to_string());
            match key.digest() {
                Ok(d) if d == digest => {}
                Ok(_) => summary.problem = Some(EntryProblem::KeyMismatch),
                Err(e) => summary.problem = Some(EntryProblem::Corrupt(e.to_string())),
            }
        }
        Err(e) => summary.problem = Some(EntryProblem::ForeignVersion(format!("key: {e}"))),
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::table::{CpuidEntry, CpuidTable};
    use crate::fingerprint::HostFacts;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(model: &str) -> GuestCpuConfig {
        let xml = format!(
            "<domain type='qemu'><vcpu>2</vcpu><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>\
             <cpu mode='custom'><model>{model}</model><feature name='vmx' policy='disable'/></cpu></domain>"
        );
        GuestCpuConfig::from_domain_xml(&xml).unwrap()
    }

    fn key(model: &str) -> CacheKey {
        let config = config(model);
        CacheKey {
            machine: config.machine.clone(),
            config,
            emulator: EmulatorIdentity {
                path: "/usr/bin/qemu-system-x86_64".into(),
                version: "QEMU emulator version 7.2.0".into(),
                device: 1,
                inode: 2,
                size: 3,
                mtime: 4,
                mtime_nsec: 5,
                ctime: 6,
                ctime_nsec: 7,
            },
            accel: Accel::Tcg,
            host: HostIdentity {
                kernel_release: "6.1.0-18-amd64".into(),
                microcode: "0x49".into(),
                cpu_model: "Intel(R) Xeon(R) CPU E5-2640 v3".into(),
                kvm_parameters: vec![],
            },
            probe: ProbeIdentity::this_build(),
        }
    }

    /// A fingerprint whose leaf 1 ECX carries `marker`, so tests can tell measurements apart.
    fn fingerprint(marker: u32) -> Fingerprint {
        let e = |leaf, eax, ebx, ecx, edx| CpuidEntry {
            leaf,
            subleaf: 0,
            eax,
            ebx,
            ecx,
            edx,
        };
        let table = CpuidTable {
            entries: vec![
                e(0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69),
                e(1, 0x000306c1, 0x00000800, marker, 0x178bfbff),
            ],
            msrs: vec![],
        };
        Fingerprint::new(
            HostFacts::default(),
            serde_json::json!({"test": marker}),
            table,
        )
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// get_or_measure with a counting closure returning `fingerprint(marker)`.
    fn obtain(cache: &Cache, key: &CacheKey, calls: &AtomicUsize, marker: u32) -> Obtained {
        cache
            .get_or_measure(key, || {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(fingerprint(marker))
            })
            .unwrap()
    }

    #[test]
    fn key_digest_is_stable_and_covers_every_component() {
        let base = key("Haswell-noTSX");
        let d = base.digest().unwrap();
        assert_eq!(d.len(), 64);
        assert!(d.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(d, base.clone().digest().unwrap());

        // Same CPU written in another element order: same key.
        let reordered = GuestCpuConfig::from_domain_xml(
            "<domain type='qemu'><cpu><feature policy='disable' name='vmx'/><model>Haswell-noTSX</model></cpu>\
             <os><type machine='pc-i440fx-7.2' arch='x86_64'>hvm</type></os><vcpu>2</vcpu></domain>",
        )
        .unwrap();
        let mut k = base.clone();
        k.config = reordered;
        assert_eq!(k.digest().unwrap(), d);

        let variants: Vec<fn(&mut CacheKey)> = vec![
            (|k| k.config = config("Skylake-Server")),
            (|k| k.emulator.path = "/opt/qemu/bin/qemu-system-x86_64".into()),
            (|k| k.emulator.version = "QEMU emulator version 8.0.0".into()),
            (|k| k.emulator.inode += 1),
            (|k| k.emulator.size += 1),
            (|k| k.emulator.mtime_nsec += 1),
            (|k| k.emulator.ctime += 1),
            (|k| k.machine = Some("pc-q35-7.2".into())),
            (|k| k.accel = Accel::Kvm),
            (|k| k.host.kernel_release = "6.1.0-21-amd64".into()),
            (|k| k.host.microcode = "unknown".into()),
            (|k| k.host.cpu_model = "AMD EPYC 7763".into()),
            (|k| {
                k.host.kvm_parameters =
                    vec![("/sys/module/kvm_intel/parameters/nested".into(), "Y".into())]
            }),
            (|k| k.probe.firmware_sha256 = "00".into()),
        ];
        let mut seen = vec![d];
        for change in variants {
            let mut k = base.clone();
            change(&mut k);
            let digest = k.digest().unwrap();
            assert!(
                !seen.contains(&digest),
                "a key component is not in the digest: {k:?}"
            );
            seen.push(digest);
        }
        assert!(
            base.summary()
                .starts_with("Haswell-noTSX (custom), pc-i440fx-7.2/tcg, /usr/bin/qemu"),
            "{}",
            base.summary()
        );
    }

    #[test]
    fn key_for_this_host_reads_the_binary_and_host() {
        let exe = std::env::current_exe().unwrap();
        let c = config("qemu64");
        let k = CacheKey::for_this_host(&c, Accel::Tcg, &exe, "v1").unwrap();
        let meta = fs::metadata(&exe).unwrap();
        assert_eq!(
            (k.emulator.inode, k.emulator.size),
            (meta.ino(), meta.size())
        );
        assert_eq!(k.machine.as_deref(), Some("pc-i440fx-7.2"));
        assert!(!k.host.kernel_release.is_empty() && k.host.kernel_release != "unknown");
        assert!(
            !k.host.microcode.is_empty(),
            "absent microcode must read 'unknown'"
        );
        assert_eq!(k.probe.firmware_sha256.len(), 64);
        let missing = Path::new("/nonexistent/qemu");
        let err = CacheKey::for_this_host(&c, Accel::Tcg, missing, "v1").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }

    #[test]
    fn open_creates_a_private_directory_and_refuses_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/cache");
        let cache = Cache::open(&dir).unwrap();
        assert_eq!(cache.dir(), dir);
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Too open: narrowed.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        Cache::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Under a regular file: cannot be created (root included).
        let file = tmp.path().join("plain");
        fs::write(&file, b"x").unwrap();
        let err = Cache::open(&file.join("cache")).unwrap_err();
        assert!(matches!(err, CacheError::CreateDir { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "cache directory {}: cannot create",
                file.join("cache").display()
            )),
            "{msg}"
        );
        assert!(!msg.contains('\n'));

        // A file where the directory should be.
        let err = Cache::open(&file).unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::CreateDir { .. } | CacheError::UnsafeDir { .. }
            ),
            "{err}"
        );

        // A symlink to a directory is refused.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = Cache::open(&link).unwrap_err();
        assert!(matches!(err, CacheError::UnsafeDir { .. }), "{err}");

        if nix::unistd::geteuid().is_root() {
            let foreign = tmp.path().join("foreign");
            fs::create_dir(&foreign).unwrap();
            nix::unistd::chown(&foreign, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let err = Cache::open(&foreign).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn narrowing_a_too_open_directory_quarantines_what_it_held() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cache = Cache::open(&dir).unwrap();
        let k = key("Haswell-noTSX");
        let calls = AtomicUsize::new(0);
        obtain(&cache, &k, &calls, 1);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let cache = Cache::open(&dir).unwrap();
        assert!(
            matches!(
                cache.open_warnings(),
                [CacheWarning::Quarantined {
                    mode: 0o777,
                    moved: 1,
                    ..
                }]
            ),
            "{:?}",
            cache.open_warnings()
        );
        let got = obtain(&cache, &k, &calls, 2);
        assert_eq!(
            got.source,
            Source::Measured,
            "the planted-or-not entry is not used"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_entry_others_can_write_is_remeasured() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(&tmp.path().join("cache")).unwrap();
        let k = key("Haswell-noTSX");
        let calls = AtomicUsize::new(0);
        obtain(&cache, &k, &calls, 1);
        let entry = cache.entry_path(&k).unwrap();
        fs::set_permissions(&entry, fs::Permissions::from_mode(0o666)).unwrap();
        let got = obtain(&cache, &k, &calls, 2);
        assert_eq!(got.source, Source::Measured);
        assert!(
            matches!(&got.warnings[..], [CacheWarning::Discarded { problem: EntryProblem::Untrusted(why), moved_to: Some(_), .. }] if why.contains("0666")),
            "{:?}",
            got.warnings
        );
    }

    #[test]
    fn miss_then_hit() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let calls = AtomicUsize::new(0);
        assert_eq!(
            cache.get(&k).unwrap(),
            Lookup {
                fingerprint: None,
                warnings: vec![]
            }
        );

        let first = obtain(&cache, &k, &calls, 0x11);
        assert_eq!(first.source, Source::Measured);
        assert!(first.warnings.is_empty());
        assert_eq!(first.fingerprint, fingerprint(0x11));
        let second = obtain(&cache, &k, &calls, 0x22);
        assert_eq!(second.source, Source::Hit);
        assert_eq!(
            second.fingerprint,
            fingerprint(0x11),
            "the stored measurement, not a new one"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get(&k).unwrap().fingerprint, Some(fingerprint(0x11)));

        // Only the entry remains: no lock, no temp file.
        let entry = cache.entry_path(&k).unwrap();
        assert_eq!(
            names(tmp.path()),
            vec![entry.file_name().unwrap().to_string_lossy().into_owned()]
        );
        assert_eq!(
            fs::metadata(&entry).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Another key misses.
        let other = obtain(&cache, &key("EPYC"), &calls, 0x33);
        assert_eq!(other.source, Source::Measured);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Writes `mangle(entry text)` over k's entry, then checks the next get_or_measure discards
    /// it with `expected` problem, re-measures, and leaves a good entry.
    fn assert_remeasured(mangle: impl Fn(&str) -> String, expected: fn(&EntryProblem) -> bool) {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Haswell-noTSX");
        let calls = AtomicUsize::new(0);
        obtain(&cache, &k, &calls, 0x11);
        let entry = cache.entry_path(&k).unwrap();
        let good = fs::read_to_string(&entry).unwrap();
        fs::write(&entry, mangle(&good)).unwrap();

        let got = obtain(&cache, &k, &calls, 0x22);
        assert_eq!(got.source, Source::Measured);
        assert_eq!(got.fingerprint, fingerprint(0x22));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        match got.warnings.as_slice() {
            [CacheWarning::Discarded {
                file,
                problem,
                moved_to: Some(aside),
            }] => {
                assert_eq!(file, &entry);
                assert!(expected(problem), "unexpected problem {problem}");
                assert_eq!(fs::read_to_string(aside).unwrap(), mangle(&good));
                let line = got.warnings[0].to_string();
                assert!(line.contains("discarded") && !line.contains('\n'), "{line}");
            }
            other => panic!("expected one Discarded warning, got {other:?}"),
        }
        // The new entry is good: a hit with the new measurement.
        let again = obtain(&cache, &k, &calls, 0x33);
        assert_eq!(
            (again.source, again.fingerprint),
            (Source::Hit, fingerprint(0x22))
        );
        let listed = cache.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].problem, None);
    }

    #[test]
    fn truncated_entry_is_remeasured() {
        assert_remeasured(
            |t| t[..t.len() / 2].to_string(),
            |p| matches!(p, EntryProblem::Corrupt(_)),
        );
    }

    #[test]
    fn entry_with_wrong_fingerprint_digest_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["fingerprint"]["digest"] =
                    serde_json::json!(format!("sha256:{}", "0".repeat(64)));
                v.to_string()
            },
            |p| matches!(p, EntryProblem::Corrupt(m) if m.contains("digest")),
        );
    }

    #[test]
    fn entry_with_tampered_table_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["fingerprint"]["normalized"]["entries"][1]["ecx"] = serde_json::json!(0x7f);
                v.to_string()
            },
            |p| matches!(p, EntryProblem::Corrupt(_)),
        );
    }

    #[test]
    fn foreign_fingerprint_version_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["fingerprint"]["format_version"] = serde_json::json!(999);
                v.to_string()
            },
            |p| matches!(p, EntryProblem::ForeignVersion(m) if m.contains("999")),
        );
    }

    #[test]
    fn foreign_cache_format_is_remeasured() {
        assert_remeasured(
            |t| {
                let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
                v["cache_format"] = serde_json::json!(CACHE_FORMAT + 1);
                v.to_string()
            },
            |p| matches!(p, EntryProblem::ForeignVersion(_)),
        );
    }

    #[test]
    fn entry_of_another_key_is_not_trusted() {
        // A valid entry for EPYC renamed to Haswell's file name.
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let calls = AtomicUsize::new(0);
        obtain(&cache, &key("EPYC"), &calls, 0x44);
        let epyc = cache.entry_path(&key("EPYC")).unwrap();
        let k = key("Haswell-noTSX");
        let entry = cache.entry_path(&k).unwrap();
        fs::rename(&epyc, &entry).unwrap();

        let listed = cache.list().unwrap();
        assert_eq!(
            listed[0].problem,
            Some(EntryProblem::KeyMismatch),
            "list checks name against key"
        );

        let lookup = cache.get(&k).unwrap();
        assert_eq!(lookup.fingerprint, None);
        assert!(matches!(
            lookup.warnings.as_slice(),
            [CacheWarning::Discarded {
                problem: EntryProblem::KeyMismatch,
                moved_to: Some(_),
                ..
            }]
        ));
        assert!(!entry.exists(), "moved aside");
        let got = obtain(&cache, &k, &calls, 0x55);
        assert_eq!(
            (got.source, got.fingerprint),
            (Source::Measured, fingerprint(0x55))
        );
        assert!(got.warnings.is_empty());
    }

    #[test]
    fn failed_measurement_stores_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let err = cache
            .get_or_measure(&k, || {
                Err::<Fingerprint, _>(std::io::Error::other("emulator hung"))
            })
            .unwrap_err();
        assert!(err.is_measure_failure());
        let msg = err.to_string();
        assert!(
            msg.starts_with("measuring Nehalem (custom)") && msg.ends_with("emulator hung"),
            "{msg}"
        );
        assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));

        // A measurement that fails its own verification is not stored either.
        let mut bad = fingerprint(1);
        bad.digest = "sha256:00".into();
        let err = cache
            .get_or_measure(&k, || Ok::<_, std::io::Error>(bad))
            .unwrap_err();
        assert!(
            matches!(err, CacheError::InvalidMeasurement { .. }),
            "{err}"
        );
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn unstorable_measurement_is_returned_with_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let digest = k.digest().unwrap();
        // Non-empty directories where the entry and its quarantine go: neither rename can work.
        for ext in [ENTRY_EXT, QUARANTINE_EXT] {
            let d = tmp.path().join(format!("{digest}.{ext}"));
            fs::create_dir(&d).unwrap();
            fs::write(d.join("x"), b"x").unwrap();
        }
        let calls = AtomicUsize::new(0);
        let got = obtain(&cache, &k, &calls, 0x66);
        assert_eq!(
            (got.source, &got.fingerprint),
            (Source::Measured, &fingerprint(0x66))
        );
        assert!(
            matches!(
                got.warnings.as_slice(),
                [
                    CacheWarning::Discarded {
                        moved_to: None,
                        problem: EntryProblem::Untrusted(_),
                        ..
                    },
                    CacheWarning::NotStored { .. }
                ]
            ),
            "{:?}",
            got.warnings
        );
        assert!(got.warnings[1].to_string().contains("not stored"));
        let leftovers: Vec<String> = names(tmp.path())
            .into_iter()
            .filter(|n| n.ends_with(".lock") || n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn stale_temp_and_lock_files_do_not_pile_up() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let k = key("Nehalem");
        let digest = k.digest().unwrap();
        // What a writer killed mid-measurement leaves.
        fs::write(tmp.path().join(format!(".{digest}.json.4242.tmp")), b"{").unwrap();
        fs::write(tmp.path().join(format!("{digest}.lock")), b"").unwrap();
        fs::write(tmp.path().join("unrelated.txt"), b"keep").unwrap();
        let calls = AtomicUsize::new(0);
        assert_eq!(obtain(&cache, &k, &calls, 1).source, Source::Measured);
        assert_eq!(
            names(tmp.path()),
            vec![format!("{digest}.json"), "unrelated.txt".to_string()]
        );
    }

    #[test]
    fn list_and_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let calls = AtomicUsize::new(0);
        let models = ["EPYC", "Nehalem", "qemu64"];
        for (i, m) in models.iter().enumerate() {
            obtain(&cache, &key(m), &calls, i as u32);
        }
        let bad_digest = "f".repeat(64);
        fs::write(
            tmp.path().join(format!("{bad_digest}.json")),
            b"{\"cache_format\": 1",
        )
        .unwrap();
        fs::write(tmp.path().join(format!("{bad_digest}.corrupt")), b"old").unwrap();
        fs::write(tmp.path().join(format!(".{bad_digest}.json.77.tmp")), b"").unwrap();
        fs::write(tmp.path().join(format!("{bad_digest}.lock")), b"").unwrap();
        fs::write(tmp.path().join("README"), b"not ours").unwrap();

        let list = cache.list().unwrap();
        assert_eq!(list.len(), 4);
        let mut sorted = list.clone();
        sorted.sort_by(|a, b| a.digest.cmp(&b.digest));
        assert_eq!(list, sorted);
        for m in models {
            let k = key(m);
            let s = list.iter().find(|s| s.model.as_deref() == Some(m)).unwrap();
            assert_eq!(s.digest, k.digest().unwrap());
            assert_eq!(s.file, cache.entry_path(&k).unwrap());
            assert_eq!(s.mode.as_deref(), Some("custom"));
            assert_eq!(s.machine.as_deref(), Some("pc-i440fx-7.2"));
            assert_eq!(s.accel.as_deref(), Some("tcg"));
            assert_eq!(s.emulator.as_deref(), Some("/usr/bin/qemu-system-x86_64"));
            assert!(s.measured_at_unix.unwrap() > 1_600_000_000);
            assert!(s
                .fingerprint_digest
                .as_deref()
                .unwrap()
                .starts_with("sha256:"));
            assert_eq!(s.problem, None);
        }
        let broken = list.iter().find(|s| s.digest == bad_digest).unwrap();
        assert!(matches!(broken.problem, Some(EntryProblem::Corrupt(_))));

        assert_eq!(cache.clear().unwrap(), 4);
        assert_eq!(names(tmp.path()), vec!["README".to_string()]);
        assert!(cache.list().unwrap().is_empty());
        assert_eq!(cache.clear().unwrap(), 0);
    }

    #[test]
    fn clear_leaves_a_key_being_measured_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let digest = key("EPYC").digest().unwrap();
        let held = cache.try_lock(&digest).unwrap().unwrap();
        let temp = tmp.path().join(format!(".{digest}.json.1.tmp"));
        fs::write(&temp, b"{").unwrap();
        assert!(
            cache.try_lock(&digest).unwrap().is_none(),
            "held locks exclude"
        );
        assert_eq!(cache.clear().unwrap(), 0);
        assert!(temp.exists(), "a write in progress is not removed");
        assert!(tmp.path().join(format!("{digest}.lock")).exists());
        drop(held);
        assert!(
            !tmp.path().join(format!("{digest}.lock")).exists(),
            "the holder removes its lock file"
        );
        cache.clear().unwrap();
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn a_lock_wait_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path())
            .unwrap()
            .with_lock_timeout(Duration::from_millis(150));
        let k = key("EPYC");
        let _held = cache.try_lock(&k.digest().unwrap()).unwrap().unwrap();
        let started = Instant::now();
        let err = cache
            .get_or_measure(&k, || Ok::<_, std::io::Error>(fingerprint(1)))
            .unwrap_err();
        assert!(matches!(err, CacheError::LockTimeout { .. }), "{err}");
        assert!(!err.is_measure_failure());
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(started.elapsed() < Duration::from_secs(2));

        // The hook's variant measures without the cache instead, and stores nothing.
        let got = cache
            .get_or_measure_or_bypass(&k, || Ok::<_, std::io::Error>(fingerprint(9)))
            .unwrap();
        assert_eq!(
            (got.source, &got.fingerprint),
            (Source::Measured, &fingerprint(9))
        );
        match got.warnings.as_slice() {
            [w @ CacheWarning::Bypassed { dir, reason }] => {
                assert_eq!(dir, tmp.path());
                assert!(reason.contains("giving up"), "{reason}");
                assert!(w.to_string().contains("bypassed"), "{w}");
            }
            other => panic!("expected Bypassed, got {other:?}"),
        }
        assert!(!cache.entry_path(&k).unwrap().exists());
        // The measurement itself still fails loudly.
        let err = cache
            .get_or_measure_or_bypass(&k, || {
                Err::<Fingerprint, _>(std::io::Error::other("probe timed out"))
            })
            .unwrap_err();
        assert!(err.is_measure_failure(), "{err}");
    }

    #[test]
    fn emulator_version_is_asked_once_per_binary() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(&tmp.path().join("cache")).unwrap();
        let binary = tmp.path().join("qemu");
        fs::write(&binary, b"v1 binary").unwrap();
        let asked = AtomicUsize::new(0);
        let identity = |answer: &'static str| {
            cache
                .emulator_identity(&binary, || {
                    asked.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(answer.to_string())
                })
                .unwrap()
        };
        let first = identity("QEMU 7.2");
        assert_eq!(first.version, "QEMU 7.2");
        assert_eq!(first.path, binary.display().to_string());
        assert_eq!(identity("not asked"), first);
        assert_eq!(asked.load(Ordering::SeqCst), 1);

        // Replaced binary (new inode, size): asked again.
        let staged = tmp.path().join("qemu.new");
        fs::write(&staged, b"v2 binary, longer").unwrap();
        fs::rename(&staged, &binary).unwrap();
        let second = identity("QEMU 8.0");
        assert_eq!(second.version, "QEMU 8.0");
        assert_ne!(second.inode, first.inode);
        assert_eq!(asked.load(Ordering::SeqCst), 2);

        // A corrupt record is ignored and rewritten.
        for (d, ext, path) in cache.scan().unwrap() {
            assert!(d.len() == 64 && ext == EMULATOR_EXT, "{ext}");
            fs::write(path, b"{").unwrap();
        }
        assert_eq!(identity("QEMU 8.0 again").version, "QEMU 8.0 again");
        assert_eq!(identity("not asked").version, "QEMU 8.0 again");
        assert_eq!(asked.load(Ordering::SeqCst), 3);

        let err = cache
            .emulator_identity(&binary.with_extension("gone"), || {
                Ok::<_, std::io::Error>(String::new())
            })
            .unwrap_err();
        assert!(matches!(err, CacheError::Emulator { .. }), "{err}");
        fs::write(&binary, b"v3").unwrap();
        let err = cache
            .emulator_identity(&binary, || {
                Err::<String, _>(std::io::Error::other("no version line"))
            })
            .unwrap_err();
        assert!(err.to_string().contains("version of emulator"), "{err}");

        // Emulator records count as no entry but are cleared.
        assert!(cache.list().unwrap().is_empty());
        assert_eq!(cache.clear().unwrap(), 0);
        assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));
    }

    #[test]
    fn classify_only_knows_our_names() {
        let d = "a".repeat(64);
        assert_eq!(
            classify(&format!("{d}.json")),
            Some((d.clone(), "json".into()))
        );
        assert_eq!(
            classify(&format!("{d}.lock")),
            Some((d.clone(), "lock".into()))
        );
        assert_eq!(
            classify(&format!("{d}.corrupt")),
            Some((d.clone(), "corrupt".into()))
        );
        assert_eq!(
            classify(&format!(".{d}.json.123.tmp")),
            Some((d.clone(), "tmp".into()))
        );
        assert_eq!(
            classify(&format!("{d}.emulator")),
            Some((d.clone(), "emulator".into()))
        );
        assert_eq!(
            classify(&format!(".{d}.emulator.9.tmp")),
            Some((d.clone(), "emulator-tmp".into()))
        );
        for other in [
            format!("{d}.txt"),
            format!(".{d}.lock.9.tmp"),
            format!(".{d}.json.x.tmp"),
            format!(".{d}.json..tmp"),
            "abc.json".to_string(),
            format!("{}.json", "g".repeat(64)),
            "README".to_string(),
        ] {
            assert_eq!(classify(&other), None, "{other}");
        }
    }

    #[test]
    fn from_config_uses_the_configured_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config {
            cache_dir: tmp.path().join("cache"),
            probe: crate::config::ProbeConfig {
                timeout_secs: 5,
                ..Default::default()
            },
            ..Default::default()
        };
        let cache = Cache::from_config(&config).unwrap();
        assert_eq!(cache.dir(), config.cache_dir);
        assert_eq!(cache.lock_timeout, Duration::from_secs(25));
    }
}
