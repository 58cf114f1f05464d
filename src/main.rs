//! The `cpuguard` program: libvirt's qemu hook when started as one, the operator CLI otherwise.
//!
//! The hook decision is made on argv alone, before any CLI parsing, so the hook path costs no
//! more than the phase it runs.

// Shipped code fails with an error naming its input, never with a panic; unit tests (cfg(test))
// fail by panicking, so the rule stops there.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args.first().map(Path::new).unwrap_or(Path::new("cpuguard"));
    let status = if cpuguard::hook::invoked_as_hook(argv0) {
        cpuguard::hook::main(&args[1..])
    } else if args.get(1).is_some_and(|a| a == "hook") {
        match args.get(2) {
            Some(driver) if driver == "qemu" => cpuguard::hook::main(&args[3..]),
            _ => {
                eprintln!("cpuguard: usage: cpuguard hook qemu OBJECT OPERATION SUBOP EXTRA");
                cpuguard::hook::EXIT_USAGE
            }
        }
    } else {
        restore_default_sigpipe();
        cpuguard::cli::main(args)
    };
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

/// A reader that closes the pipe early (`cpuguard diff A B | head -1`) is a normal end for a
/// command: it dies of SIGPIPE as every Unix filter does (the shell reports 141), instead of
/// Rust's default of ignoring the signal and panicking in `println!` on the EPIPE. The hook keeps
/// the default: libvirt reads its whole output, and a hook must never die half-way through an
/// audit.
fn restore_default_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called once, single-threaded, before anything else runs; SIG_DFL installs no handler
    // code, so no async-signal-safety question arises.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("cpuguard: warning: cannot restore SIGPIPE's default action: {e}");
    }
}
