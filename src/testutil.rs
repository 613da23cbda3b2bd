//! Helpers for tests: seeded random tensors, a finite-difference gradient checker, and the
//! device tests' harness ([`crate::test_device!`], [`gpu_for_test`], and [`check_tape_op`]: an
//! op on a device against its f64 reference and, on a GPU, against the CPU op). Public (but
//! hidden) so the integration tests under `tests/` can use them too.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::autograd::Tape;
use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// The GPU tests run one at a time: they share GPU 0's allocator (whose counters one test
/// checks) and the process's run options.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
static GPU_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What a GPU test finds on the machine before it opens the backend (which also loads every
/// PTX module).
#[derive(Clone, Debug, PartialEq)]
pub enum GpuPresence {
    /// No CUDA driver library, or a driver that reports no device: the test cannot run here.
    Absent(String),
    /// A driver and a device: from here on any error is the test's failure.
    Present,
}

/// Whether a GPU test runs, skips or fails.
#[derive(Debug)]
pub enum GpuVerdict<T> {
    Run(T),
    /// Why: print `SKIPPED: <test>: <why>` and return.
    Skip(String),
    /// The GPU is there but the backend would not open (a PTX module that fails to load, a
    /// context error...): the test must fail with this message, not pass as skipped.
    Fail(String),
}

/// The driver library and the device count, probed without opening the backend.
#[cfg(feature = "cuda")]
pub fn gpu_presence() -> GpuPresence {
    use cudarc::driver::{result, sys};
    // SAFETY: is_culib_present only tries to dlopen libcuda; nothing else is touched.
    if !unsafe { sys::is_culib_present() } {
        return GpuPresence::Absent("no CUDA driver (libcuda.so) found".into());
    }
    match result::init() {
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            return GpuPresence::Absent(format!("cuInit finds no CUDA device ({e:?})"));
        }
        // Any other cuInit error is a broken setup, not an absent GPU: opening the backend
        // fails with it, and so does the test.
        Err(_) => return GpuPresence::Present,
        Ok(()) => {}
    }
    match result::device::get_count() {
        Ok(0) => GpuPresence::Absent("the CUDA driver reports 0 devices".into()),
        _ => GpuPresence::Present,
    }
}

/// The GPU tests' one decision: skip only where `presence` says there is no GPU; otherwise
/// open the backend with `open` and run, or fail with its error.
pub fn gpu_verdict<T, E: std::fmt::Display>(
    presence: GpuPresence,
    open: impl FnOnce() -> std::result::Result<T, E>,
) -> GpuVerdict<T> {
    match presence {
        GpuPresence::Absent(why) => GpuVerdict::Skip(why),
        GpuPresence::Present => match open() {
            Ok(t) => GpuVerdict::Run(t),
            Err(e) => GpuVerdict::Fail(format!(
                "a CUDA driver and device are present but the backend does not open: {e}"
            )),
        },
    }
}

/// [`gpu_verdict`] for the test `test` with the machine's [`gpu_presence`]: `Some` to run,
/// `None` after printing "SKIPPED: <test>: <reason>" to the process's stderr (libtest captures
/// only the print macros, so the line shows in `cargo test` output; scripts/gpu-check.sh
/// fails on it); panics when the GPU is present but `open` fails.
#[cfg(feature = "cuda")]
pub fn gpu_or_skip<T, E: std::fmt::Display>(
    test: &str,
    open: impl FnOnce() -> std::result::Result<T, E>,
) -> Option<T> {
    use std::io::Write as _;
    match gpu_verdict(gpu_presence(), open) {
        GpuVerdict::Run(t) => Some(t),
        GpuVerdict::Skip(why) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
            None
        }
        GpuVerdict::Fail(msg) => panic!("{test}: {msg}"),
    }
}

