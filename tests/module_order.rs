//! The library's top-level modules form one acyclic order: each may use only the modules of
//! the layers below its own. The order (lowest first) is the one in `LAYERS`; a new module must
//! be placed there, and an import that climbs the order fails here with the file and the path.
//!
//! What is read: every `crate::<module>` path in `src/` outside `src/bin` and `src/lib.rs`,
//! including the `use crate::{a::.., b::..}` groups, with `#[cfg(test)] mod` blocks left out
//! (a unit test may reach up for its fixtures).

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

/// The first path segments after `crate::` in `src`: `crate::a::b` gives `a`, and
/// `crate::{a::x, b}` gives `a` and `b`.
fn crate_paths(src: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = src;
    while let Some(p) = rest.find("crate::") {
        let preceded_by_ident = rest[..p]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
        let tail = &rest[p + "crate::".len()..];
        rest = tail;
        if preceded_by_ident {
            continue;
        }
        if let Some(group) = tail.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 && item_start {
                    if c.is_alphanumeric() || c == '_' {
                        word.push(c);
                        continue;
                    }
                    if !word.is_empty() {
                        found.push(std::mem::take(&mut word));
                        item_start = false;
                    }
                }
            }
            if !word.is_empty() {
                found.push(word);
            }
        } else {
            let w: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !w.is_empty() {
                found.push(w);
            }
        }
    }
    found
}

/// module -> used module -> the files that use it.
fn module_uses() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let modules = top_modules();
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut uses: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in files {
        let rel = src_relative(&f);
        let first = rel.split('/').next().unwrap().trim_end_matches(".rs");
        if first == "bin" || first == "lib" || first == "main" {
            continue;
        }
        let text = strip_test_modules(&std::fs::read_to_string(&f).unwrap());
        let entry = uses.entry(first.to_string()).or_default();
        for used in crate_paths(&text) {
            if used != first && modules.contains(&used) {
                entry.entry(used).or_default().insert(rel.clone());
            }
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
    let paths = crate_paths(&strip_test_modules(src));
    // The string literal "crate::train" is read as a path: harmless (a false arrow shows up as
    // a failure to look at, never hides one).
    assert_eq!(
        paths,
        ["error", "tensor", "ops", "bail", "train", "nn", "optim"],
        "{paths:?}"
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
