//! The memory a run needs, estimated before it starts, and the refusal of a run that cannot fit.
//!
//! The per-image cost comes from measurement, not from a model of the network: training steps
//! and forwards of the run's own model at small batches and sizes on the CPU, counted by the CPU
//! tensor-storage counter (`tensor::cpu_storage_bytes`, the measure `peak_live_bytes` reports
//! during training). Two ways, the larger per-image figure is taken:
//! - a step's peak, `fixed + batch * per_image`: two batches at one size give the per-image bytes
//!   at that size. This includes backward's transients, but where the probe's few images hold
//!   less than the gradients (ResNet50 at 32 pixels), the peak sits at the end of backward,
//!   where the activations are gone, and the slope says too little;
//! - the activations the student's forward leaves on the tape per image (what
//!   `tests/memory.rs` measures), the start-of-backward figure, which adds up exactly.
//!
//! When the run's size is above [`PROBE_MAX`], measurements at two sizes split the per-image
//! bytes into a part that grows with the pixels and one that does not (head, logits),
//! `per_image(S) = a S^2 + c`, extrapolated to the run's size. Added: the parameters,
//! gradients, BN statistics, teacher and LARS momentum (counted from the state), and on the CPU
//! the loader's finished batches in flight.
//!
//! On a GPU, a bf16 run stores activations in bf16 (half the per-image bytes), the caching
//! allocator rounds requests up (at most 1/8), and the cuDNN workspace takes up to 1 GiB.
//! A GPU run is checked against the GPU's free memory only (the host keeps a copy of the state
//! and the loader's batches besides). Not counted: the k-NN evaluation (no tape, one batch of
//! 256 at a time).

use crate::autograd::Precision;
use crate::error::{Error, Result};
use crate::tensor::{cpu_storage_bytes, reset_cpu_storage_peak, Device};
use crate::train::config::TrainConfig;
use crate::train::step::CarpState;

/// Runs at this size or below are measured at their own size; larger ones are extrapolated from
/// measurements at `PROBE_MAX / 2` and `PROBE_MAX` (multiples of ResNet's total stride 32).
pub const PROBE_MAX: usize = 64;
/// The batches the probe steps use (batch norm needs 2).
const PROBE_BATCHES: [usize; 2] = [2, 4];
/// Finished batches the training loader holds at once: its prefetch queue (4) and the one being
/// filled.
const LOADER_BATCHES: usize = 5;
/// The most the GPU pool rounds a request up (power-of-two buckets split in 8).
const GPU_POOL_ROUNDING: f64 = 1.125;
/// The cuDNN workspace limit (device::cuda::dnn), kept for the whole run.
const GPU_WORKSPACE_BYTES: f64 = (1u64 << 30) as f64;

/// What a run needs, in bytes, on the device it runs on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryEstimate {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub batch: usize,
    pub image_size: usize,
    /// The step's bytes per image at the run's size (saved activations, the views, per-image
    /// head and loss tensors).
    pub per_image_bytes: f64,
    /// `batch * per_image_bytes`.
    pub activation_bytes: f64,
    /// The step's tensors that do not grow with the batch (parameter copies on the tape,
    /// gradients, normalized prototypes).
    pub step_fixed_bytes: f64,
    /// Parameters, gradients and BN statistics of student and teacher, LARS momentum.
    pub state_bytes: f64,
    /// The loader's finished batches (CPU), or the cuDNN workspace (GPU).
    pub other_bytes: f64,
    pub total_bytes: f64,
    /// Free memory on the device now, when known.
    pub available_bytes: Option<f64>,
    /// Where `available_bytes` comes from (or why it is unknown).
    pub available_source: String,
}

impl MemoryEstimate {
    /// Whether the estimate exceeds the memory available (false when that is unknown).
    pub fn exceeds_available(&self) -> bool {
        self.available_bytes.is_some_and(|a| self.total_bytes > a)
    }

    /// One line: the total, its parts and the memory available.
    pub fn summary(&self) -> String {
        let avail = match self.available_bytes {
            Some(a) => format!("{} available ({})", bytes(a), self.available_source),
            None => format!("available memory unknown ({})", self.available_source),
        };
        format!(
            "{} on {} ({}); {avail}",
            bytes(self.total_bytes),
            self.device,
            self.parts()
        )
    }

    /// The parts of the total.
    pub fn parts(&self) -> String {
        let other = if self.device == "cpu" {
            "loader batches"
        } else {
            "cuDNN workspace"
        };
        format!(
            "activations {} = batch {} x {} per image at {}x{}, parameters and optimizer \
             state {}, other step tensors {}, {other} {}",
            bytes(self.activation_bytes),
            self.batch,
            bytes(self.per_image_bytes),
            self.image_size,
            self.image_size,
            bytes(self.state_bytes),
            bytes(self.step_fixed_bytes),
            bytes(self.other_bytes),
        )
    }
}

