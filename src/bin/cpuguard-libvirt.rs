//! `cpuguard-libvirt`: the only cpuguard program that links libvirt. `cpuguard stamp` runs it;
//! the `started` hook detaches it after every start.

// Shipped code fails with an error naming its input, never with a panic; unit tests (cfg(test))
// fail by panicking, so the rule stops there.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cpuguard::config::Config;
use cpuguard::fingerprint::Fingerprint;
use cpuguard::live_vcpu;
use cpuguard::stamp::{self, StampError};
use virt::domain::Domain;

#[derive(Parser, Debug)]
#[command(
    name = "cpuguard-libvirt",
    version,
    about = "cpuguard's libvirt client (stamping, inventory, baseline)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure this host's fingerprint for running domains and record it in their live metadata.
    #[command(
        after_help = "Examples: cpuguard stamp web1\n          cpuguard stamp --all\n\
                            A stamp of the running QEMU process is kept unless --force.\n\
                            Exit codes: 0 all stamped or kept, 1 some not stamped, 2 error."
    )]
    Stamp {
        /// Domain names.
        names: Vec<String>,
        /// Every running domain.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Re-measure even when the stamp already describes the running QEMU process.
        #[arg(long)]
        force: bool,
        /// Called by the `started` hook: wait for libvirt to finish the start job.
        #[arg(long, hide = true)]
        after_start: bool,
        /// libvirt connection URI (default: stamp.uri from the configuration).
        #[arg(long)]
        uri: Option<String>,
    },
    /// This host's running (or all) domains with their stamps and canonical CPU configurations,
    /// as one JSON bundle for `cpuguard fingerprint measure` and `cpuguard plan`.
    #[command(after_help = "Example: cpuguard inventory > $(hostname)-vms.json\n\
                            Exit codes: 0 written (unreadable domains are named on stderr), 2 error.")]
    Inventory {
        /// Every defined domain, not only the running ones (those have no stamp).
        #[arg(long)]
        all: bool,
        /// libvirt connection URI (default: stamp.uri from the configuration).
        #[arg(long)]
        uri: Option<String>,
        /// The name to record (default: this host's hostname).
        #[arg(long)]
        host: Option<String>,
    },
    /// This host's CPU as libvirt describes it (the host-model of its domain capabilities), as
    /// JSON for the bundle `cpuguard fingerprint export` writes.
    #[command(
        after_help = "Example: cpuguard-libvirt host-cpu --uri qemu:///system\n\
                            Exit codes: 0 printed, 2 error."
    )]
    HostCpu {
        /// libvirt connection URI (default: stamp.uri from the configuration).
        #[arg(long)]
        uri: Option<String>,
        /// Virtualization type: kvm or qemu (TCG); libvirt's default when absent.
        #[arg(long)]
        virttype: Option<String>,
    },
    /// The CPU to give new VMs so they can live on every listed host (libvirt's migratable
    /// hypervisor baseline of the hosts' host-model CPUs, migration blockers disabled), and what
    /// each host's VMs give up against the host's own CPU.
    #[command(
        after_help = "Example: cpuguard baseline qemu+ssh://hv-old-01/system hv-new-01-domcaps.xml\n\
                      HOST is a libvirt URI (its domain capabilities are read) or a file saved with \
                      `virsh domcapabilities`, `virsh capabilities`, or a host <cpu>.\n\
                      The baseline is bounded by what the --hypervisor can run: use a host of the pool.\n\
                      Exit codes: 0 baseline printed, 2 error (unreachable URI, unreadable file, \
                      mixed architectures, no hosts)."
    )]
    Baseline {
        /// libvirt URIs or saved capabilities files, one per host.
        hosts: Vec<String>,
        /// The libvirt connection that computes the baseline (default: stamp.uri).
        #[arg(long)]
        hypervisor: Option<String>,
        /// Virtualization type for domain capabilities and the baseline: kvm or qemu (TCG).
        #[arg(long)]
        virttype: Option<String>,
        /// libvirt's CPU map directory, for what each host gives up.
        #[arg(long, default_value = cpuguard::baseline::DEFAULT_CPU_MAP)]
        cpu_map: std::path::PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The live-vCPU cross-check of a stamp (issue 11): the running guest's first vCPU, read through
/// libvirt's QEMU monitor passthrough, must agree with what the probe measured. Only this
/// program talks to the monitor; the comparison is the library's.
fn live_vcpu_check(dom: &Domain, name: &str, probe: &Fingerprint) -> Result<(), StampError> {
    let mut monitor = |command: &str| {
        dom.qemu_monitor_command(command, 0).map_err(|e| {
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
    };
    let live = live_vcpu::read(&mut monitor).map_err(|reason| StampError::LiveVcpuUnreadable {
        name: name.to_string(),
        reason,
    })?;
    let mut check = live_vcpu::compare(&live, probe, None);
    if check.agrees() {
        if !check.words_compared {
            cpuguard::audit::Record::new(cpuguard::audit::Severity::Warning, "stamp", "live-vcpu")
                .field("domain", name)
                .field(
                    "reason",
                    "feature words not compared: guest applications on this host read other \
                     CPUID values than the guest kernel (policy.user_mode_cpuid), so guests do not \
                     see what QEMU configures; vendor, family/model/stepping, model-id and levels \
                     agree",
                )
                .emit();
        }
        return Ok(());
    }
    // Name the bits only now: loading libvirt's feature map costs more than the check.
    if let Ok(features) = cpuguard::x86_64::features::FeatureMap::load_default() {
        check = live_vcpu::compare(&live, probe, Some(&features));
    }
    let mut differences = check.differences;
    differences.extend(check.notes);
    Err(StampError::LiveVcpu {
        name: name.to_string(),
        differences,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cpuguard: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Inventory { all, uri, host } => {
            let uri = uri.unwrap_or_else(|| config.stamp.uri.clone());
            let host = host.unwrap_or_else(cpuguard::matrix::this_hostname);
            match cpuguard::inventory::take(&uri, all, &host) {
                Ok((inventory, warnings)) => {
                    for w in &warnings {
                        eprintln!("cpuguard: {w}");
                    }
                    match serde_json::to_string_pretty(&inventory) {
                        Ok(text) => {
                            println!("{text}");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("cpuguard: inventory: {e}");
                            ExitCode::from(2)
                        }
                    }
                }
                Err(e) => {
                    eprintln!("cpuguard: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::HostCpu { uri, virttype } => {
            let uri = uri.unwrap_or_else(|| config.stamp.uri.clone());
            let cpu = cpuguard::baseline::host_from_uri(&uri, virttype.as_deref())
                .map_err(|e| e.to_string())
                .and_then(|cpu| serde_json::to_string(&cpu).map_err(|e| e.to_string()));
            match cpu {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cpuguard: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Baseline {
            hosts,
            hypervisor,
            virttype,
            cpu_map,
            json,
        } => {
            let hypervisor = hypervisor.unwrap_or_else(|| config.stamp.uri.clone());
            match cpuguard::baseline::run(&hosts, &hypervisor, virttype.as_deref(), &cpu_map, json)
            {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cpuguard: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Stamp {
            names,
            all,
            force,
            after_start,
            uri,
        } => {
            if let Some(uri) = uri {
                config.stamp.uri = uri;
            }
            if after_start {
                let mut worst = 0;
                for name in &names {
                    let result = stamp::stamp_after_start(name, &config, &live_vcpu_check);
                    // No stamp rather than a stale or copied one: the destination then refuses
                    // (policy.unstamped_source) instead of trusting it.
                    let removal = result.is_err().then(|| stamp::remove_stamp(name, &config));
                    stamp::audit_after_start(name, &result, removal.as_ref());
                    if result.is_err() {
                        worst = 1;
                    }
                }
                return ExitCode::from(worst);
            }
            if names.is_empty() && !all {
                eprintln!("cpuguard: stamp needs domain names or --all");
                return ExitCode::from(2);
            }
            let conn = match stamp::connect(&config.stamp.uri) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cpuguard: {e}");
                    return ExitCode::from(2);
                }
            };
            let results = if all {
                match stamp::stamp_all(&conn, &config, force, &live_vcpu_check) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("cpuguard: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                names
                    .iter()
                    .map(|n| {
                        (
                            n.clone(),
                            stamp::stamp_domain(&conn, n, &config, force, &live_vcpu_check),
                        )
                    })
                    .collect()
            };
            let mut failed = false;
            for (name, r) in &results {
                match r {
                    Ok(s) => println!("{}", s.describe()),
                    Err(e) => {
                        failed = true;
                        eprintln!("cpuguard: not stamped: {e}");
                    }
                }
                // A running guest the probe cannot reproduce keeps no stamp (an earlier one
                // was made by the same probe): the destination then refuses it by default.
                if let Err(StampError::LiveVcpu { .. } | StampError::LiveVcpuUnreadable { .. }) = r
                {
                    let removal = stamp::remove_stamp(name, &config);
                    stamp::audit_with_removal(name, r, Some(&removal), "cli");
                    continue;
                }
                stamp::audit(name, r, "cli");
            }
            if results.is_empty() {
                println!("no running domains");
            }
            ExitCode::from(u8::from(failed))
        }
    }
}
