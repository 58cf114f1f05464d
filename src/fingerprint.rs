//! The fingerprint: what a guest with one domain's CPU configuration sees on one host (CPUID on
//! x86, ID registers on aarch64: see `view`), as stored on disk (JSON) and compared between
//! source and destination.
//!
//! The digest covers only the normalized table, so two hosts offering a guest the same CPU have
//! the same digest whatever their APIC IDs, MPIDR affinities or TSC frequency. A file whose digest does not match
//! its table, or written by another format version, is refused rather than trusted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::view::{diff as view_diff, Arch, GuestView, Tables, ViewDiff, ViewError};
use crate::x86_64::dump::{detect_format, parse_dump_as, DumpFormat};
use crate::x86_64::features::FeatureMap;
use crate::x86_64::table::CpuidTable;
pub use crate::x86_64::user_mode::{UserModeCpuid, UserModeDifference};

/// Bumped whenever the JSON layout, the masks or the digest's serialization change: fingerprints
/// of another version are re-measured, never compared. Version 2 added `arch` (aarch64 ID
/// registers beside x86 CPUID). Defined beside the digest text it also versions.
pub use crate::view::FORMAT_VERSION;

/// Facts about the host a fingerprint was measured on; for the operator and the cache key, not
/// part of the digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// The host's name (`/proc/sys/kernel/hostname`).
    pub hostname: String,
    /// The running kernel's release (`uname -r`, e.g. `6.1.0-18-amd64`).
    pub kernel_release: String,
    /// `model name` of the first processor in `/proc/cpuinfo`; empty where the kernel shows none
    /// (aarch64).
    pub cpu_model_name: String,
    /// The microcode revision from `/proc/cpuinfo` (e.g. `0xf0`); empty where the kernel shows
    /// none (inside a VM, on aarch64).
    pub microcode: String,
    /// The first line of the emulator's `--version` (e.g. `QEMU emulator version 7.2.22 (…)`).
    pub qemu_version: String,
    /// `kvm` or `tcg`.
    pub accelerator: String,
}

impl HostFacts {
    /// Reads hostname, kernel release, CPU model name and microcode revision of this host from
    /// `/proc`; a value the kernel does not report (microcode inside a VM) is left empty.
    pub fn of_this_host(qemu_version: &str, accelerator: &str) -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let cpuinfo = read("/proc/cpuinfo");
        let (cpu_model_name, microcode) = cpuinfo_facts(&cpuinfo);
        HostFacts {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel_release: read("/proc/sys/kernel/osrelease"),
            cpu_model_name,
            microcode,
            qemu_version: qemu_version.to_string(),
            accelerator: accelerator.to_string(),
        }
    }
}

/// `model name` and `microcode` of the first processor in `/proc/cpuinfo` text.
pub fn cpuinfo_facts(cpuinfo: &str) -> (String, String) {
    let mut model = None;
    let mut microcode = None;
    for line in cpuinfo.lines() {
        if line.trim().is_empty() && (model.is_some() || microcode.is_some()) {
            break; // end of the first processor's block
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "model name" => model = model.or(Some(value.trim().to_string())),
            "microcode" => microcode = microcode.or(Some(value.trim().to_string())),
            _ => {}
        }
    }
    (model.unwrap_or_default(), microcode.unwrap_or_default())
}

