//! libvirt's names for CPUID and MSR feature bits, read from the installed CPU map.
//!
//! The names an operator writes in `<cpu><feature name=.../>` are libvirt's, so every explanation
//! cpuguard gives uses them. They come from the file libvirt itself uses
//! (`/usr/share/libvirt/cpu_map/x86_features.xml`) rather than from a table compiled in here, so
//! the names always match the libvirt installed beside cpuguard.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::{Deserialize, Serialize};

use super::table::Register;

/// Where libvirt installs its x86 feature definitions.
pub const DEFAULT_X86_FEATURES_PATH: &str = "/usr/share/libvirt/cpu_map/x86_features.xml";

/// libvirt feature names that QEMU spells differently on its `-cpu` command line.
///
/// This is libvirt 9.0's `virQEMUCapsCPUFeaturesX86` table (src/qemu/qemu_capabilities.c); the
/// installed `libvirt_driver_qemu.so` on Debian 12 carries exactly these eleven pairs. The
/// `source='qemu'` aliases in the CPU map are names QEMU *accepts*, not the ones libvirt passes
/// (libvirt passes `pni`, not `sse3`), so they are not used for this translation.
const LIBVIRT_TO_QEMU: &[(&str, &str)] = &[
    ("cmp_legacy", "cmp-legacy"),
    ("ds_cpl", "ds-cpl"),
    ("fxsr_opt", "fxsr-opt"),
    ("kvm_pv_eoi", "kvm-pv-eoi"),
    ("kvm_pv_unhalt", "kvm-pv-unhalt"),
    ("lahf_lm", "lahf-lm"),
    ("nodeid_msr", "nodeid-msr"),
    ("pclmuldq", "pclmulqdq"),
    ("perfctr_core", "perfctr-core"),
    ("perfctr_nb", "perfctr-nb"),
    ("tsc_adjust", "tsc-adjust"),
];

/// The QEMU `-cpu` spelling of a libvirt feature name, as libvirt translates it.
pub fn libvirt_to_qemu(name: &str) -> String {
    LIBVIRT_TO_QEMU
        .iter()
        .find(|(libvirt, _)| *libvirt == name)
        .map_or(name, |(_, qemu)| qemu)
        .to_string()
}

/// The libvirt name of a feature QEMU reports under its own spelling (inverse of
/// [`libvirt_to_qemu`]).
pub fn qemu_to_libvirt(name: &str) -> String {
    LIBVIRT_TO_QEMU
        .iter()
        .find(|(_, qemu)| *qemu == name)
        .map_or(name, |(libvirt, _)| libvirt)
        .to_string()
}

/// Leaves whose ECX input selects a sub-leaf (SDM vol. 2A CPUID, AMD APM vol. 3): the probe's
/// own list. Used to decide whether a location is written `CPUID.0x7.0` or just `CPUID.0x1`.
pub use super::subleaves::leaf_has_subleaves;

/// Architectural names of the MSRs libvirt defines feature bits in.
pub fn msr_name(index: u32) -> Option<&'static str> {
    match index {
        0x10a => Some("IA32_ARCH_CAPABILITIES"),
        0xcf => Some("IA32_CORE_CAPABILITIES"),
        0x345 => Some("IA32_PERF_CAPABILITIES"),
        0x480..=0x493 => Some("IA32_VMX capability MSR"),
        _ => None,
    }
}

/// One bit a feature occupies: a CPUID output register bit or an MSR bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FeatureBit {
    /// A bit of a CPUID answer (`"kind": "cpuid"` in JSON).
    Cpuid {
        /// The CPUID leaf (EAX input).
        leaf: u32,
        /// The sub-leaf (ECX input); 0 for leaves without sub-leaves.
        subleaf: u32,
        /// The output register holding the bit.
        register: Register,
        /// The bit number in that register, 0..=31.
        bit: u8,
    },
    /// A bit of a feature MSR (`"kind": "msr"` in JSON).
    Msr {
        /// The MSR's address, e.g. `0x10a` for IA32_ARCH_CAPABILITIES.
        index: u32,
        /// The bit number in the MSR's value, 0..=63.
        bit: u8,
    },
}

