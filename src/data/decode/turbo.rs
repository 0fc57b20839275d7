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
    let denom =
        super::dct_scale_denominator(header.width as u32, header.height as u32, min_side_hint);
    let factor = turbojpeg::ScalingFactor::new(1, denom as usize);
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
