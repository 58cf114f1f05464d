//! The guest `<cpu>` element: reading its mode and pinning it for an incoming migration.
//!
//! Pinning means: libvirt must start exactly the source's CPU model or fail (`match='exact'`,
//! `<model fallback='forbid'>`). Edits are made on the start tags in place, so the element's other
//! bytes (feature order, spacing, comments) stay.
//!
//! What a hook may change is limited by libvirt: the migrate and restore phases' output must pass
//! libvirt's ABI-stability check against the incoming definition, whose `virCPUDefIsEqual`
//! compares the CPU's type, mode, `check`, arch, model, vendor, topology and features — but not
//! `match` or `fallback`. libvirt 9 sends `check='partial'` in the migration XML; a hook that sets
//! `check='full'` makes libvirt abort every migration ("Target CPU check full does not match source
//! partial"). libvirt itself then applies the source's live CPU, with `check='full'`, from the
//! migration cookie (the test bed checks the destination's live XML), so `check` is left as sent.

use quick_xml::events::Event;
use quick_xml::reader::Reader;
use thiserror::Error;

use crate::domain::document::{attribute, Span};

/// Why a `<cpu>` element's text could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuError {
    /// Not a well-formed `<cpu>` element: the parser's message, or what was found instead.
    #[error("the <cpu> element is malformed: {0}")]
    Malformed(String),
}

/// `<cpu mode=…>`; a `<cpu>` without `mode` is `custom` (libvirt's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuMode {
    /// `custom` (or no `mode`): a named model plus features; the only mode the migrate phase pins.
    Custom,
    /// `host-model`: left as sent (libvirt refuses a hook output with another CPU mode).
    HostModel,
    /// `host-passthrough`: the host's CPU as is; no model to pin.
    HostPassthrough,
    /// `maximum`: all the accelerator can give; no model to pin.
    Maximum,
    /// A mode this build does not know, as written; left to libvirt and audited as a warning.
    Other(String),
}

impl CpuMode {
    fn parse(mode: Option<&str>) -> CpuMode {
        match mode {
            None | Some("custom") => CpuMode::Custom,
            Some("host-model") => CpuMode::HostModel,
            Some("host-passthrough") => CpuMode::HostPassthrough,
            Some("maximum") => CpuMode::Maximum,
            Some(other) => CpuMode::Other(other.to_string()),
        }
    }

    /// The mode as libvirt spells it (`custom` for an absent attribute).
    pub fn as_str(&self) -> &str {
        match self {
            CpuMode::Custom => "custom",
            CpuMode::HostModel => "host-model",
            CpuMode::HostPassthrough => "host-passthrough",
            CpuMode::Maximum => "maximum",
            CpuMode::Other(s) => s,
        }
    }
}

/// A `<cpu>` element's text and the positions of the parts the rewrite touches.
#[derive(Debug, Clone)]
pub struct CpuElement<'a> {
    /// The whole element as it appeared in the document, from `<cpu` to its end tag.
    pub text: &'a str,
    /// The `mode` attribute, libvirt's default spelled out.
    pub mode: CpuMode,
    /// End of the `<cpu …>` start tag.
    pub tag_end: usize,
    /// The `<model>` child's start tag, and the model name.
    pub model: Option<(Span, String)>,
}

