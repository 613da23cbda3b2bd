//! The two-view training loader, the evaluation batches and the loader benchmark.
//!
//! Determinism: an epoch's order is a shuffle seeded by (seed, epoch); each image's
//! augmentation RNG is seeded by (seed, epoch, dataset index), so batches do not depend on
//! thread scheduling, worker count or prefetch depth.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::data::augment::{
    draw_view, eval_crop, finish_view, resample_view, ColorParams, ViewConfig, ViewDraw,
};
use crate::data::dataset::Dataset;
use crate::data::decode::{
    decode_jpeg_window_into, decode_record_into, jpeg_header, Image, JpegWindow,
};
use crate::data::shard::Encoding;
use crate::data::timing::{process_cpu_seconds, thread_cpu_seconds};
use crate::error::{Error, Result};

/// Loader settings. `workers` 0 = all cores; `prefetch` = batches decoded ahead (>= 1).
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    pub batch: usize,
    pub seed: u64,
    pub rank: usize,
    pub world: usize,
    pub workers: usize,
    pub prefetch: usize,
    pub drop_last: bool,
    pub view: ViewConfig,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch: 256,
            seed: 0,
            rank: 0,
            world: 1,
            workers: 0,
            prefetch: 2,
            drop_last: true,
            view: ViewConfig::default(),
        }
    }
}

/// Two normalized views per image, each (B, 3, S, S).
#[derive(Clone, Debug, PartialEq)]
pub struct TwoViewBatch {
    /// (B, 3, S, S)
    pub view1: Vec<f32>,
    /// (B, 3, S, S)
    pub view2: Vec<f32>,
    pub labels: Vec<u32>,
    /// Dataset indices of the images.
    pub indices: Vec<usize>,
    pub batch: usize,
    pub size: usize,
}

/// The geometric half of a two-view batch: u8 crops plus per-view colour parameters, for a
/// backend that finishes the colour work itself (the GPU); `finish` does it on the CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct CropBatch {
    /// (B, S, S, 3) u8
    pub view1: Vec<u8>,
    /// (B, S, S, 3) u8
    pub view2: Vec<u8>,
    pub params1: Vec<ColorParams>,
    pub params2: Vec<ColorParams>,
    pub labels: Vec<u32>,
    pub indices: Vec<usize>,
    pub batch: usize,
    pub size: usize,
    /// Optional local views (multi-crop): (B, L, s, s, 3) u8 and (B, L) parameters; empty
    /// when `local_count` is 0.
    pub locals: Vec<u8>,
    pub local_params: Vec<ColorParams>,
    pub local_count: usize,
    pub local_size: usize,
}

/// The finished local views of a batch (multi-crop), (L, B, 3, s, s): local view l of the
/// whole batch is one contiguous (B, 3, s, s) block.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalViews {
    pub views: Vec<f32>,
    pub count: usize,
    pub batch: usize,
    pub size: usize,
}

impl CropBatch {
    /// Finishes the local views on the CPU into (L, B, 3, s, s).
    pub fn finish_locals(&self, view: &ViewConfig) -> LocalViews {
        let (l, b, s) = (self.local_count, self.batch, self.local_size);
        let per_img = 3 * s * s;
        let mut views = vec![0f32; l * b * per_img];
        views
            .par_chunks_mut(per_img)
            .enumerate()
            .for_each(|(k, o)| {
                // Output block k = (local l, image i); the crops are stored (image, local).
                let (li, bi) = (k / b.max(1), k % b.max(1));
                let src = bi * l + li;
                let crop = &self.locals[src * s * s * 3..(src + 1) * s * s * 3];
                finish_view(crop, &self.local_params[src], view, o);
            });
        LocalViews {
            views,
            count: l,
            batch: b,
            size: s,
        }
    }

