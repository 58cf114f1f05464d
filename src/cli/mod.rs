//! The operator CLI. Exit codes: 0 success (or "equivalent"/"go"), 1 a negative verdict,
//! 2 bad input or an error.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::cache::Cache;
use crate::config::Config;
use crate::domain::document;
use crate::domain::guest::{Accel, GuestCpuConfig};
use crate::guard::Decision;
use crate::hook::rewrite_cpu;
use crate::incoming::Origin;
use crate::measure;
use crate::x86_64::FeatureMap;

/// Exit status of a command that succeeded, or whose verdict is "go".
pub const EXIT_OK: i32 = 0;
/// Exit status for bad input or an error (including a command line clap refuses).
pub const EXIT_ERROR: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "cpuguard",
    version,
    about = "Refuses live migrations of KVM guests that would see a different CPU",
    after_help = "Installed as /etc/libvirt/hooks/qemu, cpuguard runs on every libvirt hook call.\n\
                  Exit codes: 0 success, 1 negative verdict, 2 error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run as libvirt's qemu hook: `cpuguard hook qemu OBJECT OPERATION SUBOP EXTRA < domain.xml`
    /// (what /etc/libvirt/hooks/qemu does).
    #[command(after_help = "Example: cpuguard hook qemu guest1 migrate begin - < guest1.xml")]
    Hook {
        /// Always `qemu`, then OBJECT OPERATION SUBOP EXTRA.
        #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Show what the destination's migrate phase would send back to libvirt for a domain XML:
    /// the document with its <cpu> pinned; the decision goes to stderr. Records nothing.
    #[command(
        after_help = "Example: virsh dumpxml --migratable guest1 | cpuguard rewrite --xml -"
    )]
    Rewrite {
        /// Domain XML file, or `-` for stdin.
        #[arg(long, default_value = "-")]
        xml: PathBuf,
    },
    /// Check the configuration file and print the settings in force.
    #[command(after_help = "Example: cpuguard config --file /etc/cpuguard/cpuguard.toml")]
    Config {
        /// Defaults to $CPUGUARD_CONFIG or /etc/cpuguard/cpuguard.toml.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Compare two CPUID views: fingerprints (JSON), kvm-unit-tests dumps (`LLLLLLLL SSSSSSSS: EAX
    /// EBX ECX EDX`) or `cpuid -r` output, in any combination. A is the source, B the destination:
    /// "lost" features are in A and missing in B.
    #[command(after_help = "Example: cpuguard diff src.json dst.json --verbose\n\
                            Exit codes: 0 equivalent after normalization (informational differences \
                            are listed), 1 different, 2 bad input.")]
    Diff {
        a: PathBuf,
        b: PathBuf,
        /// Print the difference as JSON (schema: docs/operator/json-output.md).
        #[arg(long)]
        json: bool,
        /// Also list masked differences with their reasons, and the echo leaves (outside a
        /// side's declared CPUID ranges) left out of the comparison.
        #[arg(long, short)]
        verbose: bool,
        /// libvirt's feature map (default /usr/share/libvirt/cpu_map/x86_features.xml).
        #[arg(long)]
        features: Option<PathBuf>,
    },
    /// Measure this host's fingerprint for a domain: boot the probe under the domain's emulator,
    /// machine and CPU configuration and print the fingerprint as JSON.
    #[command(
        after_help = "Example: virsh dumpxml web1 > web1.xml && cpuguard probe --xml web1.xml > here.json\n\
                            Exit codes: 0 measured, 2 error (bad XML, emulator not allowed, probe failed or timed out)."
    )]
    Probe {
        /// Domain XML file, or `-` for stdin.
        #[arg(long)]
        xml: PathBuf,
        /// Answer from the fingerprint cache when it has this configuration (and store a new one).
        #[arg(long)]
        cached: bool,
        /// Run the probe under TCG whatever the domain's type (to compare with a TCG host).
        #[arg(long)]
        tcg: bool,
    },
    /// The decision the destination's hook would make for a stamped domain, without migrating:
    /// run it on the candidate destination with the source's domain XML.
    #[command(
        after_help = "Example: virsh -c qemu+ssh://src/system dumpxml web1 | ssh dst cpuguard check --xml -\n\
                            Exit codes: 0 go, 1 no-go (the reasons follow), 2 error."
    )]
    Check {
        /// Domain XML (with cpuguard's stamp), or `-` for stdin.
        #[arg(long, default_value = "-")]
        xml: PathBuf,
        /// The same as --xml (`cpuguard check -`, `cpuguard check web1.xml`).
        #[arg(conflicts_with = "xml")]
        file: Option<PathBuf>,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Record this host's fingerprint in running domains' live metadata (runs cpuguard-libvirt;
    /// `cpuguard stamp --help` shows its options).
    #[command(
        disable_help_flag = true,
        after_help = "Examples: cpuguard stamp web1\n          cpuguard stamp --all\n          \
                      cpuguard stamp --force web1\n\
                      A stamp of the running QEMU process is kept unless --force.\n\
                      Exit codes: 0 all stamped or kept, 1 some not stamped, 2 error."
    )]
    Stamp {
        #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// This host's running (or --all) domains with their stamps and canonical CPU
    /// configurations, as one JSON bundle (runs cpuguard-libvirt; `cpuguard inventory --help`
    /// shows its options).
    #[command(
        disable_help_flag = true,
        after_help = "Example: cpuguard inventory > $(hostname)-vms.json\n\
                            Exit codes: 0 written, 2 error."
    )]
    Inventory {
        #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Per VM of the inventories, each destination's go/no-go with the reason, then which hosts
    /// can take which VMs and what blocks the rest.
    #[command(
        after_help = "Example: cpuguard plan hv-old-01-vms.json --to hv-new-01.json hv-new-02.json --html plan.html\n\
                            Inventories come from `cpuguard inventory` on the sources, bundles from \
                            `cpuguard fingerprint measure INVENTORY…` on each candidate destination.\n\
                            Exit codes: 0 every VM can go to every destination, 1 some cannot, 2 error."
    )]
    Plan {
        /// Files written by `cpuguard inventory`, one per source host.
        inventories: Vec<PathBuf>,
        /// Bundles written by `cpuguard fingerprint measure` (or `export`), one per destination.
        #[arg(long, num_args = 1.., required = true)]
        to: Vec<PathBuf>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Also write the plan as one self-contained HTML page.
        #[arg(long)]
        html: Option<PathBuf>,
        /// libvirt's feature map (default /usr/share/libvirt/cpu_map/x86_features.xml).
        #[arg(long)]
        features: Option<PathBuf>,
        /// libvirt's CPU map directory, for the baseline CPU of blocked VMs (without it the plan
        /// prints the `cpuguard baseline` command instead).
        #[arg(long, default_value = crate::baseline::DEFAULT_CPU_MAP)]
        cpu_map: PathBuf,
        /// Also print each baseline's <cpu> element and what every host gives up for it.
        #[arg(short, long)]
        verbose: bool,
    },
    /// The CPU to give new VMs so they can live on every listed host, and what each host's VMs
    /// give up (runs cpuguard-libvirt; `cpuguard baseline --help` shows its options).
    #[command(
        disable_help_flag = true,
        after_help = "Example: cpuguard baseline qemu+ssh://hv-old-01/system hv-new-01-domcaps.xml\n\
                            Exit codes: 0 baseline printed, 2 error."
    )]
    Baseline {
        #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Install the hook: a link to cpuguard as HOOKS_DIR/qemu, or as HOOKS_DIR/qemu.d/50-cpuguard
    /// when HOOKS_DIR/qemu belongs to another program (never replaced).
    #[command(
        after_help = "Example: cpuguard install && systemctl restart libvirtd && cpuguard stamp --all\n\
                            Exit codes: 0 installed (or already), 2 error."
    )]
    Install {
        #[arg(long, default_value = crate::install::DEFAULT_HOOKS_DIR)]
        hooks_dir: PathBuf,
        /// The binary the hook leads to (default /usr/bin/cpuguard, else this executable).
        #[arg(long)]
        target: Option<PathBuf>,
    },
    /// Remove cpuguard's hook links (other programs' hooks are left alone).
    #[command(
        after_help = "Example: cpuguard uninstall && systemctl restart libvirtd\n\
                            Exit codes: 0 removed (or nothing to remove), 2 error."
    )]
    Uninstall {
        #[arg(long, default_value = crate::install::DEFAULT_HOOKS_DIR)]
        hooks_dir: PathBuf,
        #[arg(long)]
        target: Option<PathBuf>,
    },
    /// This host's measured fingerprints, for `cpuguard matrix` and `cpuguard plan` on another
    /// machine; `measure` first measures an inventory's configurations.
    #[command(
        after_help = "Examples: cpuguard fingerprint export > $(hostname).json\n          \
                            cpuguard fingerprint measure hv-old-01-vms.json -j 2 > $(hostname).json"
    )]
    Fingerprint {
        #[command(subcommand)]
        action: FingerprintAction,
    },
    /// The fleet's stamp-signing key (HMAC-SHA256): with it, stamps are signed and checked.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Which host can receive a VM from which, per CPU configuration, from every host's
    /// `cpuguard fingerprint export`.
    #[command(
        after_help = "Example: cpuguard matrix hv-old-01.json hv-new-01.json --json\n\
                            Exit codes: 0 every measured pair is a go, 1 some pair is a no-go, 2 error."
    )]
    Matrix {
        /// Bundles written by `cpuguard fingerprint export`, one per host.
        files: Vec<PathBuf>,
        /// Print the matrix as JSON.
        #[arg(long)]
        json: bool,
        /// libvirt's feature map (default /usr/share/libvirt/cpu_map/x86_features.xml).
        #[arg(long)]
        features: Option<PathBuf>,
    },
    /// The fingerprint cache: list its entries or clear it.
    #[command(after_help = "Examples: cpuguard cache list --json\n          cpuguard cache clear")]
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Write one of cpuguard's generated guest firmware images (64 KiB, booted with -bios).
    #[command(after_help = "Example: cpuguard firmware probe /tmp/probe.bin")]
    Firmware {
        kind: FirmwareKind,
        /// Where to write the image.
        path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CacheAction {
    /// One line per entry (or JSON).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove every entry.
    Clear,
}

#[derive(Subcommand, Debug)]
enum KeyAction {
    /// Write a new random key (root, 0600). Copy the same file to every host of the fleet.
    #[command(
        after_help = "Example: cpuguard key generate && scp -p /etc/cpuguard/fleet.key hv-new-01:/etc/cpuguard/\n\
                      Exit codes: 0 written, 2 error (a key exists already without --force)."
    )]
    Generate {
        /// Where to write it (default: stamp.key_file, /etc/cpuguard/fleet.key).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Replace an existing key (stamps signed with the old one stop verifying).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FingerprintAction {
    /// Every verified cache entry as one JSON bundle on stdout, with the host's name.
    #[command(
        after_help = "Example: cpuguard fingerprint export > $(hostname).json\n\
                            Exit codes: 0 exported (skipped bad entries are named on stderr), 2 error."
    )]
    Export {
        /// The name to record (default: this host's hostname).
        #[arg(long)]
        host: Option<String>,
        /// This host's CPU, for the baseline `cpuguard plan` computes: a libvirt URI (its domain
        /// capabilities, read by cpuguard-libvirt; default: stamp.uri) or a file saved with
        /// `virsh domcapabilities`, `virsh capabilities` or a host <cpu>.
        #[arg(long, value_name = "URI|FILE")]
        host_cpu: Option<String>,
    },
    /// On a candidate destination: measure every distinct CPU configuration of the inventories
    /// this host has not measured yet (progress on stderr), then print what `export` prints.
    #[command(
        after_help = "Example: cpuguard fingerprint measure hv-old-01-vms.json -j 2 > $(hostname).json\n\
                            Exit codes: 0 every configuration measured, 1 some could not be (named on stderr; \
                            the bundle holds the others), 2 error."
    )]
    Measure {
        /// Files written by `cpuguard inventory` on the source hosts.
        #[arg(required = true)]
        inventories: Vec<PathBuf>,
        /// Probes at once.
        #[arg(short = 'j', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        jobs: u32,
        /// Measure with this host's emulator instead of the path the inventory names (a
        /// destination that installs QEMU elsewhere).
        #[arg(long)]
        emulator: Option<String>,
        /// The name to record (default: this host's hostname).
        #[arg(long)]
        host: Option<String>,
        /// This host's CPU, as for `export --host-cpu`.
        #[arg(long, value_name = "URI|FILE")]
        host_cpu: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FirmwareKind {
    /// The CPUID/MSR probe.
    Probe,
    /// A test guest that prints `heartbeat N` on COM1 forever (test bed, demo).
    Heartbeat,
    /// The aarch64 test guest (QEMU `virt`, `-bios`): `heartbeat N` on the PL011 forever.
    HeartbeatAarch64,
}

/// The operator CLI: parses `args` (argv, program name first) and runs the command; returns the
/// exit status ([`EXIT_OK`], [`EXIT_DIFFERENT`] or [`EXIT_ERROR`]). With `--json` anywhere on the
/// line, even a refused command line answers in JSON.
pub fn main(args: Vec<OsString>) -> i32 {
    // Known before parsing, so that a command line clap rejects still answers in JSON.
    let json = args.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            if e.use_stderr() && json {
                let first = e.to_string();
                let line = first.lines().next().unwrap_or("bad command line");
                return fail(line.trim_start_matches("error: "), true);
            }
            let _ = e.print();
            return if e.use_stderr() { EXIT_ERROR } else { EXIT_OK };
        }
    };
    let result = match cli.command {
        Command::Hook { args } => {
            // Reached only when clap parsed the line (main.rs dispatches `hook qemu` earlier).
            if args.first().is_some_and(|d| d == "qemu") {
                return crate::hook::main(&args[1..]);
            }
            Err("usage: cpuguard hook qemu OBJECT OPERATION SUBOP EXTRA".to_string())
        }
        Command::Rewrite { xml } => rewrite(&xml),
        Command::Config { file } => show_config(file),
        Command::Firmware { kind, path } => write_firmware(kind, &path),
        Command::Probe { xml, cached, tcg } => probe(&xml, cached, tcg),
        Command::Check { xml, file, json } => check(file.as_deref().unwrap_or(&xml), json),
        Command::Stamp { args } => run_helper("stamp", &args),
        Command::Baseline { args } => run_helper("baseline", &args),
        Command::Inventory { args } => run_helper("inventory", &args),
        Command::Plan {
            inventories,
            to,
            json,
            html,
            features,
            cpu_map,
            verbose,
        } => plan(
            &inventories,
            &to,
            json,
            html.as_deref(),
            features.as_deref(),
            &cpu_map,
            verbose,
        ),
        Command::Fingerprint {
            action:
                FingerprintAction::Measure {
                    inventories,
                    jobs,
                    emulator,
                    host,
                    host_cpu,
                },
        } => measure_inventories(&inventories, jobs, emulator, host, host_cpu),
        Command::Install { hooks_dir, target } => install(&hooks_dir, target),
        Command::Key {
            action: KeyAction::Generate { file, force },
        } => generate_key(file, force),
        Command::Fingerprint {
            action: FingerprintAction::Export { host, host_cpu },
        } => export_fingerprints(host, host_cpu),
        Command::Matrix {
            files,
            json,
            features,
        } => matrix(&files, json, features.as_deref()),
        Command::Uninstall { hooks_dir, target } => uninstall(&hooks_dir, target),
        Command::Cache { action } => cache(action),
        Command::Diff {
            a,
            b,
            json,
            verbose,
            features,
        } => diff(&a, &b, json, verbose, features.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => fail(&e, json),
    }
}

