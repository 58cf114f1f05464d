//! `/etc/cpuguard/cpuguard.toml`: every key optional, every default documented here and in
//! docs/operator/configuration.md. `CPUGUARD_CONFIG` overrides the path (tests, staging).
//!
//! A missing file means "all defaults". A broken file is reported with the file, line and problem;
//! the hook decides what a broken file means for the phase at hand (never block an ordinary start,
//! always block an incoming migration, since the policies that guard it are unknown).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the configuration lives when `CPUGUARD_CONFIG` is unset or empty.
pub const DEFAULT_PATH: &str = "/etc/cpuguard/cpuguard.toml";
/// Environment variable naming another configuration file (tests, staging).
pub const ENV_PATH: &str = "CPUGUARD_CONFIG";

/// Why the configuration could not be loaded; each names the file, and the line or key where it
/// can.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file exists but could not be read (a missing file is not an error: it means all
    /// defaults).
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (syntax, a wrong type, an unknown key).
    #[error("{path}:{line}: {problem}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// 1-based line of the problem (1 when the parser gives no position).
        line: usize,
        /// The parser's message, on one line.
        problem: String,
    },
    /// The file parses but a value is out of range (e.g. a relative path, a TTL below the minimum).
    #[error("{path}: {key}: {problem}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The offending key, dotted as in the file (e.g. `probe.timeout_secs`).
        key: &'static str,
        /// What the value must be instead.
        problem: String,
    },
}

/// What to do when a check cannot be made or finds a difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Veto: the hook exits 1 and libvirt aborts the migration; the guest keeps running on the
    /// source.
    Refuse,
    /// Let the migration proceed; the decision is still audited.
    Allow,
}

/// The parsed `cpuguard.toml`; every key optional, [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Fingerprint cache (default `/var/cache/cpuguard`).
    pub cache_dir: PathBuf,
    /// Per-boot state such as incoming-migration records (default `/run/cpuguard`).
    pub runtime_dir: PathBuf,
    /// Largest domain XML the hook accepts on stdin, in bytes (default 16 MiB).
    pub max_xml_bytes: usize,
    /// How long the migrate/restore phase's "incoming" record stays valid for the prepare phase
    /// that follows it, in seconds (default 600, at least [`crate::incoming::MIN_TTL_SECS`]).
    pub incoming_ttl_secs: u64,
    /// The `[probe]` table: how this host measures its own fingerprint.
    pub probe: ProbeConfig,
    /// The `[policy]` table: what an incoming migration gets when a check cannot be made or fails.
    pub policy: PolicyConfig,
    /// The `[stamp]` table: how guests started here are stamped, and whether stamps must be signed.
    pub stamp: StampConfig,
}

/// The `[stamp]` table of `cpuguard.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StampConfig {
    /// Stamp every domain after it starts (the `started` hook detaches `cpuguard-libvirt stamp`).
    pub on_start: bool,
    /// The libvirt connection the stamp process uses.
    pub uri: String,
    /// How often the detached stamp process retries while libvirt finishes the start job.
    pub retries: u32,
    /// Pause between those retries, in milliseconds (default 250).
    pub retry_interval_ms: u64,
    /// Path of the libvirt-linked helper; empty: next to the `cpuguard` binary, then
    /// /usr/libexec/cpuguard/cpuguard-libvirt.
    pub helper: PathBuf,
    /// The fleet's stamp-signing key (`cpuguard key generate`); stamps are signed when it exists.
    pub key_file: PathBuf,
    /// Refuse incoming guests whose stamp is not signed with the fleet key.
    pub require_signature: bool,
}

impl Default for StampConfig {
    fn default() -> Self {
        StampConfig {
            on_start: true,
            uri: "qemu:///system".into(),
            retries: 40,
            retry_interval_ms: 250,
            helper: PathBuf::new(),
            key_file: PathBuf::from(crate::signature::DEFAULT_KEY_FILE),
            require_signature: false,
        }
    }
}

