//! `cpuguard-libvirt`: the only cpuguard program that links libvirt. `cpuguard stamp` runs it;
//! the `started` hook detaches it after every start.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cpuguard::config::Config;
use cpuguard::stamp;

#[derive(Parser, Debug)]
#[command(
    name = "cpuguard-libvirt",
    version,
    about = "cpuguard's libvirt client (stamping)"
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
                            Exit codes: 0 all stamped, 1 some not stamped, 2 error."
    )]
    Stamp {
        /// Domain names.
        names: Vec<String>,
        /// Every running domain.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Called by the `started` hook: wait for libvirt to finish the start job.
        #[arg(long, hide = true)]
        after_start: bool,
        /// libvirt connection URI (default: stamp.uri from the configuration).
        #[arg(long)]
        uri: Option<String>,
    },
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
        Command::Stamp {
            names,
            all,
            after_start,
            uri,
        } => {
            if let Some(uri) = uri {
                config.stamp.uri = uri;
            }
            if after_start {
                let mut worst = 0;
                for name in &names {
                    let result = stamp::stamp_after_start(name, &config);
                    stamp::audit(name, &result, "started");
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
                match stamp::stamp_all(&conn, &config) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("cpuguard: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                names
                    .iter()
                    .map(|n| (n.clone(), stamp::stamp_domain(&conn, n, &config)))
                    .collect()
            };
            let mut failed = false;
            for (name, r) in &results {
                match r {
                    Ok(s) => println!(
                        "stamped {} {} ({})",
                        s.name,
                        s.digest,
                        if s.cached { "cached" } else { "measured" }
                    ),
                    Err(e) => {
                        failed = true;
                        eprintln!("cpuguard: not stamped: {e}");
                    }
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
