//! A libvirt domain XML document from an untrusted source, checked and indexed by byte offsets.
//!
//! The hook receives XML written on another host and must hand back the same document with only
//! `<cpu>` (and cpuguard's own metadata) changed. So this module never re-serializes: it checks the
//! document with quick-xml, records where the interesting elements start and end, and lets callers
//! splice replacement text between those offsets. Every byte outside a splice is the input's byte.

use quick_xml::events::attributes::Attributes;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use thiserror::Error;

use crate::domain::metadata;

/// Why a document was refused. Each message is one line that names the reason.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DocumentError {
    /// The input is larger than `max_xml_bytes`; refused before parsing.
    #[error("domain XML is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The input's size, bytes.
        size: usize,
        /// The limit, bytes.
        limit: usize,
    },
    /// The input is not valid UTF-8.
    #[error("domain XML is not UTF-8 (byte {offset})")]
    NotUtf8 {
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The input is empty or only whitespace.
    #[error("domain XML is empty")]
    Empty,
    /// The document declares a DOCTYPE; refused whatever it holds, so no entity is ever expanded.
    #[error("domain XML has a DOCTYPE declaration (refused: no DTDs or entity declarations)")]
    Doctype,
    /// The XML declaration names an encoding other than UTF-8: the encoding it names.
    #[error("domain XML declares encoding {0:?}; only UTF-8 is accepted")]
    Encoding(String),
    /// An entity reference other than the five XML entities and character references.
    #[error("domain XML uses entity reference &{name}; at byte {offset} (only the five XML entities and character references are accepted)")]
    Entity {
        /// The entity's name, without `&` and `;`.
        name: String,
        /// Byte offset of the reference.
        offset: usize,
    },
    /// Not well-formed XML (mismatched tags, a bad attribute, an unclosed element).
    #[error("domain XML is malformed at byte {offset}: {reason}")]
    Malformed {
        /// Byte offset where the problem was found.
        offset: usize,
        /// The parser's message.
        reason: String,
    },
    /// A second element follows the root.
    #[error("domain XML has a second root element <{name}> at byte {offset}")]
    SecondRoot {
        /// Its name.
        name: String,
        /// Byte offset of its start tag.
        offset: usize,
    },
    /// Non-whitespace text before or after the root element.
    #[error("domain XML has text outside the root element at byte {offset}")]
    TextOutsideRoot {
        /// Byte offset of the text.
        offset: usize,
    },
    /// The root element is not `<domain>`: its name.
    #[error("domain XML root element is <{0}>, not <domain>")]
    NotADomain(String),
    /// The document holds no element at all.
    #[error("domain XML has no root element")]
    NoRoot,
    /// An element cpuguard reads or edits (`cpu`, `metadata`, or its stamp or policy element)
    /// appears twice, so which one libvirt uses would be a guess: which.
    #[error("domain XML has more than one <{0}> element under <domain>")]
    Duplicate(&'static str),
    /// Elements nest deeper than [`MAX_DEPTH`].
    #[error("domain XML nests elements deeper than {MAX_DEPTH} at byte {offset} (libvirt's parser refuses that too)")]
    TooDeep {
        /// Byte offset of the start tag that went too deep.
        offset: usize,
    },
    /// An element has more than [`MAX_ATTRIBUTES`] attributes.
    #[error(
        "domain XML has an element with more than {MAX_ATTRIBUTES} attributes at byte {offset}"
    )]
    TooManyAttributes {
        /// Byte offset of its start tag.
        offset: usize,
    },
    /// More than [`MAX_NAMESPACES_IN_SCOPE`] namespace declarations are in scope at once.
    #[error("domain XML has more than {MAX_NAMESPACES_IN_SCOPE} namespace declarations in scope at byte {offset}")]
    TooManyNamespaces {
        /// Byte offset of the start tag that declared one too many.
        offset: usize,
    },
}