/// What a guest with one domain's CPU configuration sees on one host: the cache's entry, a
/// stamp's source, `cpuguard probe`'s output. Build it with [`Fingerprint::new`] and read it with
/// [`Fingerprint::from_json`], which keep the digest and the normalization consistent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The JSON layout's version, [`FORMAT_VERSION`] for every fingerprint accepted.
    pub format_version: u32,
    /// The host it was measured on (not part of the digest).
    pub host: HostFacts,
    /// The canonical domain CPU configuration the table was measured for (defined by the probe;
    /// opaque here).
    pub config: serde_json::Value,
    /// `arch`, then the raw view, its normalization and the masks (see [`Tables`]).
    #[serde(flatten)]
    pub tables: Tables,
    /// `sha256:<hex>` of [`Tables::canonical_text`].
    pub digest: String,
    /// Features QEMU dropped from the requested CPU on this host, from its warnings
    /// (`avx2: the host lacks it (CPUID.07H:EBX [bit 5])`): the table already lacks them, this
    /// says why. Not part of the digest; absent in older files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filtered: Vec<String>,
    /// What guest user space sees of CPUID beside the guest kernel (x86 probes that ran the
    /// user-mode pass). A fact of the host, not of the guest's CPU: not part of the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_mode: Option<UserModeCpuid>,
}

/// Why a fingerprint, table or dump could not be read, or was refused. `origin` names the input
/// (a path, or what the caller passed).
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not JSON, or not JSON of a fingerprint or table.
    #[error("fingerprint {origin}: not a valid fingerprint JSON: {source}")]
    Json {
        /// The input's name.
        origin: String,
        /// serde_json's error (it gives line and column).
        source: serde_json::Error,
    },
    /// Another format version (or none): re-measured, never compared.
    #[error("fingerprint {origin}: format_version {found} is not the supported version {FORMAT_VERSION}; re-measure it")]
    Version {
        /// The input's name.
        origin: String,
        /// The `format_version` value as written, or `(missing)`.
        found: String,
    },
    /// The recorded digest is not the digest of the normalized table: corrupt or edited.
    #[error("fingerprint {origin}: digest {recorded} does not match its normalized table ({computed}); the file is corrupt")]
    Digest {
        /// The input's name.
        origin: String,
        /// The digest the file carries (`sha256:<hex>`).
        recorded: String,
        /// The digest of the file's normalized table.
        computed: String,
    },
    /// The normalized table or masks are not what normalizing the raw table gives.
    #[error("fingerprint {origin}: normalized table or masks are not those of its raw table; the file is corrupt")]
    Normalization {
        /// The input's name.
        origin: String,
    },
    /// A recognized dump form that does not parse.
    #[error("{origin}: {source}")]
    Dump {
        /// The input's name.
        origin: String,
        /// The parser's error.
        source: ViewError,
    },
    /// Text in none of the forms `cpuguard diff` accepts.
    #[error(
        "{origin}: neither a fingerprint JSON, a kvm-unit-tests CPUID dump, 'cpuid -r' output nor an aarch64 probe transcript"
    )]
    UnknownInput {
        /// The input's name.
        origin: String,
    },
    /// A fingerprint could not be written as JSON.
    #[error("cannot serialize fingerprint: {0}")]
    Serialize(serde_json::Error),
}

impl Fingerprint {
    /// Normalizes `raw` and digests the result.
    pub fn new(host: HostFacts, config: serde_json::Value, raw: impl Into<GuestView>) -> Self {
        let tables = Tables::of(raw.into());
        let digest = tables.digest();
        Fingerprint {
            format_version: FORMAT_VERSION,
            host,
            config,
            tables,
            digest,
            filtered: Vec::new(),
            user_mode: None,
        }
    }

    /// The architecture of the view it holds.
    pub fn arch(&self) -> Arch {
        self.tables.arch()
    }

    /// The raw view the guest saw (a copy).
    pub fn raw(&self) -> GuestView {
        self.tables.raw()
    }

    /// The raw CPUID table of an x86 fingerprint.
    pub fn x86_raw(&self) -> Option<&CpuidTable> {
        match &self.tables {
            Tables::X86 { raw, .. } => Some(raw),
            Tables::Aarch64 { .. } => None,
        }
    }

