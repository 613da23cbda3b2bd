//! The demo dataset inside the binary: the Fashion-MNIST subset of
//! `datasets/fashion-mnist-small` (about 7 MB), so that an installed `carp train` works from any
//! folder.
//!
//! A dataset path `embedded:fashion-mnist-small/train` (or `/test`) names it. The loader
//! memory-maps shard files, so the embedded bytes are written once to a cache folder
//! (`$XDG_CACHE_HOME/carp`, else `$HOME/.cache/carp`, else the system temp folder), each file
//! through a temporary file and a rename (a reader never sees a half-written file), and every
//! later open compares the cached files with the embedded bytes and rewrites any that differ.
//! The folder's name carries a checksum of the embedded bytes, so a binary with other data never
//! reads this one's files. Any other path is a packed folder on disk, used as it is.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The prefix that marks a dataset path as embedded in the binary.
pub const SCHEME: &str = "embedded:";
/// The name of the embedded dataset.
pub const NAME: &str = "fashion-mnist-small";
/// The default training split of the `tiny` preset.
pub const TRAIN: &str = "embedded:fashion-mnist-small/train";
/// The default evaluation split of the `tiny` preset.
pub const TEST: &str = "embedded:fashion-mnist-small/test";

/// (path inside the dataset folder, bytes). The manifests list these shard names; a rebuilt
/// subset with other shard files must update this list (the tests compare it with the folder).
const FILES: &[(&str, &[u8])] = &[
    (
        "LICENSE",
        include_bytes!("../../datasets/fashion-mnist-small/LICENSE"),
    ),
    (
        "train/manifest.json",
        include_bytes!("../../datasets/fashion-mnist-small/train/manifest.json"),
    ),
    (
        "train/shard-00000.bin",
        include_bytes!("../../datasets/fashion-mnist-small/train/shard-00000.bin"),
    ),
    (
        "test/manifest.json",
        include_bytes!("../../datasets/fashion-mnist-small/test/manifest.json"),
    ),
    (
        "test/shard-00000.bin",
        include_bytes!("../../datasets/fashion-mnist-small/test/shard-00000.bin"),
    ),
];

/// The splits of the embedded dataset.
pub const SPLITS: [&str; 2] = ["train", "test"];

/// The embedded files, (path inside the dataset folder, bytes).
pub fn files() -> &'static [(&'static str, &'static [u8])] {
    FILES
}

