//! A packed dataset: a folder of shards plus `manifest.json`, all memory-mapped on open.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::decode::{decode_record, decode_record_into, Image};
use crate::data::shard::{IndexEntry, Shard};
use crate::error::{Error, Result};

/// The manifest's name inside a dataset folder.
pub const MANIFEST: &str = "manifest.json";
/// The value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "carp-shards";

/// `manifest.json`: classes, counts, shapes and the shard list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Class names; labels index into this list.
    pub classes: Vec<String>,
    /// Total number of records.
    pub num_records: usize,
    /// Records per class (same order as `classes`).
    pub class_counts: Vec<usize>,
    /// (H, W, C) when every record has the same shape, else null.
    pub shape: Option<[usize; 3]>,
    pub shards: Vec<ShardInfo>,
    /// Where the data came from (free text).
    #[serde(default)]
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    /// File name relative to the dataset folder.
    pub file: String,
    pub count: usize,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("bad manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::format(
                &path,
                format!("format {:?}, expected {MANIFEST_FORMAT:?}", m.format),
            ));
        }
        if m.version != crate::data::shard::SHARD_VERSION {
            return Err(Error::format(
                &path,
                format!("unsupported manifest version {}", m.version),
            ));
        }
        if m.classes.is_empty() {
            return Err(Error::format(&path, "manifest lists no classes"));
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Msg(format!("manifest serialization: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
    }
}

/// An opened packed folder (manifest + shards, memory-mapped).
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// Global record i -> (shard, record within shard).
    locs: Vec<(u32, u32)>,
    labels: Vec<u32>,
}

impl Dataset {
    /// Opens a dataset folder; validates the manifest, every shard header and index entry,
    /// and that counts and labels agree with the manifest.
    /// An `embedded:...` path opens the dataset inside the binary (`data::embedded`).
    pub fn open(dir: &Path) -> Result<Dataset> {
        let dir = &*crate::data::embedded::resolve(dir)?;
        let manifest = Manifest::read(dir)?;
        let mpath = dir.join(MANIFEST);
        let nc = manifest.classes.len();
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut locs = Vec::with_capacity(manifest.num_records);
        let mut labels = Vec::with_capacity(manifest.num_records);
        let mut counts = vec![0usize; nc];
        for (si, info) in manifest.shards.iter().enumerate() {
            if info.file.contains('/') || info.file.contains('\\') || info.file.contains("..") {
                return Err(Error::format(
                    &mpath,
                    format!("shard file name {:?} must be a plain name", info.file),
                ));
            }
            let shard = Shard::open(&dir.join(&info.file))?;
            if shard.len() != info.count {
                return Err(Error::format(
                    shard.path(),
                    format!("{} records, the manifest says {}", shard.len(), info.count),
                ));
            }
            for (ri, e) in shard.index().iter().enumerate() {
                if e.label as usize >= nc {
                    return Err(Error::format(
                        shard.path(),
                        format!("record {ri}: label {} but only {nc} classes", e.label),
                    ));
                }
                counts[e.label as usize] += 1;
                locs.push((si as u32, ri as u32));
                labels.push(e.label);
            }
            shards.push(shard);
        }
        if locs.len() != manifest.num_records {
            return Err(Error::format(
                &mpath,
                format!(
                    "shards hold {} records, the manifest says {}",
                    locs.len(),
                    manifest.num_records
                ),
            ));
        }
        if manifest.class_counts.len() != nc || counts != manifest.class_counts {
            return Err(Error::format(
                &mpath,
                format!(
                    "per-class counts {counts:?} do not match the manifest's {:?}",
                    manifest.class_counts
                ),
            ));
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            locs,
            labels,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn num_classes(&self) -> usize {
        self.manifest.classes.len()
    }
    pub fn class_names(&self) -> &[String] {
        &self.manifest.classes
    }
    /// Label of record `i` (panics if `i >= len()`, like slice indexing).
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Record `i`'s index entry and bytes, borrowed from the map, and its shard's path.
    pub fn record(&self, i: usize) -> Result<(IndexEntry, &[u8], &Path)> {
        let (e, bytes, path, _) = self.locate(i)?;
        Ok((e, bytes, path))
    }

    /// `record(i)` plus the record's index within its shard (for error messages).
    pub(crate) fn locate(&self, i: usize) -> Result<(IndexEntry, &[u8], &Path, usize)> {
        let &(s, r) = self.locs.get(i).ok_or_else(|| {
            Error::format(
                &self.dir,
                format!("record {i} out of range ({} records)", self.len()),
            )
        })?;
        let shard = &self.shards[s as usize];
        let (e, bytes) = shard.record(r as usize)?;
        Ok((e, bytes, shard.path(), r as usize))
    }

    /// Decodes record `i` to RGB (grayscale sources expanded to 3 channels).
    pub fn image(&self, i: usize) -> Result<Image> {
        let (e, bytes, path, r) = self.locate(i)?;
        decode_record(path, r, &e, bytes)
    }

    /// `image(i)` into `img`, reusing its buffer (JPEG records): the loader's hot path.
    pub fn image_into(&self, i: usize, img: &mut Image) -> Result<()> {
        let (e, bytes, path, r) = self.locate(i)?;
        decode_record_into(path, r, &e, bytes, img)
    }
}
