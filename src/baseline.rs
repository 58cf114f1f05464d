//! `cpuguard baseline`: the CPU to give new VMs so that they can run, and live-migrate, on every
//! host of a pool.
//!
//! Each host contributes the CPU libvirt would give a `host-model` guest there (from `virsh
//! domcapabilities`, live through a URI or saved to a file) or its host CPU (`virsh capabilities`
//! or a bare `<cpu>` element, the form of libvirt's `tests/cputestdata/*-host.xml`). libvirt's
//! hypervisor baseline (`virConnectBaselineHypervisorCPU`, migratable) computes the common CPU,
//! restricted to what the computing hypervisor can provide: run it against a host of the pool.
//! Features that block migration (`invtsc`, seed 000) are then disabled explicitly.
//!
//! What each host's VMs give up is computed here from libvirt's CPU map (model features, plus
//! required, minus disabled), not by libvirt: libvirt's own expansion would again be limited to
//! the computing hypervisor and understate an old host's cost.
//!
//! Parsing and the cost computation are pure; only [`LibvirtBaseline`] and [`host_from_uri`]
//! talk to libvirt, and only `cpuguard-libvirt` calls them.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::arch::Arch;
use crate::domain::tree::Element;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virt::connect::Connect;
use virt::sys;

/// Features that make QEMU refuse to migrate a guest (`invtsc`: the TSC frequency of another host
/// cannot be guaranteed). Always disabled in a baseline.
pub const MIGRATION_BLOCKERS: &[&str] = &["invtsc"];

/// libvirt's CPU map on Debian and Fedora/RHEL.
pub const DEFAULT_CPU_MAP: &str = "/usr/share/libvirt/cpu_map";

/// Larger inputs are not capabilities documents (this host's domcapabilities: ~10 KiB).
const MAX_INPUT_BYTES: u64 = 8 * 1024 * 1024;

/// Why `cpuguard baseline` (or `cpuguard plan`'s offline baseline) could not answer. Each
/// variant prints as one line naming the input (`origin`: the URI or file a host came from).
#[derive(Debug, Error)]
pub enum BaselineError {
    /// The command line named no host.
    #[error("no hosts given: name libvirt URIs or saved `virsh domcapabilities` files")]
    NoHosts,
    /// A saved capabilities file could not be read, or is larger than 8 MiB.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file named on the command line.
        path: PathBuf,
        /// The I/O error, or the size limit it exceeds.
        reason: String,
    },
    /// A host's document is not XML cpuguard accepts (a DOCTYPE is refused too).
    #[error("{origin}: not well-formed XML: {reason}")]
    Xml {
        /// The URI or file the document came from.
        origin: String,
        /// The parser's error.
        reason: String,
    },
    /// The document is none of the three forms that carry a host CPU.
    #[error("{origin}: no host CPU in it (expected `virsh domcapabilities`, `virsh capabilities` or a <cpu> element, found <{root}>)")]
    NoHostCpu {
        /// The URI or file the document came from.
        origin: String,
        /// The name of the document's root element.
        root: String,
    },
    /// The domain capabilities mark `host-model` as `supported='no'`.
    #[error("{origin}: libvirt does not support a host-model CPU there")]
    HostModelUnsupported {
        /// The URI or file the domain capabilities came from.
        origin: String,
    },
    /// The host's CPU names no model, so its features cannot be expanded from the CPU map.
    #[error("{origin}: the CPU has no <model>")]
    NoModel {
        /// The URI or file the CPU came from.
        origin: String,
    },
    /// The document has no `<arch>` (or an empty one) for the host's CPU.
    #[error("{origin}: no architecture (<arch>) in it")]
    NoArch {
        /// The URI or file the document came from.
        origin: String,
    },
    /// Two hosts of the pool have different architectures.
    #[error(
        "{origin}: architecture {found}, but {first} is {expected}: a pool mixes no architectures"
    )]
    WrongArch {
        /// The host whose architecture differs.
        origin: String,
        /// That host's architecture (libvirt's name, e.g. `aarch64`).
        found: String,
        /// The first host given, whose architecture the pool must share.
        first: String,
        /// The first host's architecture.
        expected: String,
    },
    /// The pool is not x86 (`x86_64` or `i686`): libvirt's CPU map baseline is x86-only here.
    #[error("{origin}: architecture {found}: cpuguard baselines x86 CPUs only")]
    NotX86 {
        /// The first host given.
        origin: String,
        /// Its architecture.
        found: String,
    },
    /// A CPU names a model the CPU map does not define (e.g. one written by a newer libvirt).
    #[error("{origin}: CPU model {model} is not in libvirt's CPU map {map}")]
    UnknownModel {
        /// The URI or file the CPU came from, or `baseline from …` for libvirt's answer.
        origin: String,
        /// The model name as written in the `<cpu>`.
        model: String,
        /// The CPU map directory searched.
        map: String,
    },
    /// Two hosts have CPUs of different vendors (Intel and AMD): no guest CPU runs on both.
    #[error("{origin}: CPU vendor {found}, but {first} is {expected}: CPU vendors do not match")]
    VendorMismatch {
        /// The host whose vendor differs.
        origin: String,
        /// Its vendor (`Intel`, `AMD`, …, as libvirt writes it).
        found: String,
        /// The first host that named a vendor.
        first: String,
        /// That host's vendor.
        expected: String,
    },
    /// libvirt's CPU map could not be read, has no x86 model, or has no guest model for the
    /// hosts' vendor.
    #[error("CPU map {path}: {reason}")]
    CpuMap {
        /// The CPU map directory or the model file in it.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No libvirt connection could be opened.
    #[error("cannot connect to {uri}: {reason}")]
    Connect {
        /// The libvirt URI.
        uri: String,
        /// libvirt's error, on one line.
        reason: String,
    },
    /// A libvirt call on an open connection failed.
    #[error("{uri}: {what}: {reason}")]
    Libvirt {
        /// The libvirt URI of the connection.
        uri: String,
        /// The call or argument that failed (`domain capabilities`, `baseline`, …).
        what: String,
        /// libvirt's error, on one line.
        reason: String,
    },
}