/// The one-line error on stderr (exit 2); with `--json`, also the error as a JSON object on
/// stdout, so a script reading stdout always gets JSON.
fn fail(message: &str, json: bool) -> i32 {
    eprintln!("cpuguard: {message}");
    if json {
        println!("{:#}", crate::report::error(message));
    }
    EXIT_ERROR
}

/// Reads a named file or stdin (`-`), with the XML size limit in force.
pub fn read_input(path: &Path, limit: usize) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let reader: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(path)
                .map_err(|e| format!("{}: cannot open: {e}", path.display()))?,
        )
    };
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    if buf.len() > limit {
        return Err(format!(
            "{}: over the {limit}-byte limit (max_xml_bytes)",
            path.display()
        ));
    }
    Ok(buf)
}

fn rewrite(xml: &Path) -> Result<i32, String> {
    let config = Config::load().map_err(|e| e.to_string())?;
    let bytes = read_input(xml, config.max_xml_bytes)?;
    let doc = document::parse_bytes(&bytes, config.max_xml_bytes)
        .map_err(|e| format!("{}: {e}", xml.display()))?;
    let (text, decision) = rewrite_cpu(&doc).map_err(|e| format!("{}: {e}", xml.display()))?;
    eprintln!("cpuguard: {decision:?}");
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| format!("stdout: {e}"))?;
    Ok(EXIT_OK)
}