/// The `[probe]` table of `cpuguard.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Wall-time bound of one probe run, in seconds (default 30).
    pub timeout_secs: u64,
    /// Emulators allowed besides those listed in libvirt's capabilities (absolute paths).
    pub emulators: Vec<PathBuf>,
}

/// The `[policy]` table of `cpuguard.toml`: one [`Verdict`] per situation in which the hook cannot
/// or would not simply compare fingerprints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Incoming migration whose source left no stamp (default refuse).
    pub unstamped_source: Verdict,
    /// Incoming migration whose stamp names no domain UUID or CPU configuration (written by a
    /// cpuguard before stamps were bound, or with the binding stripped). Default refuse: an
    /// unbound stamp could have been copied from any domain; "allow" while a fleet upgrades.
    pub unbound_stamp: Verdict,
    /// Incoming migration when this host cannot measure its own fingerprint (default refuse).
    pub probe_failure: Verdict,
    /// Incoming migration where the guest would only gain features (default refuse: the guest could
    /// start using them and then could never move back).
    pub gained_features: Verdict,
    /// Incoming migration to this host when its guests' user space (CPL3) sees other CPUID
    /// values than their kernel (default refuse: such a host shows guest applications its own
    /// CPU, so no CPU configuration hides the host from them).
    pub user_mode_cpuid: Verdict,
    /// Honour `<cpuguard-policy:policy guard='off'/>` in a domain's metadata (default true;
    /// every use is audited).
    pub allow_domain_opt_out: bool,
    /// Incoming guest whose `<qemu:commandline>` changes the CPU (`-cpu`, `-global` or `-device`
    /// on a CPU, `-overcommit cpu-pm`), which neither the stamp nor this host's measurement sees
    /// (default refuse; allow: audited as a warning each time).
    pub qemu_commandline_cpu: Verdict,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cache_dir: PathBuf::from("/var/cache/cpuguard"),
            runtime_dir: PathBuf::from("/run/cpuguard"),
            max_xml_bytes: 16 * 1024 * 1024,
            incoming_ttl_secs: 600,
            probe: ProbeConfig::default(),
            policy: PolicyConfig::default(),
            stamp: StampConfig::default(),
        }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            timeout_secs: 30,
            emulators: Vec::new(),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            unstamped_source: Verdict::Refuse,
            unbound_stamp: Verdict::Refuse,
            probe_failure: Verdict::Refuse,
            gained_features: Verdict::Refuse,
            user_mode_cpuid: Verdict::Refuse,
            allow_domain_opt_out: true,
            qemu_commandline_cpu: Verdict::Refuse,
        }
    }
}

impl Config {
    /// The path in force: `$CPUGUARD_CONFIG` or the default.
    pub fn path() -> PathBuf {
        std::env::var_os(ENV_PATH)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
    }

    /// Loads the configuration in force. A missing file is all defaults.
    pub fn load() -> Result<Config, ConfigError> {
        Config::load_from(&Config::path())
    }