impl<'a> CpuElement<'a> {
    /// Reads a `<cpu>` element's text (a span of an already checked document).
    pub fn parse(text: &'a str) -> Result<Self, CpuError> {
        let mut reader = Reader::from_str(text);
        reader.config_mut().trim_text(false);
        let mut depth = 0usize;
        let mut mode = None;
        let mut tag_end = 0;
        let mut model = None;
        let mut model_text = String::new();
        let mut in_model = false;
        loop {
            let start = reader.buffer_position() as usize;
            let event = reader
                .read_event()
                .map_err(|e| CpuError::Malformed(e.to_string()))?;
            let end = reader.buffer_position() as usize;
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let empty = matches!(event, Event::Empty(_));
                    let local = String::from_utf8_lossy(e.local_name().as_ref()).to_string();
                    if depth == 0 {
                        if local != "cpu" {
                            return Err(CpuError::Malformed(format!("<{local}> is not <cpu>")));
                        }
                        mode = attribute(e, "mode");
                        tag_end = end;
                    } else if depth == 1 && local == "model" {
                        in_model = !empty;
                        model = Some(Span {
                            start,
                            tag_end: end,
                            end,
                        });
                    }
                    if !empty {
                        depth += 1;
                    }
                }
                Event::Text(t) if in_model && depth == 2 => {
                    let s = t
                        .unescape()
                        .map_err(|e| CpuError::Malformed(e.to_string()))?;
                    model_text.push_str(&s);
                }
                Event::End(_) => {
                    depth = depth.saturating_sub(1);
                    if depth == 1 && in_model {
                        in_model = false;
                        if let Some(m) = model.as_mut() {
                            m.end = end;
                        }
                    }
                    if depth == 0 {
                        break;
                    }
                }
                Event::Eof => {
                    if depth > 0 || tag_end == 0 {
                        return Err(CpuError::Malformed("unexpected end of element".into()));
                    }
                    break;
                }
                _ => {}
            }
        }
        let model_name = model_text.trim().to_string();
        Ok(CpuElement {
            text,
            mode: CpuMode::parse(mode.as_deref()),
            tag_end,
            model: model
                .filter(|_| !model_name.is_empty())
                .map(|span| (span, model_name)),
        })
    }

    /// The `<model>` text, trimmed; None when there is no model (or an empty one).
    pub fn model_name(&self) -> Option<&str> {
        self.model.as_ref().map(|(_, name)| name.as_str())
    }
}

/// One attribute the pinning changed, for the audit line (`cpu.match:minimum->exact`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeChange {
    /// The element changed, e.g. `cpu` or `model`.
    pub element: &'static str,
    /// The attribute changed, e.g. `match` or `fallback`.
    pub name: &'static str,
    /// Its value before; None when it was unset.
    pub old: Option<String>,
    /// Its value now.
    pub new: &'static str,
}

impl std::fmt::Display for AttributeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let old = self.old.as_deref().unwrap_or("unset");
        write!(f, "{}.{}:{}->{}", self.element, self.name, old, self.new)
    }
}

/// Pins a custom `<cpu>` that has a model: returns the new element text and what changed (empty
/// when it was already pinned). `None` when there is no model to pin.
pub fn pin_custom(cpu: &CpuElement<'_>) -> Option<(String, Vec<AttributeChange>)> {
    let (model_span, _) = cpu.model.as_ref()?;
    let mut changes = Vec::new();
    let (cpu_tag, c1) = set_attribute(&cpu.text[..cpu.tag_end], "match", "exact");
    let (model_tag, c2) = set_attribute(
        &cpu.text[model_span.start..model_span.tag_end],
        "fallback",
        "forbid",
    );
    for (element, name, old, new) in [
        ("cpu", "match", c1, "exact"),
        ("model", "fallback", c2, "forbid"),
    ] {
        if let Some(old) = old {
            changes.push(AttributeChange {
                element,
                name,
                old,
                new,
            });
        }
    }
    let mut out = String::with_capacity(cpu.text.len() + 48);
    out.push_str(&cpu_tag);
    out.push_str(&cpu.text[cpu.tag_end..model_span.start]);
    out.push_str(&model_tag);
    out.push_str(&cpu.text[model_span.tag_end..]);
    Some((out, changes))
}

