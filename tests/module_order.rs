//! The library's top-level modules form one acyclic order: each may use only the modules of
//! the layers below its own. The order (lowest first) is the one in `LAYERS`; a new module must
//! be placed there, and an import that climbs the order fails here with the file and the path.
//! Within a module of `FILE_ACYCLIC`, its files do not import each other in a circle either.
//!
//! What is read: every `crate::`, `super::` and `self::` path in `src/` outside `src/bin`,
//! including the `use crate::{a::.., b::..}` groups, with `#[cfg(test)] mod` blocks left out
//! (a unit test may reach up for its fixtures). `super::` counts from the file's module, and
//! each path is resolved through the `pub use` re-exports (`crate::Tensor` is `tensor`'s,
//! `crate::Device` `device`'s) and exported macros (`crate::bail` is `error`'s) to the module
//! that defines it.

use std::collections::{BTreeMap, BTreeSet};

mod common;
use common::{rust_files, src_dir, src_relative};

/// Lowest first. Modules in one layer do not use each other.
const LAYERS: &[&[&str]] = &[
    &["error"],
    // The run options and the data pipeline (shards, decode, views on the CPU) need no tensor.
    &["options", "data"],
    // The backends' vocabulary (Device, DType, Layout) and the CUDA driver, cuDNN, cuBLAS and
    // kernel launchers on raw device buffers.
    &["device"],
    &["tensor"],
    &["autograd"],
    &["testutil"],
    &["ops"],
    &["nn"],
    &["carp", "optim"],
    // The training state's device-resident copy (the CUDA half of the step's state calls).
    &["eval", "resident"],
    &["train"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The `pub mod X;` / `mod X;` declarations of src/lib.rs.
fn top_modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("read src/lib.rs");
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').trim().to_string())
        })
        .collect()
}

