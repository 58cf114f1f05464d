//! packaging/cpuguard.spec: the RPM is built here with rpmbuild (Debian's `rpm` package) from the
//! binaries cargo just built, its contents, permissions and scripts are read back with `rpm -qp`,
//! and it is installed into and erased from scratch roots with its scriptlets running (chrooted:
//! the root gets /bin/sh, /dev/null and the shared libraries the binaries need).

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

/// Builds the RPM into `topdir` and returns its path.
fn build_rpm(topdir: &Path) -> PathBuf {
    assert!(
        Path::new("/usr/bin/rpmbuild").exists(),
        "rpmbuild is missing: apt-get install rpm (testbed/install-deps.sh does)"
    );
    let bin_dir = Path::new(BIN).parent().expect("bin dir");
    assert_eq!(Path::new(HELPER).parent(), Some(bin_dir));
    run(Command::new("rpmbuild")
        .arg("-bb")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/cpuguard.spec"
        ))
        .arg("--define")
        .arg(format!("_topdir {}", topdir.display()))
        .arg("--define")
        .arg(format!("cpuguard_src {}", env!("CARGO_MANIFEST_DIR")))
        .arg("--define")
        .arg(format!("cpuguard_bin {}", bin_dir.display())));
    topdir.join("RPMS/x86_64/cpuguard-0.1.0-1.x86_64.rpm")
}

