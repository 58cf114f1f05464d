//! libvirt's qemu hook protocol: `qemu OBJECT OPERATION SUBOP EXTRA`, domain XML on stdin.
//!
//! libvirt runs the hook several times for every start and stop of every VM, so phases with
//! nothing to do drain stdin and exit 0 without reading configuration or touching libvirt. The
//! phases that matter:
//! - `migrate begin` / `restore begin` (destination): stdout replaces the domain XML; cpuguard
//!   pins the CPU and records that the next `prepare` is an incoming guest.
//! - `prepare begin`: for an incoming guest, the CPU check; a non-zero exit aborts the start and
//!   libvirt shows our stderr to the operator.

mod migrate;
mod prepare;
mod started;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::Path;

use crate::audit::{escape, Record, Severity};
use crate::config::Config;

pub use migrate::{rewrite_cpu, CpuDecision};
pub use prepare::{assess, Assessment};

/// Exit codes: libvirt aborts the operation on any non-zero status.
pub const EXIT_OK: i32 = 0;
/// The phase refuses (an incoming guest vetoed), or could not hand back its output; stderr says
/// why.
pub const EXIT_REFUSED: i32 = 1;
/// The hook was called with arguments it cannot use (not four, not UTF-8, not `hook qemu`).
pub const EXIT_USAGE: i32 = 2;

/// One hook invocation, as libvirt makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCall {
    /// The domain name (libvirt's OBJECT argument).
    pub domain: String,
    /// libvirt's OPERATION argument, e.g. `migrate`, `prepare`, `started`.
    pub operation: String,
    /// libvirt's SUBOP argument, e.g. `begin`.
    pub subop: String,
    /// libvirt's EXTRA argument (`-` when libvirt has nothing to pass).
    pub extra: String,
}

impl HookCall {
    /// `args` are the four arguments after the program (or after `hook qemu`).
    pub fn parse(args: &[OsString]) -> Result<HookCall, String> {
        if args.len() != 4 {
            return Err(format!(
                "hook called with {} argument(s), expected 4: qemu OBJECT OPERATION SUBOP EXTRA",
                args.len()
            ));
        }
        let text = |i: usize| {
            args[i]
                .to_str()
                .map(str::to_string)
                .ok_or_else(|| format!("hook argument {} is not UTF-8", i + 1))
        };
        Ok(HookCall {
            domain: text(0)?,
            operation: text(1)?,
            subop: text(2)?,
            extra: text(3)?,
        })
    }
}

/// True when the program was started by libvirt as a hook: as `/etc/libvirt/hooks/qemu`, or as any
/// file in `/etc/libvirt/hooks/qemu.d/`.
pub fn invoked_as_hook(argv0: &Path) -> bool {
    argv0.file_name().is_some_and(|n| n == "qemu")
        || argv0
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "qemu.d")
}

/// What the hook answers: exit status, stdout (complete or nothing), stderr.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The exit status: [`EXIT_OK`], [`EXIT_REFUSED`] or [`EXIT_USAGE`].
    pub status: i32,
    /// The replacement domain XML (migrate and restore phases only); empty: libvirt keeps its own.
    pub stdout: Vec<u8>,
    /// What `virsh` shows the operator: the refusal on failure, at most a note (e.g. an unknown
    /// operation ignored) on success.
    pub stderr: String,
}

impl Outcome {
    fn ok() -> Outcome {
        Outcome::default()
    }

    fn refused(message: String) -> Outcome {
        Outcome {
            status: EXIT_REFUSED,
            stdout: Vec::new(),
            stderr: message,
        }
    }
}

/// Entry point for the process: reads stdin, runs the phase, writes stdout in one piece.
pub fn main(args: &[OsString]) -> i32 {
    crate::audit::defer_stderr();
    let stdin = io::stdin();
    let outcome = run(args, &mut stdin.lock());
    if !outcome.stderr.is_empty() {
        // libvirt hands this to `virsh`, which prints it on the operator's terminal.
        let text = crate::audit::sanitize_message(outcome.stderr.trim_end());
        let _ = writeln!(io::stderr(), "{text}");
    }
    // Audit lines that could not reach syslog come after the verdict.
    crate::audit::flush_deferred();
    if !outcome.stdout.is_empty() {
        let mut out = io::stdout().lock();
        if let Err(e) = out.write_all(&outcome.stdout).and_then(|()| out.flush()) {
            // libvirt got a truncated document or none: it must not use it.
            let _ = writeln!(
                io::stderr(),
                "cpuguard: cannot write the hook's output: {e}"
            );
            return EXIT_REFUSED;
        }
    }
    outcome.status
}

/// Runs one hook call against `input` (libvirt's stdin). Always drains `input`.
pub fn run(args: &[OsString], input: &mut dyn Read) -> Outcome {
    let call = match HookCall::parse(args) {
        Ok(call) => call,
        Err(e) => {
            drain(input);
            return Outcome {
                status: EXIT_USAGE,
                stdout: Vec::new(),
                stderr: format!("cpuguard: {e}"),
            };
        }
    };
    match (call.operation.as_str(), call.subop.as_str()) {
        ("migrate", "begin") | ("restore", "begin") => migrate::run(&call, input),
        ("prepare", "begin") => prepare::run(&call, input),
        ("started", "begin") => started::run(&call, input),
        // Phases cpuguard has nothing to do in: the fast path.
        ("start" | "started" | "stopped" | "release" | "reconnect" | "attach", _)
        | ("prepare" | "migrate" | "restore", _) => {
            drain(input);
            Outcome::ok()
        }
        (op, subop) => {
            // libvirt grows new operations over time; an unknown one must not break VM lifecycle.
            drain(input);
            Record::new(Severity::Warning, op, "ignored")
                .field("domain", &call.domain)
                .field("subop", subop)
                .field("reason", "unknown hook operation")
                .emit();
            Outcome {
                status: EXIT_OK,
                stdout: Vec::new(),
                stderr: format!(
                    "cpuguard: ignoring unknown hook operation {} {} for domain {}",
                    escape(op),
                    escape(subop),
                    escape(&call.domain)
                ),
            }
        }
    }
}

