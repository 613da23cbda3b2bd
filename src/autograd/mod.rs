//! The tape: ops record a backward closure as they run forward; `backward` replays the
//! closures in reverse, accumulating gradients by tensor id.
//!
//! Each op lives in one file under `src/ops/` as an `impl Tape { pub fn op(..) }` block: it
//! computes the forward through the backend, then calls [`Tape::record`] with the inputs it
//! differentiates and a closure that maps the output gradient to the inputs' gradients.
//! A tape made with [`Tape::no_grad`] records nothing and keeps no activations alive (the EMA
//! teacher's forward).
//!
//! A tape also carries the numerical [`Precision`] its ops run in. In [`Precision::Bf16`] the
//! backbone and head ops emulate a bf16 GPU on the CPU: an op's rounded inputs and its output
//! are bf16 values (held in f32), arithmetic and accumulation stay f32; parameters stay f32
//! masters (rounded copies feed the ops, their gradients come back in f32), and the gradients of
//! activations are rounded to bf16 on the way back. See `Tape::bf16_inputs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::bail;
use crate::device::collective::Collective;
use crate::error::Result;
use crate::tensor::{DType, Device, Layout, Tensor, TensorId};

/// Maps the output gradient to one optional gradient per recorded input (same order).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + Send>;

struct Node {
    op: &'static str,
    out: TensorId,
    inputs: Vec<TensorId>,
    backward: BackwardFn,
}

/// The layout of bf16 GPU activations: channels-last (NHWC, the layout of cuDNN's fastest bf16
/// convolutions) unless the run option `bf16_layout` says nchw. f32 tensors are always NCHW.
pub fn bf16_nhwc() -> bool {
    crate::options::current().bf16_layout == crate::options::Bf16Layout::Nhwc
}

/// How an op runs in bf16 mode on a GPU (see [`Tape::bf16_inputs`]); the CPU emulation is the
/// same either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bf16Path {
    /// The op has bf16 kernels: bf16 storage in and out.
    Native,
    /// The op runs its f32 kernels on f32 storage holding bf16 values; its output is narrowed.
    ViaF32,
}

/// The numerical mode of a tape's ops (SPEC.md, mixed precision).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the reference; bit-identical to a tape without a precision).
    #[default]
    F32,
    /// bf16 activations and matmul/conv operands with f32 accumulation; BN statistics, the
    /// loss, parameter gradients and the optimizer in f32 (emulated on the CPU).
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Precision> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => bail!(Config, "unknown precision {s:?}: use f32 or bf16"),
        }
    }
}

pub struct Tape {
    recording: bool,
    precision: Precision,
    /// Bf16 mode: tensors known to hold bf16 values already (op outputs), which an op takes
    /// as they are.
    bf16: HashSet<TensorId>,
    /// Bf16 mode: the rounded copy of each f32 tensor (a parameter, an input image) an op has
    /// taken, so a weight used several times in a step is rounded (and recorded) once.
    casts: HashMap<TensorId, Tensor>,
    nodes: Vec<Node>,
    /// Tensors whose gradient is wanted: leaves marked with `track`, and every recorded
    /// output that depends on one.
    tracked: HashSet<TensorId>,
    /// The ranks this tape's training-mode batch norms synchronize their statistics with
    /// (none: this process alone).
    collective: Option<Arc<dyn Collective>>,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    /// A tape that records.
    pub fn new() -> Tape {
        Tape {
            recording: true,
            precision: Precision::F32,
            bf16: HashSet::new(),
            casts: HashMap::new(),
            nodes: Vec::new(),
            tracked: HashSet::new(),
            collective: None,
        }
    }

    /// A tape that records nothing: ops run forward only.
    pub fn no_grad() -> Tape {
        Tape {
            recording: false,
            ..Tape::new()
        }
    }

