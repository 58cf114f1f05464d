//! Signed stamps (opt-in): an HMAC-SHA256 with the fleet's shared key over a stamp's canonical
//! content, so that whoever can write a domain's metadata but not read `/etc/cpuguard/fleet.key`
//! cannot make a stamp the destination accepts.
//!
//! The content is what survives libvirt's re-serialization of the metadata: the stamp's attribute
//! values and its table as the guard parses it (libvirt re-indents elements and re-quotes
//! attributes, so the bytes of the element are not stable). The `<cpu>` child is informational
//! (the guard never reads it) and is not covered.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::metadata::Stamp;
use crate::view::GuestView;

/// The key file's default place.
pub const DEFAULT_KEY_FILE: &str = "/etc/cpuguard/fleet.key";
/// Prefix of the `signature` attribute's value.
pub const SCHEME: &str = "hmac-sha256:";
/// Bytes of a generated key.
const KEY_BYTES: usize = 32;
/// The shortest key accepted from a file (a hand-made key must not be guessable).
const MIN_KEY_BYTES: usize = 16;

/// What a destination makes of a stamp's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The stamp carries no signature.
    Unsigned,
    /// Signed with this key over exactly this content.
    Valid,
    /// Signed, but not with this key over this content: forged, edited or another fleet's key.
    Invalid,
}

/// Writes a new random key (hex, 0600) to `path`; an existing key is kept unless `force`, since
/// replacing it invalidates every stamp signed with it until its guest is re-stamped.
pub fn generate(path: &Path, force: bool) -> Result<(), String> {
    if path.exists() && !force {
        return Err(format!(
            "{}: a key exists already (--force replaces it; every host needs the same key)",
            path.display()
        ));
    }
    let mut key = [0u8; KEY_BYTES];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = format!("{}\n", hex::encode(key));
    crate::fsutil::write_atomic(path, text.as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The key at `path`; None when there is no file (signing is off). The file must be owned by
/// root (or by us when not root) and unreadable by group and others: anyone who reads it can
/// sign stamps.
pub fn load_key(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "key file {}: owned by uid {}, not root",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "key file {}: readable or writable by group or others (mode {:o}; chmod 600)",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let key = hex::decode(text.trim())
        .map_err(|e| format!("key file {}: not hex: {e}", path.display()))?;
    if key.len() < MIN_KEY_BYTES {
        return Err(format!(
            "key file {}: {} bytes, at least {MIN_KEY_BYTES} needed (cpuguard key generate)",
            path.display(),
            key.len()
        ));
    }
    Ok(Some(key))
}

/// The text a signature covers: every attribute the guard or the source reads (Debug-quoted, so
/// no value can pose as another line) and the table in the guard's canonical form.
pub fn canonical_content(stamp: &Stamp) -> String {
    let mut out = String::from("cpuguard stamp signature v1\n");
    for (name, value) in [
        ("version", &stamp.version),
        ("host", &stamp.host),
        ("time", &stamp.time),
        ("digest", &stamp.digest),
        ("uuid", &stamp.uuid),
        ("config", &stamp.config),
        ("pid", &stamp.pid),
        ("pid-start", &stamp.pid_start),
        ("boot-id", &stamp.boot_id),
        ("emulator", &stamp.emulator),
    ] {
        out.push_str(&format!("{name}={value:?}\n"));
    }
    let table = stamp.table.as_deref().unwrap_or("");
    // An unreadable table is signed as it is; the guard refuses it anyway.
    let table = GuestView::parse_text(table)
        .map(|v| v.to_text())
        .unwrap_or_else(|_| table.to_string());
    out.push_str("table\n");
    out.push_str(&table);
    out
}

fn mac(key: &[u8], stamp: &Stamp) -> Hmac<Sha256> {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(canonical_content(stamp).as_bytes());
    mac
}

/// The `signature` attribute for `stamp` (which must not carry one yet).
pub fn sign(key: &[u8], stamp: &Stamp) -> String {
    format!(
        "{SCHEME}{}",
        hex::encode(mac(key, stamp).finalize().into_bytes())
    )
}

/// Checks the stamp's `signature` against `key` (constant-time comparison).
pub fn verify(key: &[u8], stamp: &Stamp) -> Verification {
    let Some(signature) = stamp.signature.as_deref() else {
        return Verification::Unsigned;
    };
    let Some(bytes) = signature
        .strip_prefix(SCHEME)
        .and_then(|h| hex::decode(h).ok())
    else {
        return Verification::Invalid;
    };
    match mac(key, stamp).verify_slice(&bytes) {
        Ok(()) => Verification::Valid,
        Err(_) => Verification::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::metadata::{stamp_element_bound, StampBinding};

    const TABLE: &str = "00000000 00000000: 0000000d 756e6547 6c65746e 49656e69\n";

    fn signed(key: &[u8]) -> Stamp {
        let binding = StampBinding {
            uuid: Some("u1".into()),
            config: Some("sha256:c".into()),
            ..StampBinding::default()
        };
        let el = stamp_element_bound("a", "t", "sha256:d", "<cpu/>", TABLE, &binding);
        let signature = sign(key, &Stamp::read(&el));
        let binding = StampBinding {
            signature: Some(signature),
            ..binding
        };
        Stamp::read(&stamp_element_bound(
            "a", "t", "sha256:d", "<cpu/>", TABLE, &binding,
        ))
    }

    #[test]
    fn signature_verifies_and_catches_every_edit() {
        let key = [7u8; 32];
        let stamp = signed(&key);
        assert_eq!(verify(&key, &stamp), Verification::Valid);
        assert_eq!(verify(&[8u8; 32], &stamp), Verification::Invalid);
        let mut other_domain = stamp.clone();
        other_domain.uuid = Some("u2".into());
        assert_eq!(verify(&key, &other_domain), Verification::Invalid);
        let mut other_table = stamp.clone();
        other_table.table = Some(TABLE.replace("0000000d", "0000000e"));
        assert_eq!(verify(&key, &other_table), Verification::Invalid);
        // Re-indented by libvirt: the same table, still valid.
        let mut reindented = stamp.clone();
        reindented.table = Some(format!("\n      {}    ", TABLE.trim()));
        assert_eq!(verify(&key, &reindented), Verification::Valid);
        let mut unsigned = stamp.clone();
        unsigned.signature = None;
        assert_eq!(verify(&key, &unsigned), Verification::Unsigned);
        let mut garbage = stamp;
        garbage.signature = Some("hmac-sha256:zz".into());
        assert_eq!(verify(&key, &garbage), Verification::Invalid);
    }

    #[test]
    fn generated_key_is_private_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("etc/fleet.key");
        assert_eq!(load_key(&path), Ok(None));
        generate(&path, false).expect("generate");
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        let key = load_key(&path).expect("load").expect("key");
        assert_eq!(key.len(), KEY_BYTES);
        assert!(generate(&path, false)
            .expect_err("exists")
            .contains("a key exists already"));
        generate(&path, true).expect("force");
        assert_ne!(load_key(&path).expect("load"), Some(key));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(load_key(&path).expect_err("readable").contains("chmod 600"));
    }
}
