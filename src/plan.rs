//! The fleet migration plan: which running VM can move to which candidate destination, before
//! moving anything.
//!
//! A source host's `cpuguard inventory` lists its domains with their stamps (what each guest
//! sees there) and canonical CPU configurations; each candidate destination's `cpuguard
//! fingerprint measure` bundle says what a guest with each configuration would see there. A cell
//! of the plan is the verdict the destination's hook would give: the stamp against the
//! destination's fingerprint for the VM's configuration, with the same diff and the default
//! policies (gained-only is a no-go). Comparisons are made once per distinct (stamp,
//! fingerprint) pair, so thousands of VMs on hundreds of hosts cost as many diffs as there are
//! CPU generations times configurations.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::baseline::{CpuMap, HostCpu, Report};
use crate::domain::document::DomainDocument;
use crate::domain::guest::GuestCpuConfig;
use crate::domain::metadata::Stamp;
use crate::matrix::{configuration_of, label, read_bounded, HostViews};
use crate::view::{diff, GuestView};
use crate::x86_64::FeatureMap;

/// The `format` every inventory carries, so another JSON file is refused by name.
pub const INVENTORY_FORMAT: &str = "cpuguard-inventory";
/// The inventory layout's version; only this version is read.
pub const INVENTORY_VERSION: u32 = 1;
const MAX_INVENTORY_BYTES: u64 = 256 * 1024 * 1024;

/// The stamp a running domain carries, as the inventory records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryStamp {
    /// The host that stamped the domain, as its stamp names it.
    pub host: Option<String>,
    /// When it was stamped, as the stamp writes it (`YYYY-MM-DDTHH:MM:SSZ`).
    pub time: Option<String>,
    /// `sha256:…` of the normalized table, as the stamping host computed it.
    pub digest: Option<String>,
    /// The source guest's raw view (kvm-unit-tests dump lines, or the aarch64 probe's output).
    pub table: String,
}

/// One domain of a source host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryDomain {
    /// The domain's name.
    pub name: String,
    /// The domain's UUID, as its XML gives it.
    pub uuid: Option<String>,
    /// True when the domain was running when the inventory was taken.
    pub running: bool,
    /// `Haswell-noTSX (custom), pc-i440fx-7.2/kvm, 2 vCPUs`.
    pub label: String,
    /// The canonical guest CPU configuration (what the cache key and bundles group by).
    pub config: GuestCpuConfig,
    /// None: not stamped (never started under cpuguard, or not running), or its stamp carries no
    /// table.
    pub stamp: Option<InventoryStamp>,
}

/// What `cpuguard inventory` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Always [`INVENTORY_FORMAT`].
    pub format: String,
    /// Always [`INVENTORY_VERSION`].
    pub version: u32,
    /// The source host's name; the plan names the host by it, and a destination with the same
    /// name is the VMs' own host.
    pub hostname: String,
    /// When the inventory was taken (`YYYY-MM-DDTHH:MM:SSZ`).
    pub taken_at: String,
    /// The source's CPU (host-model of its domain capabilities), for the plan's baseline;
    /// absent in inventories taken before cpuguard recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cpu: Option<HostCpu>,
    /// The domains read, sorted by name.
    pub domains: Vec<InventoryDomain>,
}

impl InventoryDomain {
    /// Reads one domain from its (live) XML.
    pub fn from_xml(xml: &str, running: bool) -> Result<InventoryDomain, String> {
        let doc = DomainDocument::parse(xml).map_err(|e| e.to_string())?;
        let name = doc.display_name("(unnamed)").to_string();
        let config = GuestCpuConfig::from_domain_xml(xml).map_err(|e| format!("{name}: {e}"))?;
        let stamp = doc.stamp.map(|s| Stamp::read(doc.slice(s))).and_then(|s| {
            s.table.clone().map(|table| InventoryStamp {
                host: s.host,
                time: s.time,
                digest: s.digest,
                table,
            })
        });
        Ok(InventoryDomain {
            label: label(&configuration(&config)),
            uuid: doc.uuid.clone(),
            name,
            running,
            config,
            stamp,
        })
    }
}

/// The configuration as a bundle's entries group by ([`configuration_of`] of a cache key).
pub fn configuration(config: &GuestCpuConfig) -> serde_json::Value {
    configuration_of(&serde_json::json!({ "config": config, "accel": config.accel }))
}