impl fmt::Display for FeatureBit {
    /// `CPUID.0x1:ECX[5]`, `CPUID.0x7.0:EBX[1]`, `MSR.0x10a[3]`: the notation of the SDM, so an
    /// operator can look the bit up.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FeatureBit::Cpuid {
                leaf,
                subleaf,
                register,
                bit,
            } => {
                write!(f, "CPUID.{leaf:#x}")?;
                if subleaf != 0 || leaf_has_subleaves(leaf) {
                    write!(f, ".{}", subleaf_text(subleaf))?;
                }
                write!(f, ":{}[{bit}]", register_name(register))
            }
            FeatureBit::Msr { index, bit } => write!(f, "MSR.{index:#x}[{bit}]"),
        }
    }
}

/// A sub-leaf as written after a hex leaf: `0`..`9` (the same in both bases), else `0xb`, so
/// `0xd.0xb` is never read as sub-leaf 0x11.
pub fn subleaf_text(subleaf: u32) -> String {
    if subleaf < 10 {
        subleaf.to_string()
    } else {
        format!("{subleaf:#x}")
    }
}

/// Upper-case register name as the SDM writes it.
pub fn register_name(register: Register) -> &'static str {
    match register {
        Register::Eax => "EAX",
        Register::Ebx => "EBX",
        Register::Ecx => "ECX",
        Register::Edx => "EDX",
    }
}

/// Another name libvirt knows a feature by, and who uses it (`qemu`, `linux`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureAlias {
    /// The other name, e.g. `sse3` for libvirt's `pni`.
    pub name: String,
    /// Who uses that name, as the map's `source` attribute says (`qemu`, `linux`).
    pub source: String,
}

/// One `<feature>` of the CPU map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// libvirt's name, as written in domain XML.
    pub name: String,
    /// The name libvirt puts on QEMU's `-cpu` line.
    pub qemu_name: String,
    /// Other names the map gives the feature; [`FeatureMap::by_name`] finds it by them too.
    pub aliases: Vec<FeatureAlias>,
    /// The CPUID or MSR bits the feature occupies (normally one).
    pub bits: Vec<FeatureBit>,
    /// `false` for features libvirt marks `migratable='no'` (invtsc, xsaves).
    pub migratable: bool,
}

