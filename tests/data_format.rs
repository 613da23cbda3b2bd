//! The shard format and `carp pack`: round trips (raw and encoded records, IDX and
//! ImageFolder sources, real photographs) and every kind of bad input, which must be an error
//! naming the file (and record), never a panic or silently wrong data.

use std::path::{Path, PathBuf};

use carp::data::decode::{decode_bytes, encode_jpeg, encode_png};
use carp::data::idx::write_idx;
use carp::data::shard::{validate, Shard, ENTRY_BYTES, HEADER_BYTES};
use carp::data::{run_pack, Dataset, PackArgs};
use carp::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fresh temporary folder under the target dir (no tempfile crate needed).
fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("carp-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Random (N, H, W) images and labels in 0..classes, written as IDX (optionally gzipped).
fn write_idx_pair(
    dir: &Path,
    n: usize,
    h: usize,
    w: usize,
    classes: u8,
    gz: bool,
) -> (PathBuf, PathBuf, Vec<u8>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let px: Vec<u8> = (0..n * h * w).map(|_| rng.gen()).collect();
    let lb: Vec<u8> = (0..n).map(|_| rng.gen_range(0..classes)).collect();
    let (ip, lp) = (dir.join("images.idx"), dir.join("labels.idx"));
    write_idx(&ip, &[n, h, w], &px).unwrap();
    write_idx(&lp, &[n], &lb).unwrap();
    if gz {
        for p in [&ip, &lp] {
            use std::io::Write;
            let raw = std::fs::read(p).unwrap();
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&raw).unwrap();
            std::fs::write(p, enc.finish().unwrap()).unwrap();
        }
    }
    (ip, lp, px, lb)
}

fn pack_idx(dir: &Path, enc: &str, gz: bool, shard_records: usize) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let (ip, lp, px, lb) = write_idx_pair(dir, 37, 9, 7, 4, gz);
    let out = dir.join("packed");
    let mut a = PackArgs::new(&ip, &out);
    a.labels = Some(lp);
    a.idx_encoding = enc.into();
    a.shard_records = shard_records;
    let rep = run_pack(&a).unwrap();
    assert_eq!(rep.records, 37);
    assert_eq!(rep.shards, 37usize.div_ceil(shard_records));
    (out, px, lb)
}

#[test]
fn idx_round_trip_raw_and_png_gz_and_plain() {
    for (enc, gz) in [("raw", false), ("png", true), ("raw", true)] {
        let dir = tmpdir(&format!("idx-{enc}-{gz}"));
        let (out, px, lb) = pack_idx(&dir, enc, gz, 10);
        let ds = Dataset::open(&out).unwrap();
        assert_eq!(ds.len(), 37);
        assert_eq!(ds.num_classes(), 4);
        assert_eq!(ds.manifest().shape, Some([9, 7, 1]));
        for i in 0..37 {
            assert_eq!(ds.label(i), lb[i] as u32);
            let img = ds.image(i).unwrap();
            assert_eq!((img.height, img.width), (9, 7));
            // Gray expanded to RGB, bit-exact (raw and PNG are lossless).
            for (k, p) in img.data.chunks(3).enumerate() {
                assert_eq!(p, [px[i * 63 + k]; 3], "{enc} record {i} pixel {k}");
            }
        }
    }
}

/// Copies fixture photos into an ImageFolder: class "cat" (chelsea), "cup" (coffee),
/// "person" (astronaut, gray camera), JPEG and PNG.
fn fixture_folder(dir: &Path) -> PathBuf {
    let root = dir.join("folder");
    for (class, files) in [
        ("cat", vec!["chelsea.jpg", "chelsea.png"]),
        ("cup", vec!["coffee.jpg", "coffee.png"]),
        (
            "person",
            vec!["astronaut.jpg", "astronaut.png", "camera_gray.png"],
        ),
    ] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for f in files {
            std::fs::copy(fixtures().join(f), root.join(class).join(f)).unwrap();
        }
    }
    // Not images: skipped.
    std::fs::write(root.join("cat").join("notes.txt"), b"hello").unwrap();
    root
}

