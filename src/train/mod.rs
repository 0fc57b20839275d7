//! Configuration, checkpoints and resume, the run folder, metrics, plots and progress: the
//! pieces the training loop is written with.

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod metrics;
pub mod outdir;
pub mod plot;
pub mod pretrained;
pub mod progress;

pub use config::{Config, ConfigBuilder, Method, Preset, ResolvedConfig};
