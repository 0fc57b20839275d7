//! The loader alone (`dinotrain bench --data DIR`): decode + multi-crop of the user's images at
//! the benchmark's crop recipe and batch size, timed after a warm-up, beside the step's rate.
//! The verdict says which of the two bounds a training run on this machine.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::data::{Loader, LoaderConfig};
use crate::error::Result;
use crate::train::config::ResolvedConfig;
use crate::train::plan::crops_from_config;
use crate::train::run::training_folder;

/// The loader's measured rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoaderReport {
    pub images: usize,
    pub workers: usize,
    pub batches: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    pub images_per_s_per_worker: f64,
    /// Files that could not be decoded (replaced by readable ones, as in training).
    pub bad_images: u64,
}

/// Which side limits a training run: the loader's rate against the step's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The loader delivers fewer images per second than the step consumes.
    DataBound,
    /// The loader keeps up with less than 50% to spare: on a CPU run, where both share the
    /// cores, it will cost step time.
    Balanced,
    /// The loader delivers at least 1.5x what the step consumes.
    ComputeBound,
}

impl Verdict {
    /// From the two rates (images/s).
    pub fn of(loader: f64, step: f64) -> Self {
        let ratio = loader / step.max(1e-12);
        if ratio < 1.0 {
            Verdict::DataBound
        } else if ratio < 1.5 {
            Verdict::Balanced
        } else {
            Verdict::ComputeBound
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Verdict::DataBound => "data-bound",
            Verdict::Balanced => "balanced",
            Verdict::ComputeBound => "compute-bound",
        }
    }
}

/// Times `batches` batches of `batch_size` images from `dir` (after `warmup` batches) with
/// the crop recipe of `config` on `workers` threads (0: one per core).
pub fn time_loader(
    dir: &Path,
    config: &ResolvedConfig,
    batch_size: usize,
    batches: usize,
    warmup: usize,
    workers: usize,
) -> Result<LoaderReport> {
    let source = Arc::new(training_folder(dir, config)?);
    let cfg = LoaderConfig {
        crops: crops_from_config(config),
        workers: if workers == 0 {
            LoaderConfig::default().workers
        } else {
            workers
        },
        ..LoaderConfig::default()
    };
    let workers = cfg.workers;
    let mut loader = Loader::new(source, cfg, batch_size, config.config.train.seed, 0)?;
    for _ in 0..warmup {
        let b = loader.next_batch()?;
        loader.recycle(b);
    }
    let start = Instant::now();
    for _ in 0..batches {
        let b = loader.next_batch()?;
        loader.recycle(b);
    }
    let seconds = start.elapsed().as_secs_f64();
    let images = batches * batch_size;
    let images_per_s = images as f64 / seconds.max(1e-9);
    Ok(LoaderReport {
        images,
        workers,
        batches,
        seconds,
        images_per_s,
        images_per_s_per_worker: images_per_s / workers as f64,
        bad_images: loader.bad_images(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_follows_the_ratio() {
        assert_eq!(Verdict::of(50.0, 100.0), Verdict::DataBound);
        assert_eq!(Verdict::of(120.0, 100.0), Verdict::Balanced);
        assert_eq!(Verdict::of(150.0, 100.0), Verdict::ComputeBound);
        assert_eq!(Verdict::of(1.0, 0.0), Verdict::ComputeBound);
    }
}
