//! The verdict on an incoming guest: the source's stamp against this host's measurement, under
//! the configured policies. Pure: no I/O, so every policy path is tested directly.

use crate::audit::escape;
use crate::config::{PolicyConfig, Verdict};
use crate::domain::metadata::{DomainPolicy, Stamp};
use crate::fingerprint::Fingerprint;
use crate::incoming::Origin;
use crate::view::{diff, GuestView, ViewDiff};
use crate::x86_64::FeatureMap;

/// What the prepare phase does with an incoming guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let the guest start: the migration (or restore) goes ahead.
    Allow {
        /// One line for the audit trail.
        reason: String,
        /// Informational differences (never a reason to refuse), for the audit trail.
        informational: Vec<String>,
        /// True when a policy let through what the default would refuse.
        by_policy: bool,
    },
    /// Fail the prepare hook: libvirt aborts the migration and the guest keeps running on the
    /// source.
    Refuse {
        /// One line for the audit trail.
        reason: String,
        /// The operator's message: first line, then one line per difference.
        message: String,
    },
}

/// The facts the verdict needs.
pub struct Incoming<'a> {
    /// The domain's name, as libvirt passes it to the hook.
    pub domain: &'a str,
    /// This host's name (its hostname, or `this host`), for messages.
    pub this_host: &'a str,
    /// How the guest arrives (migration, restore, or inferred from a stamp).
    pub origin: Origin,
    /// The source's cpuguard stamp from the incoming XML; None when the source left none.
    pub stamp: Option<&'a Stamp>,
    /// The incoming domain's UUID, compared with the stamp's.
    pub uuid: Option<&'a str>,
    /// [`crate::domain::guest::GuestCpuConfig::binding_digest`] of the incoming domain's CPU
    /// configuration; None when it cannot be read (the measurement then fails and says why).
    pub config_digest: Option<&'a str>,
    /// The domain's own cpuguard policy (`guard="off"`), honoured when the configuration allows
    /// opting out.
    pub opt_out: &'a DomainPolicy,
    /// This host's fingerprint for the CPU the destination will start, or why it could not be had.
    pub local: Result<&'a Fingerprint, String>,
    /// Where the configuration lives, for messages that tell the operator what to change.
    pub config_path: &'a str,
}

impl Incoming<'_> {
    fn headline(&self, what: &str) -> String {
        format!(
            "cpuguard: refusing {} of {}: {what}",
            self.origin.describe(),
            escape(self.domain)
        )
    }
}

/// Largest stamp `<table>` accepted, in bytes. A real x86 table is ~100 lines and ~5 KiB, an
/// aarch64 one ~25 lines; a larger one is refused as malformed before it is parsed (a 15 MB table
/// cost the prepare hook seconds and hundreds of MB).
pub const MAX_STAMP_TABLE_BYTES: usize = 64 * 1024;
/// Most lines a stamp `<table>` may have.
pub const MAX_STAMP_TABLE_LINES: usize = 1024;
/// Most differences listed in a refusal (the first ones; the count of the rest follows), so the
/// message libvirt carries back to `virsh` stays a screenful.
pub const MAX_DIFF_LINES: usize = 64;

/// The source's raw view (CPUID table or aarch64 ID registers) from its stamp, or why it cannot
/// be used.
pub fn stamped_table(stamp: &Stamp) -> Result<GuestView, String> {
    if let Some(v) = stamp.version.as_deref() {
        if v != crate::domain::metadata::STAMP_VERSION {
            return Err(format!(
                "the source's cpuguard stamp has unknown version {v:?}"
            ));
        }
    }
    let text = stamp
        .table
        .as_deref()
        .ok_or("the source's cpuguard stamp carries no CPU table")?;
    if text.len() > MAX_STAMP_TABLE_BYTES {
        return Err(format!(
            "the source's cpuguard stamp is malformed: its table is {} bytes, over the {MAX_STAMP_TABLE_BYTES}-byte limit",
            text.len()
        ));
    }
    let lines = text.lines().count();
    if lines > MAX_STAMP_TABLE_LINES {
        return Err(format!(
            "the source's cpuguard stamp is malformed: its table has {lines} lines, over the {MAX_STAMP_TABLE_LINES}-line limit"
        ));
    }
    GuestView::parse_text(text)
        .map_err(|e| format!("the source's cpuguard stamp has an unreadable table: {e}"))
}

