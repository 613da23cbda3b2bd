//! GPU tests of what runs across ops, against the same on the CPU (the CPU ops are the
//! reference, tested against naive f64 implementations and finite differences in their own
//! files): the fused BN/activation ops, the recompute ops at a GPU-only layout, bf16 against
//! its CPU emulation, and full CARP training steps of a small model on both devices: loss,
//! every parameter gradient, the LARS update, the EMA and the BN running statistics, with the
//! device-resident state's NaN guard, checkpoints and resume. The single ops (add, ReLU, GELU,
//! conv2d, pools, batch norm, matmul / linear / wn_linear, sums) are tested on every device
//! from one body next to their CPU kernels (`test_device!` in `src/ops/<op>.rs`, through
//! `testutil::check_tape_op`).
//!
//! Tolerances (max |gpu - cpu| / max |cpu|, per tensor): 1e-6 for elementwise ops, 1e-4 for
//! reductions, GEMMs and convolutions in f32 (different summation orders; cuDNN/cuBLAS run
//! without TF32), 2e-3 for the whole training step (about 20 layers of f32 reassociation,
//! training-mode BN on 16 samples).
//!
//! Every device buffer is NaN-filled when allocated (`set_poison_allocations`), so an output
//! element an op leaves unwritten fails the comparison.
//!
//! Without a GPU (or driver, or the `cuda` feature) every GPU test prints
//! "SKIPPED: <test>: <reason>" to the process's stderr (visible in `cargo test` output) and
//! returns.

use std::rc::Rc;

use carp::autograd::{Precision, Tape};
use carp::tensor::{DType, Device, Layout, Tensor};
use carp::testutil::{gpu_for_test, randn_vec};

/// Runs everywhere: the device parser and the error for CUDA without the feature.
#[test]
fn device_parse() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert!(Device::parse("tpu").is_err());
    assert!(Device::parse("cuda:x").is_err());
    let auto = Device::parse("auto").unwrap();
    if cfg!(feature = "cuda") {
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
    } else {
        let e = Device::parse("cuda").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert_eq!(auto, Device::Cpu);
        assert!(Tensor::zeros(&[2], &Device::Cuda(0)).is_err());
        assert!(Tensor::from_vec(vec![1.0], &[1])
            .unwrap()
            .to_device(&Device::Cuda(0))
            .is_err());
    }
    // to_device onto the CPU of a CPU tensor is the same tensor.
    let t = Tensor::from_vec(vec![1.0, 2.0], &[2]).unwrap();
    assert_eq!(t.to_device(&Device::Cpu).unwrap().id(), t.id());
}

/// Sets the layout of bf16 GPU activations from now on.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn set_nhwc(nhwc: bool) {
    carp::options::update(|o| {
        o.bf16_layout = if nhwc {
            carp::options::Bf16Layout::Nhwc
        } else {
            carp::options::Bf16Layout::Nchw
        }
    });
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(randn_vec(shape.iter().product(), seed), shape).unwrap()
}

/// max |got - want| / max(|want|_inf, floor); fails on non-finite values.
fn check_close(name: &str, got: &[f32], want: &[f32], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{name}: element {i} is {}", got[i]);
    }
    let scale = want.iter().fold(floor, |m, &v| m.max(v.abs() as f64));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w as f64).abs();
        if d > worst {
            worst = d;
            at = i;
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= tol,
        "{name}: relative error {rel:.3e} > {tol:.1e} (element {at}: gpu {} vs cpu {})",
        got[at],
        want[at]
    );
}

type Op = dyn Fn(&mut Tape, &[Tensor]) -> carp::Result<Vec<Tensor>>;

/// Runs `f` on `inputs` (all tracked) on `device`, seeds the first output with `seed` and
/// returns (outputs on the host, each input's gradient on the host).
fn run_on(
    device: &Device,
    inputs: &[Tensor],
    seed: &Tensor,
    f: &Op,
) -> (Vec<Vec<f32>>, Vec<Option<Vec<f32>>>) {
    run_on_in(device, inputs, seed, f, Precision::F32)
}

/// [`run_on`] on a tape of the given precision.
fn run_on_in(
    device: &Device,
    inputs: &[Tensor],
    seed: &Tensor,
    f: &Op,
    precision: Precision,
) -> (Vec<Vec<f32>>, Vec<Option<Vec<f32>>>) {
    let mut tape = Tape::new().with_precision(precision);
    let xs: Vec<Tensor> = inputs
        .iter()
        .map(|t| tape.track(&t.to_device(device).unwrap()))
        .collect();
    let outs = f(&mut tape, &xs).unwrap();
    for o in &outs {
        assert_eq!(o.device(), *device, "an output left the inputs' device");
    }
    let host: Vec<Vec<f32>> = outs.iter().map(|o| o.to_vec().unwrap()).collect();
    let seed = seed.to_device(device).unwrap();
    let grads = tape.backward_from(vec![(outs[0].clone(), seed)]).unwrap();
    let g = xs
        .iter()
        .map(|x| {
            grads.get(x).map(|g| {
                assert_eq!(g.device(), *device, "a gradient left the inputs' device");
                g.to_vec().unwrap()
            })
        })
        .collect();
    (host, g)
}

/// The op on CUDA against the op on CPU: every output (forward) and every input gradient
/// (backward from a random output gradient), within `tol_fwd` / `tol_bwd`.
fn compare(dev: &Device, name: &str, inputs: &[Tensor], tol_fwd: f64, tol_bwd: f64, f: &Op) {
    // The output shape first, for the seed.
    let mut probe = Tape::no_grad();
    let shape = f(&mut probe, inputs).unwrap()[0].shape().to_vec();
    let seed = randn(&shape, 4242);
    let (y_cpu, g_cpu) = run_on(&Device::Cpu, inputs, &seed, f);
    let (y_gpu, g_gpu) = run_on(dev, inputs, &seed, f);
    for (i, (g, c)) in y_gpu.iter().zip(&y_cpu).enumerate() {
        check_close(&format!("{name} output {i}"), g, c, tol_fwd, 1e-6);
    }
    for (i, (g, c)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        match (g, c) {
            (Some(g), Some(c)) => check_close(&format!("{name} d input {i}"), g, c, tol_bwd, 1e-6),
            (None, None) => {}
            _ => panic!("{name}: input {i} has a gradient on one device only"),
        }
    }
}

#[test]
fn device_errors_and_transfers() {
    let Some((dev, _serial)) = gpu_for_test("device_errors_and_transfers") else {
        return;
    };
    let a = randn(&[3, 4], 600);
    let g = a.to_device(&dev).unwrap();
    assert_eq!(g.device(), dev);
    assert_eq!(
        g.to_vec().unwrap(),
        a.to_vec().unwrap(),
        "upload/download round trip"
    );
    assert!(g.cpu().is_err(), "cpu() of a GPU tensor must be an error");
    assert_eq!(
        g.to_device(&Device::Cpu).unwrap().cpu().unwrap(),
        a.cpu().unwrap()
    );
    let z = Tensor::full(2.5, &[5, 3], &dev).unwrap();
    assert_eq!(z.to_vec().unwrap(), vec![2.5; 15]);
    assert_eq!(
        Tensor::zeros(&[7], &dev).unwrap().to_vec().unwrap(),
        vec![0.0; 7]
    );
    let mut tape = Tape::new();
    let e = tape.add(&a, &g).unwrap_err().to_string();
    assert!(e.contains("different devices"), "{e}");
    let w = randn(&[4, 4], 601);
    let e = tape.matmul(&g, &w).unwrap_err().to_string();
    assert!(
        e.contains("matmul") && e.contains("different devices"),
        "{e}"
    );
}

/// A full CARP step of a small model on the GPU against the same step on the CPU.
#[test]
fn training_step_matches_cpu() {
    training_step_matches_cpu_with(
        carp::nn::resnet::BlockKind::Bottleneck,
        "training_step_matches_cpu",
    );
}

/// The same with basic blocks (ResNet18's), which use the bottleneck's tape ops.
#[test]
fn basic_block_training_step_matches_cpu() {
    training_step_matches_cpu_with(
        carp::nn::resnet::BlockKind::Basic,
        "basic_block_training_step_matches_cpu",
    );
}

