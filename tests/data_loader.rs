//! The two-view loader and evaluation batches: epoch shuffles, rank slices, determinism
//! across worker counts and prefetch depths, the u8-crop + finish split, errors, and the
//! benchmark function.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use carp::data::augment::{eval_crop, finish_view, sample_view, ColorParams};
use carp::data::decode::encode_jpeg;
use carp::data::idx::write_idx;
use carp::data::loader::image_rng;
use carp::data::{
    bench_loader, eval_batches, run_pack, Dataset, LoaderConfig, PackArgs, TwoViewLoader,
    ViewConfig,
};
use carp::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-loader-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A packed raw dataset of `n` random 12x10 gray images over 5 classes.
fn small_dataset(name: &str, n: usize) -> Arc<Dataset> {
    let dir = tmpdir(name);
    let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
    let px: Vec<u8> = (0..n * 120).map(|_| rng.gen()).collect();
    let lb: Vec<u8> = (0..n).map(|i| (i % 5) as u8).collect();
    write_idx(&dir.join("i.idx"), &[n, 12, 10], &px).unwrap();
    write_idx(&dir.join("l.idx"), &[n], &lb).unwrap();
    let mut a = PackArgs::new(dir.join("i.idx"), dir.join("out"));
    a.labels = Some(dir.join("l.idx"));
    a.shard_records = 17;
    run_pack(&a).unwrap();
    Arc::new(Dataset::open(&dir.join("out")).unwrap())
}

fn cfg(batch: usize, seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch,
        seed,
        workers: 2,
        prefetch: 2,
        view: ViewConfig::imagenet(16),
        ..LoaderConfig::default()
    }
}

#[test]
fn epochs_are_seeded_shuffles_and_ranks_partition_them() {
    let ds = small_dataset("perm", 50);
    let l = TwoViewLoader::new(ds.clone(), cfg(8, 3)).unwrap();
    let e0 = l.epoch_indices(0);
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    assert_ne!(e0, l.epoch_indices(1), "a new order every epoch");
    assert_ne!(e0, (0..50).collect::<Vec<_>>());
    let same = TwoViewLoader::new(ds.clone(), cfg(8, 3)).unwrap();
    assert_eq!(e0, same.epoch_indices(0), "same seed, same order");
    let other = TwoViewLoader::new(ds.clone(), cfg(8, 4)).unwrap();
    assert_ne!(e0, other.epoch_indices(0));
    // World 3: equal, disjoint slices (50 / 3 = 16 each; 2 left out this epoch).
    let slices: Vec<Vec<usize>> = (0..3)
        .map(|rank| {
            let c = LoaderConfig {
                rank,
                world: 3,
                ..cfg(4, 3)
            };
            TwoViewLoader::new(ds.clone(), c).unwrap().epoch_indices(5)
        })
        .collect();
    let mut all: Vec<usize> = slices.concat();
    assert!(slices.iter().all(|s| s.len() == 16));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 48);
}

#[test]
fn batches_cover_the_epoch_with_matching_labels() {
    let ds = small_dataset("cover", 50);
    let l = TwoViewLoader::new(ds.clone(), cfg(8, 1)).unwrap();
    assert_eq!(l.batches_per_epoch(), 6);
    let batches: Vec<_> = l.epoch(2).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 6);
    let idx: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, l.epoch_indices(2)[..48]);
    for b in &batches {
        assert_eq!((b.batch, b.size), (8, 16));
        assert_eq!(b.view1.len(), 8 * 3 * 16 * 16);
        assert_eq!(b.view2.len(), 8 * 3 * 16 * 16);
        assert_ne!(b.view1, b.view2);
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.labels[k], ds.label(i));
            assert_eq!(b.labels[k], (i % 5) as u32);
        }
    }
    // drop_last = false: a last, short batch.
    let l = TwoViewLoader::new(
        ds.clone(),
        LoaderConfig {
            drop_last: false,
            ..cfg(8, 1)
        },
    )
    .unwrap();
    assert_eq!(l.batches_per_epoch(), 7);
    let last = l.epoch(0).last().unwrap().unwrap();
    assert_eq!(last.batch, 2);
    assert_eq!(last.view1.len(), 2 * 3 * 16 * 16);
}

