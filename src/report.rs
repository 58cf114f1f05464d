//! The JSON that `diff`, `check`, `probe`, `matrix` and `plan` print for scripts: one schema,
//! versioned by `schema_version`, documented field by field in docs/operator/json-output.md.
//!
//! Numbers stay numbers (leaf, sub-leaf, bit, register values); the words an operator reads are
//! beside them in `*_text` fields, so a script never parses a display string.

use serde_json::{json, Value};

use crate::aarch64::{ArmIdTable, Midr};
use crate::arch::Arch;
use crate::view::{GuestView, ViewDiff};
use crate::x86_64::diff::{Diff, FieldChange};
use crate::x86_64::CpuidTable;

/// Bumped whenever a field changes meaning or goes away (adding fields does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// `{"schema_version": 1, "error": "…"}`: what a command run with `--json` prints on failure.
pub fn error(message: &str) -> Value {
    json!({ "schema_version": SCHEMA_VERSION, "error": message })
}

/// Who a CPU view belongs to: vendor, brand and family/model/stepping (x86), MIDR_EL1 decoded
/// (aarch64).
pub fn identity(view: &GuestView) -> Value {
    match view {
        GuestView::X86(t) => x86_identity(t),
        GuestView::Aarch64(t) => arm_identity(t),
    }
}

fn x86_identity(table: &CpuidTable) -> Value {
    let mut t = table.clone();
    t.canonicalize();
    let vendor = t.get(0, 0).and_then(|e| text(&[e.ebx, e.edx, e.ecx]));
    let brand = (0x8000_0002..=0x8000_0004u32)
        .map(|leaf| t.get(leaf, 0).map(|e| [e.eax, e.ebx, e.ecx, e.edx]))
        .collect::<Option<Vec<[u32; 4]>>>()
        .and_then(|words| text(&words.concat()));
    let signature = t.get(1, 0).map(|e| e.eax);
    let (family, model, stepping) = match signature {
        Some(eax) => {
            let (f, m, s) = display_family_model_stepping(eax);
            (Some(f), Some(m), Some(s))
        }
        None => (None, None, None),
    };
    json!({
        "arch": Arch::X86_64,
        "vendor": vendor,
        "brand": brand,
        "family": family,
        "model": model,
        "stepping": stepping,
        "signature": signature,
        "max_basic_leaf": t.get(0, 0).map(|e| e.eax),
        "max_extended_leaf": t.get(0x8000_0000, 0).map(|e| e.eax),
    })
}

pub use crate::x86_64::diff::display_family_model_stepping;

/// The ASCII string held in `words` (little-endian), without trailing NULs and blanks; `None`
/// when nothing is left (an all-zero vendor).
fn text(words: &[u32]) -> Option<String> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    let s: String = bytes[..end]
        .iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                char::from(c)
            } else {
                '.'
            }
        })
        .collect();
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn arm_identity(table: &ArmIdTable) -> Value {
    let midr = table.get("MIDR_EL1");
    let decoded = midr.map(Midr::decode);
    json!({
        "arch": Arch::Aarch64,
        "midr_el1": midr,
        "implementer": decoded.as_ref().map(|m| m.implementer),
        "part": decoded.as_ref().map(|m| m.part),
        "variant": decoded.as_ref().map(|m| m.variant),
        "revision": decoded.as_ref().map(|m| m.revision),
        "description": decoded.as_ref().map(|m| m.describe()),
    })
}

/// The comparison as JSON: `verdict`, `equivalent`, `summary` counts, then the differences
/// (`lost`, `gained`, `changed`, `informational`, `masked`) and, for x86, `echo_leaves`.
pub fn diff(d: &ViewDiff) -> Value {
    let equivalent = d.is_equivalent();
    let mut out = json!({
        "verdict": if equivalent { "equivalent" } else { "different" },
        "equivalent": equivalent,
    });
    let body = match d {
        ViewDiff::X86(x) => x86_diff(x),
        ViewDiff::Aarch64(a) => {
            let list = |v: &[crate::aarch64::RegisterChange]| -> Vec<Value> {
                v.iter()
                    .map(|c| {
                        json!({
                            "register": c.register,
                            "field": c.field,
                            "a": c.a_value,
                            "b": c.b_value,
                            "a_text": c.a,
                            "b_text": c.b,
                            "text": c.detail(),
                        })
                    })
                    .collect()
            };
            json!({
                "arch": Arch::Aarch64,
                "summary": summary(a.lost.len(), a.gained.len(), a.changed.len(), a.informational.len(), 0),
                "lost": list(&a.lost),
                "gained": list(&a.gained),
                "changed": list(&a.changed),
                "informational": list(&a.informational),
                "masked": [],
                "echo_leaves": [],
            })
        }
        ViewDiff::Arch { a, b } => json!({
            "arch": "mixed",
            "summary": summary(0, 0, 1, 0, 0),
            "lost": [],
            "gained": [],
            "changed": [{
                "field": "architecture",
                "a_text": a.to_string(),
                "b_text": b.to_string(),
                "text": format!("architecture ({a} -> {b})"),
            }],
            "informational": [],
            "masked": [],
            "echo_leaves": [],
        }),
    };
    merge(&mut out, body);
    out
}

