//! Decoding records to RGB u8 images: raw pixels, JPEG (zune-jpeg) and PNG (png).
//! Every source is expanded to 3 channels; every failure is an error, never a panic.

use std::path::Path;

use crate::data::shard::{Encoding, IndexEntry, MAX_SIDE};
use crate::error::{Error, Result};

/// An RGB u8 image, (H, W, 3) row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    /// (H, W, 3)
    pub data: Vec<u8>,
}

impl Image {
    pub fn new(height: usize, width: usize, data: Vec<u8>) -> Image {
        debug_assert_eq!(data.len(), height * width * 3);
        Image {
            height,
            width,
            data,
        }
    }
}

/// Expands (H, W, C) u8 pixels with C in {1, 2, 3, 4} (gray, gray+alpha, RGB, RGBA) to RGB.
/// Alpha is dropped (composited on nothing), as PIL's `convert("RGB")` does.
pub fn to_rgb(h: usize, w: usize, c: usize, px: &[u8]) -> Option<Image> {
    let n = h.checked_mul(w)?;
    if px.len() < n.checked_mul(c)? {
        return None;
    }
    let data = match c {
        3 => px[..n * 3].to_vec(),
        1 | 2 | 4 => {
            let mut out = Vec::with_capacity(n * 3);
            for p in px[..n * c].chunks_exact(c) {
                if c == 4 {
                    out.extend_from_slice(&p[..3]);
                } else {
                    out.extend_from_slice(&[p[0], p[0], p[0]]);
                }
            }
            out
        }
        _ => return None,
    };
    Some(Image::new(h, w, data))
}

/// Decodes a JPEG to RGB.
pub fn decode_jpeg(bytes: &[u8]) -> std::result::Result<Image, String> {
    let mut img = Image::new(0, 0, Vec::new());
    decode_jpeg_into(bytes, &mut img)?;
    Ok(img)
}

/// Decodes a JPEG to RGB into `img`, reusing its buffer (the loader keeps one per thread, so
/// a decode touches no fresh pages). On error `img` holds no valid image.
pub fn decode_jpeg_into(bytes: &[u8], img: &mut Image) -> std::result::Result<(), String> {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(MAX_SIDE as usize)
        .set_max_height(MAX_SIDE as usize);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(bytes, opts);
    // zune-jpeg is a maintained, fuzzed decoder; still, a panic inside it must not take the
    // loader down, so it is turned into an error.
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dec.decode_headers()
            .map_err(|e| format!("JPEG decode: {e:?}"))?;
        let (w, h) = dec
            .dimensions()
            .ok_or_else(|| "JPEG decode: no dimensions".to_string())?;
        let c = dec
            .get_output_colorspace()
            .map(|cs| cs.num_components())
            .unwrap_or(3);
        let size = dec
            .output_buffer_size()
            .ok_or_else(|| "JPEG decode: no output size".to_string())?;
        if c == 3 && size == h * w * 3 {
            // The common case: straight into the reused buffer.
            // Same-size records (the common case) reuse the buffer without a memset;
            // decode_into overwrites every byte.
            img.data.resize(size, 0);
            dec.decode_into(&mut img.data)
                .map_err(|e| format!("JPEG decode: {e:?}"))?;
            img.height = h;
            img.width = w;
            return Ok(());
        }
        let px = dec.decode().map_err(|e| format!("JPEG decode: {e:?}"))?;
        *img = to_rgb(h, w, c, &px).ok_or_else(|| {
            format!(
                "JPEG decode: {} bytes for {h}x{w}x{c} (decoder returned short data)",
                px.len()
            )
        })?;
        Ok(())
    }));
    let out = res.unwrap_or_else(|_| Err("JPEG decode: decoder panicked".to_string()));
    if out.is_err() {
        img.height = 0;
        img.width = 0;
        img.data.clear();
    }
    out
}

