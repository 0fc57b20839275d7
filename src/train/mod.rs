//! Configuration, checkpoints and resume, the run folder, metrics, plots and progress: the
//! pieces the training loop is written with.
//!
//! How a loop uses them (a sketch; names from this module):
//!
//! ```text
//! let mut b = ConfigBuilder::new(Preset::Demo)?;          // or Preset::Official
//! b.file(config_path)?; b.flag("steps", "300")?; b.set("optim.base_lr=1e-3")?;
//! let (config, warnings) = b.build()?;
//! let plan = ResolvedConfig::resolve(config, warnings)?;  // lr, iterations, schedules, arch
//! let run = RunDir::prepare(&plan.output_dir, OutdirMode::Fresh)?;
//! plan.write_yaml(&run.root)?;
//! let mut log = RunLog::open(&run.log_path())?;
//! let identity = plan.resume_identity()?;
//! // resume: checkpoint::load(&run.latest_checkpoint()?.unwrap(), &table, &identity, ConfigCheck::Strict)?
//! let mut metrics = MetricsWriter::open(&run.metrics_path(), resume_step)?;
//! let mut progress = Progress::new(ProgressMode::auto(log_every), first_step, plan.total_iters);
//! for step in first_step..plan.total_iters {
//!     let values = plan.schedules.at(step);                 // every scheduled scalar
//!     ... one training step ...
//!     metrics.write(&record)?;  if let Some((term, v)) = record.non_finite_loss() { stop }
//!     progress.step(&report);
//!     if (step + 1) % plan.checkpoint_every == 0 { checkpoint::save(&run.checkpoints(), &state)?;
//!                                                 checkpoint::prune(&run.checkpoints(), keep)?; }
//!     if (step + 1) % plot_every == 0 { plot::write_png(&records, title, &run.plot_path())?; }
//! }
//! export::export_backbone(&run.export_path(), &table, &teacher, KeyNaming::Official, &meta)?;
//! ```

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod export;
pub mod metrics;
pub mod outdir;
pub mod plot;
pub mod pretrained;
pub mod progress;
pub mod run;
pub mod state;
pub mod trainer;

pub use config::{Config, ConfigBuilder, Method, Preset, ResolvedConfig, TrainConfig};
pub use run::{train, KnnReport, TrainOptions, TrainSummary};