/// Whether the stamp belongs to this domain and to the CPU configuration it arrives with: a
/// stamp copied from another domain, or measured for another `<cpu>`, says nothing about this
/// guest. None when it does (or an unbound stamp is allowed by policy, noted in the verdict's
/// reason by the caller's audit of `policy.unbound_stamp`).
fn check_binding(inc: &Incoming<'_>, stamp: &Stamp, policy: &PolicyConfig) -> Option<Decision> {
    let restamp = format!(
        "run `cpuguard stamp --force {}` on the source host and migrate again",
        inc.domain
    );
    let (Some(stamp_uuid), Some(stamp_config)) = (stamp.uuid.as_deref(), stamp.config.as_deref())
    else {
        if policy.unbound_stamp == Verdict::Allow {
            return None;
        }
        let reason = "the source's cpuguard stamp is not bound to a domain (no uuid or config: \
                      stamped by an older cpuguard)"
            .to_string();
        let message = format!(
            "{}\n  {restamp} (with this cpuguard version), or set policy.unbound_stamp = \"allow\" in {}",
            inc.headline(&reason),
            inc.config_path
        );
        return Some(Decision::Refuse { reason, message });
    };
    if let Some(uuid) = inc.uuid {
        if !stamp_uuid.eq_ignore_ascii_case(uuid) {
            let reason = format!(
                "the stamp belongs to another domain (stamp uuid {stamp_uuid}, this domain {uuid})"
            );
            let message = format!("{}\n  {restamp}", inc.headline(&reason));
            return Some(Decision::Refuse { reason, message });
        }
    }
    // A guest inferred to be incoming (no record, a stamp in its XML) may be a definition that
    // carries a stamp started cold (`virsh dumpxml` of a running guest, then `virsh define`): its
    // XML is not expanded like live XML (`machine='pc'`, not `pc-i440fx-7.2`), so its digest
    // differs although the CPU is the same. The UUID and the table comparison still guard it.
    let compare_config = inc.origin != Origin::Inferred;
    if let (Some(config), true) = (inc.config_digest, compare_config) {
        if stamp_config != config {
            let reason = format!(
                "the stamp belongs to another CPU configuration (stamp {stamp_config}, this \
                 domain's {config})"
            );
            let message = format!("{}\n  {restamp}", inc.headline(&reason));
            return Some(Decision::Refuse { reason, message });
        }
    }
    None
}

/// The verdict on `inc` under `policy`; `features` names the CPU features in the differences.
pub fn judge(inc: &Incoming<'_>, policy: &PolicyConfig, features: &FeatureMap) -> Decision {
    judge_with(inc, policy, |a, b| Ok(diff(a, b, features)))
}

/// [`judge`], loading libvirt's feature names only when the two views differ: loading the map
/// costs about as much instruction-wise as the rest of a warm incoming check (callgrind), and an
/// equivalent guest names nothing. Every difference shows without names too (unnamed bits are
/// reported as register fields), so equivalence is decided the same way. A map that cannot be
/// loaded when it is needed refuses, naming why.
pub fn judge_loading_names(
    inc: &Incoming<'_>,
    policy: &PolicyConfig,
    load: impl FnOnce() -> Result<FeatureMap, String>,
) -> Decision {
    judge_with(inc, policy, |a, b| {
        let unnamed = diff(a, b, &FeatureMap::default());
        if unnamed.is_equivalent() {
            return Ok(unnamed);
        }
        Ok(diff(a, b, &load()?))
    })
}

