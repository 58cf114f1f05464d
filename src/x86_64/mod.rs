//! The x86 guest's view of its CPU (x86_64 and i686 guests alike): the CPUID table and feature
//! MSRs, measured by a generated firmware.
//!
//! - `table`: [`CpuidTable`], what the guest read.
//! - `features`: libvirt's feature names for its bits (`x86_features.xml`).
//! - `normalize`: the masks that hide per-host noise ([`Mask`]).
//! - `diff`: the explanation of two tables' differences (lost / gained / changed /
//!   informational / masked).
//! - `dump`: the text forms of a table (kvm-unit-tests dump, `cpuid -r`).
//! - `subleaves`: which leaves have sub-leaves and how the probe enumerates them (shared with
//!   build.rs).
//! - `user_mode`: the probe's CPL3 pass against the table.
//! - `probe`: the firmware, the QEMU command line, the run and the result parser.

pub mod diff;
pub mod dump;
pub mod features;
pub mod normalize;
pub mod probe;
pub mod subleaves;
pub mod table;
pub mod user_mode;

pub use diff::{diff, diff_normalized, Diff, FeatureChange, FieldChange, Side};
pub use dump::{parse_dump, DumpError, DumpFormat};
pub use features::{libvirt_to_qemu, FeatureBit, FeatureError, FeatureMap};
pub use normalize::{normalize, Mask};
pub use table::{CpuidEntry, CpuidTable, MsrEntry, Register};
pub use user_mode::UserModeCpuid;
