//! A generated corpus of libvirt domain definitions covering what decides a guest's CPU, for
//! comparing cpuguard's probe command line with libvirt's (tests/probe_qemu_args.rs).
//!
//! Include it with `#[path = "support/domain_corpus.rs"] mod domain_corpus;`. The corpus is
//! deterministic (same list, same XML bytes, same order on every run), so libvirt's answer for
//! each definition can be stored under a digest of its XML and checked on machines without
//! libvirt.
//!
//! Axes (libvirt's formatdomain "CPU model and topology", "Hypervisor features", "Time keeping"
//! and "Panic device" sections, as of libvirt 9.0):
//! - domain type `kvm` and `qemu`, every definition;
//! - platforms: x86_64 on `pc`/`q35` (current, old, and the unversioned aliases), i686 on
//!   qemu-system-x86_64 and on qemu-system-i386;
//! - no `<cpu>`, a `<cpu>` with only a topology, every `mode` × `match` × `check` × `fallback`;
//! - every feature `policy` on features QEMU has (vmx, svm, acpi…), features it has not (osxsave,
//!   cmt, mbm_total…), under custom, host-passthrough and maximum CPUs;
//! - each hypervisor-feature block: every Hyper-V enlightenment, passthrough mode, vendor ids,
//!   the `<kvm>` children, `<pmu>`, `<pvspinlock>`, `<apic eoi>`, the panic device, the
//!   paravirtual clocks and the TSC frequency; each with no `<cpu>`, a custom and a host CPU;
//! - CPU models QEMU has and three it lacks (`fallback='allow'` substitutes for them);
//! - vendor ids with a space and with a comma; topologies, offline vCPUs, caches, maxphysaddr.
//!
//! Where crossing every axis would give thousands of near-duplicates, one axis is crossed in full
//! and the others rotate with the entry's index, so each value still meets several others.
#![allow(dead_code)] // each test binary uses its own subset

pub const QEMU_X86_64: &str = "/usr/bin/qemu-system-x86_64";
pub const QEMU_I386: &str = "/usr/bin/qemu-system-i386";

/// One generated definition.
#[derive(Debug, Clone)]
pub struct CorpusDomain {
    /// What it exercises, unique in the corpus (also its `<name>`).
    pub name: String,
    pub xml: String,
}

#[derive(Debug, Clone, Copy)]
struct Platform {
    arch: &'static str,
    machine: &'static str,
    emulator: &'static str,
}

const PLATFORMS: &[Platform] = &[
    Platform {
        arch: "x86_64",
        machine: "pc-i440fx-7.2",
        emulator: QEMU_X86_64,
    },
    Platform {
        arch: "x86_64",
        machine: "pc-q35-7.2",
        emulator: QEMU_X86_64,
    },
    Platform {
        arch: "x86_64",
        machine: "pc-i440fx-2.0",
        emulator: QEMU_X86_64,
    },
    Platform {
        arch: "x86_64",
        machine: "pc-q35-2.6",
        emulator: QEMU_X86_64,
    },
    Platform {
        arch: "x86_64",
        machine: "pc",
        emulator: QEMU_X86_64,
    },
    Platform {
        arch: "x86_64",
        machine: "q35",
        emulator: QEMU_X86_64,
    },
    Platform {
        arch: "i686",
        machine: "pc-i440fx-7.2",
        emulator: QEMU_X86_64,
    },
    Platform {
        arch: "i686",
        machine: "pc-q35-7.2",
        emulator: QEMU_I386,
    },
    Platform {
        arch: "i686",
        machine: "pc-i440fx-1.4",
        emulator: QEMU_I386,
    },
];

const TYPES: &[&str] = &["kvm", "qemu"];

/// Models QEMU 7.2 has, old to new, both vendors, and three libvirt knows but QEMU 7.2 does not
/// (Icelake-Client was removed in QEMU 7.1; pentiumpro and cpu64-rhel6 were never upstream).
const MODELS: &[&str] = &[
    "qemu64",
    "qemu32",
    "kvm64",
    "core2duo",
    "Opteron_G2",
    "Opteron_G3",
    "Nehalem",
    "Westmere-IBRS",
    "SandyBridge",
    "Haswell-noTSX",
    "Skylake-Client-IBRS",
    "EPYC",
    "EPYC-Rome",
    "Dhyana",
    "Icelake-Client",
    "pentiumpro",
    "cpu64-rhel6",
];

