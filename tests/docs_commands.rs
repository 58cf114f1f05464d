//! The documents against the program they describe: every `cpuguard …` shown in a code span or
//! code block of README.md and docs/**/*.md names a command (and sub-command) that the built
//! binary's `--help` lists, with long options that command's `--help` lists; every relative link
//! leads to an existing file and heading; every docs page is linked from the README and links
//! back to it; the README opens with the two commands CI runs. No root, QEMU or libvirt needed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cpuguard");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Commands whose words are libvirt's hook argv (`cpuguard hook qemu NAME OP SUBOP EXTRA`), which
/// main.rs dispatches before the CLI parser: they have no `--help` of their own to check against.
const HOOK_ARGV_COMMANDS: &[&str] = &["hook"];

/// README.md, then every Markdown file under docs/, in a stable order.
fn documents() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                out.push(path);
            }
        }
    }
    let mut docs = vec![Path::new(ROOT).join("README.md")];
    walk(&Path::new(ROOT).join("docs"), &mut docs);
    docs
}

fn docs_pages() -> Vec<PathBuf> {
    documents().into_iter().skip(1).collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn shown(path: &Path) -> String {
    path.strip_prefix(ROOT)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// One line of a document, split into what is code and what is prose.
struct Line {
    number: usize,
    code: Vec<String>,
    prose: String,
    heading: Option<String>,
}

/// Fenced blocks are code line by line; elsewhere backtick spans are code (a span never crosses
/// a line in these documents) and the rest is prose.
fn lines(text: &str) -> Vec<Line> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        let marker: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        if marker.len() >= 3
            && (marker.chars().all(|c| c == '`') || marker.chars().all(|c| c == '~'))
        {
            match &fence {
                None => fence = Some(marker),
                Some(open) if trimmed.trim_end() == open.as_str() => fence = None,
                Some(_) => {}
            }
            out.push(Line {
                number: i + 1,
                code: Vec::new(),
                prose: String::new(),
                heading: None,
            });
            continue;
        }
        if fence.is_some() {
            out.push(Line {
                number: i + 1,
                code: vec![raw.to_string()],
                prose: String::new(),
                heading: None,
            });
            continue;
        }
        let (code, prose) = split_spans(raw);
        let heading = trimmed
            .starts_with('#')
            .then(|| trimmed.trim_start_matches('#'))
            .filter(|rest| rest.starts_with(' '))
            .map(|rest| rest.trim().to_string());
        out.push(Line {
            number: i + 1,
            code,
            prose,
            heading,
        });
    }
    out
}

fn split_spans(line: &str) -> (Vec<String>, String) {
    let mut code = Vec::new();
    let mut prose = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        prose.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let after = &rest[start + ticks..];
        let closing = "`".repeat(ticks);
        match after.find(&closing) {
            Some(end) => {
                code.push(after[..end].to_string());
                rest = &after[end + ticks..];
            }
            None => {
                prose.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    prose.push_str(rest);
    (code, prose)
}

/// What one `--help` lists.
#[derive(Default)]
struct Help {
    commands: BTreeSet<String>,
    long_options: BTreeSet<String>,
}

fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end();
            continue;
        }
        let item = line.trim_start();
        match section {
            "Commands:" => {
                if let Some(name) = item.split_whitespace().next() {
                    help.commands.insert(name.to_string());
                }
            }
            "Options:" if item.starts_with('-') => {
                // The option column ends where clap's two-space gap before the description starts.
                let column = item.split("  ").next().unwrap_or(item);
                help.long_options.extend(long_options(column));
            }
            _ => {}
        }
    }
    help
}