fn training_step_matches_cpu_with(block: carp::nn::resnet::BlockKind, test: &str) {
    use carp::nn::head::HeadConfig;
    use carp::nn::resnet::{ResNetConfig, Stem};
    use carp::nn::ModelConfig;
    use carp::train::step::CarpState;

    let Some((dev, _serial)) = gpu_for_test(test) else {
        return;
    };
    let cfg = ModelConfig {
        arch: "small".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1],
            base_width: 4,
            stem: Stem::Cifar,
            block,
        },
        head: HeadConfig {
            hidden: 32,
            out: 16,
            prototypes: 64,
        },
    };
    let (batch, image, nb) = (8usize, 16usize, 16usize);
    let mut cpu = CarpState::new(&cfg, nb, 1e-4, 7).unwrap();
    // Random BN affine parameters: the zero-init gamma of bn3 (a basic block's bn2) would zero
    // every residual branch's gradient and hide most of the network from the comparison.
    let noise = randn_vec(cpu.student.params.numel(), 8);
    for e in cpu.student.params.entries.clone() {
        if e.is_1d() {
            for i in e.range() {
                cpu.student.params.data[i] = 1.0 + 0.3 * noise[i];
            }
        }
    }
    cpu.teacher = cpu.student.clone();
    // One step first with different teacher weights, so the EMA is not a no-op.
    for v in cpu.teacher.params.data.iter_mut() {
        *v *= 0.9;
    }
    let mut gpu = cpu.try_clone().unwrap();
    let v1 = randn(&[batch, 3, image, image], 9);
    let v2 = randn(&[batch, 3, image, image], 10);
    let (lr, m) = (0.5, 0.99);
    let before = cpu.student.params.data.clone();
    let sc = cpu.train_step(&v1, &v2, lr, m).unwrap();
    let sg = gpu
        .train_step(
            &v1.to_device(&dev).unwrap(),
            &v2.to_device(&dev).unwrap(),
            lr,
            m,
        )
        .unwrap();
    // The step ran on the device-resident state: bring it home.
    gpu.move_to_host().unwrap();
    for (name, g, c) in [
        ("loss", sg.loss, sc.loss),
        ("consistency", sg.consistency, sc.consistency),
        ("entropy", sg.entropy, sc.entropy),
    ] {
        assert!(
            (g as f64 - c as f64).abs() <= 1e-4 * (c.abs() as f64).max(1.0),
            "{name}: gpu {g} vs cpu {c}"
        );
    }
    // Every parameter's gradient, per entry, against the entry's own scale (floored by 1e-3 of
    // the largest gradient, so entries whose gradient is ~0 are not compared to noise).
    let gmax = cpu
        .student
        .params
        .grad
        .iter()
        .fold(0.0f64, |a, &v| a.max(v.abs() as f64));
    assert!(gmax > 0.0, "the CPU step produced all-zero gradients");
    let (pc, pg) = (&cpu.student.params, &gpu.student.params);
    // The LARS updates likewise, floored by 1e-3 of the largest update (a bias followed by a
    // BN has a ~0 gradient and a ~1e-9 update, pure rounding on both devices).
    let umax = pc
        .data
        .iter()
        .zip(&before)
        .fold(0.0f64, |a, (&w, &b)| a.max((w - b).abs() as f64));
    assert!(umax > 0.0, "the CPU step changed no weight");
    for e in &pc.entries {
        check_close(
            &format!("grad {}", e.name),
            &pg.grad[e.range()],
            &pc.grad[e.range()],
            2e-3,
            1e-3 * gmax,
        );
        // The LARS update (new - old weights).
        let dc: Vec<f32> = e.range().map(|i| pc.data[i] - before[i]).collect();
        let dg: Vec<f32> = e.range().map(|i| pg.data[i] - before[i]).collect();
        check_close(
            &format!("LARS update {}", e.name),
            &dg,
            &dc,
            2e-3,
            1e-3 * umax,
        );
    }
    check_close(
        "EMA teacher",
        &gpu.teacher.params.data,
        &cpu.teacher.params.data,
        1e-5,
        1e-6,
    );
    check_close(
        "BN running statistics (student)",
        &gpu.student.buffers.data,
        &cpu.student.buffers.data,
        1e-4,
        1e-6,
    );
    check_close(
        "BN running statistics (teacher)",
        &gpu.teacher.buffers.data,
        &cpu.teacher.buffers.data,
        1e-4,
        1e-6,
    );

    // Steady state: with static shapes, a step after the first ones allocates nothing from the
    // driver (every buffer comes from the pool's free lists).
    #[cfg(feature = "cuda")]
    {
        let be = carp::device::cuda::backend(0).unwrap();
        let step = |st: &mut CarpState| {
            st.train_step(
                &v1.to_device(&dev).unwrap(),
                &v2.to_device(&dev).unwrap(),
                lr,
                m,
            )
            .unwrap();
        };
        step(&mut gpu);
        let before = be.pool_stats();
        step(&mut gpu);
        let after = be.pool_stats();
        assert_eq!(
            after.device_allocs, before.device_allocs,
            "a steady-state step called cuMemAlloc: {before:?} -> {after:?}"
        );
        assert!(after.reuses > before.reuses);
    }
}

// ------------------------------------------------------------------ bf16 on the GPU

/// The op on CUDA in bf16 against the CPU's bf16 emulation (the numerical definition): every
/// output and every input gradient. Both round to bf16 at the same points; they differ only in
/// f32 summation order, which can move a value across a bf16 rounding boundary (one bf16 step,
/// 2^-8 of the value), and, for convolutions, in cuDNN returning the weight gradient in bf16
/// where the emulation keeps it f32 (again 2^-8). Hence the tolerances: `tol_fwd` ~1e-2 of the
/// output's scale, `tol_bwd` a few times that where BN's backward cancels (it amplifies the
/// rounding of its inputs).
fn compare_bf16(dev: &Device, name: &str, inputs: &[Tensor], tol_fwd: f64, tol_bwd: f64, f: &Op) {
    let mut probe = Tape::no_grad();
    let shape = f(&mut probe, inputs).unwrap()[0].shape().to_vec();
    let seed = randn(&shape, 4343);
    let (y_cpu, g_cpu) = run_on_in(&Device::Cpu, inputs, &seed, f, Precision::Bf16);
    let (y_gpu, g_gpu) = run_on_in(dev, inputs, &seed, f, Precision::Bf16);
    for (i, (g, c)) in y_gpu.iter().zip(&y_cpu).enumerate() {
        assert!(
            g.iter().all(|&v| v == carp::tensor::round_bf16(v)),
            "{name} output {i}: the GPU output holds values that are not bf16"
        );
        check_close(&format!("{name} bf16 output {i}"), g, c, tol_fwd, 1e-6);
    }
    for (i, (g, c)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        match (g, c) {
            (Some(g), Some(c)) => {
                check_close(&format!("{name} bf16 d input {i}"), g, c, tol_bwd, 1e-6)
            }
            (None, None) => {}
            _ => panic!("{name}: input {i} has a gradient on one device only"),
        }
    }
}

/// bf16 tapes on the GPU: the ops with bf16 kernels (convolution, max and average pooling, BN,
/// the fused BN + ReLU (+ add), add) store bf16, the others (matmul, linear, GELU, ReLU, the
/// weight-normalized linear) run in f32 on bf16 values, and every one matches the CPU
/// emulation of bf16; with the activations channels-last (NHWC, the default) and NCHW.
#[test]
fn bf16_ops_match_the_cpu_emulation() {
    let Some((dev, _serial)) = gpu_for_test("bf16_ops_match_the_cpu_emulation") else {
        return;
    };
    for nhwc in [true, false] {
        set_nhwc(nhwc);
        bf16_ops_in_one_layout(&dev, nhwc);
    }
    set_nhwc(true);
}