/// `src` with the bodies of `#[cfg(test)] mod name { ... }` removed. Braces inside string and
/// character literals and comments are skipped while matching.
fn strip_test_modules(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while let Some(off) = src[i..].find("#[cfg(test)]") {
        let at = i + off;
        out.push_str(&src[i..at]);
        let after = src[at + "#[cfg(test)]".len()..].trim_start();
        let after_at = src.len() - after.len();
        let is_mod = after.starts_with("mod ") || after.starts_with("pub mod ");
        let open = after.find(['{', ';']);
        if !is_mod || open.map(|o| b[after_at + o]) != Some(b'{') {
            out.push_str("#[cfg(test)]");
            i = at + "#[cfg(test)]".len();
            continue;
        }
        let mut j = after_at + open.unwrap_or(0);
        let mut depth = 0usize;
        while j < b.len() {
            match b[j] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                b'"' => {
                    j += 1;
                    while j < b.len() && b[j] != b'"' {
                        if b[j] == b'\\' {
                            j += 1;
                        }
                        j += 1;
                    }
                }
                b'/' if b.get(j + 1) == Some(&b'/') => {
                    while j < b.len() && b[j] != b'\n' {
                        j += 1;
                    }
                }
                // A character literal ('{', '\'' ...), not a lifetime ('a).
                b'\'' if b.get(j + 2) == Some(&b'\'') => j += 2,
                b'\'' if b.get(j + 1) == Some(&b'\\') => {
                    j += 2;
                    while j < b.len() && b[j] != b'\'' {
                        j += 1;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        i = j.min(b.len());
    }
    out.push_str(&src[i..]);
    out
}

/// A file's module path from its path below `src/`: `ops/conv.rs` is `[ops, conv]`,
/// `device/cuda/mod.rs` is `[device, cuda]`, `lib.rs` is `[]`.
fn module_path(rel: &str) -> Vec<String> {
    let rel = rel.trim_end_matches(".rs");
    let mut segs: Vec<String> = rel.split('/').map(str::to_string).collect();
    if matches!(segs.last().map(String::as_str), Some("mod" | "lib")) {
        segs.pop();
    }
    segs
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

/// Reads the use tree at `b[*i..]` (`a::b::{c, d::{e, f}}` or an expression's `a::b::g`) below
/// `prefix`, appending each leaf path to `out`.
fn read_tree(b: &[u8], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        skip_ws(b, i);
        if b.get(*i) == Some(&b'{') {
            *i += 1;
            loop {
                skip_ws(b, i);
                match b.get(*i) {
                    None => return,
                    Some(b'}') => {
                        *i += 1;
                        return;
                    }
                    Some(b',') => {
                        *i += 1;
                        continue;
                    }
                    _ => {}
                }
                let before = *i;
                read_tree(b, i, path.clone(), out);
                // What follows an item up to the next one (` as alias`).
                while *i < b.len() && b[*i] != b',' && b[*i] != b'}' {
                    *i += 1;
                }
                if *i == before {
                    *i += 1;
                }
            }
        }
        let start = *i;
        if b.get(*i) == Some(&b'*') {
            *i += 1;
        } else {
            while *i < b.len() && is_ident_byte(b[*i]) {
                *i += 1;
            }
        }
        if *i == start {
            out.push(path);
            return;
        }
        let seg = String::from_utf8_lossy(&b[start..*i]).into_owned();
        // `use crate::data::{self, x}`: `self` names the path so far.
        if seg != "self" || path.is_empty() {
            path.push(seg);
        }
        if b[*i..].starts_with(b"::") {
            *i += 2;
        } else {
            out.push(path);
            return;
        }
    }
}

/// Every `crate::`, `super::` and `self::` path in `src` (a file of module `module`), as an
/// absolute module path: `crate::a::b` gives `[a, b]`, `crate::{a::x, b}` gives `[a, x]` and
/// `[b]`, and in module `[ops, conv]` `super::super::train::x` gives `[train, x]`.
fn anchored_paths(src: &str, module: &[String]) -> Vec<Vec<String>> {
    let b = src.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let at_word = i == 0 || !(is_ident_byte(b[i - 1]) || b[i - 1] == b'$' || b[i - 1] == b':');
        let anchor = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|a| b[i..].starts_with(a.as_bytes()));
        let Some(anchor) = anchor.filter(|_| at_word) else {
            i += 1;
            continue;
        };
        let mut leaves = Vec::new();
        read_tree(b, &mut i, Vec::new(), &mut leaves);
        for leaf in leaves {
            let ups = leaf.iter().take_while(|s| *s == "super").count();
            let abs: Option<Vec<String>> = match anchor {
                "crate::" => Some(leaf[1..].to_vec()),
                "self::" => Some(module.iter().chain(&leaf[1..]).cloned().collect()),
                _ => (ups <= module.len()).then(|| {
                    module[..module.len() - ups]
                        .iter()
                        .chain(&leaf[ups..])
                        .cloned()
                        .collect()
                }),
            };
            if let Some(abs) = abs.filter(|p| !p.is_empty()) {
                found.push(abs);
            }
        }
    }
    found
}

/// Where the names the crate re-exports (`pub use`) and its exported macros are defined:
/// `[Tensor]` (src/lib.rs's `pub use tensor::{.., Tensor}`) -> `[tensor, Tensor]`,
/// `[bail]` -> `[error, bail]`.
struct Reexports(BTreeMap<Vec<String>, Vec<String>>);

impl Reexports {
    /// Reads every file's `pub use` / `pub(crate) use` lines (paths relative to the file's
    /// module or anchored) and `#[macro_export] macro_rules!` definitions.
    fn read(files: &[(Vec<String>, String)]) -> Reexports {
        let mut map = BTreeMap::new();
        for (module, text) in files {
            for kw in ["pub use ", "pub(crate) use "] {
                let mut rest = text.as_str();
                while let Some(p) = rest.find(kw) {
                    let tail = &rest[p + kw.len()..];
                    rest = tail;
                    let mut leaves = Vec::new();
                    read_tree(tail.as_bytes(), &mut 0, Vec::new(), &mut leaves);
                    for leaf in leaves {
                        let target = if ["crate", "super", "self"]
                            .contains(&leaf.first().map_or("", String::as_str))
                        {
                            let s = leaf.join("::");
                            anchored_paths(&s, module).into_iter().next()
                        } else {
                            Some(module.iter().chain(&leaf).cloned().collect())
                        };
                        let (Some(target), Some(name)) = (target, leaf.last()) else {
                            continue;
                        };
                        if name == "*" {
                            continue;
                        }
                        let mut alias = module.clone();
                        alias.push(name.clone());
                        if alias != target {
                            map.insert(alias, target);
                        }
                    }
                }
            }
            let mut rest = text.as_str();
            while let Some(p) = rest.find("#[macro_export]") {
                rest = &rest[p + 1..];
                if let Some(m) = rest.find("macro_rules!") {
                    let name: String = rest[m + "macro_rules!".len()..]
                        .trim_start()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    map.insert(
                        vec![name.clone()],
                        module.iter().cloned().chain([name]).collect(),
                    );
                }
            }
        }
        Reexports(map)
    }

    /// `path` with each re-exported prefix replaced by where it is defined.
    fn resolve(&self, path: &[String]) -> Vec<String> {
        let mut p = path.to_vec();
        // A chain of re-exports is short; the bound only guards against a cycle of them.
        for _ in 0..8 {
            let hit = (1..=p.len())
                .rev()
                .find_map(|k| self.0.get(&p[..k]).map(|t| (k, t.clone())));
            let Some((k, target)) = hit else { break };
            p = target.into_iter().chain(p[k..].iter().cloned()).collect();
        }
        p
    }
}

/// Each file below `src/` outside `src/bin`, as (path below src/, module path, text without
/// its test modules).
fn source_files() -> Vec<(String, Vec<String>, String)> {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    files
        .into_iter()
        .map(|f| {
            let rel = src_relative(&f);
            let text = strip_test_modules(&std::fs::read_to_string(&f).unwrap());
            (rel.clone(), module_path(&rel), text)
        })
        .filter(|(rel, ..)| !rel.starts_with("bin/") && rel != "main.rs")
        .collect()
}

/// Every import of every source file (lib.rs excluded), resolved to the module that defines
/// it: (file below src/, its module path, the imported path).
fn resolved_imports() -> Vec<(String, Vec<String>, Vec<String>)> {
    let files = source_files();
    let reexports = Reexports::read(
        &files
            .iter()
            .map(|(_, m, t)| (m.clone(), t.clone()))
            .collect::<Vec<_>>(),
    );
    let mut out = Vec::new();
    for (rel, module, text) in &files {
        if module.is_empty() {
            continue; // lib.rs: the module declarations and the re-exports resolved above
        }
        for p in anchored_paths(text, module) {
            out.push((rel.clone(), module.clone(), reexports.resolve(&p)));
        }
    }
    out
}

/// module -> used module -> the files that use it.
fn module_uses() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let modules = top_modules();
    let mut uses: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (rel, module, path) in resolved_imports() {
        let (first, used) = (&module[0], &path[0]);
        let entry = uses.entry(first.clone()).or_default();
        if used != first && modules.contains(used) {
            entry.entry(used.clone()).or_default().insert(rel);
        }
    }
    uses
}