#[test]
fn batches_do_not_depend_on_workers_or_prefetch_and_match_the_recipe() {
    let ds = small_dataset("determinism", 30);
    let a: Vec<_> = TwoViewLoader::new(
        ds.clone(),
        LoaderConfig {
            workers: 1,
            prefetch: 1,
            ..cfg(7, 9)
        },
    )
    .unwrap()
    .epoch(4)
    .map(|b| b.unwrap())
    .collect();
    let loader = TwoViewLoader::new(
        ds.clone(),
        LoaderConfig {
            workers: 3,
            prefetch: 5,
            ..cfg(7, 9)
        },
    )
    .unwrap();
    let b: Vec<_> = loader.epoch(4).map(|b| b.unwrap()).collect();
    assert_eq!(a, b);
    // Resuming inside the epoch gives the same remaining batches.
    let resumed: Vec<_> = loader.epoch_from(4, 2).map(|b| b.unwrap()).collect();
    assert_eq!(resumed, b[2..]);
    assert_eq!(loader.epoch_from(4, 99).count(), 0);
    // The u8 crops + parameters, finished on the CPU, give the same batches.
    let crops: Vec<_> = loader.epoch_crops(4, 0).map(|b| b.unwrap()).collect();
    let view = &loader.config().view;
    for (c, full) in crops.iter().zip(&b) {
        assert_eq!(&c.finish(view), full);
        assert_eq!(c.view1.len(), 7 * 16 * 16 * 3);
    }
    // The crop batches resume mid-epoch too (the GPU finish's resume path).
    let crops_resumed: Vec<_> = loader.epoch_crops(4, 2).map(|b| b.unwrap()).collect();
    assert_eq!(crops_resumed, crops[2..]);
    // Each image's views are the per-image recipe with its own RNG (seed, epoch, index).
    let first = &crops[0];
    for (k, &i) in first.indices.iter().enumerate() {
        let img = ds.image(i).unwrap();
        let mut rng = image_rng(9, 4, i);
        let (c1, p1) = sample_view(&img, view, 0, &mut rng);
        let (c2, p2) = sample_view(&img, view, 1, &mut rng);
        let per = 16 * 16 * 3;
        assert_eq!(&first.view1[k * per..(k + 1) * per], &c1[..]);
        assert_eq!(&first.view2[k * per..(k + 1) * per], &c2[..]);
        assert_eq!((first.params1[k], first.params2[k]), (p1, p2));
        let mut out = vec![0f32; 3 * 16 * 16];
        finish_view(&c1, &p1, view, &mut out);
        assert_eq!(&b[0].view1[k * out.len()..(k + 1) * out.len()], &out[..]);
    }
}

#[test]
fn dropping_an_epoch_early_stops_the_producer() {
    let ds = small_dataset("drop", 40);
    let l = TwoViewLoader::new(
        ds,
        LoaderConfig {
            prefetch: 1,
            ..cfg(2, 0)
        },
    )
    .unwrap();
    for e in 0..5 {
        let mut it = l.epoch(e);
        assert!(it.next().unwrap().is_ok());
        drop(it); // must not hang
    }
}

