//! `cpuguard fingerprint measure` and `cpuguard plan` on real probes, and the plan's HTML page
//! rendered by a real browser.
//!
//! Source host hv-a runs three VMs (two Haswell-noTSX, one Nehalem; one of the Haswell ones
//! unstamped). Their stamps are real TCG probes of hv-a. The inventory is built from their
//! domain XML by the same code `cpuguard inventory` runs on libvirt's live XML (a live libvirt
//! with stamped TCG guests is the test bed's, which this test leaves alone); the libvirt-linked
//! path itself reads a domain defined in libvirt's embedded QEMU driver. Destinations: hv-a itself,
//! hv-b whose QEMU withholds avx2 (an emulator wrapper), hv-c that measured only Nehalem.

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/operator.rs"]
mod operator;
use cpuguard::fingerprint::Fingerprint;
use cpuguard::plan::{Inventory, InventoryDomain, INVENTORY_FORMAT, INVENTORY_VERSION};
use operator::{cpu_option_wrapper, host_config, namespaced_stamp, scratch_dir};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const CHROMIUM: &str = "/usr/bin/chromium";

fn domain_xml(name: &str, model: &str, metadata: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>\
         <metadata>{metadata}</metadata>\
         <cpu mode='custom' match='exact'><model fallback='forbid'>{model}</model></cpu>\
         <devices><emulator>{QEMU}</emulator></devices></domain>"
    )
}