/// A CPU definition as libvirt writes it: model, vendor, feature policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuDef {
    /// The `<model>` name from libvirt's CPU map (e.g. `Skylake-Server-IBRS`); None when absent.
    pub model: Option<String>,
    /// The `<vendor>` (`Intel`, `AMD`, …); None when the element names none.
    pub vendor: Option<String>,
    /// `policy='require'` (or a host CPU's plain `<feature>`), sorted.
    pub required: Vec<String>,
    /// `policy='disable'`, sorted.
    pub disabled: Vec<String>,
}

impl CpuDef {
    /// The `<cpu>` element to paste into a domain: exact, no fallback to another model.
    pub fn to_domain_xml(&self) -> String {
        let mut out = String::from("<cpu mode='custom' match='exact' check='full'>\n");
        if let Some(model) = &self.model {
            out.push_str(&format!(
                "  <model fallback='forbid'>{}</model>\n",
                escape(model)
            ));
        }
        if let Some(vendor) = &self.vendor {
            out.push_str(&format!("  <vendor>{}</vendor>\n", escape(vendor)));
        }
        for (policy, names) in [("require", &self.required), ("disable", &self.disabled)] {
            for name in names {
                out.push_str(&format!(
                    "  <feature policy='{policy}' name='{}'/>\n",
                    escape(name)
                ));
            }
        }
        out.push_str("</cpu>\n");
        out
    }

    /// Disables every [`MIGRATION_BLOCKERS`] feature; returns those it had to change or add.
    pub fn disable_migration_blockers(&mut self) -> Vec<String> {
        let mut changed = Vec::new();
        for blocker in MIGRATION_BLOCKERS {
            let name = blocker.to_string();
            self.required.retain(|f| f != blocker);
            if !self.disabled.contains(&name) {
                self.disabled.push(name.clone());
                self.disabled.sort();
                changed.push(name);
            }
        }
        changed
    }
}

/// Where a host's CPU was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostSource {
    /// The host-model CPU of `virsh domcapabilities`.
    DomainCapabilities,
    /// The host CPU of `virsh capabilities`.
    Capabilities,
    /// A bare host `<cpu>` element with its `<arch>`.
    HostCpu,
}

/// One host of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// The URI or file it came from.
    pub origin: String,
    /// Which of the three document forms it was read from.
    pub source: HostSource,
    /// libvirt's architecture name (`x86_64`, `i686`, `aarch64`, …).
    pub arch: String,
    /// The host's CPU as the document gives it (a host CPU's plain `<feature>`s are required).
    pub cpu: CpuDef,
}

impl HostCpu {
    /// The `<cpu>` element handed to libvirt: a host CPU keeps its host form; a host-model CPU is
    /// passed the way `virsh hypervisor-cpu-baseline` passes domain capabilities (attributes
    /// dropped, feature policies kept, so that `disable` still removes a model's feature).
    pub fn libvirt_xml(&self) -> String {
        let mut out = String::from("<cpu>\n");
        match self.source {
            HostSource::DomainCapabilities => {
                if let Some(model) = &self.cpu.model {
                    out.push_str(&format!(
                        "  <model fallback='forbid'>{}</model>\n",
                        escape(model)
                    ));
                }
                if let Some(vendor) = &self.cpu.vendor {
                    out.push_str(&format!("  <vendor>{}</vendor>\n", escape(vendor)));
                }
                for (policy, names) in [
                    ("require", &self.cpu.required),
                    ("disable", &self.cpu.disabled),
                ] {
                    for name in names {
                        out.push_str(&format!(
                            "  <feature policy='{policy}' name='{}'/>\n",
                            escape(name)
                        ));
                    }
                }
            }
            HostSource::Capabilities | HostSource::HostCpu => {
                out.push_str(&format!("  <arch>{}</arch>\n", escape(&self.arch)));
                if let Some(model) = &self.cpu.model {
                    out.push_str(&format!("  <model>{}</model>\n", escape(model)));
                }
                if let Some(vendor) = &self.cpu.vendor {
                    out.push_str(&format!("  <vendor>{}</vendor>\n", escape(vendor)));
                }
                for name in &self.cpu.required {
                    out.push_str(&format!("  <feature name='{}'/>\n", escape(name)));
                }
            }
        }
        out.push_str("</cpu>\n");
        out
    }
}

fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// Parses without DTD processing: a DOCTYPE is refused (these files may come from other hosts).
fn parse_tree(xml: &str) -> Result<Element, String> {
    crate::domain::tree::parse_tree(xml).map_err(|e| e.to_string())
}