fn show_config(file: Option<PathBuf>) -> Result<i32, String> {
    let path = file.unwrap_or_else(Config::path);
    let config = Config::load_from(&path).map_err(|e| e.to_string())?;
    let text = toml::to_string(&config).map_err(|e| e.to_string())?;
    println!("# settings in force from {}", path.display());
    print!("{text}");
    Ok(EXIT_OK)
}

/// Exit status of a negative verdict: the fingerprints differ, or a migration would not be safe.
pub const EXIT_DIFFERENT: i32 = 1;

fn feature_map(path: Option<&Path>) -> Result<FeatureMap, String> {
    match path {
        Some(p) => FeatureMap::load(p),
        None => FeatureMap::load_default(),
    }
    .map_err(|e| e.to_string())
}

fn diff(
    a: &Path,
    b: &Path,
    json: bool,
    verbose: bool,
    features: Option<&Path>,
) -> Result<i32, String> {
    let features = feature_map(features)?;
    let va = crate::fingerprint::load_input(a)
        .map_err(|e| e.to_string())?
        .raw();
    let vb = crate::fingerprint::load_input(b)
        .map_err(|e| e.to_string())?
        .raw();
    let diff = crate::view::diff(&va, &vb, &features);
    if json {
        let doc = crate::report::diff_document(
            &a.display().to_string(),
            &va,
            &b.display().to_string(),
            &vb,
            &diff,
        );
        println!("{doc:#}");
    } else {
        print!("{}", diff.render(verbose));
    }
    Ok(if diff.is_equivalent() {
        EXIT_OK
    } else {
        EXIT_DIFFERENT
    })
}