/// Why an inventory could not be read or a plan built.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// An inventory file could not be read, or is larger than 256 MiB.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The inventory file.
        path: PathBuf,
        /// The I/O error, or the size limit it exceeds.
        reason: String,
    },
    /// The file is not JSON, has no `"format": "cpuguard-inventory"`, or does not have an
    /// inventory's layout.
    #[error("{path}: not a cpuguard inventory: {reason}")]
    NotAnInventory {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An inventory of another version.
    #[error("{path}: inventory version {found}, this cpuguard reads version {INVENTORY_VERSION}")]
    Version {
        /// The inventory file.
        path: PathBuf,
        /// Its `version` (0 when absent).
        found: u64,
    },
    /// Two inventories, or two destination bundles, name the same host.
    #[error("{path}: host {host} was already given by {first}")]
    DuplicateHost {
        /// The second file naming the host.
        path: PathBuf,
        /// The hostname both carry.
        host: String,
        /// The first file naming it.
        first: PathBuf,
    },
    /// The command line named no inventory.
    #[error("no inventories given: name the files `cpuguard inventory` wrote on the source hosts")]
    NoInventories,
    /// The command line named no destination bundle.
    #[error("no destination bundles given: --to FILE (written by `cpuguard fingerprint measure` on each candidate)")]
    NoBundles,
}

/// Reads and checks an inventory file.
pub fn load_inventory(path: &Path) -> Result<Inventory, PlanError> {
    let text = read_bounded(path, MAX_INVENTORY_BYTES).map_err(|reason| PlanError::Read {
        path: path.to_path_buf(),
        reason,
    })?;
    let not = |reason: String| PlanError::NotAnInventory {
        path: path.to_path_buf(),
        reason,
    };
    #[derive(Deserialize)]
    struct Head {
        format: Option<String>,
        version: Option<u64>,
    }
    let head: Head = serde_json::from_str(&text).map_err(|e| not(e.to_string()))?;
    if head.format.as_deref() != Some(INVENTORY_FORMAT) {
        return Err(not(format!("no \"format\": \"{INVENTORY_FORMAT}\"")));
    }
    let version = head.version.unwrap_or(0);
    if version != u64::from(INVENTORY_VERSION) {
        return Err(PlanError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    serde_json::from_str(&text).map_err(|e| not(e.to_string()))
}

/// What a destination would say about one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The destination's hook would let the VM in: its guest CPU would not change.
    Go,
    /// The destination's hook would refuse the VM: its guest CPU would change (lost, gained or
    /// changed features; gained-only counts, as under the default policy).
    NoGo,
    /// The destination has not measured the VM's configuration.
    NotMeasured,
    /// The VM carries no (readable) stamp: the guard would refuse it.
    Unstamped,
    /// The destination is the VM's own host.
    Source,
}

impl Verdict {
    /// How the text plan writes it (`go`, `no-go`, `not measured`, `unstamped`, `source`).
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Go => "go",
            Verdict::NoGo => "no-go",
            Verdict::NotMeasured => "not measured",
            Verdict::Unstamped => "unstamped",
            Verdict::Source => "source",
        }
    }
}

/// One distinct comparison result, shared by every cell that has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The verdict every cell sharing this outcome has.
    pub verdict: Verdict,
    /// Features the guest would lose: libvirt's names (x86), `REGISTER.Field` (aarch64).
    pub lost: Vec<String>,
    /// Features the guest would gain, named like `lost`.
    pub gained: Vec<String>,
    /// Other differences (identification, cache geometry, leaves), one line each.
    pub changed: Vec<String>,
    /// One line: `lost avx2,avx512f; gained pku`, `not measured on hv-b`, …
    pub reason: String,
}

/// One destination's verdict on one VM: an index into [`Plan::outcomes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// The outcome's verdict, repeated so a reader needs no lookup for it.
    pub verdict: Verdict,
    /// The index of the outcome in [`Plan::outcomes`].
    pub outcome: u32,
}

/// One VM's row of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlan {
    /// The domain's name.
    pub name: String,
    /// The host whose inventory lists it.
    pub source_host: String,
    /// Its CPU configuration in one line (`Haswell-noTSX (custom), pc-i440fx-7.2/kvm, 2 vCPUs`).
    pub label: String,
    /// The digest its stamp carries (`sha256:…`); None when unstamped.
    pub stamp_digest: Option<String>,
    /// One per [`Plan::hosts`], in that order.
    pub cells: Vec<Cell>,
}