/// GPU 0 for the test `test`, with the lock that serializes the GPU tests; or `None` after
/// printing `SKIPPED: <test>: <reason>` where the machine has no CUDA driver or no device
/// (`gpu_or_skip`; any other error opening the backend fails the test).
///
/// Installs the run options of the environment (`CARP_*` variables run the tests on that
/// path), with TF32 off: GPU results are compared at f32 tolerances. Every device buffer is
/// NaN-filled when allocated, so an element an op leaves unwritten fails the comparison.
pub fn gpu_for_test(test: &str) -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
    #[cfg(feature = "cuda")]
    {
        gpu_or_skip(test, || crate::device::cuda::backend(0))?;
        let serial = GPU_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        crate::device::cuda::set_poison_allocations(true);
        let mut o = crate::options::RunOptionArgs::default()
            .resolve()
            .expect("CARP_* run options in the environment");
        o.tf32 = crate::options::Switch::Off;
        crate::options::install(o);
        Some((Device::Cuda(0), serial))
    }
    #[cfg(not(feature = "cuda"))]
    {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test}: this build has no CUDA backend (build with --features cuda)"
        );
        None
    }
}

/// One test per device from one body `fn body(dev: &Device)`, as candle's `test_device!`:
/// `$cpu` runs it on the CPU; `$cuda` (built with the `cuda` feature) on GPU 0 under
/// [`gpu_for_test`], or prints SKIPPED where there is none. The body decides what differs by
/// device (a tolerance where the CPU is exact), nothing else does.
#[macro_export]
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(&$crate::tensor::Device::Cpu);
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            let name = concat!(module_path!(), "::", stringify!($cuda));
            if let Some((dev, _serial)) = $crate::testutil::gpu_for_test(name) {
                $body(&dev);
            }
        }
    };
}

/// An environment of its own for code that reads variables through a `get` function: `pairs`
/// set, everything else unset.
pub fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

/// A seeded RNG for tests.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Standard-normal values, seeded.
pub fn randn_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| StandardNormal.sample(&mut r)).collect()
}

/// A CPU tensor of standard-normal values, seeded.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(randn_vec(n, seed), shape).expect("shape matches")
}

/// Compares the tape's gradient of `L = sum(f(x) * R)` (R a fixed random projection, so every
/// output element matters with a different weight) with central finite differences of L,
/// evaluated in f64 from the f32 forward. Fails if `||g_tape - g_fd|| / ||g_fd||` exceeds
/// `rel_tol` for any input, or if any single element is off by more than
/// `10 * rel_tol * max|g_fd|`.
pub fn check_grad(
    inputs: &[Tensor],
    rel_tol: f64,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    check_grad_eps(inputs, rel_tol, 1e-3, f)
}

/// [`check_grad`] with an explicit finite-difference step.
pub fn check_grad_eps(
    inputs: &[Tensor],
    rel_tol: f64,
    eps: f64,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    check_grad_impl(inputs, rel_tol, eps, None, f)
}

/// [`check_grad_eps`] for functions with kinks (ReLU, max pool): each element's difference is
/// also taken with step `4 eps`; where the two disagree by more than `rel_tol` of the
/// tensor's largest gradient, the element sits at a non-differentiable point and is left out.
/// Fails if more than `max_kink_frac` of all inputs' elements are left out.
pub fn check_grad_kinks(
    inputs: &[Tensor],
    rel_tol: f64,
    eps: f64,
    max_kink_frac: f64,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    check_grad_impl(inputs, rel_tol, eps, Some(max_kink_frac), f)
}

