//! The GPU learning-quality preset `fashion-mnist-resnet18`, exercised on the CPU: its
//! configuration resolves to a ResNet18 with the CIFAR stem (torchvision's parameter count
//! less the 7x7 stem), and a few training steps of it run end to end with only the batch and
//! the step count made small, and its checkpoint exports under torchvision's names. The data is the full Fashion-MNIST where it has been packed into
//! the preset's folders (docs/data.md), else the embedded subset.

use std::path::{Path, PathBuf};
use std::process::Command;

fn carp(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("no output")).expect("last line is JSON")
}

#[test]
fn fashion_mnist_resnet18_preset_resolves_and_trains_a_few_cpu_steps() {
    let (ok, out, err) = carp(&[
        "train",
        "--preset",
        "fashion-mnist-resnet18",
        "--dry-run",
        "--json",
    ]);
    assert!(ok, "dry run failed: {err}");
    let v = last_json(&out);
    let c = &v["config"];
    assert_eq!(c["model"]["arch"], "resnet18-cifar");
    assert_eq!(c["model"]["backbone"]["block"], "basic");
    assert_eq!(c["model"]["backbone"]["stem"], "cifar");
    assert_eq!(c["image_size"], 32);
    // torchvision's resnet18: 11,689,512 parameters, less fc (512 * 1000 + 1000), with conv1
    // 3x3 instead of 7x7 (64 * 3 * (49 - 9) fewer).
    assert_eq!(
        v["params_backbone"].as_u64().unwrap(),
        11_689_512 - 513_000 - 64 * 3 * 40
    );
    let (k, nb) = (
        c["model"]["head"]["prototypes"].as_u64().unwrap(),
        c["nb"].as_u64().unwrap(),
    );
    assert_eq!(k % nb, 0, "NB {nb} must divide K {k}");
    assert!(c["blur"] == false && c["local_crops"] == 0, "{c}");

    // A few CPU steps of the preset as it is, but for the batch and the step count.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (data, eval) = if root.join("fashion-mnist/train/manifest.json").exists() {
        ("fashion-mnist/train", "fashion-mnist/test")
    } else {
        (
            "datasets/fashion-mnist-small/train",
            "datasets/fashion-mnist-small/test",
        )
    };
    let run: PathBuf = std::env::temp_dir().join(format!("carp-fmnist-r18-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let (ok, out, err) = carp(&[
        "train",
        "--preset",
        "fashion-mnist-resnet18",
        "--data",
        data,
        "--eval-data",
        eval,
        "--out",
        run.to_str().unwrap(),
        "--batch",
        "4",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-eval",
        "--json",
    ]);
    assert!(ok, "training failed: {err}");
    let v = last_json(&out);
    assert_eq!(v["steps"], 2, "{v}");
    for key in ["loss", "consistency", "entropy"] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite(), "{key} = {x} in {v}");
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["model"]["arch"], "resnet18-cifar");
    assert_eq!(saved["batch"], 4);
    // `carp export` of the run: torchvision's resnet18 names, the CIFAR stem's conv1.
    let exported = run.join("backbone.safetensors");
    let ckpt = run.join("checkpoint.safetensors");
    let (ok, _, err) = carp(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert!(ok, "export failed: {err}");
    let bytes = std::fs::read(&exported).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("conv1.weight").unwrap().shape(), &[64, 3, 3, 3]);
    assert_eq!(
        st.tensor("layer4.0.downsample.0.weight").unwrap().shape(),
        &[512, 256, 1, 1]
    );
    assert!(st.tensor("layer4.1.bn2.running_var").is_ok());
    assert!(st.names().iter().all(|n| !n.starts_with("head.")));
    let _ = std::fs::remove_dir_all(&run);
}
