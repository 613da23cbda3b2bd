//! The networks: ResNet50's and ResNet18's layout and parameter count (torchvision's numbers),
//! ResNet18's exported names against torchvision's state_dict, shapes, full-size
//! forward+backward passes, and a bottleneck and a basic block gradient-checked end to end.

use carp::autograd::Tape;
use carp::nn::params::ParamStore;
use carp::nn::resnet::{BlockKind, Recompute, ResNet, ResNetConfig, Stem};
use carp::nn::{ModelConfig, Network};
use carp::testutil::randn;

#[test]
fn resnet50_parameter_count_matches_torchvision() {
    // torchvision.models.resnet50(): 25,557,032 parameters, of which the fc layer has
    // 2048 * 1000 + 1000 = 2,049,000; the backbone CARP uses is the rest.
    let net = Network::new(&ModelConfig::resnet50(), 0).unwrap();
    let (backbone, head, protos) = net.param_counts();
    assert_eq!(backbone, 25_557_032 - 2_049_000);
    assert_eq!(backbone, 23_508_032);
    // Head: 2048*2048+2048 (fc1) + 2*2048 (bn1) + same (fc2, bn2) + 2048*256+256 (fc3).
    assert_eq!(head, 2 * (2048 * 2048 + 2048 + 2 * 2048) + 2048 * 256 + 256);
    assert_eq!(protos, 65536 * 256);
    // torchvision names, and the zero-init of each block's last BN gamma.
    for name in [
        "conv1.weight",
        "bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer4.2.conv3.weight",
        "layer3.5.bn3.weight",
    ] {
        assert!(net.params.id(name).is_some(), "missing {name}");
    }
    assert!(net.buffers.id("layer2.3.bn2.running_var").is_some());
    assert!(net.params.id("layer1.1.downsample.0.weight").is_none());
    let g = net
        .params
        .view(net.params.id("layer2.1.bn3.weight").unwrap());
    assert!(g.iter().all(|&v| v == 0.0));
    let g = net
        .params
        .view(net.params.id("layer2.1.bn2.weight").unwrap());
    assert!(g.iter().all(|&v| v == 1.0));
    // Kaiming fan-out std for conv1: sqrt(2 / (64 * 7 * 7)).
    let w = net.params.view(net.params.id("conv1.weight").unwrap());
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    let want = (2.0f32 / (64.0 * 49.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.05, "conv1 std {std} vs {want}");
}

#[test]
fn resnet50_forward_backward_batch2_224() {
    let net = Network::new(&ModelConfig::resnet50(), 1).unwrap();
    let x = randn(&[2, 3, 224, 224], 2);
    let mut tape = Tape::new();
    let leaves = net.params.leaves(&mut tape).unwrap();
    let f = net.forward(&mut tape, &leaves, &x, true).unwrap();
    assert_eq!(f.features.shape(), &[2, 2048]);
    assert_eq!(f.embedding.shape(), &[2, 256]);
    assert_eq!(f.logits.shape(), &[2, 65536]);
    // 53 BN layers in the backbone + 2 in the head.
    assert_eq!(f.bn_updates.len(), 53 + 2);
    let dlogits = randn(&[2, 65536], 3);
    let grads = tape
        .backward_from(vec![(f.logits.clone(), dlogits)])
        .unwrap();
    let mut params = net.params.clone();
    params.accumulate_grads(&leaves, &grads).unwrap();
    assert!(params.grad.iter().all(|g| g.is_finite()));
    // The stem conv receives a gradient through the whole network.
    let g = params.grad_view(params.id("conv1.weight").unwrap());
    assert!(g.iter().any(|&v| v != 0.0));
}

#[test]
fn tiny_variant_shapes() {
    let cfg = ModelConfig::tiny();
    let net = Network::new(&cfg, 0).unwrap();
    let x = randn(&[4, 3, 32, 32], 5);
    let mut tape = Tape::no_grad();
    let leaves = net.params.leaves(&mut tape).unwrap();
    let f = net.forward(&mut tape, &leaves, &x, true).unwrap();
    assert_eq!(f.features.shape(), &[4, cfg.backbone.feature_dim()]);
    assert_eq!(f.logits.shape(), &[4, cfg.head.prototypes]);
    assert!(tape.is_empty(), "a no-grad forward recorded nodes");
}

/// One torchvision bottleneck with a projection shortcut (stride 2), BN in training mode, its
/// gamma of bn3 made non-zero so every branch contributes, gradient-checked against finite
/// differences for the input and every parameter.
#[test]
fn bottleneck_block_gradient_check() {
    let cfg = ResNetConfig {
        layers: vec![1, 1],
        base_width: 2,
        stem: Stem::Cifar,
        block: BlockKind::Bottleneck,
    };
    let mut params = ParamStore::new();
    let mut buffers = ParamStore::new();
    let mut rng = carp::testutil::rng(4);
    let net = ResNet::new(&cfg, &mut params, &mut buffers, &mut rng).unwrap();
    // Random BN affine parameters (the zero-init gamma would hide the residual branch).
    let noise = carp::testutil::randn_vec(params.numel(), 6);
    for e in params.entries.clone() {
        if e.is_1d() {
            for i in e.range() {
                params.data[i] = 1.0 + 0.3 * noise[i];
            }
        }
    }
    let x = randn(&[3, 3, 5, 5], 7);
    let mut inputs = vec![x];
    for i in 0..params.len() {
        inputs.push(params.tensor(carp::nn::params::ParamId(i)).unwrap());
    }
    let buffers2 = buffers.clone();
    // Relative error bound 1e-2 (norm-wise, per tensor): the whole block (4 convs, 4 batch norms
    // in training mode, the residual add and ReLUs) differentiated in f32 with central
    // differences of step 1e-3. Elements sitting on a ReLU kink (the two step sizes disagree)
    // are left out, at most 5% of all elements. A wrong backward anywhere gives errors of order 1.
    carp::testutil::check_grad_kinks(&inputs, 1e-2, 1e-3, 0.05, |tape, xs| {
        let leaves = carp::nn::params::ParamLeaves(xs[1..].to_vec());
        let mut updates = Vec::new();
        net.forward(tape, &leaves, &buffers2, &xs[0], true, &mut updates)
    })
    .unwrap();
}

/// torchvision's `resnet18().state_dict()`: names and shapes, in registration order, written
/// out by hand from torchvision/models/resnet.py (`ResNet.__init__`: conv1 7x7/2, bn1, layer1..4
/// from `_make_layer(BasicBlock, 64 << i, 2, stride=1 or 2)`, fc; `BasicBlock.__init__`:
/// conv1 = conv3x3(inplanes, planes, stride), bn1, conv2 = conv3x3(planes, planes), bn2;
/// `_make_layer` adds downsample = (conv1x1(inplanes, planes, stride), BatchNorm2d) when
/// stride != 1 or inplanes != planes, i.e. in layer2.0, layer3.0, layer4.0). Every BatchNorm2d
/// has weight, bias, running_mean, running_var and a scalar num_batches_tracked.
const TORCHVISION_RESNET18: &[(&str, &[usize])] = &[
    ("conv1.weight", &[64, 3, 7, 7]),
    ("bn1.weight", &[64]),
    ("bn1.bias", &[64]),
    ("bn1.running_mean", &[64]),
    ("bn1.running_var", &[64]),
    ("bn1.num_batches_tracked", &[]),
    ("layer1.0.conv1.weight", &[64, 64, 3, 3]),
    ("layer1.0.bn1.weight", &[64]),
    ("layer1.0.bn1.bias", &[64]),
    ("layer1.0.bn1.running_mean", &[64]),
    ("layer1.0.bn1.running_var", &[64]),
    ("layer1.0.bn1.num_batches_tracked", &[]),
    ("layer1.0.conv2.weight", &[64, 64, 3, 3]),
    ("layer1.0.bn2.weight", &[64]),
    ("layer1.0.bn2.bias", &[64]),
    ("layer1.0.bn2.running_mean", &[64]),
    ("layer1.0.bn2.running_var", &[64]),
    ("layer1.0.bn2.num_batches_tracked", &[]),
    ("layer1.1.conv1.weight", &[64, 64, 3, 3]),
    ("layer1.1.bn1.weight", &[64]),
    ("layer1.1.bn1.bias", &[64]),
    ("layer1.1.bn1.running_mean", &[64]),
    ("layer1.1.bn1.running_var", &[64]),
    ("layer1.1.bn1.num_batches_tracked", &[]),
    ("layer1.1.conv2.weight", &[64, 64, 3, 3]),
    ("layer1.1.bn2.weight", &[64]),
    ("layer1.1.bn2.bias", &[64]),
    ("layer1.1.bn2.running_mean", &[64]),
    ("layer1.1.bn2.running_var", &[64]),
    ("layer1.1.bn2.num_batches_tracked", &[]),
    ("layer2.0.conv1.weight", &[128, 64, 3, 3]),
    ("layer2.0.bn1.weight", &[128]),
    ("layer2.0.bn1.bias", &[128]),
    ("layer2.0.bn1.running_mean", &[128]),
    ("layer2.0.bn1.running_var", &[128]),
    ("layer2.0.bn1.num_batches_tracked", &[]),
    ("layer2.0.conv2.weight", &[128, 128, 3, 3]),
    ("layer2.0.bn2.weight", &[128]),
    ("layer2.0.bn2.bias", &[128]),
    ("layer2.0.bn2.running_mean", &[128]),
    ("layer2.0.bn2.running_var", &[128]),
    ("layer2.0.bn2.num_batches_tracked", &[]),
    ("layer2.0.downsample.0.weight", &[128, 64, 1, 1]),
    ("layer2.0.downsample.1.weight", &[128]),
    ("layer2.0.downsample.1.bias", &[128]),
    ("layer2.0.downsample.1.running_mean", &[128]),
    ("layer2.0.downsample.1.running_var", &[128]),
    ("layer2.0.downsample.1.num_batches_tracked", &[]),
    ("layer2.1.conv1.weight", &[128, 128, 3, 3]),
    ("layer2.1.bn1.weight", &[128]),
    ("layer2.1.bn1.bias", &[128]),
    ("layer2.1.bn1.running_mean", &[128]),
    ("layer2.1.bn1.running_var", &[128]),
    ("layer2.1.bn1.num_batches_tracked", &[]),
    ("layer2.1.conv2.weight", &[128, 128, 3, 3]),
    ("layer2.1.bn2.weight", &[128]),
    ("layer2.1.bn2.bias", &[128]),
    ("layer2.1.bn2.running_mean", &[128]),
    ("layer2.1.bn2.running_var", &[128]),
    ("layer2.1.bn2.num_batches_tracked", &[]),
    ("layer3.0.conv1.weight", &[256, 128, 3, 3]),
    ("layer3.0.bn1.weight", &[256]),
    ("layer3.0.bn1.bias", &[256]),
    ("layer3.0.bn1.running_mean", &[256]),
    ("layer3.0.bn1.running_var", &[256]),
    ("layer3.0.bn1.num_batches_tracked", &[]),
    ("layer3.0.conv2.weight", &[256, 256, 3, 3]),
    ("layer3.0.bn2.weight", &[256]),
    ("layer3.0.bn2.bias", &[256]),
    ("layer3.0.bn2.running_mean", &[256]),
    ("layer3.0.bn2.running_var", &[256]),
    ("layer3.0.bn2.num_batches_tracked", &[]),
    ("layer3.0.downsample.0.weight", &[256, 128, 1, 1]),
    ("layer3.0.downsample.1.weight", &[256]),
    ("layer3.0.downsample.1.bias", &[256]),
    ("layer3.0.downsample.1.running_mean", &[256]),
    ("layer3.0.downsample.1.running_var", &[256]),
    ("layer3.0.downsample.1.num_batches_tracked", &[]),
    ("layer3.1.conv1.weight", &[256, 256, 3, 3]),
    ("layer3.1.bn1.weight", &[256]),
    ("layer3.1.bn1.bias", &[256]),
    ("layer3.1.bn1.running_mean", &[256]),
    ("layer3.1.bn1.running_var", &[256]),
    ("layer3.1.bn1.num_batches_tracked", &[]),
    ("layer3.1.conv2.weight", &[256, 256, 3, 3]),
    ("layer3.1.bn2.weight", &[256]),
    ("layer3.1.bn2.bias", &[256]),
    ("layer3.1.bn2.running_mean", &[256]),
    ("layer3.1.bn2.running_var", &[256]),
    ("layer3.1.bn2.num_batches_tracked", &[]),
    ("layer4.0.conv1.weight", &[512, 256, 3, 3]),
    ("layer4.0.bn1.weight", &[512]),
    ("layer4.0.bn1.bias", &[512]),
    ("layer4.0.bn1.running_mean", &[512]),
    ("layer4.0.bn1.running_var", &[512]),
    ("layer4.0.bn1.num_batches_tracked", &[]),
    ("layer4.0.conv2.weight", &[512, 512, 3, 3]),
    ("layer4.0.bn2.weight", &[512]),
    ("layer4.0.bn2.bias", &[512]),
    ("layer4.0.bn2.running_mean", &[512]),
    ("layer4.0.bn2.running_var", &[512]),
    ("layer4.0.bn2.num_batches_tracked", &[]),
    ("layer4.0.downsample.0.weight", &[512, 256, 1, 1]),
    ("layer4.0.downsample.1.weight", &[512]),
    ("layer4.0.downsample.1.bias", &[512]),
    ("layer4.0.downsample.1.running_mean", &[512]),
    ("layer4.0.downsample.1.running_var", &[512]),
    ("layer4.0.downsample.1.num_batches_tracked", &[]),
    ("layer4.1.conv1.weight", &[512, 512, 3, 3]),
    ("layer4.1.bn1.weight", &[512]),
    ("layer4.1.bn1.bias", &[512]),
    ("layer4.1.bn1.running_mean", &[512]),
    ("layer4.1.bn1.running_var", &[512]),
    ("layer4.1.bn1.num_batches_tracked", &[]),
    ("layer4.1.conv2.weight", &[512, 512, 3, 3]),
    ("layer4.1.bn2.weight", &[512]),
    ("layer4.1.bn2.bias", &[512]),
    ("layer4.1.bn2.running_mean", &[512]),
    ("layer4.1.bn2.running_var", &[512]),
    ("layer4.1.bn2.num_batches_tracked", &[]),
    ("fc.weight", &[1000, 512]),
    ("fc.bias", &[1000]),
];

/// The exported names and shapes are torchvision's resnet18 state_dict exactly, less `fc.*`
/// (CARP has no classifier) and `num_batches_tracked` (what `load_state_dict(strict=False)`
/// tolerates, as for ResNet50); the CIFAR variant differs only in conv1's 3x3 kernel.
#[test]
fn resnet18_export_has_torchvision_state_dict_names_and_shapes() {
    assert_eq!(TORCHVISION_RESNET18.len(), 122);
    let dir = std::env::temp_dir().join(format!("carp-model-r18-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (arch, stem_k) in [("resnet18", 7), ("resnet18-cifar", 3)] {
        let net = Network::new(&ModelConfig::named(arch).unwrap(), 0).unwrap();
        let path = dir.join(format!("{arch}.safetensors"));
        carp::train::checkpoint::export_backbone(&net, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut got: Vec<(String, Vec<usize>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect();
        got.sort();
        let mut want: Vec<(String, Vec<usize>)> = TORCHVISION_RESNET18
            .iter()
            .filter(|(n, _)| !n.starts_with("fc.") && !n.ends_with(".num_batches_tracked"))
            .map(|(n, s)| {
                let mut s = s.to_vec();
                if *n == "conv1.weight" {
                    s = vec![64, 3, stem_k, stem_k];
                }
                (n.to_string(), s)
            })
            .collect();
        want.sort();
        assert_eq!(got.len(), 100, "{arch}: 20 convs + 20 BNs x 4");
        assert_eq!(got, want, "{arch}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resnet18_parameter_count_matches_torchvision() {
    // torchvision.models.resnet18(): 11,689,512 parameters, of which fc has 512 * 1000 + 1000.
    let net = Network::new(&ModelConfig::resnet18(), 0).unwrap();
    let (backbone, _, _) = net.param_counts();
    assert_eq!(backbone, 11_689_512 - 513_000);
    let from_table: usize = TORCHVISION_RESNET18
        .iter()
        .filter(|(n, _)| !n.starts_with("fc.") && !n.contains("running_") && !n.contains("num_"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(backbone, from_table);
    // The CIFAR stem: conv1 3x3 instead of 7x7.
    let net = Network::new(&ModelConfig::resnet18_cifar(), 0).unwrap();
    assert_eq!(net.param_counts().0, from_table - 64 * 3 * (49 - 9));
    // Zero-init residual (torchvision's zero_init_residual for a BasicBlock: bn2), the other
    // BN gammas 1.
    let v = |n: &str| net.params.view(net.params.id(n).unwrap()).to_vec();
    assert!(v("layer3.1.bn2.weight").iter().all(|&g| g == 0.0));
    assert!(v("layer3.1.bn1.weight").iter().all(|&g| g == 1.0));
    assert!(v("layer2.0.downsample.1.weight").iter().all(|&g| g == 1.0));
    // The blocks' names (their NVTX ranges) are the torchvision module names.
    let want: Vec<String> = (1..=4)
        .flat_map(|l| (0..2).map(move |b| format!("layer{l}.{b}")))
        .collect();
    assert_eq!(net.backbone.block_names(), want);
    let r50 = Network::new(&ModelConfig::resnet50(), 0).unwrap();
    let names = r50.backbone.block_names();
    assert_eq!(names.len(), 16);
    assert_eq!(
        (names[0], names[9], names[15]),
        ("layer1.0", "layer3.2", "layer4.2")
    );
}

#[test]
fn resnet18_forward_backward_batch2() {
    for (cfg, side) in [
        (ModelConfig::resnet18_cifar(), 32),
        (ModelConfig::resnet18(), 64),
    ] {
        let net = Network::new(&cfg, 1).unwrap();
        let x = randn(&[2, 3, side, side], 2);
        let mut tape = Tape::new();
        let leaves = net.params.leaves(&mut tape).unwrap();
        let f = net.forward(&mut tape, &leaves, &x, true).unwrap();
        assert_eq!(f.features.shape(), &[2, 512], "{}", cfg.arch);
        assert_eq!(f.logits.shape(), &[2, cfg.head.prototypes]);
        // 20 BN layers in the backbone (stem, 2 per block, 3 downsamples) + 2 in the head.
        assert_eq!(f.bn_updates.len(), 20 + 2);
        let dlogits = randn(&[2, cfg.head.prototypes], 3);
        let grads = tape
            .backward_from(vec![(f.logits.clone(), dlogits)])
            .unwrap();
        let mut params = net.params.clone();
        params.accumulate_grads(&leaves, &grads).unwrap();
        assert!(params.grad.iter().all(|g| g.is_finite()));
        let g = params.grad_view(params.id("conv1.weight").unwrap());
        assert!(
            g.iter().any(|&v| v != 0.0),
            "{}: no stem gradient",
            cfg.arch
        );
    }
}

/// Two basic blocks (torchvision's BasicBlock): an identity shortcut (stage 1 keeps the width)
/// and a projection with stride 2, BN in training mode, the zero-init bn2 gamma made non-zero,
/// gradient-checked against finite differences for the input and every parameter, with the
/// fused BN ops (and the recomputed bn1 output) and with the unfused composition.
#[test]
fn basic_block_gradient_check() {
    let cfg = ResNetConfig {
        layers: vec![1, 1],
        base_width: 2,
        stem: Stem::Cifar,
        block: BlockKind::Basic,
    };
    let mut params = ParamStore::new();
    let mut buffers = ParamStore::new();
    let mut rng = carp::testutil::rng(8);
    let mut net = ResNet::new(&cfg, &mut params, &mut buffers, &mut rng).unwrap();
    assert!(params.id("layer1.0.downsample.0.weight").is_none());
    assert!(params.id("layer2.0.downsample.0.weight").is_some());
    let noise = carp::testutil::randn_vec(params.numel(), 9);
    for e in params.entries.clone() {
        if e.is_1d() {
            for i in e.range() {
                params.data[i] = 1.0 + 0.3 * noise[i];
            }
        }
    }
    let x = randn(&[4, 3, 6, 6], 11);
    let mut inputs = vec![x];
    for i in 0..params.len() {
        inputs.push(params.tensor(carp::nn::params::ParamId(i)).unwrap());
    }
    // The bound of the bottleneck's check (1e-2 norm-wise per tensor, central differences of
    // step 1e-3 in f32, at most 5% of elements on a ReLU kink left out); a wrong backward gives
    // errors of order 1. Like the bottleneck's check it holds for these seeds, not for every
    // draw: for others, undetected kink crossings of the stem weights (which move every
    // pre-activation) and train-mode BN curvature put the f32 differences 1-3% off, shrinking
    // with the step. The fused and unfused paths agree to 1e-5 for any draw (the unit tests
    // in src/nn/resnet.rs).
    for fused in [true, false] {
        net.set_fused_bn(fused);
        net.set_recompute(Recompute::BnAndConv3);
        carp::testutil::check_grad_kinks(&inputs, 1e-2, 1e-3, 0.05, |tape, xs| {
            let leaves = carp::nn::params::ParamLeaves(xs[1..].to_vec());
            let mut updates = Vec::new();
            net.forward(tape, &leaves, &buffers, &xs[0], true, &mut updates)
        })
        .unwrap_or_else(|e| panic!("fused={fused}: {e}"));
    }
}