#[test]
fn image_folder_round_trip_keeps_bytes_and_reencodes_with_max_side() {
    let dir = tmpdir("folder");
    let root = fixture_folder(&dir);
    let out = dir.join("packed");
    let mut a = PackArgs::new(&root, &out);
    a.shard_records = 3;
    let rep = run_pack(&a).unwrap();
    assert_eq!((rep.records, rep.classes, rep.shards), (7, 3, 3));
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.class_names(), ["cat", "cup", "person"]);
    assert_eq!(ds.manifest().class_counts, vec![2, 2, 3]);
    assert_eq!(ds.manifest().shape, None);
    let files = [
        "chelsea.jpg",
        "chelsea.png",
        "coffee.jpg",
        "coffee.png",
        "astronaut.jpg",
        "astronaut.png",
        "camera_gray.png",
    ];
    for (i, f) in files.iter().enumerate() {
        // Stored unchanged: the record is the file's bytes, and decodes like the file.
        let (_, bytes, _) = ds.record(i).unwrap();
        let orig = std::fs::read(fixtures().join(f)).unwrap();
        assert_eq!(bytes, &orig[..], "{f}");
        assert_eq!(ds.image(i).unwrap(), decode_bytes(&orig).unwrap(), "{f}");
        assert_eq!(ds.label(i), [0, 0, 1, 1, 2, 2, 2][i]);
    }

    // --max-side 40: longer sides become 40, JPEG re-encoded, content close to a downscale.
    let out2 = dir.join("small");
    let mut a = PackArgs::new(&root, &out2);
    a.max_side = Some(40);
    run_pack(&a).unwrap();
    let ds2 = Dataset::open(&out2).unwrap();
    for i in 0..ds2.len() {
        let img = ds2.image(i).unwrap();
        assert_eq!(img.height.max(img.width), 40, "record {i}");
        let (e, _, _) = ds2.record(i).unwrap();
        assert_eq!(e.encoding, 1);
        // The mean colour survives resizing + JPEG within a few levels.
        let orig = ds.image(i).unwrap();
        let mean = |d: &[u8]| d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
        assert!(
            (mean(&img.data) - mean(&orig.data)).abs() < 3.0,
            "record {i}"
        );
    }
}

#[test]
fn jpeg_and_png_fixtures_decode_alike() {
    for name in ["astronaut", "coffee", "chelsea"] {
        let j =
            decode_bytes(&std::fs::read(fixtures().join(format!("{name}.jpg"))).unwrap()).unwrap();
        let p =
            decode_bytes(&std::fs::read(fixtures().join(format!("{name}.png"))).unwrap()).unwrap();
        assert_eq!((j.height, j.width), (p.height, p.width));
        let mad = j
            .data
            .iter()
            .zip(&p.data)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / j.data.len() as f64;
        // Quality-90 JPEG of the same pixels: mean absolute difference of a few levels.
        assert!(mad < 6.0, "{name}: {mad}");
        assert!(mad > 0.0, "{name}: JPEG identical to PNG is suspicious");
    }
    let g = decode_bytes(&std::fs::read(fixtures().join("camera_gray.png")).unwrap()).unwrap();
    assert_eq!((g.height, g.width), (64, 64));
    assert!(g.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
}

#[test]
fn encoders_round_trip() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let px: Vec<u8> = (0..13 * 11 * 3).map(|_| rng.gen()).collect();
    let img = decode_bytes(&encode_png(13, 11, 3, &px).unwrap()).unwrap();
    assert_eq!(img.data, px);
    let smooth: Vec<u8> = (0..32 * 24 * 3).map(|i| ((i / 3) % 24 * 8) as u8).collect();
    let img = decode_bytes(&encode_jpeg(32, 24, 3, &smooth, 95).unwrap()).unwrap();
    let maxd = img
        .data
        .iter()
        .zip(&smooth)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(maxd < 24, "{maxd}");
    // A grayscale JPEG decodes to RGB with equal channels.
    let g: Vec<u8> = (0..20 * 30).map(|i| (i % 30 * 8) as u8).collect();
    let img = decode_bytes(&encode_jpeg(20, 30, 1, &g, 95).unwrap()).unwrap();
    assert_eq!((img.height, img.width), (20, 30));
    for (k, p) in img.data.chunks(3).enumerate() {
        assert!(p[0] == p[1] && p[1] == p[2]);
        assert!((p[0] as i32 - g[k] as i32).abs() < 12, "pixel {k}");
    }
}