/// A root rpm can run scriptlets in: /bin/sh, /dev/null, and the libraries of sh and cpuguard.
fn scratch_root(dir: &Path) -> PathBuf {
    let root = dir.to_path_buf();
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
    std::fs::create_dir_all(root.join("dev")).expect("mkdir dev");
    run(Command::new("mknod")
        .args(["-m", "666"])
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"]));
    run(Command::new("rpm").arg("--root").arg(&root).arg("--initdb"));
    root
}

fn rpm_in(root: &Path, args: &[&str]) -> String {
    run(Command::new("rpm").arg("--root").arg(root).args(args))
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn rpm_builds_and_installs_into_scratch_roots() {
    // Installing into a scratch root (chroot, mknod) needs root.
    if !gate::require(&[Need::Root, Need::Tool("rpmbuild")]) {
        return;
    }
    let top = tempfile::tempdir().expect("tempdir");
    let rpm = build_rpm(top.path());
    assert!(rpm.is_file(), "{}", rpm.display());
    let rpm_arg = rpm.to_str().expect("utf-8");

    // Contents.
    let list = run(Command::new("rpm").args(["-qlp", rpm_arg]));
    let files: Vec<&str> = list.lines().collect();
    for expected in [
        "/usr/bin/cpuguard",
        "/usr/libexec/cpuguard/cpuguard-libvirt",
        "/etc/cpuguard/cpuguard.toml",
        "/usr/lib/tmpfiles.d/cpuguard.conf",
        "/usr/share/man/man8/cpuguard.8",
        "/var/cache/cpuguard",
        "/run/cpuguard",
    ] {
        assert!(files.contains(&expected), "{expected} not in {list}");
    }
    assert!(
        !files.iter().any(|f| f.starts_with("/etc/libvirt")),
        "the hook link is made by %post, not owned by the package: {list}"
    );

    // Permissions and flags: root-only cache and runtime dirs, config noreplace, ghost /run.
    let info = run(Command::new("rpm").args([
        "-qp",
        "--qf",
        "[%{FILENAMES} %{FILEMODES:perms} %{FILEUSERNAME} %{FILEFLAGS:fflags}\n]",
        rpm_arg,
    ]));
    let line = |path: &str| {
        info.lines()
            .find(|l| l.split(' ').next() == Some(path))
            .unwrap_or_else(|| panic!("{path} not in {info}"))
            .to_string()
    };
    assert!(
        line("/var/cache/cpuguard").contains(" drwx------ root"),
        "{info}"
    );
    assert!(line("/run/cpuguard").contains(" drwx------ root"), "{info}");
    assert!(line("/run/cpuguard").ends_with('g'), "ghost: {info}");
    assert!(
        line("/usr/bin/cpuguard").contains(" -rwxr-xr-x root"),
        "{info}"
    );
    let config = line("/etc/cpuguard/cpuguard.toml");
    assert!(config.contains(" -rw-r--r-- root"), "{config}");
    assert!(config.ends_with(" cn"), "config(noreplace): {config}");

    // Scripts: %post installs the hook (qemu.d when taken), stamps, says restart; %preun
    // removes the hook on erase only.
    let scripts = run(Command::new("rpm").args(["-qp", "--scripts", rpm_arg]));
    let (post, preun) = scripts
        .split_once("preuninstall scriptlet")
        .unwrap_or_else(|| panic!("no %preun in {scripts}"));
    assert!(post.contains("postinstall scriptlet"), "{scripts}");
    assert!(
        post.contains("/usr/bin/cpuguard install --hooks-dir /etc/libvirt/hooks"),
        "{post}"
    );
    assert!(post.contains("cpuguard stamp --all"), "{post}");
    assert!(post.contains("restart libvirtd"), "{post}");
    assert!(preun.contains("if [ \"$1\" -eq 0 ]"), "{preun}");
    assert!(
        preun.contains("/usr/bin/cpuguard uninstall --hooks-dir /etc/libvirt/hooks"),
        "{preun}"
    );

    // A host whose hook directory is empty: the hook becomes /etc/libvirt/hooks/qemu.
    let fresh = tempfile::tempdir().expect("tempdir");
    let root = scratch_root(fresh.path());
    let out = rpm_in(&root, &["-i", "--nodeps", rpm_arg]);
    assert!(
        out.contains("installed the hook: /etc/libvirt/hooks/qemu"),
        "{out}"
    );
    assert!(out.contains("restart libvirtd"), "{out}");
    let hook = root.join("etc/libvirt/hooks/qemu");
    assert_eq!(
        std::fs::read_link(&hook).expect("hook link"),
        Path::new("/usr/bin/cpuguard")
    );
    assert_eq!(mode(&root.join("var/cache/cpuguard")), 0o700);
    assert_eq!(
        mode(&root.join("usr/libexec/cpuguard/cpuguard-libvirt")),
        0o755
    );
    assert_eq!(mode(&root.join("etc/cpuguard/cpuguard.toml")), 0o644);
    // The installed binary works inside the root and reads the packaged configuration.
    let config = run(Command::new("chroot")
        .arg(&root)
        .args(["/usr/bin/cpuguard", "config"]));
    assert!(config.contains("/etc/cpuguard/cpuguard.toml"), "{config}");
    // A changed configuration survives erase (noreplace keeps it as .rpmsave).
    std::fs::write(
        root.join("etc/cpuguard/cpuguard.toml"),
        "incoming_ttl_secs = 60\n",
    )
    .expect("edit config");
    rpm_in(&root, &["-e", "cpuguard"]);
    assert!(
        std::fs::symlink_metadata(&hook).is_err(),
        "hook removed on erase"
    );
    assert!(!root.join("usr/bin/cpuguard").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/cpuguard/cpuguard.toml.rpmsave")).expect("rpmsave"),
        "incoming_ttl_secs = 60\n"
    );

    // A host where another program owns hooks/qemu: it is left alone, cpuguard goes to qemu.d.
    let taken = tempfile::tempdir().expect("tempdir");
    let root = scratch_root(taken.path());
    let hooks = root.join("etc/libvirt/hooks");
    std::fs::create_dir_all(&hooks).expect("mkdir hooks");
    let other = b"#!/bin/sh\n# another program's hook\nexit 0\n";
    std::fs::write(hooks.join("qemu"), other).expect("write other hook");
    std::fs::set_permissions(hooks.join("qemu"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let out = rpm_in(&root, &["-i", "--nodeps", rpm_arg]);
    assert!(out.contains("belongs to another program"), "{out}");
    assert_eq!(
        std::fs::read(hooks.join("qemu")).expect("other hook"),
        other
    );
    assert_eq!(
        std::fs::read_link(hooks.join("qemu.d/50-cpuguard")).expect("dispatch link"),
        Path::new("/usr/bin/cpuguard")
    );
    rpm_in(&root, &["-e", "cpuguard"]);
    assert!(std::fs::symlink_metadata(hooks.join("qemu.d/50-cpuguard")).is_err());
    assert_eq!(
        std::fs::read(hooks.join("qemu")).expect("other hook"),
        other
    );
}