fn load_config() -> Result<Config, String> {
    Config::load().map_err(|e| e.to_string())
}

fn probe(xml: &Path, cached: bool, tcg: bool) -> Result<i32, String> {
    let config = load_config()?;
    let bytes = read_input(xml, config.max_xml_bytes)?;
    let doc = document::parse_bytes(&bytes, config.max_xml_bytes)
        .map_err(|e| format!("{}: {e}", xml.display()))?;
    let guest =
        GuestCpuConfig::from_domain_xml(doc.text).map_err(|e| format!("{}: {e}", xml.display()))?;
    let accel = tcg.then_some(Accel::Tcg);
    let fingerprint = if cached {
        measure::for_guest(&guest, &config, accel)
            .map(|m| m.fingerprint)
            .map_err(|e| e.to_string())?
    } else {
        measure::probe_now(&guest, &config, accel).map_err(|e| e.to_string())?
    };
    // The fingerprint as `cpuguard diff` reads it, plus the schema version and the identity of
    // the CPU measured (extra keys a fingerprint reader ignores).
    let mut value = serde_json::to_value(&fingerprint).map_err(|e| e.to_string())?;
    crate::report::merge(
        &mut value,
        serde_json::json!({
            "schema_version": crate::report::SCHEMA_VERSION,
            "identity": crate::report::identity(&fingerprint.raw()),
        }),
    );
    println!("{value:#}");
    Ok(EXIT_OK)
}