/// Decodes a PNG to RGB (8 or 16 bit, palette, gray, alpha: all expanded to RGB u8).
pub fn decode_png(bytes: &[u8]) -> std::result::Result<Image, String> {
    let res = std::panic::catch_unwind(|| {
        let mut dec = png::Decoder::new_with_limits(
            std::io::Cursor::new(bytes),
            png::Limits { bytes: 256 << 20 },
        );
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec.read_info().map_err(|e| format!("PNG decode: {e}"))?;
        let (w, h) = {
            let info = reader.info();
            (info.width, info.height)
        };
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(format!("PNG decode: bad size {h}x{w}"));
        }
        let mut buf = vec![0u8; reader.output_buffer_size()];
        let frame = reader
            .next_frame(&mut buf)
            .map_err(|e| format!("PNG decode: {e}"))?;
        let c = frame.color_type.samples();
        to_rgb(h as usize, w as usize, c, &buf[..frame.buffer_size()])
            .ok_or_else(|| format!("PNG decode: short data for {h}x{w}x{c}"))
    });
    res.unwrap_or_else(|_| Err("PNG decode: decoder panicked".to_string()))
}

/// Sniffs JPEG / PNG from the first bytes.
pub fn sniff(bytes: &[u8]) -> Option<Encoding> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Encoding::Jpeg)
    } else if bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
        Some(Encoding::Png)
    } else {
        None
    }
}

/// Decodes an encoded image file (JPEG or PNG, sniffed from its bytes).
pub fn decode_bytes(bytes: &[u8]) -> std::result::Result<Image, String> {
    match sniff(bytes) {
        Some(Encoding::Jpeg) => decode_jpeg(bytes),
        Some(Encoding::Png) => decode_png(bytes),
        _ => Err("neither a JPEG nor a PNG file".to_string()),
    }
}

/// Decodes one shard record to RGB. Errors name the shard and the record.
pub fn decode_record(path: &Path, i: usize, e: &IndexEntry, bytes: &[u8]) -> Result<Image> {
    let mut img = Image::new(0, 0, Vec::new());
    decode_record_into(path, i, e, bytes, &mut img)?;
    Ok(img)
}

/// `decode_record` into `img`, reusing its buffer for JPEG records (the loader's case).
pub fn decode_record_into(
    path: &Path,
    i: usize,
    e: &IndexEntry,
    bytes: &[u8],
    img: &mut Image,
) -> Result<()> {
    let h = e.height as usize;
    let w = e.width as usize;
    let err = |msg: String| Error::format(path, format!("record {i}: {msg}"));
    match Encoding::from_u8(e.encoding) {
        Some(Encoding::Raw) => {
            *img = to_rgb(h, w, e.channels as usize, bytes)
                .ok_or_else(|| err(format!("raw record of {} bytes for {h}x{w}", bytes.len())))?
        }
        Some(Encoding::Jpeg) => decode_jpeg_into(bytes, img).map_err(err)?,
        Some(Encoding::Png) => *img = decode_png(bytes).map_err(err)?,
        None => return Err(err(format!("unknown encoding {}", e.encoding))),
    };
    if img.height != h || img.width != w {
        return Err(err(format!(
            "decoded image is {}x{}, the index says {h}x{w}",
            img.height, img.width
        )));
    }
    Ok(())
}

/// Encodes RGB or gray u8 pixels as PNG.
pub fn encode_png(h: usize, w: usize, c: usize, px: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(if c == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Best);
        let mut wr = enc
            .write_header()
            .map_err(|e| Error::Msg(format!("PNG encode: {e}")))?;
        wr.write_image_data(px)
            .map_err(|e| Error::Msg(format!("PNG encode: {e}")))?;
    }
    Ok(out)
}

/// Encodes RGB or gray u8 pixels as JPEG with the given quality (1..=100).
pub fn encode_jpeg(h: usize, w: usize, c: usize, px: &[u8], quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let enc = jpeg_encoder::Encoder::new(&mut out, quality);
    let ct = if c == 1 {
        jpeg_encoder::ColorType::Luma
    } else {
        jpeg_encoder::ColorType::Rgb
    };
    let (w16, h16) = (
        u16::try_from(w).map_err(|_| Error::Msg(format!("JPEG encode: width {w} too large")))?,
        u16::try_from(h).map_err(|_| Error::Msg(format!("JPEG encode: height {h} too large")))?,
    );
    enc.encode(px, w16, h16, ct)
        .map_err(|e| Error::Msg(format!("JPEG encode: {e}")))?;
    Ok(out)
}