/// What one destination can take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSummary {
    /// The destination's hostname.
    pub host: String,
    /// VMs (not already on it) it can take.
    pub can_take: usize,
    /// VMs from other hosts it was asked about.
    pub of: usize,
    /// Of those, VMs whose configuration it has not measured.
    pub not_measured: usize,
}

/// VMs that cannot go everywhere, grouped by source host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// The host these VMs run on.
    pub source_host: String,
    /// The VMs of that host that some destination would refuse or cannot answer for.
    pub vms: Vec<String>,
    /// Features lost or gained on some destination, with how many of these VMs they block.
    pub blocking: BTreeMap<String, usize>,
    /// Hosts that have not measured some of these VMs' configurations.
    pub not_measured_on: Vec<String>,
    /// VMs without a stamp.
    pub unstamped: Vec<String>,
    /// The CPU these VMs could be restarted with to go anywhere: the baseline of the source and
    /// every destination, from the host CPUs the inventory and bundles carry (None: see
    /// `baseline_unavailable`).
    pub baseline: Option<Report>,
    /// Why `baseline` could not be computed here (a host CPU missing, no CPU map, …).
    pub baseline_unavailable: Option<String>,
    /// The command that computes the same baseline through libvirt on the hosts themselves.
    pub baseline_command: String,
}

/// The plan in numbers, and what blocks the VMs that cannot go everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// VMs in all inventories.
    pub vms: usize,
    /// VMs every destination (other than their own host) can take.
    pub go_anywhere: usize,
    /// VMs no destination (other than their own host) can take.
    pub go_nowhere: usize,
    /// One per destination, in [`Plan::hosts`] order.
    pub hosts: Vec<HostSummary>,
    /// VMs that cannot go everywhere, one group per source host, sorted by host.
    pub blocked: Vec<Blocked>,
}

/// What `cpuguard plan` answers: every inventoried VM against every candidate destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The JSON output's [`crate::report::SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Always `plan`.
    pub command: String,
    /// Destination hosts (bundle hostnames), sorted: the columns.
    pub hosts: Vec<String>,
    /// Each distinct outcome once; cells refer to them by index.
    pub outcomes: Vec<Outcome>,
    /// One row per VM, in inventory order.
    pub vms: Vec<VmPlan>,
    /// The totals and the blocked groups.
    pub summary: Summary,
}