#[test]
fn bad_configs_are_errors() {
    let ds = small_dataset("badcfg", 10);
    assert!(matches!(
        TwoViewLoader::new(ds.clone(), cfg(0, 0)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        TwoViewLoader::new(
            ds.clone(),
            LoaderConfig {
                rank: 2,
                world: 2,
                ..cfg(2, 0)
            }
        ),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        TwoViewLoader::new(ds.clone(), cfg(11, 0)),
        Err(Error::Config(_))
    ));
    assert!(TwoViewLoader::new(
        ds.clone(),
        LoaderConfig {
            drop_last: false,
            ..cfg(11, 0)
        }
    )
    .is_ok());
    assert!(eval_batches(&ds, 16, 0).next().unwrap().is_err());
    // View settings that would make sampling panic or produce NaNs are refused up front.
    for bad in [
        ViewConfig {
            min_ratio: 0.0,
            ..ViewConfig::imagenet(8)
        },
        ViewConfig {
            min_scale: 0.5,
            max_scale: 0.4,
            ..ViewConfig::imagenet(8)
        },
        ViewConfig {
            flip_p: 1.5,
            ..ViewConfig::imagenet(8)
        },
        ViewConfig {
            blur_sigma: (2.0, 1.0),
            ..ViewConfig::imagenet(8)
        },
        ViewConfig {
            std: [0.2, 0.0, 0.2],
            ..ViewConfig::imagenet(8)
        },
        ViewConfig {
            size: 0,
            ..ViewConfig::imagenet(8)
        },
    ] {
        let c = LoaderConfig {
            view: bad.clone(),
            ..cfg(2, 0)
        };
        assert!(
            matches!(TwoViewLoader::new(ds.clone(), c), Err(Error::Config(_))),
            "{bad:?}"
        );
    }
    assert!(ViewConfig::default().validate().is_ok());
}

#[test]
fn a_corrupt_record_surfaces_as_an_error_naming_it() {
    let dir = tmpdir("corrupt");
    let root = dir.join("folder");
    std::fs::create_dir_all(root.join("a")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for i in 0..6 {
        let px: Vec<u8> = (0..20 * 20 * 3).map(|_| rng.gen()).collect();
        std::fs::write(
            root.join(format!("a/{i}.jpg")),
            encode_jpeg(20, 20, 3, &px, 80).unwrap(),
        )
        .unwrap();
    }
    let out = dir.join("out");
    run_pack(&PackArgs::new(&root, &out)).unwrap();
    // Wreck every record's entropy-coded data after the headers.
    let shard = out.join("shard-00000.bin");
    let mut b = std::fs::read(&shard).unwrap();
    let data_start = 32 + 6 * 24;
    let n = b.len();
    for v in &mut b[data_start + 200..n] {
        *v = 0xFF;
    }
    std::fs::write(&shard, &b).unwrap();
    let ds = Arc::new(Dataset::open(&out).unwrap());
    let l = TwoViewLoader::new(ds.clone(), cfg(3, 0)).unwrap();
    let results: Vec<_> = l.epoch(0).collect();
    assert_eq!(results.len(), 1, "the epoch stops at the first error");
    match &results[0] {
        Err(Error::Format { path, msg }) => {
            assert!(path.ends_with("shard-00000.bin"));
            assert!(msg.contains("record"), "{msg}");
        }
        other => panic!("expected a format error, got {other:?}"),
    }
    assert!(eval_batches(&ds, 8, 2).next().unwrap().is_err());
}

#[test]
fn eval_batches_are_in_order_and_normalized() {
    let ds = small_dataset("eval", 23);
    let batches: Vec<_> = eval_batches(&ds, 16, 10).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[2].1.len(), 3);
    let labels: Vec<u32> = batches.iter().flat_map(|b| b.1.clone()).collect();
    assert_eq!(labels, (0..23).map(|i| ds.label(i)).collect::<Vec<_>>());
    let cfg = ViewConfig::imagenet(16);
    let per = 3 * 16 * 16;
    for i in [0, 9, 10, 22] {
        let crop = eval_crop(&ds.image(i).unwrap(), 16);
        let mut want = vec![0f32; per];
        finish_view(&crop, &ColorParams::identity(), &cfg, &mut want);
        let (x, _) = &batches[i / 10];
        assert_eq!(&x[(i % 10) * per..(i % 10 + 1) * per], &want[..]);
    }
    // A constant gray image: each channel is (v / 255 - mean) / std everywhere.
    let dir = tmpdir("const");
    write_idx(&dir.join("i.idx"), &[2, 28, 28], &[128; 2 * 784]).unwrap();
    write_idx(&dir.join("l.idx"), &[2], &[0, 1]).unwrap();
    let mut a = PackArgs::new(dir.join("i.idx"), dir.join("out"));
    a.labels = Some(dir.join("l.idx"));
    run_pack(&a).unwrap();
    let ds = Dataset::open(&dir.join("out")).unwrap();
    let (x, y) = eval_batches(&ds, 32, 4).next().unwrap().unwrap();
    assert_eq!(y, vec![0, 1]);
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    for (k, v) in x.iter().enumerate() {
        let c = (k / 1024) % 3;
        let want = (128.0 / 255.0 - mean[c]) / std[c];
        assert!((v - want).abs() < 1e-5, "{k}: {v} vs {want}");
    }
}

/// Synthetic photo-like JPEGs (smooth gradients plus noise) in an ImageFolder of 2 classes.
fn synthetic_jpeg_set(dir: &Path, n: usize, h: usize, w: usize) -> PathBuf {
    let root = dir.join("folder");
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for i in 0..n {
        let class = root.join(format!("c{}", i % 2));
        std::fs::create_dir_all(&class).unwrap();
        let (a, b): (f32, f32) = (rng.gen_range(0.2..1.0), rng.gen_range(0.2..1.0));
        let px: Vec<u8> = (0..h * w * 3)
            .map(|k| {
                let (y, x, c) = (k / (w * 3), (k / 3) % w, k % 3);
                let v = 128.0
                    + 100.0
                        * ((x as f32 * a / 17.0 + c as f32).sin() * (y as f32 * b / 23.0).cos());
                (v + rng.gen_range(-12.0..12.0)).clamp(0.0, 255.0) as u8
            })
            .collect();
        std::fs::write(
            class.join(format!("{i}.jpg")),
            encode_jpeg(h, w, 3, &px, 90).unwrap(),
        )
        .unwrap();
    }
    let out = dir.join("packed");
    run_pack(&PackArgs::new(&root, &out)).unwrap();
    out
}

#[test]
fn bench_loader_runs_on_packed_jpegs() {
    let dir = tmpdir("bench-small");
    let out = synthetic_jpeg_set(&dir, 8, 48, 64);
    let r = bench_loader(&out, 4, 32, 3, 1).unwrap();
    assert_eq!(
        (r.batch, r.size, r.batches, r.workers, r.records),
        (4, 32, 3, 1, 8)
    );
    assert!(r.images_per_sec > 0.0 && r.crop_images_per_sec > 0.0);
    assert!(r.images_per_cpu_sec > 0.0 && r.crop_images_per_cpu_sec > 0.0);
    // The per-core split: every record once, every stage timed, crops cheaper than full.
    assert_eq!(r.stages.images, 8);
    assert!(r.stages.decode_s > 0.0 && r.stages.resize_s > 0.0 && r.stages.colour_s > 0.0);
    assert!(r.stages.crops_per_core() > r.stages.full_per_core());
    assert_eq!(r.mean_pixels, 48.0 * 64.0);
    assert!(r.bytes_per_pixel > 0.05 && r.bytes_per_pixel < 3.0);
    println!("{r}");
}

/// The ImageNet-like benchmark set: ImageNet's frame sizes, natural photos, about ImageNet's
/// compressed bytes per pixel (0.4-1.0 B/px at quality 90), packed and loadable; `--max-side`
/// shrinks the frames.
#[test]
fn imagenet_like_set_has_imagenet_sizes_and_density() {
    use carp::data::benchset::make_imagenet_like;
    let dir = tmpdir("inl");
    let m = make_imagenet_like(&dir, 6, 1, None).unwrap();
    assert_eq!(m.images, 6);
    assert!(
        m.bytes_per_pixel > 0.4 && m.bytes_per_pixel < 1.0,
        "{} B/px",
        m.bytes_per_pixel
    );
    let ds = Dataset::open(&m.packed).unwrap();
    assert_eq!(ds.len(), 6);
    for i in 0..6 {
        let img = ds.image(i).unwrap();
        let sides = (img.height, img.width);
        assert!(
            [(375, 500), (500, 375), (333, 500), (512, 512)].contains(&sides),
            "{sides:?}"
        );
    }
    let small = make_imagenet_like(&tmpdir("inl-320"), 3, 1, Some(320)).unwrap();
    let ds = Dataset::open(&small.packed).unwrap();
    for i in 0..3 {
        let img = ds.image(i).unwrap();
        assert_eq!(img.height.max(img.width), 320);
    }
}

/// The number reported for this machine: `cargo test --release --test data_loader --
/// --ignored bench_loader_imagenet_like --nocapture`.
#[test]
#[ignore = "a throughput measurement (several seconds), run by hand"]
fn bench_loader_imagenet_like() {
    let dir = tmpdir("bench-big");
    let m = carp::data::benchset::make_imagenet_like(&dir, 256, 0, None).unwrap();
    for (size, batch) in [(224, 64), (32, 256)] {
        let r = bench_loader(&m.packed, batch, size, 4, 0).unwrap();
        println!("ImageNet-like JPEGs ({:.2} B/px): {r}", m.bytes_per_pixel);
    }
    let one = bench_loader(&m.packed, 64, 224, 4, 1).unwrap();
    println!("ImageNet-like JPEGs, one worker: {one}");
    let r = bench_loader(&carp::data::embedded_dir("train"), 256, 32, 20, 0).unwrap();
    println!("embedded Fashion-MNIST (PNG 28x28): {r}");
}

/// Optional multi-crop: local views of their own size and scale range, blur p 0.5, never
/// solarized, drawn after the global views (which stay as they were).
#[test]
fn local_views_follow_their_recipe_and_leave_global_views_unchanged() {
    let ds = small_dataset("locals", 40);
    let mut view = ViewConfig::imagenet(16);
    assert_eq!(view.local_size, 7); // 96/224 of 16, rounded up
    view.local_count = 3;
    let c = LoaderConfig {
        view: view.clone(),
        ..cfg(8, 2)
    };
    let l = TwoViewLoader::new(ds.clone(), c).unwrap();
    let plain = TwoViewLoader::new(ds.clone(), cfg(8, 2)).unwrap();
    let with: Vec<_> = l.epoch_multi(1, 0).map(|b| b.unwrap()).collect();
    let without: Vec<_> = plain.epoch(1).map(|b| b.unwrap()).collect();
    assert_eq!(with.len(), without.len());
    for ((g, loc), w) in with.iter().zip(&without) {
        assert_eq!(g, w, "global views unchanged by multi-crop");
        assert_eq!((loc.count, loc.batch, loc.size), (3, 8, 7));
        assert_eq!(loc.views.len(), 3 * 8 * 3 * 7 * 7);
        assert!(loc.views.iter().all(|v| v.is_finite()));
    }
    // Resuming mid-epoch gives the same remaining batches, locals included.
    let resumed: Vec<_> = l.epoch_multi(1, 2).map(|b| b.unwrap()).collect();
    assert_eq!(resumed.len(), with.len() - 2);
    for ((g, loc), (wg, wloc)) in resumed.iter().zip(&with[2..]) {
        assert_eq!((g, &loc.views), (wg, &wloc.views));
    }
    // Layout (L, B, 3, s, s): block (l, i) is image i's l-th local crop, finished.
    let crops = l.epoch_crops(1, 0).next().unwrap().unwrap();
    assert_eq!(crops.locals.len(), 8 * 3 * 7 * 7 * 3);
    let per = 3 * 7 * 7;
    let (li, bi) = (2, 5);
    let src = bi * 3 + li;
    let mut want = vec![0f32; per];
    finish_view(
        &crops.locals[src * 147..(src + 1) * 147],
        &crops.local_params[src],
        &view,
        &mut want,
    );
    let blk = li * 8 + bi;
    assert_eq!(&with[0].1.views[blk * per..(blk + 1) * per], &want[..]);
    // Rates over many draws: blur ~0.5, no solarize; area fraction within (0.05, 0.2).
    let img = carp::data::decode::Image::new(300, 300, vec![100; 300 * 300 * 3]);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (mut blur, n) = (0, 3000);
    for _ in 0..n {
        let b = carp::data::augment::random_resized_crop_box(
            &mut rng,
            300,
            300,
            (0.05, 0.2),
            (0.75, 4.0 / 3.0),
        );
        let area = (b.height * b.width) as f64 / 90000.0;
        assert!(area > 0.05 * 0.97 && area < 0.2 * 1.03, "{area}");
        let (crop, p) = sample_view(&img, &view, 2, &mut rng);
        assert_eq!(crop.len(), 7 * 7 * 3);
        assert_eq!(p.solarize, 0);
        blur += (p.blur_sigma > 0.0) as usize;
    }
    assert!(
        (blur as f64 / n as f64 - 0.5).abs() < 0.04,
        "blur rate {}",
        blur as f64 / n as f64
    );
}