/// Features for the policy axis: CPUID features QEMU has (some every host lacks under TCG or on
/// AMD), and libvirt features QEMU has no property for.
const FEATURES: &[&str] = &[
    "vmx",
    "svm",
    "acpi",
    "tm",
    "est",
    "sse4a",
    "tsc_adjust",
    "x2apic",
    "pcid",
    "monitor",
    "invtsc",
    "osxsave",
    "ospke",
    "cmt",
    "mbm_total",
    "mbm_local",
];

const POLICIES: &[Option<&str>] = &[
    None,
    Some("force"),
    Some("require"),
    Some("optional"),
    Some("disable"),
    Some("forbid"),
];

/// Every Hyper-V enlightenment libvirt 9.0 documents, plus two it does not know yet.
const HYPERV_BLOCKS: &[(&str, &str)] = &[
    ("hv-relaxed", "<hyperv><relaxed state='on'/></hyperv>"),
    ("hv-vapic", "<hyperv><vapic state='on'/></hyperv>"),
    (
        "hv-spinlocks",
        "<hyperv><spinlocks state='on' retries='8191'/></hyperv>",
    ),
    ("hv-vpindex", "<hyperv><vpindex state='on'/></hyperv>"),
    ("hv-runtime", "<hyperv><runtime state='on'/></hyperv>"),
    (
        "hv-synic",
        "<hyperv><vpindex state='on'/><synic state='on'/></hyperv>",
    ),
    (
        "hv-stimer",
        "<hyperv><vpindex state='on'/><synic state='on'/><stimer state='on'/></hyperv>",
    ),
    (
        "hv-stimer-direct",
        "<hyperv><vpindex state='on'/><synic state='on'/><stimer state='on'><direct state='on'/></stimer></hyperv>",
    ),
    ("hv-reset", "<hyperv><reset state='on'/></hyperv>"),
    (
        "hv-vendor-id-space",
        "<hyperv><vendor_id state='on' value='KVM Hv'/></hyperv>",
    ),
    (
        "hv-vendor-id",
        "<hyperv><vendor_id state='on' value='KVMKVMKVM'/></hyperv>",
    ),
    (
        "hv-vendor-id-comma",
        "<hyperv><vendor_id state='on' value='KVM,Hv'/></hyperv>",
    ),
    ("hv-frequencies", "<hyperv><frequencies state='on'/></hyperv>"),
    (
        "hv-reenlightenment",
        "<hyperv><reenlightenment state='on'/></hyperv>",
    ),
    (
        "hv-tlbflush",
        "<hyperv><vpindex state='on'/><tlbflush state='on'/></hyperv>",
    ),
    (
        "hv-tlbflush-direct-extended",
        "<hyperv><vpindex state='on'/><tlbflush state='on'><direct state='on'/><extended state='on'/></tlbflush></hyperv>",
    ),
    ("hv-ipi", "<hyperv><vpindex state='on'/><ipi state='on'/></hyperv>"),
    ("hv-evmcs", "<hyperv><vapic state='on'/><evmcs state='on'/></hyperv>"),
    ("hv-avic", "<hyperv><avic state='on'/></hyperv>"),
    ("hv-off", "<hyperv><relaxed state='off'/><vapic state='off'/></hyperv>"),
    (
        "hv-windows",
        "<hyperv mode='custom'><relaxed state='on'/><vapic state='on'/><spinlocks state='on' retries='8191'/><vpindex state='on'/><runtime state='on'/><synic state='on'/><stimer state='on'><direct state='on'/></stimer><reset state='on'/><vendor_id state='on' value='KVM Hv'/><frequencies state='on'/><reenlightenment state='on'/><tlbflush state='on'/><ipi state='on'/></hyperv>",
    ),
    ("hv-passthrough", "<hyperv mode='passthrough'/>"),
    (
        "hv-passthrough-relaxed",
        "<hyperv mode='passthrough'><relaxed state='on'/></hyperv>",
    ),
    ("hv-emsr-bitmap", "<hyperv><emsr_bitmap state='on'/></hyperv>"),
    ("hv-xmm-input", "<hyperv><xmm_input state='on'/></hyperv>"),
];

