//! Where images come from: the [`ImageSource`] trait, and its implementation for a folder of
//! files (with an optional decoded-image cache). The demo dataset implements it in `demo.rs`.

use crate::data::cache::DecodedCache;
use crate::data::decode::{decode_file_exif, DecodeError, Exif, RgbImage, DEFAULT_MAX_PIXELS};
use crate::data::scan::{scan_folder, ImageEntry, ScanOptions, ScanResult};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A random-access collection of images. Implementations must be cheap to call from several
/// worker threads at once.
pub trait ImageSource: Send + Sync {
    /// Number of images (readable or not).
    fn len(&self) -> usize;
    /// Decodes image `index` (`< len()`).
    fn load(&self, index: usize) -> Result<RgbImage, DecodeError>;
    /// A name for messages (a path for files).
    fn name(&self, index: usize) -> String;
    /// The class label, when the source has them.
    fn label(&self, index: usize) -> Option<u32>;
    /// True when there is no image at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How files are decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Images with more pixels are refused before decoding.
    pub max_pixels: u64,
    /// Allow decoders to return an image whose shorter side is down to this size when that is
    /// cheaper (JPEG DCT scaling by 1/2, 1/4 or 1/8). `None`: always full size.
    pub min_side_hint: Option<u32>,
    /// JPEG EXIF orientation: applied by default (training); `dinotrain embed` / `knn` ignore it
    /// by default, as the official code does.
    pub exif: Exif,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_pixels: DEFAULT_MAX_PIXELS,
            min_side_hint: None,
            exif: Exif::Apply,
        }
    }
}

/// The shorter side an image needs so that the smallest global crop (`scale.0` of the area)
/// is still at least `global_size` pixels wide: below that, downscaling loses crop quality.
pub fn needed_short_side(global_size: u32, global_scale_min: f64) -> u32 {
    (global_size as f64 / global_scale_min.sqrt()).ceil() as u32
}

/// Every image file under a folder.
pub struct FolderSource {
    pub root: PathBuf,
    pub entries: Vec<ImageEntry>,
    pub classes: Vec<String>,
    pub decode: DecodeOptions,
    cache: Option<DecodedCache>,
}

impl FolderSource {
    /// Scans `root`; a folder without any image file is an error.
    pub fn open(root: &Path, scan: &ScanOptions, decode: DecodeOptions) -> Result<Self> {
        let found = scan_folder(root, scan)?;
        Self::from_scan(root, found, decode)
    }

    /// Builds the source from a finished scan.
    pub fn from_scan(root: &Path, found: ScanResult, decode: DecodeOptions) -> Result<Self> {
        if found.entries.is_empty() {
            return Err(Error::Data(format!(
                "{}: no image files (looked for {}; {} other files)",
                root.display(),
                crate::data::format::ImageFormat::ALL
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                found.other_files
            )));
        }
        if let Some(first) = found.unreadable.first() {
            // Training goes on without them, but says so (with a count), as `scan` does.
            log::warn!(
                "{}: {} entries could not be read and are left out (first: {}: {}); \
                 `dinotrain scan {}` lists them",
                root.display(),
                found.unreadable.len(),
                first.path.display(),
                first.reason,
                root.display()
            );
        }
        Ok(FolderSource {
            root: root.to_path_buf(),
            entries: found.entries,
            classes: found.classes,
            decode,
            cache: None,
        })
    }

    /// Serves images from a decoded-image cache in `dir` (built now if missing or stale).
    pub fn with_cache(mut self, dir: &Path, short_side: u32) -> Result<Self> {
        self.cache = Some(DecodedCache::open_or_build(
            dir,
            &self.entries,
            short_side,
            self.decode.max_pixels,
        )?);
        Ok(self)
    }
}

impl ImageSource for FolderSource {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn load(&self, index: usize) -> Result<RgbImage, DecodeError> {
        if let Some(cache) = &self.cache {
            return cache.load(index);
        }
        let e = self.entries.get(index).ok_or_else(|| {
            DecodeError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("image {index} of {}", self.entries.len()),
            ))
        })?;
        decode_file_exif(
            &e.path,
            e.format,
            self.decode.max_pixels,
            self.decode.min_side_hint,
            self.decode.exif,
        )
    }

    fn name(&self, index: usize) -> String {
        self.entries
            .get(index)
            .map_or_else(|| format!("#{index}"), |e| e.path.display().to_string())
    }

    fn label(&self, index: usize) -> Option<u32> {
        self.entries.get(index).and_then(|e| e.label)
    }
}
