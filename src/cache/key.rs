//! The cache key: everything below the guest's own configuration that changes what a guest sees
//! (emulator binary, machine, accelerator, kernel, microcode, KVM module parameters, the probe
//! image), and the digest that names an entry's file. A component missing here would let two
//! different measurements share an entry, so each one is covered by a test.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use once_cell::sync::Lazy;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::dir::EMULATOR_EXT;
use super::entry::read_limited;
use super::{Cache, CacheError, CACHE_FORMAT};
use crate::domain::guest::{Accel, GuestCpuConfig};
use crate::fingerprint::cpuinfo_facts;
use crate::fsutil::write_atomic;
use crate::x86_64::probe::firmware::PROBE_X86_SHA256;

/// Kernel module parameters that change which CPUID bits KVM offers (nested virtualization
/// exposes `vmx`/`svm`; the PMU switch decides leaf 0xA). They can change without a reboot or a
/// kernel update, so they are part of the key.
const KVM_PARAMETERS: &[&str] = &[
    "/sys/module/kvm_intel/parameters/nested",
    "/sys/module/kvm_amd/parameters/nested",
    "/sys/module/kvm/parameters/enable_pmu",
];
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
    /// The binary's path, as the probe executes it.
    pub path: String,
    /// First line of `<emulator> --version`.
    pub version: String,
    /// `st_dev` of the binary (symlinks followed).
    pub device: u64,
    /// `st_ino` of the binary: a package upgrade that renames a new file into place changes it.
    pub inode: u64,
    /// The binary's size, bytes.
    pub size: u64,
    /// Modification time, whole seconds since the Unix epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: i64,
    /// Status-change time (ctime), whole seconds since the Unix epoch; cannot be set back from user
    /// space.
    pub ctime: i64,
    /// Nanoseconds part of the status-change time.
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
    /// `(parameter file, value)` of the KVM module parameters in the key (`nested` of `kvm_intel`
    /// and `kvm_amd`, `enable_pmu` of `kvm`) that exist on this host.
    pub kvm_parameters: Vec<(String, String)>,
}

impl HostIdentity {
    /// This host's identity as of now: read from `/proc` and `/sys` at each call (no caching, since
    /// a microcode or KVM parameter change must show); a fact that cannot be read is `unknown` (or
    /// absent, for KVM parameters).
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
    cpuinfo_facts(&block)
}

/// What cpuguard itself contributes: another probe image may enumerate other leaves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProbeIdentity {
    /// The cpuguard version (`CARGO_PKG_VERSION`) that built the probe.
    pub cpuguard_version: String,
    /// sha256 hex of the probe firmware image.
    pub firmware_sha256: String,
}

static THIS_PROBE: Lazy<ProbeIdentity> = Lazy::new(|| ProbeIdentity {
    cpuguard_version: env!("CARGO_PKG_VERSION").to_string(),
    firmware_sha256: PROBE_X86_SHA256.to_string(),
});

impl ProbeIdentity {
    /// The identity of the probe built into this binary.
    pub fn this_build() -> Self {
        THIS_PROBE.clone()
    }
}

/// Everything that changes what a guest sees, i.e. when two measurements may share an entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheKey {
    /// The canonical CPU configuration (sorted, defaults spelled out by its parser).
    pub config: GuestCpuConfig,
    /// The emulator binary the probe runs.
    pub emulator: EmulatorIdentity,
    /// The machine type the probe runs (the domain's `<os><type machine>`).
    pub machine: Option<String>,
    /// The accelerator the probe runs under (may differ from the domain's in tests).
    pub accel: Accel,
    /// The host facts below QEMU (kernel, microcode, CPU model, KVM parameters).
    pub host: HostIdentity,
    /// The probe image that measures.
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

pub(super) fn model_and_mode(config: &GuestCpuConfig) -> (Option<String>, Option<String>) {
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

pub(super) fn accel_name(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    }
}
impl Cache {
    /// The identity of the emulator binary `path`. Its version comes from an earlier call when
    /// the binary's metadata (device, inode, size, mtime, ctime) is unchanged, otherwise from
    /// `version()` (e.g. [`crate::qemu::emulator_version`]), which starts QEMU: ~22 ms here,
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
            let _ = write_atomic(&record, &text, 0o600);
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{config, key, names};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
}