    /// Applies the colour operations and normalization on the CPU (in parallel).
    pub fn finish(&self, view: &ViewConfig) -> TwoViewBatch {
        let s = self.size;
        let per_img = 3 * s * s;
        let run = |crops: &[u8], params: &[ColorParams]| {
            let mut out = vec![0f32; self.batch * per_img];
            out.par_chunks_mut(per_img)
                .zip(crops.par_chunks(s * s * 3))
                .zip(params.par_iter())
                .for_each(|((o, c), p)| finish_view(c, p, view, o));
            out
        };
        TwoViewBatch {
            view1: run(&self.view1, &self.params1),
            view2: run(&self.view2, &self.params2),
            labels: self.labels.clone(),
            indices: self.indices.clone(),
            batch: self.batch,
            size: s,
        }
    }
}

/// The largest decode buffer a loader thread keeps between records (a 2048x2048 RGB frame).
const KEEP_DECODED_BYTES: usize = 2048 * 2048 * 3;

thread_local! {
    /// The loader workers' decode buffer (one image per thread, reused across records).
    static DECODED: std::cell::RefCell<Image> = std::cell::RefCell::new(Image::new(0, 0, Vec::new()));
}

/// SplitMix64 finalizer: decorrelates nearby seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The augmentation RNG of one image in one epoch.
pub fn image_rng(seed: u64, epoch: usize, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ epoch as u64) ^ index as u64))
}

/// The JPEG decode that a set of views of an `h` x `w` image needs, for a JPEG of iMCU
/// width `mcu_width` (0: region decode unavailable).
///
/// - DCT-domain scale 1/d: the largest d in {1, 2, 4, 8} such that every view's crop is at
///   least d times its output side, so that every view still shrinks (or keeps its scale)
///   when resampled from the scaled frame.
/// - Region: the union of the crops, widened by the resampler's reach (its taps read past a
///   box's edge, as PIL's do) plus two pixels, clipped to the frame, its left edge moved down
///   to a scaled iMCU boundary (TurboJPEG's requirement). The crops are drawn as before, from
///   the whole frame: only the decoding changes, not the distribution of views.
pub fn plan_window(h: usize, w: usize, mcu_width: usize, draws: &[ViewDraw]) -> JpegWindow {
    if draws.is_empty() {
        return JpegWindow::full(h, w, 1);
    }
    let mut denom = 8;
    for d in draws {
        let side = d.crop.height.min(d.crop.width);
        while denom > 1 && side < denom * d.size {
            denom /= 2;
        }
    }
    let full = JpegWindow::full(h, w, denom);
    if mcu_width == 0 {
        return full;
    }
    let s = 1.0 / denom as f64;
    let top = draws.iter().map(|d| d.crop.top).min().unwrap_or(0);
    let left = draws.iter().map(|d| d.crop.left).min().unwrap_or(0);
    let bottom = draws
        .iter()
        .map(|d| d.crop.top + d.crop.height)
        .max()
        .unwrap_or(h);
    let right = draws
        .iter()
        .map(|d| d.crop.left + d.crop.width)
        .max()
        .unwrap_or(w);
    // The widest kernel's half-width in scaled pixels: 2 * max(1, box / output).
    let reach = draws
        .iter()
        .map(|d| 2.0 * (d.crop.height.max(d.crop.width) as f64 * s / d.size as f64).max(1.0))
        .fold(0.0, f64::max);
    let m = reach.ceil() as usize + 2;
    let mcu = mcu_width.div_ceil(denom);
    let x0 = ((left as f64 * s).floor() as usize).saturating_sub(m) / mcu * mcu;
    let y0 = ((top as f64 * s).floor() as usize).saturating_sub(m);
    let x1 = ((right as f64 * s).ceil() as usize + m).min(full.width);
    let y1 = ((bottom as f64 * s).ceil() as usize + m).min(full.height);
    JpegWindow {
        denom,
        top: y0,
        left: x0,
        height: y1 - y0,
        width: x1 - x0,
    }
}

