//! cpuguard's `-machine`, `-accel`, `-cpu` and `-smp` for the probe against what libvirt itself
//! puts on the command line (`virsh domxml-to-native qemu-argv`), for the hand-written domains in
//! tests/fixtures/domains/ and for a generated corpus (tests/support/domain_corpus.rs).
//!
//! libvirt runs privately (tests/support/libvirtd.rs): its own namespaces, owned by the test,
//! neither disturbing nor seeing any other libvirtd on the machine. Needs root, `unshare` and
//! libvirt-daemon-system. libvirt's answers for the corpus are stored in
//! tests/fixtures/libvirt-argv/ (tests/support/libvirt_answers.rs): the `stored` test checks them
//! without libvirt, the `live` test asks libvirt again and compares both.
//! `CPUGUARD_RECORD_LIBVIRT_ARGV=1` makes the live test (re)write the stored answers.
//!
//! The verdict for one definition (`judge`):
//! - libvirt refuses it: on this machine only (its host CPU cannot give the CPU, or the TSC
//!   frequency is out of range: "not comparable here") or everywhere (a configuration error);
//! - libvirt starts it and cpuguard refuses it: the message must name the construct (every
//!   `<element attr='value'>` it quotes occurs in the XML);
//! - otherwise the machine type, accelerator, `-cpu` (model, and properties as a set: libvirt keeps
//!   the XML's feature order, cpuguard sorts) and `-smp` must be equal, or, where they are spelled
//!   differently (a machine alias, say), the probe is booted with both and the CPUID tables must be
//!   equal ("match by probe").

#[path = "support/gate.rs"]
mod gate;
use gate::Need;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpuguard::domain::guest::{Accel, GuestCpuConfig};
use cpuguard::qemu::models::qemu_cpu_models;
use cpuguard::x86_64::probe::args::{
    accel_name, check_model_available, cpu_arg, probe_args, smp_arg,
};
use cpuguard::x86_64::probe::firmware::{PROBE_EXIT_STATUS, PROBE_X86};
use cpuguard::x86_64::CpuidTable;

#[path = "support/libvirtd.rs"]
mod libvirtd;
use libvirtd::PrivateLibvirtd;
#[path = "support/domain_corpus.rs"]
mod domain_corpus;
#[path = "support/libvirt_answers.rs"]
mod libvirt_answers;
use libvirt_answers::Answer;

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/domains")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    files
}

/// How one definition came out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Match,
    /// Spelled differently, CPUID tables equal: what differed.
    MatchByProbe(String),
    /// libvirt starts it, cpuguard refuses with this message (naming the construct).
    Refused(String),
    /// libvirt refuses it on this machine only (host CPU, TSC).
    NotComparableHere(String),
    /// libvirt refuses it everywhere.
    LibvirtRefuses(String),
}

impl Verdict {
    fn kind(&self) -> &'static str {
        match self {
            Verdict::Match => "match",
            Verdict::MatchByProbe(_) => "match by probe",
            Verdict::Refused(_) => "refused by cpuguard, naming the construct",
            Verdict::NotComparableHere(_) => "not comparable on this machine",
            Verdict::LibvirtRefuses(_) => "refused by libvirt",
        }
    }
}

/// The emulator a probe of `config` runs (the XML's, or the architecture's default at /usr/bin).
fn emulator_of(config: &GuestCpuConfig) -> String {
    config
        .emulator
        .clone()
        .unwrap_or_else(|| format!("/usr/bin/{}", config.arch.qemu_system()))
}

/// `-cpu help` per emulator, asked once.
#[derive(Default)]
struct Models(HashMap<String, Vec<String>>);

impl Models {
    fn of(&mut self, emulator: &str) -> Result<&[String], String> {
        if !self.0.contains_key(emulator) {
            let list = qemu_cpu_models(Path::new(emulator)).map_err(|e| e.to_string())?;
            self.0.insert(emulator.to_string(), list);
        }
        Ok(&self.0[emulator])
    }
}

