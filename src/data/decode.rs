//! Decoding any supported file to 8-bit RGB.
//!
//! Grayscale, CMYK, alpha (dropped, as PIL's `convert("RGB")` does) and 16-bit inputs all become
//! 8-bit RGB; the EXIF orientation is applied or ignored ([`Exif`]). The image size is read from
//! the header first and an image over the pixel limit is refused before any pixel buffer is
//! allocated (decompression bombs).
//!
//! JPEGs decode to the pixels Pillow (libjpeg-turbo) gives, through one of two decoders chosen
//! at build time ([`jpeg_decoder_name`]):
//! - default: libjpeg-turbo's C code as vendored by mozjpeg, built with the C compiler and no
//!   SIMD (`decode/libjpeg.rs`);
//! - feature `turbojpeg`: libjpeg-turbo 3 with its SIMD through the turbojpeg crate
//!   (`decode/turbo.rs`), faster.
//!
//! Both downscale in the DCT domain (1/2, 1/4, 1/8) when a size hint allows.
//!
//! CMYK / YCCK JPEGs, and every other format, go through the `image` crate (zune-jpeg for JPEG).

use crate::data::format::ImageFormat;
use std::io::Cursor;
use std::path::Path;

#[cfg(not(feature = "turbojpeg"))]
mod libjpeg;
#[cfg(feature = "turbojpeg")]
mod turbo;

/// An 8-bit RGB image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    /// `[H, W, 3]`.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A gray image from `[H, W]` luma bytes.
    pub fn from_gray(width: u32, height: u32, gray: &[u8]) -> RgbImage {
        let data = gray.iter().flat_map(|&v| [v, v, v]).collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// The pixel at (x, y).
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// What to do with a JPEG's EXIF orientation tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Exif {
    /// Rotate / mirror the pixels as the tag says (what photo viewers show).
    #[default]
    Apply,
    /// Keep the stored pixel order: what the official DINOv2 code sees, since it loads with
    /// `Image.open(path).convert("RGB")` and never calls `ImageOps.exif_transpose`.
    Ignore,
}

impl std::str::FromStr for Exif {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "apply" => Ok(Exif::Apply),
            "ignore" => Ok(Exif::Ignore),
            other => Err(format!("unknown EXIF mode '{other}' (apply or ignore)")),
        }
    }
}

/// Default pixel limit: 178 megapixels, Pillow's decompression-bomb error threshold.
pub const DEFAULT_MAX_PIXELS: u64 = 2 * 89_478_485;

/// Why a file could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot read file: {0}")]
    Io(#[from] std::io::Error),
    #[error("empty file")]
    Empty,
    #[error("not an image (named {named}, contents match no supported format)")]
    NotAnImage { named: String },
    #[error("unsupported {format} image: {detail}")]
    Unsupported { format: ImageFormat, detail: String },
    #[error("{width}x{height} image has more than {max_pixels} pixels (decompression bomb?)")]
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("corrupt or truncated {format}: {detail}")]
    Corrupt { format: ImageFormat, detail: String },
}

impl DecodeError {
    /// A short stable name for summaries (`dinotrain scan` groups by it).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Io(_) => "unreadable",
            DecodeError::Empty => "empty",
            DecodeError::NotAnImage { .. } => "not-an-image",
            DecodeError::Unsupported { .. } => "unsupported",
            DecodeError::TooLarge { .. } => "too-large",
            DecodeError::Corrupt { .. } => "corrupt",
        }
    }
}

/// Which JPEG decoder is compiled in: `libjpeg-turbo` (feature `turbojpeg`) or `mozjpeg`
/// (the default: libjpeg-turbo's C code without SIMD). Both give Pillow's pixels.
///
/// Only one of the two is compiled into the decoding code: both C libraries export the same
/// `jpeg_*` symbols, and a binary that called into both could bind one library's calls to the
/// other's internals.
pub fn jpeg_decoder_name() -> &'static str {
    if cfg!(feature = "turbojpeg") {
        "libjpeg-turbo"
    } else {
        "mozjpeg"
    }
}

/// Reads and decodes a file, the EXIF orientation applied; see [`decode`].
pub fn decode_file(
    path: &Path,
    hint: ImageFormat,
    max_pixels: u64,
    min_side_hint: Option<u32>,
) -> Result<RgbImage, DecodeError> {
    decode_file_exif(path, hint, max_pixels, min_side_hint, Exif::Apply)
}

/// Reads and decodes a file with the EXIF orientation applied or ignored; see [`decode_exif`].
pub fn decode_file_exif(
    path: &Path,
    hint: ImageFormat,
    max_pixels: u64,
    min_side_hint: Option<u32>,
    exif: Exif,
) -> Result<RgbImage, DecodeError> {
    let bytes = std::fs::read(path)?;
    decode_exif(&bytes, hint, max_pixels, min_side_hint, exif)
}

/// Decodes `bytes` to RGB8. The magic bytes decide the format (`hint`, usually from the file
/// extension, only names it in errors). `min_side_hint`: the decoder may return an image whose
/// shorter side is down to this many pixels when that is cheaper (libjpeg-turbo's DCT scaling
/// by 1/2, 1/4, 1/8); `None` always decodes at full size. The EXIF orientation is applied.
pub fn decode(
    bytes: &[u8],
    hint: ImageFormat,
    max_pixels: u64,
    min_side_hint: Option<u32>,
) -> Result<RgbImage, DecodeError> {
    decode_exif(bytes, hint, max_pixels, min_side_hint, Exif::Apply)
}