/// Why libvirt's CPU feature map could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The map file could not be read.
    #[error("cannot read libvirt CPU feature map {path}: {source}")]
    Read {
        /// The file tried.
        path: PathBuf,
        /// The I/O error reading it.
        source: std::io::Error,
    },
    /// The map is not well-formed XML.
    #[error("libvirt CPU feature map {origin} line {line}: malformed XML: {source}")]
    Xml {
        /// The map's path (or the name a caller gave the text).
        origin: String,
        /// The 1-based line of the error.
        line: usize,
        /// The XML parser's error.
        source: quick_xml::Error,
    },
    /// The XML does not describe features the way libvirt's map does (an element out of
    /// place, a missing or bad attribute, a name defined twice).
    #[error("libvirt CPU feature map {origin} line {line}: {reason}")]
    Invalid {
        /// The map's path (or the name a caller gave the text).
        origin: String,
        /// The 1-based line of the offending element.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Feature names by bit and bits by name.
#[derive(Debug, Clone, Default)]
pub struct FeatureMap {
    features: Vec<Feature>,
    by_bit: HashMap<FeatureBit, Vec<usize>>,
    by_name: HashMap<String, usize>,
}

impl FeatureMap {
    /// Reads libvirt's installed map from [`DEFAULT_X86_FEATURES_PATH`].
    pub fn load_default() -> Result<Self, FeatureError> {
        Self::load(Path::new(DEFAULT_X86_FEATURES_PATH))
    }

    /// Reads the map at `path` (an `x86_features.xml`).
    pub fn load(path: &Path) -> Result<Self, FeatureError> {
        let xml = std::fs::read_to_string(path).map_err(|source| FeatureError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&xml, &path.display().to_string())
    }

    /// Parses the text of an `x86_features.xml`; `origin` names it in errors.
    pub fn parse(xml: &str, origin: &str) -> Result<Self, FeatureError> {
        let features = Parser::new(xml, origin).run()?;
        let mut map = FeatureMap::default();
        for (feature, line) in features {
            map.insert(feature)
                .map_err(|reason| FeatureError::Invalid {
                    origin: origin.to_string(),
                    line,
                    reason,
                })?;
        }
        Ok(map)
    }

    fn insert(&mut self, feature: Feature) -> Result<(), String> {
        if let Some(&existing) = self.by_name.get(&feature.name) {
            if self.features[existing].name == feature.name {
                return Err(format!("feature '{}' is defined twice", feature.name));
            }
        }
        let index = self.features.len();
        for bit in &feature.bits {
            self.by_bit.entry(*bit).or_default().push(index);
        }
        // A libvirt name always wins over another feature's alias of the same spelling.
        self.by_name.insert(feature.name.clone(), index);
        for alias in &feature.aliases {
            self.by_name.entry(alias.name.clone()).or_insert(index);
        }
        self.features.push(feature);
        Ok(())
    }

    /// Every feature, in the order the map defines them.
    pub fn features(&self) -> &[Feature] {
        &self.features
    }

    /// The number of features in the map.
    pub fn len(&self) -> usize {
        self.features.len()
    }

    /// True for a map that defines no feature.
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// The feature called `name` by libvirt, by one of its aliases, or by its QEMU spelling.
    pub fn by_name(&self, name: &str) -> Option<&Feature> {
        self.by_name
            .get(name)
            .or_else(|| self.by_name.get(&qemu_to_libvirt(name)))
            .map(|&i| &self.features[i])
    }

    /// Every feature occupying `bit` (normally one).
    pub fn at(&self, bit: &FeatureBit) -> Vec<&Feature> {
        self.by_bit
            .get(bit)
            .map(|indices| indices.iter().map(|&i| &self.features[i]).collect())
            .unwrap_or_default()
    }

    /// Names of the features at a CPUID output bit.
    pub fn cpuid_names(&self, leaf: u32, subleaf: u32, register: Register, bit: u8) -> Vec<&str> {
        self.at(&FeatureBit::Cpuid {
            leaf,
            subleaf,
            register,
            bit,
        })
        .into_iter()
        .map(|f| f.name.as_str())
        .collect()
    }

    /// Names of the features at an MSR bit.
    pub fn msr_names(&self, index: u32, bit: u8) -> Vec<&str> {
        self.at(&FeatureBit::Msr { index, bit })
            .into_iter()
            .map(|f| f.name.as_str())
            .collect()
    }
}

/// The feature being read between `<feature>` and `</feature>`.
struct OpenFeature {
    feature: Feature,
    line: usize,
}

struct Parser<'a> {
    xml: &'a str,
    origin: &'a str,
    reader: Reader<&'a [u8]>,
    /// (byte offset, line at that offset) of the last [`Parser::line_at`] answer.
    line_cursor: std::cell::Cell<(usize, usize)>,
}

impl<'a> Parser<'a> {
    fn new(xml: &'a str, origin: &'a str) -> Self {
        Parser {
            xml,
            origin,
            reader: Reader::from_str(xml),
            line_cursor: std::cell::Cell::new((0, 1)),
        }
    }