/// Deepest element nesting accepted: libxml2, which libvirt parses domain XML with, stops at 256
/// without XML_PARSE_HUGE (which libvirt does not set), so no domain libvirt accepts is deeper.
/// The bound (with the two below) keeps the parse linear in the input: namespace resolution
/// and duplicate-attribute checks cost per element what is in scope or on the element.
pub const MAX_DEPTH: usize = 256;
/// Most attributes (namespace declarations included) on one element; libvirt's own elements
/// have at most a dozen or two.
pub const MAX_ATTRIBUTES: usize = 128;
/// Most namespace declarations in scope at once; a domain has one per metadata application.
pub const MAX_NAMESPACES_IN_SCOPE: usize = 64;

/// Where an element sits in the text: `start..end` is the whole element, `start..tag_end` its start
/// tag (for an empty element `<x/>` the two coincide with `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Byte offset of the `<`.
    pub start: usize,
    /// Byte offset just past the start tag's `>`.
    pub tag_end: usize,
    /// Byte offset just past the element's end tag (or of `/>`, for an empty element).
    pub end: usize,
}

impl Span {
    /// True for an empty element (`<x/>`): it has no content to splice into.
    pub fn is_empty_element(&self) -> bool {
        self.tag_end == self.end
    }
}

/// The checked document and what the hook needs from it.
#[derive(Debug)]
pub struct DomainDocument<'a> {
    /// The whole input, which every [`Span`] indexes.
    pub text: &'a str,
    /// `<domain><name>`, trimmed; untrusted (never use it as a path).
    pub name: Option<String>,
    /// `<domain><uuid>`, trimmed, as written.
    pub uuid: Option<String>,
    /// `<domain type=…>`: `kvm` or `qemu` (TCG).
    pub domain_type: Option<String>,
    /// `<os><type arch=…>`.
    pub arch: Option<String>,
    /// The guest CPU: `<domain><cpu>`, never a `<cpu>` nested elsewhere (e.g. in metadata).
    pub cpu: Option<Span>,
    /// `<domain><metadata>`.
    pub metadata: Option<Span>,
    /// cpuguard's stamp inside `<metadata>`, found by namespace URI, not by prefix.
    pub stamp: Option<Span>,
    /// cpuguard's per-domain policy element inside `<metadata>`.
    pub policy: Option<Span>,
    /// The `value`s of `<qemu:commandline><qemu:arg/>` (libvirt's QEMU namespace, found by URI):
    /// raw QEMU arguments, some of which change the guest CPU behind libvirt's back.
    pub qemu_args: Vec<String>,
}

