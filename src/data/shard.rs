//! The shard format (documented in `datasets/README.md`): one file of records, read through
//! `memmap2` without copying. Little-endian throughout.
//!
//! ```text
//! offset 0   ShardHeader  (32 bytes)  magic "CARPSHRD", version, count, index/data offsets
//! offset 32  IndexEntry[count]  (24 bytes each)
//! data_offset  the records' bytes, one after another
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytemuck::{Pod, Zeroable};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// The first eight bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"CARPSHRD";
/// The only version this reader accepts.
pub const SHARD_VERSION: u32 = 1;
/// Largest side a record may declare (guards allocations against corrupt headers).
pub const MAX_SIDE: u32 = 16384;

/// How a record's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Raw u8 pixels, (H, W, C) row-major, C in {1, 3}.
    Raw = 0,
    /// A JPEG file.
    Jpeg = 1,
    /// A PNG file.
    Png = 2,
}

impl Encoding {
    pub fn from_u8(v: u8) -> Option<Encoding> {
        match v {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Jpeg),
            2 => Some(Encoding::Png),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Jpeg => "jpeg",
            Encoding::Png => "png",
        }
    }
}

/// The shard header, castable from the first 32 bytes of the file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct ShardHeader {
    pub magic: [u8; 8],
    pub version: u32,
    /// Number of records (and index entries).
    pub count: u32,
    /// Byte offset of the index (always 32 in version 1).
    pub index_offset: u64,
    /// Byte offset of the first record's bytes.
    pub data_offset: u64,
}

/// One record's place in the shard, castable from 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IndexEntry {
    /// Byte offset from the start of the file.
    pub offset: u64,
    /// Byte length of the record.
    pub length: u32,
    /// Class label (index into the manifest's classes).
    pub label: u32,
    /// Image height and width in pixels (for raw records they define the layout).
    pub height: u16,
    pub width: u16,
    /// Channels of the stored image: 1 (grayscale) or 3 (RGB).
    pub channels: u8,
    /// `Encoding` as u8.
    pub encoding: u8,
    pub reserved: [u8; 2],
}

pub const HEADER_BYTES: usize = std::mem::size_of::<ShardHeader>();
pub const ENTRY_BYTES: usize = std::mem::size_of::<IndexEntry>();

/// A record to be written: its bytes and index metadata.
#[derive(Clone, Debug)]
pub struct RecordData {
    pub bytes: Vec<u8>,
    pub label: u32,
    pub height: u16,
    pub width: u16,
    pub channels: u8,
    pub encoding: Encoding,
}

/// Writes one shard file from a list of records (the whole shard is assembled in order).
pub fn write_shard(path: &Path, records: &[RecordData]) -> Result<()> {
    let count = u32::try_from(records.len())
        .map_err(|_| Error::format(path, "too many records for one shard"))?;
    let data_offset = (HEADER_BYTES + ENTRY_BYTES * records.len()) as u64;
    let header = ShardHeader {
        magic: SHARD_MAGIC,
        version: SHARD_VERSION,
        count,
        index_offset: HEADER_BYTES as u64,
        data_offset,
    };
    let mut index = Vec::with_capacity(records.len());
    let mut off = data_offset;
    for r in records {
        let length = u32::try_from(r.bytes.len())
            .map_err(|_| Error::format(path, "record larger than 4 GiB"))?;
        index.push(IndexEntry {
            offset: off,
            length,
            label: r.label,
            height: r.height,
            width: r.width,
            channels: r.channels,
            encoding: r.encoding as u8,
            reserved: [0; 2],
        });
        off += length as u64;
    }
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        f.write_all(bytemuck::bytes_of(&header))?;
        f.write_all(bytemuck::cast_slice(&index))?;
        for r in records {
            f.write_all(&r.bytes)?;
        }
        f.flush()?;
        Ok(())
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    // Rename last so that a crash never leaves a half-written file under the final name.
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// A shard opened read-only through a memory map, with its header and index validated.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    count: usize,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("count", &self.count)
            .finish()
    }
}