/// cpuguard's machine type, accelerator, -cpu and -smp for a definition, or its refusal.
fn ours(xml: &str, models: &mut Models) -> Result<(GuestCpuConfig, String, String), String> {
    let config = GuestCpuConfig::from_domain_xml(xml).map_err(|e| e.to_string())?;
    let emulator = emulator_of(&config);
    check_model_available(&config, &emulator, models.of(&emulator)?).map_err(|e| e.to_string())?;
    let cpu = cpu_arg(&config).map_err(|e| e.to_string())?;
    let smp = smp_arg(&config);
    Ok((config, cpu, smp))
}

/// Every `<element attr='value' other>` a message quotes: the element and each attribute (with
/// its value when quoted) must occur in the XML, so the operator can find the construct.
fn names_construct(message: &str, xml: &str) -> bool {
    let mut found = false;
    for snippet in message.split('<').skip(1) {
        let Some(inner) = snippet.split('>').next() else {
            continue;
        };
        if inner.starts_with('/') || inner.is_empty() {
            continue;
        }
        let mut tokens = inner.split_whitespace();
        let Some(element) = tokens.next() else {
            continue;
        };
        if !xml.contains(&format!("<{element}")) {
            return false;
        }
        for token in tokens {
            let wanted = if token.contains('=') {
                token.to_string()
            } else {
                format!("{token}=")
            };
            if !xml.contains(&wanted) {
                return false;
            }
        }
        found = true;
    }
    found
}

fn cpu_parts(cpu: &str) -> (String, BTreeSet<String>) {
    let mut parts = cpu.split(',');
    let model = parts.next().unwrap_or_default().to_string();
    (model, parts.map(str::to_string).collect())
}

/// Probe runs under the domain's accelerator when this machine has it, else TCG; one run per
/// distinct command line.
struct Prober {
    kvm: bool,
    tables: HashMap<Vec<String>, CpuidTable>,
    work: tempfile::TempDir,
}

impl Prober {
    fn new() -> Prober {
        Prober {
            kvm: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            tables: HashMap::new(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    /// The accelerators to try: the domain's when this machine has it, then TCG (QEMU under
    /// nested KVM refuses some Hyper-V settings that TCG runs).
    fn accels(&self, config: &GuestCpuConfig) -> Vec<Accel> {
        if config.accel == Accel::Kvm && self.kvm {
            vec![Accel::Kvm, Accel::Tcg]
        } else {
            vec![Accel::Tcg]
        }
    }

    /// Boots the probe with cpuguard's command line and with libvirt's options in place of
    /// cpuguard's, under the first accelerator that runs both: Ok(Some(accel)) when the tables
    /// are equal, Ok(None) when QEMU on this machine runs neither, Err when they differ or only
    /// one runs.
    fn same_cpuid(
        &mut self,
        config: &GuestCpuConfig,
        libvirt: &LibvirtOptions,
    ) -> Result<Option<Accel>, String> {
        let mut refusals = Vec::new();
        for accel in self.accels(config) {
            let ours = self.table(config, accel, None);
            let theirs = self.table(config, accel, Some(libvirt));
            match (ours, theirs) {
                (Ok(a), Ok(b)) if a == b => return Ok(Some(accel)),
                (Ok(_), Ok(_)) => {
                    return Err(format!(
                        "the CPUID tables differ under {}",
                        accel_name(accel)
                    ))
                }
                (Err(a), Err(b)) => refusals.push(format!("{}: {a} / {b}", accel_name(accel))),
                (Err(e), Ok(_)) => return Err(format!("only libvirt's command line runs: {e}")),
                (Ok(_), Err(e)) => return Err(format!("only cpuguard's command line runs: {e}")),
            }
        }
        println!(
            "  QEMU runs neither command line here: {}",
            refusals.join("; ")
        );
        Ok(None)
    }

    /// The probe's CPUID table with cpuguard's command line, or with libvirt's machine type, -cpu
    /// and -smp (and -accel options, under the domain's accelerator) put in place of cpuguard's.
    fn table(
        &mut self,
        config: &GuestCpuConfig,
        accel: Accel,
        libvirt: Option<&LibvirtOptions>,
    ) -> Result<CpuidTable, String> {
        let firmware = self.work.path().join("probe.bin");
        let output = self.work.path().join("debugcon.out");
        std::fs::write(&firmware, PROBE_X86).map_err(|e| e.to_string())?;
        let mut argv = probe_args(config, accel, &firmware, &output).map_err(|e| e.to_string())?;
        if let Some(libvirt) = libvirt {
            let accel_value = if accel == config.accel {
                libvirt.accel.clone()
            } else {
                accel_name(accel).to_string()
            };
            for (option, value) in [
                ("-machine", libvirt.machine.as_str()),
                ("-accel", accel_value.as_str()),
                ("-cpu", libvirt.cpu.as_str()),
                ("-smp", libvirt.smp.as_str()),
            ] {
                match argv.iter().position(|a| a == option) {
                    Some(i) => argv[i + 1] = value.to_string(),
                    None => argv.extend([option.to_string(), value.to_string()]),
                }
            }
        }
        if let Some(table) = self.tables.get(&argv) {
            return Ok(table.clone());
        }
        let _ = std::fs::remove_file(&output);
        let emulator = emulator_of(config);
        let stderr = self.work.path().join("stderr");
        let status = run_owned(&emulator, &argv, &stderr, Duration::from_secs(120))?;
        if status != Some(PROBE_EXIT_STATUS) {
            let message = std::fs::read_to_string(&stderr).unwrap_or_default();
            let last = message.lines().last().unwrap_or("no message");
            return Err(format!(
                "-cpu {} ended with {status:?}: {last}",
                argv_value(&argv, "-cpu")
            ));
        }
        let bytes = std::fs::read(&output).map_err(|e| e.to_string())?;
        let table = cpuguard::x86_64::probe::output::parse(&bytes)
            .map_err(|e| format!("probe output: {e}"))?
            .table;
        self.tables.insert(argv, table.clone());
        Ok(table)
    }
}

/// Runs `program argv` in its own process group, owned until it is gone: killed (the whole group)
/// and reaped when it outlives `bound`.
fn run_owned(
    program: &str,
    argv: &[String],
    stderr: &Path,
    bound: Duration,
) -> Result<Option<i32>, String> {
    let stderr = std::fs::File::create(stderr).map_err(|e| e.to_string())?;
    let mut child = Command::new(program)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status.code()),
            Ok(None) if start.elapsed() > bound => {
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return Err(format!("{program} did not finish within {bound:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot wait for {program}: {e}"));
            }
        }
    }
}

