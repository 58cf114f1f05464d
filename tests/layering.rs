//! The library's top-level modules form layers that read one way: no module of `src/` reaches
//! itself through `crate::` paths, directly (`a` uses `b`, `b` uses `a`) or round a longer loop.
//!
//! The graph is read from the source text, every `crate::NAME` path and every name at the top
//! of a `use crate::{…}` group, in code and unit tests alike (comments are left out). A failure
//! names the loop, e.g. `probe -> aarch64 -> probe`, with the file that makes each step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// module -> module it uses -> the first file (relative to `src/`) that does.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// The top-level modules of the crate rooted at `src`: its `.rs` files and folders, without the
/// crate roots and the binaries.
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let entry = entry.unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            if name != "bin" {
                out.insert(name);
            }
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem != "lib" && stem != "main" {
                out.insert(stem.to_string());
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without `//` comments (doc comments included), so prose naming a module is no edge.
/// String literals are kept: none of the crate's spells `crate::`.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first path segment after every `crate::` in `code`: `crate::a::b` gives `a`,
/// `crate::{a::b, c}` gives `a` and `c`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue; // `mycrate::`, not the crate root
        }
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident_at(rest).to_string());
            continue;
        };
        // Names at depth 1 of the group: after the `{` and after each `,` at that depth.
        let mut depth = 1;
        let mut expect_name = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if depth == 1 => expect_name = true,
                c if expect_name && depth == 1 && !c.is_whitespace() => {
                    out.push(ident_at(&group[i..]).to_string());
                    expect_name = false;
                }
                _ => {}
            }
        }
    }
    out
}

/// Which top-level module uses which, read from every file under `src`.
fn module_graph(src: &Path) -> Graph {
    let modules = top_level_modules(src);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap_or(&file);
        let first = relative
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        let from = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if !modules.contains(&from) {
            continue; // lib.rs, main.rs, bin/: roots, not layers
        }
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for to in crate_paths(&strip_comments(&text)) {
            if to != from && modules.contains(&to) {
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| relative.display().to_string());
            }
        }
    }
    graph
}

/// Every loop through which a module reaches itself, each as `a -> b (file) -> a (file)`, one
/// per module that lies on one (the shortest from it).
fn loops(graph: &Graph) -> Vec<String> {
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        // Breadth-first from `start` until it is reached again: the shortest loop through it.
        let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.as_str()]);
        let mut closing = None;
        'search: while let Some(at) = queue.pop_front() {
            for next in graph.get(at).into_iter().flat_map(|edges| edges.keys()) {
                if next == start {
                    closing = Some(at);
                    break 'search;
                }
                if !previous.contains_key(next.as_str()) {
                    previous.insert(next, at);
                    queue.push_back(next);
                }
            }
        }
        let Some(mut at) = closing else {
            continue;
        };
        let mut path = vec![start.as_str()];
        while at != start {
            path.push(at);
            at = previous[at];
        }
        path[1..].reverse();
        path.push(start);
        // The same loop is found from each of its modules: keep it once, from its least name.
        let members: Vec<&str> = path[..path.len() - 1].to_vec();
        let least = members.iter().min().copied().unwrap_or(start);
        let turn = members.iter().position(|m| *m == least).unwrap_or(0);
        let mut rotated: Vec<&str> = members[turn..].to_vec();
        rotated.extend(&members[..turn]);
        rotated.push(least);
        let mut text = rotated[0].to_string();
        for pair in rotated.windows(2) {
            text.push_str(&format!(" -> {} ({})", pair[1], graph[pair[0]][pair[1]]));
        }
        found.insert(text);
    }
    found.into_iter().collect()
}

#[test]
fn no_top_level_module_reaches_itself() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(
        graph.len() > 10,
        "the graph of src/ is implausibly small: {graph:?}"
    );
    let found = loops(&graph);
    assert!(
        found.is_empty(),
        "modules of src/ that reach themselves (module -> module it uses (the file that does)):\n{}",
        found.join("\n")
    );
}

/// The check fails on a loop, directly or round three modules, and names it; a `use
/// crate::{…}` group and a path in code count, a comment does not.
#[test]
fn a_deliberate_loop_is_found_and_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path();
    std::fs::write(
        src.join("lib.rs"),
        "pub mod a; pub mod b; pub mod c; pub mod d;",
    )
    .unwrap();
    std::fs::write(src.join("a.rs"), "use crate::{b::X, d};\n").unwrap();
    std::fs::create_dir(src.join("b")).unwrap();
    std::fs::write(src.join("b/mod.rs"), "pub mod inner;\n").unwrap();
    std::fs::write(src.join("b/inner.rs"), "fn f() { crate::c::g() }\n").unwrap();
    std::fs::write(src.join("c.rs"), "pub fn g() { let _ = crate::a::Y; }\n").unwrap();
    std::fs::write(src.join("d.rs"), "// crate::a is only mentioned here\n").unwrap();
    let graph = module_graph(src);
    assert_eq!(
        loops(&graph),
        vec!["a -> b (a.rs) -> c (b/inner.rs) -> a (c.rs)".to_string()]
    );
    std::fs::write(src.join("d.rs"), "use crate::a;\n").unwrap();
    assert_eq!(
        loops(&module_graph(src)),
        vec![
            "a -> b (a.rs) -> c (b/inner.rs) -> a (c.rs)".to_string(),
            "a -> d (a.rs) -> a (d.rs)".to_string(),
        ]
    );
}