impl Shard {
    /// Opens and validates a shard: magic, version, index bounds and every entry.
    pub fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and the map is only read. Another process
        // truncating the file while mapped would be undefined behaviour; shards are
        // written once (rename-on-complete) and never modified in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_map(path, map)
    }

    fn from_map(path: &Path, map: Mmap) -> Result<Shard> {
        let count = validate(path, &map)?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            count,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The (validated) index.
    pub fn index(&self) -> &[IndexEntry] {
        // Validated in `open`: in bounds and 8-aligned (the map is page-aligned, the index
        // starts at byte 32).
        let bytes = &self.map[HEADER_BYTES..HEADER_BYTES + self.count * ENTRY_BYTES];
        bytemuck::cast_slice(bytes)
    }

    /// Record `i`: its index entry and its bytes, borrowed from the map.
    pub fn record(&self, i: usize) -> Result<(IndexEntry, &[u8])> {
        let e = *self.index().get(i).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("record {i} out of range ({} records)", self.count),
            )
        })?;
        let start = e.offset as usize;
        // In bounds: checked by `validate`.
        Ok((e, &self.map[start..start + e.length as usize]))
    }
}

/// Checks a shard's bytes; returns the record count. Never panics on arbitrary input.
pub fn validate(path: &Path, bytes: &[u8]) -> Result<usize> {
    if bytes.len() < HEADER_BYTES {
        return Err(Error::format(
            path,
            format!(
                "truncated shard: {} bytes, the header alone is {HEADER_BYTES}",
                bytes.len()
            ),
        ));
    }
    let header: ShardHeader = bytemuck::pod_read_unaligned(&bytes[..HEADER_BYTES]);
    if header.magic != SHARD_MAGIC {
        return Err(Error::format(
            path,
            format!(
                "not a carp shard: magic {:?}, expected {:?}",
                String::from_utf8_lossy(&header.magic),
                String::from_utf8_lossy(&SHARD_MAGIC)
            ),
        ));
    }
    if header.version != SHARD_VERSION {
        return Err(Error::format(
            path,
            format!(
                "unsupported shard version {} (this build reads version {SHARD_VERSION}); repack the dataset",
                header.version
            ),
        ));
    }
    let count = header.count as usize;
    if header.index_offset != HEADER_BYTES as u64 {
        return Err(Error::format(
            path,
            format!(
                "index offset {} (expected {HEADER_BYTES})",
                header.index_offset
            ),
        ));
    }
    let index_end = HEADER_BYTES as u64 + count as u64 * ENTRY_BYTES as u64;
    if index_end > bytes.len() as u64 {
        return Err(Error::format(
            path,
            format!(
                "truncated shard: index of {count} records needs {index_end} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    if header.data_offset < index_end || header.data_offset > bytes.len() as u64 {
        return Err(Error::format(
            path,
            format!(
                "data offset {} outside [{index_end}, {}]",
                header.data_offset,
                bytes.len()
            ),
        ));
    }
    let index_bytes = &bytes[HEADER_BYTES..index_end as usize];
    for i in 0..count {
        let e: IndexEntry =
            bytemuck::pod_read_unaligned(&index_bytes[i * ENTRY_BYTES..(i + 1) * ENTRY_BYTES]);
        check_entry(path, i, &e, header.data_offset, bytes.len() as u64)?;
    }
    Ok(count)
}

fn check_entry(path: &Path, i: usize, e: &IndexEntry, data_offset: u64, len: u64) -> Result<()> {
    let bad = |msg: String| Err(Error::format(path, format!("record {i}: {msg}")));
    let end = e.offset.checked_add(e.length as u64);
    match end {
        Some(end) if e.offset >= data_offset && end <= len => {}
        _ => {
            return bad(format!(
                "bytes [{}, +{}) point outside the data section [{data_offset}, {len}) (truncated or corrupt shard)",
                e.offset, e.length
            ))
        }
    }
    let Some(enc) = Encoding::from_u8(e.encoding) else {
        return bad(format!("unknown encoding {}", e.encoding));
    };
    if e.channels != 1 && e.channels != 3 {
        return bad(format!("{} channels (expected 1 or 3)", e.channels));
    }
    if e.height == 0 || e.width == 0 || e.height as u32 > MAX_SIDE || e.width as u32 > MAX_SIDE {
        return bad(format!("bad image size {}x{}", e.height, e.width));
    }
    if enc == Encoding::Raw {
        let want = e.height as u64 * e.width as u64 * e.channels as u64;
        if e.length as u64 != want {
            return bad(format!(
                "raw record of {} bytes, but {}x{}x{} needs {want}",
                e.length, e.height, e.width, e.channels
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes() {
        assert_eq!(HEADER_BYTES, 32);
        assert_eq!(ENTRY_BYTES, 24);
    }
}