fn expect_format(r: Result<impl std::fmt::Debug, Error>, path_part: &str, msg_part: &str) {
    match r {
        Err(Error::Format { path, msg }) => {
            assert!(
                path.to_string_lossy().contains(path_part),
                "path {path:?} lacks {path_part:?} ({msg})"
            );
            assert!(msg.contains(msg_part), "message {msg:?} lacks {msg_part:?}");
        }
        other => panic!("expected a format error with {msg_part:?}, got {other:?}"),
    }
}

#[test]
fn corrupt_shards_are_refused_with_the_file_and_record() {
    let dir = tmpdir("corrupt");
    let (out, _, _) = pack_idx(&dir, "raw", false, 100);
    let shard = out.join("shard-00000.bin");
    let good = std::fs::read(&shard).unwrap();
    let write_and_open = |bytes: &[u8]| {
        std::fs::write(&shard, bytes).unwrap();
        Dataset::open(&out)
    };
    // Wrong magic.
    let mut b = good.clone();
    b[0] = b'X';
    expect_format(write_and_open(&b), "shard-00000.bin", "magic");
    // Wrong version.
    let mut b = good.clone();
    b[8] = 2;
    expect_format(write_and_open(&b), "shard-00000.bin", "version");
    // Truncated in the header, in the index, in the data.
    expect_format(write_and_open(&good[..20]), "shard-00000.bin", "truncated");
    expect_format(write_and_open(&[]), "shard-00000.bin", "truncated");
    expect_format(
        write_and_open(&good[..HEADER_BYTES + 5 * ENTRY_BYTES]),
        "shard-00000.bin",
        "truncated",
    );
    expect_format(
        write_and_open(&good[..good.len() - 1]),
        "shard-00000.bin",
        "record 36",
    );
    // An index entry pointing past the end.
    let mut b = good.clone();
    let e5 = HEADER_BYTES + 5 * ENTRY_BYTES;
    b[e5..e5 + 8].copy_from_slice(&(good.len() as u64 - 10).to_le_bytes());
    expect_format(write_and_open(&b), "shard-00000.bin", "record 5");
    // Unknown encoding; label outside the classes.
    let mut b = good.clone();
    b[e5 + 21] = 9;
    expect_format(
        write_and_open(&b),
        "shard-00000.bin",
        "record 5: unknown encoding",
    );
    let mut b = good.clone();
    b[e5 + 12] = 200;
    expect_format(write_and_open(&b), "shard-00000.bin", "record 5: label 200");
    // The good bytes open again.
    assert_eq!(write_and_open(&good).unwrap().len(), 37);
    // A manifest that disagrees with the shards.
    let m = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    std::fs::write(
        out.join("manifest.json"),
        m.replace("\"num_records\": 37", "\"num_records\": 38"),
    )
    .unwrap();
    expect_format(Dataset::open(&out), "manifest.json", "38");
    std::fs::write(out.join("manifest.json"), "{ not json").unwrap();
    expect_format(Dataset::open(&out), "manifest.json", "bad manifest");
}

