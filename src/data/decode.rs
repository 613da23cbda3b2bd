//! Decoding records to RGB u8 images: raw pixels, JPEG (libjpeg-turbo through the `turbojpeg`
//! crate, with DCT-domain scaling and region decode for the loader) and PNG (png).
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
    decode_jpeg_window_into(bytes, None, img)
}

/// What the loader plans a JPEG decode with: the frame size and the iMCU width (the
/// granularity of a region decode's left edge, in unscaled pixels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegHeader {
    pub height: usize,
    pub width: usize,
    pub mcu_width: usize,
}

/// The part of a JPEG a decode produces: the frame scaled by 1 / `denom` in the DCT
/// (`denom` in {1, 2, 4, 8}), then the rectangle (`top`, `left`, `height`, `width`) of that
/// scaled frame. A source pixel coordinate u maps to u / denom - left (or - top) in the
/// decoded image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegWindow {
    pub denom: usize,
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

impl JpegWindow {
    /// The whole frame of an `h` x `w` image at scale 1/`denom` (libjpeg's rounding: up).
    pub fn full(h: usize, w: usize, denom: usize) -> JpegWindow {
        JpegWindow {
            denom,
            top: 0,
            left: 0,
            height: h.div_ceil(denom),
            width: w.div_ceil(denom),
        }
    }
}

/// One TurboJPEG decompressor per thread: a handle is not thread-safe, and creating one per
/// record would cost an allocation and libjpeg's setup every time.
struct TjHandle(raw::tjhandle);

impl Drop for TjHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init, is non-null and is destroyed exactly once.
        unsafe { raw::tj3Destroy(self.0) };
    }
}

thread_local! {
    static TJ: std::cell::RefCell<Option<TjHandle>> = const { std::cell::RefCell::new(None) };
}

use turbojpeg::raw;

/// libjpeg-turbo's message for the last error or warning on `h`.
fn tj_message(h: raw::tjhandle) -> String {
    // SAFETY: `h` is a live handle; tj3GetErrorStr returns a NUL-terminated string owned by
    // the handle (or a static one), valid until the next call on it; it is copied at once.
    unsafe { std::ffi::CStr::from_ptr(raw::tj3GetErrorStr(h)) }
        .to_string_lossy()
        .trim()
        .replace('\n', " ")
}

/// Runs `f` with this thread's decompressor, creating it on first use.
fn with_tj<T>(
    f: impl FnOnce(raw::tjhandle) -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    TJ.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // SAFETY: tj3Init has no preconditions; a null return is handled below.
            let h = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as libc::c_int) };
            if h.is_null() {
                return Err("JPEG decode: cannot create a TurboJPEG decompressor".to_string());
            }
            *slot = Some(TjHandle(h));
        }
        let h = slot.as_ref().map(|t| t.0).unwrap_or(std::ptr::null_mut());
        let res = f(h);
        if res.is_err() {
            // An error can leave libjpeg mid-header (tj3DecompressHeader returns from its
            // error handler without resetting the decompressor), and the next record would
            // then be read from that state: start the next one on a fresh handle.
            *slot = None;
        }
        res
    })
}

