//! The tape: ops record a backward closure as they run forward; `backward` replays the
//! closures in reverse, accumulating gradients by tensor id.
//!
//! Each op lives in one file under `src/ops/` as an `impl Tape { pub fn op(..) }` block: it
//! computes the forward through the backend, then calls [`Tape::record`] with the inputs it
//! differentiates and a closure that maps the output gradient to the inputs' gradients.
//! A tape made with [`Tape::no_grad`] records nothing and keeps no activations alive (the EMA
//! teacher's forward).

use std::collections::{HashMap, HashSet};

use crate::bail;
use crate::error::Result;
use crate::tensor::{Tensor, TensorId};

/// Maps the output gradient to one optional gradient per recorded input (same order).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + Send>;

struct Node {
    op: &'static str,
    out: TensorId,
    inputs: Vec<TensorId>,
    backward: BackwardFn,
}

pub struct Tape {
    recording: bool,
    nodes: Vec<Node>,
    /// Tensors whose gradient is wanted: leaves marked with `track`, and every recorded
    /// output that depends on one.
    tracked: HashSet<TensorId>,
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
            nodes: Vec::new(),
            tracked: HashSet::new(),
        }
    }

    /// A tape that records nothing: ops run forward only.
    pub fn no_grad() -> Tape {
        Tape {
            recording: false,
            ..Tape::new()
        }
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
            let sum = crate::ops::elementwise::add_tensors(&prev, &g)?;
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