fn long_options(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '|' | '=' | '<'))
        .filter(|word| {
            word.len() > 2
                && word.starts_with("--")
                && word[2..]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map(str::to_string)
        .collect()
}

/// `cpuguard ARGS… --help`, asked once per command.
#[derive(Default)]
struct Helps(BTreeMap<Vec<String>, Help>);

impl Helps {
    fn of(&mut self, command: &[&str]) -> &Help {
        let key: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        self.0.entry(key).or_insert_with(|| {
            let out = Command::new(BIN)
                .args(command)
                .arg("--help")
                .output()
                .unwrap_or_else(|e| panic!("run {BIN} {command:?} --help: {e}"));
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "cpuguard {} --help failed: {}{}",
                command.join(" "),
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
            parse_help(&stdout)
        })
    }
}

/// A command word as the CLI spells them; `COMMAND`, `NAME…` and the like are placeholders.
fn is_command_word(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_lowercase())
        && word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Each `cpuguard …` invocation in a piece of code outside a shell comment: the words after
/// `cpuguard` up to the end of the command (a pipe, a redirection, `&&`, `;` or the end of the
/// span). A `#` right after a word is a root prompt (`bedA# cpuguard …`), not a comment.
fn invocations(code: &str) -> Vec<Vec<String>> {
    let code = code
        .split(" #")
        .next()
        .unwrap_or_default()
        .replace("\\|", "|");
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("cpuguard ") {
        let start = from + at;
        from = start + "cpuguard ".len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || "/._:-=".contains(c)) {
            continue;
        }
        let rest = &code[from..];
        let mut end = rest.len();
        for stop in [" | ", " |", ">", "<", "&&", ";", ")", "\"", "'", "`"] {
            if let Some(i) = rest.find(stop) {
                end = end.min(i);
            }
        }
        let words = rest[..end]
            .split(|c: char| c.is_whitespace() || c == '|')
            .map(|w| w.trim_matches(|c: char| matches!(c, '[' | ']' | ',' | '.' | ':')))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        found.push(words);
    }
    found
}

/// The problems with one invocation, if any.
fn check_invocation(words: &[String], helps: &mut Helps) -> Vec<String> {
    let mut problems = Vec::new();
    let mut command: Vec<&str> = Vec::new();
    let mut rest = words;
    if let Some(first) = words.first() {
        if first.starts_with("--") {
            // `cpuguard --version`: options of the program itself.
        } else if is_command_word(first) {
            let top = helps.of(&[]);
            if !top.commands.contains(first) {
                problems.push(format!(
                    "no command `{first}` in `cpuguard --help` (it lists: {})",
                    top.commands.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
                return problems;
            }
            if HOOK_ARGV_COMMANDS.contains(&first.as_str()) {
                return problems;
            }
            command.push(first);
            rest = &words[1..];
            let sub = helps.of(&command);
            if !sub.commands.is_empty() {
                if let Some(second) = rest.first().filter(|w| is_command_word(w)) {
                    if !sub.commands.contains(second) {
                        problems.push(format!(
                            "no command `{second}` in `cpuguard {first} --help` (it lists: {})",
                            sub.commands.iter().cloned().collect::<Vec<_>>().join(", ")
                        ));
                        return problems;
                    }
                    command.push(second);
                    rest = &rest[1..];
                }
            }
        } else {
            return problems;
        }
    }
    let options: Vec<String> = rest.iter().flat_map(|w| long_options(w)).collect();
    for option in options {
        let listed = helps.of(&command).long_options.contains(&option);
        if !listed {
            problems.push(format!(
                "`cpuguard {} --help` lists no option `{option}`",
                command.join(" ")
            ));
        }
    }
    problems
}

#[test]
fn every_command_shown_exists_in_help() {
    let mut helps = Helps::default();
    let mut problems = Vec::new();
    let mut checked = 0;
    for path in documents() {
        for line in lines(&read(&path)) {
            for code in &line.code {
                for words in invocations(code) {
                    checked += 1;
                    for problem in check_invocation(&words, &mut helps) {
                        problems.push(format!(
                            "{}:{}: `cpuguard {}`: {problem}",
                            shown(&path),
                            line.number,
                            words.join(" ")
                        ));
                    }
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} cpuguard commands found in the documents"
    );
    assert!(
        problems.is_empty(),
        "commands the CLI does not have:\n{}",
        problems.join("\n")
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens, and `-N`
/// after the Nth repeat.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in lines(text) {
        let Some(heading) = line.heading else {
            continue;
        };
        let slug: String = heading
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *count == 0 {
            slug.clone()
        } else {
            format!("{slug}-{count}")
        });
        *count += 1;
    }
    out
}

/// `(line, target)` of every inline link `[text](target)` outside code.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for line in lines(text) {
        let mut rest = line.prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((line.number, after[..end].trim().to_string()));
            rest = &after[end + 1..];
        }
    }
    out
}