#[test]
fn every_module_has_a_layer() {
    let unplaced: Vec<_> = top_modules()
        .into_iter()
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules of src/lib.rs missing from LAYERS in tests/module_order.rs: {unplaced:?}: \
         place each in the layer above everything it uses"
    );
}

#[test]
fn modules_use_only_the_layers_below_their_own() {
    let mut wrong = Vec::new();
    for (m, used) in module_uses() {
        let Some(lm) = layer_of(&m) else { continue };
        for (u, files) in used {
            let Some(lu) = layer_of(&u) else { continue };
            if lu >= lm {
                wrong.push(format!(
                    "{m} (layer {lm}) uses {u} (layer {lu}) in {files:?}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the module order (tests/module_order.rs LAYERS): move the item down \
         to a module both can use, or pass it in from above:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_reader_sees_the_imports_it_checks() {
    // The check above passes vacuously if the reader finds nothing: the edges every layer of
    // the engine has must be seen.
    let uses = module_uses();
    for (m, u) in [
        ("ops", "autograd"),
        ("autograd", "tensor"),
        ("tensor", "device"),
        ("nn", "ops"),
        ("train", "nn"),
        ("train", "data"),
    ] {
        assert!(
            uses.get(m).is_some_and(|x| x.contains_key(u)),
            "no import of {u} found in {m}: the reader of tests/module_order.rs is broken"
        );
    }
}

#[test]
fn the_reader_handles_groups_and_test_modules() {
    let src = r#"
use crate::error::Result;
use crate::{tensor::{DType, Tensor}, ops::x, bail};
fn f() { let s = "crate::train"; let c = '{'; crate::nn::g(); }
// notcrate::eval
#[cfg(test)]
mod tests {
    use crate::train::x;
    fn h() { let s = "}"; let c = '}'; }
}
fn after() { crate::optim::lars(); }
"#;
    let paths: Vec<String> = anchored_paths(&strip_test_modules(src), &[])
        .into_iter()
        .map(|p| p[0].clone())
        .collect();
    // The string literal "crate::train" is read as a path: harmless (a false arrow shows up as
    // a failure to look at, never hides one).
    assert_eq!(
        paths,
        ["error", "tensor", "tensor", "ops", "bail", "train", "nn", "optim"],
        "{paths:?}"
    );
}

#[test]
fn the_reader_resolves_reexports_super_and_self() {
    // An upward import written through the crate root's re-exports or `super::super::` must be
    // seen as the module it reaches.
    let files = [
        (
            vec![],
            "pub use autograd::{Gradients, Tape};\npub use tensor::{Device, Tensor};".to_string(),
        ),
        (
            vec!["tensor".to_string()],
            "pub use crate::device::{DType, Device};".to_string(),
        ),
        (
            vec!["error".to_string()],
            "#[macro_export]\nmacro_rules! bail { () => {} }".to_string(),
        ),
    ];
    let reexports = Reexports::read(&files);
    let module = ["ops".to_string(), "conv".to_string()];
    let src = "use crate::Tape;\nuse super::super::train::Step;\nuse super::fused::{self, x};\n\
               fn f(d: crate::Device) { crate::bail!(); crate::Tensor::zeros(); self::g(); }";
    let got: Vec<String> = anchored_paths(src, &module)
        .iter()
        .map(|p| reexports.resolve(p).join("::"))
        .collect();
    assert_eq!(
        got,
        [
            "autograd::Tape",
            "train::Step",
            "ops::fused",
            "ops::fused::x",
            "device::Device",
            "error::bail",
            "tensor::Tensor::zeros",
            "ops::conv::g",
        ],
        "{got:?}"
    );
}

#[test]
fn the_real_reexports_resolve_to_their_modules() {
    let files: Vec<_> = source_files().into_iter().map(|(_, m, t)| (m, t)).collect();
    let reexports = Reexports::read(&files);
    for (path, module) in [
        ("Tape", "autograd"),
        ("Tensor", "tensor"),
        ("Device", "device"),
        ("Error", "error"),
        ("bail", "error"),
        ("data::ViewConfig", "data::augment"),
        ("data::TwoViewLoader", "data::loader"),
    ] {
        let p: Vec<String> = path.split("::").map(str::to_string).collect();
        let got = reexports.resolve(&p).join("::");
        assert!(
            got.starts_with(&format!("{module}::")),
            "crate::{path} resolved to {got}, not into {module}"
        );
    }
}

/// The modules whose files do not import each other in a circle (counting only imports between
/// the files and folders directly below the module, not through its mod.rs).
const FILE_ACYCLIC: &[&str] = &[
    "autograd", "carp", "data", "device", "eval", "nn", "ops", "optim", "tensor", "train",
];

/// For each module of `FILE_ACYCLIC`, the cycles among its children: each as
/// "a -> b -> a" with the files that make each arrow.
fn file_cycles() -> Vec<String> {
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeMap<String, BTreeSet<String>>>> =
        BTreeMap::new();
    for (rel, module, path) in resolved_imports() {
        if module.len() < 2 || path.len() < 2 || module[0] != path[0] || module[1] == path[1] {
            continue;
        }
        edges
            .entry(module[0].clone())
            .or_default()
            .entry(module[1].clone())
            .or_default()
            .entry(path[1].clone())
            .or_default()
            .insert(rel);
    }
    let mut cycles = Vec::new();
    for m in FILE_ACYCLIC {
        let Some(g) = edges.get(*m) else { continue };
        // Depth-first search from each child; a back edge to a node on the stack is a cycle.
        fn dfs(
            g: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
            n: &str,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            out: &mut Vec<Vec<String>>,
        ) {
            stack.push(n.to_string());
            for next in g.get(n).map(|e| e.keys()).into_iter().flatten() {
                if let Some(at) = stack.iter().position(|s| s == next) {
                    out.push(stack[at..].to_vec());
                } else if !done.contains(next) {
                    dfs(g, next, stack, done, out);
                }
            }
            stack.pop();
            done.insert(n.to_string());
        }
        let (mut done, mut found) = (BTreeSet::new(), Vec::new());
        for n in g.keys() {
            if !done.contains(n) {
                dfs(g, n, &mut Vec::new(), &mut done, &mut found);
            }
        }
        for c in found {
            let arrows: Vec<String> = c
                .iter()
                .zip(c.iter().cycle().skip(1))
                .map(|(a, b)| format!("{a} -> {b} in {:?}", g[a][b]))
                .collect();
            cycles.push(format!("{m}: {}", arrows.join(", ")));
        }
    }
    cycles
}

#[test]
fn files_of_a_module_do_not_import_each_other_in_a_circle() {
    let cycles = file_cycles();
    assert!(
        cycles.is_empty(),
        "import cycles between the files of a module (tests/module_order.rs FILE_ACYCLIC): \
         move the shared items into the file both use:\n  {}",
        cycles.join("\n  ")
    );
}

/// The modules that hold no backend code: no `Storage::Cuda` match, no `cuda` feature gate and
/// no path into `crate::device::cuda` (they reach a device through tensors, ops and the
/// `resident` state's backend-free interface).
const BACKEND_FREE: &[&str] = &["autograd", "carp", "eval", "nn", "optim", "train"];

#[test]
fn backend_free_modules_have_no_backend_code() {
    let src = src_dir();
    let mut found = Vec::new();
    for m in BACKEND_FREE {
        let mut files = Vec::new();
        let dir = src.join(m);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{m}.rs")));
        }
        assert!(!files.is_empty(), "{m}: no source found");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, line) in text.lines().enumerate() {
                if line.contains("Storage::Cuda")
                    || line.contains("feature = \"cuda\"")
                    || line.contains("crate::device::cuda")
                {
                    found.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "backend code in a backend-free module (tests/module_order.rs BACKEND_FREE): move it \
         behind an op or a tensor method:\n  {}",
        found.join("\n  ")
    );
}
