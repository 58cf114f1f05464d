//! The built `cpuguard` binary driven exactly as libvirt drives its qemu hook: argv, domain XML on
//! stdin, replacement XML on stdout, exit status. No libvirt needed here; the live-migration test
//! with real daemons is tests/testbed_migration.rs.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");
const MIGRATE_XML: &str = include_str!("fixtures/xml/libvirt9-migrate-begin.xml");
const PREPARE_XML: &str = include_str!("fixtures/xml/libvirt9-prepare-begin.xml");

/// The real migrate-phase sample with its CPU loosened (`match='minimum'`, `fallback='allow'`): the
/// hook must hand back exactly the real sample. `check='partial'` stays: libvirt refuses a migrate
/// hook output whose CPU `check` differs from the source's.
fn loose_sample() -> String {
    MIGRATE_XML
        .replacen("match='exact'", "match='minimum'", 1)
        .replacen("fallback='forbid'", "fallback='allow'", 1)
}

/// A private configuration and runtime directory per test.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(extra_config: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        // Stamping after `started` is tested on its own below; elsewhere it would start real
        // stamp processes against this machine's libvirt.
        let stamp = if extra_config.contains("[stamp]") {
            ""
        } else {
            "\n[stamp]\non_start = false\n"
        };
        let config = format!(
            "runtime_dir = \"{}\"\ncache_dir = \"{}\"\n{extra_config}{stamp}",
            dir.path().join("run").display(),
            dir.path().join("cache").display()
        );
        fs::write(dir.path().join("cpuguard.toml"), config).expect("config");
        Env { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("cpuguard.toml")
    }

    fn incoming_dir(&self) -> PathBuf {
        self.dir.path().join("run/incoming")
    }

    fn run(&self, program: &Path, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(program)
            .args(args)
            .env("CPUGUARD_CONFIG", self.config())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cpuguard");
        let mut input = child.stdin.take().expect("stdin");
        // libvirt writes the whole document; the hook must read it all (a broken pipe here would
        // mean the hook exited without draining).
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || input.write_all(&data));
        let out = child.wait_with_output().expect("wait");
        writer
            .join()
            .expect("writer thread")
            .expect("hook drained its stdin");
        out
    }

    fn hook(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut full = vec!["hook", "qemu"];
        full.extend_from_slice(args);
        self.run(Path::new(BIN), &full, stdin)
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn migrate_phase_pins_the_real_sample_through_every_entry_point() {
    let env = Env::new("");
    let input = loose_sample();

    // 1. As /etc/libvirt/hooks/qemu (argv[0] basename `qemu`).
    let hooks = env.dir.path().join("hooks");
    fs::create_dir_all(hooks.join("qemu.d")).expect("hooks dir");
    symlink(BIN, hooks.join("qemu")).expect("symlink qemu");
    // 2. As a filter in /etc/libvirt/hooks/qemu.d/.
    symlink(BIN, hooks.join("qemu.d/50-cpuguard")).expect("symlink qemu.d");

    let args = ["guest1", "migrate", "begin", "-"];
    let outputs = [
        env.run(&hooks.join("qemu"), &args, input.as_bytes()),
        env.run(&hooks.join("qemu.d/50-cpuguard"), &args, input.as_bytes()),
        env.hook(&args, input.as_bytes()),
    ];
    for out in outputs {
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), MIGRATE_XML);
    }
}