/// One image's views, as the loader makes them, up to the resampling: draws view 1, view 2,
/// then `local_count` local views from `rng` (the numbers and order of `sample_view` on
/// each), then decodes into `img` the window of record `i` they need (`plan_window`; the
/// whole frame for raw and PNG records). `resample_view` then makes each view.
pub fn decode_for_views<R: rand::Rng>(
    ds: &Dataset,
    i: usize,
    view: &ViewConfig,
    rng: &mut R,
    img: &mut Image,
) -> Result<(Vec<ViewDraw>, JpegWindow)> {
    let (e, bytes, path, r) = ds.locate(i)?;
    let (h, w) = (e.height as usize, e.width as usize);
    let draws: Vec<ViewDraw> = (0..2 + view.local_count)
        .map(|v| draw_view(h, w, view, v.min(2), rng))
        .collect();
    if Encoding::from_u8(e.encoding) != Some(Encoding::Jpeg) {
        decode_record_into(path, r, &e, bytes, img)?;
        return Ok((draws, JpegWindow::full(h, w, 1)));
    }
    let err = |m: String| Error::format(path, format!("record {r}: {m}"));
    let hd = jpeg_header(bytes).map_err(err)?;
    if (hd.height, hd.width) != (h, w) {
        return Err(err(format!(
            "decoded image is {}x{}, the index says {h}x{w}",
            hd.height, hd.width
        )));
    }
    let win = plan_window(h, w, hd.mcu_width, &draws);
    decode_jpeg_window_into(bytes, Some(win), img).map_err(err)?;
    Ok((draws, win))
}

/// Builds the crops of the images `indices` (in parallel on the current rayon pool).
pub fn make_crops(
    ds: &Dataset,
    view: &ViewConfig,
    seed: u64,
    epoch: usize,
    indices: &[usize],
) -> Result<CropBatch> {
    let s = view.size;
    let per = s * s * 3;
    let b = indices.len();
    let mut view1 = vec![0u8; b * per];
    let mut view2 = vec![0u8; b * per];
    let mut params = vec![(ColorParams::default(), ColorParams::default()); b];
    let (nl, ls) = (view.local_count, view.local_size);
    // One image's local crops, (L, s, s, 3). With no local views these are one-element
    // placeholders per image, cleared below, so that the parallel zip stays simple.
    let lper = nl * ls * ls * 3;
    let mut locals = vec![0u8; b * lper.max(1)];
    let mut local_params = vec![ColorParams::default(); b * nl.max(1)];
    view1
        .par_chunks_mut(per)
        .zip(view2.par_chunks_mut(per))
        .zip(params.par_iter_mut())
        .zip(indices.par_iter())
        .zip(locals.par_chunks_mut(lper.max(1)))
        .zip(local_params.par_chunks_mut(nl.max(1)))
        .try_for_each(|(((((v1, v2), p), &i), lc), lp)| -> Result<()> {
            // Each worker thread decodes into its own reused image buffer.
            DECODED.with(|img| -> Result<()> {
                let img = &mut *img.borrow_mut();
                let mut rng = image_rng(seed, epoch, i);
                let (draws, win) = decode_for_views(ds, i, view, &mut rng, img)?;
                resample_view(img, &win, &draws[0], v1);
                resample_view(img, &win, &draws[1], v2);
                *p = (draws[0].params, draws[1].params);
                // Local views come after both global views from the same stream, so turning
                // multi-crop on leaves the global views unchanged.
                for l in 0..nl {
                    let d = &draws[2 + l];
                    resample_view(
                        img,
                        &win,
                        d,
                        &mut lc[l * ls * ls * 3..(l + 1) * ls * ls * 3],
                    );
                    lp[l] = d.params;
                }
                // Keep ImageNet-sized buffers (~0.8 MB); let an occasional huge frame go.
                if img.data.capacity() > KEEP_DECODED_BYTES {
                    *img = Image::new(0, 0, Vec::new());
                }
                Ok(())
            })
        })?;
    if nl == 0 {
        locals = Vec::new();
        local_params = Vec::new();
    }
    Ok(CropBatch {
        view1,
        view2,
        params1: params.iter().map(|p| p.0).collect(),
        params2: params.iter().map(|p| p.1).collect(),
        labels: indices.iter().map(|&i| ds.label(i)).collect(),
        indices: indices.to_vec(),
        batch: b,
        size: s,
        locals,
        local_params,
        local_count: nl,
        local_size: if nl > 0 { ls } else { 0 },
    })
}