fn check(xml: &Path, json: bool) -> Result<i32, String> {
    let config = load_config()?;
    let bytes = read_input(xml, config.max_xml_bytes)?;
    let doc = document::parse_bytes(&bytes, config.max_xml_bytes)
        .map_err(|e| format!("{}: {e}", xml.display()))?;
    let name = doc.display_name("domain").to_string();
    let assessment = crate::hook::assess(&doc, &name, Origin::Migrate, &config)?;
    let (go, reason, lines) = match &assessment.decision {
        Decision::Allow {
            reason,
            informational,
            ..
        } => (true, reason.clone(), informational.clone()),
        Decision::Refuse { reason, message } => (
            false,
            reason.clone(),
            message
                .lines()
                .skip(1)
                .map(|l| l.trim().to_string())
                .collect(),
        ),
    };
    if json {
        let source = assessment
            .stamp
            .as_ref()
            .and_then(|s| crate::guard::stamped_table(s).ok());
        let local = assessment
            .measured
            .as_ref()
            .and_then(|m| m.as_ref().ok())
            .map(|m| m.fingerprint.raw());
        let mut v = serde_json::json!({
            "schema_version": crate::report::SCHEMA_VERSION,
            "command": "check",
            "domain": name,
            "verdict": if go { "go" } else { "no-go" },
            "go": go,
            "reason": reason,
            "details": lines,
            "source_host": assessment.stamp.as_ref().and_then(|s| s.host.clone()),
            "source_digest": assessment.stamp.as_ref().and_then(|s| s.digest.clone()),
            "local_digest": assessment.measured.as_ref().and_then(|m| m.as_ref().ok()).map(|m| m.fingerprint.digest.clone()),
            "source": source.as_ref().map(crate::report::identity),
            "destination": local.as_ref().map(crate::report::identity),
            "equivalent": serde_json::Value::Null,
            "diff": serde_json::Value::Null,
        });
        // The comparison behind the verdict, when both views were there to compare.
        if let (Some(a), Some(b)) = (&source, &local) {
            let features = FeatureMap::load_default().map_err(|e| e.to_string())?;
            let d = crate::view::diff(a, b, &features);
            v["equivalent"] = serde_json::Value::Bool(d.is_equivalent());
            v["diff"] = crate::report::diff(&d);
        }
        println!("{v:#}");
    } else {
        match &assessment.decision {
            Decision::Allow { .. } => {
                println!(
                    "go: {}: {}",
                    crate::audit::escape(&name),
                    crate::audit::sanitize_message(&reason)
                );
                for l in &lines {
                    println!("  informational: {l}");
                }
            }
            Decision::Refuse { message, .. } => {
                let message = crate::audit::sanitize_message(message);
                println!("no-go: {}", message.trim_start_matches("cpuguard: "));
            }
        }
    }
    Ok(if go { EXIT_OK } else { EXIT_DIFFERENT })
}