    /// Reads and checks a fingerprint file (see [`Fingerprint::from_json`]).
    pub fn load(path: &Path) -> Result<Self, FingerprintError> {
        let text = std::fs::read_to_string(path).map_err(|source| FingerprintError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses a fingerprint and refuses it when its format version is not [`FORMAT_VERSION`], its
    /// digest does not match, or its normalized table is not its raw table's normalization.
    /// `origin` names the input in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, FingerprintError> {
        let json_error = |source| FingerprintError::Json {
            origin: origin.to_string(),
            source,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(json_error)?;
        // The version is checked before the layout, so a foreign version is reported as such
        // rather than as whatever field it renamed.
        match value.get("format_version") {
            Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
            found => {
                return Err(FingerprintError::Version {
                    origin: origin.to_string(),
                    found: found.map_or_else(|| "(missing)".to_string(), |v| v.to_string()),
                })
            }
        }
        let fingerprint: Fingerprint = serde_json::from_value(value).map_err(json_error)?;
        fingerprint.verify(origin)?;
        Ok(fingerprint)
    }

    /// Checks the invariants [`Fingerprint::new`] establishes.
    pub fn verify(&self, origin: &str) -> Result<(), FingerprintError> {
        if self.format_version != FORMAT_VERSION {
            return Err(FingerprintError::Version {
                origin: origin.to_string(),
                found: self.format_version.to_string(),
            });
        }
        let computed = self.tables.digest();
        if computed != self.digest {
            return Err(FingerprintError::Digest {
                origin: origin.to_string(),
                recorded: self.digest.clone(),
                computed,
            });
        }
        if !self.tables.is_consistent() {
            return Err(FingerprintError::Normalization {
                origin: origin.to_string(),
            });
        }
        Ok(())
    }

    /// The fingerprint as pretty-printed JSON, the form [`Fingerprint::from_json`] reads.
    pub fn to_json(&self) -> Result<String, FingerprintError> {
        serde_json::to_string_pretty(self).map_err(FingerprintError::Serialize)
    }
}

/// How A (source) differs from B (destination), as the guest would see it.
pub fn compare(a: &Fingerprint, b: &Fingerprint, features: &FeatureMap) -> ViewDiff {
    view_diff(&a.raw(), &b.raw(), features)
}

/// Which text form a dump came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpKind {
    /// An x86 CPUID dump in the format named (kvm-unit-tests or `cpuid -r`).
    X86(DumpFormat),
    /// The aarch64 probe's own output (what a stamp carries for an ARM guest).
    Aarch64Probe,
}

/// What an operator handed to `cpuguard diff`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A fingerprint JSON, checked like [`Fingerprint::from_json`].
    Fingerprint(Box<Fingerprint>),
    /// A bare table as JSON: `{"entries": [...], "msrs": [...]}` (x86) or `{"regs": [...]}`
    /// (aarch64).
    TableJson(GuestView),
    /// A text dump of a guest's CPUID or ID registers.
    Dump {
        /// Which text form it was.
        format: DumpKind,
        /// The view it holds (raw, not normalized).
        view: GuestView,
    },
}

impl Input {
    /// The raw view, whichever form it came in.
    pub fn raw(&self) -> GuestView {
        match self {
            Input::Fingerprint(f) => f.raw(),
            Input::TableJson(view) | Input::Dump { view, .. } => view.clone(),
        }
    }

    /// A fingerprint (host facts and configuration empty when the input was only a table).
    pub fn into_fingerprint(self) -> Fingerprint {
        match self {
            Input::Fingerprint(f) => *f,
            Input::TableJson(view) | Input::Dump { view, .. } => {
                Fingerprint::new(HostFacts::default(), serde_json::Value::Null, view)
            }
        }
    }
}