fn bf16_ops_in_one_layout(dev: &Device, nhwc: bool) {
    let dev = dev.clone();
    let layout = if nhwc { Layout::Nhwc } else { Layout::Nchw };
    // Storage: an op with bf16 kernels writes bf16; a parameter stays f32 and its gradient
    // comes back f32.
    {
        let mut tape = Tape::new().with_precision(Precision::Bf16);
        let x = tape.track(&randn(&[2, 3, 9, 9], 1).to_device(&dev).unwrap());
        let w = tape.track(&randn(&[4, 3, 3, 3], 2).to_device(&dev).unwrap());
        let y = tape.conv2d(&x, &w, 1, 1).unwrap();
        assert_eq!(y.dtype(), DType::Bf16, "conv2d output storage");
        assert_eq!(y.layout(), layout, "conv2d output layout");
        let p = tape.max_pool2d(&y, 3, 2, 1).unwrap();
        assert_eq!(p.dtype(), DType::Bf16, "max_pool2d output storage");
        assert_eq!(p.layout(), layout, "max_pool2d output layout");
        let dy = randn(p.shape(), 3).to_device(&dev).unwrap();
        let g = tape.backward_from(vec![(p, dy)]).unwrap();
        for (what, t) in [("weight", &w), ("image", &x)] {
            let d = g.get(t).unwrap();
            assert_eq!(
                (d.dtype(), d.layout()),
                (DType::F32, Layout::Nchw),
                "{what} gradient"
            );
        }
    }
    let conv_cases: &[([usize; 4], [usize; 4], usize, usize)] = &[
        ([2, 3, 9, 11], [5, 3, 3, 3], 2, 1),
        ([3, 4, 7, 6], [6, 4, 1, 1], 1, 0),
        ([2, 3, 64, 64], [64, 3, 7, 7], 2, 3),
        ([2, 64, 28, 28], [64, 64, 3, 3], 1, 1),
        ([2, 256, 14, 14], [512, 256, 1, 1], 2, 0),
    ];
    for (i, &(xs, ws, stride, padding)) in conv_cases.iter().enumerate() {
        compare_bf16(
            &dev,
            &format!("conv2d x{xs:?} w{ws:?} s{stride} p{padding}"),
            &[randn(&xs, 500 + i as u64), randn(&ws, 600 + i as u64)],
            1e-2,
            2e-2,
            &move |t, v| Ok(vec![t.conv2d(&v[0], &v[1], stride, padding)?]),
        );
    }
    for (i, shape) in [[2usize, 8, 17, 17], [3, 5, 9, 8]].into_iter().enumerate() {
        compare_bf16(
            &dev,
            &format!("max_pool2d {shape:?}"),
            &[randn(&shape, 700 + i as u64)],
            0.0,
            1e-2,
            &|t, v| Ok(vec![t.max_pool2d(&v[0], 3, 2, 1)?]),
        );
        compare_bf16(
            &dev,
            &format!("global_avg_pool {shape:?}"),
            &[randn(&shape, 710 + i as u64)],
            1e-2,
            1e-2,
            &|t, v| Ok(vec![t.global_avg_pool(&v[0])?]),
        );
    }
    // BN and the fused ops at an odd plane (scalar kernels) and a plane of 4k (4-wide ones).
    for (i, shape) in [[4usize, 6, 5, 7], [4, 8, 8, 8], [16, 12, 1, 1]]
        .into_iter()
        .enumerate()
    {
        let c = shape[1];
        let s = 10 * i as u64;
        let x = randn(&shape, 800 + s);
        let gamma = Tensor::from_vec(
            randn_vec(c, 801 + s)
                .iter()
                .map(|v| 1.0 + 0.3 * v)
                .collect(),
            &[c],
        )
        .unwrap();
        let beta = randn(&[c], 802 + s);
        let r = randn(&shape, 803 + s);
        compare_bf16(
            &dev,
            &format!("batch_norm_train {shape:?}"),
            &[x.clone(), gamma.clone(), beta.clone()],
            1e-2,
            5e-2,
            &|t, v| Ok(vec![t.batch_norm_train(&v[0], &v[1], &v[2], 1e-5)?.0]),
        );
        compare_bf16(
            &dev,
            &format!("bn_relu_train {shape:?}"),
            &[x.clone(), gamma.clone(), beta.clone()],
            1e-2,
            5e-2,
            &|t, v| Ok(vec![t.bn_relu_train(&v[0], &v[1], &v[2], 1e-5)?.0]),
        );
        compare_bf16(
            &dev,
            &format!("bn_add_relu_train {shape:?}"),
            &[x, gamma, beta, r.clone()],
            1e-2,
            5e-2,
            &|t, v| {
                Ok(vec![
                    t.bn_add_relu_train(&v[0], &v[1], &v[2], &v[3], 1e-5)?.0,
                ])
            },
        );
        compare_bf16(
            &dev,
            &format!("add {shape:?}"),
            &[randn(&shape, 804 + s), r],
            1e-2,
            1e-2,
            &|t, v| Ok(vec![t.add(&v[0], &v[1])?]),
        );
    }
    // Through f32 kernels on bf16 values: the head's ops.
    compare_bf16(
        &dev,
        "linear -> gelu",
        &[randn(&[7, 13], 900), randn(&[9, 13], 901), randn(&[9], 902)],
        1e-2,
        2e-2,
        &|t, v| {
            let y = t.linear(&v[0], &v[1], Some(&v[2]))?;
            Ok(vec![t.gelu(&y)?])
        },
    );
    compare_bf16(
        &dev,
        "wn_linear",
        &[randn(&[6, 16], 910), randn(&[32, 16], 911)],
        1e-2,
        2e-2,
        &|t, v| Ok(vec![t.wn_linear(&v[0], &v[1])?]),
    );
}

/// A whole CARP step in bf16 on the GPU against the CPU's bf16 emulation of it (the small model
/// of `training_step_matches_cpu`): the loss terms within 2e-3 (relative), the gradient within
/// a cosine of 0.99 (the CPU's own bf16 vs f32 gradient cosine at init is 0.9985,
/// tests/train_precision.rs: the GPU run differs from the emulation by rounding-order noise of
/// that kind), and the BN running statistics within 1e-2.
#[test]
fn bf16_training_step_matches_the_cpu_emulation() {
    let Some((dev, _serial)) = gpu_for_test("bf16_training_step_matches_the_cpu_emulation") else {
        return;
    };
    for nhwc in [true, false] {
        set_nhwc(nhwc);
        bf16_step_in_one_layout(&dev);
    }
    set_nhwc(true);
}

fn bf16_step_in_one_layout(dev: &Device) {
    let dev = dev.clone();
    let mut cpu = small_state();
    cpu.precision = Precision::Bf16;
    let mut gpu = cpu.try_clone().unwrap();
    let (v1, v2) = views(0);
    let sc = cpu.train_step(&v1, &v2, 0.5, 0.99).unwrap();
    let sg = gpu
        .train_step(
            &v1.to_device(&dev).unwrap(),
            &v2.to_device(&dev).unwrap(),
            0.5,
            0.99,
        )
        .unwrap();
    gpu.move_to_host().unwrap();
    for (name, g, c) in [
        ("loss", sg.loss, sc.loss),
        ("consistency", sg.consistency, sc.consistency),
        ("entropy", sg.entropy, sc.entropy),
    ] {
        assert!(
            (g as f64 - c as f64).abs() <= 2e-3 * (c.abs() as f64).max(1.0),
            "bf16 {name}: gpu {g} vs cpu {c}"
        );
    }
    let (gc, gg) = (&cpu.student.params.grad, &gpu.student.params.grad);
    assert!(
        gg.iter().all(|v| v.is_finite()),
        "non-finite GPU bf16 gradient"
    );
    let dot: f64 = gc.iter().zip(gg).map(|(&a, &b)| a as f64 * b as f64).sum();
    let na: f64 = gc.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = gg.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (na * nb).max(1e-30);
    assert!(
        cos >= 0.99,
        "bf16 gradient cosine GPU vs CPU emulation {cos}"
    );
    check_close(
        "bf16 BN running statistics (student)",
        &gpu.student.buffers.data,
        &cpu.student.buffers.data,
        1e-2,
        1e-6,
    );
}

// ------------------------------------------------------------------ device-resident state

