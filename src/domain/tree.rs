//! A minimal element tree for reading small libvirt documents whole (a domain's CPU settings,
//! capabilities files): names, attributes, children and text, nothing more. No DTD processing: a
//! DOCTYPE is refused, so no entity is ever expanded (these documents may come from other hosts).
//!
//! The hook's byte-preserving path does not use this: it works on spans (`document.rs`).

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Deeper nesting than any libvirt document has: a bound against hostile input.
pub const MAX_DEPTH: usize = 64;

/// Why a document could not be read into an [`Element`] tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// Not well-formed XML, or an entity reference that is unknown.
    #[error("not well-formed at byte {position}: {reason}")]
    Malformed {
        /// Byte offset of the construct where the problem was found.
        position: u64,
        /// The parser's message.
        reason: String,
    },
    /// The document declares a DOCTYPE; refused whatever it holds, so no entity is ever expanded.
    #[error("contains a DOCTYPE declaration: refused (no entity expansion, ever)")]
    Doctype,
    /// Elements nest deeper than [`MAX_DEPTH`].
    #[error("nests deeper than {MAX_DEPTH} elements")]
    TooDeep,
    /// A second element follows the root.
    #[error("has a second root element <{found}>")]
    SecondRoot {
        /// Its name.
        found: String,
    },
    /// The document holds no element at all.
    #[error("has no root element")]
    NoRoot,
}

/// One element of a parsed document, with everything under it.
#[derive(Debug, Default)]
pub struct Element {
    /// The qualified name as written: libvirt's elements are unprefixed, so a prefixed element
    /// (metadata content) never matches one of them.
    pub name: String,
    /// Attributes as (qualified name, unescaped value), in document order.
    pub attrs: Vec<(String, String)>,
    /// Child elements, in document order.
    pub children: Vec<Element>,
    /// The element's own text and CDATA, unescaped and concatenated (not trimmed); its children's
    /// text is theirs.
    pub text: String,
}

impl Element {
    /// The value of attribute `name` (qualified name as written), if present.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first child element named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child element named `name`, in document order.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// Parses `xml` into its root element, refusing DOCTYPE, nesting deeper than [`MAX_DEPTH`] and
/// anything not well-formed. Comments, processing instructions and the XML declaration are skipped.
pub fn parse_tree(xml: &str) -> Result<Element, TreeError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let position = reader.buffer_position();
        let malformed = |reason: String| TreeError::Malformed { position, reason };
        let event = reader.read_event().map_err(|e| malformed(e.to_string()))?;
        let finished = match event {
            Event::DocType(_) => return Err(TreeError::Doctype),
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(TreeError::TooDeep);
                }
                stack.push(header(&start, position)?);
                None
            }
            Event::Empty(start) => Some(header(&start, position)?),
            Event::End(_) => match stack.pop() {
                Some(element) => Some(element),
                None => return Err(malformed("unexpected end tag".to_string())),
            },
            Event::Text(text) => {
                let text = text.unescape().map_err(|e| malformed(e.to_string()))?;
                match stack.last_mut() {
                    Some(parent) => parent.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(malformed("text outside the root element".to_string())),
                }
                None
            }
            Event::CData(data) => {
                let data = data.decode().map_err(|e| malformed(e.to_string()))?;
                if let Some(parent) = stack.last_mut() {
                    parent.text.push_str(&data);
                }
                None
            }
            Event::Eof => {
                if !stack.is_empty() {
                    return Err(malformed("document ends inside an element".to_string()));
                }
                return root.ok_or(TreeError::NoRoot);
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => None,
        };
        if let Some(element) = finished {
            match stack.last_mut() {
                Some(parent) => parent.children.push(element),
                None if root.is_some() => {
                    return Err(TreeError::SecondRoot {
                        found: element.name,
                    })
                }
                None => root = Some(element),
            }
        }
    }
}

fn header(start: &BytesStart<'_>, position: u64) -> Result<Element, TreeError> {
    let malformed = |reason: String| TreeError::Malformed { position, reason };
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| malformed(e.to_string()))?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| malformed(format!("attribute {key}: {e}")))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        ..Element::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_attributes_text_and_children() {
        let root = parse_tree("<a x='1'><b>t<![CDATA[<c>]]></b><b/><!--c--></a>").expect("parses");
        assert_eq!(root.attr("x"), Some("1"));
        assert_eq!(root.children_named("b").count(), 2);
        assert_eq!(root.child("b").map(|b| b.text.as_str()), Some("t<c>"));
    }

    #[test]
    fn refuses_what_it_must() {
        assert_eq!(
            parse_tree("<!DOCTYPE a><a/>").err(),
            Some(TreeError::Doctype)
        );
        assert!(matches!(
            parse_tree("<a/><b/>"),
            Err(TreeError::SecondRoot { found }) if found == "b"
        ));
        assert_eq!(parse_tree("<!-- -->").err(), Some(TreeError::NoRoot));
        assert!(matches!(
            parse_tree("<a>"),
            Err(TreeError::Malformed { .. })
        ));
        assert!(matches!(
            parse_tree("x<a/>"),
            Err(TreeError::Malformed { .. })
        ));
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse_tree(&deep).err(), Some(TreeError::TooDeep));
    }
}
