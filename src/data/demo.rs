//! The demo dataset shipped in the binary: the first 10,000 training and the first 2,000 test
//! images of Fashion-MNIST (28×28 gray, 10 classes), made by `tools/make-demo-data.sh`.

use crate::data::decode::{DecodeError, RgbImage};
use crate::data::idx::read_idx;
use crate::data::source::ImageSource;
use crate::error::{Error, Result};

const TRAIN_IMAGES: &[u8] = include_bytes!("demo/train-images-idx3-ubyte.gz");
const TRAIN_LABELS: &[u8] = include_bytes!("demo/train-labels-idx1-ubyte.gz");
const TEST_IMAGES: &[u8] = include_bytes!("demo/test-images-idx3-ubyte.gz");
const TEST_LABELS: &[u8] = include_bytes!("demo/test-labels-idx1-ubyte.gz");

/// Fashion-MNIST's class names, by label.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Which part of the demo data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The first 10,000 training images.
    Train,
    /// The first 2,000 test images.
    Test,
}

/// Gray images with labels, all in memory.
#[derive(Clone, Debug)]
pub struct DemoImages {
    pub split: Split,
    pub rows: u32,
    pub cols: u32,
    /// `[N, rows, cols]` gray bytes.
    pub pixels: Vec<u8>,
    /// `[N]`, each < `class_names.len()`.
    pub labels: Vec<u8>,
    pub class_names: Vec<String>,
}

/// Loads a split of the embedded demo data.
pub fn demo_split(split: Split) -> Result<DemoImages> {
    let (images, labels) = match split {
        Split::Train => (TRAIN_IMAGES, TRAIN_LABELS),
        Split::Test => (TEST_IMAGES, TEST_LABELS),
    };
    let bad = |what: &str, e: crate::data::idx::IdxError| {
        Error::Data(format!("embedded demo {split:?} {what}: {e}"))
    };
    let images = read_idx(images, 3).map_err(|e| bad("images", e))?;
    let labels = read_idx(labels, 1).map_err(|e| bad("labels", e))?;
    let n = images.dims[0];
    if labels.dims[0] != n {
        return Err(Error::Data(format!(
            "embedded demo {split:?}: {n} images but {} labels",
            labels.dims[0]
        )));
    }
    if let Some(&l) = labels
        .data
        .iter()
        .find(|&&l| l as usize >= CLASS_NAMES.len())
    {
        return Err(Error::Data(format!(
            "embedded demo {split:?}: label {l} out of range"
        )));
    }
    Ok(DemoImages {
        split,
        rows: images.dims[1] as u32,
        cols: images.dims[2] as u32,
        pixels: images.data,
        labels: labels.data,
        class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
    })
}

impl DemoImages {
    /// The gray pixels of image `i` (`[rows, cols]`).
    pub fn gray(&self, i: usize) -> &[u8] {
        let n = (self.rows * self.cols) as usize;
        &self.pixels[i * n..(i + 1) * n]
    }
}

impl ImageSource for DemoImages {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn load(&self, index: usize) -> Result<RgbImage, DecodeError> {
        if index >= self.len() {
            return Err(DecodeError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("demo image {index} of {}", self.len()),
            )));
        }
        Ok(RgbImage::from_gray(self.cols, self.rows, self.gray(index)))
    }

    fn name(&self, index: usize) -> String {
        format!("fashion-mnist/{:?}/{index}", self.split).to_lowercase()
    }

    fn label(&self, index: usize) -> Option<u32> {
        self.labels.get(index).map(|&l| l as u32)
    }
}