fn cpu_def(element: &Element, with_policies: bool) -> CpuDef {
    let mut required = BTreeSet::new();
    let mut disabled = BTreeSet::new();
    for feature in element.children_named("feature") {
        let Some(name) = feature.attr("name") else {
            continue;
        };
        match feature.attr("policy") {
            Some("disable") | Some("forbid") if with_policies => {
                disabled.insert(name.to_string());
            }
            Some("optional") if with_policies => {}
            _ => {
                required.insert(name.to_string());
            }
        }
    }
    let text = |name: &str| {
        element
            .child(name)
            .map(|e| e.text.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    CpuDef {
        model: text("model"),
        vendor: text("vendor"),
        required: required.into_iter().collect(),
        disabled: disabled.into_iter().collect(),
    }
}

/// Reads one host's CPU from `virsh domcapabilities`, `virsh capabilities` or a host `<cpu>`.
pub fn parse_host(xml: &str, origin: &str) -> Result<HostCpu, BaselineError> {
    let root = parse_tree(xml).map_err(|reason| BaselineError::Xml {
        origin: origin.to_string(),
        reason,
    })?;
    let no_arch = || BaselineError::NoArch {
        origin: origin.to_string(),
    };
    let (source, arch, cpu) = match root.name.as_str() {
        "domainCapabilities" => {
            let mode = root
                .child("cpu")
                .and_then(|cpu| {
                    cpu.children_named("mode")
                        .find(|m| m.attr("name") == Some("host-model"))
                })
                .ok_or_else(|| BaselineError::NoHostCpu {
                    origin: origin.to_string(),
                    root: root.name.clone(),
                })?;
            if mode.attr("supported") == Some("no") {
                return Err(BaselineError::HostModelUnsupported {
                    origin: origin.to_string(),
                });
            }
            let arch = root.child("arch").map(|a| a.text.trim().to_string());
            (HostSource::DomainCapabilities, arch, cpu_def(mode, true))
        }
        "capabilities" => {
            let cpu = root
                .child("host")
                .and_then(|h| h.child("cpu"))
                .ok_or_else(|| BaselineError::NoHostCpu {
                    origin: origin.to_string(),
                    root: root.name.clone(),
                })?;
            let arch = cpu.child("arch").map(|a| a.text.trim().to_string());
            (HostSource::Capabilities, arch, cpu_def(cpu, false))
        }
        "cpu" => {
            let arch = root.child("arch").map(|a| a.text.trim().to_string());
            (HostSource::HostCpu, arch, cpu_def(&root, true))
        }
        other => {
            return Err(BaselineError::NoHostCpu {
                origin: origin.to_string(),
                root: other.to_string(),
            })
        }
    };
    let arch = arch.filter(|a| !a.is_empty()).ok_or_else(no_arch)?;
    if cpu.model.is_none() {
        return Err(BaselineError::NoModel {
            origin: origin.to_string(),
        });
    }
    Ok(HostCpu {
        origin: origin.to_string(),
        source,
        arch,
        cpu,
    })
}

/// Reads a saved capabilities file.
pub fn host_from_file(path: &Path) -> Result<HostCpu, BaselineError> {
    use std::io::Read;
    let read_error = |reason: String| BaselineError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| read_error(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_INPUT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| read_error(e.to_string()))?;
    if text.len() as u64 > MAX_INPUT_BYTES {
        return Err(read_error(format!("larger than {MAX_INPUT_BYTES} bytes")));
    }
    parse_host(&text, &path.display().to_string())
}

/// True when a command-line host names a libvirt URI rather than a file.
pub fn is_uri(arg: &str) -> bool {
    arg.contains(":///") || arg.contains("://")
}

/// Checks that every host has the first host's architecture, and that it is x86.
pub fn common_arch(hosts: &[HostCpu]) -> Result<String, BaselineError> {
    let first = hosts.first().ok_or(BaselineError::NoHosts)?;
    for host in hosts {
        if host.arch != first.arch {
            return Err(BaselineError::WrongArch {
                origin: host.origin.clone(),
                found: host.arch.clone(),
                first: first.origin.clone(),
                expected: first.arch.clone(),
            });
        }
    }
    // Host architectures come from capabilities and may be any libvirt knows: only x86 ones
    // have a cpu_map to baseline against.
    match Arch::from_name(&first.arch) {
        Some(Arch::X86_64 | Arch::I686) => Ok(first.arch.clone()),
        Some(Arch::Aarch64) | None => Err(BaselineError::NotX86 {
            origin: first.origin.clone(),
            found: first.arch.clone(),
        }),
    }
}

/// libvirt's x86 CPU models: each model's feature names.
#[derive(Debug, Clone, Default)]
pub struct CpuMap {
    dir: PathBuf,
    models: BTreeMap<String, BTreeSet<String>>,
    /// Each model's `<vendor name=…/>` (generic models such as qemu64 have none).
    vendors: BTreeMap<String, String>,
    /// Models libvirt never gives a guest (`<decode guest='off'/>`): host-only descriptions.
    host_only: BTreeSet<String>,
    /// Features of `x86_features.xml` marked `migratable='no'`.
    non_migratable: BTreeSet<String>,
    /// Every feature `x86_features.xml` names (a domain may name no other).
    known: BTreeSet<String>,
}

impl CpuMap {
    /// Reads every `x86_*.xml` model file of `dir` (libvirt's `cpu_map/`).
    pub fn load(dir: &Path) -> Result<CpuMap, BaselineError> {
        let map_error = |reason: String| BaselineError::CpuMap {
            path: dir.to_path_buf(),
            reason,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| map_error(e.to_string()))?;
        let mut map = CpuMap {
            dir: dir.to_path_buf(),
            ..CpuMap::default()
        };
        let mut parents = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| map_error(e.to_string()))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.starts_with("x86_") || !name.ends_with(".xml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| BaselineError::CpuMap {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let root = parse_tree(&text).map_err(|reason| BaselineError::CpuMap {
                path: path.clone(),
                reason,
            })?;
            for feature in root.children_named("feature") {
                if let Some(name) = feature.attr("name") {
                    map.known.insert(name.to_string());
                    if feature.attr("migratable") == Some("no") {
                        map.non_migratable.insert(name.to_string());
                    }
                }
            }
            for model in root.children_named("model") {
                let Some(model_name) = model.attr("name") else {
                    continue;
                };
                if let Some(vendor) = model.child("vendor").and_then(|v| v.attr("name")) {
                    map.vendors
                        .insert(model_name.to_string(), vendor.to_string());
                }
                if model.child("decode").and_then(|d| d.attr("guest")) == Some("off") {
                    map.host_only.insert(model_name.to_string());
                }
                let features = model
                    .children_named("feature")
                    .filter_map(|f| f.attr("name").map(str::to_string))
                    .collect();
                // A model may start from another (`<model name='parent'/>` inside it).
                if let Some(parent) = model.children_named("model").find_map(|m| m.attr("name")) {
                    parents.push((model_name.to_string(), parent.to_string()));
                }
                map.models.insert(model_name.to_string(), features);
            }
        }
        if map.models.is_empty() {
            return Err(map_error("no x86 CPU models in it".to_string()));
        }
        for (model, parent) in parents {
            let inherited = map.models.get(&parent).cloned().unwrap_or_default();
            if let Some(features) = map.models.get_mut(&model) {
                features.extend(inherited);
            }
            if let Some(vendor) = map.vendors.get(&parent).cloned() {
                map.vendors.entry(model).or_insert(vendor);
            }
        }
        Ok(map)
    }

    /// The directory it was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The migratable CPU every host can run, computed from the map alone (no hypervisor): the
    /// features all hosts give a guest, non-migratable ones left out, expressed as the guest
    /// model of the hosts' vendor that needs the fewest feature changes (then the fewest
    /// disabled; then by name, so the answer is stable), as libvirt's x86 baseline chooses.
    pub fn baseline(&self, hosts: &[HostCpu]) -> Result<CpuDef, BaselineError> {
        common_arch(hosts)?;
        let mut vendor: Option<(&str, &str)> = None;
        let mut common: Option<BTreeSet<String>> = None;
        // A fleet has few distinct CPUs: each is expanded and intersected once.
        let mut seen: Vec<&CpuDef> = Vec::new();
        for host in hosts {
            let first_time = !seen.contains(&&host.cpu);
            if first_time {
                seen.push(&host.cpu);
            }
            let own = if first_time {
                self.expand(&host.cpu, &host.origin)?
            } else {
                BTreeSet::new()
            };
            let host_vendor = host.cpu.vendor.as_deref().or_else(|| {
                host.cpu
                    .model
                    .as_ref()
                    .and_then(|m| self.vendors.get(m))
                    .map(String::as_str)
            });
            if let Some(found) = host_vendor {
                match vendor {
                    Some((first, expected)) if expected != found => {
                        return Err(BaselineError::VendorMismatch {
                            origin: host.origin.clone(),
                            found: found.to_string(),
                            first: first.to_string(),
                            expected: expected.to_string(),
                        })
                    }
                    Some(_) => {}
                    None => vendor = Some((&host.origin, found)),
                }
            }
            if first_time {
                common = Some(match common {
                    None => own,
                    Some(c) => c.intersection(&own).cloned().collect(),
                });
            }
        }
        let mut common = common.ok_or(BaselineError::NoHosts)?;
        // Features the map does not name (a host CPU saved by another libvirt) cannot be put
        // in a domain; non-migratable ones would block the migrations the baseline is for.
        common.retain(|f| {
            (self.known.is_empty() || self.known.contains(f))
                && !self.non_migratable.contains(f)
                && !MIGRATION_BLOCKERS.contains(&f.as_str())
        });
        let vendor = vendor.map(|(_, v)| v);
        let best = self
            .models
            .iter()
            .filter(|(name, _)| !self.host_only.contains(*name))
            .filter_map(|(name, features)| {
                let own_vendor = self.vendors.get(name).map(String::as_str);
                if own_vendor.is_some() && vendor.is_some() && own_vendor != vendor {
                    return None;
                }
                let required = common.difference(features).count();
                let disabled = features.difference(&common).count();
                Some((
                    (required + disabled, disabled, own_vendor.is_none()),
                    name,
                    features,
                ))
            })
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let (_, model, features) = best.ok_or_else(|| BaselineError::CpuMap {
            path: self.dir.clone(),
            reason: format!(
                "no guest CPU model for vendor {}",
                vendor.unwrap_or("(none)")
            ),
        })?;
        Ok(CpuDef {
            model: Some(model.clone()),
            vendor: None,
            required: common.difference(features).cloned().collect(),
            disabled: features.difference(&common).cloned().collect(),
        })
    }

    /// Every feature a CPU definition gives a guest: its model's, plus required, minus disabled.
    pub fn expand(&self, cpu: &CpuDef, origin: &str) -> Result<BTreeSet<String>, BaselineError> {
        let model = cpu.model.as_deref().ok_or_else(|| BaselineError::NoModel {
            origin: origin.to_string(),
        })?;
        let mut features =
            self.models
                .get(model)
                .cloned()
                .ok_or_else(|| BaselineError::UnknownModel {
                    origin: origin.to_string(),
                    model: model.to_string(),
                    map: self.dir.display().to_string(),
                })?;
        features.extend(cpu.required.iter().cloned());
        for f in &cpu.disabled {
            features.remove(f);
        }
        Ok(features)
    }
}

