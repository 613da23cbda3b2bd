//! The embedded Fashion-MNIST subset: it opens, is balanced, decodes, and loads fast.
//! `rebuild_embedded_dataset` (ignored) is what `datasets/rebuild-fashion-mnist-small.sh`
//! runs when the `carp` binary has no `pack` subcommand.

use std::path::PathBuf;
use std::sync::Arc;

use carp::data::{
    embedded_dir, eval_batches, run_pack, Dataset, LoaderConfig, PackArgs, TwoViewLoader,
    ViewConfig,
};

const CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

#[test]
#[ignore = "rebuilds datasets/fashion-mnist-small from the Debian package; run by the script"]
fn rebuild_embedded_dataset() {
    let src = PathBuf::from(
        std::env::var("FASHION_MNIST_DIR").unwrap_or("/usr/share/datasets/fashion-mnist".into()),
    );
    for (split, prefix, per_class) in [("train", "train", 1000), ("test", "t10k", 200)] {
        let mut args = PackArgs::new(
            src.join(format!("{prefix}-images-idx3-ubyte.gz")),
            embedded_dir(split),
        );
        args.labels = Some(src.join(format!("{prefix}-labels-idx1-ubyte.gz")));
        args.per_class = Some(per_class);
        args.idx_encoding = "png".into();
        args.shard_records = 100_000;
        args.class_names = CLASSES.iter().map(|s| s.to_string()).collect();
        let rep = run_pack(&args).unwrap();
        println!("{rep}");
    }
}

#[test]
fn embedded_dataset_is_balanced_and_decodes() {
    for (split, n) in [("train", 10_000), ("test", 2_000)] {
        let ds = Dataset::open(&embedded_dir(split)).unwrap();
        assert_eq!(ds.len(), n, "{split}");
        assert_eq!(ds.num_classes(), 10);
        assert_eq!(ds.class_names()[9], "Ankle boot");
        let mut counts = [0usize; 10];
        for i in 0..ds.len() {
            counts[ds.label(i) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == n / 10), "{split}: {counts:?}");
        assert_eq!(ds.manifest().shape, Some([28, 28, 1]));
        // Every record decodes to a 28x28 gray image expanded to RGB, not all black.
        let t0 = std::time::Instant::now();
        let mut nonzero = 0;
        for i in 0..ds.len() {
            let img = ds.image(i).unwrap();
            assert_eq!((img.height, img.width), (28, 28));
            assert!(img.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
            nonzero += img.data.iter().any(|&v| v > 0) as usize;
        }
        assert_eq!(nonzero, ds.len());
        let per_img = t0.elapsed().as_secs_f64() / ds.len() as f64;
        // Loading must be fast: about 10 us per image here; the bound leaves room for a
        // loaded 2-core CI machine running other tests at the same time.
        println!("{split}: {:.1} us per image decode", per_img * 1e6);
        assert!(per_img < 1e-3, "decode takes {per_img:e} s per image");
    }
}

#[test]
fn embedded_dataset_feeds_the_loader_and_eval() {
    let ds = Arc::new(Dataset::open(&embedded_dir("test")).unwrap());
    let cfg = LoaderConfig {
        batch: 64,
        seed: 1,
        workers: 2,
        view: ViewConfig::imagenet(32),
        ..LoaderConfig::default()
    };
    let loader = TwoViewLoader::new(ds.clone(), cfg).unwrap();
    assert_eq!(loader.batches_per_epoch(), 2000 / 64);
    let b = loader.epoch(0).next().unwrap().unwrap();
    assert_eq!(b.view1.len(), 64 * 3 * 32 * 32);
    assert!(b.view1.iter().all(|v| v.is_finite()));
    let (x, y) = eval_batches(&ds, 32, 500).next().unwrap().unwrap();
    assert_eq!(x.len(), 500 * 3 * 32 * 32);
    assert_eq!(y.len(), 500);
}