/// Sets `name='value'` in a start tag, keeping every other byte. Returns the new tag and, when the
/// tag changed, the previous value (`Some(None)`: the attribute was added).
///
/// The tag comes from a document quick-xml has already checked (attribute syntax, no duplicates),
/// so a simple scan over `name = "value"` pairs is exact. `value` is plain ASCII with no quotes.
fn set_attribute(tag: &str, name: &str, value: &str) -> (String, Option<Option<String>>) {
    let bytes = tag.as_bytes();
    // Skip `<` and the element name.
    let mut i = 1;
    while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'>' && bytes[i] != b'/'
    {
        i += 1;
    }
    let mut quote = b'\'';
    let mut first_quote = true;
    let mut last_attr_end = i;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] == b'>' || bytes[i] == b'/' {
            break;
        }
        let name_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let attr_name = &tag[name_start..i];
        while i < bytes.len() && (bytes[i] == b'=' || bytes[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let q = bytes[i];
        if first_quote {
            quote = q;
            first_quote = false;
        }
        let value_start = i + 1;
        let value_end = match tag[value_start..].find(q as char) {
            Some(n) => value_start + n,
            None => break,
        };
        i = value_end + 1;
        last_attr_end = i;
        if attr_name == name {
            let old = &tag[value_start..value_end];
            if old == value {
                return (tag.to_string(), None);
            }
            let mut out = String::with_capacity(tag.len() + value.len());
            out.push_str(&tag[..value_start]);
            out.push_str(value);
            out.push_str(&tag[value_end..]);
            return (out, Some(Some(old.to_string())));
        }
    }
    let q = quote as char;
    let mut out = String::with_capacity(tag.len() + name.len() + value.len() + 4);
    out.push_str(&tag[..last_attr_end]);
    out.push_str(&format!(" {name}={q}{value}{q}"));
    out.push_str(&tag[last_attr_end..]);
    (out, Some(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_attribute_replaces_in_place_and_keeps_quoting() {
        let (t, c) = set_attribute("<cpu mode='custom'  check='partial'>", "check", "full");
        assert_eq!(t, "<cpu mode='custom'  check='full'>");
        assert_eq!(c, Some(Some("partial".into())));
        let (t, c) = set_attribute("<cpu mode=\"custom\">", "check", "full");
        assert_eq!(t, "<cpu mode=\"custom\" check=\"full\">");
        assert_eq!(c, Some(None));
        let (t, c) = set_attribute("<model>", "fallback", "forbid");
        assert_eq!(t, "<model fallback='forbid'>");
        assert_eq!(c, Some(None));
        let (t, c) = set_attribute("<cpu check = 'full' />", "check", "full");
        assert_eq!(t, "<cpu check = 'full' />");
        assert_eq!(c, None);
        let (t, _) = set_attribute("<cpu\n  mode='custom'\n/>", "match", "exact");
        assert_eq!(t, "<cpu\n  mode='custom' match='exact'\n/>");
        // A value containing the other quote kind does not confuse the scan.
        let (t, _) = set_attribute("<cpu a=\"it's\" check='partial'>", "check", "full");
        assert_eq!(t, "<cpu a=\"it's\" check='full'>");
    }

    #[test]
    fn pins_a_custom_cpu() {
        let text = "<cpu mode='custom' match='minimum' check='partial'>\n  <model fallback='allow'>EPYC-Milan</model>\n  <feature policy='disable' name='pni'/>\n</cpu>";
        // `check` stays: libvirt refuses a hook output whose CPU check differs from the source's.
        let cpu = CpuElement::parse(text).expect("parses");
        assert_eq!(cpu.mode, CpuMode::Custom);
        assert_eq!(cpu.model_name(), Some("EPYC-Milan"));
        let (out, changes) = pin_custom(&cpu).expect("has a model");
        assert_eq!(out, "<cpu mode='custom' match='exact' check='partial'>\n  <model fallback='forbid'>EPYC-Milan</model>\n  <feature policy='disable' name='pni'/>\n</cpu>");
        let shown: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["cpu.match:minimum->exact", "model.fallback:allow->forbid"]
        );
        // Pinning is idempotent.
        let again = CpuElement::parse(&out).expect("parses");
        let (out2, changes2) = pin_custom(&again).expect("has a model");
        assert_eq!(out2, out);
        assert!(changes2.is_empty());
    }

    #[test]
    fn modes_and_modelless_cpus() {
        let cpu = CpuElement::parse("<cpu><topology sockets='1' cores='2' threads='1'/></cpu>")
            .expect("parses");
        assert_eq!(cpu.mode, CpuMode::Custom);
        assert!(pin_custom(&cpu).is_none());
        let cpu = CpuElement::parse("<cpu mode='host-passthrough' check='none'/>").expect("parses");
        assert_eq!(cpu.mode, CpuMode::HostPassthrough);
        let cpu = CpuElement::parse("<cpu mode='maximum'/>").expect("parses");
        assert_eq!(cpu.mode, CpuMode::Maximum);
    }
}
