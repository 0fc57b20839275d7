//! The default JPEG decoder: libjpeg-turbo's C code as vendored by mozjpeg (`mozjpeg-sys`,
//! compiled with the C compiler, without SIMD), called through the libjpeg API.
//!
//! Pillow, and so the official pipeline, decodes with libjpeg-turbo's defaults: the accurate
//! integer IDCT (`JDCT_ISLOW`) and "fancy" (triangle-filter) chroma upsampling, colour-converted
//! by the library to RGB. This module asks for exactly that, so its pixels are Pillow's bit for
//! bit (`tests/data_jpeg_exact.rs`); the pure-Rust decoder rounds chroma upsampling and the IDCT
//! differently.
//!
//! Errors: libjpeg reports a fatal error by calling `error_exit`, which must not return. Ours
//! unwinds with the formatted message as payload (mozjpeg-sys builds the C code with
//! `-fexceptions` and declares the callbacks `C-unwind` for this); [`decode`] catches it and
//! returns [`DecodeError::Corrupt`]. `resume_unwind` is used rather than `panic!` so that no
//! panic hook prints a backtrace for every broken file in a dataset.

use super::{check_jpeg_complete, check_pixels, jpeg_orientation, DecodeError, Exif, RgbImage};
use crate::data::format::ImageFormat;
use mozjpeg_sys as sys;
use std::ffi::{c_char, c_int, c_ulong, CStr};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// The payload `error_exit` unwinds with: libjpeg's message for the error.
struct LibjpegError(String);

/// `JMSG_LENGTH_MAX` in jerror.h: the buffer `format_message` writes into.
const MESSAGE_LENGTH: usize = 200;

/// Decodes a JPEG to RGB8, downscaled in the DCT domain when `min_side_hint` allows (see
/// [`super::decode`]). `Ok(None)` when the file is CMYK or YCCK: libjpeg cannot convert those
/// to RGB, and the caller falls back to the pure-Rust decoder.
pub fn decode(
    bytes: &[u8],
    max_pixels: u64,
    min_side_hint: Option<u32>,
    exif: Exif,
) -> Result<Option<RgbImage>, DecodeError> {
    // libjpeg pads a truncated scan with gray and only warns; Pillow refuses such a file.
    check_jpeg_complete(bytes)?;
    let decoded = match catch_unwind(AssertUnwindSafe(|| {
        decode_rgb(bytes, max_pixels, min_side_hint)
    })) {
        Ok(result) => result?,
        Err(payload) => match payload.downcast::<LibjpegError>() {
            Ok(error) => {
                return Err(DecodeError::Corrupt {
                    format: ImageFormat::Jpeg,
                    detail: error.0,
                })
            }
            // Not libjpeg's error: a real panic, for the caller's handler.
            Err(other) => resume_unwind(other),
        },
    };
    let Some(mut img) = decoded else {
        return Ok(None);
    };
    if let Some(o) = jpeg_orientation(bytes).filter(|_| exif == Exif::Apply) {
        if o != image::metadata::Orientation::NoTransforms {
            img = super::orient(img, o);
        }
    }
    Ok(Some(img))
}

/// The libjpeg decompression object and its error manager, destroyed on drop (also while an
/// error unwinds through the caller), so no allocation of the C library outlives a decode.
struct Decompressor {
    // Boxed: libjpeg keeps pointers to both, so their addresses must not move.
    cinfo: Box<sys::jpeg_decompress_struct>,
    _err: Box<sys::jpeg_error_mgr>,
}

impl Decompressor {
    fn new() -> Decompressor {
        // SAFETY: both structs are plain C data for which all-zero is the state libjpeg expects
        // before `jpeg_std_error` / `jpeg_create_decompress` fill them in.
        let mut err: Box<sys::jpeg_error_mgr> = Box::new(unsafe { std::mem::zeroed() });
        let mut cinfo: Box<sys::jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: `err` and `cinfo` are boxed and live as long as the returned value, which
        // destroys `cinfo` before they are freed.
        unsafe {
            sys::jpeg_std_error(&mut err);
            err.error_exit = Some(error_exit);
            err.emit_message = Some(ignore_message);
            cinfo.common.err = &mut *err;
            sys::jpeg_create_decompress(&mut *cinfo);
        }
        Decompressor { cinfo, _err: err }
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: `cinfo` was created by `jpeg_create_decompress`; destroying is valid in any
        // state, also after an error exit.
        unsafe { sys::jpeg_destroy_decompress(&mut self.cinfo) }
    }
}