    /// The 1-based line of byte `position`. Positions arrive in increasing order while parsing,
    /// so lines are counted from the previous position on: rescanning from the start for every
    /// event made loading libvirt's ~4000-line map quadratic (95% of a `cpuguard diff`,
    /// measured with callgrind). An earlier position (an error's) is counted from the start.
    fn line_at(&self, position: u64) -> usize {
        let end = usize::try_from(position)
            .unwrap_or(usize::MAX)
            .min(self.xml.len());
        let (mut from, mut line) = self.line_cursor.get();
        if end < from {
            (from, line) = (0, 1);
        }
        line += self.xml.as_bytes()[from..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.line_cursor.set((end, line));
        line
    }

    fn invalid(&self, line: usize, reason: impl Into<String>) -> FeatureError {
        FeatureError::Invalid {
            origin: self.origin.to_string(),
            line,
            reason: reason.into(),
        }
    }

    /// Every feature with the line its definition starts on.
    fn run(mut self) -> Result<Vec<(Feature, usize)>, FeatureError> {
        let mut features = Vec::new();
        let mut open: Option<OpenFeature> = None;
        let mut saw_root = false;
        let mut depth = 0usize;
        loop {
            let start = self.reader.buffer_position();
            let event = self
                .reader
                .read_event()
                .map_err(|source| FeatureError::Xml {
                    origin: self.origin.to_string(),
                    line: self.line_at(self.reader.error_position()),
                    source,
                })?;
            let line = self.line_at(start);
            match event {
                Event::Start(e) => {
                    depth += 1;
                    self.element(&e, line, depth, false, &mut open, &mut saw_root)?;
                }
                Event::Empty(e) => {
                    self.element(&e, line, depth + 1, true, &mut open, &mut saw_root)?;
                }
                Event::End(e) => {
                    if e.name().as_ref() == b"feature" {
                        let done = open
                            .take()
                            .ok_or_else(|| self.invalid(line, "</feature> without <feature>"))?;
                        let start_line = done.line;
                        features.push((self.finish(done)?, start_line));
                    }
                    depth = depth.saturating_sub(1);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        if let Some(unclosed) = open {
            return Err(self.invalid(
                unclosed.line,
                format!("feature '{}' is never closed", unclosed.feature.name),
            ));
        }
        if depth != 0 {
            return Err(self.invalid(
                self.line_at(self.reader.buffer_position()),
                "unclosed element at end of file",
            ));
        }
        if !saw_root {
            return Err(self.invalid(1, "no <cpus> root element"));
        }
        if features.is_empty() {
            return Err(self.invalid(1, "no <feature> elements"));
        }
        Ok(features)
    }

    /// Handles one start or empty element; `depth` is the element's own nesting level (root = 1).
    fn element(
        &self,
        e: &BytesStart<'_>,
        line: usize,
        depth: usize,
        empty: bool,
        open: &mut Option<OpenFeature>,
        saw_root: &mut bool,
    ) -> Result<(), FeatureError> {
        let name = e.name();
        match (depth, name.as_ref()) {
            (1, b"cpus") => {
                *saw_root = true;
                Ok(())
            }
            (1, other) => Err(self.invalid(
                line,
                format!(
                    "root element is <{}>, expected <cpus>",
                    String::from_utf8_lossy(other)
                ),
            )),
            (2, b"feature") => {
                let attrs = self.attributes(e, line)?;
                let feature_name = required(&attrs, "name")
                    .ok_or_else(|| self.invalid(line, "<feature> without a name attribute"))?;
                if empty {
                    return Err(self.invalid(
                        line,
                        format!("feature '{feature_name}' has no <cpuid> or <msr> bits"),
                    ));
                }
                let migratable = !matches!(attrs.get("migratable").map(String::as_str), Some("no"));
                *open = Some(OpenFeature {
                    feature: Feature {
                        qemu_name: libvirt_to_qemu(feature_name),
                        name: feature_name.to_string(),
                        aliases: Vec::new(),
                        bits: Vec::new(),
                        migratable,
                    },
                    line,
                });
                Ok(())
            }
            (3, b"cpuid") => {
                let feature = self.open_feature(open, line, "cpuid")?;
                let attrs = self.attributes(e, line)?;
                let leaf = self.number(&attrs, "eax_in", line, true)?;
                let subleaf = self.number(&attrs, "ecx_in", line, false)?;
                let mut any = false;
                for (attr, register) in [
                    ("eax", Register::Eax),
                    ("ebx", Register::Ebx),
                    ("ecx", Register::Ecx),
                    ("edx", Register::Edx),
                ] {
                    let mask = self.number(&attrs, attr, line, false)?;
                    for bit in set_bits(mask) {
                        any = true;
                        feature.bits.push(FeatureBit::Cpuid {
                            leaf,
                            subleaf,
                            register,
                            bit,
                        });
                    }
                }
                if !any {
                    return Err(self.invalid(
                        line,
                        format!("<cpuid> of feature '{}' sets no bit", feature.name),
                    ));
                }
                Ok(())
            }
            (3, b"msr") => {
                let feature = self.open_feature(open, line, "msr")?;
                let attrs = self.attributes(e, line)?;
                let index = self.number(&attrs, "index", line, true)?;
                let low = self.number(&attrs, "eax", line, false)?;
                let high = self.number(&attrs, "edx", line, false)?;
                let value = (u64::from(high) << 32) | u64::from(low);
                if value == 0 {
                    return Err(self.invalid(
                        line,
                        format!("<msr> of feature '{}' sets no bit", feature.name),
                    ));
                }
                for bit in 0..64u8 {
                    if value & (1u64 << bit) != 0 {
                        feature.bits.push(FeatureBit::Msr { index, bit });
                    }
                }
                Ok(())
            }
            (3, b"alias") => {
                let feature = self.open_feature(open, line, "alias")?;
                let attrs = self.attributes(e, line)?;
                let alias = required(&attrs, "name")
                    .ok_or_else(|| self.invalid(line, "<alias> without a name attribute"))?;
                feature.aliases.push(FeatureAlias {
                    name: alias.to_string(),
                    source: attrs.get("source").cloned().unwrap_or_default(),
                });
                Ok(())
            }
            // Elements a later libvirt may add are not ours to reject.
            _ => Ok(()),
        }
    }

    fn open_feature<'f>(
        &self,
        open: &'f mut Option<OpenFeature>,
        line: usize,
        element: &str,
    ) -> Result<&'f mut Feature, FeatureError> {
        open.as_mut()
            .map(|o| &mut o.feature)
            .ok_or_else(|| self.invalid(line, format!("<{element}> outside <feature>")))
    }

    fn finish(&self, open: OpenFeature) -> Result<Feature, FeatureError> {
        if open.feature.bits.is_empty() {
            return Err(self.invalid(
                open.line,
                format!(
                    "feature '{}' has no <cpuid> or <msr> bits",
                    open.feature.name
                ),
            ));
        }
        Ok(open.feature)
    }

    fn attributes(
        &self,
        e: &BytesStart<'_>,
        line: usize,
    ) -> Result<HashMap<String, String>, FeatureError> {
        let mut out = HashMap::new();
        for attr in e.attributes() {
            let attr = attr.map_err(|err| self.invalid(line, format!("bad attribute: {err}")))?;
            let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
            let value = attr
                .unescape_value()
                .map_err(|err| self.invalid(line, format!("bad value of attribute {key}: {err}")))?
                .into_owned();
            out.insert(key, value);
        }
        Ok(out)
    }

    /// A numeric attribute (`0x..` hex or decimal); absent optional attributes read as 0.
    fn number(
        &self,
        attrs: &HashMap<String, String>,
        key: &str,
        line: usize,
        required: bool,
    ) -> Result<u32, FeatureError> {
        match attrs.get(key) {
            None if required => Err(self.invalid(line, format!("missing attribute {key}"))),
            None => Ok(0),
            Some(text) => parse_u32(text).ok_or_else(|| {
                self.invalid(
                    line,
                    format!("attribute {key}='{text}' is not a 32-bit number"),
                )
            }),
        }
    }
}

fn required<'m>(attrs: &'m HashMap<String, String>, key: &str) -> Option<&'m str> {
    attrs
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.trim().is_empty())
}