/// Reads the header into `h` (TurboJPEG keeps it for the next decompress call).
fn read_header(h: raw::tjhandle, bytes: &[u8]) -> std::result::Result<JpegHeader, String> {
    if bytes.is_empty() {
        return Err("JPEG decode: empty record".to_string());
    }
    // SAFETY: `h` is a live decompressor; the pointer and length describe `bytes`, which
    // outlives the call (TurboJPEG reads it during the call only).
    let rc = unsafe { raw::tj3DecompressHeader(h, bytes.as_ptr(), bytes.len() as raw::size_t) };
    if rc != 0 {
        return Err(format!("JPEG decode: {}", tj_message(h)));
    }
    // SAFETY: `h` is a live handle; tj3Get only reads its parameters.
    let get = |p: raw::TJPARAM| unsafe { raw::tj3Get(h, p as libc::c_int) };
    let (w, ht) = (
        get(raw::TJPARAM_TJPARAM_JPEGWIDTH),
        get(raw::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    if w <= 0 || ht <= 0 {
        return Err("JPEG decode: no frame header (a tables-only or truncated file)".to_string());
    }
    if w as u32 > MAX_SIDE || ht as u32 > MAX_SIDE {
        return Err(format!(
            "JPEG decode: bad size {ht}x{w} (at most {MAX_SIDE} per side)"
        ));
    }
    if get(raw::TJPARAM_TJPARAM_PRECISION) != 8 || get(raw::TJPARAM_TJPARAM_LOSSLESS) != 0 {
        return Err(
            "JPEG decode: only 8-bit lossy JPEGs are supported; re-encode the image".to_string(),
        );
    }
    let subsamp = get(raw::TJPARAM_TJPARAM_SUBSAMP);
    // The iMCU widths of TurboJPEG's subsampling levels (tjMCUWidth); an unknown level
    // (a non-standard sampling) allows no region decode, marked by width 0.
    const MCU_WIDTH: [usize; 7] = [8, 16, 16, 8, 8, 32, 8];
    let mcu_width = usize::try_from(subsamp)
        .ok()
        .and_then(|s| MCU_WIDTH.get(s).copied())
        .unwrap_or(0);
    Ok(JpegHeader {
        height: ht as usize,
        width: w as usize,
        mcu_width,
    })
}

/// The header of a JPEG: its size and iMCU width (for planning a region decode).
pub fn jpeg_header(bytes: &[u8]) -> std::result::Result<JpegHeader, String> {
    with_tj(|h| read_header(h, bytes))
}

/// libjpeg's warnings that leave a correct image: stray bytes before a marker (common in
/// ImageNet, where PIL ignores them too). Every other warning (truncated or corrupt entropy
/// data) means pixels were made up, and fails the decode.
fn harmless_warning(msg: &str) -> bool {
    msg.contains("extraneous bytes before marker")
}

/// Decodes `window` of a JPEG (None: the whole frame at full scale) to RGB into `img`
/// (window.height, window.width, 3), reusing its buffer. Gray JPEGs are expanded to RGB;
/// CMYK / YCCK ones are converted to RGB as PIL and zune-jpeg do (R = C K / 255 on the
/// stored, Adobe-inverted values). On error `img` holds no valid image.
///
/// The window's left edge must lie on a scaled iMCU boundary (`plan` in the loader aligns
/// it); its pixels equal those of a full decode at the same scale (a test checks this).
pub fn decode_jpeg_window_into(
    bytes: &[u8],
    window: Option<JpegWindow>,
    img: &mut Image,
) -> std::result::Result<(), String> {
    let res = with_tj(|h| {
        let hd = read_header(h, bytes)?;
        let win = window.unwrap_or(JpegWindow::full(hd.height, hd.width, 1));
        let full = JpegWindow::full(hd.height, hd.width, win.denom);
        if !matches!(win.denom, 1 | 2 | 4 | 8)
            || win.height == 0
            || win.width == 0
            || win.top + win.height > full.height
            || win.left + win.width > full.width
        {
            return Err(format!(
                "JPEG decode: window {win:?} outside the {}x{} frame",
                full.height, full.width
            ));
        }
        let sf = raw::tjscalingfactor {
            num: 1,
            denom: win.denom as libc::c_int,
        };
        // SAFETY: `h` is a live decompressor whose header was just read.
        if unsafe { raw::tj3SetScalingFactor(h, sf) } != 0 {
            return Err(format!("JPEG decode: {}", tj_message(h)));
        }
        let region = if win == full {
            raw::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            }
        } else {
            raw::tjregion {
                x: win.left as libc::c_int,
                y: win.top as libc::c_int,
                w: win.width as libc::c_int,
                h: win.height as libc::c_int,
            }
        };
        // SAFETY: as above; the region was checked against the scaled frame, and TurboJPEG
        // checks its left edge against the scaled iMCU width itself (an error, not UB).
        if unsafe { raw::tj3SetCroppingRegion(h, region) } != 0 {
            return Err(format!("JPEG decode: {}", tj_message(h)));
        }
        // SAFETY: a live handle; reads a parameter of the header read above.
        let cs = unsafe { raw::tj3Get(h, raw::TJPARAM_TJPARAM_COLORSPACE as libc::c_int) };
        let cmyk =
            cs == raw::TJCS_TJCS_CMYK as libc::c_int || cs == raw::TJCS_TJCS_YCCK as libc::c_int;
        let n = win.height * win.width;
        let (pf, c) = if cmyk {
            (raw::TJPF_TJPF_CMYK, 4)
        } else {
            (raw::TJPF_TJPF_RGB, 3)
        };
        // Same-size records (the common case) reuse the buffer without a memset; the decoder
        // writes every byte. (H, W, c), c = 4 for CMYK until converted below.
        img.data.resize(n * c, 0);
        // SAFETY: `h` is live with the header, scale and region set above; `img.data` holds
        // exactly window.height rows of pitch window.width * c bytes, which is what
        // tj3Decompress8 writes for that region and pixel format; `bytes` outlives the call.
        let rc = unsafe {
            raw::tj3Decompress8(
                h,
                bytes.as_ptr(),
                bytes.len() as raw::size_t,
                img.data.as_mut_ptr(),
                (win.width * c) as libc::c_int,
                pf as libc::c_int,
            )
        };
        if rc != 0 {
            let msg = tj_message(h);
            // SAFETY: a live handle; reads the last error's code.
            let warning =
                unsafe { raw::tj3GetErrorCode(h) } == raw::TJERR_TJERR_WARNING as libc::c_int;
            if !(warning && harmless_warning(&msg)) {
                return Err(format!("JPEG decode: {msg}"));
            }
        }
        if cmyk {
            cmyk_to_rgb_in_place(&mut img.data, n);
        }
        img.height = win.height;
        img.width = win.width;
        Ok(())
    });
    if res.is_err() {
        img.height = 0;
        img.width = 0;
        img.data.clear();
    }
    res
}

/// (n, 4) CMYK -> (n, 3) RGB in the same buffer, truncated to n * 3 bytes:
/// R = C K / 255 rounded (Blinn's exact 8-bit form), likewise G from M and B from Y.
fn cmyk_to_rgb_in_place(data: &mut Vec<u8>, n: usize) {
    let mul = |a: u8, b: u8| {
        let t = a as u32 * b as u32 + 128;
        ((t + (t >> 8)) >> 8) as u8
    };
    for i in 0..n {
        let (c, m, y, k) = (
            data[4 * i],
            data[4 * i + 1],
            data[4 * i + 2],
            data[4 * i + 3],
        );
        // Pixel i's RGB lands at or before its CMYK bytes, which are already read.
        data[3 * i] = mul(c, k);
        data[3 * i + 1] = mul(m, k);
        data[3 * i + 2] = mul(y, k);
    }
    data.truncate(n * 3);
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