#[test]
fn undecodable_records_error_on_decode_naming_the_record() {
    let dir = tmpdir("undecodable");
    let root = fixture_folder(&dir);
    let out = dir.join("packed");
    run_pack(&PackArgs::new(&root, &out)).unwrap();
    let shard = out.join("shard-00000.bin");
    let mut b = std::fs::read(&shard).unwrap();
    // Scramble the middle of record 2 (coffee.jpg): still indexed, no longer a JPEG.
    let e2 = HEADER_BYTES + 2 * ENTRY_BYTES;
    let off = u64::from_le_bytes(b[e2..e2 + 8].try_into().unwrap()) as usize;
    for v in &mut b[off..off + 40] {
        *v = 0x55;
    }
    std::fs::write(&shard, &b).unwrap();
    let ds = Dataset::open(&out).unwrap();
    expect_format(ds.image(2), "shard-00000.bin", "record 2");
    assert!(ds.image(3).is_ok());
}

#[test]
fn bad_sources_are_refused() {
    let dir = tmpdir("badsrc");
    // A folder without class sub-folders.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("loose.jpg"), b"x").unwrap();
    expect_format(
        run_pack(&PackArgs::new(&empty, dir.join("o1"))),
        "empty",
        "no class sub-folders",
    );
    // A class folder with no images.
    let root = dir.join("classless");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    std::fs::copy(fixtures().join("coffee.jpg"), root.join("a/coffee.jpg")).unwrap();
    expect_format(
        run_pack(&PackArgs::new(&root, dir.join("o2"))),
        "classless/b",
        "no .jpg",
    );
    // An undecodable image: the error names the file.
    std::fs::write(root.join("b/broken.jpg"), [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3]).unwrap();
    expect_format(
        run_pack(&PackArgs::new(&root, dir.join("o3"))),
        "broken.jpg",
        "JPEG",
    );
    std::fs::write(root.join("b/broken.jpg"), b"plain text").unwrap();
    expect_format(
        run_pack(&PackArgs::new(&root, dir.join("o4"))),
        "broken.jpg",
        "neither",
    );
    // A label file that does not match its images.
    let (ip, _, _, _) = write_idx_pair(&dir, 10, 4, 4, 3, false);
    let lp = dir.join("short-labels.idx");
    write_idx(&lp, &[9], &[0; 9]).unwrap();
    let mut a = PackArgs::new(&ip, dir.join("o5"));
    a.labels = Some(lp.clone());
    expect_format(run_pack(&a), "short-labels.idx", "9 labels for 10 images");
    // Labels passed as images and vice versa; a truncated IDX.
    let mut a = PackArgs::new(&lp, dir.join("o6"));
    a.labels = Some(ip.clone());
    expect_format(run_pack(&a), "short-labels.idx", "images file");
    let raw = std::fs::read(&ip).unwrap();
    std::fs::write(&ip, &raw[..raw.len() - 3]).unwrap();
    let mut a = PackArgs::new(&ip, dir.join("o7"));
    a.labels = Some(lp);
    expect_format(run_pack(&a), "images.idx", "data bytes");
}

