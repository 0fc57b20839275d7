//! The command-line interface: a thin layer over the library.

pub mod bench;
pub mod embed;
pub mod export;
pub mod knn;
pub mod logger;
pub mod progress;
pub mod scan;
pub mod train;
pub mod verify;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Train DINOv2 vision foundation models on your own images.
#[derive(Parser, Debug)]
#[command(name = "dinotrain", version, about, long_about = None)]
pub struct Cli {
    /// Without a command, `dinotrain` runs `train` with its defaults (the demo).
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a ViT with DINOv2 (or its DINO / iBOT stages) on a folder of images; with no
    /// --data, on the embedded Fashion-MNIST demo subset, ending with k-NN accuracy.
    Train(train::TrainArgs),
    /// Compute the outputs of one golden fixture with this project's code and write them
    /// (every `out.*` tensor the schema names) to RESULT as safetensors.
    Golden {
        /// The fixture file (`in.*` tensors and metadata).
        fixture: PathBuf,
        /// Where to write the computed `out.*` tensors.
        result: PathBuf,
        /// Device to compute on.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run every golden fixture in DIR and print a table; exits non-zero on any failure.
    Verify {
        /// Folder of fixtures.
        #[arg(default_value = "tests/golden")]
        dir: PathBuf,
        /// Device to compute on.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Decode every image under DIR and report formats, sizes and unreadable files.
    /// Exit code 0: all readable; 3: some unreadable; 4: none readable.
    Scan {
        /// The image folder (searched recursively).
        dir: PathBuf,
        /// Images with more pixels are refused as decompression bombs.
        #[arg(long, default_value_t = dinotrain::data::decode::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
    },
    /// CLS (and optionally mean patch-token) embeddings of every image of a folder, to
    /// safetensors, .npy or CSV.
    Embed(embed::EmbedArgs),
    /// k-NN top-1 (and top-5) accuracy of a backbone on labelled folders or the demo split.
    Knn(knn::KnnArgs),
    /// Write a backbone as safetensors with official or Hugging Face keys.
    Export(export::ExportArgs),
    /// Time the full training iteration on synthetic crops: images/s, FLOPs per image,
    /// utilisation against the device's peak, peak memory.
    Bench(bench::BenchArgs),
}