/// The memory-mapped, shuffling, prefetching two-view loader.
pub struct TwoViewLoader {
    ds: Arc<Dataset>,
    cfg: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
    per_rank: usize,
}

impl TwoViewLoader {
    pub fn new(ds: Arc<Dataset>, cfg: LoaderConfig) -> Result<TwoViewLoader> {
        if cfg.batch == 0 {
            return Err(Error::Config("loader batch must be at least 1".into()));
        }
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(Error::Config(format!(
                "loader rank {} of world {}: need rank < world",
                cfg.rank, cfg.world
            )));
        }
        cfg.view.validate()?;
        // Every rank gets the same number of images (the remainder of len / world is
        // skipped each epoch, a different remainder every epoch since the order is shuffled).
        let per_rank = ds.len() / cfg.world;
        let nb = if cfg.drop_last {
            per_rank / cfg.batch
        } else {
            per_rank.div_ceil(cfg.batch)
        };
        if nb == 0 {
            return Err(Error::Config(format!(
                "{} images over {} rank(s) make no batch of {} (drop_last {}); lower the batch",
                ds.len(),
                cfg.world,
                cfg.batch,
                cfg.drop_last
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers)
            .thread_name(|i| format!("carp-loader-{i}"))
            .build()
            .map_err(|e| Error::Msg(format!("loader thread pool: {e}")))?;
        Ok(TwoViewLoader {
            ds,
            cfg,
            pool: Arc::new(pool),
            per_rank,
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.ds
    }

    pub fn batches_per_epoch(&self) -> usize {
        if self.cfg.drop_last {
            self.per_rank / self.cfg.batch
        } else {
            self.per_rank.div_ceil(self.cfg.batch)
        }
    }

    /// This rank's dataset indices for `epoch`, in order: a permutation seeded by
    /// (seed, epoch), the same on every rank, of which rank r takes positions r, r+world, ...
    pub fn epoch_indices(&self, epoch: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..self.ds.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.cfg.seed ^ mix(epoch as u64 + 1)));
        perm.shuffle(&mut rng);
        perm.into_iter()
            .skip(self.cfg.rank)
            .step_by(self.cfg.world)
            .take(self.per_rank)
            .collect()
    }

    /// The batches of one epoch (shuffled by seed and epoch), prefetched in the background.
    pub fn epoch(&self, epoch: usize) -> impl Iterator<Item = Result<TwoViewBatch>> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (exact resume inside an epoch: the
    /// skipped batches are not decoded, and the rest are identical to `epoch(epoch)`'s).
    pub fn epoch_from(
        &self,
        epoch: usize,
        first: usize,
    ) -> impl Iterator<Item = Result<TwoViewBatch>> {
        let view = self.cfg.view.clone();
        self.spawn(epoch, first, move |c| c.finish(&view))
    }

    /// Like `epoch_from`, plus the finished local views (multi-crop; `view.local_count` > 0).
    pub fn epoch_multi(
        &self,
        epoch: usize,
        first: usize,
    ) -> impl Iterator<Item = Result<(TwoViewBatch, LocalViews)>> {
        let view = self.cfg.view.clone();
        self.spawn(epoch, first, move |c| {
            (c.finish(&view), c.finish_locals(&view))
        })
    }

    /// Like `epoch_from`, but yields the u8 crops and colour parameters (for a GPU `finish`).
    pub fn epoch_crops(
        &self,
        epoch: usize,
        first: usize,
    ) -> impl Iterator<Item = Result<CropBatch>> {
        self.spawn(epoch, first, |c| c)
    }

    fn spawn<T: Send + 'static>(
        &self,
        epoch: usize,
        first: usize,
        post: impl Fn(CropBatch) -> T + Send + Sync + 'static,
    ) -> Prefetch<T> {
        let indices = self.epoch_indices(epoch);
        let nb = self.batches_per_epoch();
        let batch = self.cfg.batch;
        let (tx, rx) = sync_channel::<Result<T>>(self.cfg.prefetch.max(1));
        let ds = self.ds.clone();
        let pool = self.pool.clone();
        let view = self.cfg.view.clone();
        let seed = self.cfg.seed;
        // The producer holds at most one batch in the making plus `prefetch` in the channel:
        // memory stays bounded however slow the consumer is.
        let handle = std::thread::Builder::new()
            .name("carp-prefetch".into())
            .spawn(move || {
                for b in first..nb {
                    let idx = &indices[b * batch..((b + 1) * batch).min(indices.len())];
                    let res = pool.install(|| make_crops(&ds, &view, seed, epoch, idx).map(&post));
                    let failed = res.is_err();
                    if tx.send(res).is_err() || failed {
                        return; // consumer gone, or the error was delivered
                    }
                }
            });
        match handle {
            Ok(h) => Prefetch {
                rx: Some(rx),
                handle: Some(h),
                err: None,
            },
            Err(e) => Prefetch {
                rx: None,
                handle: None,
                err: Some(Error::Msg(format!("cannot start the prefetch thread: {e}"))),
            },
        }
    }
}

/// Receives prefetched batches; dropping it stops the producer.
struct Prefetch<T> {
    rx: Option<Receiver<Result<T>>>,
    handle: Option<JoinHandle<()>>,
    err: Option<Error>,
}

impl<T> Iterator for Prefetch<T> {
    type Item = Result<T>;
    fn next(&mut self) -> Option<Result<T>> {
        if let Some(e) = self.err.take() {
            return Some(Err(e));
        }
        let item = self.rx.as_ref()?.recv().ok();
        if item.is_none() {
            // Producer finished: reap it; a panic there is reported, not swallowed.
            self.rx = None;
            if let Some(h) = self.handle.take() {
                if h.join().is_err() {
                    return Some(Err(Error::Msg("the prefetch thread panicked".into())));
                }
            }
        }
        item
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        // Close the channel first so a blocked producer wakes up and exits, then join it.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Evaluation views (`eval_crop`: resize the short side to size * 256 / 224, then centre crop
/// `size`), normalized (B, 3, S, S), in dataset order.
pub fn eval_batches(
    ds: &Dataset,
    size: usize,
    batch: usize,
) -> impl Iterator<Item = Result<(Vec<f32>, Vec<u32>)>> + '_ {
    let bad = if batch == 0 || size == 0 {
        Some(Err(Error::Config(format!(
            "eval batch {batch} and size {size} must both be at least 1"
        ))))
    } else {
        None
    };
    let n = if bad.is_some() { 0 } else { ds.len() };
    let step = batch.max(1);
    let view = ViewConfig::imagenet(size);
    bad.into_iter()
        .chain((0..n).step_by(step).map(move |start| {
            let end = (start + step).min(n);
            let per = 3 * size * size;
            let mut out = vec![0f32; (end - start) * per]; // (B, 3, S, S)
            out.par_chunks_mut(per)
                .enumerate()
                .try_for_each(|(k, o)| -> Result<()> {
                    let img = ds.image(start + k)?;
                    let crop = eval_crop(&img, size);
                    finish_view(&crop, &ColorParams::identity(), &view, o);
                    Ok(())
                })?;
            Ok((out, (start..end).map(|i| ds.label(i)).collect()))
        }))
}

/// Loader throughput, as `carp-bench --loader` prints it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderBenchReport {
    pub records: usize,
    pub batch: usize,
    pub size: usize,
    pub batches: usize,
    pub workers: usize,
    pub seconds: f64,
    /// Images per second, each yielding two finished (normalized f32) views.
    pub images_per_sec: f64,
    /// Images per second for the geometric half only (u8 crops + colour parameters), what a
    /// GPU-finishing backend would need from the CPU.
    pub crop_images_per_sec: f64,
    /// The same two runs per core: images / process CPU seconds (getrusage), which holds on
    /// a shared machine where wall time does not.
    pub images_per_cpu_sec: f64,
    pub crop_images_per_cpu_sec: f64,
    /// One thread's per-image stage costs (thread CPU time): decode / resize / colour / blur.
    pub stages: StageTimes,
    /// Mean decoded pixels per record and encoded bytes per decoded pixel of the records
    /// timed by `stages` (how ImageNet-like the set is: ImageNet's JPEGs ~0.6-0.8 B/px).
    pub mean_pixels: f64,
    pub bytes_per_pixel: f64,
}

impl std::fmt::Display for LoaderBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loader: {} batches of {} at {}x{} with {} worker(s): {:.0} two-view images/s \
             ({:.0} views/s); crops only {:.0} images/s\n  \
             per core (process CPU time): {:.0} two-view images/s, crops only {:.0}\n  \
             per core (one thread, {} images of {:.0} px, {:.2} B/px): crops only {:.0} \
             images/s, with CPU finish {:.0}; ms per image: decode {:.2}, crop+resize \
             {:.2}, colour {:.2}, blur {:.2}",
            self.batches,
            self.batch,
            self.size,
            self.size,
            self.workers,
            self.images_per_sec,
            2.0 * self.images_per_sec,
            self.crop_images_per_sec,
            self.images_per_cpu_sec,
            self.crop_images_per_cpu_sec,
            self.stages.images,
            self.mean_pixels,
            self.bytes_per_pixel,
            self.stages.crops_per_core(),
            self.stages.full_per_core(),
            1e3 * self.stages.decode_s,
            1e3 * self.stages.resize_s,
            1e3 * self.stages.colour_s,
            1e3 * self.stages.blur_s,
        )
    }
}