/// libvirt's namespace for raw QEMU command-line additions.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Checks raw hook input: size, UTF-8, then the document itself.
pub fn parse_bytes(bytes: &[u8], limit: usize) -> Result<DomainDocument<'_>, DocumentError> {
    if bytes.len() > limit {
        return Err(DocumentError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DocumentError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    DomainDocument::parse(text)
}

/// `<domain>` is depth 0; the deepest tracked elements (`<os><type>`, metadata children) are depth 2.
const TRACKED_DEPTH: usize = 2;

/// The characters a child element's text may carry; `Text` events between them are tracked only
/// for `<name>` and `<uuid>` under the root.
#[derive(Clone, Copy, PartialEq)]
enum Capture {
    None,
    Name,
    Uuid,
}

impl<'a> DomainDocument<'a> {
    /// Checks `text` as an untrusted domain XML document and indexes it; refuses DOCTYPE, entity
    /// declarations and references other than the predefined ones, encodings other than UTF-8, and
    /// documents deeper or wider than the bounds above.
    pub fn parse(text: &'a str) -> Result<Self, DocumentError> {
        if text.trim().is_empty() {
            return Err(DocumentError::Empty);
        }
        let mut doc = DomainDocument {
            text,
            name: None,
            uuid: None,
            domain_type: None,
            arch: None,
            cpu: None,
            metadata: None,
            stamp: None,
            policy: None,
            qemu_args: Vec::new(),
        };
        let mut reader = NsReader::from_str(text);
        let config = reader.config_mut();
        config.check_end_names = true;
        config.trim_text(false);
        config.expand_empty_elements = false;

        // Path of local names from the root down to the current element.
        let mut path: Vec<String> = Vec::new();
        let mut root_seen = false;
        // Starts of open elements we must close into a Span: (depth, which, start, tag_end).
        let mut open: Vec<(usize, Slot, usize, usize)> = Vec::new();
        let mut capture = Capture::None;
        let mut captured = String::new();
        // Inside `<domain><qemu:commandline>`.
        let mut in_commandline = false;
        // Namespace declarations made by each open element, and their sum.
        let mut declared: Vec<usize> = Vec::new();
        let mut in_scope = 0usize;

        loop {
            let start = reader.buffer_position() as usize;
            let (ours, qemu_ns, event) = match reader.read_resolved_event() {
                Ok((ResolveResult::Bound(ns), event)) => (
                    metadata::classify_namespace(ns.as_ref()),
                    ns.as_ref() == QEMU_NS.as_bytes(),
                    event,
                ),
                Ok((_, event)) => (None, false, event),
                Err(e) => {
                    return Err(DocumentError::Malformed {
                        offset: reader.error_position() as usize,
                        reason: e.to_string(),
                    })
                }
            };
            let end = reader.buffer_position() as usize;
            match event {
                Event::DocType(_) => return Err(DocumentError::Doctype),
                Event::Decl(decl) => {
                    if let Some(Ok(enc)) = decl.encoding() {
                        let enc = String::from_utf8_lossy(&enc).to_string();
                        if !enc.eq_ignore_ascii_case("utf-8") && !enc.eq_ignore_ascii_case("utf8") {
                            return Err(DocumentError::Encoding(enc));
                        }
                    }
                }
                Event::PI(_) | Event::Comment(_) | Event::CData(_) => {}
                Event::Text(t) => {
                    check_entities(&t, start)?;
                    if path.is_empty() {
                        if t.iter().any(|b| !b.is_ascii_whitespace()) {
                            return Err(DocumentError::TextOutsideRoot { offset: start });
                        }
                    } else if capture != Capture::None {
                        let s = t.unescape().map_err(|e| DocumentError::Malformed {
                            offset: start,
                            reason: e.to_string(),
                        })?;
                        captured.push_str(&s);
                    }
                }
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let is_empty = matches!(event, Event::Empty(_));
                    let depth = path.len();
                    // Only the top three levels hold anything the hook tracks; deeper names are
                    // not kept, which keeps a large document's parse free of per-element allocs.
                    let local = if depth <= TRACKED_DEPTH {
                        String::from_utf8_lossy(e.local_name().as_ref()).to_string()
                    } else {
                        String::new()
                    };
                    if path.is_empty() {
                        if root_seen {
                            return Err(DocumentError::SecondRoot {
                                name: local,
                                offset: start,
                            });
                        }
                        root_seen = true;
                        if local != "domain" {
                            return Err(DocumentError::NotADomain(local));
                        }
                    }
                    if depth >= MAX_DEPTH {
                        return Err(DocumentError::TooDeep { offset: start });
                    }
                    let declarations = check_attributes(e.attributes(), start)?;
                    if in_scope + declarations > MAX_NAMESPACES_IN_SCOPE {
                        return Err(DocumentError::TooManyNamespaces { offset: start });
                    }
                    if !is_empty {
                        declared.push(declarations);
                        in_scope += declarations;
                    }
                    if qemu_ns && depth == 1 && local == "commandline" {
                        in_commandline = !is_empty;
                    } else if qemu_ns && depth == 2 && in_commandline && local == "arg" {
                        doc.qemu_args
                            .push(attribute(e, "value").unwrap_or_default());
                    }
                    let slot = if depth <= TRACKED_DEPTH {
                        doc.classify(&path, &local, ours, e)?
                    } else {
                        None
                    };
                    if let Some(slot) = slot {
                        if is_empty {
                            doc.set(
                                slot,
                                Span {
                                    start,
                                    tag_end: end,
                                    end,
                                },
                            )?;
                        } else {
                            open.push((depth, slot, start, end));
                        }
                    }
                    if !is_empty {
                        if depth == 1 && local == "name" {
                            capture = Capture::Name;
                        } else if depth == 1 && local == "uuid" {
                            capture = Capture::Uuid;
                        }
                        path.push(local);
                    }
                }
                Event::End(_) => {
                    path.pop();
                    in_scope -= declared.pop().unwrap_or(0);
                    let depth = path.len();
                    if depth == 1 {
                        in_commandline = false;
                    }
                    if let Some(&(d, slot, s, tag_end)) = open.last() {
                        if d == depth {
                            open.pop();
                            doc.set(
                                slot,
                                Span {
                                    start: s,
                                    tag_end,
                                    end,
                                },
                            )?;
                        }
                    }
                    if depth == 1 && capture != Capture::None {
                        let value = std::mem::take(&mut captured).trim().to_string();
                        match capture {
                            Capture::Name => doc.name = Some(value),
                            Capture::Uuid => doc.uuid = Some(value),
                            Capture::None => {}
                        }
                        capture = Capture::None;
                    }
                }
                Event::Eof => break,
            }
        }
        if !path.is_empty() {
            return Err(DocumentError::Malformed {
                offset: text.len(),
                reason: format!("unclosed element <{}>", path.join("><")),
            });
        }
        if !root_seen {
            return Err(DocumentError::NoRoot);
        }
        Ok(doc)
    }

    /// Decides whether an element is one the hook tracks, reading the attributes it needs.
    fn classify(
        &mut self,
        path: &[String],
        local: &str,
        ours: Option<metadata::Namespace>,
        e: &BytesStart<'_>,
    ) -> Result<Option<Slot>, DocumentError> {
        let parents: Vec<&str> = path.iter().map(String::as_str).collect();
        Ok(match (parents.as_slice(), local) {
            ([], "domain") => {
                self.domain_type = attribute(e, "type");
                None
            }
            (["domain"], "cpu") => Some(Slot::Cpu),
            (["domain"], "metadata") => Some(Slot::Metadata),
            (["domain", "os"], "type") => {
                self.arch = attribute(e, "arch");
                None
            }
            (["domain", "metadata"], _) => match ours {
                Some(metadata::Namespace::Stamp) => Some(Slot::Stamp),
                Some(metadata::Namespace::Policy) => Some(Slot::Policy),
                None => None,
            },
            _ => None,
        })
    }

    fn set(&mut self, slot: Slot, span: Span) -> Result<(), DocumentError> {
        let (field, what) = match slot {
            Slot::Cpu => (&mut self.cpu, "cpu"),
            Slot::Metadata => (&mut self.metadata, "metadata"),
            Slot::Stamp => (&mut self.stamp, "cpuguard stamp"),
            Slot::Policy => (&mut self.policy, "cpuguard policy"),
        };
        if field.is_some() {
            return Err(DocumentError::Duplicate(what));
        }
        *field = Some(span);
        Ok(())
    }

    /// The text of a span.
    pub fn slice(&self, span: Span) -> &'a str {
        &self.text[span.start..span.end]
    }

    /// The `<qemu:commandline>` arguments that change what the guest sees of its CPU, each with
    /// its value (`-cpu host`, `-global EPYC-x86_64-cpu.avx2=off`, `-device …-cpu,…`,
    /// `-overcommit cpu-pm=on`): the stamp and this host's measurement both follow libvirt's
    /// `<cpu>`, so these would change the CPU unseen.
    pub fn commandline_cpu_args(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut args = self.qemu_args.iter().map(String::as_str).peekable();
        while let Some(arg) = args.next() {
            let option = arg.trim_start_matches('-');
            if !arg.starts_with('-') {
                continue;
            }
            let (option, inline) = match option.split_once('=') {
                Some((o, v)) => (o, Some(v)),
                None => (option, None),
            };
            let value = match inline {
                Some(v) => v,
                None => args.peek().copied().unwrap_or(""),
            };
            let driver = value
                .split([',', '.'])
                .next()
                .unwrap_or("")
                .trim_start_matches("driver=");
            let cpu_driver = driver.ends_with("-cpu") || driver == "cpu";
            let touches = match option {
                "cpu" => true,
                "global" => cpu_driver || value.contains("-cpu."),
                "device" => cpu_driver,
                "overcommit" => value.contains("cpu-pm"),
                _ => false,
            };
            if touches {
                found.push(format!("-{option} {value}"));
            }
        }
        found
    }

    /// The name to use in messages: the document's `<name>`, else what libvirt passed in argv.
    pub fn display_name<'b>(&'b self, fallback: &'b str) -> &'b str {
        self.name.as_deref().unwrap_or(fallback)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Cpu,
    Metadata,
    Stamp,
    Policy,
}

