//! Which module of each crate uses which, read from the sources: no cycle
//! between the modules of a crate, and `docs/modules.md` drawn from what
//! the code says now (`PORTHOLE_BLESS=1 cargo test --test modules` redraws
//! it after a change).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library crates whose modules are checked, by source directory.
const CRATES: [(&str, &str); 3] = [
    ("porthole", "src"),
    ("monitor-svc", "monitor-svc/src"),
    ("tunnel-svc", "tunnel-svc/src"),
];

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn no_module_uses_a_module_that_uses_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cycles = Vec::new();
    for (name, dir) in CRATES {
        let graph = graph(&root.join(dir));
        for scc in cycles_of(&graph) {
            cycles.push(format!("{name}: {}", scc.join(" -> ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that use each other (move what closes the loop into one of them, or \
         into a module both use):\n  {}",
        cycles.join("\n  ")
    );
}

#[test]
fn the_module_picture_is_drawn_from_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let drawn = picture(root);
    let path = root.join("docs/modules.md");
    if std::env::var_os("PORTHOLE_BLESS").is_some() {
        std::fs::write(&path, &drawn).unwrap();
    }
    let kept = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        kept == drawn,
        "docs/modules.md is not what the code says; redraw it with \
         PORTHOLE_BLESS=1 cargo test --test modules"
    );
}

/// `docs/modules.md`: one Mermaid graph per crate.
fn picture(root: &Path) -> String {
    let mut out = String::from(
        "# Modules\n\n\
         Which module uses which, in each library crate (an arrow points at the \
         module used; `lib` is the crate root). Drawn from the sources by \
         `tests/modules.rs`, which also fails on a cycle; redraw with \
         `PORTHOLE_BLESS=1 cargo test --test modules`.\n",
    );
    for (name, dir) in CRATES {
        let graph = graph(&root.join(dir));
        out.push_str(&format!("\n## {name}\n\n```mermaid\ngraph LR\n"));
        for (from, tos) in &graph {
            for to in tos {
                out.push_str(&format!("  {from} --> {to}\n"));
            }
        }
        out.push_str("```\n");
    }
    out
}

/// Top-level module → the top-level modules it uses (tests left out).
fn graph(dir: &Path) -> Graph {
    let files = rust_files(dir);
    let module_of = |path: &Path| -> String {
        let rel = path.strip_prefix(dir).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        let first = first.to_str().unwrap().trim_end_matches(".rs");
        if first == "lib" {
            "lib".into()
        } else {
            first.into()
        }
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| module_of(p))
        .filter(|m| m != "main")
        .collect();
    let mut graph = Graph::new();
    for path in &files {
        let from = module_of(path);
        if from == "main" {
            continue;
        }
        let text = product_code(&std::fs::read_to_string(path).unwrap());
        let uses = graph.entry(from.clone()).or_default();
        for used in crate_paths(&text, from == "lib", &modules) {
            let to = if modules.contains(&used) {
                used
            } else {
                "lib".into()
            };
            if to != from {
                uses.insert(to);
            }
        }
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The file without comments and without its `#[cfg(test)]` modules.
fn product_code(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<usize> = None;
    let mut depth = 0usize;
    let mut test_attr = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let trimmed = code.trim();
        if skip_depth.is_none() && trimmed == "#[cfg(test)]" {
            test_attr = true;
            continue;
        }
        if test_attr && trimmed.starts_with("mod ") && trimmed.ends_with('{') {
            skip_depth = Some(depth);
        }
        test_attr = false;
        depth += code.matches('{').count();
        depth = depth.saturating_sub(code.matches('}').count());
        match skip_depth {
            Some(d) if depth <= d => skip_depth = None,
            Some(_) => {}
            None => {
                out.push_str(code);
                out.push('\n');
            }
        }
    }
    out
}

/// The first segment of every `crate::` path (in a crate root, of every
/// path that starts with a module's name), `use crate::{a, b::c}` groups
/// included.
fn crate_paths(text: &str, is_root: bool, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident_at = |i: usize| -> String {
        text[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut i = 0;
    while let Some(at) = text[i..].find("crate::") {
        let start = i + at;
        i = start + "crate::".len();
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !boundary {
            continue;
        }
        if bytes.get(i) == Some(&b'{') {
            // Each first segment of a brace group at depth one.
            let mut depth = 0;
            let mut j = i;
            let mut expect = true;
            while j < bytes.len() {
                match bytes[j] {
                    b'{' => {
                        depth += 1;
                        expect = depth == 1;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expect = true,
                    c if expect && (c.is_ascii_alphabetic() || c == b'_') => {
                        out.insert(ident_at(j));
                        expect = false;
                    }
                    _ => {}
                }
                j += 1;
            }
        } else {
            out.insert(ident_at(i));
        }
    }
    if is_root {
        for m in modules {
            let used = text.match_indices(&format!("{m}::")).any(|(at, _)| {
                at == 0
                    || !(bytes[at - 1].is_ascii_alphanumeric()
                        || bytes[at - 1] == b'_'
                        || bytes[at - 1] == b':')
            });
            if used {
                out.insert(m.clone());
            }
        }
    }
    out.remove("self");
    out.remove("");
    out
}

/// Every strongly connected set of more than one module (Tarjan's).
fn cycles_of(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.out
}