#[test]
fn incoming_record_links_migrate_to_prepare() {
    let env = Env::new("");
    let out = env.hook(&["guest1", "migrate", "begin", "-"], MIGRATE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let records: Vec<_> = fs::read_dir(env.incoming_dir())
        .expect("incoming dir exists")
        .flatten()
        .collect();
    assert_eq!(records.len(), 1);
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(records[0].path()).expect("read")).expect("json");
    assert_eq!(record["domain"], "guest1");
    assert_eq!(record["origin"], "migrate");
    assert_eq!(record["uuid"], "06c0c0dc-1080-4d3f-bdac-967d624c94f9");

    // prepare consumes it: the sample carries no stamp, so the default policy refuses.
    let out = env.hook(&["guest1", "prepare", "begin", "-"], PREPARE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("cpuguard: refusing incoming migration of guest1: the source left no cpuguard stamp\n  run `cpuguard stamp guest1` on the source host"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(fs::read_dir(env.incoming_dir()).expect("dir").count(), 0);
    // The next prepare is a normal start again.
    let out = env.hook(&["guest1", "prepare", "begin", "-"], PREPARE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // With policy.unstamped_source = "allow" the same incoming guest passes.
    let allow = Env::new("[policy]\nunstamped_source = \"allow\"\n");
    let out = allow.hook(&["guest1", "migrate", "begin", "-"], MIGRATE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = allow.hook(&["guest1", "prepare", "begin", "-"], PREPARE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // restore begin records too.
    let out = env.hook(&["guest1", "restore", "begin", "-"], MIGRATE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let record = fs::read_dir(env.incoming_dir())
        .expect("dir")
        .flatten()
        .next()
        .expect("restore record");
    let text = fs::read_to_string(record.path()).expect("read");
    assert!(text.contains("\"origin\":\"restore\""), "{text}");
}

/// A small deterministic generator (xorshift) of domain documents in the shapes libvirt and other
/// tools produce: both quote styles, comments, CDATA, processing instructions, foreign metadata
/// namespaces, odd whitespace. Each document is `prefix + cpu + suffix`, so the test knows, without
/// asking the code under test, which bytes must come back unchanged.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
    fn q(&mut self) -> char {
        if self.next().is_multiple_of(2) {
            '\''
        } else {
            '"'
        }
    }
}

fn generated_document(g: &mut Gen) -> (String, String, String) {
    let q = g.q();
    let ws = g.pick(&["\n  ", "\n\t", " ", "\r\n    ", "\n\n  "]);
    let decl = g.pick(&[
        "",
        "<?xml version='1.0' encoding='UTF-8'?>\n",
        "<?xml version=\"1.0\"?>\n<!-- saved by tool -->\n",
    ]);
    let metadata = g.pick(&[
        "",
        "<metadata><nova:instance xmlns:nova=\"http://openstack.org/xmlns/libvirt/nova/1.1\"><nova:name>vm &amp; co</nova:name></nova:instance></metadata>",
        "<metadata>\n    <app1:foo xmlns:app1='urn:app1'><![CDATA[<cpu mode='host-model'/> & raw]]></app1:foo>\n    <app2:bar xmlns:app2=\"urn:app2\" a='1'   b=\"2\"/>\n  </metadata>",
    ]);
    let pi = g.pick(&[
        "",
        "<?app-hint keep me?>",
        "<!-- comment with <cpu> inside -->",
    ]);
    let model = g.pick(&["Nehalem", "Haswell-noTSX", "EPYC-Milan", "qemu64"]);
    let check = g.pick(&["", " check='partial'", " check=\"none\"", " check='full'"]);
    let match_ = g.pick(&["", " match='exact'", " match=\"minimum\""]);
    let fallback = g.pick(&["", " fallback='allow'", " fallback=\"forbid\""]);
    let inner_comment = g.pick(&["", "<!-- pinned by ops -->", "\n    <!--x-->"]);
    let features = g.pick(&[
        "",
        "<feature policy='require' name='vmx'/>",
        "\n    <feature policy=\"disable\" name=\"invtsc\"/>\n    <feature name='x2apic' policy='require' />",
    ]);
    let prefix = format!(
        "{decl}<domain type={q}kvm{q}>{ws}<name>gen-{n}</name>{ws}<uuid>3e3fce45-4f53-4fa7-bb32-11f34168b82b</uuid>{ws}{metadata}{ws}{pi}{ws}<vcpu placement={q}static{q}>2</vcpu>{ws}",
        n = g.next() % 1000
    );
    let cpu = format!(
        "<cpu mode={q}custom{q}{match_}{check}>{inner_comment}{ws}  <model{fallback}>{model}</model>{features}{ws}</cpu>"
    );
    let suffix = format!(
        "{ws}<devices>{ws}  <emulator>/usr/bin/qemu-system-x86_64</emulator>{ws}</devices>{ws}<seclabel type={q}dynamic{q} model='selinux'><label>a&lt;b</label></seclabel>\n</domain>\n"
    );
    (prefix, cpu, suffix)
}

#[test]
fn every_byte_outside_cpu_is_preserved_on_generated_documents() {
    let env = Env::new("");
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    for i in 0..60 {
        let (prefix, cpu, suffix) = generated_document(&mut g);
        let doc = format!("{prefix}{cpu}{suffix}");
        let out = env.hook(&["gen", "migrate", "begin", "-"], doc.as_bytes());
        assert_eq!(
            out.status.code(),
            Some(0),
            "document {i}: {}\n{doc}",
            stderr(&out)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8 output");
        assert!(text.starts_with(&prefix), "document {i}: prefix changed");
        assert!(text.ends_with(&suffix), "document {i}: suffix changed");
        let new_cpu = &text[prefix.len()..text.len() - suffix.len()];
        for must in ["match=", "exact", "fallback=", "forbid"] {
            assert!(new_cpu.contains(must), "document {i}: {new_cpu}");
        }
        assert!(!new_cpu.contains("minimum") && !new_cpu.contains("allow"));
        // `check` is exactly as sent (libvirt refuses a changed one).
        assert_eq!(
            new_cpu.contains("check"),
            cpu.contains("check"),
            "document {i}"
        );
        for check in ["check='partial'", "check=\"none\"", "check='full'"] {
            assert_eq!(new_cpu.contains(check), cpu.contains(check), "document {i}");
        }
        // Everything in the old <cpu> except the three attributes survives in order.
        let strip = |s: &str| {
            let mut s = s.to_string();
            for a in [
                " check='partial'",
                " check=\"none\"",
                " check='full'",
                " check=\"full\"",
                " match='exact'",
                " match=\"minimum\"",
                " match=\"exact\"",
                " fallback='allow'",
                " fallback=\"forbid\"",
                " fallback='forbid'",
                " match=\"exact\"",
            ] {
                s = s.replace(a, "");
            }
            s
        };
        assert_eq!(strip(new_cpu), strip(&cpu), "document {i}");
    }
}

#[test]
fn bad_input_is_refused_with_one_line_and_no_output() {
    let env = Env::new("max_xml_bytes = 2048\n");
    let big = MIGRATE_XML; // 3.8 KiB, over the 2 KiB limit configured above
    let cases: [(&str, &[u8], &str); 9] = [
        ("malformed", b"<domain><name>x</name>", "malformed"),
        ("mismatched", b"<domain><name>x</nom></domain>", "malformed"),
        ("second-root", b"<domain/><domain/>", "second root element"),
        (
            "doctype",
            b"<!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/shadow'>]><domain>&x;</domain>",
            "DOCTYPE",
        ),
        (
            "entity",
            b"<domain><name>&x;</name></domain>",
            "entity reference &x;",
        ),
        ("oversize", big.as_bytes(), "over the 2048-byte limit"),
        ("not-utf8", b"<domain>\xff\xfe</domain>", "not UTF-8"),
        ("empty", b"", "empty"),
        ("not-a-domain", b"<network/>", "not <domain>"),
    ];
    for (name, input, reason) in cases {
        let out = env.hook(&[name, "migrate", "begin", "-"], input);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(out.stdout.is_empty(), "{name}: partial output");
        let refusal: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("cpuguard: refusing"))
            .collect();
        assert_eq!(refusal.len(), 1, "{name}: {err}");
        assert!(
            refusal[0].starts_with(&format!(
                "cpuguard: refusing incoming migration of {name}: "
            )),
            "{name}: {err}"
        );
        assert!(refusal[0].contains(reason), "{name}: {err}");
    }
    // No record is left for a refused migration.
    assert!(
        !env.incoming_dir().exists() || fs::read_dir(env.incoming_dir()).expect("dir").count() == 0
    );
}

#[test]
fn argument_errors_and_unknown_operations() {
    let env = Env::new("");
    let out = env.hook(&["guest1", "migrate", "begin"], MIGRATE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("expected 4"));
    let out = env.hook(&["a", "b", "c", "d", "e"], b"");
    assert_eq!(out.status.code(), Some(2));
    // libvirt adds operations over time: an unknown one never blocks the VM.
    let out = env.hook(
        &["guest1", "hibernate", "begin", "-"],
        MIGRATE_XML.as_bytes(),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("unknown hook operation hibernate "));
    // Only the qemu driver is served.
    let out = env.run(
        Path::new(BIN),
        &["hook", "lxc", "c", "start", "begin", "-"],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn no_op_phases_are_silent() {
    let env = Env::new("");
    for op in [
        "prepare",
        "start",
        "started",
        "stopped",
        "release",
        "reconnect",
    ] {
        let out = env.hook(&["guest1", op, "begin", "-"], PREPARE_XML.as_bytes());
        assert_eq!(out.status.code(), Some(0), "{op}");
        assert!(out.stdout.is_empty(), "{op}");
        assert!(out.stderr.is_empty(), "{op}: {}", stderr(&out));
    }
}

#[test]
fn broken_config_blocks_migration_but_never_a_normal_start() {
    let env = Env::new("[policy]\nunstamped_source = \"sometimes\"\n");
    let out = env.hook(&["guest1", "migrate", "begin", "-"], MIGRATE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let config = env.config().display().to_string();
    assert!(
        err.contains(&format!("configuration error: {config}:4: ")),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    for op in ["prepare", "start", "started"] {
        let out = env.hook(&["guest1", op, "begin", "-"], PREPARE_XML.as_bytes());
        assert_eq!(out.status.code(), Some(0), "{op}: {}", stderr(&out));
    }
}

#[test]
fn unwritable_runtime_dir_refuses_the_migration() {
    let env = Env::new("");
    // A file where the runtime directory should be: nothing can be created below it.
    fs::write(env.dir.path().join("run"), b"not a directory").expect("blocker");
    let out = env.hook(&["guest1", "migrate", "begin", "-"], MIGRATE_XML.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "runtime directory {}: cannot create",
            env.dir.path().join("run").display()
        )),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
}

/// Without a syslog daemon the hook still works, says so once, and keeps the audit line on stderr.
/// Needs root (a private mount namespace hides /dev/log).
#[test]
fn works_without_syslog() {
    if !gate::require(&[Need::Root, Need::Tool("unshare")]) {
        return;
    }
    let env = Env::new("");
    // Hide /dev/log (when there is one) in a private mount namespace.
    let no_syslog = |phase: &str, input: &[u8]| {
        let script = format!(
            "if [ -e /dev/log ]; then mount --bind /dev/null /dev/log || exit 99; fi; \
             exec {BIN} hook qemu guest1 {phase} begin -"
        );
        env.run(
            Path::new("unshare"),
            &["-m", "--propagation", "private", "sh", "-c", &script],
            input,
        )
    };
    let out = no_syslog("migrate", loose_sample().as_bytes());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), MIGRATE_XML);
    assert_eq!(err.matches("syslog is unavailable").count(), 1, "{err}");
    assert!(
        err.contains("cpuguard: audit: phase=migrate action=rewrote domain=guest1"),
        "{err}"
    );
    // A refusal is still the first thing libvirt shows the operator; the audit lines follow.
    let out = no_syslog("prepare", PREPARE_XML.as_bytes());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("cpuguard: refusing incoming migration of guest1: "),
        "{err}"
    );
    assert!(
        err.contains("cpuguard: audit: phase=prepare action=refused"),
        "{err}"
    );
}

/// The `started` phase must not keep libvirt waiting: the stamp process is detached (own session,
/// stdio on /dev/null) and the hook returns while it still runs.
#[test]
fn started_phase_detaches_the_stamp_helper() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report");
    let helper = dir.path().join("cpuguard-libvirt");
    fs::write(
        &helper,
        format!(
            "#!/bin/bash\nsleep 2\necho \"pid=$$ sid=$(ps -o sid= -p $$ | tr -d ' ') stdin=$(readlink /proc/$$/fd/0) stdout=$(readlink /proc/$$/fd/1) args=$*\" > {}.tmp\nmv {}.tmp {}\n",
            report.display(),
            report.display(),
            report.display()
        ),
    )
    .expect("helper");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let env = Env::new(&format!(
        "[stamp]\non_start = true\nhelper = \"{}\"\n",
        helper.display()
    ));
    let started = std::time::Instant::now();
    let out = env.hook(&["guest1", "started", "begin", "-"], PREPARE_XML.as_bytes());
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(!report.exists(), "the hook waited for the stamp process");
    assert!(
        took < std::time::Duration::from_millis(1500),
        "hook took {took:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !report.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = fs::read_to_string(&report).expect("the stamp process ran");
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("pid"), field("sid"), "own session: {text}");
    assert_eq!(field("stdin"), "/dev/null", "{text}");
    assert_eq!(field("stdout"), "/dev/null", "{text}");
    assert!(
        text.trim_end()
            .ends_with("args=stamp --after-start -- guest1"),
        "{text}"
    );
}

/// libvirt costs ~15x a trivial exec to load: the hook binary must not link it, the helper must.
#[test]
fn only_the_helper_links_libvirt() {
    let ldd = |bin: &str| {
        let out = Command::new("ldd").arg(bin).output().expect("ldd");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(!ldd(BIN).contains("libvirt"), "{}", ldd(BIN));
    let helper = env!("CARGO_BIN_EXE_cpuguard-libvirt");
    assert!(ldd(helper).contains("libvirt.so"), "{}", ldd(helper));
}
