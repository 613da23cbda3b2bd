//! The networks: ResNet50's layout and parameter count (torchvision's numbers), shapes, a
//! full-size forward+backward, and a bottleneck block gradient-checked end to end.

use carp::autograd::Tape;
use carp::nn::params::ParamStore;
use carp::nn::resnet::{ResNet, ResNetConfig, Stem};
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