fn check_grad_impl(
    inputs: &[Tensor],
    rel_tol: f64,
    eps: f64,
    kinks: Option<f64>,
    f: impl Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    // Analytic gradients from the tape.
    let mut tape = Tape::new();
    let tracked: Vec<Tensor> = inputs.iter().map(|t| tape.track(t)).collect();
    let out = f(&mut tape, &tracked)?;
    let r = randn(out.shape(), 0xfeed);
    let grads = tape.backward_from(vec![(out.clone(), r.clone())])?;
    let rv: Vec<f64> = r.to_vec()?.iter().map(|&v| v as f64).collect();

    let project = |xs: &[Tensor]| -> Result<f64> {
        let mut tape = Tape::no_grad();
        let y = f(&mut tape, xs)?;
        Ok(y.to_vec()?
            .iter()
            .zip(&rv)
            .map(|(&a, &b)| a as f64 * b)
            .sum())
    };

    let total: usize = inputs.iter().map(|t| t.numel()).sum();
    let mut kinked = 0usize;
    for (k, x) in tracked.iter().enumerate() {
        let g = match grads.get(x) {
            Some(g) => g.to_vec()?,
            None => vec![0.0; x.numel()],
        };
        let base = x.to_vec()?;
        let central = |i: usize, eps: f64| -> Result<f64> {
            let mut xs: Vec<Tensor> = inputs.to_vec();
            let mut plus = base.clone();
            plus[i] += eps as f32;
            let h_plus = plus[i] as f64 - base[i] as f64;
            xs[k] = x.like(plus)?;
            let lp = project(&xs)?;
            let mut minus = base.clone();
            minus[i] -= eps as f32;
            let h_minus = base[i] as f64 - minus[i] as f64;
            xs[k] = x.like(minus)?;
            let lm = project(&xs)?;
            Ok((lp - lm) / (h_plus + h_minus))
        };
        let mut fd = vec![0.0f64; base.len()];
        for (i, v) in fd.iter_mut().enumerate() {
            *v = central(i, eps)?;
        }
        let mut g = g;
        if let Some(max_frac) = kinks {
            let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
            let mut skipped = 0;
            for i in 0..fd.len() {
                let coarse = central(i, eps * 4.0)?;
                if (coarse - fd[i]).abs() > rel_tol * scale {
                    // Non-differentiable here: compare nothing for this element.
                    fd[i] = 0.0;
                    g[i] = 0.0;
                    skipped += 1;
                }
            }
            kinked += skipped;
            if kinked as f64 > max_frac * total as f64 {
                bail!(
                    Msg,
                    "{kinked} of {total} input elements look non-differentiable (more than {:.0}%), last in input {k} (shape {:?})",
                    100.0 * max_frac,
                    x.shape()
                );
            }
        }
        let num: f64 = g
            .iter()
            .zip(&fd)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = fd.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-12);
        let max_fd = fd.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
        let rel = num / den;
        if std::env::var("CARP_GRAD_DEBUG").is_ok() {
            eprintln!(
                "input {k} {:?}: rel {rel:.3e}\n tape {:?}\n fd   {:?}",
                x.shape(),
                &g[..g.len().min(8)],
                &fd[..fd.len().min(8)]
            );
        }
        if rel > rel_tol {
            bail!(
                Msg,
                "input {k} (shape {:?}): relative gradient error {rel:.3e} > {rel_tol:.1e}",
                x.shape()
            );
        }
        for (i, (&a, &b)) in g.iter().zip(&fd).enumerate() {
            if (a as f64 - b).abs() > 10.0 * rel_tol * max_fd {
                bail!(
                    Msg,
                    "input {k} (shape {:?}) element {i}: tape {a} vs finite difference {b}",
                    x.shape()
                );
            }
        }
    }
    Ok(())
}

/// Max |a - b| / max(|b|_inf, floor): a relative error over a whole buffer.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: lengths differ");
    let scale = b
        .iter()
        .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-6);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
        / scale
}

/// A tape op under test: its inputs (tracked, on the test's device) to its outputs.
pub type TapeOp<'a> = dyn Fn(&mut Tape, &[Tensor]) -> Result<Vec<Tensor>> + 'a;

/// An op's results on the host: every output, and each input's gradient (`None` where the op
/// gives it none), from a backward seeded on output 0.
#[derive(Clone, Debug, PartialEq)]
pub struct TapeRun<T> {
    pub outputs: Vec<Vec<T>>,
    pub grads: Vec<Option<Vec<T>>>,
}