fn run(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    operator::cpuguard(config, args, None)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// A real probe of `model` on the host `config`, as the stamp a VM started there would carry.
fn stamp_for(config: &Path, dir: &Path, name: &str, model: &str) -> String {
    let xml = dir.join(format!("{name}-bare.xml"));
    std::fs::write(&xml, domain_xml(name, model, "")).expect("write");
    let (code, out, err) = run(config, &["probe", "--cached", "--xml", s(&xml)]);
    assert_eq!(code, Some(0), "{err}");
    let fp = Fingerprint::from_json(&out, "probe").expect("fingerprint");
    let cpu = format!("<cpu mode='custom'><model>{model}</model></cpu>");
    namespaced_stamp("hv-a", &fp.digest, &cpu, &fp.raw().to_text())
}

#[test]
fn plan_of_three_vms_on_three_destinations_from_real_probes() {
    if !gate::require(&[Need::Qemu("x86_64"), Need::Root, Need::Chromium]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let wrapper = cpu_option_wrapper(d, "qemu-no-avx2", QEMU, "avx2=off");
    let a = host_config(d, "a", QEMU);
    let b = host_config(d, "b", &wrapper);
    let c = host_config(d, "c", QEMU);
    // hv-c has no libvirt to ask for its CPU.
    let mut config = std::fs::read_to_string(&c).expect("config");
    config.push_str("[stamp]\nuri = \"qemu+unix:///system?socket=/nonexistent\"\n");
    std::fs::write(&c, config).expect("write config");

    // hv-a's inventory.
    let domains = vec![
        InventoryDomain::from_xml(
            &domain_xml(
                "web1",
                "Haswell-noTSX",
                &stamp_for(&a, d, "web1", "Haswell-noTSX"),
            ),
            true,
        )
        .expect("web1"),
        InventoryDomain::from_xml(
            &domain_xml("db1", "Nehalem", &stamp_for(&a, d, "db1", "Nehalem")),
            true,
        )
        .expect("db1"),
        InventoryDomain::from_xml(&domain_xml("old1", "Haswell-noTSX", ""), true).expect("old1"),
    ];
    let inventory = Inventory {
        format: INVENTORY_FORMAT.to_string(),
        version: INVENTORY_VERSION,
        hostname: "hv-a".to_string(),
        taken_at: "2026-11-22T05:00:00Z".to_string(),
        // hv-a's CPU comes from its own bundle (it is a destination too).
        host_cpu: None,
        domains,
    };
    let inv = d.join("hv-a-vms.json");
    std::fs::write(
        &inv,
        serde_json::to_string_pretty(&inventory).expect("json"),
    )
    .expect("write");

    // `fingerprint measure` on each destination: two configurations, probed once, then cached.
    // hv-b's CPU is a saved host CPU (AMD EPYC 7601, Zen 1; offline use).
    let epyc_7601 = fixture("epyc-7601-host.xml");
    let (code, out, err) = run(
        &b,
        &[
            "fingerprint",
            "measure",
            s(&inv),
            "-j",
            "2",
            "--host",
            "hv-b",
            "--emulator",
            &wrapper,
            "--host-cpu",
            &epyc_7601,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("2 distinct configurations"), "{err}");
    assert_eq!(err.matches(": measured (").count(), 2, "{err}");
    let bundle: serde_json::Value = serde_json::from_str(&out).expect("bundle");
    assert_eq!(bundle["hostname"], "hv-b");
    assert_eq!(bundle["entries"].as_array().map(Vec::len), Some(2));
    let hv_b = d.join("hv-b.json");
    std::fs::write(&hv_b, &out).expect("write");
    let (code, _, err) = run(
        &b,
        &[
            "fingerprint",
            "measure",
            s(&inv),
            "--host",
            "hv-b",
            "--emulator",
            &wrapper,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.matches("already measured").count(), 2, "{err}");

    // hv-a's CPU from a live libvirt (through cpuguard-libvirt): the embedded QEMU driver's
    // domain capabilities, i.e. this machine's host-model CPU.
    let root = d.join("embed");
    let live = format!("qemu:///embed?root={}", root.display());
    let (code, out, err) = run(
        &a,
        &[
            "fingerprint",
            "measure",
            s(&inv),
            "--host",
            "hv-a",
            "--host-cpu",
            &live,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let bundle: serde_json::Value = serde_json::from_str(&out).expect("bundle");
    assert_eq!(bundle["version"], 2);
    assert_eq!(bundle["host_cpu"]["source"], "domain-capabilities", "{out}");
    let hv_a = d.join("hv-a.json");
    std::fs::write(&hv_a, &out).expect("write");
    // hv-c measured only what its own Nehalem VM needed.
    let nehalem = d.join("db1-bare.xml");
    let (code, _, err) = run(&c, &["probe", "--cached", "--xml", s(&nehalem)]);
    assert_eq!(code, Some(0), "{err}");
    // hv-c's bundle is an old one (version 1, no host CPU): what a cpuguard before the baseline
    // wrote. Without --host-cpu and without a reachable libvirt the export says so and goes on.
    let (code, out, err) = run(&c, &["fingerprint", "export", "--host", "hv-c"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("no host CPU in the bundle"), "{err}");
    let mut old: serde_json::Value = serde_json::from_str(&out).expect("bundle");
    assert!(old.get("host_cpu").is_none(), "{out}");
    old["version"] = serde_json::json!(1);
    let hv_c = d.join("hv-c.json");
    std::fs::write(&hv_c, old.to_string()).expect("write");

    // The plan, as text.
    let to = [s(&hv_a), s(&hv_b), s(&hv_c)];
    let mut args = vec!["plan", s(&inv), "--to"];
    args.extend(to);
    let (code, text, err) = run(&a, &args);
    assert_eq!(code, Some(1), "not every VM can go everywhere: {text}{err}");
    let section = |vm: &str| -> String {
        text.split("\n\n")
            .next()
            .unwrap_or("")
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{vm} (on hv-a")))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let web1 = section("web1");
    assert!(web1.contains("hv-b: no-go: lost avx2"), "{text}");
    assert!(
        web1.contains("hv-c: not measured: run `cpuguard fingerprint measure` on hv-c"),
        "{text}"
    );
    assert!(
        !web1.contains("hv-a:"),
        "the VM's own host is no destination: {text}"
    );
    let db1 = section("db1");
    assert!(
        db1.contains("hv-b: go") && db1.contains("hv-c: go"),
        "{text}"
    );
    assert!(
        section("old1").contains("hv-b: unstamped: no stamp: run `cpuguard stamp old1` on hv-a"),
        "{text}"
    );
    assert!(
        text.contains("summary: 1 of 3 VMs can go to every destination, 2 to none"),
        "{text}"
    );
    assert!(text.contains("  hv-b can take 1 of 3 VMs"), "{text}");
    assert!(
        text.contains("  hv-c can take 1 of 3 VMs (1 not measured)"),
        "{text}"
    );
    assert!(
        text.contains("blocked on hv-a (2 VMs): web1, old1"),
        "{text}"
    );
    assert!(text.contains("blocked by: avx2 (1)"), "{text}");
    // hv-c's old bundle has no host CPU: the command instead, with the reason.
    assert!(
        text.contains(
            "the CPU that frees them after a restart: not computed here (no host CPU for hv-c"
        ),
        "{text}"
    );
    assert!(
        text.contains("cpuguard baseline qemu+ssh://hv-a/system qemu+ssh://hv-b/system qemu+ssh://hv-c/system"),
        "{text}"
    );

    // hv-c exports again with its CPU (a saved `virsh domcapabilities`): now the plan computes
    // the baseline of hv-a, hv-b and hv-c.
    let milan = fixture("this-host-epyc-milan-pvm-domcaps.xml");
    let (code, out, err) = run(
        &c,
        &[
            "fingerprint",
            "export",
            "--host",
            "hv-c",
            "--host-cpu",
            &milan,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    std::fs::write(&hv_c, &out).expect("write");
    let mut args = vec!["plan", s(&inv), "--verbose", "--to"];
    args.extend(to);
    let (code, text, err) = run(&a, &args);
    assert_eq!(code, Some(1), "{text}{err}");
    // `CPUGUARD_PLAN_EXAMPLE=FILE` keeps the text for the example in docs/operator/cli.md.
    if let Some(keep) = std::env::var_os("CPUGUARD_PLAN_EXAMPLE") {
        std::fs::write(keep, &text).expect("write the example");
    }
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("    the CPU that frees them after a restart: "))
        .expect("a baseline line");
    assert!(!line.contains("not computed"), "{text}");
    // This machine's host-model disables much under its nested KVM (pni among them), so the
    // common CPU is a generic model plus what all three share.
    assert!(
        line.contains(" -invtsc") && line.contains(" -pni"),
        "{line}"
    );
    assert!(
        text.contains("      <cpu mode='custom' match='exact' check='full'>"),
        "{text}"
    );
    assert!(
        text.contains("      features given up, per host: "),
        "{text}"
    );

    // JSON and HTML.
    let html = d.join("plan.html");
    let mut args = vec!["plan", s(&inv), "--json", "--html", s(&html), "--to"];
    args.extend(to);
    let (code, json, err) = run(&a, &args);
    assert_eq!(code, Some(1), "{err}");
    let p: serde_json::Value = serde_json::from_str(&json).expect("plan JSON");
    assert_eq!(p["schema_version"], 1);
    assert_eq!(p["hosts"], serde_json::json!(["hv-a", "hv-b", "hv-c"]));
    let web1 = p["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "web1"))
        .expect("web1");
    let cell = &web1["cells"][1];
    assert_eq!(cell["verdict"], "no-go");
    let outcome = &p["outcomes"][cell["outcome"].as_u64().expect("index") as usize];
    assert_eq!(outcome["lost"], serde_json::json!(["avx2"]));
    assert_eq!(web1["cells"][0]["verdict"], "source");
    assert_eq!(web1["cells"][2]["verdict"], "not-measured");
    assert_eq!(p["summary"]["go_anywhere"], 1);
    let blocked = &p["summary"]["blocked"][0];
    assert_eq!(blocked["baseline_unavailable"], serde_json::Value::Null);
    let cpu_xml = blocked["baseline"]["cpu_xml"].as_str().expect("cpu_xml");
    runs_on_every_host(cpu_xml, &[&hv_a, &hv_b, &hv_c], &live, d);

    // Bad input: one line, exit 2, JSON too with --json.
    let (code, out, err) = run(&a, &["plan", s(&hv_a), "--to", s(&hv_b), "--json"]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("hv-a.json: not a cpuguard inventory"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("error JSON");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("hv-a.json")));

    render_in_chromium(&html, d);
}

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/domcaps/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The baseline `<cpu>` really runs on each host: with libvirt's CPU map, every feature it
/// gives a guest is one the host's CPU (as its bundle recorded it) gives; and libvirt itself,
/// asked on hv-a (the live host whose CPU was read through the embedded driver), finds the CPU
/// runnable there (`virsh hypervisor-cpu-compare`: identical or a subset of the host's).
fn runs_on_every_host(cpu_xml: &str, bundles: &[&Path], live: &str, dir: &Path) {
    use cpuguard::baseline::{parse_cpu, CpuMap, HostCpu, DEFAULT_CPU_MAP};
    let map = CpuMap::load(Path::new(DEFAULT_CPU_MAP)).expect("libvirt's CPU map");
    let baseline = parse_cpu(cpu_xml, "baseline").expect("baseline <cpu>");
    let guest = map.expand(&baseline, "baseline").expect("known model");
    assert!(
        guest.contains("sse2") && !guest.contains("invtsc"),
        "{guest:?}"
    );
    for bundle in bundles {
        let text = std::fs::read_to_string(bundle).expect("bundle");
        let v: serde_json::Value = serde_json::from_str(&text).expect("bundle JSON");
        let host: HostCpu = serde_json::from_value(v["host_cpu"].clone()).expect("host_cpu");
        let own = map.expand(&host.cpu, &host.origin).expect("host model");
        let missing: Vec<&String> = guest.difference(&own).collect();
        assert!(missing.is_empty(), "{} lacks {missing:?}", bundle.display());
    }
    let file = dir.join("baseline-cpu.xml");
    std::fs::write(&file, cpu_xml).expect("write");
    let out = Command::new("virsh")
        .args(["-c", live, "hypervisor-cpu-compare"])
        .arg(&file)
        .output()
        .expect("run virsh");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && (said.contains("identical") || said.contains("superset")),
        "hypervisor-cpu-compare: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Renders the page in headless Chromium: a screenshot of a sensible size, and a DOM with one
/// coloured cell per VM and destination.
fn render_in_chromium(html: &Path, dir: &Path) {
    let page = std::fs::read_to_string(html).expect("read page");
    assert!(!page.contains("<script"), "no scripts needed to read it");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no network"
    );
    let url = format!("file://{}", html.display());
    let chromium = |extra: &[String]| {
        let profile = tempfile::tempdir_in(dir).expect("profile");
        let out = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = chromium(&["--dump-dom".to_string()]);
    let count = |class: &str| dom.matches(&format!("<td class=\"{class}\"")).count();
    assert_eq!(count("go"), 2, "db1 to hv-b and hv-c: {dom}");
    assert_eq!(count("no-go"), 1, "{dom}");
    assert_eq!(count("not-measured"), 1, "{dom}");
    assert_eq!(count("unstamped"), 2, "{dom}");
    assert_eq!(count("source"), 3, "{dom}");
    assert_eq!(
        dom.matches("<tr>").count(),
        4,
        "header and three VMs: {dom}"
    );
    assert_eq!(dom.matches("<code class=\"baseline\">").count(), 1, "{dom}");
    assert!(
        dom.contains("<pre class=\"baseline-xml\">&lt;cpu mode='custom'"),
        "{dom}"
    );

    let shot = dir.join("plan.png");
    chromium(&[
        format!("--screenshot={}", shot.display()),
        "--window-size=1200,800".to_string(),
    ]);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
    let height = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
    assert_eq!((width, height), (1200, 800), "screenshot size");
    // Not a blank page: the coloured cells make the image far larger than an empty one.
    assert!(png.len() > 10_000, "screenshot of {} bytes", png.len());
}

#[test]
fn inventory_reads_domains_through_libvirt() {
    // libvirt's embedded QEMU driver: a real libvirt (its own state under a private root, no
    // daemon), the domain defined with virsh, read back by `cpuguard-libvirt inventory`.
    let dir = scratch_dir();
    let root = dir.path().join("root");
    let uri = format!("qemu:///embed?root={}", root.display());
    let xml = dir.path().join("inv1.xml");
    std::fs::write(&xml, domain_xml("inv1", "Nehalem", "")).expect("write");
    let out = Command::new("virsh")
        .args(["-c", &uri, "define"])
        .arg(&xml)
        .output()
        .expect("run virsh");
    assert!(
        out.status.success(),
        "virsh define: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let helper = PathBuf::from(env!("CARGO_BIN_EXE_cpuguard-libvirt"));
    let inventory = |extra: &[&str]| {
        let out = Command::new(&helper)
            .args(["inventory", "--uri", &uri, "--host", "hv-test"])
            .args(extra)
            .env("CPUGUARD_CONFIG", "/nonexistent/cpuguard.toml")
            .output()
            .expect("run cpuguard-libvirt");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("inventory JSON")
    };
    let running = inventory(&[]);
    assert_eq!(running["format"], INVENTORY_FORMAT);
    assert_eq!(running["hostname"], "hv-test");
    assert_eq!(
        running["domains"],
        serde_json::json!([]),
        "inv1 is not running"
    );
    let all = inventory(&["--all"]);
    let d = &all["domains"][0];
    assert_eq!(d["name"], "inv1");
    assert_eq!(d["running"], false);
    assert_eq!(d["stamp"], serde_json::Value::Null);
    assert_eq!(d["label"], "Nehalem (custom), pc-i440fx-7.2/tcg, 1 vCPUs");
    assert_eq!(d["config"]["cpu"]["model"], "Nehalem");
    // The source's own CPU, for the plan's baseline: libvirt's host-model there.
    assert_eq!(all["host_cpu"]["source"], "domain-capabilities", "{all}");
    assert_eq!(all["host_cpu"]["arch"], "x86_64", "{all}");
    // It reads back as an inventory `cpuguard plan` accepts.
    let path = dir.path().join("inv.json");
    std::fs::write(&path, all.to_string()).expect("write");
    cpuguard::plan::load_inventory(&path).expect("valid inventory");

    // An unreachable URI is one line, exit 2.
    let out = Command::new(&helper)
        .args([
            "inventory",
            "--uri",
            "qemu+unix:///system?socket=/nonexistent",
        ])
        .env("CPUGUARD_CONFIG", "/nonexistent/cpuguard.toml")
        .output()
        .expect("run cpuguard-libvirt");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}
