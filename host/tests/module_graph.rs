//! The host's modules depend on each other one way only.
//!
//! Reads `src/` and builds the graph of which module names which (`use
//! crate::…`, `super::…`, inline `crate::…` paths; test modules excluded),
//! then fails on any cycle. `cargo test -p livecast --test module_graph --
//! --nocapture` prints the graph that docs/architecture.md shows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`filter::engine`) → source text without test modules.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<PathBuf> = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            if parts == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            let text = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            // The crate root's own items resolve to no module; it is shown
            // as `crate`.
            let name = match parts.join("::") {
                n if n.is_empty() => "crate".to_owned(),
                n => n,
            };
            out.insert(name, strip_comments(&text));
        }
    }
    out
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path a `use` tree names, braces expanded: `a::{b, c::d}` → `a::b`,
/// `a::c::d`.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let head = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &head, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &head, out);
    } else if !tree.is_empty() {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        out.push(join(prefix, path));
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}::{b}"),
    }
}

/// Paths starting with `crate::`, `super::` or `self::`, anywhere in `text`.
fn paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` statements, whose braces name several paths.
    for (at, _) in text.match_indices("use ") {
        if at > 0 && text[..at].chars().last().is_some_and(ident_char) {
            continue;
        }
        let rest = &text[at + 4..];
        let Some(end) = rest.find(';') else { continue };
        let tree = &rest[..end];
        let tree = tree.trim_start();
        if tree.starts_with(|c: char| c.is_ascii_lowercase()) {
            expand(tree, "", &mut out);
        }
    }
    // Inline paths, outside `use` statements.
    let mut code = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("use ") {
        let statement = !rest[..at].chars().last().is_some_and(ident_char);
        code.push_str(&rest[..at]);
        let end = match rest[at..].find(';') {
            Some(e) if statement => at + e + 1,
            _ => at + 4,
        };
        if !statement {
            code.push_str(&rest[at..end]);
        }
        rest = &rest[end..];
    }
    code.push_str(rest);
    for root in ["crate::", "super::"] {
        for (at, _) in code.match_indices(root) {
            let text = &code;
            if at > 0 && text[..at].chars().last().is_some_and(ident_char) {
                continue;
            }
            let path: String = text[at..]
                .chars()
                .take_while(|c| ident_char(*c) || *c == ':')
                .collect();
            out.push(path.trim_end_matches(':').to_owned());
        }
    }
    out
}

/// The module a path names, from module `from`: its longest prefix that is a
/// module.
fn target(path: &str, from: &str, known: &BTreeSet<&str>) -> Option<String> {
    let mut segs: Vec<&str> = Vec::new();
    let mut parts = path.split("::").peekable();
    let mut base: Vec<&str> = from.split("::").filter(|s| !s.is_empty()).collect();
    match parts.peek() {
        Some(&"crate") => {
            parts.next();
        }
        _ if from == "crate" => {}
        Some(&"super") => {
            while parts.peek() == Some(&"super") {
                parts.next();
                base.pop();
            }
            segs.extend(base);
        }
        Some(&"self") => {
            parts.next();
            segs.extend(base);
        }
        // A `use` of a child module by its bare name (`use plugin::Plugin;`
        // in `filter`).
        Some(first) if known.contains(join(from, first).as_str()) => segs.extend(base),
        _ => return None,
    }
    segs.extend(parts);
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| known.contains(m.as_str()))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let known: BTreeSet<&str> = mods.keys().map(String::as_str).collect();
    let mut g = BTreeMap::new();
    for (name, text) in &mods {
        let deps: BTreeSet<String> = paths(text)
            .iter()
            .filter_map(|p| target(p, name, &known))
            .filter(|t| t != name && !t.is_empty())
            .collect();
        g.insert(name.clone(), deps);
    }
    g
}

/// The strongly connected components of more than one module: each is a
/// set of modules that reach each other, i.e. an import cycle.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: finish order on the graph, then components on its reverse.
    fn order(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_owned()) {
            return;
        }
        for d in g.get(n).into_iter().flatten() {
            order(d, g, seen, out);
        }
        out.push(n.to_owned());
    }
    let mut seen = BTreeSet::new();
    let mut finished = Vec::new();
    for n in g.keys() {
        order(n, g, &mut seen, &mut finished);
    }
    let mut reverse: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (n, deps) in g {
        for d in deps {
            reverse.entry(d.clone()).or_default().insert(n.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for n in finished.iter().rev() {
        let mut component = Vec::new();
        order(n, &reverse, &mut seen, &mut component);
        if component.len() > 1 {
            component.sort();
            out.push(component);
        }
    }
    out
}

/// The same graph with every module folded into its top-level one
/// (`filter::reload` into `filter`): a cycle here is a cycle between two
/// parts of the architecture, even when no single file closes it.
fn top_level(g: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_owned();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in g {
        let entry = out.entry(top(m)).or_default();
        entry.extend(deps.iter().map(|d| top(d)).filter(|d| *d != top(m)));
    }
    out
}

fn print(g: &BTreeMap<String, BTreeSet<String>>) {
    for (m, deps) in g {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        println!("{m} -> {}", deps.join(", "));
    }
}

#[test]
fn host_modules_form_no_cycle() {
    let g = graph();
    println!("modules:");
    print(&g);
    let tops = top_level(&g);
    println!("\ntop-level modules:");
    print(&tops);
    let mut found = cycles(&g);
    found.extend(cycles(&tops));
    let listed: Vec<String> = found.iter().map(|c| c.join(" <-> ")).collect();
    assert!(found.is_empty(), "import cycles: {}", listed.join("; "));
}

#[test]
fn the_reader_sees_paths_in_use_trees_and_inline() {
    let text = "use crate::a::{b, c::{d, e as f}};\nuse super::x;\nlet y = crate::g::h();";
    let mut got = paths(text);
    got.sort();
    assert_eq!(
        got,
        [
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e",
            "crate::g::h",
            "super::x"
        ]
    );
    let known: BTreeSet<&str> = ["a", "a::c", "m", "m::n", "x"].into_iter().collect();
    assert_eq!(
        target("crate::a::c::d", "m", &known).as_deref(),
        Some("a::c")
    );
    assert_eq!(target("super::x", "m::n", &known).as_deref(), Some("m"));
    assert_eq!(
        target("super::super::x", "m::n", &known).as_deref(),
        Some("x")
    );
}