/// Whether `path` names an embedded dataset (`embedded:...`).
pub fn is_embedded(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

/// The folder for an embedded split under `cache_root` (not written; see [`materialize_in`]).
pub fn cache_dir(cache_root: &Path) -> PathBuf {
    let mut h = crc32fast::Hasher::new();
    for (name, bytes) in FILES {
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    cache_root.join(format!("{NAME}-{:08x}", h.finalize()))
}

/// Where the embedded data is written by default: the user's cache folder (XDG), else the
/// system temp folder. These are the platform's conventions for caches, not carp switches.
pub fn default_cache_root() -> PathBuf {
    let from_env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    from_env("XDG_CACHE_HOME")
        .or_else(|| from_env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("carp")
}

/// The split a path `embedded:NAME/SPLIT` names, or an error that lists the valid names.
fn split_of(path: &Path) -> Result<&'static str> {
    let s = path.to_str().unwrap_or_default();
    let rest = s.strip_prefix(SCHEME).unwrap_or(s);
    SPLITS
        .iter()
        .copied()
        .find(|split| rest == format!("{NAME}/{split}"))
        .ok_or_else(|| {
            Error::Config(format!(
                "unknown embedded dataset {s:?}: this binary embeds {TRAIN} and {TEST}; for \
                 other data pass a folder made by `carp pack`"
            ))
        })
}

/// A packed folder for `path`: `path` itself unless it is `embedded:...`, in which case the
/// embedded split is written under [`default_cache_root`] (if not there already) and its folder
/// is returned.
pub fn resolve(path: &Path) -> Result<Cow<'_, Path>> {
    if !is_embedded(path) {
        return Ok(Cow::Borrowed(path));
    }
    let split = split_of(path)?;
    let dir = materialize_in(&default_cache_root())?;
    Ok(Cow::Owned(dir.join(split)))
}

/// Writes every embedded file under `cache_dir(cache_root)` unless an identical copy is there;
/// returns that folder (holding `train/`, `test/` and `LICENSE`).
pub fn materialize_in(cache_root: &Path) -> Result<PathBuf> {
    let dir = cache_dir(cache_root);
    for (name, bytes) in FILES {
        let path = dir.join(name);
        // Verified on every open: a cached file that was truncated or edited is replaced.
        if std::fs::read(&path).is_ok_and(|b| b == *bytes) {
            continue;
        }
        let parent = path.parent().unwrap_or(&dir);
        std::fs::create_dir_all(parent).map_err(|e| cache_error(parent, e))?;
        write_atomic(&path, bytes).map_err(|e| cache_error(&path, e))?;
    }
    Ok(dir)
}

fn cache_error(path: &Path, e: std::io::Error) -> Error {
    Error::Msg(format!(
        "cannot write the embedded dataset to {}: {e}\n(make that folder writable, set \
         XDG_CACHE_HOME to a writable folder, or pass --data/--eval-data with folders made by \
         `carp pack`)",
        path.display()
    ))
}

/// Temporary file in the same folder, flushed to disk, then renamed over `path`: a concurrent
/// reader sees the old file or the whole new one, and an existing memory map keeps its file.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_root(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("carp-embedded-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn embedded_files_are_the_repository_folder_and_open() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/fashion-mnist-small");
        // The list covers every file of the folder (a rebuilt subset with a second shard must
        // add it here).
        let mut on_disk = Vec::new();
        for split in SPLITS {
            for e in std::fs::read_dir(repo.join(split)).unwrap() {
                on_disk.push(format!(
                    "{split}/{}",
                    e.unwrap().file_name().to_str().unwrap()
                ));
            }
        }
        on_disk.push("LICENSE".into());
        on_disk.sort();
        let mut listed: Vec<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(listed, on_disk);

        let root = tmp_root("open");
        let dir = materialize_in(&root).unwrap();
        for (name, _) in FILES {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                std::fs::read(repo.join(name)).unwrap(),
                "{name}"
            );
        }
        for split in SPLITS {
            let a = crate::data::Dataset::open(&dir.join(split)).unwrap();
            let b = crate::data::Dataset::open(&repo.join(split)).unwrap();
            assert_eq!(a.manifest(), b.manifest());
            assert_eq!(
                a.image(a.len() - 1).unwrap().data,
                b.image(b.len() - 1).unwrap().data
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_damaged_cache_is_rewritten_and_no_temporary_file_stays() {
        let root = tmp_root("damaged");
        let dir = materialize_in(&root).unwrap();
        let shard = dir.join("train/shard-00000.bin");
        let good = std::fs::read(&shard).unwrap();
        let mut bad = good.clone();
        bad[good.len() / 2] ^= 0x5a;
        std::fs::write(&shard, &bad).unwrap();
        std::fs::write(dir.join("test/manifest.json"), b"{").unwrap();
        assert_eq!(materialize_in(&root).unwrap(), dir);
        assert_eq!(std::fs::read(&shard).unwrap(), good);
        assert!(crate::data::Dataset::open(&dir.join("test")).is_ok());
        for split in SPLITS {
            for e in std::fs::read_dir(dir.join(split)).unwrap() {
                let n = e.unwrap().file_name();
                assert!(!n.to_string_lossy().contains(".tmp-"), "{n:?} left behind");
            }
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn paths_resolve_by_scheme() {
        let p = Path::new("datasets/fashion-mnist-small/train");
        assert_eq!(resolve(p).unwrap(), p, "a folder path is used as it is");
        assert!(is_embedded(Path::new(TRAIN)) && is_embedded(Path::new(TEST)));
        assert_eq!(split_of(Path::new(TEST)).unwrap(), "test");
        let err = resolve(Path::new("embedded:mnist/train"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(TRAIN) && err.contains("carp pack"), "{err}");
    }
}
