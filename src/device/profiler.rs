//! `--profile-steps A:B`: the CUDA profiler API around chosen training steps, so that
//! `nsys profile --capture-range=cudaProfilerApi` records the steady state only (no cuDNN
//! autotuning, no warm-up, no evaluation).
//!
//! Steps are numbered from 1 as the logs print them; A:B profiles steps A to B inclusive. The
//! capture starts (`cuProfilerStart`) before step A's batch is uploaded and stops
//! (`cuProfilerStop`, after a device synchronization so that step B's queued kernels are in
//! the capture) after step B. On the CPU device there is no CUDA profiler: the range is
//! validated the same way, and the run goes on without capture after a one-line notice
//! ([`Profiler::notice`]), so the same command line works on both devices.

use std::str::FromStr;

use crate::device::Device;
use crate::error::{Error, Result};

/// The inclusive, 1-based step range of `--profile-steps A:B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileSteps {
    pub first: usize,
    pub last: usize,
}

impl FromStr for ProfileSteps {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let usage = "expected A:B, the first and last step to profile (counted from 1 as the \
                     logs print them), e.g. 3:5";
        let (a, b) = s.split_once(':').ok_or_else(|| format!("{s:?}: {usage}"))?;
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("{t:?} in {s:?} is not a step number: {usage}"))
        };
        let (first, last) = (num(a)?, num(b)?);
        if first == 0 {
            return Err(format!("{s:?}: steps count from 1 (the first step is 1)"));
        }
        if first > last {
            return Err(format!(
                "{s:?}: the first step {first} comes after the last step {last}; write A:B with \
                 A <= B"
            ));
        }
        Ok(ProfileSteps { first, last })
    }
}

impl std::fmt::Display for ProfileSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.first, self.last)
    }
}

impl ProfileSteps {
    /// Checks the range against a run that takes steps `done + 1 ..= total` (`done`: steps
    /// already taken, e.g. by the run being resumed).
    pub fn validate(&self, done: usize, total: usize) -> Result<()> {
        if self.last > total {
            return Err(Error::Config(format!(
                "--profile-steps {self}: the run has {total} steps; choose steps within 1:{total} \
                 (or raise --steps)"
            )));
        }
        if self.first <= done {
            return Err(Error::Config(format!(
                "--profile-steps {self}: step {} was already taken (this run continues from \
                 step {done}); choose steps after {done}",
                self.first
            )));
        }
        Ok(())
    }
}

/// Starts and stops the CUDA profiler at the chosen steps; stops it when dropped mid-range
/// (an error or `--stop-after` inside the range).
#[derive(Debug)]
pub struct Profiler {
    steps: Option<ProfileSteps>,
    device: Device,
    /// Whether a capture is open.
    active: bool,
}

impl Profiler {
    /// A profiler for `steps` on `device`; `None` never starts a capture.
    pub fn new(steps: Option<ProfileSteps>, device: &Device) -> Result<Profiler> {
        if let (Some(_), Device::Cuda(_)) = (steps, device) {
            check_driver()?;
        }
        Ok(Profiler {
            steps,
            device: device.clone(),
            active: false,
        })
    }

    /// The line to print when the range cannot be captured on this device (the CPU).
    pub fn notice(&self) -> Option<String> {
        match (self.steps, &self.device) {
            (Some(s), Device::Cpu) => Some(format!(
                "--profile-steps {s}: the CPU device has no CUDA profiler; running without a \
                 capture range"
            )),
            _ => None,
        }
    }

    /// Whether the range is open now (on the CPU nothing is captured while it is).
    pub fn is_capturing(&self) -> bool {
        self.active
    }

    /// Call before step `step` (1-based) begins: opens the capture at the range's first step.
    pub fn before_step(&mut self, step: usize) -> Result<()> {
        if self.steps.is_some_and(|s| s.first == step) && !self.active {
            start(&self.device)?;
            self.active = true;
        }
        Ok(())
    }

    /// Call after step `step` (1-based) ends: closes the capture at the range's last step.
    pub fn after_step(&mut self, step: usize) -> Result<()> {
        if self.active && self.steps.is_some_and(|s| s.last == step) {
            self.active = false;
            stop(&self.device)?;
        }
        Ok(())
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.active {
            let _ = stop(&self.device);
        }
    }
}

#[cfg(feature = "cuda")]
fn check_driver() -> Result<()> {
    // SAFETY: only tries to dlopen libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Device(
            "--profile-steps: no CUDA driver (libcuda.so) found; use it on a machine with an \
             NVIDIA driver"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check_driver() -> Result<()> {
    Err(Error::Device(
        "--profile-steps on a CUDA device: this build has no CUDA support (rebuild with \
         --features cuda)"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn start(device: &Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        let be = super::cuda::backend(*i)?;
        be.context()
            .bind_to_thread()
            .map_err(|e| Error::Device(format!("cuProfilerStart: binding the context: {e}")))?;
        // SAFETY: the driver library is loaded (check_driver) and this device's context is
        // current on this thread; cuProfilerStart takes no arguments.
        unsafe { cudarc::driver::sys::cuProfilerStart() }
            .result()
            .map_err(|e| Error::Device(format!("cuProfilerStart: {e}")))?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn stop(device: &Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        let be = super::cuda::backend(*i)?;
        // The last step's kernels may still be queued; the capture must include them.
        be.synchronize()?;
        be.context()
            .bind_to_thread()
            .map_err(|e| Error::Device(format!("cuProfilerStop: binding the context: {e}")))?;
        // SAFETY: as in `start`: the library is loaded and the context current.
        unsafe { cudarc::driver::sys::cuProfilerStop() }
            .result()
            .map_err(|e| Error::Device(format!("cuProfilerStop: {e}")))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn start(_device: &Device) -> Result<()> {
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn stop(_device: &Device) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_explains_bad_ones() {
        let p = |s: &str| s.parse::<ProfileSteps>();
        assert_eq!(p("3:5"), Ok(ProfileSteps { first: 3, last: 5 }));
        assert_eq!(p(" 7 : 7 "), Ok(ProfileSteps { first: 7, last: 7 }));
        for (bad, says) in [
            ("3", "expected A:B"),
            ("3-5", "expected A:B"),
            ("a:5", "not a step number"),
            ("3:", "not a step number"),
            ("-1:2", "not a step number"),
            ("0:2", "count from 1"),
            ("5:3", "comes after"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn validates_against_the_run() {
        let r = ProfileSteps { first: 3, last: 5 };
        assert!(r.validate(0, 5).is_ok());
        assert!(r.validate(2, 10).is_ok());
        let e = r.validate(0, 4).unwrap_err().to_string();
        assert!(e.contains("4 steps") && e.contains("1:4"), "{e}");
        let e = r.validate(3, 10).unwrap_err().to_string();
        assert!(e.contains("already taken"), "{e}");
    }

    #[test]
    fn the_cpu_runs_without_a_capture_and_says_so() {
        let mut p = Profiler::new(Some(ProfileSteps { first: 2, last: 3 }), &Device::Cpu).unwrap();
        assert!(p.notice().unwrap().contains("no CUDA profiler"));
        for step in 1..=4 {
            p.before_step(step).unwrap();
            // Open from the first step's start to the last step's end, and only then.
            assert_eq!(p.is_capturing(), (2..=3).contains(&step), "step {step}");
            p.after_step(step).unwrap();
            assert_eq!(p.is_capturing(), step == 2, "after step {step}");
        }
        assert!(Profiler::new(None, &Device::Cpu)
            .unwrap()
            .notice()
            .is_none());
    }
}