/// Runs `cpuguard-libvirt SUBCOMMAND ARGS…` (the only program that links libvirt) and returns its
/// exit status.
fn run_helper(subcommand: &str, args: &[OsString]) -> Result<i32, String> {
    let config = load_config()?;
    let helper = crate::helper::locate(&config)?;
    let status = std::process::Command::new(&helper)
        .arg(subcommand)
        .args(args)
        .status()
        .map_err(|e| format!("{}: {e}", helper.display()))?;
    Ok(status.code().unwrap_or(EXIT_ERROR))
}

fn cache(action: CacheAction) -> Result<i32, String> {
    let config = load_config()?;
    let cache = Cache::open(&config.cache_dir).map_err(|e| e.to_string())?;
    match action {
        CacheAction::List { json } => {
            let entries = cache.list().map_err(|e| e.to_string())?;
            if json {
                let text = serde_json::to_string_pretty(&entries).map_err(|e| e.to_string())?;
                println!("{text}");
            } else {
                for e in &entries {
                    let problem = e
                        .problem
                        .as_ref()
                        .map(|p| format!("  PROBLEM: {p}"))
                        .unwrap_or_default();
                    println!(
                        "{}  {} {}  {} {}  {}  {}{}",
                        &e.digest[..e.digest.len().min(16)],
                        e.mode.as_deref().unwrap_or("-"),
                        e.model.as_deref().unwrap_or("-"),
                        e.machine.as_deref().unwrap_or("-"),
                        e.accel.as_deref().unwrap_or("-"),
                        e.emulator.as_deref().unwrap_or("-"),
                        e.fingerprint_digest.as_deref().unwrap_or("-"),
                        problem
                    );
                }
                println!("{} entries in {}", entries.len(), cache.dir().display());
            }
        }
        CacheAction::Clear => {
            let n = cache.clear().map_err(|e| e.to_string())?;
            println!("removed {n} entries from {}", cache.dir().display());
        }
    }
    Ok(EXIT_OK)
}

