//! The `cpuguard` program: libvirt's qemu hook when started as one, the operator CLI otherwise.
//!
//! The hook decision is made on argv alone, before any CLI parsing, so the hook path costs no
//! more than the phase it runs.

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
        cpuguard::cli::main(args)
    };
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
