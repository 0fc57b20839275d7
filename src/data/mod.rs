//! The input side: folder scan, decoding, multi-crop augmentation, parallel loader, cache.
//!
//! [`scan`] lists image files; [`mod@decode`] turns bytes into RGB8; [`augment`] is the official
//! multi-crop recipe (built from [`resize`], [`color`] and [`blur`]); [`source`] and
//! [`loader`] feed the trainer; [`cache`] stores decoded images; [`idx`] and [`demo`] hold the
//! Fashion-MNIST demo data.

pub mod augment;
pub mod blur;
pub mod cache;
pub mod color;
pub mod decode;
pub mod demo;
pub mod format;
pub mod idx;
pub mod loader;
pub mod resize;
pub mod scan;
pub mod source;

pub use augment::{multi_crop, MultiCropConfig};
pub use decode::{decode, decode_exif, decode_file, decode_file_exif, DecodeError, Exif, RgbImage};
pub use demo::{demo_split, DemoImages, Split};
pub use format::ImageFormat;
pub use loader::{Batch, Loader, LoaderConfig};
pub use scan::{scan_folder, ImageEntry, ScanOptions, ScanResult};
pub use source::{DecodeOptions, FolderSource, ImageSource};
