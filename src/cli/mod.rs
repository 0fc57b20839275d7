//! The command-line interface: a thin layer over the library.

pub mod verify;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Train DINOv2 vision foundation models on your own images.
#[derive(Parser, Debug)]
#[command(name = "dinotrain", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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
}