    /// The same tape running its ops in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Tape {
        self.precision = precision;
        self
    }

    /// The same tape with its training-mode batch norms synchronized across the ranks of
    /// `collective` (statistics of the global batch, forward and backward).
    pub fn with_collective(mut self, collective: Arc<dyn Collective>) -> Tape {
        self.collective = Some(collective);
        self
    }

    /// The ranks the batch norms synchronize with, if any.
    pub fn collective(&self) -> Option<&Arc<dyn Collective>> {
        self.collective.as_ref()
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether the ops of this tape take the bf16 path: called first by every rounding op;
    /// when true the op rounds through [`Tape::bf16_inputs`], runs its f32 body through
    /// [`Tape::as_f32`] and rounds its output with [`Tape::bf16_output`].
    pub(crate) fn is_bf16(&self) -> bool {
        self.precision == Precision::Bf16
    }

    /// Bf16 mode: the bf16 operands of `op`, in order. A tensor that already holds bf16 values
    /// (another op's output) is taken as it is; any other (a parameter, an image) is replaced by
    /// a rounded copy, made once per tape and recorded with an identity backward, so the
    /// gradient of an f32 master parameter is the f32 gradient of its bf16 copy (the
    /// straight-through cast of autocast).
    ///
    /// On a GPU, `path` says how the op runs: [`Bf16Path::Native`] ops have bf16 kernels and get
    /// bf16 storage (an f32 tensor is narrowed once; the gradient of that copy comes back
    /// widened to f32); [`Bf16Path::ViaF32`] ops (cuBLAS products, GELU, ...) get f32 storage
    /// holding bf16 values (a bf16 activation is widened, exactly; a parameter is rounded once).
    /// The values, hence the numerics, are the CPU emulation's either way.
    pub(crate) fn bf16_inputs(
        &mut self,
        op: &str,
        xs: &[&Tensor],
        path: Bf16Path,
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(xs.len());
        for &x in xs {
            let on_cpu = x.device() == Device::Cpu;
            if on_cpu || path == Bf16Path::ViaF32 {
                if x.dtype() == DType::Bf16 {
                    out.push(self.widen_bf16(x)?);
                    continue;
                }
                if self.bf16.contains(&x.id()) {
                    out.push(x.clone());
                    continue;
                }
                if let Some(r) = self.casts.get(&x.id()).filter(|r| r.dtype() == DType::F32) {
                    out.push(r.clone());
                    continue;
                }
                let r = if on_cpu {
                    x.round_bf16()?
                } else {
                    x.to_dtype(DType::Bf16)?.to_dtype(DType::F32)?
                };
                self.record("to_bf16", &r, &[x], |dr| Ok(vec![Some(dr.clone())]));
                self.bf16.insert(r.id());
                self.casts.insert(x.id(), r.clone());
                out.push(r);
                continue;
            }
            // A GPU op with bf16 kernels.
            if x.dtype() == DType::Bf16 {
                out.push(x.clone());
                continue;
            }
            if let Some(r) = self.casts.get(&x.id()).filter(|r| r.dtype() == DType::Bf16) {
                out.push(r.clone());
                continue;
            }
            // Rank-4 operands (images, conv weights) go channels-last when NHWC is on; a weight
            // (O, C, KH, KW) in NHWC order is cuDNN's NHWC filter layout (O, KH, KW, C).
            let layout = if bf16_nhwc() && x.rank() == 4 {
                Layout::Nhwc
            } else {
                Layout::Nchw
            };
            let r = x.to_format(DType::Bf16, layout).map_err(|e| {
                crate::error::Error::Device(format!("{op}: bf16 copy of an input: {e}"))
            })?;
            self.record("to_bf16", &r, &[x], |dr| {
                Ok(vec![Some(dr.to_dtype(DType::F32)?)])
            });
            self.casts.insert(x.id(), r.clone());
            out.push(r);
        }
        Ok(out)
    }

    /// A bf16 GPU activation widened (exactly) to f32 storage for an op without bf16 kernels.
    /// Its gradient passes through in f32: where the activation's producer has bf16 kernels it
    /// rounds the (accumulated) gradient, as the CPU's bf16 output node does.
    ///
    /// Not cached in `casts` (unlike a parameter's rounded copy): the f32 copy is as large as
    /// the activation twice over, and the map would keep it alive until the tape is dropped
    /// even where its op does not save its input (ReLU saves only its output). A second f32
    /// consumer widens again (the same exact values; both records route their gradient to x).
    fn widen_bf16(&mut self, x: &Tensor) -> Result<Tensor> {
        let r = x.to_dtype(DType::F32)?;
        self.record("bf16_to_f32", &r, &[x], |dr| Ok(vec![Some(dr.clone())]));
        self.bf16.insert(r.id());
        Ok(r)
    }

    /// Bf16 mode: `y` (an op's f32 result) rounded to bf16, as the op would store it. Its
    /// backward rounds the incoming gradient to bf16 (a bf16 backward stores the gradients of
    /// activations in bf16; the ops' own backward still accumulates in f32). On a GPU an output
    /// already in bf16 storage (an op with bf16 kernels, whose backward rounds its incoming
    /// gradient itself) is returned as it is; an f32 one is narrowed to bf16 storage.
    pub(crate) fn bf16_output(&mut self, y: &Tensor) -> Result<Tensor> {
        if y.device() == Device::Cpu {
            let r = y.round_bf16()?;
            self.record("to_bf16", &r, &[y], |dr| Ok(vec![Some(dr.round_bf16()?)]));
            self.bf16.insert(r.id());
            return Ok(r);
        }
        if y.dtype() == DType::Bf16 {
            return Ok(y.clone());
        }
        let r = y.to_dtype(DType::Bf16)?;
        self.record("to_bf16", &r, &[y], |dr| {
            // The f32 body's backward takes f32: a bf16 gradient widens exactly, an f32 one is
            // rounded through bf16 (the CPU's `round_bf16`).
            let g = if dr.dtype() == DType::Bf16 {
                dr.to_dtype(DType::F32)?
            } else {
                dr.to_dtype(DType::Bf16)?.to_dtype(DType::F32)?
            };
            Ok(vec![Some(g)])
        });
        Ok(r)
    }

    /// Runs `body` (an op's f32 path) with the tape in f32 mode, then restores the precision.
    pub(crate) fn as_f32<R>(&mut self, body: impl FnOnce(&mut Tape) -> Result<R>) -> Result<R> {
        let saved = std::mem::replace(&mut self.precision, Precision::F32);
        let r = body(self);
        self.precision = saved;
        r
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Number of recorded nodes (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Marks a leaf (a parameter, or an input whose gradient a test wants) as requiring a
    /// gradient. Returns the tensor for chaining.
    pub fn track(&mut self, t: &Tensor) -> Tensor {
        if self.recording {
            self.tracked.insert(t.id());
        }
        t.clone()
    }

    pub fn requires_grad(&self, t: &Tensor) -> bool {
        self.tracked.contains(&t.id())
    }

    /// Records one op. Nothing is kept when the tape does not record or when no input requires
    /// a gradient (so frozen parts of a graph cost no memory). The closure must return one entry
    /// per input, in order; `None` for inputs it does not differentiate.
    pub fn record(
        &mut self,
        op: &'static str,
        out: &Tensor,
        inputs: &[&Tensor],
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + 'static,
    ) {
        if !self.recording || !inputs.iter().any(|t| self.requires_grad(t)) {
            return;
        }
        self.tracked.insert(out.id());
        self.nodes.push(Node {
            op,
            out: out.id(),
            inputs: inputs.iter().map(|t| t.id()).collect(),
            backward: Box::new(backward),
        });
    }

    /// Backward from a scalar: seeds d(loss)/d(loss) = 1.
    pub fn backward(self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            bail!(
                Shape,
                "backward() needs a scalar loss, got shape {:?}; use backward_from with explicit output gradients",
                loss.shape()
            );
        }
        let seed = Tensor::full(1.0, loss.shape(), &loss.device())?;
        self.backward_from(vec![(loss.clone(), seed)])
    }

    /// Backward from several outputs with given gradients (the CARP loss computes the gradient of
    /// the student logits analytically and seeds the backbone's backward with it).
    pub fn backward_from(self, seeds: Vec<(Tensor, Tensor)>) -> Result<Gradients> {
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        for (out, dout) in seeds {
            dout.expect_shape("backward seed", out.shape())?;
            // A seed computed elsewhere (e.g. a loss gradient on the host for GPU logits) joins
            // its output's device, so the whole backward runs there.
            let dout = dout.to_device(&out.device())?;
            accumulate(&mut grads, out.id(), dout)?;
        }
        let produced: HashSet<TensorId> = self.nodes.iter().map(|n| n.out).collect();
        for node in self.nodes.into_iter().rev() {
            // An output nobody used downstream has no gradient: skip its closure.
            let Some(dout) = grads.remove(&node.out) else {
                continue;
            };
            let dinputs = (node.backward)(&dout)
                .map_err(|e| crate::error::Error::Msg(format!("backward of {}: {e}", node.op)))?;
            if dinputs.len() != node.inputs.len() {
                bail!(
                    Msg,
                    "backward of {} returned {} gradients for {} inputs",
                    node.op,
                    dinputs.len(),
                    node.inputs.len()
                );
            }
            for (id, g) in node.inputs.into_iter().zip(dinputs) {
                if let Some(g) = g {
                    if self.tracked.contains(&id) {
                        accumulate(&mut grads, id, g)?;
                    }
                }
            }
        }
        // Keep only leaves: intermediate gradients were consumed above.
        grads.retain(|id, _| !produced.contains(id));
        Ok(Gradients(grads))
    }
}

fn accumulate(grads: &mut HashMap<TensorId, Tensor>, id: TensorId, g: Tensor) -> Result<()> {
    match grads.remove(&id) {
        None => {
            grads.insert(id, g);
        }
        Some(prev) => {
            let sum = prev.add_untracked(&g)?;
            grads.insert(id, sum);
        }
    }
    Ok(())
}

/// The gradients of the tracked leaves after a backward pass.
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    /// The gradient of a tracked leaf, or `None` if the loss does not depend on it.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