/// Measures two-view loading from a packed folder: `batches` batches of `batch` images at
/// `size`, with `workers` threads (0 = all cores).
pub fn bench_loader(
    dir: &Path,
    batch: usize,
    size: usize,
    batches: usize,
    workers: usize,
) -> Result<LoaderBenchReport> {
    let ds = Arc::new(Dataset::open(dir)?);
    let batch = batch.min(ds.len()).max(1);
    let cfg = LoaderConfig {
        batch,
        workers,
        view: ViewConfig::imagenet(size),
        ..LoaderConfig::default()
    };
    let loader = TwoViewLoader::new(ds.clone(), cfg)?;
    let actual_workers = loader.pool.current_num_threads();
    let batches = batches.max(1);
    let time = |finish: bool| -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let c0 = process_cpu_seconds();
        let mut done = 0;
        let mut epoch = 0;
        while done < batches {
            if finish {
                for b in loader.epoch(epoch).take(batches - done) {
                    std::hint::black_box(b?);
                    done += 1;
                }
            } else {
                for b in loader.epoch_crops(epoch, 0).take(batches - done) {
                    std::hint::black_box(b?);
                    done += 1;
                }
            }
            epoch += 1;
        }
        Ok((t0.elapsed().as_secs_f64(), process_cpu_seconds() - c0))
    };
    let (seconds, cpu) = time(true)?;
    let (crop_seconds, crop_cpu) = time(false)?;
    let images = (batches * batch) as f64;
    // The per-stage split on this thread, over at least one pass of up to 256 records.
    let n_stage = ds.len().clamp(1, 256);
    let stages = bench_stages(&ds, &loader.config().view, n_stage)?;
    let (mut px, mut bytes) = (0usize, 0usize);
    for i in 0..n_stage {
        let (e, b, _) = ds.record(i)?;
        px += e.height as usize * e.width as usize;
        bytes += b.len();
    }
    Ok(LoaderBenchReport {
        records: ds.len(),
        batch,
        size,
        batches,
        workers: actual_workers,
        seconds,
        images_per_sec: images / seconds,
        crop_images_per_sec: images / crop_seconds,
        images_per_cpu_sec: images / cpu.max(1e-9),
        crop_images_per_cpu_sec: images / crop_cpu.max(1e-9),
        stages,
        mean_pixels: px as f64 / n_stage as f64,
        bytes_per_pixel: bytes as f64 / px.max(1) as f64,
    })
}

