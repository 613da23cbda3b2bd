//! IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or not.
//!
//! Big-endian: two zero bytes, a type code (0x08 = u8), the number of dimensions, then each
//! dimension as u32, then the data.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// A parsed IDX array of u8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a file, gunzipping it when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("gzip: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes (u8 data only). `path` is for error messages.
pub fn parse_idx(path: &Path, b: &[u8]) -> Result<IdxArray> {
    if b.len() < 4 {
        return Err(Error::format(path, "truncated IDX file (no header)"));
    }
    if b[0] != 0 || b[1] != 0 {
        return Err(Error::format(
            path,
            "not an IDX file (the first two bytes must be zero)",
        ));
    }
    if b[2] != 0x08 {
        return Err(Error::format(
            path,
            format!("IDX type code 0x{:02x}; only u8 (0x08) is supported", b[2]),
        ));
    }
    let nd = b[3] as usize;
    if nd == 0 || nd > 4 {
        return Err(Error::format(path, format!("IDX with {nd} dimensions")));
    }
    let hdr = 4 + 4 * nd;
    if b.len() < hdr {
        return Err(Error::format(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            u32::from_be_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::format(path, format!("IDX dimensions {dims:?} overflow")))?;
    if b.len() - hdr != n {
        return Err(Error::format(
            path,
            format!(
                "IDX dimensions {dims:?} need {n} data bytes, the file has {}",
                b.len() - hdr
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: b[hdr..].to_vec(),
    })
}

/// Reads an images file (N, H, W) and a labels file (N); checks they agree.
/// Returns (images (N, H, W) u8, H, W, labels).
pub fn read_idx_pair(images: &Path, labels: &Path) -> Result<(Vec<u8>, usize, usize, Vec<u8>)> {
    let im = parse_idx(images, &read_maybe_gz(images)?)?;
    let lb = parse_idx(labels, &read_maybe_gz(labels)?)?;
    if im.dims.len() != 3 {
        return Err(Error::format(
            images,
            format!(
                "expected an images file (N, H, W), got dimensions {:?}",
                im.dims
            ),
        ));
    }
    if lb.dims.len() != 1 {
        return Err(Error::format(
            labels,
            format!("expected a labels file (N), got dimensions {:?}", lb.dims),
        ));
    }
    if lb.dims[0] != im.dims[0] {
        return Err(Error::format(
            labels,
            format!(
                "{} labels for {} images in {}",
                lb.dims[0],
                im.dims[0],
                images.display()
            ),
        ));
    }
    let (h, w) = (im.dims[1], im.dims[2]);
    if h == 0 || w == 0 || h > 16384 || w > 16384 {
        return Err(Error::format(images, format!("bad image size {h}x{w}")));
    }
    Ok((im.data, h, w, lb.data))
}

/// Writes u8 data as an (uncompressed) IDX file; used by tests and tools.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let mut b = vec![0u8, 0, 0x08, dims.len() as u8];
    for &d in dims {
        b.extend_from_slice(&(d as u32).to_be_bytes());
    }
    b.extend_from_slice(data);
    std::fs::write(path, b).map_err(|e| Error::io(path, e))
}
