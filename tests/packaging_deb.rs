//! packaging/build-deb.sh: the .deb is built with dpkg-deb from the binaries cargo just built,
//! read back with `dpkg-deb -c`/`-I`/`-f`, and installed into and removed from a scratch root with
//! its maintainer scripts running (`dpkg --root`, chrooted: the root gets /bin/sh, /dev/null and
//! the libraries the binaries need).

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");
const HELPER: &str = env!("CARGO_BIN_EXE_cpuguard-libvirt");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch_root(root: &Path) {
    let ldd = run(Command::new("ldd").arg("/bin/sh").arg(BIN));
    let mut files: Vec<String> = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/') && !w.ends_with(':'))
        .map(str::to_string)
        .collect();
    files.push("/bin/sh".to_string());
    files.sort();
    files.dedup();
    for f in files {
        let dest = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&f, &dest).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    for d in [
        "dev",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "").expect("write");
    }
    run(Command::new("mknod")
        .args(["-m", "666"])
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"]));
}

#[test]
fn deb_builds_and_installs_into_a_scratch_root() {
    // Installing into a scratch root (chroot, mknod) needs root.
    if !gate::require(&[Need::Root]) {
        return;
    }
    let out = tempfile::tempdir().expect("tempdir");
    let bin_dir = Path::new(BIN).parent().expect("bin dir");
    assert_eq!(Path::new(HELPER).parent(), Some(bin_dir));
    let deb = run(Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/build-deb.sh"
    ))
    .arg(bin_dir)
    .arg(out.path()));
    let deb = PathBuf::from(deb.trim());
    assert!(deb.is_file(), "{}", deb.display());
    let deb_arg = deb.to_str().expect("utf-8");

    let contents = run(Command::new("dpkg-deb").args(["-c", deb_arg]));
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(path))
            .unwrap_or_else(|| panic!("{path} not in {contents}"))
            .to_string()
    };
    assert!(entry("./usr/bin/cpuguard").starts_with("-rwxr-xr-x root/root"));
    assert!(entry("./usr/libexec/cpuguard/cpuguard-libvirt").starts_with("-rwxr-xr-x root/root"));
    assert!(entry("./etc/cpuguard/cpuguard.toml").starts_with("-rw-r--r-- root/root"));
    assert!(entry("./var/cache/cpuguard/").starts_with("drwx------ root/root"));
    entry("./usr/lib/tmpfiles.d/cpuguard.conf");
    entry("./usr/share/man/man8/cpuguard.8.gz");
    assert!(!contents.contains("./etc/libvirt"), "{contents}");

    let info = run(Command::new("dpkg-deb").args(["-I", deb_arg]));
    for part in ["conffiles", "postinst", "prerm", "Package: cpuguard"] {
        assert!(info.contains(part), "{part} not in {info}");
    }
    let extract = tempfile::tempdir().expect("tempdir");
    run(Command::new("dpkg-deb")
        .args(["-e", deb_arg])
        .arg(extract.path().join("DEBIAN")));
    let control = |name: &str| {
        std::fs::read_to_string(extract.path().join("DEBIAN").join(name)).expect("control file")
    };
    assert_eq!(control("conffiles").trim(), "/etc/cpuguard/cpuguard.toml");
    assert!(
        control("postinst").contains("/usr/bin/cpuguard install --hooks-dir /etc/libvirt/hooks")
    );
    assert!(control("postinst").contains("cpuguard stamp --all"));
    assert!(control("prerm").contains("/usr/bin/cpuguard uninstall --hooks-dir /etc/libvirt/hooks"));

    let scratch = tempfile::tempdir().expect("tempdir");
    let root = scratch.path();
    scratch_root(root);
    let dpkg = |args: &[&str]| {
        run(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(args))
    };
    let out = dpkg(&["--force-depends", "-i", deb_arg]);
    assert!(
        out.contains("installed the hook: /etc/libvirt/hooks/qemu"),
        "{out}"
    );
    assert!(out.contains("restart libvirtd"), "{out}");
    let hook = root.join("etc/libvirt/hooks/qemu");
    assert_eq!(
        std::fs::read_link(&hook).expect("hook"),
        Path::new("/usr/bin/cpuguard")
    );
    assert_eq!(
        std::fs::metadata(root.join("var/cache/cpuguard"))
            .expect("cache")
            .mode()
            & 0o7777,
        0o700
    );
    let out = dpkg(&["-r", "cpuguard"]);
    assert!(out.contains("removed /etc/libvirt/hooks/qemu"), "{out}");
    assert!(std::fs::symlink_metadata(&hook).is_err());
    assert!(!root.join("usr/bin/cpuguard").exists());
    // A conffile stays until purge.
    assert!(root.join("etc/cpuguard/cpuguard.toml").exists());
    dpkg(&["--purge", "cpuguard"]);
    assert!(!root.join("etc/cpuguard/cpuguard.toml").exists());
}