/// The verdict for one definition given libvirt's answer (see the module header); Err is a
/// failure of cpuguard.
fn judge(
    name: &str,
    xml: &str,
    answer: &Answer,
    models: &mut Models,
    prober: &mut Prober,
) -> Result<Verdict, String> {
    let (machine, accel, libvirt_cpu, libvirt_smp) = match answer {
        Answer::Error(message) => {
            // What this machine's CPU (or clock) cannot give: another host would start it.
            let host = ["host CPU", "TSC frequency", "TSC scaling"];
            return Ok(if host.iter().any(|h| message.contains(h)) {
                Verdict::NotComparableHere(message.clone())
            } else {
                Verdict::LibvirtRefuses(message.clone())
            });
        }
        Answer::Argv {
            machine,
            accel,
            cpu,
            smp,
        } => (machine, accel, cpu.as_deref(), smp),
    };
    let (config, our_cpu, our_smp) = match ours(xml, models) {
        Ok(ours) => ours,
        Err(message) if names_construct(&message, xml) => return Ok(Verdict::Refused(message)),
        Err(message) => {
            return Err(format!(
            "{name}: libvirt starts it, cpuguard refuses without naming the construct: {message}"
        ))
        }
    };
    let libvirt_accel = accel.split(',').next().unwrap_or_default();
    if accel_name(config.accel) != libvirt_accel {
        return Err(format!(
            "{name}: -accel {accel} (libvirt) vs {}",
            accel_name(config.accel)
        ));
    }
    let libvirt_cpu = libvirt_cpu.ok_or(format!(
        "{name}: libvirt writes no -cpu, cpuguard {our_cpu}"
    ))?;
    let libvirt_machine = machine.split(',').next().unwrap_or_default();
    let (their_model, their_props) = cpu_parts(libvirt_cpu);
    let (our_model, our_props) = cpu_parts(&our_cpu);
    let mut differences = Vec::new();
    if config.machine.as_deref() != Some(libvirt_machine) {
        differences.push(format!(
            "machine {} vs libvirt {libvirt_machine}",
            config.machine.as_deref().unwrap_or("(none)")
        ));
    }
    if accel != libvirt_accel {
        differences.push(format!(
            "-accel {} vs libvirt {accel}",
            accel_name(config.accel)
        ));
    }
    if their_model != our_model || their_props != our_props {
        differences.push(format!(
            "-cpu {our_cpu} vs libvirt {libvirt_cpu} (only libvirt: {:?}, only cpuguard: {:?})",
            their_props.difference(&our_props).collect::<Vec<_>>(),
            our_props.difference(&their_props).collect::<Vec<_>>()
        ));
    }
    if &our_smp != libvirt_smp {
        differences.push(format!("-smp {our_smp} vs libvirt {libvirt_smp}"));
    }
    if differences.is_empty() {
        return Ok(Verdict::Match);
    }
    let difference = differences.join("; ");
    let libvirt = LibvirtOptions {
        machine: libvirt_machine.to_string(),
        accel: accel.clone(),
        cpu: libvirt_cpu.to_string(),
        smp: libvirt_smp.clone(),
    };
    match prober.same_cpuid(&config, &libvirt) {
        Ok(Some(accel)) => Ok(Verdict::MatchByProbe(format!(
            "{difference}; CPUID tables equal under {}",
            accel_name(accel)
        ))),
        // QEMU on this machine refuses both command lines (Hyper-V settings nested KVM lacks):
        // the guest would not start here either, so there is nothing to compare.
        Ok(None) => Ok(Verdict::NotComparableHere(format!(
            "{difference}; QEMU on this machine runs neither command line"
        ))),
        Err(e) => Err(format!("{name}: {difference}; {e}")),
    }
}