/// The file a relative link leads to and its anchor, or `None` for an absolute URL.
fn resolve(from: &Path, target: &str) -> Option<(PathBuf, String)> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
    let path = if file.is_empty() {
        from.to_path_buf()
    } else {
        from.parent().unwrap_or(Path::new(ROOT)).join(file)
    };
    Some((path, anchor.to_string()))
}

#[test]
fn every_relative_link_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for path in documents() {
        for (number, target) in links(&read(&path)) {
            let Some((file, anchor)) = resolve(&path, &target) else {
                continue;
            };
            checked += 1;
            if !file.exists() {
                problems.push(format!(
                    "{}:{number}: ({target}): no such file",
                    shown(&path)
                ));
                continue;
            }
            if !anchor.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let known = anchors(&read(&file));
                if !known.contains(&anchor) {
                    problems.push(format!(
                        "{}:{number}: ({target}): no heading #{anchor} in {} (it has: {})",
                        shown(&path),
                        shown(&file),
                        known.into_iter().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} relative links found");
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

#[test]
fn every_docs_page_is_linked_from_the_readme_and_back() {
    let readme = Path::new(ROOT).join("README.md");
    let from_readme: BTreeSet<PathBuf> = links(&read(&readme))
        .into_iter()
        .filter_map(|(_, target)| resolve(&readme, &target))
        .map(|(file, _)| canonical(&file))
        .collect();
    let pages = docs_pages();
    assert!(!pages.is_empty(), "no pages under docs/");
    let mut problems = Vec::new();
    for page in pages {
        if !from_readme.contains(&canonical(&page)) {
            problems.push(format!("{}: not linked from README.md", shown(&page)));
        }
        let text = read(&page);
        if !text
            .lines()
            .next()
            .is_some_and(|first| first.starts_with("# "))
        {
            problems.push(format!(
                "{}: does not start with a `# ` title line",
                shown(&page)
            ));
        }
        let back = links(&text)
            .into_iter()
            .filter_map(|(_, target)| resolve(&page, &target))
            .any(|(file, _)| canonical(&file) == canonical(&readme));
        if !back {
            problems.push(format!("{}: no link back to README.md", shown(&page)));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn readme_opens_with_the_two_commands_then_the_sections_in_order() {
    let text = read(&Path::new(ROOT).join("README.md"));
    let first_block: Vec<&str> = text
        .split("```")
        .nth(1)
        .expect("README.md has a code block")
        .lines()
        .skip(1)
        .collect();
    assert!(
        first_block.len() == 2
            && first_block[0].starts_with("testbed/demo.sh ")
            && first_block[1].starts_with("testbed/run-tests.sh "),
        "README.md's first code block must be the two commands (CI runs them):\n{}",
        first_block.join("\n")
    );
    let sections: Vec<String> = lines(&text)
        .into_iter()
        .filter_map(|line| line.heading)
        .collect();
    let order = [
        "What cpuguard is",
        "Install on a fleet",
        "CLI",
        "Configuration",
        "Metadata format",
        "Policies",
        "Security model",
        "Measured figures",
        "Where to read on",
    ];
    let mut at = 0;
    for section in &sections {
        if at < order.len() && section.starts_with(order[at]) {
            at += 1;
        }
    }
    assert_eq!(
        at,
        order.len(),
        "README.md's sections must include, in this order, {order:?}; it has {sections:?}"
    );
}