/// Every libjpeg call; a fatal error unwinds out of here with a [`LibjpegError`].
fn decode_rgb(
    bytes: &[u8],
    max_pixels: u64,
    min_side_hint: Option<u32>,
) -> Result<Option<RgbImage>, DecodeError> {
    let mut dec = Decompressor::new();
    let cinfo = &mut *dec.cinfo;
    // SAFETY: `bytes` outlives `dec`; libjpeg only reads `bytes.len()` bytes from it.
    unsafe {
        sys::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
        sys::jpeg_read_header(cinfo, 1);
    }
    // Before `jpeg_start_decompress`, which allocates the image-sized buffers.
    check_pixels(cinfo.image_width, cinfo.image_height, max_pixels)?;
    if matches!(
        cinfo.jpeg_color_space,
        sys::J_COLOR_SPACE::JCS_CMYK | sys::J_COLOR_SPACE::JCS_YCCK
    ) {
        return Ok(None);
    }
    // libjpeg's defaults (JDCT_ISLOW, fancy upsampling) are Pillow's, and stay. Grayscale
    // files are replicated to three channels, as `convert("RGB")` does.
    cinfo.out_color_space = sys::J_COLOR_SPACE::JCS_RGB;
    // Scaled only when the caller asks for it (the same choice as the turbojpeg build).
    cinfo.scale_num = 1;
    cinfo.scale_denom =
        super::dct_scale_denominator(cinfo.image_width, cinfo.image_height, min_side_hint);
    // SAFETY: the header was read; the source is still `bytes`.
    unsafe { sys::jpeg_start_decompress(cinfo) };
    let (width, height) = (cinfo.output_width, cinfo.output_height);
    let row_len = width as usize * 3;
    let mut data = vec![0u8; row_len * height as usize];
    // One pointer per output row; libjpeg fills `rows[output_scanline..]` a few rows per call.
    let mut rows: Vec<*mut u8> = data
        .chunks_exact_mut(row_len)
        .map(|r| r.as_mut_ptr())
        .collect();
    while cinfo.output_scanline < height {
        let next = cinfo.output_scanline as usize;
        // SAFETY: each pointer addresses `row_len` writable bytes of `data`, which outlives
        // the call; libjpeg writes at most `height - next` rows.
        let read = unsafe {
            sys::jpeg_read_scanlines(cinfo, rows[next..].as_mut_ptr(), height - next as u32)
        };
        if read == 0 {
            // Only a suspending data source returns no rows; the memory source never suspends.
            return Err(DecodeError::Corrupt {
                format: ImageFormat::Jpeg,
                detail: "libjpeg returned no scanlines".into(),
            });
        }
    }
    // SAFETY: every scanline was read.
    unsafe { sys::jpeg_finish_decompress(cinfo) };
    Ok(Some(RgbImage {
        width,
        height,
        data,
    }))
}

/// libjpeg's `error_exit`: formats the message and unwinds to [`decode`].
unsafe extern "C-unwind" fn error_exit(cinfo: &mut sys::jpeg_common_struct) {
    let mut buffer = [0 as c_char; MESSAGE_LENGTH];
    // mozjpeg-sys declares `format_message` with a `&[u8; 80]` buffer, but libjpeg writes up to
    // JMSG_LENGTH_MAX bytes into it: call it through a pointer type that says so.
    type FormatMessage = unsafe extern "C-unwind" fn(&mut sys::jpeg_common_struct, *mut c_char);
    let message = match (*cinfo.err).format_message {
        Some(format) => {
            let format: FormatMessage = std::mem::transmute(format);
            format(cinfo, buffer.as_mut_ptr());
            CStr::from_ptr(buffer.as_ptr())
                .to_string_lossy()
                .into_owned()
        }
        None => format!("libjpeg error {}", (*cinfo.err).msg_code),
    };
    resume_unwind(Box::new(LibjpegError(message)))
}

/// libjpeg's `emit_message`: warnings (extraneous bytes, a premature end of a scan) are ignored,
/// as Pillow and turbojpeg's defaults ignore them; truncation is refused before decoding.
unsafe extern "C-unwind" fn ignore_message(_cinfo: &mut sys::jpeg_common_struct, _level: c_int) {}