/// Parses the `<cpu>` libvirt returns from a baseline.
pub fn parse_cpu(xml: &str, origin: &str) -> Result<CpuDef, BaselineError> {
    let root = parse_tree(xml).map_err(|reason| BaselineError::Xml {
        origin: origin.to_string(),
        reason,
    })?;
    if root.name != "cpu" {
        return Err(BaselineError::NoHostCpu {
            origin: origin.to_string(),
            root: root.name,
        });
    }
    Ok(cpu_def(&root, true))
}

/// What one host's VMs give up when they get the baseline instead of the host's own CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCost {
    /// The URI or file the host came from.
    pub origin: String,
    /// Which document form the host's CPU was read from.
    pub source: HostSource,
    /// The host CPU's model name.
    pub model: Option<String>,
    /// Features of the host's CPU that the baseline lacks (migration blockers aside), sorted.
    pub gives_up: Vec<String>,
}

/// The answer of `cpuguard baseline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The pool's architecture (`x86_64` or `i686`).
    pub arch: String,
    /// The hypervisor URI that computed the baseline (its CPU models and features bound the
    /// result), or `libvirt's CPU map DIR` when [`compute_offline`] computed it.
    pub hypervisor: String,
    /// The baseline CPU, migration blockers disabled.
    pub cpu: CpuDef,
    /// The `<cpu>` element to paste into a domain.
    pub cpu_xml: String,
    /// Migration blockers this command disabled on top of libvirt's answer.
    pub blockers_disabled: Vec<String>,
    /// Each host's cost, in the order the hosts were given.
    pub hosts: Vec<HostCost>,
}