/// Per-core loader cost, measured on one thread: thread CPU seconds per image by stage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub images: usize,
    /// Record to RGB u8 (JPEG decode), per image.
    pub decode_s: f64,
    /// Random resized crop + bicubic resample + flip, both views, per image.
    pub resize_s: f64,
    /// Colour finish without the blur (u8 -> f32, jitter, grayscale, solarize, normalize),
    /// both views, per image.
    pub colour_s: f64,
    /// Gaussian blur, both views, per image.
    pub blur_s: f64,
}

impl StageTimes {
    /// Two-view images/s on one core for the geometric half (u8 crops + parameters).
    pub fn crops_per_core(&self) -> f64 {
        1.0 / (self.decode_s + self.resize_s).max(1e-12)
    }
    /// Two-view images/s on one core with the CPU colour finish.
    pub fn full_per_core(&self) -> f64 {
        1.0 / (self.decode_s + self.resize_s + self.colour_s + self.blur_s).max(1e-12)
    }
}

/// Measures the stages on the calling thread over `images` records (cycling), with the
/// loader's per-image RNG, so the crops are those `epoch(0)` would draw.
pub fn bench_stages(
    ds: &crate::data::Dataset,
    view: &crate::data::ViewConfig,
    images: usize,
) -> Result<StageTimes> {
    use crate::data::augment::{finish_clocked, resample_view};
    let n = images.max(1);
    let (mut dec, mut res) = (0.0, 0.0);
    let mut fin = [0.0f64; 2];
    let mut out = vec![0f32; 3 * view.size * view.size]; // (3, S, S)
                                                         // Reused buffers, as the loader's workers have them.
    let mut img = crate::data::decode::Image::new(0, 0, Vec::new());
    let (mut c1, mut c2) = (
        vec![0u8; view.size * view.size * 3],
        vec![0u8; view.size * view.size * 3],
    ); // (S, S, 3)
    for k in 0..n {
        let i = k % ds.len().max(1);
        let t0 = thread_cpu_seconds();
        // Drawing the views is part of the decode stage: the decode depends on them.
        let mut rng = image_rng(0, 0, i);
        let (draws, win) = decode_for_views(ds, i, view, &mut rng, &mut img)?;
        let t1 = thread_cpu_seconds();
        resample_view(&img, &win, &draws[0], &mut c1);
        resample_view(&img, &win, &draws[1], &mut c2);
        let (p1, p2) = (draws[0].params, draws[1].params);
        let t2 = thread_cpu_seconds();
        dec += t1 - t0;
        res += t2 - t1;
        for (c, p) in [(&c1, &p1), (&c2, &p2)] {
            finish_clocked(
                c,
                p,
                view.size,
                &view.mean,
                &view.std,
                view.solarize_threshold,
                &mut out,
                Some(&mut fin),
            );
            std::hint::black_box(&out);
        }
    }
    let nf = n as f64;
    Ok(StageTimes {
        images: n,
        decode_s: dec / nf,
        resize_s: res / nf,
        colour_s: fin[0] / nf,
        blur_s: fin[1] / nf,
    })
}
