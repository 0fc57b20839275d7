//! `dinotrain train`: flags → configuration → `dinotrain::train`.

use super::progress::{Progress, ProgressMode};
use anyhow::{Context, Result};
use clap::Parser;
use dinotrain::train::config::{ConfigBuilder, ConfigWarning, Preset, Recipe};
use dinotrain::train::outdir::{OutdirMode, CONFIG_FILE};
use dinotrain::train::run::knn_line;
use dinotrain::train::{train, CancelHandle, ResolvedConfig, StopReason, TrainOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Flags of `dinotrain train`. Every hyperparameter of the official recipe is a config key
/// (`--set optim.base_lr=0.002`, or a YAML file with `--config`, official train configs included).
#[derive(Parser, Debug)]
pub struct TrainArgs {
    /// Folder of training images (searched recursively). Without it, the embedded
    /// Fashion-MNIST demo subset trains a small ViT and k-NN is reported on its test split.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder (config, log, metrics, plots, checkpoints, exported teacher). Default:
    /// the first free `out/run`, `out/run-2`, ...
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Starting point: `dinov2/vits14` (also vitb14, vitl14, vitg14, and `_reg4` variants), a
    /// `.pth` or `.safetensors` backbone file; default random initialisation.
    #[arg(long)]
    pub model: Option<String>,
    /// Method stage: dino (CLS loss), ibot (+ masked patches), dinov2 (+ KoLeo).
    #[arg(long)]
    pub method: Option<String>,
    /// Length in official epochs (`optim.epochs` × `train.OFFICIAL_EPOCH_LENGTH` iterations).
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<f64>,
    /// Length in iterations; the schedules are stretched to fit (`dinotrain.steps_schedule`).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per micro-batch (`train.batch_size_per_gpu`); a step takes --accumulate of them.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per step (`dinotrain.accumulate`): gradient accumulation with the
    /// semantics of as many GPUs, for a large-batch recipe on a small device.
    #[arg(long)]
    pub accumulate: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// A YAML configuration merged over the defaults (official train configs read unchanged).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How the training knobs are chosen: `small` (small images and datasets, minutes of
    /// training; the default without --data, --config and --model) or `official` (the official
    /// configuration as given; the default otherwise). Files and --set override either.
    #[arg(long, value_parser = Recipe::NAMES)]
    pub recipe: Option<String>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Delete dinotrain's files in --out and start again.
    #[arg(long)]
    pub overwrite: bool,
    /// Resume even though the configuration changed (the differences are logged).
    #[arg(long, requires = "resume")]
    pub allow_config_change: bool,
    /// Run seed (`train.seed`): initialisation, crops, masks and drop path all derive from it.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Set any configuration key, e.g. `--set optim.base_lr=0.002` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The first of `out/run`, `out/run-2`, ... that does not exist yet.
fn default_out() -> PathBuf {
    let base = Path::new("out");
    (1..)
        .map(|i| match i {
            1 => base.join("run"),
            i => base.join(format!("run-{i}")),
        })
        .find(|p| !p.exists())
        .expect("an unbounded range yields a free name")
}

/// Builds the configuration the flags describe.
pub fn resolve(args: &TrainArgs) -> Result<ResolvedConfig> {
    let preset = if args.data.is_some() || args.config.is_some() {
        Preset::Official
    } else {
        Preset::Demo
    };
    let out = match (&args.out, args.resume) {
        (Some(o), _) => o.clone(),
        (None, true) => anyhow::bail!("--resume needs --out (the run folder to continue)"),
        (None, false) => default_out(),
    };
    // `--resume` without --config continues with the run's own configuration (its
    // config.yaml); flags and --set still apply over it.
    let own = out.join(CONFIG_FILE);
    let config = match &args.config {
        Some(file) => Some(file.clone()),
        None if args.resume && own.is_file() => Some(own),
        None => None,
    };
    let preset = if config.is_some() {
        Preset::Official
    } else {
        preset
    };
    let recipe = match &args.recipe {
        Some(name) => Recipe::from_name(name)?,
        None if preset == Preset::Demo && args.model.is_none() => Recipe::Small,
        None => Recipe::Official,
    };
    let mut b = ConfigBuilder::new(preset)?;
    b.recipe(recipe)?;
    if let Some(file) = &config {
        b.file(file)?;
    }
    b.flag("out", &out.to_string_lossy())?;
    let flags: [(&str, Option<String>); 9] = [
        (
            "data",
            args.data.as_ref().map(|p| p.to_string_lossy().into()),
        ),
        ("model", args.model.clone()),
        ("method", args.method.clone()),
        ("epochs", args.epochs.map(|v| v.to_string())),
        ("steps", args.steps.map(|v| v.to_string())),
        ("batch-size", args.batch_size.map(|v| v.to_string())),
        ("accumulate", args.accumulate.map(|v| v.to_string())),
        ("device", args.device.clone()),
        ("seed", args.seed.map(|v| v.to_string())),
    ];
    if args.epochs.is_some() {
        // A length in epochs replaces a length in steps from the preset or the recipe.
        b.set_value("dinotrain.steps", "null")?;
    }
    for (flag, value) in flags {
        if let Some(v) = value {
            b.flag(flag, &v).with_context(|| format!("--{flag} {v}"))?;
        }
    }
    for s in &args.sets {
        b.set(s).with_context(|| format!("--set {s}"))?;
    }
    let (config, warnings) = b.build()?;
    Ok(ResolvedConfig::resolve(config, warnings)?)
}

/// SIGINT, SIGTERM and SIGHUP: the first stops the run after its current step (it writes a
/// checkpoint and says how to continue); a second one ends the process at once.
fn stop_on_signals(cancel: &CancelHandle) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let flag = cancel.flag();
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Registered first, so it sees the flag as the earlier signal left it.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&flag))
            .context("installing the signal handlers")?;
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .context("installing the signal handlers")?;
    }
    Ok(())
}