/// Recognizes a fingerprint JSON, a bare table JSON, a kvm-unit-tests dump, `cpuid -r` output or
/// an aarch64 probe transcript.
pub fn parse_input(text: &str, origin: &str) -> Result<Input, FingerprintError> {
    let json_error = |source| FingerprintError::Json {
        origin: origin.to_string(),
        source,
    };
    if text.trim_start().starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(text).map_err(json_error)?;
        if value.get("format_version").is_some() || value.get("digest").is_some() {
            return Fingerprint::from_json(text, origin).map(|f| Input::Fingerprint(Box::new(f)));
        }
        let mut view = if value.get("regs").is_some() {
            GuestView::Aarch64(serde_json::from_value(value).map_err(json_error)?)
        } else {
            GuestView::X86(serde_json::from_value(value).map_err(json_error)?)
        };
        view.canonicalize();
        return Ok(Input::TableJson(view));
    }
    let dump_error = |source: ViewError| FingerprintError::Dump {
        origin: origin.to_string(),
        source,
    };
    if crate::aarch64::probe::is_transcript(text) {
        let view = GuestView::parse_text(text).map_err(dump_error)?;
        return Ok(Input::Dump {
            format: DumpKind::Aarch64Probe,
            view,
        });
    }
    let format = detect_format(text).ok_or_else(|| FingerprintError::UnknownInput {
        origin: origin.to_string(),
    })?;
    let table = parse_dump_as(text, format).map_err(|e| dump_error(ViewError::X86(e)))?;
    Ok(Input::Dump {
        format: DumpKind::X86(format),
        view: GuestView::X86(table),
    })
}