/// Reads one attribute's unescaped value (the caller has already checked the attribute list).
pub fn attribute(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name.as_bytes())
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// Attribute syntax and duplicates are checked strictly; values may carry only the predefined
/// entities, because quick-xml would otherwise pass an undeclared `&name;` through silently.
/// At most [`MAX_ATTRIBUTES`] (quick-xml's duplicate check compares each with every earlier
/// one). Returns how many are namespace declarations.
fn check_attributes(mut attrs: Attributes<'_>, tag_start: usize) -> Result<usize, DocumentError> {
    let mut count = 0;
    let mut declarations = 0;
    for attr in attrs.with_checks(true) {
        count += 1;
        if count > MAX_ATTRIBUTES {
            return Err(DocumentError::TooManyAttributes { offset: tag_start });
        }
        let attr = attr.map_err(|e| DocumentError::Malformed {
            offset: tag_start,
            reason: e.to_string(),
        })?;
        let key = attr.key.as_ref();
        if key == b"xmlns" || key.starts_with(b"xmlns:") {
            declarations += 1;
        }
        check_entities(&attr.value, tag_start)?;
    }
    Ok(declarations)
}

/// Refuses every entity reference except `&lt; &gt; &amp; &quot; &apos;` and `&#…;`. Entities can
/// only be declared in a DTD, which is refused too; this catches a stray `&foo;` with a clear error.
fn check_entities(raw: &[u8], base: usize) -> Result<(), DocumentError> {
    let mut i = 0;
    while let Some(pos) = raw[i..].iter().position(|&b| b == b'&') {
        let at = i + pos;
        let rest = &raw[at + 1..];
        let semi = rest.iter().position(|&b| b == b';');
        let name = match semi {
            Some(n) => &rest[..n],
            None => {
                return Err(DocumentError::Malformed {
                    offset: base + at,
                    reason: "'&' without a terminating ';'".into(),
                })
            }
        };
        let ok = matches!(name, b"lt" | b"gt" | b"amp" | b"quot" | b"apos") || is_char_ref(name);
        if !ok {
            return Err(DocumentError::Entity {
                name: String::from_utf8_lossy(name).chars().take(40).collect(),
                offset: base + at,
            });
        }
        i = at + 1 + name.len() + 1;
    }
    Ok(())
}