fn write_firmware(kind: FirmwareKind, path: &Path) -> Result<i32, String> {
    let image = match kind {
        FirmwareKind::Probe => crate::x86_64::probe::firmware::PROBE_X86,
        FirmwareKind::Heartbeat => crate::x86_64::probe::firmware::HEARTBEAT_X86,
        FirmwareKind::HeartbeatAarch64 => crate::aarch64::probe::HEARTBEAT_AARCH64,
    };
    crate::fsutil::write_atomic(path, image, 0o644)
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    Ok(EXIT_OK)
}

fn install(hooks_dir: &Path, target: Option<PathBuf>) -> Result<i32, String> {
    let target = target.unwrap_or_else(crate::install::default_target);
    let installed = crate::install::install(hooks_dir, &target).map_err(|e| e.to_string())?;
    print!("{}", crate::install::install_message(&installed));
    Ok(EXIT_OK)
}

fn uninstall(hooks_dir: &Path, target: Option<PathBuf>) -> Result<i32, String> {
    let target = target.unwrap_or_else(crate::install::default_target);
    let removed = crate::install::uninstall(hooks_dir, &target).map_err(|e| e.to_string())?;
    if removed.is_empty() {
        println!("no cpuguard hook in {}", hooks_dir.display());
    }
    for path in &removed {
        println!("removed {}", path.display());
    }
    if !removed.is_empty() {
        println!("restart libvirtd so that it forgets the hook");
    }
    Ok(EXIT_OK)
}

fn generate_key(file: Option<PathBuf>, force: bool) -> Result<i32, String> {
    let path = match file {
        Some(f) => f,
        None => load_config()?.stamp.key_file,
    };
    crate::signature::generate(&path, force)?;
    println!("wrote a new fleet key to {} (mode 0600)", path.display());
    Ok(0)
}

fn export_fingerprints(host: Option<String>, host_cpu: Option<String>) -> Result<i32, String> {
    let config = load_config()?;
    let cache = Cache::open(&config.cache_dir).map_err(|e| e.to_string())?;
    let host = host.unwrap_or_else(crate::matrix::this_hostname);
    let host_cpu = match read_host_cpu(&config, host_cpu) {
        Ok(cpu) => Some(cpu),
        Err(e) if !e.explicit => {
            // Without libvirt the bundle still serves the plan's verdicts; only the baseline
            // CPU is then left to `cpuguard baseline`.
            eprintln!(
                "cpuguard: no host CPU in the bundle ({}): `cpuguard plan` will print the baseline command instead; give --host-cpu FILE",
                e.reason
            );
            None
        }
        Err(e) => return Err(e.reason),
    };
    let (bundle, warnings) =
        crate::matrix::export(&cache, &host, host_cpu).map_err(|e| e.to_string())?;
    for w in &warnings {
        eprintln!("cpuguard: {w}");
    }
    let text = serde_json::to_string_pretty(&bundle).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(EXIT_OK)
}

