//! `carp pack`: builds a packed dataset from an ImageFolder tree or from IDX files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::data::augment::resample;
use crate::data::dataset::{Manifest, ShardInfo, MANIFEST_FORMAT};
use crate::data::decode::{decode_bytes, encode_jpeg, encode_png, sniff};
use crate::data::idx::read_idx_pair;
use crate::data::shard::{write_shard, Encoding, RecordData, SHARD_VERSION};
use crate::error::{Error, Result};

/// Arguments of `carp pack` (clap-derived so the CLI can embed them).
#[derive(clap::Args, Clone, Debug)]
pub struct PackArgs {
    /// An ImageFolder root (one sub-folder of JPEG/PNG files per class), or an IDX images
    /// file (gzip or not) when --labels is given.
    pub src: PathBuf,
    /// Output folder (created; its old shards are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// IDX labels file matching the IDX images in SRC.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Re-encode images whose longer side exceeds this to JPEG with that longer side.
    #[arg(long)]
    pub max_side: Option<u32>,
    /// JPEG quality for re-encoded images.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,
    /// Records per shard file.
    #[arg(long, default_value_t = 4096)]
    pub shard_records: usize,
    /// Keep only the first N images of every class (a balanced subset).
    #[arg(long)]
    pub per_class: Option<usize>,
    /// IDX only: store records as "raw" u8 pixels or "png".
    #[arg(long, default_value = "raw")]
    pub idx_encoding: String,
    /// IDX only: class names, comma-separated (default "0", "1", ...).
    #[arg(long, value_delimiter = ',')]
    pub class_names: Vec<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl PackArgs {
    /// Defaults as the CLI has them.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> PackArgs {
        PackArgs {
            src: src.into(),
            out: out.into(),
            labels: None,
            max_side: None,
            quality: 90,
            shard_records: 4096,
            per_class: None,
            idx_encoding: "raw".into(),
            class_names: Vec::new(),
            no_progress: true,
        }
    }
}

/// What `run_pack` wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct PackReport {
    pub out: PathBuf,
    pub records: usize,
    pub shards: usize,
    pub classes: usize,
    /// Total bytes of the shard files.
    pub bytes: u64,
    pub seconds: f64,
}

impl std::fmt::Display for PackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "packed {} records of {} classes into {} shard(s), {:.1} MB, in {}: {:.1}s",
            self.records,
            self.classes,
            self.shards,
            self.bytes as f64 / 1e6,
            self.out.display(),
            self.seconds
        )
    }
}