/// `n` bytes with a binary unit, e.g. `1.50 GiB`.
pub fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n.max(0.0);
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// The peak CPU tensor bytes of one training step of `state` at `batch` images of side `size`
/// (and `locals` local views of side `local_size`), above what was alive before it.
fn probe_step(
    state: &mut CarpState,
    batch: usize,
    size: usize,
    locals: usize,
    local_size: usize,
) -> Result<f64> {
    let base = cpu_storage_bytes().0 as f64;
    reset_cpu_storage_peak();
    {
        let v1 = crate::testutil::randn(&[batch, 3, size, size], 1);
        let v2 = crate::testutil::randn(&[batch, 3, size, size], 2);
        let lv = (locals > 0)
            .then(|| crate::testutil::randn(&[locals * batch, 3, local_size, local_size], 3));
        // lr 0: the probe measures, the weights it changes are thrown away anyway.
        state.train_step_multi(&v1, &v2, lv.as_ref(), 0.0, 0.99)?;
    }
    Ok(cpu_storage_bytes().1 as f64 - base)
}

/// The bytes per image that one training forward of the student leaves alive on the tape (its
/// input included) at side `size`: the slope between `PROBE_BATCHES`.
fn probe_forward(net: &crate::nn::Network, size: usize) -> Result<f64> {
    let mut saved = [0.0; 2];
    for (i, n) in PROBE_BATCHES.into_iter().enumerate() {
        let mut tape = crate::autograd::Tape::new();
        let leaves = net.params.leaves(&mut tape)?;
        let base = cpu_storage_bytes().0 as f64;
        let x = crate::testutil::randn(&[n, 3, size, size], 4);
        let out = net.forward(&mut tape, &leaves, &x, true)?;
        saved[i] = cpu_storage_bytes().0 as f64 - base;
        drop((out, x, leaves, tape));
    }
    let [b1, b2] = PROBE_BATCHES;
    Ok((saved[1] - saved[0]) / (b2 - b1) as f64)
}

/// `per_image(S) = a S^2 + c` through measurements at sides `s1 < s2`, at side `s`.
fn extrapolate(m1: f64, s1: usize, m2: f64, s2: usize, s: usize) -> f64 {
    let area = |x: usize| (x * x) as f64;
    let a = ((m2 - m1) / (area(s2) - area(s1))).max(0.0);
    a * area(s) + (m1 - a * area(s1))
}

/// Estimates the memory `cfg` needs on `device` (probe steps on the CPU: well under a second
/// for the tiny model, a few seconds for ResNet50) and reads the memory available there.
pub fn estimate(cfg: &TrainConfig, device: &Device) -> Result<MemoryEstimate> {
    let mut state = CarpState::new(&cfg.model, cfg.nb, 0.0, cfg.seed)?;
    let f = |v: &Vec<f32>| v.len() as f64 * 4.0;
    let state_bytes = [&state.student, &state.teacher]
        .iter()
        .map(|n| f(&n.params.data) + f(&n.params.grad) + f(&n.buffers.data) + f(&n.buffers.grad))
        .sum::<f64>()
        + f(&state.lars.momentum_buf);

    let (s, l) = (cfg.image_size, cfg.local_crops);
    let local_at = |probe: usize| {
        // The local views keep their ratio to the global ones (>= 8, the smallest allowed).
        ((cfg.local_size * probe) as f64 / s as f64)
            .round()
            .max(8.0) as usize
    };
    let [b1, b2] = PROBE_BATCHES;
    // Per image of the whole step from its peak: (at the first probe size, at the run's size),
    // and the peak of the first probe.
    let (step1, step_s, p1) = if s <= PROBE_MAX {
        let ls = cfg.local_size;
        let p1 = probe_step(&mut state, b1, s, l, ls)?;
        let p2 = probe_step(&mut state, b2, s, l, ls)?;
        let per = (p2 - p1) / (b2 - b1) as f64;
        (per, per, p1)
    } else {
        let (s1, s2) = (PROBE_MAX / 2, PROBE_MAX);
        let p1 = probe_step(&mut state, b1, s1, l, local_at(s1))?;
        let p2 = probe_step(&mut state, b2, s1, l, local_at(s1))?;
        let p3 = probe_step(&mut state, b1, s2, l, local_at(s2))?;
        let per1 = (p2 - p1) / (b2 - b1) as f64;
        let per2 = per1 + (p3 - p1) / b1 as f64;
        (per1, extrapolate(per1, s1, per2, s2, s), p1)
    };
    // The same from the forward's saved activations: two global views and the local ones.
    let fwd_at = |size: usize| -> Result<f64> {
        if size <= PROBE_MAX {
            probe_forward(&state.student, size)
        } else {
            let (s1, s2) = (PROBE_MAX / 2, PROBE_MAX);
            let (m1, m2) = (
                probe_forward(&state.student, s1)?,
                probe_forward(&state.student, s2)?,
            );
            Ok(extrapolate(m1, s1, m2, s2, size))
        }
    };
    let first = if s <= PROBE_MAX { s } else { PROBE_MAX / 2 };
    let fwd = |size: usize, local: usize| -> Result<f64> {
        let locals = if l > 0 {
            l as f64 * fwd_at(local)?
        } else {
            0.0
        };
        Ok(2.0 * fwd_at(size)? + locals)
    };
    let local_first = if s <= PROBE_MAX {
        cfg.local_size
    } else {
        local_at(first)
    };
    let fwd1 = fwd(first, local_first)?;
    let fwd_s = if s <= PROBE_MAX {
        fwd1
    } else {
        fwd(s, cfg.local_size)?
    };
    let (per1, per_image) = (step1.max(fwd1), step_s.max(fwd_s));
    let fixed = p1 - b1 as f64 * per1;
    // The probes' peak is not the run's: the training loop reports its own from here.
    reset_cpu_storage_peak();
    let (per_image, fixed) = (per_image.max(0.0), fixed.max(0.0));

    let batch = cfg.batch;
    let (per_image, step_fixed, other, state_bytes) = match device {
        Device::Cpu => {
            let view_floats = 3.0 * (2.0 * (s * s) as f64 + (l * cfg.local_size.pow(2)) as f64);
            let loader = LOADER_BATCHES as f64 * batch as f64 * view_floats * 4.0;
            (per_image, fixed, loader, state_bytes)
        }
        Device::Cuda(_) => {
            let act = if cfg.precision == Precision::Bf16 {
                0.5
            } else {
                1.0
            };
            (
                per_image * act * GPU_POOL_ROUNDING,
                fixed * GPU_POOL_ROUNDING,
                GPU_WORKSPACE_BYTES,
                state_bytes * GPU_POOL_ROUNDING,
            )
        }
    };
    let activation_bytes = batch as f64 * per_image;
    let (available_bytes, available_source) = available(device);
    Ok(MemoryEstimate {
        device: device.to_string(),
        batch,
        image_size: s,
        per_image_bytes: per_image,
        activation_bytes,
        step_fixed_bytes: step_fixed,
        state_bytes,
        other_bytes: other,
        total_bytes: activation_bytes + step_fixed + state_bytes + other,
        available_bytes,
        available_source,
    })
}