impl Report {
    /// The element to paste, preceded by an XML comment with each host's cost, so the whole
    /// output can still be pasted.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "<!-- cpuguard baseline of {} hosts ({}), computed by {}\n",
            self.hosts.len(),
            self.arch,
            comment_safe(&self.hypervisor)
        );
        for host in &self.hosts {
            let model = host.model.as_deref().unwrap_or("?");
            if host.gives_up.is_empty() {
                out.push_str(&format!(
                    "     {} ({}): gives up nothing\n",
                    comment_safe(&host.origin),
                    comment_safe(model)
                ));
            } else {
                out.push_str(&format!(
                    "     {} ({}): gives up {}: {}\n",
                    comment_safe(&host.origin),
                    comment_safe(model),
                    host.gives_up.len(),
                    comment_safe(&host.gives_up.join(" "))
                ));
            }
        }
        out.push_str(&format!(
            "     disabled as migration blockers: {} -->\n",
            MIGRATION_BLOCKERS.join(" ")
        ));
        out.push_str(&self.cpu_xml);
        out
    }
}

/// `--` may not appear inside an XML comment.
fn comment_safe(s: &str) -> String {
    s.replace("--", "- -")
}

/// Computes the baseline: libvirt's common CPU, migration blockers disabled, and each host's
/// cost against its own CPU. `baseline` is libvirt's hypervisor baseline over the hosts'
/// [`HostCpu::libvirt_xml`].
pub fn compute(
    hosts: &[HostCpu],
    hypervisor: &str,
    map: &CpuMap,
    baseline: impl FnOnce(&str, &[String]) -> Result<String, BaselineError>,
) -> Result<Report, BaselineError> {
    let arch = common_arch(hosts)?;
    let xmls: Vec<String> = hosts.iter().map(HostCpu::libvirt_xml).collect();
    let answer = baseline(&arch, &xmls)?;
    let mut cpu = parse_cpu(&answer, &format!("baseline from {hypervisor}"))?;
    let blockers_disabled = cpu.disable_migration_blockers();
    let common = map.expand(&cpu, &format!("baseline from {hypervisor}"))?;
    let mut costs = Vec::new();
    // Hosts of one generation share a CPU: its cost is computed once.
    let mut known: Vec<(&CpuDef, Vec<String>)> = Vec::new();
    for host in hosts {
        let gives_up = match known.iter().find(|(cpu, _)| *cpu == &host.cpu) {
            Some((_, cost)) => cost.clone(),
            None => {
                let own = map.expand(&host.cpu, &host.origin)?;
                let cost: Vec<String> = own
                    .difference(&common)
                    .filter(|f| !MIGRATION_BLOCKERS.contains(&f.as_str()))
                    .cloned()
                    .collect();
                known.push((&host.cpu, cost.clone()));
                cost
            }
        };
        costs.push(HostCost {
            origin: host.origin.clone(),
            source: host.source,
            model: host.cpu.model.clone(),
            gives_up,
        });
    }
    Ok(Report {
        arch,
        hypervisor: hypervisor.to_string(),
        cpu_xml: cpu.to_domain_xml(),
        cpu,
        blockers_disabled,
        hosts: costs,
    })
}