fn matrix(files: &[PathBuf], json: bool, features: Option<&Path>) -> Result<i32, String> {
    let bundles = files
        .iter()
        .map(|f| crate::matrix::load_bundle(f).map(|b| (f.clone(), b)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if bundles.is_empty() {
        return Err(crate::matrix::MatrixError::NoBundles.to_string());
    }
    let features = feature_map(features)?;
    let m = crate::matrix::build(&bundles, &features).map_err(|e| e.to_string())?;
    if json {
        let text = serde_json::to_string_pretty(&m).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", m.to_text());
    }
    Ok(if m.all_go() { EXIT_OK } else { EXIT_DIFFERENT })
}

struct HostCpuError {
    /// The operator named the source: its failure is an error, not a warning.
    explicit: bool,
    reason: String,
}

/// This host's CPU for a bundle: from a saved file, or from libvirt through cpuguard-libvirt
/// (`host` a URI, or stamp.uri when None).
fn read_host_cpu(
    config: &crate::config::Config,
    host: Option<String>,
) -> Result<crate::baseline::HostCpu, HostCpuError> {
    let explicit = host.is_some();
    let fail = |reason: String| HostCpuError { explicit, reason };
    let source = host.unwrap_or_else(|| config.stamp.uri.clone());
    if !crate::baseline::is_uri(&source) {
        return crate::baseline::host_from_file(Path::new(&source))
            .map_err(|e| fail(e.to_string()));
    }
    let helper = crate::helper::locate(config).map_err(fail)?;
    let out = std::process::Command::new(&helper)
        .args(["host-cpu", "--uri", &source])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(format!("{}: {e}", helper.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim().trim_start_matches("cpuguard: ");
        return Err(fail(err.lines().next().unwrap_or("failed").to_string()));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("{}: host-cpu: {e}", helper.display())))
}

/// `cpuguard fingerprint measure`: every distinct configuration of the inventories through the
/// cache (a hit costs nothing, a miss one probe), `jobs` at a time, then the export bundle.
fn measure_inventories(
    files: &[PathBuf],
    jobs: u32,
    emulator: Option<String>,
    host: Option<String>,
    host_cpu: Option<String>,
) -> Result<i32, String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let config = load_config()?;
    let mut configs: Vec<(String, GuestCpuConfig)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        let inv = crate::plan::load_inventory(f).map_err(|e| e.to_string())?;
        for mut d in inv.domains {
            if let Some(e) = &emulator {
                d.config.emulator = Some(e.clone());
            }
            let text = serde_json::to_string(&d.config).map_err(|e| e.to_string())?;
            if seen.insert(text) {
                configs.push((d.label, d.config));
            }
        }
    }
    let total = configs.len();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    eprintln!(
        "cpuguard: {total} distinct configurations in {} inventories, {jobs} at a time",
        files.len()
    );
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(total.max(1) as u32) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((label, guest)) = configs.get(i) else {
                    break;
                };
                let started = std::time::Instant::now();
                let line = match measure::for_guest(guest, &config, None) {
                    Ok(m) => format!(
                        "{} ({} ms)",
                        match m.source {
                            crate::cache::Source::Hit => "already measured",
                            _ => "measured",
                        },
                        started.elapsed().as_millis()
                    ),
                    Err(e) => {
                        let why = format!("{label}: cannot measure: {e}");
                        if let Ok(mut f) = failures.lock() {
                            f.push(why.clone());
                        }
                        format!("FAILED: {e}")
                    }
                };
                eprintln!("cpuguard: [{}/{total}] {label}: {line}", i + 1);
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_default();
    for f in &failures {
        eprintln!("cpuguard: {f}");
    }
    export_fingerprints(host, host_cpu)?;
    Ok(if failures.is_empty() {
        EXIT_OK
    } else {
        EXIT_DIFFERENT
    })
}

/// `cpuguard plan`: inventories against destination bundles.
fn plan(
    inventories: &[PathBuf],
    to: &[PathBuf],
    json: bool,
    html: Option<&Path>,
    features: Option<&Path>,
    cpu_map: &Path,
    verbose: bool,
) -> Result<i32, String> {
    let features = feature_map(features)?;
    let inventories = inventories
        .iter()
        .map(|f| crate::plan::load_inventory(f).map(|i| (f.clone(), i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let destinations = crate::matrix::load_host_views(to).map_err(|e| e.to_string())?;
    let plan = crate::plan::build(&inventories, &destinations, &features, cpu_map)
        .map_err(|e| e.to_string())?;
    if let Some(path) = html {
        crate::fsutil::write_atomic(path, plan.to_html().as_bytes(), 0o644)
            .map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        serde_json::to_writer_pretty(&mut out, &plan).map_err(|e| format!("stdout: {e}"))?;
        writeln!(out).map_err(|e| format!("stdout: {e}"))?;
    } else {
        out.write_all(plan.to_text(verbose).as_bytes())
            .map_err(|e| format!("stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("stdout: {e}"))?;
    Ok(if plan.all_go() {
        EXIT_OK
    } else {
        EXIT_DIFFERENT
    })
}
