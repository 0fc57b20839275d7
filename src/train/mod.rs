//! Training: the typed configuration, the loop and how to watch it, and the pieces the loop is
//! written with (checkpoints and resume, the run folder, metrics, plots, export).
//!
//! The library path is a [`TrainConfig`] (a preset plus typed setters, or any field of the
//! official key tree), resolved into a [`ResolvedConfig`] and run by [`train`]:
//!
//! ```no_run
//! use dinotrain::train::{train, Preset, TrainConfig, TrainOptions};
//!
//! let config = TrainConfig::preset(Preset::Official)
//!     .data("my_images")
//!     .output_dir("out/run")
//!     .steps(5000)
//!     .batch_size(32);
//! let summary = train(TrainOptions::new(config.resolve()?))?;
//! println!("{} steps, teacher in {}", summary.steps, summary.export.display());
//! # Ok::<(), dinotrain::Error>(())
//! ```
//!
//! A [`TrainObserver`] in the options sees every step and may stop the run, a
//! [`CancelHandle`] stops it from another thread. The command line's `--set key=value` and
//! YAML files go through [`ConfigBuilder`] instead, which checks every key by name.
//!
//! How the loop uses the pieces (a sketch; names from this module):
//!
//! ```text
//! let plan = ResolvedConfig::resolve(config, warnings)?;  // lr, iterations, schedules, arch
//! let run = RunDir::prepare(&plan.output_dir, OutdirMode::Fresh)?;
//! plan.write_yaml(&run.root)?;
//! let mut log = RunLog::open(&run.log_path())?;
//! let identity = plan.resume_identity()?;
//! // resume: checkpoint::load(&run.latest_checkpoint()?.unwrap(), &table, &identity, ConfigCheck::Strict)?
//! let mut metrics = MetricsWriter::open(&run.metrics_path(), resume_step)?;
//! observer.on_start(&start);
//! for step in first_step..plan.total_iters {
//!     let values = plan.schedules.at(step);                 // every scheduled scalar
//!     ... one training step ...
//!     metrics.write(&record)?;  if let Some((term, v)) = record.non_finite_loss() { stop }
//!     if observer.on_step(&record) == Control::Stop || cancel.is_cancelled() { stop }
//!     if (step + 1) % plan.checkpoint_every == 0 { checkpoint::save(&run.checkpoints(), &state)?;
//!                                                 checkpoint::prune(&run.checkpoints(), keep)?; }
//!     if (step + 1) % plot_every == 0 { plot::write_png(&records, title, &run.plot_path())?; }
//! }
//! export::export_backbone(&run.export_path(), &table, &teacher, KeyNaming::Official, &meta)?;
//! ```

pub mod checkpoint;
pub mod config;
pub mod health;

pub mod lock;
pub mod metrics;
pub mod observer;
pub mod outdir;
pub mod plan;
pub mod plot;
pub mod resources;

pub mod run;
pub mod state;
pub mod tensorboard;
pub mod trainer;

#[doc(hidden)]
pub use config::Config;
pub use config::{ConfigBuilder, Method, Preset, Recipe, ResolvedConfig, TrainConfig};
pub use observer::{CancelHandle, Control, RunStart, StopReason, TrainObserver};
pub use outdir::OutdirMode;
pub use run::{train, KnnReport, TrainOptions, TrainSummary};
pub use trainer::{StepRecord, TrainPlan, Trainer};