/// The small model of `training_step_matches_cpu`, with random BN affine parameters and a
/// teacher that differs from the student (so the EMA is not a no-op).
fn small_state() -> carp::train::step::CarpState {
    use carp::nn::head::HeadConfig;
    use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
    use carp::nn::ModelConfig;
    let cfg = ModelConfig {
        arch: "small".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1],
            base_width: 4,
            stem: Stem::Cifar,
            block: BlockKind::Bottleneck,
        },
        head: HeadConfig {
            hidden: 32,
            out: 16,
            prototypes: 64,
        },
    };
    let mut st = carp::train::step::CarpState::new(&cfg, 16, 1e-4, 7).unwrap();
    let noise = randn_vec(st.student.params.numel(), 8);
    for e in st.student.params.entries.clone() {
        if e.is_1d() {
            for i in e.range() {
                st.student.params.data[i] = 1.0 + 0.3 * noise[i];
            }
        }
    }
    st.teacher = st.student.clone();
    for v in st.teacher.params.data.iter_mut() {
        *v *= 0.9;
    }
    st
}

/// Batches of two views (8, 3, 15, 15) (odd size), a different pair per step.
fn views(step: u64) -> (Tensor, Tensor) {
    (
        randn(&[8, 3, 15, 15], 100 + 2 * step),
        randn(&[8, 3, 15, 15], 101 + 2 * step),
    )
}

/// Several steps on the device-resident state against the CPU path, with a decaying learning
/// rate and a changing teacher momentum: the loss of every step, then the parameters, the
/// LARS momentum, the teacher and both networks' BN running statistics after the last one.
///
/// Tolerances: 2e-3 relative on the loss terms per step and on the parameters/momentum
/// (f32 reassociation in ~20 layers, LARS norms summed with float atomics on the GPU vs f64 on
/// the CPU, compounded over 4 steps); 1e-3 on the teacher and BN statistics (they follow the
/// student through the EMA / batch statistics).
#[test]
fn device_state_steps_match_cpu() {
    use carp::train::step::CarpState;
    let Some((dev, _serial)) = gpu_for_test("device_state_steps_match_cpu") else {
        return;
    };
    let mut cpu = small_state();
    let mut gpu: CarpState = cpu.try_clone().unwrap();
    let steps = 4u64;
    for s in 0..steps {
        let (v1, v2) = views(s);
        let lr = 0.4 - 0.05 * s as f32;
        let m = 0.99 - 0.01 * s as f32;
        let sc = cpu.train_step(&v1, &v2, lr, m).unwrap();
        let sg = gpu
            .train_step(
                &v1.to_device(&dev).unwrap(),
                &v2.to_device(&dev).unwrap(),
                lr,
                m,
            )
            .unwrap();
        assert!(
            gpu.has_device_state(),
            "the GPU step did not use the device-resident state"
        );
        assert!(!gpu.host_is_current(), "a GPU step left the host current");
        // The step's GPU time from its one event pair.
        assert!(
            sg.phases.step_ms.is_finite() && sg.phases.step_ms > 0.0,
            "step_ms {}",
            sg.phases.step_ms
        );
        for (name, g, c) in [
            ("loss", sg.loss, sc.loss),
            ("consistency", sg.consistency, sc.consistency),
            ("entropy", sg.entropy, sc.entropy),
        ] {
            assert!(
                (g as f64 - c as f64).abs() <= 2e-3 * (c.abs() as f64).max(1.0),
                "step {s} {name}: gpu {g} vs cpu {c}"
            );
        }
    }
    // Before the sync the host stores still hold the initial values.
    assert_eq!(gpu.student.params.data, small_state().student.params.data);
    gpu.move_to_host().unwrap();
    assert!(gpu.host_is_current());
    assert_eq!(gpu.step, cpu.step);
    let (pc, pg) = (&cpu.student.params, &gpu.student.params);
    // Per entry against its own scale, floored by 1e-4 of the largest parameter (a bias
    // followed by a BN gets a ~0 gradient and stays at rounding noise on both devices). Its
    // LARS momentum is that noise accumulated: on an H200 the two devices' head.fc1.bias
    // momenta differed by 2e-6 of the largest momentum (1e-7 values of opposite signs), so the
    // momentum floor is 1e-2 of the largest (the entries with real gradients keep their own
    // scale, or an absolute 2e-5 of the largest below it).
    let pmax = pc.data.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
    for e in &pc.entries {
        check_close(
            &format!("student {}", e.name),
            &pg.data[e.range()],
            &pc.data[e.range()],
            2e-3,
            1e-4 * pmax,
        );
        check_close(
            &format!("LARS momentum {}", e.name),
            &gpu.lars.momentum_buf[e.range()],
            &cpu.lars.momentum_buf[e.range()],
            2e-3,
            1e-2 * cpu
                .lars
                .momentum_buf
                .iter()
                .fold(0.0f64, |a, &v| a.max(v.abs() as f64)),
        );
    }
    check_close(
        "teacher",
        &gpu.teacher.params.data,
        &cpu.teacher.params.data,
        1e-3,
        1e-6,
    );
    for (name, g, c) in [
        ("student BN", &gpu.student.buffers, &cpu.student.buffers),
        ("teacher BN", &gpu.teacher.buffers, &cpu.teacher.buffers),
    ] {
        let bmax = c.data.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
        for e in &c.entries {
            check_close(
                &format!("{name} {}", e.name),
                &g.data[e.range()],
                &c.data[e.range()],
                1e-3,
                1e-4 * bmax,
            );
        }
    }
    // The BN statistics did move (4 updates at momentum 0.1), so the check above is not
    // comparing initial values.
    assert!(cpu.student.buffers.data != small_state().student.buffers.data);
}

/// The GPU NaN guard and the device-side gate: a non-finite gradient in a chosen entry is
/// reported by that entry's name (the first one in layout order, as the host guard), a
/// non-finite loss term by the loss, and in every case the gated LARS pass 2 and EMA queued
/// after the verdict leave every device buffer bit-identical; with a finite step they do move
/// the state (so the comparison can fail).
#[test]
fn device_state_nan_gradient_is_named_and_changes_nothing() {
    let Some((dev, _serial)) =
        gpu_for_test("device_state_nan_gradient_is_named_and_changes_nothing")
    else {
        return;
    };
    // Without the feature no test runs on a GPU (gpu_for_test returns None above).
    #[cfg(not(feature = "cuda"))]
    let _ = dev;
    #[cfg(feature = "cuda")]
    {
        use carp::resident::DeviceTrainState;
        let st = small_state();
        let be = carp::device::cuda::backend(0).unwrap();
        let p = &st.student.params;
        let mom0 = randn_vec(p.numel(), 11);
        let mut ds = DeviceTrainState::upload(
            be.clone(),
            (p, &st.student.buffers),
            (&st.teacher.params, &st.teacher.buffers),
            &mom0,
        )
        .unwrap();
        let cfg = carp::train::step::lars_config(1e-4);
        // Every state buffer, downloaded: (student, teacher, student BN, teacher BN, momentum).
        let snapshot = |ds: &DeviceTrainState| {
            let mut back = st.try_clone().unwrap();
            let mut mom = vec![0.0; p.numel()];
            ds.download(
                (&mut back.student.params, &mut back.student.buffers),
                (&mut back.teacher.params, &mut back.teacher.buffers),
                &mut mom,
            )
            .unwrap();
            (
                back.student.params.data,
                back.teacher.params.data,
                back.student.buffers.data,
                back.teacher.buffers.data,
                mom,
            )
        };
        let initial = snapshot(&ds);
        // The loss terms [H, consistency] as the loss op leaves them: (2,) on the GPU.
        let terms = |h: f32, c: f32| {
            Tensor::from_vec(vec![h, c], &[2])
                .unwrap()
                .to_device(&dev)
                .unwrap()
        };
        let finite_loss = terms(0.75, 2.5);
        // One guarded step on the device API: check, gated updates, then the verdict.
        let step = |ds: &mut DeviceTrainState, g: &[f32], loss_terms: &Tensor| {
            be.copy_from_host_f32(&mut ds.grad, g).unwrap();
            ds.queue_check(p, 1e-4, loss_terms).unwrap();
            ds.lars(&cfg, 0.3, true).unwrap();
            ds.ema(0.99, true).unwrap();
            ds.verdict(p, 3)
        };
        let mut g = randn_vec(p.numel(), 12);
        // A NaN in a 1-d entry (a BN gamma, which LARS pass 1 skips for norms) and an inf in
        // a later conv weight: the 1-d entry is named.
        let bn = p.entries.iter().position(|e| e.is_1d()).unwrap();
        let conv = p.entries.iter().rposition(|e| !e.is_1d()).unwrap();
        assert!(conv > bn);
        let good = g.clone();
        g[p.entries[bn].range().end - 1] = f32::NAN;
        g[p.entries[conv].offset] = f32::INFINITY;
        let e = step(&mut ds, &g, &finite_loss).unwrap_err().to_string();
        assert!(
            e.contains(&format!("non-finite gradient in {};", p.entries[bn].name))
                && e.contains("step 3"),
            "{e}"
        );
        assert!(
            snapshot(&ds) == initial,
            "a NaN-gradient step changed the device state"
        );
        // Only the multi-d inf left: that entry is named.
        g[p.entries[bn].range().end - 1] = 0.5;
        let e = step(&mut ds, &g, &finite_loss).unwrap_err().to_string();
        assert!(e.contains(&p.entries[conv].name), "{e}");
        assert!(
            snapshot(&ds) == initial,
            "an inf-gradient step changed the device state"
        );
        // A finite gradient with a NaN entropy term: the loss is named.
        let nan_loss = terms(f32::NAN, 2.5);
        let e = step(&mut ds, &good, &nan_loss).unwrap_err().to_string();
        assert!(e.contains("step 3: the loss is NaN"), "{e}");
        assert!(
            snapshot(&ds) == initial,
            "a NaN-loss step changed the device state"
        );
        // The finite step passes, returns the loss terms and moves the weights and teacher.
        let (loss, consistency, entropy) = step(&mut ds, &good, &finite_loss).unwrap();
        assert_eq!((loss, consistency, entropy), (3.25, 2.5, 0.75));
        let after = snapshot(&ds);
        assert!(after.0 != initial.0 && after.1 != initial.1 && after.4 != initial.4);
        assert_eq!(after.2, initial.2, "no BN update was queued");
    }
}