/// Builds the plan of every inventory's VMs against every destination.
///
/// `cpu_map` (libvirt's `cpu_map/` directory) is read only when some VMs are blocked: it gives
/// the baseline CPU that would free them.
pub fn build(
    inventories: &[(PathBuf, Inventory)],
    destinations: &[(PathBuf, HostViews)],
    features: &FeatureMap,
    cpu_map: &Path,
) -> Result<Plan, PlanError> {
    if inventories.is_empty() {
        return Err(PlanError::NoInventories);
    }
    if destinations.is_empty() {
        return Err(PlanError::NoBundles);
    }
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    for (path, h) in destinations {
        if let Some(first) = seen.insert(&h.hostname, path) {
            return Err(PlanError::DuplicateHost {
                path: path.clone(),
                host: h.hostname.clone(),
                first: first.to_path_buf(),
            });
        }
    }
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    for (path, inv) in inventories {
        if let Some(first) = seen.insert(&inv.hostname, path) {
            return Err(PlanError::DuplicateHost {
                path: path.clone(),
                host: inv.hostname.clone(),
                first: first.to_path_buf(),
            });
        }
    }
    let mut order: Vec<usize> = (0..destinations.len()).collect();
    order.sort_by(|&a, &b| destinations[a].1.hostname.cmp(&destinations[b].1.hostname));
    let hosts: Vec<String> = order
        .iter()
        .map(|&i| destinations[i].1.hostname.clone())
        .collect();

    let mut interner = Interner::default();
    let source = interner.fixed(Verdict::Source, "the VM's own host".to_string());
    // Distinct stamps, parsed and digested once: table text -> (view, normalized digest).
    let mut stamps: HashMap<&str, Result<(GuestView, String), String>> = HashMap::new();
    // (stamp digest, destination digest) -> outcome.
    let mut compared: HashMap<(String, String), u32> = HashMap::new();
    let mut vms = Vec::new();
    for (_, inv) in inventories {
        for dom in &inv.domains {
            let config_text = configuration(&dom.config).to_string();
            let stamp = dom.stamp.as_ref().map(|s| {
                stamps
                    .entry(s.table.as_str())
                    .or_insert_with(|| {
                        GuestView::parse_text(&s.table)
                            .map(|v| {
                                let d = v.digest();
                                (v, d)
                            })
                            .map_err(|e| format!("unreadable stamp: {e}"))
                    })
                    .clone()
            });
            let mut cells = Vec::with_capacity(hosts.len());
            for &i in &order {
                let dest = &destinations[i].1;
                let cell = if dest.hostname == inv.hostname {
                    source
                } else {
                    match &stamp {
                        None => interner.fixed(
                            Verdict::Unstamped,
                            format!(
                                "no stamp: run `cpuguard stamp {}` on {}",
                                dom.name, inv.hostname
                            ),
                        ),
                        Some(Err(e)) => interner.fixed(Verdict::Unstamped, e.clone()),
                        Some(Ok((view, stamp_digest))) => match dest.views.get(&config_text) {
                            None => interner.fixed(
                                Verdict::NotMeasured,
                                format!(
                                    "run `cpuguard fingerprint measure` on {} with {}'s inventory",
                                    dest.hostname, inv.hostname
                                ),
                            ),
                            Some((digest, _, local)) => {
                                let key = (stamp_digest.clone(), digest.clone());
                                match compared.get(&key) {
                                    Some(&o) => interner.cell(o),
                                    None => {
                                        let o = if stamp_digest == digest {
                                            interner.fixed(
                                                Verdict::Go,
                                                "guest CPU identical".to_string(),
                                            )
                                        } else {
                                            interner.compare(view, local, features)
                                        };
                                        compared.insert(key, o.outcome);
                                        o
                                    }
                                }
                            }
                        },
                    }
                };
                cells.push(cell);
            }
            vms.push(VmPlan {
                name: dom.name.clone(),
                source_host: inv.hostname.clone(),
                label: dom.label.clone(),
                stamp_digest: dom.stamp.as_ref().and_then(|s| s.digest.clone()),
                cells,
            });
        }
    }
    let mut summary = summarize(&hosts, &vms, &interner.outcomes);
    add_baselines(&mut summary.blocked, inventories, destinations, cpu_map);
    Ok(Plan {
        schema_version: crate::report::SCHEMA_VERSION,
        command: "plan".to_string(),
        hosts,
        outcomes: interner.outcomes,
        vms,
        summary,
    })
}

#[derive(Default)]
struct Interner {
    outcomes: Vec<Outcome>,
    fixed: HashMap<(Verdict, String), u32>,
}

impl Interner {
    fn cell(&self, outcome: u32) -> Cell {
        Cell {
            verdict: self.outcomes[outcome as usize].verdict,
            outcome,
        }
    }

    fn push(&mut self, o: Outcome) -> Cell {
        let verdict = o.verdict;
        self.outcomes.push(o);
        Cell {
            verdict,
            outcome: (self.outcomes.len() - 1) as u32,
        }
    }

    /// An outcome without differences (go, not measured, unstamped, source), shared by reason.
    fn fixed(&mut self, verdict: Verdict, reason: String) -> Cell {
        if let Some(&o) = self.fixed.get(&(verdict, reason.clone())) {
            return self.cell(o);
        }
        let cell = self.push(Outcome {
            verdict,
            lost: Vec::new(),
            gained: Vec::new(),
            changed: Vec::new(),
            reason: reason.clone(),
        });
        self.fixed.insert((verdict, reason), cell.outcome);
        cell
    }

    fn compare(&mut self, stamp: &GuestView, local: &GuestView, features: &FeatureMap) -> Cell {
        let d = diff(stamp, local, features);
        if d.is_equivalent() {
            return self.fixed(Verdict::Go, "guest CPU identical".to_string());
        }
        let (lost, gained, changed) = (d.lost_names(), d.gained_names(), d.changed_lines());
        self.push(Outcome {
            verdict: Verdict::NoGo,
            reason: d.summary(),
            lost,
            gained,
            changed,
        })
    }
}