/// Runs `f` on `inputs` (moved to `dev`, tracked), then backward from output 0 seeded with
/// `dy` (of output 0's shape, on any device). Panics when an output or a gradient left `dev`.
pub fn run_tape_op(dev: &Device, inputs: &[Tensor], dy: &Tensor, f: &TapeOp) -> TapeRun<f32> {
    let mut tape = Tape::new();
    let xs: Vec<Tensor> = inputs
        .iter()
        .map(|t| tape.track(&t.to_device(dev).expect("input to the test device")))
        .collect();
    let outs = f(&mut tape, &xs).expect("the op under test");
    for o in &outs {
        assert_eq!(o.device(), *dev, "an output left the inputs' device");
    }
    let outputs = outs.iter().map(|o| o.to_vec().expect("download")).collect();
    let seed = dy.to_device(dev).expect("seed to the test device");
    let g = tape
        .backward_from(vec![(outs[0].clone(), seed)])
        .expect("backward");
    let grads = xs
        .iter()
        .map(|x| {
            g.get(x).map(|g| {
                assert_eq!(g.device(), *dev, "a gradient left the inputs' device");
                g.to_vec().expect("download")
            })
        })
        .collect();
    TapeRun { outputs, grads }
}

/// max |got - want| / max(|want|_inf, floor) <= tol, with the worst element in the message; a
/// non-finite value fails.
pub fn assert_rel_close(what: &str, got: &[f32], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {}", got[i]);
    }
    let scale = want.iter().fold(floor, |m, &v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w).abs();
        if d > worst {
            worst = d;
            at = i;
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.1e} (element {at}: {} vs {})",
        got[at],
        want[at]
    );
}

/// Tolerances of [`assert_rel_close`] (floor 1e-6) for an op's outputs and its gradients.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub fwd: f64,
    pub bwd: f64,
}

impl Tol {
    pub const EXACT: Tol = Tol { fwd: 0.0, bwd: 0.0 };
    pub const fn new(fwd: f64, bwd: f64) -> Tol {
        Tol { fwd, bwd }
    }
}

fn assert_run_close(what: &str, dev: &Device, got: &TapeRun<f32>, want: &TapeRun<f64>, tol: Tol) {
    assert_eq!(got.outputs.len(), want.outputs.len(), "{what}: outputs");
    for (i, (g, w)) in got.outputs.iter().zip(&want.outputs).enumerate() {
        assert_rel_close(&format!("{what} output {i} on {dev}"), g, w, tol.fwd, 1e-6);
    }
    assert_eq!(got.grads.len(), want.grads.len(), "{what}: inputs");
    for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
        match (g, w) {
            (Some(g), Some(w)) => {
                assert_rel_close(&format!("{what} d input {i} on {dev}"), g, w, tol.bwd, 1e-6)
            }
            (None, None) => {}
            (g, _) => panic!(
                "{what} on {dev}: input {i} {} a gradient and the reference {}",
                if g.is_some() { "has" } else { "has no" },
                if g.is_some() { "none" } else { "has one" },
            ),
        }
    }
}

/// The check of an op's device test, from one body on every device: the tape op `f` on `dev`
/// (outputs, and input gradients from output 0 seeded with `dy`) against its f64 reference
/// `want` within `cpu`. On a GPU the reference bound is `cpu + gpu_vs_cpu` (the triangle
/// inequality: the CPU op is within `cpu` of the reference), and the op must also match the
/// CPU op, the executable specification, within `gpu_vs_cpu`.
#[allow(clippy::too_many_arguments)]
pub fn check_tape_op(
    dev: &Device,
    what: &str,
    inputs: &[Tensor],
    dy: &Tensor,
    f: &TapeOp,
    want: &TapeRun<f64>,
    cpu: Tol,
    gpu_vs_cpu: Tol,
) {
    let got = run_tape_op(dev, inputs, dy, f);
    if *dev == Device::Cpu {
        assert_run_close(what, dev, &got, want, cpu);
        return;
    }
    let both = Tol::new(cpu.fwd + gpu_vs_cpu.fwd, cpu.bwd + gpu_vs_cpu.bwd);
    assert_run_close(what, dev, &got, want, both);
    let on_cpu = run_tape_op(&Device::Cpu, inputs, dy, f);
    let as_f64 = |v: &Vec<f32>| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    let spec = TapeRun {
        outputs: on_cpu.outputs.iter().map(as_f64).collect(),
        grads: on_cpu
            .grads
            .iter()
            .map(|g| g.as_ref().map(as_f64))
            .collect(),
    };
    assert_run_close(
        &format!("{what} (against the CPU op)"),
        dev,
        &got,
        &spec,
        gpu_vs_cpu,
    );
}