/// The other `<features>` children and `<clock>`/`<devices>` parts that change CPUID.
const OTHER_BLOCKS: &[(&str, &str)] = &[
    (
        "kvm-hidden",
        "<features><kvm><hidden state='on'/></kvm></features>",
    ),
    (
        "kvm-hint-dedicated",
        "<features><kvm><hint-dedicated state='on'/></kvm></features>",
    ),
    (
        "kvm-poll-control",
        "<features><kvm><poll-control state='on'/></kvm></features>",
    ),
    (
        "kvm-pv-ipi-off",
        "<features><kvm><pv-ipi state='off'/></kvm></features>",
    ),
    (
        "kvm-pv-ipi-on",
        "<features><kvm><pv-ipi state='on'/></kvm></features>",
    ),
    (
        "kvm-dirty-ring",
        "<features><kvm><dirty-ring state='on' size='4096'/></kvm></features>",
    ),
    ("pmu-on", "<features><pmu state='on'/></features>"),
    ("pmu-off", "<features><pmu state='off'/></features>"),
    (
        "pvspinlock-on",
        "<features><pvspinlock state='on'/></features>",
    ),
    (
        "pvspinlock-off",
        "<features><pvspinlock state='off'/></features>",
    ),
    ("apic-eoi-on", "<features><apic eoi='on'/></features>"),
    ("apic-eoi-off", "<features><apic eoi='off'/></features>"),
    ("acpi-apic", "<features><acpi/><apic/></features>"),
    (
        "panic-hyperv",
        "<devices-extra><panic model='hyperv'/></devices-extra>",
    ),
    (
        "panic-isa",
        "<devices-extra><panic model='isa'/></devices-extra>",
    ),
    (
        "clock-kvmclock-off",
        "<clock offset='utc'><timer name='kvmclock' present='no'/></clock>",
    ),
    (
        "clock-kvmclock-on",
        "<clock offset='utc'><timer name='kvmclock' present='yes'/></clock>",
    ),
    (
        "clock-hypervclock",
        "<clock offset='utc'><timer name='hypervclock' present='yes'/></clock>",
    ),
    (
        "clock-tsc-frequency",
        "<clock offset='utc'><timer name='tsc' frequency='2000000000'/></clock>",
    ),
];

/// The `<cpu>` shapes the feature blocks are crossed with.
const BLOCK_CPUS: &[(&str, &str)] = &[
    ("nocpu", ""),
    ("custom", "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>Nehalem</model></cpu>"),
    ("passthrough", "<cpu mode='host-passthrough' check='none'/>"),
    ("maximum", "<cpu mode='maximum' check='none'/>"),
];

struct Parts<'a> {
    name: String,
    domain_type: &'a str,
    platform: Platform,
    vcpu: &'a str,
    cpu: String,
    features: String,
    clock: String,
    devices: String,
}

impl Parts<'_> {
    fn xml(&self) -> String {
        let Platform {
            arch,
            machine,
            emulator,
        } = self.platform;
        format!(
            "<domain type='{}'>\n  <name>{}</name>\n  <memory unit='KiB'>65536</memory>\n  {}\n  \
             <os>\n    <type arch='{arch}' machine='{machine}'>hvm</type>\n  </os>\n  {}\n  {}\n  {}\n  \
             <devices>\n    <emulator>{emulator}</emulator>\n    {}\n  </devices>\n</domain>\n",
            self.domain_type, self.name, self.vcpu, self.features, self.cpu, self.clock, self.devices
        )
    }
}

fn attr(name: &str, value: Option<&str>) -> String {
    value.map_or(String::new(), |v| format!(" {name}='{v}'"))
}

/// Splits an `OTHER_BLOCKS`/`HYPERV_BLOCKS` body into its `<features>`, `<clock>` and devices.
fn place_block(parts: &mut Parts, block: &str) {
    if let Some(devices) = block
        .strip_prefix("<devices-extra>")
        .and_then(|b| b.strip_suffix("</devices-extra>"))
    {
        parts.devices = devices.to_string();
    } else if block.starts_with("<clock") {
        parts.clock = block.to_string();
    } else if block.starts_with("<hyperv") {
        parts.features = format!("<features>{block}</features>");
    } else {
        parts.features = block.to_string();
    }
}

