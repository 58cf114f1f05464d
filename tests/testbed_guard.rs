//! cpuguard's veto on the two-host bed (issue 4, cases 2 and 3): host B is made a machine whose
//! guests see a different CPU (`bed.sh emulator-b set ...`), and a live migration from A must be
//! refused by cpuguard at B's prepare phase — before B's QEMU starts, so before libvirt's own
//! check — with the difference named, the guest still running on A and nothing left on B.
//!
//! Runs as root; see tests/support/bed.rs.

#[path = "support/bed.rs"]
mod bed;

use std::path::Path;

use bed::{bed_sh, Bed, Host};

/// Brings up the bed with cpuguard as both hooks, B's guests getting `,cpu_options` on their
/// `-cpu`, and NAME running (stamped) on A.
fn bed_with_changed_destination(name: &str, cpu_options: &str) -> Option<Bed> {
    let mut bed = Bed::up()?;
    bed.install_hook(Path::new(env!("CARGO_BIN_EXE_cpuguard")));
    bed_sh(&["emulator-b", "set", cpu_options]).ok();
    bed.define_guest(name, None);
    let mark = bed.audit_mark();
    bed.virsh(Host::A, &["start", name]).ok();
    bed.wait_stamped(Host::A, name, mark);
    Some(bed)
}

/// The refusal as the operator sees it, plus what must hold after it.
fn assert_refused(bed: &Bed, name: &str, mark: u64, run: &bed::Run, names_one_of: &[&str]) {
    assert!(
        !run.success,
        "migration of {name} to the changed B was not refused"
    );
    let expected =
        format!("cpuguard: refusing incoming migration of {name}: the guest CPU would change on");
    assert!(
        run.stderr.contains(&expected),
        "virsh migrate did not show cpuguard's refusal (`{expected}`):\n{}",
        run.stderr
    );
    let lower = run.stderr.to_lowercase();
    assert!(
        names_one_of.iter().any(|n| lower.contains(n)),
        "the refusal does not name the difference (one of {names_one_of:?}):\n{}",
        run.stderr
    );
    bed.assert_refused_before_b_started(name, run);
    bed.expect_audit(mark, "prepare", "refused", name);
}

/// Case 2: the destination's guest would lack a CPU feature (SSE3, libvirt's `pni`).
#[test]
fn refuses_a_destination_whose_guest_would_lose_a_feature() {
    let name = "cg-guard-lost-1";
    let Some(bed) = bed_with_changed_destination(name, "-pni") else {
        return;
    };
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert_refused(&bed, name, mark, &run, &["pni", "sse3"]);
}

/// Case 3: a difference libvirt itself does not check (the brand string).
#[test]
fn refuses_a_destination_whose_guest_would_see_another_brand_string() {
    let name = "cg-guard-brand-1";
    let Some(bed) = bed_with_changed_destination(name, "model-id=cpuguard bed other CPU") else {
        return;
    };
    let mark = bed.audit_mark();
    let run = bed.migrate(name, Host::A);
    assert_refused(&bed, name, mark, &run, &["brand", "0x80000002", "80000002"]);
}
