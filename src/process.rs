//! The QEMU process a stamp describes, identified from `/proc` alone.
//!
//! A pid is reused, so a stamp records the pid together with the process's start time (field 22
//! of `/proc/PID/stat`, clock ticks since boot) and the boot id: the three name one process for
//! ever. The emulator's identity is the device, inode, size and mtime of the binary the process
//! runs (`/proc/PID/exe`, which still points at the old file after a package replaced it), not a
//! hash: sha256 of an 18 MB QEMU costs ~84 ms (see `src/cache/key.rs`), a stat microseconds.
//!
//! Nothing here links libvirt; `src/stamp.rs` finds the pid through libvirt's monitor.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Where the kernel publishes the current boot's id.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// One running QEMU process, as a stamp records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProcess {
    /// The process id (in this host's pid namespace).
    pub pid: u32,
    /// `/proc/PID/stat` field 22: start time in clock ticks after boot.
    pub start_time: u64,
    /// The boot id (`/proc/sys/kernel/random/boot_id`) of the boot the process runs in.
    pub boot_id: String,
    /// `DEV:INODE:SIZE:MTIME` of `/proc/PID/exe`.
    pub exe: String,
}

impl QemuProcess {
    /// Reads the identity of process `pid` from `/proc`.
    pub fn of(pid: u32) -> Result<QemuProcess, String> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat = fs::read_to_string(&stat_path).map_err(|e| format!("{stat_path}: {e}"))?;
        let start_time = start_time_from_stat(&stat).ok_or_else(|| {
            format!("{stat_path}: no start time (field 22) in an unexpected format")
        })?;
        let boot_id = fs::read_to_string(BOOT_ID_PATH)
            .map_err(|e| format!("{BOOT_ID_PATH}: {e}"))?
            .trim()
            .to_string();
        let exe = exe_identity(pid)?;
        Ok(QemuProcess {
            pid,
            start_time,
            boot_id,
            exe,
        })
    }

    /// The path that executes this process's own binary, even after it was replaced on disk.
    pub fn exe_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/exe", self.pid))
    }
}

/// `DEV:INODE:SIZE:MTIME` of the binary process `pid` runs (stat through `/proc/PID/exe`, so a
/// deleted or replaced file is still the file the process runs).
pub fn exe_identity(pid: u32) -> Result<String, String> {
    let path = format!("/proc/{pid}/exe");
    let meta = fs::metadata(&path).map_err(|e| format!("{path}: {e}"))?;
    Ok(format!(
        "{}:{}:{}:{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime()
    ))
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted after its last `)`.
pub fn start_time_from_stat(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: field 22 is the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The process (thread group) a thread belongs to: `Tgid` of `/proc/TID/status`. A vCPU thread
/// id from QEMU's monitor names the QEMU process this way.
pub fn thread_group_of(tid: u32) -> Result<u32, String> {
    let path = format!("/proc/{tid}/status");
    let status = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{path}: no Tgid line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let stat =
            "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 1 0 0 0 5 6 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(start_time_from_stat(stat), Some(987654));
        assert_eq!(start_time_from_stat("4242 (qemu) S 1"), None);
        assert_eq!(start_time_from_stat("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_identified() {
        let me = std::process::id();
        let p = QemuProcess::of(me).expect("own process");
        assert_eq!(p.pid, me);
        assert!(p.start_time > 0);
        assert_eq!(p.boot_id.len(), 36, "{}", p.boot_id);
        assert_eq!(p, QemuProcess::of(me).expect("again"), "stable");
        assert_eq!(thread_group_of(me), Ok(me));
        assert!(QemuProcess::of(u32::MAX).is_err());
    }
}