/// The whole corpus, in a fixed order.
pub fn corpus() -> Vec<CorpusDomain> {
    let mut out: Vec<Parts> = Vec::new();
    let base = |name: String, domain_type: &'static str, platform: Platform| Parts {
        name,
        domain_type,
        platform,
        vcpu: "<vcpu placement='static'>1</vcpu>",
        cpu: String::new(),
        features: String::new(),
        clock: String::new(),
        devices: String::new(),
    };

    // No <cpu>, and a <cpu> with only a topology, on every platform.
    for &t in TYPES {
        for (i, &p) in PLATFORMS.iter().enumerate() {
            let tag = format!("{}-{}-{}", p.arch, p.machine, emulator_tag(p.emulator));
            out.push(base(format!("{t}-nocpu-{tag}"), t, p));
            let mut parts = base(format!("{t}-topology-only-{tag}"), t, p);
            parts.vcpu = "<vcpu placement='static'>4</vcpu>";
            parts.cpu = if i % 2 == 0 {
                "<cpu><topology sockets='2' cores='2' threads='1'/></cpu>".to_string()
            } else {
                "<cpu mode='custom'><topology sockets='1' dies='1' cores='2' threads='2'/></cpu>"
                    .to_string()
            };
            out.push(parts);
        }
    }

    // Custom CPUs: every match × check × fallback, model and platform rotating.
    let mut n = 0;
    for &t in TYPES {
        for m in [None, Some("exact"), Some("minimum"), Some("strict")] {
            for check in [None, Some("none"), Some("partial"), Some("full")] {
                for fallback in [None, Some("allow"), Some("forbid")] {
                    let model = MODELS[n % MODELS.len()];
                    let p = PLATFORMS[n % PLATFORMS.len()];
                    n += 1;
                    let mut parts = base(
                        format!(
                            "{t}-custom-match-{}-check-{}-fallback-{}-{model}-{}-{}",
                            m.unwrap_or("default"),
                            check.unwrap_or("default"),
                            fallback.unwrap_or("default"),
                            p.arch,
                            p.machine
                        ),
                        t,
                        p,
                    );
                    parts.cpu = format!(
                        "<cpu mode='custom'{}{}><model{}>{model}</model></cpu>",
                        attr("match", m),
                        attr("check", check),
                        attr("fallback", fallback)
                    );
                    out.push(parts);
                }
            }
        }
    }

    // Every model, pinned (what a migrated guest carries) and with libvirt's default fallback.
    for &t in TYPES {
        for (i, model) in MODELS.iter().enumerate() {
            for fallback in ["forbid", "allow"] {
                let p = PLATFORMS[(i + 1) % 2];
                let mut parts = base(format!("{t}-model-{model}-{fallback}"), t, p);
                parts.cpu = format!(
                    "<cpu mode='custom' match='exact' check='none'><model fallback='{fallback}'>{model}</model></cpu>"
                );
                out.push(parts);
            }
        }
    }

    // host-model with and without <model>, host-passthrough and maximum with every check and
    // migratable value.
    for &t in TYPES {
        for (i, check) in [None, Some("none"), Some("partial"), Some("full")]
            .into_iter()
            .enumerate()
        {
            let p = PLATFORMS[i % 2];
            let mut parts = base(
                format!("{t}-host-model-check-{}", check.unwrap_or("default")),
                t,
                p,
            );
            parts.cpu = format!("<cpu mode='host-model'{}/>", attr("check", check));
            out.push(parts);
            let mut parts = base(
                format!(
                    "{t}-host-model-with-model-check-{}",
                    check.unwrap_or("default")
                ),
                t,
                p,
            );
            parts.cpu = format!(
                "<cpu mode='host-model'{}><model fallback='allow'>Nehalem</model></cpu>",
                attr("check", check)
            );
            out.push(parts);
            for mode in ["host-passthrough", "maximum"] {
                for migratable in [None, Some("on"), Some("off")] {
                    let mut parts = base(
                        format!(
                            "{t}-{mode}-check-{}-migratable-{}",
                            check.unwrap_or("default"),
                            migratable.unwrap_or("default")
                        ),
                        t,
                        p,
                    );
                    parts.cpu = format!(
                        "<cpu mode='{mode}'{}{}/>",
                        attr("check", check),
                        attr("migratable", migratable)
                    );
                    out.push(parts);
                }
            }
        }
    }

    // Every feature policy on every feature, under a rotating CPU mode.
    let mut n = 0;
    for &t in TYPES {
        for policy in POLICIES {
            for feature in FEATURES {
                let p = PLATFORMS[n % 2];
                let shape = n % 4;
                n += 1;
                let feature_el = format!("<feature{} name='{feature}'/>", attr("policy", *policy));
                let (shape_name, cpu) = match shape {
                    0 => (
                        "Opteron_G3",
                        format!("<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>Opteron_G3</model>{feature_el}</cpu>"),
                    ),
                    1 => (
                        "EPYC",
                        format!("<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>EPYC</model>{feature_el}</cpu>"),
                    ),
                    2 => (
                        "passthrough",
                        format!("<cpu mode='host-passthrough' check='none'>{feature_el}</cpu>"),
                    ),
                    _ => (
                        "maximum",
                        format!("<cpu mode='maximum' check='none'>{feature_el}</cpu>"),
                    ),
                };
                let mut parts = base(
                    format!(
                        "{t}-feature-{}-{feature}-{shape_name}",
                        policy.unwrap_or("default")
                    ),
                    t,
                    p,
                );
                parts.cpu = cpu;
                out.push(parts);
            }
        }
        // A custom CPU without <model> but with features, and the default check with features.
        for policy in ["require", "optional", "disable"] {
            let mut parts = base(format!("{t}-feature-{policy}-no-model"), t, PLATFORMS[0]);
            parts.cpu = format!("<cpu><feature policy='{policy}' name='acpi'/></cpu>");
            out.push(parts);
            let mut parts = base(
                format!("{t}-feature-{policy}-check-default"),
                t,
                PLATFORMS[1],
            );
            parts.cpu = format!(
                "<cpu><model>Opteron_G2</model><feature policy='{policy}' name='sse4a'/><feature policy='{policy}' name='x2apic'/></cpu>"
            );
            out.push(parts);
        }
    }

    // Each hypervisor-feature block with each <cpu> shape, platforms rotating.
    let mut n = 0;
    for &t in TYPES {
        for (block_name, block) in HYPERV_BLOCKS.iter().chain(OTHER_BLOCKS) {
            for (cpu_name, cpu) in BLOCK_CPUS {
                let p = PLATFORMS[n % PLATFORMS.len()];
                n += 1;
                let mut parts = base(format!("{t}-{block_name}-{cpu_name}"), t, p);
                parts.cpu = cpu.to_string();
                place_block(&mut parts, block);
                out.push(parts);
            }
        }
    }

    // Vendor ids, topologies, offline vCPUs, cache and maxphysaddr.
    for &t in TYPES {
        for (i, vendor) in [
            "Libvirt QEMU",
            "AuthenticAMD",
            "GenuineIntel",
            "Libvirt,QEMU",
        ]
        .into_iter()
        .enumerate()
        {
            let slug = vendor.replace(' ', "-space-").replace(',', "-comma-");
            let mut parts = base(format!("{t}-vendor-id-{slug}-custom"), t, PLATFORMS[i % 2]);
            parts.cpu = format!(
                "<cpu mode='custom' match='exact' check='none'><model fallback='forbid' vendor_id='{vendor}'>qemu64</model></cpu>"
            );
            out.push(parts);
            let mut parts = base(
                format!("{t}-vendor-id-{slug}-passthrough"),
                t,
                PLATFORMS[i % 2],
            );
            parts.cpu = format!(
                "<cpu mode='host-passthrough' check='none'><model vendor_id='{vendor}'/></cpu>"
            );
            out.push(parts);
        }
        for (i, (topology, vcpu)) in [
            (
                "<topology sockets='2' dies='1' cores='2' threads='2'/>",
                "<vcpu placement='static'>8</vcpu>",
            ),
            (
                "<topology sockets='1' dies='2' cores='2' threads='1'/>",
                "<vcpu placement='static' current='2'>4</vcpu>",
            ),
            (
                "<topology sockets='4' cores='1' threads='1'/>",
                "<vcpu placement='static' current='1'>4</vcpu>",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let mut parts = base(
                format!("{t}-topology-{i}"),
                t,
                PLATFORMS[i % PLATFORMS.len()],
            );
            parts.vcpu = vcpu;
            parts.cpu = format!(
                "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>EPYC-Rome</model>{topology}</cpu>"
            );
            out.push(parts);
        }
        for (i, mode) in ["custom", "host-passthrough", "maximum"]
            .into_iter()
            .enumerate()
        {
            let model = if mode == "custom" {
                "<model fallback='forbid'>Skylake-Client-IBRS</model>"
            } else {
                ""
            };
            for (j, extra) in [
                "<cache level='3' mode='emulate'/>",
                "<cache mode='passthrough'/>",
                "<cache mode='disable'/>",
                "<maxphysaddr mode='passthrough'/>",
                "<maxphysaddr mode='passthrough' limit='39'/>",
                "<maxphysaddr mode='emulate' bits='42'/>",
            ]
            .into_iter()
            .enumerate()
            {
                let mut parts = base(format!("{t}-{mode}-extra-{j}"), t, PLATFORMS[(i + j) % 2]);
                parts.cpu = format!("<cpu mode='{mode}' check='none'>{model}{extra}</cpu>");
                out.push(parts);
            }
        }
    }

    out.iter()
        .map(|p| CorpusDomain {
            name: p.name.clone(),
            xml: p.xml(),
        })
        .collect()
}

fn emulator_tag(emulator: &str) -> &str {
    emulator.rsplit('-').next().unwrap_or(emulator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_the_corpus_is_stable() {
        let a = corpus();
        let b = corpus();
        let mut names: Vec<&str> = a.iter().map(|d| d.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), a.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.xml == y.xml));
    }
}
