//! Hostile input never panics a command or a hook phase: a bounded, seeded mutation loop over
//! what reaches cpuguard from outside — `cpuguard diff` inputs (kvm-unit-tests dumps, `cpuid -r`
//! output, fingerprint JSON), the stamp table in an incoming guest's metadata (parsed by the
//! prepare hook), and the domain XML of both hook phases (migrate, prepare).
//!
//! Every case runs the real binary. What must hold: the exit code is 0, 1 or 2 (never a signal,
//! never Rust's 101), stderr carries no panic message, and a hook phase that refuses prints
//! nothing on stdout (libvirt would take it as the domain XML). The seed is fixed, so a failure
//! is reproducible: the failing input is written beside the test's scratch directory and its
//! path printed.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

#[path = "support/operator.rs"]
mod operator;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cpuguard::fingerprint::Fingerprint;
use operator::{bind_stamps, host_config, namespaced_stamp, scratch_dir, BIN};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const NAME: &str = "web1";
const CPU: &str =
    "<cpu mode='custom' match='exact'><model fallback='forbid'>Haswell-noTSX</model></cpu>";

/// Cases per input kind: a few thousand in all keeps the test to seconds (each case is one
/// process, about 2 ms), while still reaching every parser's error paths many times.
const DIFF_CASES: usize = 1200;
const STAMP_CASES: usize = 700;
const MIGRATE_CASES: usize = 800;
const PREPARE_XML_CASES: usize = 250;

fn domain(metadata: &str) -> String {
    bind_stamps(format!(
        "<domain type='qemu'><name>{NAME}</name><uuid>06c0c0dc-1080-4d3f-bdac-967d624c94f9</uuid>\
         <metadata>{metadata}</metadata><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>{CPU}\
         <devices><emulator>{QEMU}</emulator></devices></domain>"
    ))
}

/// xorshift64*: deterministic, dependency-free, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Fragments that reach parsers' edge cases: multibyte characters (at any byte, so also split),
/// markup, numbers that overflow, the dump formats' own keywords.
const TOKENS: &[&str] = &[
    "é",
    "𝄞",
    "\u{202e}",
    "\u{0}",
    "msr ",
    "0x",
    "ffffffff",
    "100000000",
    "99999999999999999999999",
    "-",
    "+",
    ":",
    " ",
    "\n",
    "\r",
    "\t",
    "&amp;",
    "&#0;",
    "&#x110000;",
    "&bogus;",
    "<",
    ">",
    "<!--",
    "]]>",
    "<![CDATA[",
    "xmlns:cpuguard='http://cpuguard.dev/xmlns/stamp/1'",
    "'",
    "\"",
    "=",
    "</cpu>",
    "<cpu>",
    "CPUID",
    "leaf",
    "END 0",
    "R 3_0_0_4_0 ffffffffffffffff",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = position(rng, &out);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                let bytes = b"\x00\xff<>&\"' \n0fx";
                out[i] = bytes[rng.below(bytes.len())];
            }
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                out.splice(at..at, token.iter().copied());
            }
            3 => {
                let end = (at + 1 + rng.below(64)).min(out.len());
                out.drain(at..end);
            }
            4 => {
                let end = (at + 1 + rng.below(256)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            5 => out.truncate(at),
            _ => {
                let run = vec![b"A0 f"[rng.below(4)]; 1 + rng.below(400)];
                out.splice(at..at, run);
            }
        }
    }
    out
}

/// Half the mutations land uniformly, half within the first bytes of a line: line-oriented
/// parsers (dumps, stamp tables) decide on a line's head, where a split character hurts most.
fn position(rng: &mut Rng, data: &[u8]) -> usize {
    if rng.below(2) == 0 {
        return rng.below(data.len() + 1);
    }
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            data.iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    let start = starts[rng.below(starts.len())];
    (start + rng.below(10)).min(data.len())
}

