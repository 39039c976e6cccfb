//! The module order README's "How it is built" gives, checked: every `crate::…` and `super::…`
//! path in a source file (outside its tests) names a file; no two files import each other, however
//! long the way round (a parent and its own children, `foo.rs` and `foo/…`, excepted), and no file
//! imports a layer above its own.
//!
//! Written by hand: the crates that draw module graphs (cargo-modules) need the compiler's
//! analysis and a toolchain of their own; a path scan of our own sources is enough here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, bottom up: a module may import its own layer and those below it. Modules not listed
/// are ground-level helpers (layer 0).
const LAYERS: &[(&str, usize)] = &[
    ("activation", 0),
    ("alloc", 0),
    ("panic", 0),
    ("limits", 0),
    ("net", 0),
    ("tls", 0),
    ("names", 1),
    ("config", 2),
    ("dns", 3),
    ("admin", 3),
    ("proxy", 4),
    ("discovery", 4),
    ("querylog", 4),
    ("control", 5),
    ("reload", 6),
];

fn layer(module: &[String]) -> usize {
    match module.first() {
        None => usize::MAX, // lib.rs: wires everything
        Some(top) => LAYERS.iter().find(|(m, _)| m == top).map_or(0, |(_, l)| *l),
    }
}

/// Every source file by its module path (`src/dns/server.rs` → `["dns", "server"]`).
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).unwrap().with_extension("");
                let mut m: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                if m == ["lib"] || m == ["main"] {
                    m.clear();
                }
                if m.last().is_some_and(|l| l == "mod") {
                    m.pop();
                }
                if p.ends_with("main.rs") {
                    continue; // the binary: uses the library from outside
                }
                out.insert(m, p);
            }
        }
    }
    out
}

/// The text of a file without its `#[cfg(test)]` items (tests may reach anywhere) and comments.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut depth = 0i32;
    let mut pending_test = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("//") {
            continue;
        }
        let opens = line.matches('{').count() as i32;
        let closes = line.matches('}').count() as i32;
        if skip_depth.is_none() && t.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        if pending_test && skip_depth.is_none() {
            pending_test = false;
            if opens > closes {
                skip_depth = Some(depth);
            } else {
                // A one-line item (`mod tests;`, a `use`): skipped alone.
                depth += opens - closes;
                continue;
            }
        }
        depth += opens - closes;
        if let Some(d) = skip_depth {
            if depth <= d {
                skip_depth = None;
            }
            continue;
        }
        out.push_str(line.split("//").next().unwrap_or(""));
        out.push('\n');
    }
    out
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else { return vec![tree] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).flat_map(expand).map(|p| format!("{prefix}{p}")).collect()
}

/// Every `crate::…`, `super::…` and `self::…` path in `code`, expanded.
fn paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before_ok = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric() && rest.as_bytes()[at - 1] != b'_';
        let stmt_end = rest[at..].find(';').map_or(rest.len(), |e| at + e);
        if before_ok {
            let tree = rest[at + 4..stmt_end].trim();
            found.extend(expand(tree));
        }
        rest = &rest[stmt_end.min(rest.len() - 1) + 1..];
    }
    // Paths written inline, outside use statements.
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            let ok =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_' || bytes[at - 1] == b':');
            let end = code[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| at + e);
            if ok {
                found.push(code[at..end].trim_end_matches(':').to_string());
            }
            from = end.max(at + 1);
        }
    }
    found
        .into_iter()
        .filter(|p| p.starts_with("crate::") || p.starts_with("super::") || p.starts_with("self::"))
        .collect()
}

/// The file a path names, seen from the file of module `from`.
fn target(path: &str, from: &[String], files: &BTreeMap<Vec<String>, PathBuf>) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<String> = match segs[0] {
        "crate" => Vec::new(),
        _ => from.to_vec(),
    };
    if segs[0] == "crate" || segs[0] == "self" {
        segs.remove(0);
    }
    while segs.first() == Some(&"super") {
        base.pop();
        segs.remove(0);
    }
    // The longest prefix that is a file.
    let mut best = base.clone();
    let mut cur = base;
    for s in segs {
        cur.push(s.to_string());
        if files.contains_key(&cur) {
            best = cur.clone();
        } else {
            break;
        }
    }
    files.contains_key(&best).then_some(best)
}

fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = modules(&src);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut upward = BTreeSet::new();
    for (m, p) in &files {
        let text = std::fs::read_to_string(p).unwrap();
        for path in paths(&code(&text)) {
            let Some(t) = target(&path, m, &files) else { continue };
            if related(&t, m) {
                continue;
            }
            if layer(&t) > layer(m) {
                upward.insert(format!("{} imports {} ({path}), a layer above it", m.join("/"), t.join("/")));
            }
            edges.entry(m.clone()).or_default().insert(t);
        }
    }
    // A cycle: a file that reaches itself again through other files.
    let mut cycles = BTreeSet::new();
    for start in files.keys() {
        let mut stack = vec![(start.clone(), vec![start.join("/")])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == start {
                    let mut c = trail.clone();
                    c.push(start.join("/"));
                    let mut key = trail.clone();
                    key.sort();
                    if cycles.iter().all(|(k, _): &(Vec<String>, String)| *k != key) {
                        cycles.insert((key, c.join(" -> ")));
                    }
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.join("/"));
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    let cycles: Vec<String> = cycles.into_iter().map(|(_, c)| c).collect();
    assert!(
        cycles.is_empty() && upward.is_empty(),
        "import cycles:\n{}\nupward imports:\n{}",
        cycles.join("\n"),
        upward.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_through_grouped_use_trees() {
    let tree = expand("super::{engine::{Engine, Origin}, server::TcpLimits}");
    assert_eq!(tree, ["super::engine::Engine", "super::engine::Origin", "super::server::TcpLimits"]);
    let found = paths(
        "use crate::dns::{wire, server::Secure};\nfn f() { crate::proxy::tls::Terminator::load(); }\n#[cfg(test)]\nmod tests {\n use crate::x;\n}\n",
    );
    assert!(found.contains(&"crate::dns::server::Secure".to_string()), "{found:?}");
    assert!(found.contains(&"crate::proxy::tls::Terminator::load".to_string()), "{found:?}");
    assert!(!code("#[cfg(test)]\nmod tests {\n use crate::x;\n}\n").contains("crate::x"));
}

/// A file's lines before its tests (`#[cfg(test)]` at the start of a line).
fn before_tests(text: &str) -> Vec<&str> {
    text.lines().take_while(|l| !l.starts_with("#[cfg(test)]")).collect()
}

/// `line` without its string and character literals and its comment, for counting braces.
fn braces_of(line: &str) -> (i32, i32) {
    let (mut opens, mut closes) = (0, 0);
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_str => {
                chars.next();
            }
            '"' => in_str = !in_str,
            '/' if !in_str && chars.peek() == Some(&'/') => break,
            // A character literal ('{', '\''): skipped; a lifetime ('a) has no closing quote.
            '\'' if !in_str => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') {
                    let skip = rest.find('\'').map_or(0, |i| i + 1).max(3);
                    for _ in 0..skip.min(rest.len()) {
                        chars.next();
                    }
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
            }
            '{' if !in_str => opens += 1,
            '}' if !in_str => closes += 1,
            _ => {}
        }
    }
    (opens, closes)
}

/// Each function's name and length in lines, signature to closing brace.
fn functions(lines: &[&str]) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub ").or_else(|| t.strip_prefix("pub(crate) ")).unwrap_or(t);
        let t = t.strip_prefix("pub(super) ").unwrap_or(t);
        let t = t.strip_prefix("const ").unwrap_or(t);
        let t = t.strip_prefix("async ").unwrap_or(t);
        let t = t.strip_prefix("unsafe ").unwrap_or(t);
        let Some(rest) = t.strip_prefix("fn ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (mut depth, mut started) = (0, false);
        for (j, l) in lines[i..].iter().enumerate() {
            let (o, c) = braces_of(l);
            depth += o - c;
            started |= o > 0;
            if !started && l.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            if started && depth <= 0 {
                out.push((name.clone(), j + 1));
                break;
            }
        }
    }
    out
}

/// README's "How it is built": no source file over 600 lines before its tests (`dns/wire.rs`, the
/// wire format in one place, excepted), no function over 80.
#[test]
fn files_and_functions_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut over = Vec::new();
    for (module, path) in modules(&src) {
        let text = std::fs::read_to_string(&path).unwrap();
        let lines = before_tests(&text);
        if lines.len() > 600 && module != ["dns", "wire"] {
            over.push(format!("{}: {} lines before its tests", path.display(), lines.len()));
        }
        for (name, n) in functions(&lines).into_iter().filter(|(_, n)| *n > 80) {
            over.push(format!("{}: fn {name} is {n} lines", path.display()));
        }
    }
    assert!(over.is_empty(), "split these:\n{}", over.join("\n"));
}

#[test]
fn the_function_scan_sees_bodies_not_braces_in_literals() {
    let text = "fn a() {\n    let s = \"{{\";\n    let c = '{';\n}\npub async fn b(x: &'a str) -> u8 {\n    // }\n    1\n}\nfn c();\n";
    assert_eq!(functions(&text.lines().collect::<Vec<_>>()), [("a".into(), 4), ("b".into(), 4)]);
}
