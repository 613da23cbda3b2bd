//! The flat parameter store of `nn::params` (one f32 host buffer, the entries at their
//! offsets) and the per-entry tensors of a forward pass, on a device: the only place where that
//! store meets a backend.

use crate::bail;
use crate::error::Result;
use crate::ops::Backend;
use crate::tensor::{Device, Tensor};

/// One tensor per entry `(offset, shape)` of the host buffer `flat`, on `device`: on the CPU a
/// copy of each range; on a GPU one upload of the whole buffer (one wait), then one
/// stream-ordered device copy per entry into its own tensor.
pub fn split_flat(
    flat: &[f32],
    entries: &[(usize, &[usize])],
    device: &Device,
) -> Result<Vec<Tensor>> {
    check_entries(entries, flat.len())?;
    match Backend::on(device)? {
        Backend::Cpu => entries
            .iter()
            .map(|&(offset, shape)| {
                let len: usize = shape.iter().product();
                Tensor::from_vec(flat[offset..offset + len].to_vec(), shape)
            })
            .collect(),
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let dflat = be.upload_f32(flat)?; // (numel,)
            split_flat_gpu(&be, &dflat, entries)
        }
    }
}

/// Adds each tensor `g` of `parts` `(offset, g)` into the host buffer `acc` at its offset
/// (parameter gradients accumulate). On the CPU range by range; when any gradient is on a GPU,
/// all are gathered into one flat device buffer there (zeros elsewhere; a CPU gradient among
/// them is uploaded into its range), downloaded once and added whole.
pub fn add_flat_into(parts: &[(usize, &Tensor)], acc: &mut [f32]) -> Result<()> {
    check_parts("add_flat_into", parts, acc.len())?;
    let on_gpu = parts.iter().find(|(_, g)| g.device() != Device::Cpu);
    let backend = match on_gpu {
        Some((_, g)) => Backend::of("add_flat_into", &[g])?,
        None => Backend::Cpu,
    };
    match backend {
        Backend::Cpu => {
            for &(offset, g) in parts {
                let g = g.to_vec()?;
                for (d, s) in acc[offset..offset + g.len()].iter_mut().zip(g) {
                    *d += s;
                }
            }
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(be) => {
            let mut dflat = be.alloc_f32(acc.len())?; // (numel,)
            gather_flat_gpu(&be, parts, &mut dflat)?;
            for (d, s) in acc.iter_mut().zip(be.download_f32(&dflat)?) {
                *d += s;
            }
        }
    }
    Ok(())
}

/// One tensor per entry `(offset, shape)` of the flat f32 device buffer `dflat`: one
/// stream-ordered device copy each (copies, not views: the owner may rewrite `dflat` in place
/// while a tensor is alive). Nothing waits for the device. Shared with the device-resident
/// training state's leaves (`resident`).
#[cfg(feature = "cuda")]
pub(crate) fn split_flat_gpu(
    be: &std::sync::Arc<crate::device::cuda::CudaBackend>,
    dflat: &crate::device::cuda::DeviceBuffer,
    entries: &[(usize, &[usize])],
) -> Result<Vec<Tensor>> {
    check_entries(entries, dflat.len32())?;
    let mut out = Vec::with_capacity(entries.len());
    for &(offset, shape) in entries {
        let len: usize = shape.iter().product();
        let mut buf = be.alloc_f32(len)?; // shape
        be.copy_dtod_range(dflat, offset * 4, &mut buf, 0, len * 4)?;
        out.push(Tensor::from_cuda(buf, be.clone(), shape)?);
    }
    Ok(out)
}

/// The tensors of `parts` `(offset, g)` into the flat f32 device buffer `dflat` at their
/// offsets, zeros elsewhere: a fill, then one stream-ordered device copy per part (a CPU
/// tensor among them is uploaded into its range). Nothing waits for the device. Shared with
/// the device-resident training state's gradient (`resident`).
#[cfg(feature = "cuda")]
pub(crate) fn gather_flat_gpu(
    be: &crate::device::cuda::CudaBackend,
    parts: &[(usize, &Tensor)],
    dflat: &mut crate::device::cuda::DeviceBuffer,
) -> Result<()> {
    use crate::tensor::{DType, Layout, Storage};
    check_parts("gather_flat", parts, dflat.len32())?;
    be.fill(dflat, 0.0)?;
    for &(offset, g) in parts {
        // The flat buffer is f32 NCHW: a gradient in another format is converted, not copied
        // as raw bytes.
        let g = g.to_format(DType::F32, Layout::Nchw)?;
        let bytes = g.numel() * 4;
        match g.storage() {
            Storage::Cuda(c) => be.copy_dtod_range(&c.buf, 0, dflat, offset * 4, bytes)?,
            Storage::Cpu(v) => {
                let up = be.upload_f32(v)?;
                be.copy_dtod_range(&up, 0, dflat, offset * 4, bytes)?
            }
        }
    }
    Ok(())
}

/// An error unless every entry `(offset, shape)` lies inside a flat buffer of `len`.
fn check_entries(entries: &[(usize, &[usize])], len: usize) -> Result<()> {
    for &(offset, shape) in entries {
        if offset + shape.iter().product::<usize>() > len {
            bail!(
                Shape,
                "split_flat: entry {shape:?} at offset {offset} past the {len}-value buffer"
            );
        }
    }
    Ok(())
}

/// An error naming `op` unless every part `(offset, g)` lies inside a flat buffer of `len`.
fn check_parts(op: &str, parts: &[(usize, &Tensor)], len: usize) -> Result<()> {
    for &(offset, g) in parts {
        if offset + g.numel() > len {
            bail!(
                Shape,
                "{op}: a {:?} tensor at offset {offset} past the {len}-value buffer",
                g.shape()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_device;
    use crate::testutil::randn_vec;

    /// The entries of a flat buffer as tensors on `dev`, then added back into a host buffer
    /// at their offsets: each range equals its slice, and what lies outside every entry is
    /// left untouched.
    fn split_then_add_back(dev: &Device) {
        let flat = randn_vec(12, 7); // (12,)
        let (a, b): (&[usize], &[usize]) = (&[2, 3], &[4]);
        let t = split_flat(&flat, &[(0, a), (7, b)], dev).unwrap();
        assert_eq!((t[0].shape(), t[1].shape()), (a, b));
        assert_eq!(t[0].device(), *dev);
        assert_eq!(t[0].to_vec().unwrap(), &flat[..6]);
        assert_eq!(t[1].to_vec().unwrap(), &flat[7..11]);
        let mut acc = vec![1.0f32; 12];
        add_flat_into(&[(0, &t[0]), (7, &t[1])], &mut acc).unwrap();
        for (i, (&got, &x)) in acc.iter().zip(&flat).enumerate() {
            let want = if i < 6 || (7..11).contains(&i) {
                1.0 + x
            } else {
                1.0
            };
            assert_eq!(got, want, "element {i}");
        }
        let e = split_flat(&flat, &[(10, b)], dev).unwrap_err();
        assert!(e.to_string().contains("split_flat"), "{e}");
        let e = add_flat_into(&[(9, &t[1])], &mut acc).unwrap_err();
        assert!(e.to_string().contains("add_flat_into"), "{e}");
    }
    test_device!(
        split_then_add_back,
        split_then_add_back_cpu,
        split_then_add_back_cuda
    );
}
