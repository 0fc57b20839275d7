//! Configuration, checkpoints and resume, the run folder, metrics, plots and progress: the
//! pieces the training loop is written with.

pub mod config;
pub mod pretrained;

pub use config::{Config, ConfigBuilder, Method, Preset, ResolvedConfig};