/// Free memory on `device` and where the number comes from: the CPU's `MemAvailable`
/// (/proc/meminfo), a GPU's free memory (cuMemGetInfo).
pub fn available(device: &Device) -> (Option<f64>, String) {
    match device {
        Device::Cpu => match std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_mem_available(&s))
        {
            Some(b) => (Some(b as f64), "MemAvailable in /proc/meminfo".into()),
            None => (None, "no MemAvailable in /proc/meminfo".into()),
        },
        Device::Cuda(i) => match device.gpu_free_bytes() {
            Ok(free) => (
                free.map(|b| b as f64),
                format!("free on cuda:{i}, cuMemGetInfo"),
            ),
            Err(e) => (None, e.to_string()),
        },
    }
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line.split_whitespace().skip(1);
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => Some(n * 1024),
        None => Some(n),
        _ => None,
    }
}

/// Refuses a run whose estimate exceeds the memory available, with what to lower; with
/// `force` the run starts and the returned line (a warning) says it may not fit.
pub fn check(est: &MemoryEstimate, force: bool) -> Result<Option<String>> {
    if !est.exceeds_available() {
        return Ok(None);
    }
    let what = if est.device == "cpu" {
        "CPU memory"
    } else {
        "GPU memory"
    };
    let msg = format!(
        "this run needs about {} of {what} ({}), more than the {} available ({})",
        bytes(est.total_bytes),
        est.parts(),
        bytes(est.available_bytes.unwrap_or(0.0)),
        est.available_source
    );
    if force {
        return Ok(Some(format!("warning: {msg}; starting anyway (--force)")));
    }
    Err(Error::Msg(format!(
        "{msg}.\nLower --batch or --image-size (activations grow with the batch and with the \
         square of the size; with multi-crop also --local-crops or --local-size), use a smaller \
         --arch or --precision bf16 on a GPU, or pass --force to start anyway"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_and_formats_bytes() {
        let text =
            "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(parse_mem_available(text), Some(8_192_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.50 KiB");
        assert_eq!(bytes(3.0 * (1u64 << 40) as f64), "3.00 TiB");
    }

    #[test]
    fn refuses_only_above_the_available_memory_and_force_overrides() {
        let est = |total: f64, avail: Option<f64>| MemoryEstimate {
            device: "cpu".into(),
            batch: 8,
            image_size: 32,
            per_image_bytes: total / 16.0,
            activation_bytes: total / 2.0,
            step_fixed_bytes: total / 4.0,
            state_bytes: total / 4.0,
            other_bytes: 0.0,
            total_bytes: total,
            available_bytes: avail,
            available_source: "test".into(),
        };
        assert!(check(&est(1e9, Some(2e9)), false).unwrap().is_none());
        assert!(check(&est(1e9, None), false).unwrap().is_none());
        let e = check(&est(4e9, Some(2e9)), false).unwrap_err().to_string();
        assert!(
            e.contains("3.73 GiB") && e.contains("1.86 GiB") && e.contains("--force"),
            "{e}"
        );
        assert!(e.contains("--batch") && e.contains("--image-size"), "{e}");
        let w = check(&est(4e9, Some(2e9)), true).unwrap().unwrap();
        assert!(w.starts_with("warning:") && w.contains("--force"), "{w}");
    }
}