/// `dinotrain train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let config = resolve(&args)?;
    if args.print_config {
        for w in &config.warnings {
            match w.is_warning() {
                true => eprintln!("warning: {w}"),
                false => eprintln!("{w}"),
            }
        }
        print!("{}", config.to_yaml()?);
        return Ok(());
    }
    let outdir = match (args.resume, args.overwrite) {
        (true, _) => OutdirMode::Resume,
        (false, true) => OutdirMode::Overwrite,
        (false, false) => OutdirMode::Fresh,
    };
    let what = match &config.config.dinotrain.data {
        Some(d) => d.display().to_string(),
        None => "the embedded Fashion-MNIST demo subset (10,000 images)".into(),
    };
    if args.recipe.is_none() && args.data.is_some() && args.config.is_none() && args.model.is_none()
    {
        eprintln!(
            "dinotrain: the official recipe ({}, patch {}, {} px crops); for a small dataset, \
             small images or a CPU, --recipe small trains a small ViT at 32 px in minutes",
            config.config.student.arch.name(),
            config.config.student.patch_size,
            config.config.crops.global_crops_size
        );
    }
    let recipe = (config.warnings.iter())
        .find_map(|w| match w {
            ConfigWarning::Recipe { recipe, .. } => Some(format!(", recipe {recipe}")),
            _ => None,
        })
        .unwrap_or_default();
    eprintln!(
        "dinotrain: training {}{recipe} ({} steps, batch {}) on {what}; output in {}",
        config.method,
        config.total_iters,
        config.total_batch,
        config.output_dir.display()
    );
    let log_every = config.config.dinotrain.log_every.max(1);
    let out = config.output_dir.clone();
    let cancel = CancelHandle::new();
    stop_on_signals(&cancel)?;
    let summary = train(
        TrainOptions::new(config)
            .outdir(outdir)
            .allow_config_change(args.allow_config_change)
            .observer(Progress::new(ProgressMode::auto(log_every)))
            .cancel(cancel),
    )?;
    if summary.stopped == Some(StopReason::Cancelled) {
        eprintln!(
            "dinotrain: stopped by a signal after step {}; the checkpoint is saved. Continue with:\n  \
             dinotrain train --out {} --resume",
            summary.steps,
            out.display()
        );
    }
    if let Some(last) = &summary.last {
        let terms: Vec<String> = last
            .losses
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        println!(
            "final losses (step {}): {}",
            last.step + 1,
            terms.join(", ")
        );
    }
    println!(
        "{} steps, {:.0} s in all with k-NN ({:.1} images/s while training, {:.0}% of step time waiting for data)",
        summary.steps_this_run,
        summary.wall_seconds,
        summary.images_per_s,
        100.0 * summary.data_wait_share
    );
    if let Some(knn) = &summary.knn {
        println!("{}", knn_line(knn));
    }
    if let Some(gemms) = &summary.gemms {
        println!("CUDA GEMMs: {gemms}");
    }
    println!("teacher backbone: {}", summary.export.display());
    if let Some(c) = &summary.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    Ok(())
}