/// The cause a step's error names, without its "(...)" details and "; stopping ..." tail:
/// "step 1: the loss is NaN" or "step 1: non-finite gradient in conv1.weight".
fn error_cause(e: &str) -> String {
    e.split([';', '('])
        .next()
        .unwrap_or(e)
        .trim_end()
        .to_string()
}

/// What the host guard says of a step on the CPU from `st` (a clone; `st` is unchanged): the
/// device verdict must name the same cause. A NaN pixel does not always give a NaN loss: the
/// BN mean of every channel it reaches is NaN, ReLU maps NaN to 0 on both backends (`f32::max`,
/// `fmaxf`), so the loss can stay finite while conv1's weight gradient is not.
fn host_guard_cause(
    st: &carp::train::step::CarpState,
    v1: &Tensor,
    v2: &Tensor,
    lr: f32,
    m: f32,
) -> String {
    let mut host = st.try_clone().unwrap();
    let e = host
        .train_step(v1, v2, lr, m)
        .expect_err("the CPU step accepted a non-finite input")
        .to_string();
    error_cause(&e)
}

/// A whole GPU step whose input is NaN fails, and the state is unchanged: moved home after
/// the failed step, it equals the state before it.
#[test]
fn device_state_failed_step_changes_nothing() {
    let Some((dev, _serial)) = gpu_for_test("device_state_failed_step_changes_nothing") else {
        return;
    };
    let mut st = small_state();
    let (v1, v2) = views(0);
    st.train_step(
        &v1.to_device(&dev).unwrap(),
        &v2.to_device(&dev).unwrap(),
        0.3,
        0.99,
    )
    .unwrap();
    // The values before the failed step, read from the live device state (which stays).
    let before = st.try_clone().unwrap();
    assert!(st.has_device_state());
    let mut bad = v1.to_vec().unwrap();
    bad[5] = f32::NAN;
    let bad = Tensor::from_vec(bad, v1.shape()).unwrap();
    let want = host_guard_cause(&before, &bad, &v2, 0.3, 0.99);
    // The whole step is queued; the verdict at its end names the cause.
    let e = st
        .train_step(
            &bad.to_device(&dev).unwrap(),
            &v2.to_device(&dev).unwrap(),
            0.3,
            0.99,
        )
        .unwrap_err()
        .to_string();
    assert_eq!(error_cause(&e), want, "{e}");
    assert_eq!(st.step, before.step);
    st.move_to_host().unwrap();
    assert_eq!(st.student.params.data, before.student.params.data);
    assert_eq!(st.teacher.params.data, before.teacher.params.data);
    assert_eq!(st.student.buffers.data, before.student.buffers.data);
    assert_eq!(st.teacher.buffers.data, before.teacher.buffers.data);
    assert_eq!(st.lars.momentum_buf, before.lars.momentum_buf);
}