fn is_char_ref(name: &[u8]) -> bool {
    match name {
        [b'#', b'x', hex @ ..] => !hex.is_empty() && hex.iter().all(u8::is_ascii_hexdigit),
        [b'#', dec @ ..] => !dec.is_empty() && dec.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATE: &str = include_str!("../../tests/fixtures/xml/libvirt9-migrate-begin.xml");

    #[test]
    fn indexes_the_real_migrate_sample() {
        let doc = DomainDocument::parse(MIGRATE).expect("sample parses");
        assert_eq!(doc.name.as_deref(), Some("guest1"));
        assert_eq!(
            doc.uuid.as_deref(),
            Some("06c0c0dc-1080-4d3f-bdac-967d624c94f9")
        );
        assert_eq!(doc.domain_type.as_deref(), Some("kvm"));
        assert_eq!(doc.arch.as_deref(), Some("x86_64"));
        let cpu = doc.slice(doc.cpu.expect("cpu found"));
        assert!(cpu.starts_with("<cpu mode='custom'"));
        assert!(cpu.ends_with("</cpu>"));
        assert!(doc.metadata.is_none());
    }

    fn err(xml: &str) -> DocumentError {
        DomainDocument::parse(xml).expect_err("must be refused")
    }

    #[test]
    fn refuses_doctype_and_entities() {
        let bomb = "<!DOCTYPE d [<!ENTITY a \"aaaa\">]><domain><name>&a;</name></domain>";
        assert_eq!(err(bomb), DocumentError::Doctype);
        assert!(matches!(
            err("<domain><name>&a;</name></domain>"),
            DocumentError::Entity { ref name, .. } if name == "a"
        ));
        assert!(matches!(
            err("<domain x='&ext;'/>"),
            DocumentError::Entity { .. }
        ));
        // The predefined ones and character references are fine.
        let ok = DomainDocument::parse("<domain><name>a&amp;b&#x41;&#65;</name></domain>")
            .expect("predefined entities are accepted");
        assert_eq!(ok.name.as_deref(), Some("a&bAA"));
    }

    #[test]
    fn refuses_structural_problems() {
        assert!(matches!(
            err("<domain/><domain/>"),
            DocumentError::SecondRoot { .. }
        ));
        assert!(matches!(
            err("<domain></domian>"),
            DocumentError::Malformed { .. }
        ));
        assert!(matches!(
            err("<domain><cpu>"),
            DocumentError::Malformed { .. }
        ));
        assert_eq!(
            err("<network/>"),
            DocumentError::NotADomain("network".into())
        );
        assert!(matches!(
            err("junk<domain/>"),
            DocumentError::TextOutsideRoot { .. }
        ));
        assert_eq!(err("  \n"), DocumentError::Empty);
        assert_eq!(err("<!-- only -->"), DocumentError::NoRoot);
        assert_eq!(
            err("<domain><cpu/><cpu/></domain>"),
            DocumentError::Duplicate("cpu")
        );
        assert!(matches!(
            err("<domain a='1' a='2'/>"),
            DocumentError::Malformed { .. }
        ));
        assert!(matches!(
            err("<?xml version='1.0' encoding='ISO-8859-1'?><domain/>"),
            DocumentError::Encoding(_)
        ));
    }

    #[test]
    fn size_and_utf8_are_checked_first() {
        assert_eq!(
            parse_bytes(b"<domain/>", 4).expect_err("too large"),
            DocumentError::TooLarge { size: 9, limit: 4 }
        );
        assert!(matches!(
            parse_bytes(b"<domain>\xff</domain>", 100),
            Err(DocumentError::NotUtf8 { offset: 8 })
        ));
    }

    #[test]
    fn cpu_inside_metadata_is_not_the_guest_cpu() {
        let xml = "<domain><metadata><x:y xmlns:x='urn:other'><cpu mode='host-model'/></x:y></metadata><cpu mode='custom'><model>qemu64</model></cpu></domain>";
        let doc = DomainDocument::parse(xml).expect("parses");
        assert!(doc.slice(doc.cpu.expect("cpu")).contains("qemu64"));
        assert!(doc.stamp.is_none());
    }

    #[test]
    fn finds_our_metadata_by_namespace_not_prefix() {
        let xml = format!(
            "<domain><metadata><zz:stamp xmlns:zz='{}' digest='d'/><cpuguard:stamp xmlns:cpuguard='urn:someone-else'/></metadata></domain>",
            metadata::STAMP_NS
        );
        let doc = DomainDocument::parse(&xml).expect("parses");
        let stamp = doc.slice(doc.stamp.expect("stamp found"));
        assert!(stamp.starts_with("<zz:stamp"));
    }
}