/// Widens f32 values to f64 (references take f32 inputs and compute in f64).
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_rejects_a_wrong_backward() {
        // A deliberately wrong gradient (2x the true one) must be caught.
        let x = randn(&[4, 3], 9);
        let err = check_grad(&[x], 1e-2, |tape, xs| {
            let y = xs[0].like(xs[0].to_vec()?)?;
            tape.record("double-wrong", &y, &[&xs[0]], |dy| {
                let d: Vec<f32> = dy.to_vec()?.iter().map(|v| 2.0 * v).collect();
                Ok(vec![Some(dy.like(d)?)])
            });
            Ok(y)
        });
        assert!(err.is_err(), "a wrong backward passed the gradient check");
    }

    #[test]
    fn gpu_tests_skip_only_without_a_driver_or_device() {
        let opened = std::cell::Cell::new(false);
        let open_ok = || {
            opened.set(true);
            Ok::<_, String>(7)
        };
        let v = gpu_verdict(GpuPresence::Absent("no CUDA driver".into()), open_ok);
        assert!(
            matches!(&v, GpuVerdict::Skip(w) if w == "no CUDA driver"),
            "{v:?}"
        );
        assert!(
            !opened.get(),
            "the backend was opened on a machine without a GPU"
        );
        let v = gpu_verdict(GpuPresence::Present, open_ok);
        assert!(matches!(v, GpuVerdict::Run(7)), "{v:?}");
        // A PTX module that fails to load is the test's failure, not a skip.
        let ptx = "device error: loading the PTX of kernels/conv.cu: CUDA_ERROR_INVALID_PTX";
        let v = gpu_verdict(GpuPresence::Present, || Err::<(), _>(ptx));
        assert!(
            matches!(&v, GpuVerdict::Fail(m) if m.contains(ptx)),
            "{v:?}"
        );
    }

    /// y = fwd_scale * x^2 with the recorded gradient bwd_scale * 2 x dy (or none): the true op
    /// at scales 1.
    fn square(
        fwd_scale: f32,
        bwd_scale: Option<f32>,
    ) -> impl Fn(&mut Tape, &[Tensor]) -> Result<Vec<Tensor>> {
        move |tape, xs| {
            let x = xs[0].to_vec()?;
            let y = xs[0].like(x.iter().map(|v| fwd_scale * v * v).collect())?;
            tape.record("square", &y, &[&xs[0]], move |dy| {
                let Some(k) = bwd_scale else {
                    return Ok(vec![None]);
                };
                let d: Vec<f32> = dy
                    .to_vec()?
                    .iter()
                    .zip(&x)
                    .map(|(g, v)| k * 2.0 * v * g)
                    .collect();
                Ok(vec![Some(dy.like(d)?)])
            });
            Ok(vec![y])
        }
    }

    #[test]
    fn tape_op_check_rejects_a_wrong_forward_or_backward() {
        let x = randn(&[5, 7], 21);
        let dy = randn(&[5, 7], 22);
        let (xv, dyv) = (f64s(x.cpu().unwrap()), f64s(dy.cpu().unwrap()));
        // The f64 reference of the true op.
        let want = TapeRun {
            outputs: vec![xv.iter().map(|v| v * v).collect()],
            grads: vec![Some(
                xv.iter().zip(&dyv).map(|(v, g)| 2.0 * v * g).collect(),
            )],
        };
        let tol = Tol::new(1e-6, 1e-6);
        let passes = |op: &TapeOp| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_tape_op(
                    &Device::Cpu,
                    "square",
                    std::slice::from_ref(&x),
                    &dy,
                    op,
                    &want,
                    tol,
                    tol,
                )
            }))
            .is_ok()
        };
        // The true op passes, so the rejections below are the checker's doing.
        assert!(
            passes(&square(1.0, Some(1.0))),
            "the true op failed the check"
        );
        assert!(!passes(&square(1.01, Some(1.0))), "a forward 1% off passed");
        assert!(
            !passes(&square(1.0, Some(1.01))),
            "a backward 1% off passed"
        );
        assert!(!passes(&square(1.0, None)), "a missing gradient passed");
    }
}