/// libvirt's values for the options that decide the guest CPU.
struct LibvirtOptions {
    machine: String,
    accel: String,
    cpu: String,
    smp: String,
}

fn argv_value<'a>(argv: &'a [String], option: &str) -> &'a str {
    argv.iter()
        .position(|a| a == option)
        .and_then(|i| argv.get(i + 1))
        .map_or("?", String::as_str)
}

/// Tallies verdicts, prints one line per definition, fails on any cpuguard failure.
#[derive(Default)]
struct Tally {
    counts: std::collections::BTreeMap<&'static str, usize>,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, name: &str, verdict: Result<Verdict, String>) {
        match verdict {
            Ok(v) => {
                let detail = match &v {
                    Verdict::Match => String::new(),
                    Verdict::MatchByProbe(d)
                    | Verdict::Refused(d)
                    | Verdict::NotComparableHere(d)
                    | Verdict::LibvirtRefuses(d) => format!(": {d}"),
                };
                println!("{name}: {}{detail}", v.kind());
                *self.counts.entry(v.kind()).or_default() += 1;
            }
            Err(e) => self.failures.push(e),
        }
    }

    fn finish(self, total: usize) {
        println!("{total} definitions: {:?}", self.counts);
        assert!(
            self.failures.is_empty(),
            "{} of {total} definitions differ from libvirt:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
        let matched = self.counts.get("match").copied().unwrap_or(0)
            + self.counts.get("match by probe").copied().unwrap_or(0);
        assert!(
            matched * 2 > total,
            "only {matched} of {total} definitions compared equal: {:?}",
            self.counts
        );
    }
}