fn parse_u32(text: &str) -> Option<u32> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn set_bits(mask: u32) -> impl Iterator<Item = u8> {
    (0..32u8).filter(move |bit| mask & (1u32 << bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"<!-- comment -->
<cpus>
  <feature name='vmx'>
    <cpuid eax_in='0x01' ecx='0x00000020'/>
  </feature>
  <feature name='tsc_adjust'>
    <alias name='tsc-adjust' source='qemu'/>
    <cpuid eax_in='0x07' ecx_in='0x00' ebx='0x00000002'/>
  </feature>
  <feature name='invtsc' migratable='no'>
    <cpuid eax_in='0x80000007' edx='0x00000100'/>
  </feature>
  <feature name='mds-no'>
    <msr index='0x10a' edx='0x00000000' eax='0x00000020'/>
  </feature>
  <feature name='high-msr'>
    <msr index='0x10a' edx='0x00000001' eax='0x00000000'/>
  </feature>
</cpus>
"#;

    #[test]
    fn parses_cpuid_msr_alias_and_migratable() {
        let map = FeatureMap::parse(SMALL, "small").unwrap();
        assert_eq!(map.len(), 5);
        assert_eq!(map.cpuid_names(1, 0, Register::Ecx, 5), vec!["vmx"]);
        assert_eq!(map.cpuid_names(7, 0, Register::Ebx, 1), vec!["tsc_adjust"]);
        assert!(map.cpuid_names(7, 0, Register::Ebx, 2).is_empty());
        assert_eq!(map.msr_names(0x10a, 5), vec!["mds-no"]);
        assert_eq!(map.msr_names(0x10a, 32), vec!["high-msr"]);
        let invtsc = map.by_name("invtsc").unwrap();
        assert!(!invtsc.migratable);
        assert!(map.by_name("vmx").unwrap().migratable);
        let by_alias = map.by_name("tsc-adjust").unwrap();
        assert_eq!(by_alias.name, "tsc_adjust");
        assert_eq!(by_alias.qemu_name, "tsc-adjust");
        assert_eq!(by_alias.aliases[0].source, "qemu");
    }

    #[test]
    fn qemu_spelling_follows_libvirt_table() {
        assert_eq!(libvirt_to_qemu("tsc_adjust"), "tsc-adjust");
        assert_eq!(libvirt_to_qemu("pclmuldq"), "pclmulqdq");
        assert_eq!(libvirt_to_qemu("cmp_legacy"), "cmp-legacy");
        assert_eq!(libvirt_to_qemu("perfctr_core"), "perfctr-core");
        // Names libvirt passes unchanged, even though QEMU has an alias for them.
        assert_eq!(libvirt_to_qemu("pni"), "pni");
        assert_eq!(libvirt_to_qemu("sse4.1"), "sse4.1");
        assert_eq!(qemu_to_libvirt("perfctr-core"), "perfctr_core");
        assert_eq!(qemu_to_libvirt("vmx"), "vmx");
        for (libvirt, qemu) in LIBVIRT_TO_QEMU {
            assert_eq!(&qemu_to_libvirt(&libvirt_to_qemu(libvirt)), libvirt);
            assert_eq!(&libvirt_to_qemu(&qemu_to_libvirt(qemu)), qemu);
        }
    }

    /// Each renamed CPU-map feature has its QEMU spelling listed as a `source='qemu'` alias in
    /// libvirt's installed map: the table agrees with the libvirt on this host. (`kvm_pv_eoi` and
    /// `kvm_pv_unhalt` are libvirt's `<kvm>` features, not in the CPU map.)
    #[test]
    fn renames_are_qemu_aliases_in_the_installed_cpu_map() {
        let map = std::fs::read_to_string(DEFAULT_X86_FEATURES_PATH)
            .expect("libvirt's cpu_map is installed");
        let mut checked = 0;
        for (from, to) in LIBVIRT_TO_QEMU {
            if from.starts_with("kvm_") {
                continue;
            }
            assert!(
                map.contains(&format!("<feature name='{from}'>")),
                "{from} not in cpu_map"
            );
            assert!(
                map.contains(&format!("<alias name='{to}' source='qemu'/>")),
                "{to} not a qemu alias in cpu_map"
            );
            checked += 1;
        }
        assert_eq!(checked, LIBVIRT_TO_QEMU.len() - 2);
    }

    #[test]
    fn bit_locations_print_in_sdm_notation() {
        let vmx = FeatureBit::Cpuid {
            leaf: 1,
            subleaf: 0,
            register: Register::Ecx,
            bit: 5,
        };
        assert_eq!(vmx.to_string(), "CPUID.0x1:ECX[5]");
        let tsc_adjust = FeatureBit::Cpuid {
            leaf: 7,
            subleaf: 0,
            register: Register::Ebx,
            bit: 1,
        };
        assert_eq!(tsc_adjust.to_string(), "CPUID.0x7.0:EBX[1]");
        assert_eq!(
            FeatureBit::Msr {
                index: 0x10a,
                bit: 5
            }
            .to_string(),
            "MSR.0x10a[5]"
        );
    }

    fn error_of(xml: &str) -> String {
        match FeatureMap::parse(xml, "bad.xml") {
            Ok(map) => panic!("accepted malformed map with {} features", map.len()),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn malformed_maps_are_errors_with_lines() {
        let msg = error_of(
            "<cpus>\n<feature name='a'>\n<cpuid eax_in='0x01' ecx='zz'/>\n</feature>\n</cpus>",
        );
        assert!(msg.contains("line 3") && msg.contains("ecx='zz'"), "{msg}");
        let msg = error_of("<cpus>\n<feature name='a'>\n<cpuid ecx='0x1'/>\n</feature>\n</cpus>");
        assert!(msg.contains("missing attribute eax_in"), "{msg}");
        let msg = error_of("<cpus>\n<feature name='a'>\n</feature>\n</cpus>");
        assert!(msg.contains("no <cpuid> or <msr>"), "{msg}");
        let msg = error_of("<cpus>\n<feature name='a'/>\n</cpus>");
        assert!(msg.contains("no <cpuid> or <msr>"), "{msg}");
        let msg = error_of("<cpus>\n<feature>\n<cpuid eax_in='1' ecx='1'/>\n</feature>\n</cpus>");
        assert!(msg.contains("without a name"), "{msg}");
        let msg = error_of("<cpus>\n<feature name='a'>\n<cpuid eax_in='1' ecx='1'/>\n</cpus>");
        assert!(
            msg.contains("malformed XML") || msg.contains("never closed"),
            "{msg}"
        );
        let msg = error_of("<models/>");
        assert!(msg.contains("expected <cpus>"), "{msg}");
        let msg = error_of("<cpus></cpus>");
        assert!(msg.contains("no <feature>"), "{msg}");
        let msg = error_of("<cpus><feature name='a'><cpuid eax_in='1' ecx='1'/></feature><feature name='a'><cpuid eax_in='1' ecx='2'/></feature></cpus>");
        assert!(msg.contains("defined twice"), "{msg}");
        let msg = error_of("<cpus><cpuid eax_in='1' ecx='1'/></cpus>");
        assert!(!msg.is_empty());
        let msg = error_of("<cpus><feature name='a'><cpuid eax_in='1' ecx='1'/>");
        assert!(!msg.is_empty());
    }

    /// Lines are counted incrementally (see `line_at`): an error deep in a long map, and an XML
    /// error reported at a position before the last event's, still name their own line.
    #[test]
    fn errors_late_in_a_long_map_name_their_line() {
        let mut xml = String::from("<cpus>\n");
        for i in 0..500 {
            xml.push_str(&format!(
                "<feature name='f{i}'>\n  <cpuid eax_in='0x01' ecx='0x1'/>\n</feature>\n"
            ));
        }
        // Line 1 is <cpus>, each feature takes 3 lines: the bad <cpuid> is on line 1 + 1500 + 2.
        let bad = format!(
            "{xml}<feature name='bad'>\n  <cpuid eax_in='0x01' ecx='zz'/>\n</feature>\n</cpus>\n"
        );
        let msg = error_of(&bad);
        assert!(msg.contains("line 1503"), "{msg}");
        let unclosed =
            format!("{xml}<feature name='x'>\n  <cpuid eax_in='0x01' ecx='0x1'/>\n</cpus>\n");
        let msg = error_of(&unclosed);
        assert!(
            msg.contains("line 1503") || msg.contains("line 1504"),
            "{msg}"
        );
        let ok = FeatureMap::parse(&format!("{xml}</cpus>\n"), "ok.xml").unwrap();
        assert_eq!(ok.len(), 500);
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = FeatureMap::load(Path::new("/nonexistent/x86_features.xml")).unwrap_err();
        assert!(matches!(err, FeatureError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/x86_features.xml"));
    }

    #[test]
    fn installed_map_names_the_seed_bits() {
        let path = Path::new(DEFAULT_X86_FEATURES_PATH);
        if !path.exists() {
            eprintln!("skipping: {DEFAULT_X86_FEATURES_PATH} not installed");
            return;
        }
        let map = FeatureMap::load(path).unwrap();
        assert!(map.len() > 100, "only {} features", map.len());
        assert_eq!(map.cpuid_names(1, 0, Register::Ecx, 5), vec!["vmx"]);
        // vme is EDX bit 1 (mask 0x2); seed 001 writes "EDX[2]", the mask, not the bit number.
        assert_eq!(map.cpuid_names(1, 0, Register::Edx, 1), vec!["vme"]);
        assert_eq!(map.cpuid_names(1, 0, Register::Edx, 2), vec!["de"]);
        assert_eq!(map.cpuid_names(7, 0, Register::Ebx, 1), vec!["tsc_adjust"]);
        assert_eq!(map.by_name("pclmuldq").unwrap().qemu_name, "pclmulqdq");
        assert_eq!(map.by_name("sse3").unwrap().name, "pni");
        assert!(!map.msr_names(0x10a, 0).is_empty());
        // Every bit of the installed map resolves back to its feature.
        for feature in map.features() {
            for bit in &feature.bits {
                assert!(map.at(bit).iter().any(|f| f.name == feature.name));
            }
        }
    }
}