fn summary(lost: usize, gained: usize, changed: usize, info: usize, masked: usize) -> Value {
    json!({
        "lost": lost,
        "gained": gained,
        "changed": changed,
        "informational": info,
        "masked": masked,
    })
}

fn x86_diff(d: &Diff) -> Value {
    let features = |v: &[crate::x86_64::diff::FeatureChange]| -> Vec<Value> {
        v.iter()
            .map(|c| {
                let mut o = serde_json::to_value(c.location).unwrap_or(Value::Null);
                merge(
                    &mut o,
                    json!({ "name": c.name, "side": c.side, "text": c.to_string() }),
                );
                o
            })
            .collect()
    };
    let fields = |v: &[FieldChange]| -> Vec<Value> { v.iter().map(field).collect() };
    json!({
        "arch": Arch::X86_64,
        "summary": summary(d.lost.len(), d.gained.len(), d.fields.len(), d.informational.len(), d.masked.len()),
        "lost": features(&d.lost),
        "gained": features(&d.gained),
        "changed": fields(&d.fields),
        "informational": fields(&d.informational),
        "masked": fields(&d.masked),
        "echo_leaves": d.echo_leaves,
    })
}

fn field(c: &FieldChange) -> Value {
    json!({
        "field": c.field,
        "location": c.location,
        "leaf": c.leaf,
        "subleaf": c.subleaf,
        "register": c.register,
        "msr": c.msr,
        "bits": c.bits,
        "a": c.a_value,
        "b": c.b_value,
        "a_text": c.a,
        "b_text": c.b,
        "mask_reason": c.mask_reason,
        "text": c.to_string(),
    })
}

/// Copies `extra`'s keys into `into` (both objects).
pub fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// `cpuguard diff --json`: the comparison with both sides' identity.
pub fn diff_document(
    a_name: &str,
    a: &GuestView,
    b_name: &str,
    b: &GuestView,
    d: &ViewDiff,
) -> Value {
    let mut side_a = identity(a);
    merge(&mut side_a, json!({ "input": a_name }));
    let mut side_b = identity(b);
    merge(&mut side_b, json!({ "input": b_name }));
    let mut out = json!({
        "schema_version": SCHEMA_VERSION,
        "command": "diff",
        "a": side_a,
        "b": side_b,
    });
    merge(&mut out, diff(d));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::CpuidEntry;

    #[test]
    fn identity_names_vendor_brand_and_signature_and_none_for_empty() {
        let e = |leaf, regs: [u32; 4]| CpuidEntry {
            leaf,
            subleaf: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
        };
        let t = CpuidTable {
            entries: vec![
                e(0, [0xd, 0x756e6547, 0x6c65746e, 0x49656e69]),
                e(1, [0x000306c3, 0, 0, 0]),
                e(0x8000_0002, [0x65746e49, 0x2952286c, 0, 0]),
                e(0x8000_0003, [0; 4]),
                e(0x8000_0004, [0; 4]),
            ],
            msrs: vec![],
        };
        let id = identity(&GuestView::X86(t.clone()));
        assert_eq!(id["vendor"], "GenuineIntel");
        assert_eq!(id["brand"], "Intel(R)");
        assert_eq!(id["family"], 6);
        assert_eq!(id["model"], 0x3c);
        assert_eq!(id["stepping"], 3);
        let mut zero = t;
        zero.entries[0] = e(0, [0xd, 0, 0, 0]);
        assert_eq!(identity(&GuestView::X86(zero))["vendor"], Value::Null);
        assert_eq!(display_family_model_stepping(0x00a00f11), (0x19, 0x1, 1));
    }
}
