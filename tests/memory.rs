//! What the tape keeps alive, measured with the CPU tensor-storage counter
//! (`carp::tensor::cpu_storage_bytes`). The counter is process-wide, so this file holds one
//! test (an integration test binary is its own process).

use carp::autograd::Tape;
use carp::nn::params::ParamStore;
use carp::nn::resnet::{BlockKind, Recompute, ResNet, ResNetConfig, Stem};
use carp::tensor::{cpu_storage_bytes, reset_cpu_storage_peak, Tensor};
use rand::{Rng, SeedableRng};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.gen_range(-1.0..1.0)).collect(), shape).unwrap()
}

/// (bytes alive after a training forward with the tape, peak from before the forward to the
/// end of backward, bytes alive after backward with the gradients dropped), all relative to
/// before the forward.
fn forward_backward(
    net: &ResNet,
    params: &ParamStore,
    buffers: &ParamStore,
    x: &Tensor,
) -> (isize, isize, isize) {
    let live = || cpu_storage_bytes().0 as isize;
    let mut tape = Tape::new();
    let leaves = params.leaves(&mut tape).unwrap();
    let base = live();
    reset_cpu_storage_peak();
    let mut updates = Vec::new();
    let y = net
        .forward(&mut tape, &leaves, buffers, x, true, &mut updates)
        .unwrap();
    let after_forward = live() - base;
    let dy = randn(y.shape(), 9);
    let g = tape.backward_from(vec![(y, dy)]).unwrap();
    assert!(!g.is_empty());
    drop(g);
    drop(updates);
    let peak = cpu_storage_bytes().1 as isize - base;
    (after_forward, peak, live() - base)
}

/// With recomputation the tape keeps exactly the two inner BN + ReLU outputs of every
/// bottleneck less, and with conv3 recomputed conv3's outputs too (widths and strides by hand
/// from the config below); the peak drops, and after backward nothing the step made stays
/// alive at any level.
#[test]
fn recompute_drops_the_inner_bn_outputs_and_backward_frees_everything() {
    let cfg = ResNetConfig {
        layers: vec![2, 1],
        base_width: 4,
        stem: Stem::Cifar,
        block: BlockKind::Bottleneck,
    };
    let mut params = ParamStore::new();
    let mut buffers = ParamStore::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut net = ResNet::new(&cfg, &mut params, &mut buffers, &mut rng).unwrap();
    let (n, h) = (3usize, 8usize);
    let x = randn(&[n, 3, h, h], 2);

    net.set_fused_bn(true);
    let mut run = |level| {
        net.set_recompute(level);
        forward_backward(&net, &params, &buffers, &x)
    };
    let (kept, peak_kept, left_kept) = run(Recompute::Nothing);
    let (rec, peak_rec, left_rec) = run(Recompute::BnOutputs);
    let (rec3, peak_rec3, left_rec3) = run(Recompute::BnAndConv3);

    // Stage 1 (width 4, 8x8): two blocks, y1 and y2 at 8x8. Stage 2 (width 8, stride 2 in
    // conv2): y1 at 8x8, y2 at 4x4. conv3's outputs: 16 channels at 8x8 (twice), 32 at 4x4.
    let y = |c: usize, hw: usize| (n * c * hw * hw * 4) as isize;
    let inner = 2 * (y(4, 8) + y(4, 8)) + y(8, 8) + y(8, 4);
    assert_eq!(kept - rec, inner, "kept {kept} B, recomputed {rec} B");
    let conv3 = 2 * y(16, 8) + y(32, 4);
    assert_eq!(
        rec - rec3,
        conv3,
        "BN outputs recomputed {rec} B, and conv3 {rec3} B"
    );
    assert!(peak_rec3 < peak_rec, "peak {peak_rec3} vs {peak_rec}");
    assert_eq!(left_rec3, 0, "bytes left after backward (conv3 recomputed)");
    assert!(peak_rec < peak_kept, "peak {peak_rec} vs {peak_kept}");
    assert_eq!(left_kept, 0, "bytes left after backward (kept)");
    assert_eq!(left_rec, 0, "bytes left after backward (recomputed)");
}