/// The record reader and the decoders survive arbitrary bytes: random buffers, and valid
/// shards / images with random bytes overwritten or cut short. Errors are fine; panics and
/// out-of-bounds reads are not.
#[test]
fn arbitrary_bytes_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let p = Path::new("fuzz.bin");
    let dir = tmpdir("fuzz");
    let (out, _, _) = pack_idx(&dir, "png", false, 100);
    let shard = std::fs::read(out.join("shard-00000.bin")).unwrap();
    let jpeg = std::fs::read(fixtures().join("chelsea.jpg")).unwrap();
    let png = std::fs::read(fixtures().join("coffee.png")).unwrap();
    let fpath = dir.join("f.bin");
    let mut ok_shards = 0;
    for it in 0..600 {
        let base: &[u8] = match it % 4 {
            0 => &shard,
            1 => &jpeg,
            2 => &png,
            _ => &[],
        };
        let mut b = if base.is_empty() {
            let n = rng.gen_range(0..400);
            (0..n).map(|_| rng.gen()).collect::<Vec<u8>>()
        } else {
            base.to_vec()
        };
        if !base.is_empty() {
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            if rng.gen_bool(0.3) {
                b.truncate(rng.gen_range(0..b.len()));
            }
        }
        let _ = decode_bytes(&b);
        if validate(p, &b).is_ok() {
            // A shard that still validates: every record must be readable, and decoding
            // it is an error or an image of the indexed size.
            std::fs::write(&fpath, &b).unwrap();
            let s = Shard::open(&fpath).unwrap();
            for r in 0..s.len() {
                let (e, bytes) = s.record(r).unwrap();
                if let Ok(img) = carp::data::decode::decode_record(&fpath, r, &e, bytes) {
                    assert_eq!(
                        (img.height, img.width),
                        (e.height as usize, e.width as usize)
                    );
                }
            }
            ok_shards += 1;
        }
    }
    assert!(
        ok_shards > 0,
        "some mutated shards (data bytes only) should still validate"
    );
}

/// `PackArgs` embeds in a clap CLI the way `carp pack` will use it.
#[test]
fn pack_args_parse_as_a_subcommand() {
    use clap::{Parser, Subcommand};
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(Subcommand)]
    enum Cmd {
        Pack(PackArgs),
    }
    let cli = Cli::try_parse_from([
        "carp",
        "pack",
        "train.idx.gz",
        "--out",
        "o",
        "--labels",
        "l.gz",
        "--max-side",
        "256",
        "--per-class",
        "5",
        "--idx-encoding",
        "png",
        "--class-names",
        "a,b,c",
    ])
    .unwrap();
    let Cmd::Pack(a) = cli.cmd;
    assert_eq!(a.src, PathBuf::from("train.idx.gz"));
    assert_eq!(a.out, PathBuf::from("o"));
    assert_eq!(a.labels, Some(PathBuf::from("l.gz")));
    assert_eq!(a.max_side, Some(256));
    assert_eq!(a.per_class, Some(5));
    assert_eq!(a.idx_encoding, "png");
    assert_eq!(a.class_names, ["a", "b", "c"]);
    assert_eq!(
        (a.quality, a.shard_records, a.no_progress),
        (90, 4096, false)
    );
    assert!(
        Cli::try_parse_from(["carp", "pack", "src"]).is_err(),
        "--out is required"
    );
}

/// The loader decodes into one reused buffer per thread: decoding photos of different sizes
/// (and a grayscale JPEG) into the same `Image` gives exactly what fresh decodes give, and a
/// corrupt file leaves an error and an empty image, not the previous one.
#[test]
fn decode_into_a_reused_buffer_matches_fresh_decodes() {
    use carp::data::decode::{decode_jpeg, decode_jpeg_into, encode_jpeg, Image};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let gray: Vec<u8> = (0..37 * 23).map(|k| (k * 7 % 251) as u8).collect();
    let files = [
        std::fs::read(dir.join("coffee.jpg")).unwrap(),
        std::fs::read(dir.join("astronaut.jpg")).unwrap(),
        encode_jpeg(37, 23, 1, &gray, 90).unwrap(),
        std::fs::read(dir.join("chelsea.jpg")).unwrap(),
    ];
    let mut img = Image::new(0, 0, Vec::new());
    for f in &files {
        decode_jpeg_into(f, &mut img).unwrap();
        let fresh = decode_jpeg(f).unwrap();
        assert_eq!(img, fresh);
        assert_eq!(img.data.len(), img.height * img.width * 3);
    }
    let mut bad = files[0].clone();
    bad.truncate(40);
    assert!(decode_jpeg_into(&bad, &mut img).is_err());
    assert_eq!((img.height, img.width, img.data.len()), (0, 0, 0));
}
