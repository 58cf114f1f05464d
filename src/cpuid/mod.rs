//! CPUID as the guest sees it: the table, libvirt's feature names for its bits, the masks that
//! hide per-host noise, and the explanation of differences.

pub mod diff;
pub mod dump;
pub mod features;
pub mod normalize;
pub mod table;

pub use diff::{diff, Diff, FeatureChange, FieldChange, Side};
pub use dump::{parse_dump, DumpError, DumpFormat};
pub use features::{libvirt_to_qemu, FeatureBit, FeatureError, FeatureMap};
pub use normalize::{normalize, Mask};
pub use table::{CpuidEntry, CpuidTable, MsrEntry, Register};
