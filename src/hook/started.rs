//! The `started begin` phase: detach the stamp process and return at once.
//!
//! libvirt holds the domain's start job while the hook runs, so calling libvirt from here would
//! deadlock. The stamp process runs in its own session with stdio closed (libvirt does not wait for
//! it) and retries until the start job is over.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::audit::{Record, Severity};
use crate::config::Config;
use crate::helper;
use crate::hook::{drain, HookCall, Outcome};

pub(super) fn run(call: &HookCall, input: &mut dyn Read) -> Outcome {
    drain(input);
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            Record::new(Severity::Warning, "started", "ignored")
                .field("domain", &call.domain)
                .field("reason", &format!("not stamped: configuration error: {e}"))
                .emit();
            return Outcome::ok();
        }
    };
    if !config.stamp.on_start {
        return Outcome::ok();
    }
    let spawned = helper::locate(&config).and_then(|path| {
        let mut cmd = Command::new(&path);
        cmd.args(["stamp", "--after-start", "--"])
            .arg(&call.domain)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        cmd.spawn()
            .map(|_child| ())
            .map_err(|e| format!("{}: {e}", path.display()))
    });
    if let Err(reason) = spawned {
        // A missing stamp is caught at the destination (policy.unstamped_source); never fail a start.
        Record::new(Severity::Error, "started", "failed")
            .field("domain", &call.domain)
            .field(
                "reason",
                &format!("cannot start the stamp process: {reason}"),
            )
            .emit();
    }
    Outcome::ok()
}