/// Checkpoints across the device state: saving a state that is on the GPU is refused (a
/// missed `move_to_host` fails loudly instead of writing old weights); a `try_clone` and
/// `move_to_host` give host stores equal to the device buffers bit for bit, the checkpoint
/// round-trips exactly, and a resumed
/// state continues like the original (tolerance 1e-5: the GPU's LARS norms use float atomics,
/// so two runs may round differently).
#[test]
fn device_state_checkpoint_resume() {
    use carp::train::checkpoint::{from_bytes, to_bytes, CheckpointMeta};
    let Some((dev, _serial)) = gpu_for_test("device_state_checkpoint_resume") else {
        return;
    };
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let mut st = small_state();
    for s in 0..3 {
        let (v1, v2) = views(s);
        st.train_step(&on(&v1), &on(&v2), 0.3, 0.99).unwrap();
    }
    let meta = CheckpointMeta {
        step: st.step,
        epoch: 0,
        config_json: "{}".into(),
    };
    let e = to_bytes(&st, &meta).unwrap_err().to_string();
    assert!(e.contains("move_to_host"), "{e}");
    assert!(!st.host_is_current());
    // The device buffers, read directly, against the copies `try_clone` and `move_to_host`
    // make of them.
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    #[cfg(feature = "cuda")]
    let on_device = {
        let ds = st.device_state().expect("no device state after GPU steps");
        let be = carp::device::cuda::backend(0).unwrap();
        let d = |b| bits(&be.download_f32(b).unwrap());
        [
            d(&ds.student),
            d(&ds.teacher),
            d(&ds.momentum),
            d(&ds.student_bn),
            d(&ds.teacher_bn),
        ]
    };
    let host_bits = |st: &carp::train::step::CarpState| {
        [
            bits(&st.student.params.data),
            bits(&st.teacher.params.data),
            bits(&st.lars.momentum_buf),
            bits(&st.student.buffers.data),
            bits(&st.teacher.buffers.data),
        ]
    };
    let copy = st.try_clone().unwrap();
    assert!(st.has_device_state(), "try_clone moved the state");
    assert!(copy.host_is_current());
    st.move_to_host().unwrap();
    assert!(st.host_is_current() && !st.has_device_state());
    #[cfg(feature = "cuda")]
    {
        assert_eq!(host_bits(&st), on_device, "move_to_host");
        assert_eq!(host_bits(&copy), on_device, "try_clone");
    }
    // The initial host values are gone (the steps changed the weights).
    assert_ne!(host_bits(&st)[0], host_bits(&small_state())[0]);
    let bytes = to_bytes(&st, &meta).unwrap();
    let mut resumed = small_state();
    // The resumed state first trains a step of its own, so the load must replace a live
    // device state.
    let (v1, v2) = views(7);
    resumed.train_step(&on(&v1), &on(&v2), 0.3, 0.99).unwrap();
    from_bytes(&bytes, std::path::Path::new("mem.ckpt"), &mut resumed).unwrap();
    assert!(resumed.host_is_current());
    assert_eq!(resumed.step, st.step);
    assert_eq!(resumed.student.params.data, st.student.params.data);
    assert_eq!(resumed.teacher.params.data, st.teacher.params.data);
    assert_eq!(resumed.lars.momentum_buf, st.lars.momentum_buf);
    assert_eq!(resumed.student.buffers.data, st.student.buffers.data);
    for s in 3..5 {
        let (v1, v2) = views(s);
        let a = st.train_step(&on(&v1), &on(&v2), 0.2, 0.995).unwrap();
        let b = resumed.train_step(&on(&v1), &on(&v2), 0.2, 0.995).unwrap();
        assert!(
            (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs().max(1.0),
            "step {s}"
        );
    }
    st.move_to_host().unwrap();
    resumed.move_to_host().unwrap();
    check_close(
        "resumed student",
        &resumed.student.params.data,
        &st.student.params.data,
        1e-5,
        1e-6,
    );
    check_close(
        "resumed teacher",
        &resumed.teacher.params.data,
        &st.teacher.params.data,
        1e-5,
        1e-6,
    );
    check_close(
        "resumed BN",
        &resumed.student.buffers.data,
        &st.student.buffers.data,
        1e-5,
        1e-6,
    );
}

/// The trainer's sync points on a GPU: a 7-step run with checkpoints every 3 steps on the GPU
/// against the same run on the CPU (the checkpoint holds the GPU's current weights, not the
/// initial host copy: a missed `move_to_host` before a save fails the run or this comparison),
/// and a GPU run stopped after 4 steps and resumed against the straight GPU run.
///
/// Tolerances: 2e-3 of each store's largest value GPU vs CPU (7 steps of f32 reassociation);
/// 1e-4 GPU straight vs GPU resumed (the same kernels; float atomics in the LARS norms and
/// cuDNN's backward may round differently between runs).
#[test]
fn device_state_trainer_checkpoints() {
    use carp::nn::head::HeadConfig;
    use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
    use carp::nn::ModelConfig;
    use carp::train::checkpoint;
    use carp::train::config::TrainConfig;
    use carp::train::step::CarpState;
    use carp::train::trainer::{train, TrainOptions};
    let Some((_dev, _serial)) = gpu_for_test("device_state_trainer_checkpoints") else {
        return;
    };
    let tmp = |name: &str| {
        let d = std::env::temp_dir().join(format!("carp-gpu-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    };
    let cfg = |out: &std::path::Path, device: &str| TrainConfig {
        model: ModelConfig {
            arch: "micro".into(),
            backbone: ResNetConfig {
                layers: vec![1, 1],
                base_width: 2,
                stem: Stem::Cifar,
                block: BlockKind::Bottleneck,
            },
            head: HeadConfig {
                hidden: 8,
                out: 4,
                prototypes: 16,
            },
        },
        out: out.to_path_buf(),
        batch: 8,
        steps: Some(7),
        epochs: None,
        image_size: 12,
        nb: 4,
        checkpoint_every: 3,
        device: device.into(),
        ..TrainConfig::tiny_default()
    };
    let quiet = || TrainOptions {
        no_eval: true,
        quiet: true,
        ..Default::default()
    };
    let load = |c: &TrainConfig| {
        let mut s = CarpState::new(&c.model, c.nb, c.weight_decay, c.seed).unwrap();
        checkpoint::load_file(&c.out.join(checkpoint::LATEST), &mut s).unwrap();
        s
    };
    let (dg, dc, dr) = (tmp("gpu"), tmp("cpu"), tmp("resumed"));
    let (cg, cc, cr) = (cfg(&dg, "cuda:0"), cfg(&dc, "cpu"), cfg(&dr, "cuda:0"));
    assert_eq!(train(&cg, &quiet()).unwrap().steps, 7);
    assert_eq!(train(&cc, &quiet()).unwrap().steps, 7);
    let stopped = TrainOptions {
        stop_after: Some(4),
        ..quiet()
    };
    assert_eq!(train(&cr, &stopped).unwrap().steps, 4);
    let resume = TrainOptions {
        resume: true,
        ..quiet()
    };
    assert_eq!(train(&cr, &resume).unwrap().steps, 7);
    let (g, c, r) = (load(&cg), load(&cc), load(&cr));
    let init = CarpState::new(&cg.model, cg.nb, cg.weight_decay, cg.seed).unwrap();
    assert!(g.student.params.data != init.student.params.data);
    let max = |v: &[f32]| v.iter().fold(0.0f64, |a, &x| a.max(x.abs() as f64));
    for (what, a, b, tol) in [
        ("gpu vs cpu", &g, &c, 2e-3),
        ("resumed vs straight", &r, &g, 1e-4),
    ] {
        assert_eq!(a.step, b.step, "{what}");
        for (name, x, y) in [
            ("student", &a.student.params.data, &b.student.params.data),
            ("teacher", &a.teacher.params.data, &b.teacher.params.data),
            ("momentum", &a.lars.momentum_buf, &b.lars.momentum_buf),
            (
                "student BN",
                &a.student.buffers.data,
                &b.student.buffers.data,
            ),
            (
                "teacher BN",
                &a.teacher.buffers.data,
                &b.teacher.buffers.data,
            ),
        ] {
            check_close(&format!("{what}: {name}"), x, y, tol, 1e-4 * max(y));
        }
    }
    for d in [dg, dc, dr] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A multi-crop CARP step (2 global + 3 local views at another resolution) on the GPU against
/// the same step on the CPU: the loss terms (the fused loss with VS = 5: local rows in pbar),
/// every gradient (through the row concatenation of global and local features) and the BN
/// running statistics (updated by both backbone batches and the head).
#[test]
fn multicrop_training_step_matches_cpu() {
    use carp::nn::head::HeadConfig;
    use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
    use carp::nn::ModelConfig;
    use carp::train::step::CarpState;

    let Some((dev, _serial)) = gpu_for_test("multicrop_training_step_matches_cpu") else {
        return;
    };
    let cfg = ModelConfig {
        arch: "small".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1],
            base_width: 4,
            stem: Stem::Cifar,
            block: BlockKind::Bottleneck,
        },
        head: HeadConfig {
            hidden: 32,
            out: 16,
            prototypes: 64,
        },
    };
    let (batch, image, local, n_local, nb) = (6usize, 16usize, 8usize, 3usize, 16usize);
    let mut cpu = CarpState::new(&cfg, nb, 1e-4, 17).unwrap();
    // Random BN affine parameters (see training_step_matches_cpu), a teacher that differs.
    let noise = randn_vec(cpu.student.params.numel(), 18);
    for e in cpu.student.params.entries.clone() {
        if e.is_1d() {
            for i in e.range() {
                cpu.student.params.data[i] = 1.0 + 0.3 * noise[i];
            }
        }
    }
    cpu.teacher = cpu.student.clone();
    for v in cpu.teacher.params.data.iter_mut() {
        *v *= 0.9;
    }
    let mut gpu = cpu.try_clone().unwrap();
    let v1 = randn(&[batch, 3, image, image], 19);
    let v2 = randn(&[batch, 3, image, image], 20);
    let loc = randn(&[n_local * batch, 3, local, local], 21);
    let (lr, m) = (0.5, 0.99);
    let sc = cpu.train_step_multi(&v1, &v2, Some(&loc), lr, m).unwrap();
    let sg = gpu
        .train_step_multi(
            &v1.to_device(&dev).unwrap(),
            &v2.to_device(&dev).unwrap(),
            Some(&loc.to_device(&dev).unwrap()),
            lr,
            m,
        )
        .unwrap();
    // The GPU step's state lives on the device: into the host stores before comparing them.
    gpu.move_to_host().unwrap();
    for (name, g, c) in [
        ("loss", sg.loss, sc.loss),
        ("consistency", sg.consistency, sc.consistency),
        ("entropy", sg.entropy, sc.entropy),
    ] {
        assert!(
            (g as f64 - c as f64).abs() <= 1e-4 * (c.abs() as f64).max(1.0),
            "multi-crop {name}: gpu {g} vs cpu {c}"
        );
    }
    let gmax = cpu
        .student
        .params
        .grad
        .iter()
        .fold(0.0f64, |a, &v| a.max(v.abs() as f64));
    assert!(gmax > 0.0, "the CPU step produced all-zero gradients");
    let (pc, pg) = (&cpu.student.params, &gpu.student.params);
    for e in &pc.entries {
        check_close(
            &format!("multi-crop grad {}", e.name),
            &pg.grad[e.range()],
            &pc.grad[e.range()],
            2e-3,
            1e-3 * gmax,
        );
    }
    check_close(
        "multi-crop BN running statistics (student)",
        &gpu.student.buffers.data,
        &cpu.student.buffers.data,
        1e-4,
        1e-6,
    );
    check_close(
        "multi-crop EMA teacher",
        &gpu.teacher.params.data,
        &cpu.teacher.params.data,
        1e-5,
        1e-6,
    );
}

/// The fused BN + ReLU (+ residual add) ops (src/ops/fused.rs, kernels/bn_fused.cu) on CUDA
/// against the same ops on the CPU, in both modes, with and without the residual: the output,
/// the batch statistics and every gradient (x, gamma, beta, residual). Tolerances as
/// batch_norm's (1e-4: reductions in another order). Moderate sizes: an element whose
/// pre-activation lies within f32 rounding of 0 may take the other side of the ReLU on the
/// other device (FMA on the GPU), which these sizes make unlikely.
#[test]
fn fused_bn_relu_add() {
    let Some((dev, _serial)) = gpu_for_test("fused_bn_relu_add") else {
        return;
    };
    for (i, shape) in [
        vec![4usize, 16, 14, 14],
        vec![3, 5, 7, 9],
        vec![16, 257],
        vec![2, 8, 40, 40],
    ]
    .into_iter()
    .enumerate()
    {
        let c = shape[1];
        let s = 900 + 10 * i as u64;
        let x: Vec<f32> = randn_vec(shape.iter().product(), s)
            .iter()
            .map(|v| 3.0 + 2.0 * v)
            .collect();
        let x = Tensor::from_vec(x, &shape).unwrap();
        let gamma = Tensor::from_vec(
            randn_vec(c, s + 1).iter().map(|v| 1.0 + 0.5 * v).collect(),
            &[c],
        )
        .unwrap();
        let beta = randn(&[c], s + 2);
        let res = randn(&shape, s + 3);
        let rm = randn(&[c], s + 4);
        let rv = Tensor::from_vec(
            randn_vec(c, s + 5).iter().map(|v| 0.5 + v.abs()).collect(),
            &[c],
        )
        .unwrap();
        let base = [x.clone(), gamma.clone(), beta.clone()];
        compare(
            &dev,
            &format!("bn_relu_train {shape:?}"),
            &base,
            1e-4,
            1e-4,
            &|t, v| {
                let (y, m, var) = t.bn_relu_train(&v[0], &v[1], &v[2], 1e-5)?;
                Ok(vec![y, m, var])
            },
        );
        compare(
            &dev,
            &format!("bn_add_relu_train {shape:?}"),
            &[x.clone(), gamma.clone(), beta.clone(), res.clone()],
            1e-4,
            1e-4,
            &|t, v| {
                let (y, m, var) = t.bn_add_relu_train(&v[0], &v[1], &v[2], &v[3], 1e-5)?;
                Ok(vec![y, m, var])
            },
        );
        compare(
            &dev,
            &format!("bn_relu_eval {shape:?}"),
            &[
                x.clone(),
                gamma.clone(),
                beta.clone(),
                rm.clone(),
                rv.clone(),
            ],
            1e-5,
            1e-4,
            &|t, v| {
                Ok(vec![
                    t.bn_relu_eval(&v[0], &v[1], &v[2], &v[3], &v[4], 1e-5)?
                ])
            },
        );
        compare(
            &dev,
            &format!("bn_add_relu_eval {shape:?}"),
            &[x, gamma, beta, res, rm, rv],
            1e-5,
            1e-4,
            &|t, v| {
                Ok(vec![t.bn_add_relu_eval(
                    &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], 1e-5,
                )?])
            },
        );
    }
}

/// (name, inputs, the one op, its unfused composition).
type RecomputeCase = (&'static str, Vec<Tensor>, Rc<Op>, Rc<Op>);

/// The recomputing ops (src/ops/recompute.rs) and their unfused compositions, on inputs with
/// non-trivial BN scales: (name, inputs, the one op, bn_relu_train / conv2d / bn_add_relu_train /
/// max_pool2d in a row). Each returns its output first, then the batch statistics.
fn recompute_cases() -> Vec<RecomputeCase> {
    let pos = |c: usize, seed: u64| {
        Tensor::from_vec(
            randn_vec(c, seed).iter().map(|v| 1.0 + 0.3 * v).collect(),
            &[c],
        )
        .unwrap()
    };
    vec![
        (
            "bn_relu_conv2d_train",
            vec![
                randn(&[4, 16, 14, 14], 1001),
                pos(16, 1002),
                randn(&[16], 1003),
                randn(&[24, 16, 3, 3], 1004),
            ],
            Rc::new(|t: &mut Tape, v: &[Tensor]| {
                let (z, (m, var)) =
                    t.bn_relu_conv2d_train(&v[0], &v[1], &v[2], &v[3], 2, 1, 1e-5)?;
                Ok(vec![z, m, var])
            }),
            Rc::new(|t: &mut Tape, v: &[Tensor]| {
                let (y, m, var) = t.bn_relu_train(&v[0], &v[1], &v[2], 1e-5)?;
                Ok(vec![t.conv2d(&y, &v[3], 2, 1)?, m, var])
            }),
        ),
        (
            "bn_relu_conv2d_bn_add_relu_train",
            vec![
                randn(&[4, 16, 14, 14], 1011),
                pos(16, 1012),
                randn(&[16], 1013),
                randn(&[64, 16, 1, 1], 1014),
                pos(64, 1015),
                randn(&[64], 1016),
                randn(&[4, 64, 14, 14], 1017),
            ],
            Rc::new(|t: &mut Tape, v: &[Tensor]| {
                let (y, s2, s3) = t.bn_relu_conv2d_bn_add_relu_train(
                    &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], 1e-5,
                )?;
                Ok(vec![y, s2.0, s2.1, s3.0, s3.1])
            }),
            Rc::new(|t: &mut Tape, v: &[Tensor]| {
                let (h, m2, v2) = t.bn_relu_train(&v[0], &v[1], &v[2], 1e-5)?;
                let h = t.conv2d(&h, &v[3], 1, 0)?;
                let (y, m3, v3) = t.bn_add_relu_train(&h, &v[4], &v[5], &v[6], 1e-5)?;
                Ok(vec![y, m2, v2, m3, v3])
            }),
        ),
        (
            "bn_relu_max_pool2d_train",
            vec![
                randn(&[4, 8, 18, 17], 1021),
                pos(8, 1022),
                randn(&[8], 1023),
            ],
            Rc::new(|t: &mut Tape, v: &[Tensor]| {
                let (p, (m, var)) =
                    t.bn_relu_max_pool2d_train(&v[0], &v[1], &v[2], 3, 2, 1, 1e-5)?;
                Ok(vec![p, m, var])
            }),
            Rc::new(|t: &mut Tape, v: &[Tensor]| {
                let (y, m, var) = t.bn_relu_train(&v[0], &v[1], &v[2], 1e-5)?;
                Ok(vec![t.max_pool2d(&y, 3, 2, 1)?, m, var])
            }),
        ),
    ]
}

/// The recomputing ops on CUDA against the CPU in f32 (tolerances of the fused BN ops and
/// convolutions), and in bf16 against the CPU emulation in both layouts (tolerances of the
/// bf16 BN ops: the GPU rounds conv gradients to bf16 where the emulation keeps f32).
#[test]
fn recompute_ops_match_cpu() {
    let Some((dev, _serial)) = gpu_for_test("recompute_ops_match_cpu") else {
        return;
    };
    for (name, inputs, one_op, _) in recompute_cases() {
        compare(&dev, name, &inputs, 1e-4, 1e-3, &*one_op);
        for nhwc in [true, false] {
            set_nhwc(nhwc);
            let op = one_op.clone();
            let out_only: &Op = &move |t, v| Ok(vec![op(t, v)?.remove(0)]);
            let what = format!("{name} nhwc={nhwc}");
            compare_bf16(&dev, &what, &inputs, 2e-2, 5e-2, out_only);
        }
        set_nhwc(true);
    }
}

/// In bf16 NHWC, a residual stored NCHW (converted by the op) gives the unfused ops' result.
/// (That each recomputing op equals its unfused composition, on every device, is tested from one
/// body in src/ops/recompute.rs, `*_cuda` in the library's tests.)
#[test]
fn recompute_tail_with_an_nchw_residual_on_gpu() {
    let Some((dev, _serial)) = gpu_for_test("recompute_tail_with_an_nchw_residual_on_gpu") else {
        return;
    };
    set_nhwc(true);
    // bf16 NHWC with the residual stored NCHW.
    let (_, inputs, one_op, unfused) = recompute_cases().remove(1);
    let run = |f: &Op| {
        let mut tape = Tape::new().with_precision(Precision::Bf16);
        let mut v: Vec<Tensor> = inputs
            .iter()
            .map(|t| tape.track(&t.to_device(&dev).unwrap()))
            .collect();
        v[6] = tape.track(&v[6].to_format(DType::Bf16, Layout::Nchw).unwrap());
        let outs = f(&mut tape, &v).unwrap();
        let dy = randn(outs[0].shape(), 1097).to_device(&dev).unwrap();
        let g = tape.backward_from(vec![(outs[0].clone(), dy)]).unwrap();
        (
            outs[0].to_vec().unwrap(),
            g.get(&v[6]).unwrap().to_vec().unwrap(),
        )
    };
    let ((ya, ra), (yb, rb)) = (run(&*one_op), run(&*unfused));
    assert_eq!(ya, yb, "NCHW residual: output");
    check_close("NCHW residual: its gradient", &ra, &rb, 1e-2, 1e-6);
}

/// `--nan-guard sync` (the verdict read before ungated updates: the fallback of the device
/// gate) and the default gated step agree over a few steps, and a NaN step fails in both modes
/// with the loss named and the state unchanged. Tolerance 1e-5 relative: the same kernels, but
/// LARS norms summed with float atomics may round differently between two runs.
#[test]
fn device_state_step_sync_matches_gated() {
    let Some((dev, _serial)) = gpu_for_test("device_state_step_sync_matches_gated") else {
        return;
    };
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let prev = carp::options::current();
    let mut gated = small_state();
    let mut synced = small_state();
    // The same steps on the CPU: what the host guard says of the NaN step.
    let mut host = small_state();
    let (bad1, v2_0) = {
        let (v1, v2) = views(0);
        let mut b = v1.to_vec().unwrap();
        b[7] = f32::NAN;
        (Tensor::from_vec(b, v1.shape()).unwrap(), v2)
    };
    let mut want = String::new();
    for s in 0..3 {
        let (v1, v2) = views(s);
        if s == 1 {
            want = host_guard_cause(&host, &bad1, &v2_0, 0.3, 0.99);
        }
        host.train_step(&v1, &v2, 0.3 - 0.05 * s as f32, 0.99)
            .unwrap();
        for (st, sync) in [(&mut gated, false), (&mut synced, true)] {
            if sync {
                carp::options::update(|o| o.nan_guard = carp::options::NanGuard::Sync);
            } else {
                carp::options::update(|o| o.nan_guard = carp::options::NanGuard::Gated);
            }
            if s == 1 {
                // A NaN step in between: refused, nothing changes, training goes on.
                let e = st
                    .train_step(&on(&bad1), &on(&v2_0), 0.3, 0.99)
                    .unwrap_err()
                    .to_string();
                assert_eq!(error_cause(&e), want, "sync {sync}: {e}");
                assert_eq!(st.step, 1);
            }
            st.train_step(&on(&v1), &on(&v2), 0.3 - 0.05 * s as f32, 0.99)
                .unwrap();
        }
    }
    carp::options::install(prev);
    gated.move_to_host().unwrap();
    synced.move_to_host().unwrap();
    for (name, a, b) in [
        (
            "student",
            &gated.student.params.data,
            &synced.student.params.data,
        ),
        (
            "teacher",
            &gated.teacher.params.data,
            &synced.teacher.params.data,
        ),
        (
            "momentum",
            &gated.lars.momentum_buf,
            &synced.lars.momentum_buf,
        ),
        (
            "student BN",
            &gated.student.buffers.data,
            &synced.student.buffers.data,
        ),
        (
            "teacher BN",
            &gated.teacher.buffers.data,
            &synced.teacher.buffers.data,
        ),
    ] {
        check_close(
            &format!("{name} (gated vs --nan-guard sync)"),
            a,
            b,
            1e-5,
            1e-7,
        );
    }
    assert_eq!(gated.step, 3);
}

/// A bf16 activation taken by an op without bf16 kernels is widened to an f32 copy for that op
/// only: after a ReLU (which saves its output, not its input) the copy is freed, so the tape
/// gains ReLU's saved f32 output and its bf16 output (6 bytes per element, under 7 with the
/// pool's bucket rounding of at most 12.5%), not also a cached f32 copy of the input (10).
#[cfg(feature = "cuda")]
#[test]
fn bf16_widened_activation_is_not_kept_by_the_tape() {
    let Some((dev, _serial)) = gpu_for_test("bf16_widened_activation_is_not_kept_by_the_tape")
    else {
        return;
    };
    let shape = [4, 64, 33, 31]; // (N, C, H, W), 261,888 elements
    let n: usize = shape.iter().product();
    let x = randn(&shape, 77)
        .to_device(&dev)
        .unwrap()
        .to_dtype(DType::Bf16)
        .unwrap();
    let be = x.cuda().unwrap().backend.clone();
    be.synchronize().unwrap();
    let mut tape = Tape::new().with_precision(Precision::Bf16);
    let x = tape.track(&x);
    let before = be.pool_stats().bytes_in_use;
    let y = tape.relu(&x).unwrap();
    let grown = be.pool_stats().bytes_in_use - before;
    assert!(
        grown < 8 * n,
        "a bf16 ReLU keeps {grown} bytes for {n} elements (a widened f32 copy still held?)"
    );
    // The gradient still reaches x (through the uncached copy's record).
    let grads = tape
        .backward_from(vec![(y.clone(), y.to_dtype(DType::F32).unwrap())])
        .unwrap();
    let dx = grads.get(&x).expect("x has a gradient").to_vec().unwrap();
    let (xv, yv) = (x.to_vec().unwrap(), y.to_vec().unwrap());
    for i in 0..n {
        let want = if xv[i] > 0.0 { yv[i] } else { 0.0 };
        assert_eq!(dx[i], want, "dx[{i}]");
    }
}

/// A conv weight used by two convolutions of one bf16 tape (the global and the local views'
/// passes of a step) gets the f32 sum of the two bf16 weight gradients cuDNN returns, as the
/// CPU emulation sums in f32: the gradient with both uses equals (to f32 rounding) the sum of
/// the gradients of each use alone. A bf16 accumulation would round the sum once more (about
/// half the elements off by up to 0.2%); at most 1% of the elements may differ (a cuDNN
/// algorithm's nondeterministic f32 order can flip a rare bf16 rounding).
#[test]
fn bf16_conv_weight_used_twice_accumulates_in_f32() {
    let Some((dev, _serial)) = gpu_for_test("bf16_conv_weight_used_twice_accumulates_in_f32")
    else {
        return;
    };
    let w = randn(&[6, 3, 3, 3], 31).to_device(&dev).unwrap();
    let xs = [
        randn(&[2, 3, 9, 11], 32).to_device(&dev).unwrap(),
        randn(&[3, 3, 7, 7], 33).to_device(&dev).unwrap(),
    ];
    let dw = |uses: &[usize]| -> Vec<f32> {
        let mut tape = Tape::new().with_precision(Precision::Bf16);
        let w = tape.track(&w);
        let mut seeds = Vec::new();
        for &i in uses {
            let y = tape.conv2d(&xs[i], &w, 1, 1).unwrap();
            let dy = randn(y.shape(), 40 + i as u64).to_device(&dev).unwrap();
            seeds.push((y, dy));
        }
        let g = tape.backward_from(seeds).unwrap();
        let d = g.get(&w).expect("weight gradient");
        assert_eq!((d.dtype(), d.layout()), (DType::F32, Layout::Nchw));
        d.to_vec().unwrap()
    };
    let (g0, g1, both) = (dw(&[0]), dw(&[1]), dw(&[0, 1]));
    let scale = both.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let off = both
        .iter()
        .zip(g0.iter().zip(&g1))
        .filter(|(b, (a, c))| (**b - (**a + **c)).abs() > 1e-5 * scale)
        .count();
    assert!(
        off * 100 <= both.len(),
        "{off} of {} weight-gradient elements differ from the f32 sum of the two uses",
        both.len()
    );
}