/// [`compute`] without a hypervisor: the common CPU from [`CpuMap::baseline`] (what `cpuguard
/// plan` gives, offline, from the host CPUs the bundles carry).
pub fn compute_offline(hosts: &[HostCpu], map: &CpuMap) -> Result<Report, BaselineError> {
    let by = format!("libvirt's CPU map {}", map.dir.display());
    compute(hosts, &by, map, |_, _| {
        map.baseline(hosts).map(|cpu| cpu.to_domain_xml())
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Opens a libvirt connection with a one-line error naming the URI.
pub fn connect(uri: &str) -> Result<Connect, BaselineError> {
    // The embedded QEMU driver (`qemu:///embed?root=DIR`, used by the tests: no daemon needed)
    // refuses to open without an event loop; registering one costs nothing for other URIs.
    static EVENT_LOOP: std::sync::Once = std::sync::Once::new();
    EVENT_LOOP.call_once(|| {
        let _ = virt::event::event_register_default_impl();
        // Errors are returned and reported once, as one line; libvirt's default handler would
        // print them to stderr a second time.
        virt::error::clear_error_callback();
    });
    Connect::open(Some(uri)).map_err(|e| BaselineError::Connect {
        uri: uri.to_string(),
        reason: one_line(&e.to_string()),
    })
}

/// A host's CPU from its live domain capabilities.
pub fn host_from_uri(uri: &str, virttype: Option<&str>) -> Result<HostCpu, BaselineError> {
    let conn = connect(uri)?;
    let xml = conn
        .domain_capabilities(None, None, None, virttype, 0)
        .map_err(|e| BaselineError::Libvirt {
            uri: uri.to_string(),
            what: "domain capabilities".to_string(),
            reason: one_line(&e.to_string()),
        });
    drop(conn);
    parse_host(&xml?, uri)
}

/// libvirt's hypervisor baseline through one connection.
pub struct LibvirtBaseline {
    conn: Connect,
    /// The libvirt URI it is connected to; errors name it.
    pub uri: String,
    /// `kvm` or `qemu` (TCG); libvirt's default when None.
    pub virttype: Option<String>,
}

impl LibvirtBaseline {
    /// Connects to `uri`; `virttype` (`kvm`, `qemu`) is passed to every baseline.
    pub fn open(uri: &str, virttype: Option<&str>) -> Result<Self, BaselineError> {
        Ok(LibvirtBaseline {
            conn: connect(uri)?,
            uri: uri.to_string(),
            virttype: virttype.map(str::to_string),
        })
    }

    /// `virConnectBaselineHypervisorCPU(..., VIR_CONNECT_BASELINE_CPU_MIGRATABLE)`, which the
    /// `virt` crate does not wrap.
    pub fn baseline(&self, arch: &str, cpus: &[String]) -> Result<String, BaselineError> {
        let libvirt_error = |what: &str, reason: String| BaselineError::Libvirt {
            uri: self.uri.clone(),
            what: what.to_string(),
            reason,
        };
        let to_c = |what: &str, s: &str| {
            CString::new(s).map_err(|_| libvirt_error(what, "contains a NUL byte".to_string()))
        };
        let arch_c = to_c("architecture", arch)?;
        let virttype_c = self
            .virttype
            .as_deref()
            .map(|v| to_c("virttype", v))
            .transpose()?;
        let cpu_cs = cpus
            .iter()
            .map(|c| to_c("CPU definition", c))
            .collect::<Result<Vec<_>, _>>()?;
        let mut cpu_ptrs: Vec<*const std::os::raw::c_char> =
            cpu_cs.iter().map(|c| c.as_ptr()).collect();
        let ncpus = u32::try_from(cpu_ptrs.len())
            .map_err(|_| libvirt_error("baseline", "too many CPUs".to_string()))?;
        // SAFETY: the connection pointer is valid while `self.conn` lives (it is only closed on
        // drop). Every string pointer comes from a CString (`arch_c`, `virttype_c`, `cpu_cs`)
        // that outlives the call; `cpu_ptrs` holds `ncpus` of them and libvirt only reads it.
        // Null emulator and machine ask for libvirt's defaults, as documented. The result is a
        // malloc'ed string owned by the caller, copied and then released with free() below.
        let answer = unsafe {
            let ptr = sys::virConnectBaselineHypervisorCPU(
                self.conn.as_ptr(),
                std::ptr::null(),
                arch_c.as_ptr(),
                std::ptr::null(),
                virttype_c.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                cpu_ptrs.as_mut_ptr(),
                ncpus,
                sys::VIR_CONNECT_BASELINE_CPU_MIGRATABLE,
            );
            if ptr.is_null() {
                None
            } else {
                let text = std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned();
                nix::libc::free(ptr.cast());
                Some(text)
            }
        };
        answer.ok_or_else(|| {
            libvirt_error(
                "baseline",
                one_line(&virt::error::Error::last_error().to_string()),
            )
        })
    }
}

/// `cpuguard baseline`: reads every host (URI or file), computes through `hypervisor` and
/// returns the text to print (the report, or its JSON with `json`).
pub fn run(
    hosts: &[String],
    hypervisor: &str,
    virttype: Option<&str>,
    cpu_map: &Path,
    json: bool,
) -> Result<String, BaselineError> {
    if hosts.is_empty() {
        return Err(BaselineError::NoHosts);
    }
    let map = CpuMap::load(cpu_map)?;
    let hosts = hosts
        .iter()
        .map(|h| {
            if is_uri(h) {
                host_from_uri(h, virttype)
            } else {
                host_from_file(Path::new(h))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    common_arch(&hosts)?;
    let libvirt = LibvirtBaseline::open(hypervisor, virttype)?;
    let report = compute(&hosts, hypervisor, &map, |arch, cpus| {
        libvirt.baseline(arch, cpus)
    })?;
    if json {
        serde_json::to_string_pretty(&report)
            .map(|t| t + "\n")
            .map_err(|e| BaselineError::Libvirt {
                uri: hypervisor.to_string(),
                what: "report".to_string(),
                reason: e.to_string(),
            })
    } else {
        Ok(report.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMCAPS: &str = "<domainCapabilities><arch>x86_64</arch><cpu>\
        <mode name='host-passthrough' supported='yes'/>\
        <mode name='host-model' supported='yes'><model fallback='forbid'>EPYC-Milan</model>\
        <vendor>AMD</vendor><feature policy='require' name='x2apic'/>\
        <feature policy='require' name='invtsc'/><feature policy='disable' name='pni'/></mode>\
        </cpu></domainCapabilities>";

    #[test]
    fn domain_capabilities_give_the_host_model() {
        let host = parse_host(DOMCAPS, "a.xml").expect("parse");
        assert_eq!(host.source, HostSource::DomainCapabilities);
        assert_eq!(host.arch, "x86_64");
        assert_eq!(host.cpu.model.as_deref(), Some("EPYC-Milan"));
        assert_eq!(host.cpu.required, vec!["invtsc", "x2apic"]);
        assert_eq!(host.cpu.disabled, vec!["pni"]);
        let xml = host.libvirt_xml();
        assert!(
            xml.contains("<feature policy='disable' name='pni'/>"),
            "{xml}"
        );
        assert!(!xml.contains("host-model"), "{xml}");
    }

    #[test]
    fn capabilities_and_bare_cpu_give_the_host_cpu() {
        let caps = "<capabilities><host><uuid>x</uuid><cpu><arch>x86_64</arch>\
            <model>Haswell-noTSX</model><vendor>Intel</vendor><feature name='vmx'/></cpu>\
            </host></capabilities>";
        let host = parse_host(caps, "caps.xml").expect("caps");
        assert_eq!(host.source, HostSource::Capabilities);
        assert_eq!(host.cpu.required, vec!["vmx"]);
        assert!(host.libvirt_xml().contains("<arch>x86_64</arch>"));
        let bare = "<cpu><arch>x86_64</arch><model>core2duo</model><feature name='ds'/></cpu>";
        assert_eq!(
            parse_host(bare, "b").expect("bare").source,
            HostSource::HostCpu
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = parse_host("<domain/>", "d.xml").expect_err("domain");
        assert!(e.to_string().starts_with("d.xml: no host CPU"), "{e}");
        let e = parse_host("<cpu><model>X</model></cpu>", "n.xml").expect_err("arch");
        assert!(matches!(e, BaselineError::NoArch { .. }), "{e}");
        let unsupported = DOMCAPS.replace(
            "name='host-model' supported='yes'",
            "name='host-model' supported='no'",
        );
        assert!(matches!(
            parse_host(&unsupported, "u"),
            Err(BaselineError::HostModelUnsupported { .. })
        ));
        let e = parse_host("<cpu><arch>x", "t.xml").expect_err("truncated");
        assert!(
            e.to_string().starts_with("t.xml: not well-formed XML"),
            "{e}"
        );
        let e = parse_host("<!DOCTYPE cpu [<!ENTITY a 'b'>]><cpu/>", "e").expect_err("dtd");
        assert!(e.to_string().contains("DOCTYPE"), "{e}");
    }

    #[test]
    fn architectures_must_agree_and_be_x86() {
        let a = parse_host(DOMCAPS, "a").expect("a");
        let mut b = a.clone();
        b.origin = "b".into();
        b.arch = "aarch64".into();
        let e = common_arch(&[a.clone(), b.clone()]).expect_err("mixed");
        assert_eq!(
            e.to_string(),
            "b: architecture aarch64, but a is x86_64: a pool mixes no architectures"
        );
        assert!(matches!(
            common_arch(&[b]),
            Err(BaselineError::NotX86 { .. })
        ));
        assert!(matches!(common_arch(&[]), Err(BaselineError::NoHosts)));
        assert_eq!(common_arch(&[a]).expect("one"), "x86_64");
    }

    #[test]
    fn blockers_are_disabled_once() {
        let mut cpu = CpuDef {
            model: Some("M".into()),
            vendor: None,
            required: vec!["invtsc".into(), "vmx".into()],
            disabled: vec![],
        };
        assert_eq!(cpu.disable_migration_blockers(), vec!["invtsc"]);
        assert_eq!(cpu.required, vec!["vmx"]);
        assert!(cpu.disable_migration_blockers().is_empty());
        let xml = cpu.to_domain_xml();
        assert!(
            xml.contains("<feature policy='disable' name='invtsc'/>"),
            "{xml}"
        );
        assert!(xml.starts_with("<cpu mode='custom' match='exact' check='full'>"));
    }

    fn map() -> CpuMap {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("x86_Small.xml"),
            "<cpus><model name='Small'><feature name='sse2'/><feature name='pni'/></model>\
             <model name='Big'><model name='Small'/><feature name='avx'/></model></cpus>",
        )
        .expect("write");
        std::fs::write(dir.path().join("index.xml"), "<cpus/>").expect("write");
        CpuMap::load(dir.path()).expect("load")
    }

    #[test]
    fn cost_is_what_the_baseline_lacks() {
        let map = map();
        let big = HostCpu {
            origin: "big".into(),
            source: HostSource::HostCpu,
            arch: "x86_64".into(),
            cpu: CpuDef {
                model: Some("Big".into()),
                vendor: None,
                required: vec!["invtsc".into(), "vmx".into()],
                disabled: vec![],
            },
        };
        let mut small = big.clone();
        small.origin = "small".into();
        small.cpu.model = Some("Small".into());
        small.cpu.required = vec![];
        small.cpu.disabled = vec!["pni".into()];
        let mut seen = Vec::new();
        let report = compute(&[big, small], "test", &map, |arch, cpus| {
            seen.push((arch.to_string(), cpus.len()));
            Ok(
                "<cpu mode='custom'><model>Small</model><feature policy='disable' name='pni'/>\
                <feature policy='require' name='invtsc'/></cpu>"
                    .to_string(),
            )
        })
        .expect("compute");
        assert_eq!(seen, vec![("x86_64".to_string(), 2)]);
        assert_eq!(report.blockers_disabled, vec!["invtsc"]);
        assert_eq!(report.hosts[0].gives_up, vec!["avx", "pni", "vmx"]);
        assert!(report.hosts[1].gives_up.is_empty());
        let text = report.to_text();
        assert!(
            text.contains("big (Big): gives up 3: avx pni vmx"),
            "{text}"
        );
        assert!(text.contains("small (Small): gives up nothing"), "{text}");
        let unknown = HostCpu {
            cpu: CpuDef {
                model: Some("Nope".into()),
                ..CpuDef::default()
            },
            ..report_host()
        };
        let e = map.expand(&unknown.cpu, "u").expect_err("unknown");
        assert!(
            e.to_string().starts_with("u: CPU model Nope is not in"),
            "{e}"
        );
    }

    #[test]
    fn offline_baseline_is_the_common_cpu_as_the_closest_guest_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("x86_features.xml"),
            "<cpus><feature name='sse2'/><feature name='pni'/><feature name='avx'/>\
             <feature name='vmx'/><feature name='invtsc' migratable='no'/></cpus>",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("x86_models.xml"),
            "<cpus><model name='Small'><vendor name='Intel'/><feature name='sse2'/>\
             <feature name='pni'/></model>\
             <model name='Big'><model name='Small'/><feature name='avx'/></model>\
             <model name='HostOnly'><decode host='on' guest='off'/><vendor name='Intel'/>\
             <feature name='sse2'/><feature name='pni'/><feature name='vmx'/></model>\
             <model name='Opteron'><vendor name='AMD'/><feature name='sse2'/></model></cpus>",
        )
        .expect("write");
        let map = CpuMap::load(dir.path()).expect("load");
        let host = |origin: &str, model: &str, required: &[&str]| HostCpu {
            origin: origin.into(),
            source: HostSource::HostCpu,
            arch: "x86_64".into(),
            cpu: CpuDef {
                model: Some(model.into()),
                vendor: None,
                required: required.iter().map(|f| f.to_string()).collect(),
                disabled: vec![],
            },
        };
        // Both have vmx and invtsc; only one has avx. The host-only model is never chosen, and
        // the non-migratable invtsc is left out.
        let hosts = [
            host("a", "Big", &["vmx", "invtsc", "unknown-here"]),
            host("b", "Small", &["vmx", "invtsc", "unknown-here"]),
        ];
        let cpu = map.baseline(&hosts).expect("baseline");
        assert_eq!(cpu.model.as_deref(), Some("Small"));
        assert_eq!(cpu.required, vec!["vmx"]);
        assert!(cpu.disabled.is_empty());
        let report = compute_offline(&hosts, &map).expect("report");
        assert_eq!(report.cpu.disabled, vec!["invtsc"]);
        assert_eq!(report.hosts[0].gives_up, vec!["avx", "unknown-here"]);
        assert!(report.hypervisor.starts_with("libvirt's CPU map "));
        // Intel and AMD share no model.
        let e = map
            .baseline(&[host("a", "Big", &[]), host("o", "Opteron", &[])])
            .expect_err("vendors");
        assert_eq!(
            e.to_string(),
            "o: CPU vendor AMD, but a is Intel: CPU vendors do not match"
        );
    }

    fn report_host() -> HostCpu {
        HostCpu {
            origin: "h".into(),
            source: HostSource::HostCpu,
            arch: "x86_64".into(),
            cpu: CpuDef::default(),
        }
    }
}
