//! The flat parameter store: every trainable tensor is a named view into one f32 buffer, and
//! its gradient a view into a second buffer of the same layout. LARS and the EMA then run as
//! passes over whole buffers, checkpoints write the named views, and a multi-GPU all-reduce is
//! one call. BN running statistics live in a second store of the same type (no gradients used).

use std::collections::HashMap;

use crate::autograd::{Gradients, Tape};
use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Index of a tensor in a store.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    /// torchvision-style name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Offset in elements into the flat buffer.
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl ParamEntry {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// 1-d tensors (biases, BN gamma/beta) get neither weight decay nor LARS adaptation.
    pub fn is_1d(&self) -> bool {
        self.shape.len() <= 1
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    pub entries: Vec<ParamEntry>,
    /// All values, entry after entry.
    pub data: Vec<f32>,
    /// Gradients, same layout as `data`; accumulate until `zero_grad`.
    pub grad: Vec<f32>,
    index: HashMap<String, ParamId>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a named tensor with its initial values.
    pub fn add(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<ParamId> {
        let n: usize = shape.iter().product();
        if values.len() != n {
            bail!(
                Shape,
                "parameter {name}: shape {shape:?} needs {n} values, got {}",
                values.len()
            );
        }
        if self.index.contains_key(name) {
            bail!(Msg, "parameter {name} registered twice");
        }
        let id = ParamId(self.entries.len());
        self.entries.push(ParamEntry {
            name: name.to_string(),
            offset: self.data.len(),
            shape: shape.to_vec(),
        });
        self.data.extend_from_slice(&values);
        self.grad.resize(self.data.len(), 0.0);
        self.index.insert(name.to_string(), id);
        Ok(id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Number of scalars in entries whose name starts with `prefix`.
    pub fn numel_with_prefix(&self, prefix: &str) -> usize {
        self.entries
            .iter()
            .filter(|e| e.name.starts_with(prefix))
            .map(|e| e.len())
            .sum()
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }
    pub fn entry(&self, id: ParamId) -> &ParamEntry {
        &self.entries[id.0]
    }
    pub fn view(&self, id: ParamId) -> &[f32] {
        &self.data[self.entries[id.0].range()]
    }
    pub fn view_mut(&mut self, id: ParamId) -> &mut [f32] {
        let r = self.entries[id.0].range();
        &mut self.data[r]
    }
    pub fn grad_view(&self, id: ParamId) -> &[f32] {
        &self.grad[self.entries[id.0].range()]
    }

    /// A tensor holding a copy of one entry.
    pub fn tensor(&self, id: ParamId) -> Result<Tensor> {
        Tensor::from_vec(self.view(id).to_vec(), &self.entries[id.0].shape)
    }

    /// Replaces one entry's values (e.g. BN running statistics after a step).
    pub fn set(&mut self, id: ParamId, t: &Tensor) -> Result<()> {
        t.expect_shape(&self.entries[id.0].name, &self.entries[id.0].shape.clone())?;
        let v = t.to_vec()?;
        self.view_mut(id).copy_from_slice(&v);
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }

    /// Tensors for every entry, tracked on `tape` (the leaves of a forward pass).
    pub fn leaves(&self, tape: &mut Tape) -> Result<ParamLeaves> {
        self.leaves_on(tape, &Device::Cpu)
    }

    /// One entry's values as a tensor on `device`.
    pub fn tensor_on(&self, id: ParamId, device: &Device) -> Result<Tensor> {
        self.tensor(id)?.to_device(device)
    }

    /// Like [`ParamStore::leaves`], with the tensors on `device` (`ops::flat::split_flat`: on a
    /// GPU one upload of the whole store per call, i.e. per forward). Training steps on a GPU
    /// use the device-resident state instead (`resident`); this is for evaluation and CPU
    /// steps.
    pub fn leaves_on(&self, tape: &mut Tape, device: &Device) -> Result<ParamLeaves> {
        let tensors = crate::ops::flat::split_flat(&self.data, &self.flat_entries(), device)?;
        Ok(ParamLeaves(tensors.iter().map(|t| tape.track(t)).collect()))
    }

    /// (offset, shape) of every entry in the flat store, in order.
    pub fn flat_entries(&self) -> Vec<(usize, &[usize])> {
        self.entries
            .iter()
            .map(|e| (e.offset, &e.shape[..]))
            .collect()
    }

    /// This step's gradients of the leaves, each with its entry's offset in the flat store and
    /// checked against the entry's shape; entries without a gradient are left out.
    pub fn leaf_grads<'g>(
        &self,
        leaves: &ParamLeaves,
        grads: &'g Gradients,
    ) -> Result<Vec<(usize, &'g Tensor)>> {
        if leaves.0.len() != self.entries.len() {
            bail!(
                Shape,
                "{} leaves for a parameter store of {} entries",
                leaves.0.len(),
                self.entries.len()
            );
        }
        let mut out = Vec::with_capacity(leaves.0.len());
        for (e, t) in self.entries.iter().zip(&leaves.0) {
            if let Some(g) = grads.get(t) {
                g.expect_shape(&format!("gradient of {}", e.name), &e.shape)?;
                out.push((e.offset, g));
            }
        }
        Ok(out)
    }

    /// Adds the leaves' gradients into `grad` (parameter gradients accumulate); gradients on a
    /// GPU are downloaded in one copy (`ops::flat::add_flat_into`).
    pub fn accumulate_grads(&mut self, leaves: &ParamLeaves, grads: &Gradients) -> Result<()> {
        let parts = self.leaf_grads(leaves, grads)?;
        crate::ops::flat::add_flat_into(&parts, &mut self.grad)
    }

    /// (offset, len, is_1d) per entry: the segment table of the GPU LARS plan.
    pub fn segments(&self) -> Vec<(usize, usize, bool)> {
        self.entries
            .iter()
            .map(|e| (e.offset, e.len(), e.is_1d()))
            .collect()
    }

    /// Same names, shapes and offsets (student and teacher must agree for the EMA).
    pub fn same_layout(&self, other: &ParamStore) -> bool {
        self.entries == other.entries
    }
}

/// The per-entry tensors of one forward pass, indexed by `ParamId`.
pub struct ParamLeaves(pub Vec<Tensor>);

impl std::ops::Index<ParamId> for ParamLeaves {
    type Output = Tensor;
    fn index(&self, id: ParamId) -> &Tensor {
        &self.0[id.0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_contiguous_and_named() {
        let mut s = ParamStore::new();
        let a = s
            .add("a.weight", &[2, 3], (0..6).map(|v| v as f32).collect())
            .unwrap();
        let b = s.add("a.bias", &[3], vec![7.0, 8.0, 9.0]).unwrap();
        assert_eq!(s.numel(), 9);
        assert_eq!(s.view(b), &[7.0, 8.0, 9.0]);
        assert!(!s.entry(a).is_1d() && s.entry(b).is_1d());
        assert_eq!(s.id("a.bias"), Some(b));
        assert!(s.add("a.bias", &[1], vec![0.0]).is_err());
        assert!(s.add("c", &[2], vec![0.0]).is_err());
    }
}
