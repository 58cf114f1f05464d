//! libvirt's command line for a domain XML, as `virsh domxml-to-native qemu-argv` gives it, and
//! its storage under tests/fixtures/libvirt-argv/ so machines without libvirt check it too.
//!
//! Include it with `#[path = "support/libvirt_answers.rs"] mod libvirt_answers;`. One file per
//! definition, named by the first 16 hex digits of the SHA-256 of its XML bytes: a header saying
//! which libvirt, QEMU and host CPU answered, then either the four options that decide the guest
//! CPU (`machine=`, `accel=`, `cpu=`, `smp=`) or libvirt's `error=`.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub const ANSWERS_DIR: &str = "tests/fixtures/libvirt-argv";

/// What libvirt said for one definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// libvirt would start it with these option values (shell quoting removed).
    Argv {
        machine: String,
        accel: String,
        cpu: Option<String>,
        smp: String,
    },
    /// libvirt refuses it, with this message.
    Error(String),
}

/// An answer with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// `libvirt 9.0.0, QEMU 7.2.22, host CPU AMD EPYC`
    pub origin: String,
    pub answer: Answer,
}

pub fn digest(xml: &str) -> String {
    hex::encode(Sha256::digest(xml.as_bytes()))[..16].to_string()
}

pub fn path_for(xml: &str) -> PathBuf {
    Path::new(ANSWERS_DIR).join(format!("{}.txt", digest(xml)))
}

/// Splits `virsh domxml-to-native` output into words the way a POSIX shell would (virsh quotes
/// words with spaces or metacharacters in single quotes).
pub fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '\\' => {
                in_word = true;
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Reads libvirt's live output (argv on one line, or its error message).
pub fn from_virsh(output: &str) -> Answer {
    let words = shell_words(output);
    let value = |name: &str| {
        words
            .iter()
            .position(|w| w == name)
            .and_then(|i| words.get(i + 1))
            .cloned()
    };
    match (value("-machine"), value("-accel"), value("-smp")) {
        (Some(machine), Some(accel), Some(smp)) => Answer::Argv {
            machine,
            accel,
            cpu: value("-cpu"),
            smp,
        },
        _ => Answer::Error(output.split_whitespace().collect::<Vec<_>>().join(" ")),
    }
}

pub fn render(origin: &str, name: &str, answer: &Answer) -> String {
    let mut text = format!("# {origin}, virsh domxml-to-native qemu-argv\n# {name}\n");
    match answer {
        Answer::Argv {
            machine,
            accel,
            cpu,
            smp,
        } => {
            text.push_str(&format!("machine={machine}\naccel={accel}\n"));
            if let Some(cpu) = cpu {
                text.push_str(&format!("cpu={cpu}\n"));
            }
            text.push_str(&format!("smp={smp}\n"));
        }
        Answer::Error(message) => text.push_str(&format!("error={message}\n")),
    }
    text
}

pub fn parse(text: &str) -> Result<Stored, String> {
    let origin = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .and_then(|l| l.split(", virsh").next())
        .ok_or("no origin line")?
        .to_string();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
    };
    let answer = match get("error") {
        Some(message) => Answer::Error(message),
        None => Answer::Argv {
            machine: get("machine").ok_or("no machine= line")?,
            accel: get("accel").ok_or("no accel= line")?,
            cpu: get("cpu"),
            smp: get("smp").ok_or("no smp= line")?,
        },
    };
    Ok(Stored { origin, answer })
}

pub fn load(xml: &str) -> Result<Option<Stored>, String> {
    let path = path_for(xml);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_and_round_trip() {
        let words =
            shell_words("LC_ALL=C /usr/bin/q -cpu 'qemu64,vendor=Libvirt QEMU' -smp 1 a\\ b");
        assert_eq!(
            words,
            vec![
                "LC_ALL=C",
                "/usr/bin/q",
                "-cpu",
                "qemu64,vendor=Libvirt QEMU",
                "-smp",
                "1",
                "a b"
            ]
        );
        let answer = Answer::Argv {
            machine: "pc".into(),
            accel: "tcg".into(),
            cpu: Some("qemu64,vendor=Libvirt QEMU".into()),
            smp: "1".into(),
        };
        let stored = parse(&render("libvirt 9.0.0", "n", &answer)).unwrap();
        assert_eq!(stored.answer, answer);
        assert_eq!(stored.origin, "libvirt 9.0.0");
    }
}