struct Outcome {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

fn run(config: &Path, args: &[&str], stdin: &[u8]) -> Outcome {
    let mut child = Command::new(BIN)
        .env("CPUGUARD_CONFIG", config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cpuguard");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    // A command may exit before reading all of its input (a diff of files reads none).
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait for cpuguard");
    let _ = writer.join();
    Outcome {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The checks every case must pass; on failure the input is kept for reproduction.
fn assert_sound(what: &str, case: usize, input: &[u8], out: &Outcome, hook: bool, keep: &Path) {
    let sound_code = matches!(out.code, Some(0..=2));
    let no_panic = !out.stderr.contains("panicked");
    let quiet_refusal = !hook || out.code == Some(0) || out.stdout.is_empty();
    if sound_code && no_panic && quiet_refusal {
        return;
    }
    let path = keep.join(format!("{what}-case{case}.bin"));
    let _ = std::fs::write(&path, input);
    panic!(
        "{what} case {case} (input kept at {}): exit {:?}, {} bytes on stdout, stderr: {}",
        path.display(),
        out.code,
        out.stdout.len(),
        out.stderr.chars().take(2000).collect::<String>()
    );
}

/// Where failing inputs are kept: outlives the scratch directory, inside target/.
fn keep_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-inputs-failures");
    std::fs::create_dir_all(&dir).expect("create the failure directory");
    dir
}

/// The probe runs only root-owned emulators as root; without QEMU or root there is no real
/// fingerprint to start from.
fn prerequisites() -> bool {
    gate::require(&[Need::Qemu("x86_64"), Need::Root])
}

/// A real fingerprint of the test domain (TCG probe through the cache, so the prepare cases
/// below find it there and measure nothing).
fn fingerprint(config: &Path, dir: &Path) -> (String, Fingerprint) {
    let plain = dir.join("plain.xml");
    std::fs::write(&plain, domain("")).expect("write the domain");
    let out = run(
        config,
        &["probe", "--cached", "--xml", plain.to_str().expect("utf-8")],
        b"",
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.code, Some(0), "probe failed: {}", out.stderr);
    let fp = Fingerprint::from_json(&json, "probe").expect("the probe's fingerprint");
    (json, fp)
}

#[test]
fn diff_inputs_never_panic() {
    if !prerequisites() {
        return;
    }
    let dir = scratch_dir();
    let keep = keep_dir();
    let config = host_config(dir.path(), "host", QEMU);
    let (json, fp) = fingerprint(&config, dir.path());
    let mut seeds: Vec<Vec<u8>> = vec![json.into_bytes(), fp.raw().to_text().into_bytes()];
    for fixture in ["seed001-case3-src.txt", "seed002-timing-dst.txt"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/cpuid")
            .join(fixture);
        seeds.push(std::fs::read(path).expect("fixture"));
    }
    // `cpuid -r` as operators run it inside a guest (this machine's own CPU).
    if let Ok(out) = Command::new("cpuid").args(["-r", "-1"]).output() {
        if out.status.success() {
            seeds.push(out.stdout);
        }
    }
    let other = dir.path().join("other.txt");
    std::fs::write(&other, &seeds[1]).expect("write");
    let mutated = dir.path().join("mutated");
    let mut rng = Rng(0x00c0_ffee_d00d_f00d);
    for case in 0..DIFF_CASES {
        let input = mutate(&mut rng, &seeds[case % seeds.len()]);
        std::fs::write(&mutated, &input).expect("write");
        let (a, b) = (
            mutated.to_str().expect("utf-8"),
            other.to_str().expect("utf-8"),
        );
        let args: Vec<&str> = match case % 3 {
            0 => vec!["diff", a, b],
            1 => vec!["diff", b, a, "--json"],
            _ => vec!["diff", a, a],
        };
        let out = run(&config, &args, b"");
        assert_sound("diff", case, &input, &out, false, &keep);
    }
}

/// The hook as libvirt runs it on the destination: `migrate begin` (writes the incoming record),
/// then `prepare begin` with `prepare_xml` (the verdict: the stamp against this host's cache).
fn incoming(config: &Path, migrate_xml: &[u8], prepare_xml: &[u8]) -> (Outcome, Outcome) {
    let migrate = run(
        config,
        &["hook", "qemu", NAME, "migrate", "begin", "-"],
        migrate_xml,
    );
    let prepare = run(
        config,
        &["hook", "qemu", NAME, "prepare", "begin", "-"],
        prepare_xml,
    );
    (migrate, prepare)
}

#[test]
fn hook_phases_and_stamp_tables_never_panic() {
    if !prerequisites() {
        return;
    }
    let dir = scratch_dir();
    let keep = keep_dir();
    let config = host_config(dir.path(), "host", QEMU);
    // Stamping after `started` would start helper processes against this machine's libvirt.
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("[stamp]\non_start = false\n");
    std::fs::write(&config, text).expect("config");
    let (_, fp) = fingerprint(&config, dir.path());
    let table = fp.raw().to_text();
    let stamped = domain(&namespaced_stamp("hv-src", &fp.digest, CPU, &table));

    // The unmutated exchange is allowed: the mutations below start from a passing migration.
    let (migrate, prepare) = incoming(&config, stamped.as_bytes(), stamped.as_bytes());
    assert_eq!(migrate.code, Some(0), "{}", migrate.stderr);
    assert_eq!(prepare.code, Some(0), "{}", prepare.stderr);

    let mut rng = Rng(0x5eed_0fca_febe_ef00);
    let mut refused = 0;
    // Stamp tables (and the stamp's attributes): the domain's configuration stays the same, so
    // each verdict is a cache hit, not a probe.
    for case in 0..STAMP_CASES {
        let stamp = if case % 4 == 0 {
            let element = namespaced_stamp("hv-src", &fp.digest, CPU, &table);
            mutate(&mut rng, element.as_bytes())
        } else {
            let bad_table = mutate(&mut rng, table.as_bytes());
            let bad_table = String::from_utf8_lossy(&bad_table).into_owned();
            namespaced_stamp("hv-src", &fp.digest, CPU, &bad_table).into_bytes()
        };
        let xml = domain(&String::from_utf8_lossy(&stamp));
        let (migrate, prepare) = incoming(&config, stamped.as_bytes(), xml.as_bytes());
        assert_sound("stamp-migrate", case, xml.as_bytes(), &migrate, true, &keep);
        assert_sound("stamp-prepare", case, xml.as_bytes(), &prepare, true, &keep);
        refused += usize::from(prepare.code != Some(0));
    }
    assert!(
        refused > 0,
        "no mutated stamp was refused: the mutations miss the stamp"
    );

    // The migrate phase's own parser and rewrite on mutated documents.
    for case in 0..MIGRATE_CASES {
        let xml = mutate(&mut rng, stamped.as_bytes());
        let out = run(
            &config,
            &["hook", "qemu", NAME, "migrate", "begin", "-"],
            &xml,
        );
        assert_sound("migrate", case, &xml, &out, true, &keep);
    }

    // The prepare phase's parser on mutated documents of an incoming guest (some change the CPU
    // configuration and so probe: fewer cases).
    for case in 0..PREPARE_XML_CASES {
        let xml = mutate(&mut rng, stamped.as_bytes());
        let (migrate, prepare) = incoming(&config, stamped.as_bytes(), &xml);
        assert_sound("prepare-migrate", case, &xml, &migrate, true, &keep);
        assert_sound("prepare", case, &xml, &prepare, true, &keep);
    }
}

#[test]
fn a_closed_stdout_ends_a_command_without_a_panic() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cpuid");
    let a = fixtures.join("seed001-case3-src.txt");
    let b = fixtures.join("seed001-case3-dst.txt");
    for json in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.arg("diff").arg(&a).arg(&b);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cpuguard diff");
        // The reader goes away before the command writes: every write meets a closed pipe.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "json={json}: {stderr}");
        use std::os::unix::process::ExitStatusExt;
        let sigpipe = out.status.signal() == Some(nix::libc::SIGPIPE);
        assert!(
            sigpipe || matches!(out.status.code(), Some(0..=2)),
            "json={json}: {:?}, stderr: {stderr}",
            out.status
        );
    }
}
