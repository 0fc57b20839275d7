//! Image file formats: recognised by extension at scan time (no I/O) and by magic bytes at
//! decode time (a PNG named `.jpg` still decodes; a text file named `.jpg` is refused).

use std::fmt;
use std::path::Path;

/// The image formats dinotrain reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Bmp,
    /// PBM / PGM / PPM / PAM.
    Pnm,
    Tiff,
    Webp,
}

impl ImageFormat {
    /// Every format, in display order.
    pub const ALL: [ImageFormat; 6] = [
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::Bmp,
        ImageFormat::Pnm,
        ImageFormat::Tiff,
        ImageFormat::Webp,
    ];

    /// The format named by a file extension (case-insensitive), or `None` for other files.
    pub fn from_extension(ext: &str) -> Option<Self> {
        let ext = ext.to_ascii_lowercase();
        Some(match ext.as_str() {
            "jpg" | "jpeg" | "jpe" | "jfif" => ImageFormat::Jpeg,
            "png" => ImageFormat::Png,
            "bmp" => ImageFormat::Bmp,
            "pbm" | "pgm" | "ppm" | "pnm" | "pam" => ImageFormat::Pnm,
            "tif" | "tiff" => ImageFormat::Tiff,
            "webp" => ImageFormat::Webp,
            _ => return None,
        })
    }

    /// The format named by a path's extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(Self::from_extension)
    }

    /// The format the first bytes of a file announce, or `None` when they match no format.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        let starts = |magic: &[u8]| bytes.starts_with(magic);
        if starts(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if starts(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if starts(b"BM") {
            Some(ImageFormat::Bmp)
        } else if starts(b"II*\0") || starts(b"MM\0*") {
            Some(ImageFormat::Tiff)
        } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else if bytes.len() >= 2 && bytes[0] == b'P' && (b'1'..=b'7').contains(&bytes[1]) {
            Some(ImageFormat::Pnm)
        } else {
            None
        }
    }

    /// The `image` crate's name for this format.
    pub(crate) fn to_image_crate(self) -> image::ImageFormat {
        match self {
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Bmp => image::ImageFormat::Bmp,
            ImageFormat::Pnm => image::ImageFormat::Pnm,
            ImageFormat::Tiff => image::ImageFormat::Tiff,
            ImageFormat::Webp => image::ImageFormat::WebP,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::Bmp => "bmp",
            ImageFormat::Pnm => "pnm",
            ImageFormat::Tiff => "tiff",
            ImageFormat::Webp => "webp",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_case_insensitive_and_unknown_ones_are_none() {
        assert_eq!(ImageFormat::from_extension("JPG"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_extension("JpEg"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_extension("Png"), Some(ImageFormat::Png));
        assert_eq!(ImageFormat::from_extension("TIF"), Some(ImageFormat::Tiff));
        assert_eq!(ImageFormat::from_extension("txt"), None);
        assert_eq!(
            ImageFormat::from_path(Path::new("a/b.WEBP")),
            Some(ImageFormat::Webp)
        );
        assert_eq!(ImageFormat::from_path(Path::new("a/noext")), None);
    }

    #[test]
    fn sniff_recognises_magic_bytes() {
        assert_eq!(
            ImageFormat::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(
            ImageFormat::sniff(b"\x89PNG\r\n\x1a\nrest"),
            Some(ImageFormat::Png)
        );
        assert_eq!(
            ImageFormat::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(ImageFormat::Webp)
        );
        assert_eq!(
            ImageFormat::sniff(b"P6\n2 2\n255\n"),
            Some(ImageFormat::Pnm)
        );
        assert_eq!(ImageFormat::sniff(b"hello world"), None);
        assert_eq!(ImageFormat::sniff(b""), None);
    }
}
