//! The worst hook inputs up to `max_xml_bytes` (16 MiB) cpuguard's parser can be handed, timed
//! through the real binary's `migrate begin` and `prepare begin` (with an incoming record, so the
//! document is parsed), beside the real 4 KiB libvirt sample (the baseline) and the 1 s limit
//! every input must stay under (libvirt has no timeout on hooks: a VM start waits for it).
//!
//! Inputs: the security review's quadratic cases (40,000 namespace declarations on one element,
//! 400,000 nested elements each declaring one), and what the parser's bounds still accept at the
//! limit: elements with the most attributes, the most namespace declarations in scope over
//! millions of elements, nesting at the deepest depth, a 16 MiB comment, a 16 MiB tag name, a
//! `<cpu>` with a hundred thousand features.
//!
//! Run: `cargo bench --bench hostile_xml` (as root or not; no QEMU is started).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(1);
const MAX: usize = 16 * 1024 * 1024;
const SAMPLE: &str = include_str!("../tests/fixtures/xml/libvirt9-migrate-begin.xml");

/// The sample with `extra` inside a `<metadata>` before `</domain>`, filled to at most `MAX`.
fn with_metadata(extra: &str) -> String {
    SAMPLE.replace(
        "</domain>",
        &format!("<metadata>{extra}</metadata></domain>"),
    )
}

/// Repeats `unit` to fill what is left of the 16 MiB once `around` bytes are accounted for.
fn fill(unit: &str, around: usize) -> String {
    let room = MAX.saturating_sub(SAMPLE.len() + around + 64);
    unit.repeat(room / unit.len().max(1))
}

fn inputs() -> Vec<(&'static str, String)> {
    let mut out = vec![("baseline: libvirt9 sample", SAMPLE.to_string())];

    let decls: String = (0..40_000)
        .map(|i| format!("xmlns:p{i:06}=\"u\" "))
        .collect();
    out.push((
        "review: 40k xmlns on one element",
        with_metadata(&format!("<m:x xmlns:m=\"urn:m\" {decls}/>")),
    ));
    let n = 400_000;
    out.push((
        "review: 400k nested, each xmlns",
        with_metadata(&format!(
            "{}{}",
            "<a xmlns:q='urn:x'>".repeat(n),
            "</a>".repeat(n)
        )),
    ));

    let attrs: String = (0..128).map(|i| format!(" a{i}=\"\"")).collect();
    let unit = format!("<e{attrs}/>");
    out.push((
        "128 attributes per element",
        with_metadata(&format!(
            "<x:app xmlns:x='urn:x'>{}</x:app>",
            fill(&unit, 40)
        )),
    ));

    let ns: String = (0..63).map(|i| format!(" xmlns:n{i}='urn:{i}'")).collect();
    out.push((
        "64 namespaces in scope, 4M elements",
        with_metadata(&format!(
            "<x:app xmlns:x='urn:x'{ns}>{}</x:app>",
            fill("<a/>", ns.len() + 40)
        )),
    ));

    let chain = format!("{}{}", "<d>".repeat(250), "</d>".repeat(250));
    out.push((
        "nesting at depth 253, repeated",
        with_metadata(&format!(
            "<x:app xmlns:x='urn:x'>{}</x:app>",
            fill(&chain, 40)
        )),
    ));

    out.push((
        "16 MiB comment",
        with_metadata(&format!("<!--{}-->", fill("c", 16))),
    ));
    out.push((
        "16 MiB tag name",
        with_metadata(&format!("<{}/>", fill("t", 16))),
    ));
    let cpu = format!(
        "<cpu mode='custom' match='exact' check='partial'><model fallback='allow'>qemu64</model>{}</cpu>",
        fill("<feature policy='require' name='x2apic'/>", 200)
    );
    out.push((
        "<cpu> with 400k features",
        SAMPLE.replacen(
            &SAMPLE[SAMPLE.find("<cpu").expect("cpu")
                ..SAMPLE.find("</cpu>").expect("cpu") + "</cpu>".len()],
            &cpu,
            1,
        ),
    ));
    out
}

fn run(bin: &Path, config: &Path, phase: &str, input: &Path) -> (Duration, Option<i32>) {
    let started = Instant::now();
    let status = Command::new(bin)
        .env("CPUGUARD_CONFIG", config)
        .args(["hook", "qemu", "bench", phase, "begin", "-"])
        .stdin(fs::File::open(input).expect("input"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run cpuguard");
    (started.elapsed(), status.code())
}

fn main() {
    let bin = Path::new(env!("CARGO_BIN_EXE_cpuguard"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("c.toml");
    fs::write(
        &config,
        format!(
            "runtime_dir = \"{}\"\ncache_dir = \"{}\"\n[stamp]\non_start = false\n",
            dir.path().join("run").display(),
            dir.path().join("cache").display()
        ),
    )
    .expect("config");
    let record_input = dir.path().join("record.xml");
    fs::write(&record_input, SAMPLE).expect("write");

    println!(
        "{:<38} {:>9} {:>12} {:>12}  limit {:?}",
        "input", "bytes", "migrate", "prepare", LIMIT
    );
    let mut worst = (Duration::ZERO, "");
    let mut baseline = Duration::ZERO;
    for (name, xml) in inputs() {
        assert!(xml.len() <= MAX, "{name}: {} bytes", xml.len());
        let path = dir.path().join("input.xml");
        fs::write(&path, &xml).expect("write");
        let (migrate, m_code) = run(bin, &config, "migrate", &path);
        // An incoming record makes prepare parse the document (a normal start does not).
        let _ = run(bin, &config, "migrate", &record_input);
        let (prepare, p_code) = run(bin, &config, "prepare", &path);
        let slowest = migrate.max(prepare);
        if name.starts_with("baseline") {
            baseline = slowest;
        } else if slowest > worst.0 {
            worst = (slowest, name);
        }
        println!(
            "{name:<38} {:>9} {:>9.1} ms {:>9.1} ms  exit {}/{} {}",
            xml.len(),
            migrate.as_secs_f64() * 1e3,
            prepare.as_secs_f64() * 1e3,
            m_code.map_or("-".into(), |c| c.to_string()),
            p_code.map_or("-".into(), |c| c.to_string()),
            if slowest > LIMIT {
                "OVER THE LIMIT"
            } else {
                ""
            }
        );
    }
    println!(
        "worst case: {} in {:.1} ms (baseline: the libvirt9 sample in {:.1} ms; limit {:.0} ms)",
        worst.1,
        worst.0.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3,
        LIMIT.as_secs_f64() * 1e3
    );
}
