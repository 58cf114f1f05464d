//! The libvirt domain XML: checking untrusted documents, locating and rewriting the guest
//! `<cpu>`, and cpuguard's own `<metadata>` elements.

pub mod cpu;
pub mod document;
pub mod guest;
pub mod metadata;
pub mod tree;