/// Reads the domain XML up to `limit` bytes; anything beyond is drained so libvirt's write never
/// fails, and reported as too large.
fn read_limited(input: &mut dyn Read, limit: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(16 * 1024);
    input
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map(|_| ())?;
    let over = buf.len() > limit;
    if over {
        drain(input);
    }
    Ok((buf, over))
}

fn drain(input: &mut dyn Read) {
    let _ = io::copy(input, &mut io::sink());
}

/// `<qemu:commandline>` arguments that change the guest CPU: refused under the default policy
/// (`Err` is the reason), audited as a warning when `policy.qemu_commandline_cpu = "allow"`.
fn commandline_cpu(
    doc: &crate::domain::document::DomainDocument<'_>,
    config: &Config,
    phase: &str,
    domain: &str,
) -> Result<(), String> {
    let args = doc.commandline_cpu_args();
    if args.is_empty() {
        return Ok(());
    }
    let list = args.join(" ");
    match config.policy.qemu_commandline_cpu {
        crate::config::Verdict::Refuse => Err(format!(
            "<qemu:commandline> changes the guest CPU ({}), which neither the stamp nor this host's measurement sees; remove it, or set policy.qemu_commandline_cpu = \"allow\" in {}",
            escape(&list),
            Config::path().display()
        )),
        crate::config::Verdict::Allow => {
            Record::new(Severity::Warning, phase, "allowed")
                .field("domain", domain)
                .opt_field("uuid", doc.uuid.as_deref())
                .field("qemu_commandline", &list)
                .field(
                    "reason",
                    "<qemu:commandline> changes the guest CPU, unguarded for those arguments; allowed by policy.qemu_commandline_cpu",
                )
                .emit();
            Ok(())
        }
    }
}

/// Loads the configuration for a phase that must not run on unknown policies.
fn strict_config() -> Result<Config, String> {
    Config::load().map_err(|e| format!("configuration error: {e}"))
}

/// The warning both phases give when the runtime directory was open to others and had to be
/// narrowed (its records, which anyone could have written, were discarded).
fn audit_narrowed_runtime_dir(phase: &str, domain: &str, dir: &std::path::Path, discarded: usize) {
    crate::audit::Record::new(crate::audit::Severity::Warning, phase, "discarded")
        .field("domain", domain)
        .field(
            "reason",
            &format!(
                "runtime directory {} was writable by others: narrowed to 0700, {discarded} record(s) it held discarded",
                dir.display()
            ),
        )
        .emit();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn recognises_hook_invocations() {
        assert!(invoked_as_hook(Path::new("/etc/libvirt/hooks/qemu")));
        assert!(invoked_as_hook(Path::new("qemu")));
        assert!(invoked_as_hook(Path::new(
            "/etc/libvirt/hooks/qemu.d/50-cpuguard"
        )));
        assert!(!invoked_as_hook(Path::new("/usr/bin/cpuguard")));
        assert!(!invoked_as_hook(Path::new("/usr/bin/qemu-system-x86_64")));
    }

    #[test]
    fn argument_count_is_checked() {
        let mut input: &[u8] = b"<domain/>";
        let out = run(&args(&["guest1", "migrate", "begin"]), &mut input);
        assert_eq!(out.status, EXIT_USAGE);
        assert!(out.stderr.contains("3 argument(s), expected 4"));
        assert!(input.is_empty(), "stdin drained");
        let mut input: &[u8] = b"";
        let out = run(&args(&["g", "start", "begin", "-", "extra"]), &mut input);
        assert_eq!(out.status, EXIT_USAGE);
    }

    #[test]
    fn no_op_phases_drain_and_say_nothing() {
        for op in ["start", "stopped", "release", "reconnect", "attach"] {
            let mut input: &[u8] = b"<domain><name>g</name></domain>";
            let out = run(&args(&["g", op, "begin", "-"]), &mut input);
            assert_eq!(out, Outcome::ok(), "{op}");
            assert!(input.is_empty());
        }
    }

    #[test]
    fn unknown_operation_is_allowed_and_reported() {
        let mut input: &[u8] = b"<domain/>";
        let out = run(&args(&["g", "teleport", "begin", "-"]), &mut input);
        assert_eq!(out.status, EXIT_OK);
        assert!(out.stdout.is_empty());
        assert!(out.stderr.contains("unknown hook operation teleport begin"));
    }

    #[test]
    fn read_limited_drains_oversized_input() {
        let data = vec![b'x'; 10_000];
        let mut input: &[u8] = &data;
        let (buf, over) = read_limited(&mut input, 100).expect("read");
        assert!(over);
        assert_eq!(buf.len(), 101);
        assert!(input.is_empty());
    }
}