/// [`decode`] with the EXIF orientation applied or ignored.
pub fn decode_exif(
    bytes: &[u8],
    hint: ImageFormat,
    max_pixels: u64,
    min_side_hint: Option<u32>,
    exif: Exif,
) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = ImageFormat::sniff(bytes).ok_or_else(|| DecodeError::NotAnImage {
        named: hint.to_string(),
    })?;
    // Decoders parse hostile bytes; should one of them panic, that file is skipped like any
    // other corrupt file instead of stopping a training run.
    std::panic::catch_unwind(|| decode_format(bytes, format, max_pixels, min_side_hint, exif))
        .unwrap_or_else(|_| {
            Err(DecodeError::Corrupt {
                format,
                detail: "the decoder panicked on this file".into(),
            })
        })
}

fn decode_format(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
    min_side_hint: Option<u32>,
    exif: Exif,
) -> Result<RgbImage, DecodeError> {
    if format == ImageFormat::Jpeg {
        #[cfg(feature = "turbojpeg")]
        let decoded = turbo::decode(bytes, max_pixels, min_side_hint, exif)?;
        #[cfg(not(feature = "turbojpeg"))]
        let decoded = libjpeg::decode(bytes, max_pixels, min_side_hint, exif)?;
        // `None`: a CMYK / YCCK file, which libjpeg cannot convert to RGB.
        if let Some(img) = decoded {
            return Ok(img);
        }
    }
    decode_with_image_crate(bytes, format, max_pixels, exif)
}

/// The JPEG DCT-domain downscaling both libjpeg decoders apply: the largest denominator of
/// 1/8, 1/4, 1/2 whose output keeps the shorter side at least `min_side_hint` pixels (output
/// sides round up, as libjpeg's do), else 1 (full size).
fn dct_scale_denominator(width: u32, height: u32, min_side_hint: Option<u32>) -> u32 {
    let Some(target) = min_side_hint else {
        return 1;
    };
    let short = width.min(height) as u64;
    [8u32, 4, 2]
        .into_iter()
        .find(|&denom| short.div_ceil(denom as u64) >= target as u64)
        .unwrap_or(1)
}

fn check_pixels(width: u32, height: u32, max_pixels: u64) -> Result<(), DecodeError> {
    if width as u64 * height as u64 > max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    Ok(())
}

fn image_error(format: ImageFormat, e: image::ImageError) -> DecodeError {
    use image::ImageError as E;
    match e {
        E::Unsupported(u) => DecodeError::Unsupported {
            format,
            detail: u.to_string(),
        },
        E::Limits(l) => DecodeError::Unsupported {
            format,
            detail: l.to_string(),
        },
        other => DecodeError::Corrupt {
            format,
            detail: other.to_string(),
        },
    }
}

fn decode_with_image_crate(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
    exif: Exif,
) -> Result<RgbImage, DecodeError> {
    use image::ImageDecoder as _;
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format.to_image_crate());
    let mut limits = image::Limits::default();
    // The decoded image (up to 16-bit RGBA) plus the decoder's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| image_error(format, e))?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height, max_pixels)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut dynamic =
        image::DynamicImage::from_decoder(decoder).map_err(|e| image_error(format, e))?;
    if exif == Exif::Apply {
        dynamic.apply_orientation(orientation);
    }
    let rgb = dynamic.into_rgb8();
    Ok(RgbImage {
        width: rgb.width(),
        height: rgb.height(),
        data: rgb.into_raw(),
    })
}

/// Every JPEG decoder here fills a truncated scan with gray instead of failing (libjpeg with a
/// warning, zune-jpeg silently); PIL refuses such a file ("image file is truncated"), and so do
/// we: a complete JPEG ends with EOI (FFD9), possibly followed by padding.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), DecodeError> {
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    if tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(DecodeError::Corrupt {
            format: ImageFormat::Jpeg,
            detail: "truncated: no end-of-image marker".into(),
        })
    }
}

/// The EXIF orientation of a JPEG (APP1 `Exif` segment), read without decoding.
pub fn jpeg_orientation(bytes: &[u8]) -> Option<image::metadata::Orientation> {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return None; // start of scan: metadata comes before it
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        let seg = bytes.get(i + 4..i + 2 + len)?;
        if marker == 0xE1 && seg.starts_with(b"Exif\0\0") {
            return image::metadata::Orientation::from_exif_chunk(&seg[6..]);
        }
        i += 2 + len;
    }
    None
}

/// Applies an EXIF orientation to a decoded image.
fn orient(img: RgbImage, o: image::metadata::Orientation) -> RgbImage {
    // from_raw only fails when the buffer is shorter than w·h·3, which RgbImage never is.
    let Some(buf) = image::RgbImage::from_raw(img.width, img.height, img.data) else {
        unreachable!("RgbImage buffer holds width·height·3 bytes")
    };
    let mut dynamic = image::DynamicImage::ImageRgb8(buf);
    dynamic.apply_orientation(o);
    let rgb = dynamic.into_rgb8();
    RgbImage {
        width: rgb.width(),
        height: rgb.height(),
        data: rgb.into_raw(),
    }
}