fn answer_of(daemon: &PrivateLibvirtd, file: &Path) -> Answer {
    let text = daemon
        .domxml_to_native(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    libvirt_answers::from_virsh(&text)
}

#[test]
fn fixtures_match_virsh_domxml_to_native() {
    if !gate::require(&[
        Need::Root,
        Need::Libvirt,
        Need::Tool("unshare"),
        Need::Qemu("x86_64"),
    ]) {
        return;
    }
    let files = fixtures();
    assert!(files.len() >= 8, "fixture corpus shrank: {files:?}");
    let daemon = PrivateLibvirtd::start().unwrap_or_else(|e| panic!("{e}"));
    let (mut models, mut prober, mut tally) = (Models::default(), Prober::new(), Tally::default());
    for file in &files {
        let xml = std::fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let answer = answer_of(&daemon, file);
        tally.add(&name, judge(&name, &xml, &answer, &mut models, &mut prober));
    }
    tally.finish(files.len());
}

/// Where the stored answers came from: libvirt and QEMU versions as the daemon reports them, and
/// the host CPU's model name.
fn origin(daemon: &PrivateLibvirtd) -> String {
    let out = daemon
        .virsh_bounded(&["version"], libvirtd::CALL_BOUND)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".to_string())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "?".to_string());
    format!(
        "{}, {}, host CPU {cpu}",
        version("Using library:"),
        version("Running hypervisor:")
    )
}

#[test]
fn generated_corpus_matches_the_stored_libvirt_answers() {
    let corpus = domain_corpus::corpus();
    assert!(corpus.len() >= 400, "corpus shrank to {}", corpus.len());
    let (mut models, mut prober, mut tally) = (Models::default(), Prober::new(), Tally::default());
    let mut missing = Vec::new();
    for domain in &corpus {
        match libvirt_answers::load(&domain.xml).unwrap_or_else(|e| panic!("{e}")) {
            Some(stored) => tally.add(
                &domain.name,
                judge(
                    &domain.name,
                    &domain.xml,
                    &stored.answer,
                    &mut models,
                    &mut prober,
                ),
            ),
            None => missing.push(domain.name.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} definitions have no stored libvirt answer (run the live test with \
         CPUGUARD_RECORD_LIBVIRT_ARGV=1 on a machine with libvirt): {missing:?}",
        missing.len()
    );
    tally.finish(corpus.len());
}

#[test]
fn generated_corpus_matches_live_libvirt() {
    if !gate::require(&[
        Need::Root,
        Need::Libvirt,
        Need::Tool("unshare"),
        Need::Qemu("x86_64"),
    ]) {
        return;
    }
    let corpus = domain_corpus::corpus();
    let record = std::env::var_os("CPUGUARD_RECORD_LIBVIRT_ARGV").is_some_and(|v| v == "1");
    let daemon = PrivateLibvirtd::start().unwrap_or_else(|e| panic!("{e}"));
    let origin = origin(&daemon);
    let work = tempfile::tempdir().unwrap();
    let (mut models, mut prober, mut tally) = (Models::default(), Prober::new(), Tally::default());
    let mut changed = Vec::new();
    let mut recorded = BTreeSet::new();
    for domain in &corpus {
        let file = work.path().join("domain.xml");
        std::fs::write(&file, &domain.xml).unwrap();
        let answer = answer_of(&daemon, &file);
        match libvirt_answers::load(&domain.xml).unwrap_or_else(|e| panic!("{e}")) {
            // Same libvirt, QEMU and host CPU: libvirt must answer as it did when recorded.
            Some(stored) if stored.origin == origin && stored.answer != answer => {
                changed.push(format!(
                    "{}: stored {:?}, now {:?}",
                    domain.name, stored.answer, answer
                ))
            }
            Some(stored) if stored.origin != origin => println!(
                "{}: stored answer from {}, this machine is {origin}",
                domain.name, stored.origin
            ),
            _ => {}
        }
        if record {
            let path = libvirt_answers::path_for(&domain.xml);
            std::fs::create_dir_all(libvirt_answers::ANSWERS_DIR).unwrap();
            std::fs::write(
                &path,
                libvirt_answers::render(&origin, &domain.name, &answer),
            )
            .unwrap();
            recorded.insert(path);
        }
        tally.add(
            &domain.name,
            judge(&domain.name, &domain.xml, &answer, &mut models, &mut prober),
        );
    }
    if record {
        // Answers for definitions the generator no longer makes.
        for entry in std::fs::read_dir(libvirt_answers::ANSWERS_DIR).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "txt") && !recorded.contains(&path) {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    assert!(
        changed.is_empty() || record,
        "libvirt's answers changed on the machine that recorded them:\n{}",
        changed.join("\n")
    );
    tally.finish(corpus.len());
}

#[test]
fn construct_naming_is_checked_against_the_xml() {
    let xml = "<cpu match='minimum'><model>X</model><feature policy='optional' name='vmx'/>";
    assert!(names_construct("domain CPU <cpu match='minimum'>: …", xml));
    assert!(names_construct(
        "<feature policy='optional' name='vmx'>",
        xml
    ));
    assert!(!names_construct(
        "<feature policy='optional' name='svm'>",
        xml
    ));
    assert!(!names_construct("<cpu mode='host-model'>", xml));
    assert!(!names_construct("no construct at all", xml));
}

/// The running QEMU's argument list for a domain of the private libvirtd (found by its
/// `-name guest=NAME,…`), or None when no such process runs.
fn running_qemu_argv(name: &str) -> Option<Vec<String>> {
    let wanted = format!("guest={name},");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.iter().any(|a| a.starts_with(&wanted)) {
            return Some(argv);
        }
    }
    None
}

/// Every corpus definition cpuguard refuses although libvirt starts it is started for real in
/// the private libvirtd: its live XML (libvirt's resolution of the host-dependent construct) must
/// be accepted by cpuguard and give the command line libvirt starts from that live XML (or,
/// spelled differently, the same CPUID through the probe).
#[test]
fn live_xml_of_every_refused_definition_libvirt_starts_is_probed_as_it_runs() {
    if !gate::require(&[
        Need::Root,
        Need::Libvirt,
        Need::Tool("unshare"),
        Need::Qemu("x86_64"),
    ]) {
        return;
    }
    let corpus = domain_corpus::corpus();
    // No virtlogd in the daemon's namespace, no security driver to set up for diskless guests.
    let conf =
        "stdio_handler = \"file\"\nsecurity_driver = \"none\"\nuser = \"root\"\ngroup = \"root\"\n";
    let daemon =
        PrivateLibvirtd::start_with_qemu_conf(Some(conf)).unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::tempdir().unwrap();
    let (mut models, mut prober, mut tally) = (Models::default(), Prober::new(), Tally::default());
    let mut started = 0;
    let mut not_started = Vec::new();
    for domain in &corpus {
        let refusal = match ours(&domain.xml, &mut models) {
            Err(message) if names_construct(&message, &domain.xml) => message,
            _ => continue,
        };
        let file = work.path().join("domain.xml");
        std::fs::write(&file, &domain.xml).unwrap();
        if !matches!(answer_of(&daemon, &file), Answer::Argv { .. }) {
            continue; // libvirt refuses it too
        }
        let virsh = |args: &[&str]| daemon.virsh_bounded(args, libvirtd::CALL_BOUND);
        let file_arg = file.to_str().unwrap();
        let out = virsh(&["create", file_arg]).unwrap_or_else(|e| panic!("{e}"));
        if !out.status.success() {
            not_started.push(format!(
                "{}: {}",
                domain.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        started += 1;
        let live = virsh(&["dumpxml", &domain.name]);
        let argv = running_qemu_argv(&domain.name);
        // The domain is ours until libvirt has stopped it.
        let destroyed = virsh(&["destroy", &domain.name]);
        assert!(
            destroyed.as_ref().is_ok_and(|o| o.status.success()),
            "{}: virsh destroy failed: {destroyed:?}",
            domain.name
        );
        let live =
            String::from_utf8_lossy(&live.unwrap_or_else(|e| panic!("{e}")).stdout).into_owned();
        let argv = argv.unwrap_or_else(|| panic!("{}: no running QEMU found", domain.name));
        // The oracle is what libvirt starts from the live definition (what a migration's
        // destination starts); the running QEMU's own -cpu is reported beside it, since with
        // check='none' libvirt records features QEMU could not give as disabled in the live XML
        // while the running command line still asks for them.
        let live_file = work.path().join("live.xml");
        std::fs::write(&live_file, &live).unwrap();
        let answer = answer_of(&daemon, &live_file);
        if let Answer::Argv { cpu: Some(cpu), .. } = &answer {
            let running = argv_value(&argv, "-cpu");
            if cpu_parts(cpu) != cpu_parts(running) {
                println!(
                    "  {}: libvirt starts the live XML with -cpu {cpu}; the running QEMU has -cpu {running}",
                    domain.name
                );
            }
        }
        let name = format!("{} (live, refused as: {refusal})", domain.name);
        let verdict = judge(&name, &live, &answer, &mut models, &mut prober);
        let verdict = match verdict {
            Ok(Verdict::Refused(message)) => Err(format!(
                "{name}: cpuguard refuses the live XML libvirt runs: {message}"
            )),
            other => other,
        };
        tally.add(&name, verdict);
    }
    println!(
        "{started} started, {} not started here: {not_started:?}",
        not_started.len()
    );
    assert!(
        started >= 20,
        "only {started} refused definitions could be started"
    );
    tally.finish(started);
}