fn judge_with(
    inc: &Incoming<'_>,
    policy: &PolicyConfig,
    compare: impl FnOnce(&GuestView, &GuestView) -> Result<ViewDiff, String>,
) -> Decision {
    let refuse = |reason: String, message: String| Decision::Refuse { reason, message };

    if inc.opt_out.guard_off && policy.allow_domain_opt_out {
        let why = inc.opt_out.reason.as_deref().unwrap_or("no reason given");
        return Decision::Allow {
            reason: format!("domain opted out of cpuguard (guard='off': {why})"),
            informational: Vec::new(),
            by_policy: true,
        };
    }

    let Some(stamp) = inc.stamp else {
        return match policy.unstamped_source {
            Verdict::Allow => Decision::Allow {
                reason: "source left no cpuguard stamp; allowed by policy.unstamped_source".into(),
                informational: Vec::new(),
                by_policy: true,
            },
            Verdict::Refuse => {
                let reason = "the source left no cpuguard stamp".to_string();
                let message = format!(
                    "{}\n  run `cpuguard stamp {}` on the source host and migrate again, or set \
                     policy.unstamped_source = \"allow\" in {}",
                    inc.headline(&reason),
                    escape(inc.domain),
                    inc.config_path
                );
                refuse(reason, message)
            }
        };
    };

    if let Some(decision) = check_binding(inc, stamp, policy) {
        return decision;
    }

    let source_table = match stamped_table(stamp) {
        Ok(t) => t,
        Err(reason) => {
            let message = format!(
                "{}\n  run `cpuguard stamp {}` on the source host and migrate again",
                inc.headline(&reason),
                escape(inc.domain)
            );
            return refuse(reason, message);
        }
    };

    let local = match inc.local {
        Ok(f) => f,
        Err(ref e) => {
            let reason = format!("cannot measure this host's guest CPU: {e}");
            return match policy.probe_failure {
                Verdict::Allow => Decision::Allow {
                    reason: format!("{reason}; allowed by policy.probe_failure"),
                    informational: Vec::new(),
                    by_policy: true,
                },
                Verdict::Refuse => refuse(reason.clone(), inc.headline(&reason)),
            };
        }
    };

    // A host whose guests' applications see other CPUID values than their kernel shows them its
    // own CPU: no CPU configuration hides the host from them, so the guest's view would change
    // under its applications whatever the comparison below says.
    let user_mode_note = match &local.user_mode {
        Some(user) if user.differs() => {
            let reason = format!(
                "{} shows guest user space (CPL3) other CPUID values than the guest kernel (CPL0): \
                 guest applications would see the host's CPU",
                inc.this_host
            );
            if policy.user_mode_cpuid == Verdict::Refuse {
                let mut message = inc.headline(&reason);
                for line in user.lines() {
                    message.push_str("\n  ");
                    message.push_str(&line);
                }
                message.push_str(&format!(
                    "\n  (policy.user_mode_cpuid = \"allow\" in {} lets this through)",
                    inc.config_path
                ));
                return refuse(reason, message);
            }
            Some(format!("{reason}; allowed by policy.user_mode_cpuid"))
        }
        _ => None,
    };
    let d = match compare(&source_table, &local.raw()) {
        Ok(d) => d,
        Err(reason) => return refuse(reason.clone(), inc.headline(&reason)),
    };
    let informational = d.informational();
    if d.is_equivalent() {
        let note = if Some(source_table.digest().as_str()) != stamp.digest.as_deref() {
            " (the stamp's digest attribute differs: stamped by another cpuguard version or edited)"
        } else {
            ""
        };
        // An unbound stamp got here only through policy.unbound_stamp: say so (audited as a
        // warning), since such a stamp may have been copied from another domain.
        let unbound = stamp.uuid.is_none() || stamp.config.is_none();
        let unbound_note = if unbound {
            "; the stamp is bound to no domain, allowed by policy.unbound_stamp"
        } else {
            ""
        };
        let mut informational = informational;
        informational.extend(user_mode_note.clone());
        return Decision::Allow {
            reason: format!("guest CPU identical to the source's{note}{unbound_note}"),
            informational,
            by_policy: unbound || user_mode_note.is_some(),
        };
    }
    let only_gained = d.only_gained();
    if only_gained && policy.gained_features == Verdict::Allow {
        return Decision::Allow {
            reason: format!(
                "guest would only gain features ({}); allowed by policy.gained_features",
                d.summary()
            ),
            informational,
            by_policy: true,
        };
    }
    let what = format!("the guest CPU would change on {}", inc.this_host);
    let mut message = inc.headline(&what);
    let lines = d.lines();
    for line in lines.iter().take(MAX_DIFF_LINES) {
        message.push_str("\n  ");
        message.push_str(line);
    }
    if lines.len() > MAX_DIFF_LINES {
        message.push_str(&format!(
            "\n  … and {} more differences",
            lines.len() - MAX_DIFF_LINES
        ));
    }
    // Why this host's guest lacks what the configuration asks for: QEMU dropped it.
    for line in &local.filtered {
        message.push_str(&format!("\n  on {} QEMU dropped {line}", inc.this_host));
    }
    if only_gained {
        message.push_str(
            "\n  (only gained features: a guest that starts using them could not move back; \
             policy.gained_features = \"allow\" lets this through)",
        );
    }
    let mut reason = format!("{what}: {}", d.summary());
    if !local.filtered.is_empty() {
        let names: Vec<&str> = local
            .filtered
            .iter()
            .filter_map(|l| l.split(':').next())
            .collect();
        reason.push_str(&format!("; QEMU dropped {}", names.join(",")));
    }
    refuse(reason, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::HostFacts;
    use crate::x86_64::dump::write_dump;
    use crate::x86_64::{parse_dump, CpuidTable};

    fn features() -> FeatureMap {
        FeatureMap::load_default().expect("libvirt's cpu_map is installed (libvirt-daemon)")
    }

    fn table(dump: &str) -> CpuidTable {
        parse_dump(dump).expect("dump")
    }

    const SRC: &str = "00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n00000001 00000000: 000306c1 00000800 fffa3223 078bfbff\n00000007 00000000: 00000000 000007ab 00000000 00000000\n";

    fn fingerprint(dump: &str) -> Fingerprint {
        let host = HostFacts {
            hostname: "b".into(),
            kernel_release: "k".into(),
            cpu_model_name: "m".into(),
            microcode: "0x1".into(),
            qemu_version: "7.2".into(),
            accelerator: "tcg".into(),
        };
        Fingerprint::new(host, serde_json::Value::Null, table(dump))
    }

    fn stamp(dump: &str) -> Stamp {
        let el = crate::domain::metadata::stamp_element_bound(
            "a",
            "t",
            &fingerprint(dump).digest,
            "<cpu mode='custom'><model>Haswell-noTSX</model></cpu>",
            &write_dump(&table(dump)),
            &binding(),
        );
        Stamp::read(&el)
    }

    const UUID: &str = "6a1f3c2e-0b7d-4e58-9c11-a0a0a0a0a00a";
    const CONFIG: &str = "sha256:c0";

    fn binding() -> crate::domain::metadata::StampBinding {
        crate::domain::metadata::StampBinding {
            uuid: Some(UUID.to_string()),
            config: Some(CONFIG.to_string()),
            process: None,
            signature: None,
        }
    }

    #[test]
    fn stamp_of_another_domain_or_configuration_or_unbound_is_refused() {
        let local = fingerprint(SRC);
        let mut s = stamp(SRC);
        s.uuid = Some("6b2e4d3f-1c8e-4f69-8d22-b0b0b0b0b00b".into());
        let Decision::Refuse { message, .. } =
            judge_with(Some(&s), Ok(&local), &PolicyConfig::default())
        else {
            panic!("another domain's stamp must be refused");
        };
        assert!(
            message.starts_with(
                "cpuguard: refusing incoming migration of web1: the stamp belongs to another \
                 domain (stamp uuid 6b2e4d3f-1c8e-4f69-8d22-b0b0b0b0b00b, this domain 6a1f3c2e"
            ),
            "{message}"
        );
        // The UUID as libvirt may spell it (upper case) is the same domain.
        s.uuid = Some(UUID.to_uppercase());
        assert!(matches!(
            judge_with(Some(&s), Ok(&local), &PolicyConfig::default()),
            Decision::Allow { .. }
        ));

        let mut s = stamp(SRC);
        s.config = Some("sha256:other".into());
        let d = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(&d, Decision::Refuse { reason, .. } if reason.starts_with("the stamp belongs to another CPU configuration")),
            "{d:?}"
        );
        // Inferred incoming (a cold start of a definition carrying a stamp): not compared.
        let inc = Incoming {
            domain: "web1",
            this_host: "hv-new",
            origin: Origin::Inferred,
            stamp: Some(&s),
            uuid: Some(UUID),
            config_digest: Some(CONFIG),
            opt_out: &DomainPolicy::default(),
            local: Ok(&local),
            config_path: "/etc/cpuguard/cpuguard.toml",
        };
        assert!(matches!(
            judge(&inc, &PolicyConfig::default(), &features()),
            Decision::Allow { .. }
        ));

        // A stamp from before binding: refused, telling how to re-stamp, unless the policy allows.
        let mut s = stamp(SRC);
        s.uuid = None;
        let d = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(&d, Decision::Refuse { message, .. }
                if message.contains("not bound to a domain")
                && message.contains("run `cpuguard stamp --force web1` on the source host")
                && message.contains("policy.unbound_stamp = \"allow\"")),
            "{d:?}"
        );
        let policy = PolicyConfig {
            unbound_stamp: Verdict::Allow,
            ..PolicyConfig::default()
        };
        assert!(matches!(
            judge_with(Some(&s), Ok(&local), &policy),
            Decision::Allow { by_policy: true, reason, .. } if reason.contains("allowed by policy.unbound_stamp")
        ));
    }

    fn judge_with(
        stamp: Option<&Stamp>,
        local: Result<&Fingerprint, String>,
        policy: &PolicyConfig,
    ) -> Decision {
        let inc = Incoming {
            domain: "web1",
            this_host: "hv-new",
            origin: Origin::Migrate,
            stamp,
            uuid: Some(UUID),
            config_digest: Some(CONFIG),
            opt_out: &DomainPolicy::default(),
            local,
            config_path: "/etc/cpuguard/cpuguard.toml",
        };
        judge(&inc, policy, &features())
    }

    #[test]
    fn identical_cpu_is_allowed() {
        let s = stamp(SRC);
        let local = fingerprint(SRC);
        let d = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(
                d,
                Decision::Allow {
                    by_policy: false,
                    ..
                }
            ),
            "{d:?}"
        );
    }

    /// The hook's lazy variant: an equivalent guest never loads the names, a different one
    /// loads them once and names its differences as `judge` does, and a map that cannot be
    /// loaded when needed refuses with the reason.
    #[test]
    fn feature_names_are_loaded_only_for_a_difference() {
        let s = stamp(SRC);
        let opt_out = DomainPolicy::default();
        let inc = |local| Incoming {
            domain: "web1",
            this_host: "hv-new",
            origin: Origin::Migrate,
            stamp: Some(&s),
            uuid: Some(UUID),
            config_digest: Some(CONFIG),
            opt_out: &opt_out,
            local: Ok(local),
            config_path: "/etc/cpuguard/cpuguard.toml",
        };
        let policy = PolicyConfig::default();
        let same = fingerprint(SRC);
        let loads = std::cell::Cell::new(0);
        let load = || {
            loads.set(loads.get() + 1);
            Ok(features())
        };
        let d = judge_loading_names(&inc(&same), &policy, load);
        assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
        assert_eq!(loads.get(), 0, "an equivalent guest loaded the feature map");

        let lost = fingerprint(&SRC.replace("fffa3223", "fffa3203"));
        let lazy = judge_loading_names(&inc(&lost), &policy, load);
        assert_eq!(loads.get(), 1);
        assert_eq!(lazy, judge(&inc(&lost), &policy, &features()));
        let Decision::Refuse { message, .. } = lazy else {
            panic!("must refuse")
        };
        assert!(
            message.contains("lost: vmx (CPUID.0x1:ECX[5])"),
            "{message}"
        );

        let broken = judge_loading_names(&inc(&lost), &policy, || {
            Err("cannot name CPU features: no map".to_string())
        });
        let Decision::Refuse { reason, .. } = broken else {
            panic!("must refuse")
        };
        assert_eq!(reason, "cannot name CPU features: no map");
    }

    /// A destination whose guests' user space sees other CPUID values than their kernel is
    /// refused by default, naming the leaves; `policy.user_mode_cpuid = "allow"` lets an
    /// otherwise identical guest through, saying so.
    #[test]
    fn user_mode_cpuid_mismatch_is_refused_by_default() {
        use crate::fingerprint::UserModeCpuid;
        let s = stamp(SRC);
        let mut local = fingerprint(SRC);
        let table = local.x86_raw().expect("x86").clone();
        let mut user: Vec<_> = table.entries.clone();
        user[1].eax = 0x00a50f00; // leaf 1 as a host CPU would answer it
        local.user_mode = Some(UserModeCpuid::compare(&table, &user));
        let Decision::Refuse { reason, message } =
            judge_with(Some(&s), Ok(&local), &PolicyConfig::default())
        else {
            panic!("must refuse");
        };
        assert!(reason.contains("user space (CPL3)"), "{reason}");
        assert!(
            message.contains("CPUID.0x1.0: kernel eax=000306c1"),
            "{message}"
        );
        assert!(message.contains("user eax=00a50f00"), "{message}");
        let allow = PolicyConfig {
            user_mode_cpuid: Verdict::Allow,
            ..PolicyConfig::default()
        };
        let d = judge_with(Some(&s), Ok(&local), &allow);
        let Decision::Allow {
            informational,
            by_policy,
            ..
        } = d
        else {
            panic!("must allow: {d:?}");
        };
        assert!(by_policy);
        assert!(informational
            .iter()
            .any(|l| l.contains("policy.user_mode_cpuid")));
        // The same CPUID at both levels is no reason to refuse.
        local.user_mode = Some(UserModeCpuid::compare(&table, &table.entries));
        let d = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(
                d,
                Decision::Allow {
                    by_policy: false,
                    ..
                }
            ),
            "{d:?}"
        );
    }

    #[test]
    fn lost_feature_is_refused_and_named() {
        let s = stamp(SRC);
        // Destination lacks vmx (leaf 1 ECX bit 5) and tsc_adjust (leaf 7 EBX bit 1).
        let local = fingerprint(
            &SRC.replace("fffa3223", "fffa3203")
                .replace("000007ab", "000007a9"),
        );
        let Decision::Refuse { reason, message } =
            judge_with(Some(&s), Ok(&local), &PolicyConfig::default())
        else {
            panic!("must refuse");
        };
        let mut lines = message.lines();
        assert_eq!(
            lines.next(),
            Some("cpuguard: refusing incoming migration of web1: the guest CPU would change on hv-new")
        );
        assert!(
            message.contains("  lost: vmx (CPUID.0x1:ECX[5])"),
            "{message}"
        );
        assert!(
            message.contains("  lost: tsc_adjust (CPUID.0x7.0:EBX[1])"),
            "{message}"
        );
        assert!(reason.contains("lost vmx,tsc_adjust"), "{reason}");
    }

    #[test]
    fn refusal_names_what_qemu_dropped_here() {
        let s = stamp(SRC);
        let mut local = fingerprint(&SRC.replace("fffa3223", "fffa3203"));
        local.filtered = crate::x86_64::probe::filtered_features(
            "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]\n",
        );
        let Decision::Refuse { reason, message } =
            judge_with(Some(&s), Ok(&local), &PolicyConfig::default())
        else {
            panic!("must refuse");
        };
        assert!(
            message.contains(
                "\n  on hv-new QEMU dropped vmx: the host lacks it (CPUID.01H:ECX [bit 5])"
            ),
            "{message}"
        );
        assert!(reason.ends_with("; QEMU dropped vmx"), "{reason}");
    }

    #[test]
    fn gained_only_follows_policy() {
        let s = stamp(&SRC.replace("fffa3223", "fffa3203"));
        let local = fingerprint(SRC);
        let refused = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(&refused, Decision::Refuse { message, .. } if message.contains("gained: vmx")),
            "{refused:?}"
        );
        let policy = PolicyConfig {
            gained_features: Verdict::Allow,
            ..PolicyConfig::default()
        };
        let allowed = judge_with(Some(&s), Ok(&local), &policy);
        assert!(
            matches!(
                allowed,
                Decision::Allow {
                    by_policy: true,
                    ..
                }
            ),
            "{allowed:?}"
        );
    }

    #[test]
    fn non_feature_field_is_refused_and_named() {
        let s = stamp(SRC);
        // Another stepping: family/model/stepping differs, no feature bit does.
        let local = fingerprint(&SRC.replace("000306c1", "000306c2"));
        let d = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(&d, Decision::Refuse { message, .. } if message.contains("family/model/stepping")),
            "{d:?}"
        );
    }

    #[test]
    fn cross_vendor_is_refused_naming_both_vendors() {
        // Leaf 0's vendor string: GenuineIntel on the source, HygonGenuine / AuthenticAMD here.
        let s = stamp(SRC);
        for (ebx, edx, ecx, name) in [
            ("6f677948", "6e65476e", "656e6975", "HygonGenuine"),
            ("68747541", "69746e65", "444d4163", "AuthenticAMD"),
        ] {
            let dst = SRC.replace(
                "0000000d 756e6547 6c65746e 49656e69",
                &format!("0000000d {ebx} {ecx} {edx}"),
            );
            let local = fingerprint(&dst);
            let d = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
            let Decision::Refuse { message, .. } = &d else {
                panic!("cross-vendor must be refused: {d:?}");
            };
            assert!(message.contains("GenuineIntel"), "{message}");
            assert!(message.contains(name), "{message}");
        }
    }

    #[test]
    fn unstamped_and_unmeasurable_follow_policy() {
        let local = fingerprint(SRC);
        let d = judge_with(None, Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(&d, Decision::Refuse { message, .. } if message.contains("run `cpuguard stamp web1` on the source host")),
            "{d:?}"
        );
        let policy = PolicyConfig {
            unstamped_source: Verdict::Allow,
            ..PolicyConfig::default()
        };
        assert!(matches!(
            judge_with(None, Ok(&local), &policy),
            Decision::Allow {
                by_policy: true,
                ..
            }
        ));

        let s = stamp(SRC);
        let d = judge_with(
            Some(&s),
            Err("emulator /x is not allowed".into()),
            &PolicyConfig::default(),
        );
        assert!(
            matches!(&d, Decision::Refuse { reason, .. } if reason.contains("cannot measure this host's guest CPU: emulator /x")),
            "{d:?}"
        );
        let policy = PolicyConfig {
            probe_failure: Verdict::Allow,
            ..PolicyConfig::default()
        };
        assert!(matches!(
            judge_with(Some(&s), Err("x".into()), &policy),
            Decision::Allow {
                by_policy: true,
                ..
            }
        ));
    }

    #[test]
    fn opt_out_is_honoured_only_when_allowed() {
        let local = fingerprint(SRC);
        let opt_out = DomainPolicy {
            guard_off: true,
            reason: Some("ticket 1".into()),
        };
        let inc = Incoming {
            domain: "web1",
            this_host: "hv-new",
            origin: Origin::Restore,
            stamp: None,
            uuid: Some(UUID),
            config_digest: Some(CONFIG),
            opt_out: &opt_out,
            local: Ok(&local),
            config_path: "/etc/cpuguard/cpuguard.toml",
        };
        let d = judge(&inc, &PolicyConfig::default(), &features());
        assert!(
            matches!(&d, Decision::Allow { reason, by_policy: true, .. } if reason.contains("ticket 1"))
        );
        let policy = PolicyConfig {
            allow_domain_opt_out: false,
            ..PolicyConfig::default()
        };
        let d = judge(&inc, &policy, &features());
        assert!(
            matches!(&d, Decision::Refuse { message, .. } if message.starts_with("cpuguard: refusing restore of web1")),
            "{d:?}"
        );
    }

    #[test]
    fn corrupt_stamp_table_is_refused() {
        let mut s = stamp(SRC);
        s.table = Some("garbage\n".into());
        let local = fingerprint(SRC);
        let d = judge_with(Some(&s), Ok(&local), &PolicyConfig::default());
        assert!(
            matches!(&d, Decision::Refuse { reason, .. } if reason.contains("unreadable table")),
            "{d:?}"
        );
    }

    fn arm_table(isar0: u64, mpidr: u64) -> crate::aarch64::ArmIdTable {
        let regs = crate::aarch64::sysregs::REGISTERS
            .iter()
            .map(|r| crate::aarch64::ArmIdReg {
                name: r.name.to_string(),
                value: Some(match r.name {
                    "MIDR_EL1" => 0x411f_d070,
                    "ID_AA64ISAR0_EL1" => isar0,
                    "MPIDR_EL1" => mpidr,
                    _ => 0,
                }),
            })
            .collect();
        crate::aarch64::ArmIdTable { regs }
    }

    fn arm_stamp(table: &crate::aarch64::ArmIdTable) -> Stamp {
        let view = GuestView::from(table.clone());
        let el = crate::domain::metadata::stamp_element_bound(
            "a",
            "t",
            &view.digest(),
            "<cpu mode='host-passthrough'/>",
            &view.to_text(),
            &binding(),
        );
        Stamp::read(&el)
    }

    #[test]
    fn aarch64_guests_are_judged_by_register_field() {
        let source = arm_table(0x0001_1120, 0x8000_0000);
        let s = arm_stamp(&source);
        // Same CPU, another vCPU position (masked affinity): allowed, the affinity reported.
        let other_vcpu = Fingerprint::new(
            HostFacts::default(),
            serde_json::Value::Null,
            arm_table(0x0001_1120, 0x8000_0001),
        );
        let Decision::Allow {
            by_policy: false,
            informational,
            reason,
        } = judge_with(Some(&s), Ok(&other_vcpu), &PolicyConfig::default())
        else {
            panic!("same CPU must be allowed");
        };
        assert!(!reason.contains("digest attribute differs"), "{reason}");
        assert!(
            informational.iter().any(|l| l.starts_with("MPIDR_EL1")),
            "{informational:?}"
        );

        // A destination without AES/PMULL: refused, the field named as lost.
        let no_aes = Fingerprint::new(
            HostFacts::default(),
            serde_json::Value::Null,
            arm_table(0x0001_1100, 0x8000_0000),
        );
        let Decision::Refuse { reason, message } =
            judge_with(Some(&s), Ok(&no_aes), &PolicyConfig::default())
        else {
            panic!("must refuse");
        };
        assert!(reason.ends_with("lost ID_AA64ISAR0_EL1.AES"), "{reason}");
        assert_eq!(
            message.lines().nth(1),
            Some("  lost: ID_AA64ISAR0_EL1.AES (2 (AES+PMULL) -> 0 (none))")
        );

        // Only gained: refused by default, allowed by policy.gained_features = "allow".
        let back = arm_stamp(&arm_table(0x0001_1100, 0x8000_0000));
        let with_aes = Fingerprint::new(HostFacts::default(), serde_json::Value::Null, source);
        assert!(matches!(
            judge_with(Some(&back), Ok(&with_aes), &PolicyConfig::default()),
            Decision::Refuse { .. }
        ));
        let lenient = PolicyConfig {
            gained_features: Verdict::Allow,
            ..PolicyConfig::default()
        };
        assert!(matches!(
            judge_with(Some(&back), Ok(&with_aes), &lenient),
            Decision::Allow {
                by_policy: true,
                ..
            }
        ));

        // An aarch64 stamp arriving where an x86 guest would start: refused, never compared.
        let x86 = fingerprint(SRC);
        let Decision::Refuse { message, .. } =
            judge_with(Some(&s), Ok(&x86), &PolicyConfig::default())
        else {
            panic!("cross-architecture must refuse");
        };
        assert!(
            message.contains("changed: architecture (aarch64 -> x86_64)"),
            "{message}"
        );
    }
}