fn summarize(hosts: &[String], vms: &[VmPlan], outcomes: &[Outcome]) -> Summary {
    let mut host_summaries: Vec<HostSummary> = hosts
        .iter()
        .map(|h| HostSummary {
            host: h.clone(),
            can_take: 0,
            of: 0,
            not_measured: 0,
        })
        .collect();
    let mut go_anywhere = 0;
    let mut go_nowhere = 0;
    let mut blocked: BTreeMap<&str, Blocked> = BTreeMap::new();
    for vm in vms {
        let mut all = true;
        let mut any = false;
        for (cell, hs) in vm.cells.iter().zip(host_summaries.iter_mut()) {
            match cell.verdict {
                Verdict::Source => continue,
                Verdict::Go => {
                    hs.can_take += 1;
                    any = true;
                }
                Verdict::NotMeasured => {
                    hs.not_measured += 1;
                    all = false;
                }
                _ => all = false,
            }
            hs.of += 1;
        }
        if all {
            go_anywhere += 1;
            continue;
        }
        if !any {
            go_nowhere += 1;
        }
        let b = blocked.entry(&vm.source_host).or_insert_with(|| Blocked {
            source_host: vm.source_host.clone(),
            vms: Vec::new(),
            blocking: BTreeMap::new(),
            not_measured_on: Vec::new(),
            unstamped: Vec::new(),
            baseline: None,
            baseline_unavailable: None,
            baseline_command: baseline_command(&vm.source_host, hosts),
        });
        b.vms.push(vm.name.clone());
        let mut features: BTreeSet<&str> = BTreeSet::new();
        let mut unmeasured: BTreeSet<&str> = BTreeSet::new();
        for (cell, host) in vm.cells.iter().zip(hosts) {
            let o = &outcomes[cell.outcome as usize];
            match cell.verdict {
                Verdict::NoGo => {
                    features.extend(o.lost.iter().map(String::as_str));
                    features.extend(o.gained.iter().map(String::as_str));
                    if o.lost.is_empty() && o.gained.is_empty() {
                        features.extend(
                            o.changed
                                .iter()
                                .map(|c| c.split(" (").next().unwrap_or(c.as_str())),
                        );
                    }
                }
                Verdict::NotMeasured => {
                    unmeasured.insert(host);
                }
                Verdict::Unstamped if b.unstamped.last() != Some(&vm.name) => {
                    b.unstamped.push(vm.name.clone());
                }
                _ => {}
            }
        }
        for f in features {
            *b.blocking.entry(f.to_string()).or_insert(0) += 1;
        }
        for h in unmeasured {
            if !b.not_measured_on.iter().any(|x| x == h) {
                b.not_measured_on.push(h.to_string());
            }
        }
    }
    Summary {
        vms: vms.len(),
        go_anywhere,
        go_nowhere,
        hosts: host_summaries,
        blocked: blocked.into_values().collect(),
    }
}

/// Each blocked group's baseline (its source and every destination), offline: from the host
/// CPUs its inventory and the bundles carry and libvirt's CPU map, with `cpuguard baseline`'s
/// own computation. Groups over the same hosts share one computation.
fn add_baselines(
    blocked: &mut [Blocked],
    inventories: &[(PathBuf, Inventory)],
    destinations: &[(PathBuf, HostViews)],
    cpu_map: &Path,
) {
    if blocked.is_empty() {
        return;
    }
    let mut cpus: BTreeMap<&str, &HostCpu> = BTreeMap::new();
    for (_, d) in destinations {
        if let Some(cpu) = &d.host_cpu {
            cpus.insert(&d.hostname, cpu);
        }
    }
    for (_, inv) in inventories {
        if let Some(cpu) = &inv.host_cpu {
            cpus.insert(&inv.hostname, cpu);
        }
    }
    let map = CpuMap::load(cpu_map).map_err(|e| {
        format!("{e} (libvirt's CPU map: install libvirt there or give --cpu-map DIR)")
    });
    let mut sorted: Vec<&str> = destinations
        .iter()
        .map(|(_, d)| d.hostname.as_str())
        .collect();
    sorted.sort_unstable();
    let mut done: HashMap<Vec<String>, Result<Report, String>> = HashMap::new();
    for b in blocked.iter_mut() {
        let mut names: Vec<String> = vec![b.source_host.clone()];
        names.extend(
            sorted
                .iter()
                .filter(|h| **h != b.source_host)
                .map(|h| h.to_string()),
        );
        let result = done
            .entry(names.clone())
            .or_insert_with(|| {
                let missing: Vec<&str> = names
                    .iter()
                    .map(String::as_str)
                    .filter(|h| !cpus.contains_key(h))
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "no host CPU for {} (an inventory or bundle written before cpuguard recorded it, \
                         or without libvirt: take it again, or export with --host-cpu FILE)",
                        missing.join(", ")
                    ));
                }
                let map = map.as_ref().map_err(Clone::clone)?;
                let hosts: Vec<HostCpu> = names
                    .iter()
                    .filter_map(|h| cpus.get(h.as_str()).map(|c| HostCpu {
                        origin: h.clone(),
                        ..(*c).clone()
                    }))
                    .collect();
                crate::baseline::compute_offline(&hosts, map).map_err(|e| e.to_string())
            })
            .clone();
        match result {
            Ok(report) => b.baseline = Some(report),
            Err(why) => b.baseline_unavailable = Some(why),
        }
    }
}