/// Reads a file and recognizes it like [`parse_input`]; errors name the path.
pub fn load_input(path: &Path) -> Result<Input, FingerprintError> {
    let text = std::fs::read_to_string(path).map_err(|source| FingerprintError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_input(&text, &path.display().to_string())
}

/// `cpuguard diff A B`: loads both inputs (any form [`parse_input`] knows) and explains how A
/// (source) differs from B (destination).
pub fn diff_inputs(
    a: &Path,
    b: &Path,
    features: &FeatureMap,
) -> Result<ViewDiff, FingerprintError> {
    let a = load_input(a)?;
    let b = load_input(b)?;
    Ok(view_diff(&a.raw(), &b.raw(), features))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::table::{CpuidEntry, MsrEntry};

    fn raw() -> CpuidTable {
        let e = |leaf, subleaf, eax, ebx, ecx, edx| CpuidEntry {
            leaf,
            subleaf,
            eax,
            ebx,
            ecx,
            edx,
        };
        CpuidTable {
            entries: vec![
                e(0x1, 0, 0x000306c1, 0x05080800, 0xfffa3223, 0x178bfbff),
                e(0x0, 0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69),
                e(0x7, 0, 0, 0x7ab, 0, 0),
                e(0x4000_0010, 0, 0x0027ac40, 0x000f4240, 0, 0),
            ],
            msrs: vec![MsrEntry {
                index: 0x10a,
                value: 0x2b,
            }],
        }
    }

    fn host() -> HostFacts {
        HostFacts {
            hostname: "node1".into(),
            kernel_release: "6.1.0-18-amd64".into(),
            cpu_model_name: "Intel(R) Xeon(R) CPU E5-2640 v3 @ 2.60GHz".into(),
            microcode: "0x49".into(),
            qemu_version: "7.2.0".into(),
            accelerator: "tcg".into(),
        }
    }

    #[test]
    fn new_normalizes_and_digests_only_the_normalized_table() {
        let fp = Fingerprint::new(host(), serde_json::json!({"model": "Haswell-noTSX"}), raw());
        assert_eq!(fp.format_version, FORMAT_VERSION);
        assert!(fp.digest.starts_with("sha256:") && fp.digest.len() == 7 + 64);
        let Tables::X86 {
            raw: fp_raw,
            normalized,
            masks,
        } = &fp.tables
        else {
            panic!("x86 tables expected")
        };
        assert_eq!(fp.arch(), Arch::X86_64);
        assert_eq!(fp_raw.entries[0].leaf, 0, "raw is canonicalized");
        assert_eq!(normalized.get(1, 0).unwrap().ebx, 0x00080800);
        assert!(!masks.is_empty());
        // Another vCPU's APIC ID and another TSC frequency: same digest.
        let mut other = raw();
        other.entries[0].ebx = 0x00080800;
        other.entries[3].eax = 0x0027ac3d;
        let fp2 = Fingerprint::new(HostFacts::default(), serde_json::Value::Null, other);
        assert_eq!(fp.digest, fp2.digest);
        // A feature bit: different digest.
        let mut third = raw();
        third.entries[2].ebx = 0x7a9;
        assert_ne!(
            fp.digest,
            Fingerprint::new(host(), serde_json::Value::Null, third).digest
        );
    }

    #[test]
    fn json_round_trip_and_corruption_checks() {
        let fp = Fingerprint::new(host(), serde_json::json!({"model": "EPYC"}), raw());
        let json = fp.to_json().unwrap();
        assert_eq!(Fingerprint::from_json(&json, "fp.json").unwrap(), fp);

        let mut tampered = fp.clone();
        if let Tables::X86 { normalized, .. } = &mut tampered.tables {
            normalized.entries[2].ebx ^= 1;
        }
        let err = Fingerprint::from_json(&tampered.to_json().unwrap(), "fp.json").unwrap_err();
        assert!(matches!(err, FingerprintError::Digest { .. }), "{err}");
        assert!(err.to_string().contains("fp.json") && err.to_string().contains("corrupt"));

        // A consistent digest over a table that is not the raw table's normalization.
        tampered.digest = tampered.tables.digest();
        let err = Fingerprint::from_json(&tampered.to_json().unwrap(), "fp.json").unwrap_err();
        assert!(
            matches!(err, FingerprintError::Normalization { .. }),
            "{err}"
        );

        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["format_version"] = serde_json::json!(FORMAT_VERSION + 1);
        let err = Fingerprint::from_json(&value.to_string(), "fp.json").unwrap_err();
        assert!(matches!(err, FingerprintError::Version { .. }), "{err}");
        value.as_object_mut().unwrap().remove("format_version");
        let err = Fingerprint::from_json(&value.to_string(), "fp.json").unwrap_err();
        assert!(err.to_string().contains("(missing)"), "{err}");

        let err = Fingerprint::from_json("{not json", "fp.json").unwrap_err();
        assert!(matches!(err, FingerprintError::Json { .. }), "{err}");
        let err =
            Fingerprint::from_json(r#"{"format_version": 2, "raw": 3}"#, "fp.json").unwrap_err();
        assert!(matches!(err, FingerprintError::Json { .. }), "{err}");
    }

    #[test]
    fn inputs_of_every_kind_are_recognized() {
        let fp = Fingerprint::new(host(), serde_json::Value::Null, raw());
        let input = parse_input(&fp.to_json().unwrap(), "a").unwrap();
        assert!(matches!(input, Input::Fingerprint(_)));
        assert_eq!(input.raw(), fp.raw());

        let table_json = serde_json::to_string(&raw()).unwrap();
        let input = parse_input(&table_json, "b").unwrap();
        assert_eq!(input.raw(), fp.raw());
        assert_eq!(input.into_fingerprint().digest, fp.digest);

        let dump = crate::x86_64::dump::write_dump(&raw());
        let input = parse_input(&dump, "c").unwrap();
        assert!(matches!(
            input,
            Input::Dump {
                format: DumpKind::X86(DumpFormat::KvmUnitTests),
                ..
            }
        ));
        assert_eq!(input.raw(), fp.raw());

        let tool = "CPU 0:\n   0x00000000 0x00: eax=0x0000000d ebx=0x756e6547 ecx=0x6c65746e edx=0x49656e69\n";
        let input = parse_input(tool, "d").unwrap();
        assert!(matches!(
            input,
            Input::Dump {
                format: DumpKind::X86(DumpFormat::CpuidTool),
                ..
            }
        ));

        let err = parse_input("hello world\n", "e").unwrap_err();
        assert!(
            matches!(err, FingerprintError::UnknownInput { .. }),
            "{err}"
        );
        let err = parse_input("00000001 00000000: zz\n", "f").unwrap_err();
        assert!(err.to_string().starts_with("f: CPUID dump line 1"), "{err}");
    }

    #[test]
    fn diff_inputs_reads_files_and_compares() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.txt");
        let fp = Fingerprint::new(host(), serde_json::Value::Null, raw());
        std::fs::write(&a, fp.to_json().unwrap()).unwrap();
        let mut lacking = raw();
        lacking.entries[0].ecx &= !0x20; // leaf 1 (first entry before canonicalizing): vmx
        std::fs::write(&b, crate::x86_64::dump::write_dump(&lacking)).unwrap();
        let map = FeatureMap::parse(
            "<cpus><feature name='vmx'><cpuid eax_in='0x01' ecx='0x00000020'/></feature></cpus>",
            "map",
        )
        .unwrap();
        let d = diff_inputs(&a, &b, &map).unwrap();
        let ViewDiff::X86(x) = &d else {
            panic!("x86 diff expected: {d:?}")
        };
        assert_eq!(x.lost.len(), 1);
        assert_eq!(x.lost[0].name, "vmx");
        let same = diff_inputs(&a, &a, &map).unwrap();
        assert!(same.is_equivalent());
        let err = diff_inputs(&a, &dir.path().join("missing"), &map).unwrap_err();
        assert!(matches!(err, FingerprintError::Read { .. }), "{err}");
    }

    #[test]
    fn aarch64_inputs_and_fingerprints() {
        let mut regs: Vec<crate::aarch64::ArmIdReg> = crate::aarch64::sysregs::REGISTERS
            .iter()
            .map(|r| crate::aarch64::ArmIdReg {
                name: r.name.to_string(),
                value: Some(0x11),
            })
            .collect();
        regs[0].value = None;
        let table = crate::aarch64::ArmIdTable { regs };
        let fp = Fingerprint::new(host(), serde_json::Value::Null, table.clone());
        assert_eq!(fp.arch(), Arch::Aarch64);
        assert!(fp.x86_raw().is_none());
        let json = fp.to_json().unwrap();
        assert!(json.contains("\"arch\": \"aarch64\""), "{json}");
        assert_eq!(Fingerprint::from_json(&json, "arm.json").unwrap(), fp);

        let transcript = crate::aarch64::probe::write_transcript(&table);
        let input = parse_input(&transcript, "t").unwrap();
        assert!(matches!(
            input,
            Input::Dump {
                format: DumpKind::Aarch64Probe,
                ..
            }
        ));
        assert_eq!(input.into_fingerprint().digest, fp.digest);
        let bare = parse_input(&serde_json::to_string(&table).unwrap(), "j").unwrap();
        assert_eq!(bare.raw(), fp.raw());
        let err = parse_input(&transcript[..transcript.len() - 8], "cut").unwrap_err();
        assert!(
            err.to_string().starts_with("cut: aarch64 probe output"),
            "{err}"
        );

        // Comparing an aarch64 fingerprint with an x86 one is an architecture change.
        let x86 = Fingerprint::new(host(), serde_json::Value::Null, raw());
        let map = FeatureMap::parse(
            "<cpus><feature name='vmx'><cpuid eax_in='0x01' ecx='0x00000020'/></feature></cpus>",
            "map",
        )
        .unwrap();
        assert!(matches!(
            compare(&fp, &x86, &map),
            ViewDiff::Arch {
                a: Arch::Aarch64,
                b: Arch::X86_64
            }
        ));
    }

    #[test]
    fn cpuinfo_first_processor_facts() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 7763\nmicrocode\t: 0xa0011d1\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            cpuinfo_facts(text),
            ("AMD EPYC 7763".to_string(), "0xa0011d1".to_string())
        );
        assert_eq!(cpuinfo_facts(""), (String::new(), String::new()));
        let here = HostFacts::of_this_host("7.2.0", "tcg");
        assert_eq!(here.accelerator, "tcg");
        assert!(!here.kernel_release.is_empty());
    }
}