/// Packs `args.src` into `args.out`.
pub fn run_pack(args: &PackArgs) -> Result<PackReport> {
    if args.shard_records == 0 {
        return Err(Error::Config("--shard-records must be at least 1".into()));
    }
    if args.max_side == Some(0) {
        return Err(Error::Config("--max-side must be at least 1".into()));
    }
    let t0 = Instant::now();
    let (classes, items) = match &args.labels {
        Some(labels) => idx_items(args, labels)?,
        None => folder_items(args)?,
    };
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    remove_old_shards(&args.out)?;
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(items.len() as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} packing [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    };
    let mut shards = Vec::new();
    let mut counts = vec![0usize; classes.len()];
    let mut shapes = std::collections::BTreeSet::new();
    let mut bytes = 0u64;
    for (si, chunk) in items.chunks(args.shard_records).enumerate() {
        let recs: Vec<RecordData> = chunk
            .par_iter()
            .map(|it| {
                let r = make_record(args, it);
                bar.inc(1);
                r
            })
            .collect::<Result<_>>()?;
        for r in &recs {
            counts[r.label as usize] += 1;
            shapes.insert([r.height as usize, r.width as usize, r.channels as usize]);
        }
        let file = format!("shard-{si:05}.bin");
        let path = args.out.join(&file);
        write_shard(&path, &recs)?;
        bytes += std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        shards.push(ShardInfo {
            file,
            count: recs.len(),
        });
    }
    bar.finish_and_clear();
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: SHARD_VERSION,
        classes: classes.clone(),
        num_records: items.len(),
        class_counts: counts,
        shape: if shapes.len() == 1 {
            shapes.into_iter().next()
        } else {
            None
        },
        shards: shards.clone(),
        source: format!(
            "carp pack {}{}",
            args.src.display(),
            args.labels
                .as_ref()
                .map(|l| format!(" --labels {}", l.display()))
                .unwrap_or_default()
        ),
    };
    manifest.write(&args.out)?;
    Ok(PackReport {
        out: args.out.clone(),
        records: items.len(),
        shards: shards.len(),
        classes: classes.len(),
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One record to make: a file of an ImageFolder, or one IDX image.
enum Item {
    File {
        path: PathBuf,
        label: u32,
    },
    Pixels {
        h: usize,
        w: usize,
        px: Vec<u8>,
        label: u32,
    },
}

fn make_record(args: &PackArgs, it: &Item) -> Result<RecordData> {
    match it {
        Item::Pixels { h, w, px, label } => {
            let (bytes, encoding) = match args.idx_encoding.as_str() {
                "png" => (encode_png(*h, *w, 1, px)?, Encoding::Png),
                _ => (px.clone(), Encoding::Raw),
            };
            Ok(RecordData {
                bytes,
                label: *label,
                height: *h as u16,
                width: *w as u16,
                channels: 1,
                encoding,
            })
        }
        Item::File { path, label } => {
            let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let enc =
                sniff(&raw).ok_or_else(|| Error::format(path, "neither a JPEG nor a PNG file"))?;
            let img = decode_bytes(&raw).map_err(|m| Error::format(path, m))?;
            let (h, w) = (img.height, img.width);
            match args.max_side {
                Some(ms) if h.max(w) > ms as usize => {
                    let s = ms as f64 / h.max(w) as f64;
                    let nh = ((h as f64 * s).round() as usize).max(1);
                    let nw = ((w as f64 * s).round() as usize).max(1);
                    let px = resample(&img, 0.0, 0.0, h as f64, w as f64, nh, nw, false);
                    let bytes = encode_jpeg(nh, nw, 3, &px, args.quality)
                        .map_err(|e| Error::format(path, e.to_string()))?;
                    Ok(RecordData {
                        bytes,
                        label: *label,
                        height: nh as u16,
                        width: nw as u16,
                        channels: 3,
                        encoding: Encoding::Jpeg,
                    })
                }
                _ => {
                    if h > u16::MAX as usize || w > u16::MAX as usize {
                        return Err(Error::format(
                            path,
                            format!("image {h}x{w} too large; use --max-side"),
                        ));
                    }
                    Ok(RecordData {
                        bytes: raw,
                        label: *label,
                        height: h as u16,
                        width: w as u16,
                        channels: 3,
                        encoding: enc,
                    })
                }
            }
        }
    }
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("jpg" | "jpeg" | "png")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        v.push(e.path());
    }
    v.sort();
    Ok(v)
}

fn folder_items(args: &PackArgs) -> Result<(Vec<String>, Vec<Item>)> {
    let root = &args.src;
    if !root.is_dir() {
        return Err(Error::format(
            root,
            "not a folder (pass an ImageFolder root, or an IDX images file with --labels)",
        ));
    }
    let class_dirs: Vec<PathBuf> = sorted_entries(root)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    if class_dirs.is_empty() {
        return Err(Error::format(
            root,
            "no class sub-folders (an ImageFolder has one sub-folder of images per class)",
        ));
    }
    let mut classes = Vec::new();
    let mut items = Vec::new();
    for (label, dir) in class_dirs.iter().enumerate() {
        let mut files: Vec<PathBuf> = sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if files.is_empty() {
            return Err(Error::format(
                dir,
                "class folder holds no .jpg/.jpeg/.png files",
            ));
        }
        if let Some(n) = args.per_class {
            files.truncate(n);
        }
        classes.push(
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        items.extend(files.into_iter().map(|path| Item::File {
            path,
            label: label as u32,
        }));
    }
    Ok((classes, items))
}

fn idx_items(args: &PackArgs, labels: &Path) -> Result<(Vec<String>, Vec<Item>)> {
    if !matches!(args.idx_encoding.as_str(), "raw" | "png") {
        return Err(Error::Config(format!(
            "--idx-encoding {:?}: expected raw or png",
            args.idx_encoding
        )));
    }
    let (px, h, w, lb) = read_idx_pair(&args.src, labels)?;
    let max_label = lb.iter().copied().max().unwrap_or(0) as usize;
    let classes: Vec<String> = if args.class_names.is_empty() {
        (0..=max_label).map(|c| c.to_string()).collect()
    } else {
        args.class_names.clone()
    };
    if max_label >= classes.len() {
        return Err(Error::format(
            labels,
            format!(
                "label {max_label} but only {} class names given",
                classes.len()
            ),
        ));
    }
    if lb.is_empty() {
        return Err(Error::format(labels, "no images"));
    }
    let mut taken = vec![0usize; classes.len()];
    let mut items = Vec::new();
    for (i, &l) in lb.iter().enumerate() {
        if let Some(n) = args.per_class {
            if taken[l as usize] >= n {
                continue;
            }
        }
        taken[l as usize] += 1;
        items.push(Item::Pixels {
            h,
            w,
            px: px[i * h * w..(i + 1) * h * w].to_vec(),
            label: l as u32,
        });
    }
    Ok((classes, items))
}

fn remove_old_shards(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("shard-") && (name.ends_with(".bin") || name.ends_with(".tmp")) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}