    /// Loads `path`: a missing file is all defaults; an unreadable, malformed or out-of-range one
    /// is an error naming the file.
    pub fn load_from(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses `text` as the contents of `path` (named in errors only) and validates the values.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                problem: e.message().replace('\n', " ").trim().to_string(),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem: problem.to_string(),
        };
        if !self.cache_dir.is_absolute() {
            return Err(invalid("cache_dir", "must be an absolute path"));
        }
        if !self.runtime_dir.is_absolute() {
            return Err(invalid("runtime_dir", "must be an absolute path"));
        }
        if self.max_xml_bytes < 1024 {
            return Err(invalid("max_xml_bytes", "must be at least 1024"));
        }
        if self.incoming_ttl_secs < crate::incoming::MIN_TTL_SECS {
            // Shorter than libvirt may take between `migrate begin` and `prepare`: the record
            // would expire first and the incoming guest would start unchecked.
            return Err(invalid(
                "incoming_ttl_secs",
                &format!(
                    "must be at least {} (libvirt may take that long from migrate to prepare)",
                    crate::incoming::MIN_TTL_SECS
                ),
            ));
        }
        if self.probe.timeout_secs == 0 {
            return Err(invalid("probe.timeout_secs", "must be at least 1"));
        }
        if !self.stamp.key_file.is_absolute() {
            return Err(invalid("stamp.key_file", "must be an absolute path"));
        }
        if !self.stamp.helper.as_os_str().is_empty() && !self.stamp.helper.is_absolute() {
            return Err(invalid("stamp.helper", "must be an absolute path"));
        }
        if let Some(p) = self.probe.emulators.iter().find(|p| !p.is_absolute()) {
            return Err(invalid(
                "probe.emulators",
                &format!("{} is not an absolute path", p.display()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/cpuguard/cpuguard.toml"), text)
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").expect("empty is valid"), Config::default());
        let c = Config::default();
        assert_eq!(c.cache_dir, PathBuf::from("/var/cache/cpuguard"));
        assert_eq!(c.runtime_dir, PathBuf::from("/run/cpuguard"));
        assert_eq!(c.max_xml_bytes, 16 * 1024 * 1024);
        assert_eq!(c.policy.unstamped_source, Verdict::Refuse);
    }

    #[test]
    fn keys_override_defaults() {
        let c =
            parse("max_xml_bytes = 4096\n[policy]\nunstamped_source = \"allow\"\n").expect("valid");
        assert_eq!(c.max_xml_bytes, 4096);
        assert_eq!(c.policy.unstamped_source, Verdict::Allow);
        assert_eq!(c.policy.probe_failure, Verdict::Refuse);
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = parse("cache_dir = \"/x\"\n\n[policy]\nunstamped_source = \"maybe\"\n")
            .expect_err("bad value");
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/cpuguard/cpuguard.toml:4: "),
            "message: {msg}"
        );
        assert!(msg.contains("maybe") || msg.contains("variant"), "{msg}");
        let e = parse("cache_dri = \"/x\"\n").expect_err("typo");
        assert!(
            e.to_string().contains(":1: unknown field `cache_dri`"),
            "{e}"
        );
        let e = parse("runtime_dir = \"run\"\n").expect_err("relative");
        assert_eq!(
            e.to_string(),
            "/etc/cpuguard/cpuguard.toml: runtime_dir: must be an absolute path"
        );
        assert!(!e.to_string().contains('\n'));
        // A zero TTL would let every incoming guest start unchecked.
        let e = parse("incoming_ttl_secs = 0\n").expect_err("zero ttl");
        assert!(
            e.to_string()
                .starts_with("/etc/cpuguard/cpuguard.toml: incoming_ttl_secs: must be at least 60"),
            "{e}"
        );
        parse("incoming_ttl_secs = 60\n").expect("the minimum is accepted");
    }

    #[test]
    fn shipped_config_file_documents_exactly_the_defaults() {
        let shipped = include_str!("../packaging/cpuguard.toml");
        assert_eq!(
            parse(shipped).expect("shipped file parses"),
            Config::default()
        );
        // Uncommenting every documented key must still give the defaults: the comments are true.
        let uncommented: String = shipped
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| r.contains(" = "))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            parse(&uncommented).expect("uncommented parses"),
            Config::default()
        );
        // And it lists every key there is.
        fn keys(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = value {
                for (k, v) in t {
                    let name = format!("{prefix}{k}");
                    if v.is_table() {
                        keys(v, &format!("{name}."), out);
                    } else {
                        out.push(name);
                    }
                }
            }
        }
        let (mut all, mut listed) = (Vec::new(), Vec::new());
        keys(
            &toml::Value::try_from(Config::default()).expect("serializes"),
            "",
            &mut all,
        );
        keys(
            &uncommented.parse::<toml::Value>().expect("toml"),
            "",
            &mut listed,
        );
        all.sort();
        listed.sort();
        assert_eq!(listed, all, "packaging/cpuguard.toml must list every key");
    }

    #[test]
    fn missing_file_is_defaults_unreadable_is_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.toml");
        assert_eq!(
            Config::load_from(&missing).expect("defaults"),
            Config::default()
        );
        // A directory cannot be read as a file.
        let e = Config::load_from(dir.path()).expect_err("a directory");
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
