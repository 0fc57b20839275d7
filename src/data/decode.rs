//! Decoding any supported file to 8-bit RGB.
//!
//! Grayscale, CMYK, alpha (dropped, as PIL's `convert("RGB")` does) and 16-bit inputs all become
//! 8-bit RGB; the EXIF orientation is applied or ignored ([`Exif`]). The image size is read from the header first and
//! an image over the pixel limit is refused before any pixel buffer is allocated
//! (decompression bombs). JPEGs go through libjpeg-turbo when the `turbojpeg` feature is on
//! (with DCT-domain downscaling when a size hint allows), else through the pure-Rust decoder.

use crate::data::format::ImageFormat;
use std::io::Cursor;
use std::path::Path;

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

/// Which JPEG decoder is compiled in.
pub fn jpeg_decoder_name() -> &'static str {
    if cfg!(feature = "turbojpeg") {
        "libjpeg-turbo"
    } else {
        "zune-jpeg"
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
    #[cfg(feature = "turbojpeg")]
    if format == ImageFormat::Jpeg {
        if let Some(img) = turbo::decode(bytes, max_pixels, min_side_hint, exif)? {
            return Ok(img);
        }
    }
    let _ = min_side_hint;
    decode_with_image_crate(bytes, format, max_pixels, exif)
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

/// The pure-Rust JPEG decoder fills a truncated scan with gray instead of failing; PIL refuses
/// such a file ("image file is truncated"), and so do we: a complete JPEG ends with EOI (FFD9),
/// possibly followed by padding.
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

#[cfg(feature = "turbojpeg")]
mod turbo {
    //! libjpeg-turbo: faster baseline decoding and DCT-domain downscaling.

    use super::{check_jpeg_complete, check_pixels, jpeg_orientation, DecodeError, Exif, RgbImage};
    use crate::data::format::ImageFormat;

    /// `Ok(None)` when libjpeg-turbo cannot convert this JPEG to RGB (CMYK/YCCK): the caller
    /// falls back to the pure-Rust decoder.
    pub fn decode(
        bytes: &[u8],
        max_pixels: u64,
        min_side_hint: Option<u32>,
        exif: Exif,
    ) -> Result<Option<RgbImage>, DecodeError> {
        let corrupt = |e: turbojpeg::Error| DecodeError::Corrupt {
            format: ImageFormat::Jpeg,
            detail: e.to_string(),
        };
        check_jpeg_complete(bytes)?;
        let mut dec = turbojpeg::Decompressor::new().map_err(corrupt)?;
        let header = dec.read_header(bytes).map_err(corrupt)?;
        check_pixels(header.width as u32, header.height as u32, max_pixels)?;
        if matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        ) {
            return Ok(None);
        }
        let short = header.width.min(header.height);
        let mut factor = turbojpeg::ScalingFactor::ONE;
        if let Some(target) = min_side_hint {
            for f in [
                turbojpeg::ScalingFactor::ONE_EIGHTH,
                turbojpeg::ScalingFactor::ONE_QUARTER,
                turbojpeg::ScalingFactor::ONE_HALF,
            ] {
                if f.scale(short) >= target as usize {
                    factor = f;
                    break;
                }
            }
        }
        dec.set_scaling_factor(factor).map_err(corrupt)?;
        let scaled = header.scaled(factor);
        let mut image = turbojpeg::Image {
            pixels: vec![0u8; scaled.width * scaled.height * 3],
            width: scaled.width,
            pitch: scaled.width * 3,
            height: scaled.height,
            format: turbojpeg::PixelFormat::RGB,
        };
        dec.decompress(bytes, image.as_deref_mut())
            .map_err(corrupt)?;
        let mut img = RgbImage {
            width: scaled.width as u32,
            height: scaled.height as u32,
            data: image.pixels,
        };
        if let Some(o) = jpeg_orientation(bytes).filter(|_| exif == Exif::Apply) {
            if o != image::metadata::Orientation::NoTransforms {
                img = super::orient(img, o);
            }
        }
        Ok(Some(img))
    }
}

/// Applies an EXIF orientation to a decoded image.
#[cfg_attr(not(feature = "turbojpeg"), allow(dead_code))]
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