/// `cpuguard baseline qemu+ssh://SRC/system qemu+ssh://DST1/system …`: the same baseline
/// computed by libvirt on the hosts themselves.
fn baseline_command(source: &str, hosts: &[String]) -> String {
    let mut all: Vec<&str> = vec![source];
    all.extend(hosts.iter().map(String::as_str).filter(|h| *h != source));
    let uris: Vec<String> = all
        .iter()
        .map(|h| format!("qemu+ssh://{h}/system"))
        .collect();
    format!("cpuguard baseline {}", uris.join(" "))
}

impl Plan {
    /// True when every VM can go to every destination.
    pub fn all_go(&self) -> bool {
        self.summary.go_anywhere == self.summary.vms
    }

    fn outcome(&self, cell: &Cell) -> &Outcome {
        &self.outcomes[cell.outcome as usize]
    }

    /// Per VM each destination's verdict and reason, then the summary; `verbose` adds each
    /// baseline's `<cpu>` element and what every host's VMs give up for it.
    pub fn to_text(&self, verbose: bool) -> String {
        let mut out = String::with_capacity(40 * self.vms.len() * (self.hosts.len() + 1));
        for vm in &self.vms {
            out.push_str(&format!(
                "{} (on {}, {})\n",
                vm.name, vm.source_host, vm.label
            ));
            // Pieces pushed one by one: 400,000 cells would otherwise be as many allocations.
            for (cell, host) in vm.cells.iter().zip(&self.hosts) {
                if cell.verdict == Verdict::Source {
                    continue;
                }
                out.push_str("  ");
                out.push_str(host);
                out.push_str(": ");
                out.push_str(cell.verdict.word());
                if cell.verdict != Verdict::Go {
                    out.push_str(": ");
                    out.push_str(&self.outcome(cell).reason);
                }
                out.push('\n');
            }
        }
        let s = &self.summary;
        out.push_str(&format!(
            "\nsummary: {} of {} VMs can go to every destination, {} to none\n",
            s.go_anywhere, s.vms, s.go_nowhere
        ));
        for h in s.hosts.iter().filter(|h| h.of > 0) {
            out.push_str(&format!(
                "  {} can take {} of {} VMs",
                h.host, h.can_take, h.of
            ));
            if h.not_measured > 0 {
                out.push_str(&format!(" ({} not measured)", h.not_measured));
            }
            out.push('\n');
        }
        for b in &s.blocked {
            out.push_str(&format!(
                "  blocked on {} ({} VMs): {}\n",
                b.source_host,
                b.vms.len(),
                b.vms.join(", ")
            ));
            if !b.blocking.is_empty() {
                let list: Vec<String> = b
                    .blocking
                    .iter()
                    .map(|(f, n)| format!("{f} ({n})"))
                    .collect();
                out.push_str(&format!("    blocked by: {}\n", list.join(", ")));
            }
            if !b.not_measured_on.is_empty() {
                out.push_str(&format!(
                    "    not measured on: {} (run `cpuguard fingerprint measure` there with {}'s inventory)\n",
                    b.not_measured_on.join(", "),
                    b.source_host
                ));
            }
            if !b.unstamped.is_empty() {
                out.push_str(&format!(
                    "    unstamped: {} (run `cpuguard stamp --all` on {})\n",
                    b.unstamped.join(", "),
                    b.source_host
                ));
            }
            match (&b.baseline, &b.baseline_unavailable) {
                (Some(report), _) => {
                    out.push_str(&format!(
                        "    the CPU that frees them after a restart: {}\n",
                        compact_cpu(&report.cpu)
                    ));
                    let costs: Vec<String> = report
                        .hosts
                        .iter()
                        .filter(|h| !h.gives_up.is_empty())
                        .map(|h| format!("{} {}", h.origin, h.gives_up.len()))
                        .collect();
                    if costs.is_empty() {
                        out.push_str("      no host's VMs give up a feature for it\n");
                    } else {
                        out.push_str(&format!(
                            "      features given up, per host: {}\n",
                            costs.join(", ")
                        ));
                    }
                    if verbose {
                        for h in report.hosts.iter().filter(|h| !h.gives_up.is_empty()) {
                            out.push_str(&format!(
                                "      {} gives up: {}\n",
                                h.origin,
                                h.gives_up.join(" ")
                            ));
                        }
                        for line in report.cpu_xml.lines() {
                            out.push_str("      ");
                            out.push_str(line);
                            out.push('\n');
                        }
                    }
                }
                (None, why) => {
                    out.push_str(&format!(
                        "    the CPU that frees them after a restart: not computed here ({}); libvirt computes it: {}\n",
                        why.as_deref().unwrap_or("unknown reason"),
                        b.baseline_command
                    ));
                }
            }
        }
        out
    }

