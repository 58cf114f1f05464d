//! The guest architectures cpuguard probes, named as libvirt names them (`<os><type arch=…>`).
//! The name is parsed into [`Arch`] once, where the domain XML is read; everything after that
//! dispatches on the enum. Depends on nothing in the crate, so every layer may use it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A guest architecture; serialized as libvirt's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// 64-bit x86 guests (`qemu-system-x86_64`): the CPUID probe.
    #[serde(rename = "x86_64")]
    X86_64,
    /// 32-bit x86 guests (`qemu-system-i386`): the same CPUID probe as x86_64.
    #[serde(rename = "i686")]
    I686,
    /// 64-bit Arm guests (`qemu-system-aarch64`, `virt` machine): the ID-register probe.
    #[serde(rename = "aarch64")]
    Aarch64,
}

/// The reason an architecture name is refused.
pub const SUPPORTED: &str = "cpuguard probes x86_64, i686 and aarch64 guests only";

impl Arch {
    /// libvirt's name of `self`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::I686 => "i686",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The architecture libvirt calls `name`; `None` for one cpuguard does not probe.
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "x86_64" => Some(Arch::X86_64),
            "i686" => Some(Arch::I686),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// The file name of the QEMU system emulator for this architecture, the one libvirt's
    /// capabilities list for it.
    pub fn qemu_system(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::I686 => "qemu-system-i386",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_serialize_as_libvirt_writes_them() {
        for arch in [Arch::X86_64, Arch::I686, Arch::Aarch64] {
            assert_eq!(Arch::from_name(arch.name()), Some(arch));
            assert_eq!(
                serde_json::to_string(&arch).unwrap(),
                format!("\"{}\"", arch.name())
            );
        }
        assert_eq!(Arch::from_name("ppc64le"), None);
    }
}