    /// One self-contained page: the VM × host grid coloured go/no-go with the reasons, then the
    /// summary. No scripts, no external resources.
    pub fn to_html(&self) -> String {
        let mut out = String::with_capacity(256 * (self.vms.len() + 1) * (self.hosts.len() + 1));
        out.push_str(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>cpuguard migration plan</title><style>\n\
             body{font-family:sans-serif;margin:1em}\
             table{border-collapse:collapse}\
             th,td{border:1px solid #888;padding:2px 6px;font-size:13px;vertical-align:top}\
             td.go{background:#7fd67f}td.no-go{background:#f08080}\
             td.not-measured{background:#f0e080}td.unstamped{background:#d0a0f0}\
             td.source{background:#ddd;color:#666}\
             td small{display:block;max-width:22em}\
             </style></head><body>\n<h1>cpuguard migration plan</h1>\n",
        );
        let s = &self.summary;
        out.push_str(&format!(
            "<p id=\"summary\">{} of {} VMs can go to every destination; {} to none.</p>\n",
            s.go_anywhere, s.vms, s.go_nowhere
        ));
        out.push_str(
            "<table id=\"grid\"><thead><tr><th>VM</th><th>source</th><th>configuration</th>",
        );
        for h in &self.hosts {
            out.push_str(&format!("<th>{}</th>", esc(h)));
        }
        out.push_str("</tr></thead><tbody>\n");
        for vm in &self.vms {
            out.push_str(&format!(
                "<tr><th>{}</th><td>{}</td><td>{}</td>",
                esc(&vm.name),
                esc(&vm.source_host),
                esc(&vm.label)
            ));
            for (cell, host) in vm.cells.iter().zip(&self.hosts) {
                let o = self.outcome(cell);
                let class = match cell.verdict {
                    Verdict::Go => "go",
                    Verdict::NoGo => "no-go",
                    Verdict::NotMeasured => "not-measured",
                    Verdict::Unstamped => "unstamped",
                    Verdict::Source => "source",
                };
                let detail = match cell.verdict {
                    Verdict::Go | Verdict::Source => String::new(),
                    _ => format!("<small>{}</small>", esc(&o.reason)),
                };
                out.push_str(&format!(
                    "<td class=\"{class}\" title=\"{} to {}: {}\">{}{detail}</td>",
                    esc(&vm.name),
                    esc(host),
                    esc(&o.reason),
                    cell.verdict.word()
                ));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody></table>\n<h2>Destinations</h2><ul id=\"hosts\">\n");
        for h in s.hosts.iter().filter(|h| h.of > 0) {
            out.push_str(&format!(
                "<li>{} can take {} of {} VMs{}</li>\n",
                esc(&h.host),
                h.can_take,
                h.of,
                if h.not_measured > 0 {
                    format!(" ({} not measured)", h.not_measured)
                } else {
                    String::new()
                }
            ));
        }
        out.push_str("</ul>\n<h2>Blocked VMs</h2><ul id=\"blocked\">\n");
        for b in &s.blocked {
            let list: Vec<String> = b
                .blocking
                .iter()
                .map(|(f, n)| format!("{f} ({n})"))
                .collect();
            let cpu = match (&b.baseline, &b.baseline_unavailable) {
                (Some(report), _) => {
                    let costs: Vec<String> = report
                        .hosts
                        .iter()
                        .map(|h| {
                            if h.gives_up.is_empty() {
                                format!("{}: nothing", h.origin)
                            } else {
                                format!("{}: {}", h.origin, h.gives_up.join(" "))
                            }
                        })
                        .collect();
                    format!(
                        "<code class=\"baseline\">{}</code><pre class=\"baseline-xml\">{}</pre>what each host's VMs give up: {}",
                        esc(&compact_cpu(&report.cpu)),
                        esc(&report.cpu_xml),
                        esc(&costs.join("; "))
                    )
                }
                (None, why) => format!(
                    "not computed here ({}); libvirt computes it: <code>{}</code>",
                    esc(why.as_deref().unwrap_or("unknown reason")),
                    esc(&b.baseline_command)
                ),
            };
            out.push_str(&format!(
                "<li>on {}: {}<br>blocked by: {}<br>the CPU that frees them after a restart: {cpu}</li>\n",
                esc(&b.source_host),
                esc(&b.vms.join(", ")),
                esc(&list.join(", ")),
            ));
        }
        out.push_str("</ul>\n</body></html>\n");
        out
    }
}

/// `Haswell-noTSX +pcid +spec-ctrl -avx2 -invtsc`: the model, then required and disabled features.
fn compact_cpu(cpu: &crate::baseline::CpuDef) -> String {
    let mut out = cpu
        .model
        .clone()
        .unwrap_or_else(|| "(no model)".to_string());
    for f in &cpu.required {
        out.push_str(" +");
        out.push_str(f);
    }
    for f in &cpu.disabled {
        out.push_str(" -");
        out.push_str(f);
    }
    out
}

/// HTML text and attribute escaping.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_names_and_baseline_lists_source_first() {
        assert_eq!(esc("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        assert_eq!(
            baseline_command("hv-a", &["hv-b".into(), "hv-a".into()]),
            "cpuguard baseline qemu+ssh://hv-a/system qemu+ssh://hv-b/system"
        );
    }

    #[test]
    fn compact_cpu_lists_required_then_disabled() {
        let cpu = crate::baseline::CpuDef {
            model: Some("Haswell-noTSX".into()),
            vendor: None,
            required: vec!["pcid".into()],
            disabled: vec!["avx2".into(), "invtsc".into()],
        };
        assert_eq!(compact_cpu(&cpu), "Haswell-noTSX +pcid -avx2 -invtsc");
    }

    #[test]
    fn inventory_domain_reads_config_and_stamp() {
        let xml = "<domain type='qemu'><name>web1</name><uuid>06c0c0dc-1080-4d3f-bdac-967d624c94f9</uuid>\
                   <vcpu>2</vcpu><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>\
                   <metadata><cg:stamp xmlns:cg='http://cpuguard.dev/xmlns/stamp/1' version='1' host='hv-a' time='t' digest='sha256:00'>\
                   <cpu mode='custom'><model>Haswell-noTSX</model></cpu><table>\n00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n</table></cg:stamp></metadata>\
                   <cpu mode='custom' match='exact'><model fallback='forbid'>Haswell-noTSX</model></cpu></domain>";
        let d = InventoryDomain::from_xml(xml, true).expect("domain");
        assert_eq!(d.name, "web1");
        assert_eq!(
            d.label,
            "Haswell-noTSX (custom), pc-i440fx-7.2/tcg, 2 vCPUs"
        );
        let s = d.stamp.expect("stamp");
        assert_eq!(s.host.as_deref(), Some("hv-a"));
        assert!(s.table.contains("756e6547"));
        assert!(InventoryDomain::from_xml("<domain>", true).is_err());
    }
}
