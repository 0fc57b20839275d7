//! `dinotrain bench`: training-step throughput on synthetic crops (a table on stdout, optionally
//! JSON). The measurement lives in [`dinotrain::bench`].

use anyhow::{Context, Result};
use clap::Parser;
use dinotrain::backend::Device;
use dinotrain::bench::{self, BenchModel, BenchOptions, BenchReport, StepTiming, Verdict};
use dinotrain::train::Method;
use std::path::PathBuf;

/// Flags of `dinotrain bench`.
#[derive(Parser, Debug)]
pub struct BenchArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// demo (the configuration of a plain `dinotrain train`), micro, tiny, vits14, vitb14,
    /// vitl14 or vitg14.
    #[arg(long, default_value = "vits14")]
    pub model: String,
    /// Images per step (default by model and device: vits14 8 on the CPU, 64 on CUDA).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Global crop size in px (default 224; the demo's 32).
    #[arg(long)]
    pub global_size: Option<usize>,
    /// Local crop size in px (default 98; the demo's 16).
    #[arg(long)]
    pub local_size: Option<usize>,
    /// Local crops per image (default 8).
    #[arg(long)]
    pub local_crops: Option<usize>,
    /// dino, ibot or dinov2.
    #[arg(long, default_value = "dinov2")]
    pub method: String,
    /// Timed steps (default 5 on the CPU, 20 on CUDA).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Untimed warm-up steps (default 1 on the CPU, 3 on CUDA).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Write the result as JSON to this file (atomically).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The peak to compute utilisation against, TFLOP/s (default: 989 on H100/H200; on the
    /// CPU, a GEMM measured in-process).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Any configuration key, e.g. `--set dino.head_n_prototypes=4096` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Seed of the initialisation, masks and synthetic crops.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A folder of images: also time the loader (decode + multi-crop) on it and say whether a
    /// run would be data-bound or compute-bound
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Loader threads for --data (default: one per core)
    #[arg(long)]
    pub workers: Option<usize>,
}

impl BenchArgs {
    /// The library options the flags describe.
    pub fn options(&self) -> Result<BenchOptions> {
        Ok(BenchOptions {
            device: self
                .device
                .parse::<Device>()
                .with_context(|| format!("--device {}", self.device))?,
            model: self
                .model
                .parse::<BenchModel>()
                .with_context(|| format!("--model {}", self.model))?,
            method: self
                .method
                .parse::<Method>()
                .with_context(|| format!("--method {}", self.method))?,
            batch_size: self.batch_size,
            global_size: self.global_size,
            local_size: self.local_size,
            local_crops: self.local_crops,
            steps: self.steps,
            warmup: self.warmup,
            peak_tflops: self.peak_tflops,
            sets: self.sets.clone(),
            seed: self.seed,
            data: self.data.clone(),
            workers: self.workers,
        })
    }
}

/// `dinotrain bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let opts = args.options()?;
    let mut progress = |s: &StepTiming| {
        let what = if s.warmup { "warm-up" } else { "timed" };
        eprintln!(
            "step {}/{} ({what}): {:.3} s, loss {:.4}",
            s.index + 1,
            s.total,
            s.seconds,
            s.loss
        );
    };
    let report = bench::run(&opts, &mut progress)?;
    for w in &report.config_warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        report
            .write_json(path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The human-readable result.
fn table(r: &BenchReport) -> String {
    let g = |flops: f64| flops / 1e9;
    let memory = match r.peak_memory_bytes {
        Some(b) => format!("{:.2} GB ({})", b as f64 / 1e9, r.peak_memory_source),
        None => format!("unknown ({})", r.peak_memory_source),
    };
    let rows = [
        (
            "model",
            format!(
                "{} (D {}, depth {}, {} heads, patch {}), {}, K {}",
                r.model,
                r.embed_dim,
                r.depth,
                r.num_heads,
                r.patch_size,
                r.method,
                r.dino_prototypes
            ),
        ),
        ("device", r.device.clone()),
        (
            "batch",
            format!(
                "{} images: {} x {} px + {} x {} px crops each",
                r.batch_size, r.global_crops, r.global_size, r.local_crops, r.local_size
            ),
        ),
        (
            "steps",
            format!("{} timed after {} warm-up", r.timed_steps, r.warmup_steps),
        ),
        (
            "step time",
            format!(
                "median {:.4} s, min {:.4} s, mean {:.4} s",
                r.step_seconds.median, r.step_seconds.min, r.step_seconds.mean
            ),
        ),
        ("images/s", format!("{:.2}", r.images_per_s)),
        (
            "CPU time",
            match &r.cpu_seconds {
                Some(c) => format!(
                    "median {:.4} s per step ({:.2} images per CPU-second)",
                    c.median,
                    r.batch_size as f64 / c.median
                ),
                None => "not measured on this device".to_string(),
            },
        ),
        (
            "FLOPs per image",
            format!(
                "{:.1} GFLOP (student {:.1}, teacher {:.1}, heads {:.1}; forward {:.2} per \
                 global crop)",
                g(r.flops_per_image),
                g(r.flops.student_backbone),
                g(r.flops.teacher_backbone),
                g(r.flops.student_heads + r.flops.teacher_heads),
                g(r.flops.forward_global_crop)
            ),
        ),
        ("achieved", format!("{:.3} TFLOP/s", r.achieved_tflops)),
        (
            "peak",
            format!("{:.3} TFLOP/s: {}", r.peak_tflops, r.peak_source),
        ),
        ("utilisation", format!("{:.1}%", 100.0 * r.utilisation)),
        ("peak memory", memory),
        (
            "GEMMs per step",
            match &r.gemms_per_step {
                Some(g) => g.to_string(),
                None => "-".to_string(),
            },
        ),
        (
            "kernels per step",
            match r.kernel_launches_per_step {
                Some(n) => format!("{n:.0} launches besides the GEMMs"),
                None => "-".to_string(),
            },
        ),
        (
            "page faults",
            match r.minor_faults_per_step {
                Some(n) => format!("{n:.0} minor faults per step"),
                None => "-".to_string(),
            },
        ),
        (
            "loss",
            format!("{:.4} first, {:.4} last", r.loss_first, r.loss_last),
        ),
    ];
    let mut out = String::from("dinotrain bench\n");
    for (name, value) in rows {
        out.push_str(&format!("  {name:<16} {value}\n"));
    }
    if let (Some(l), Some(v)) = (&r.loader, r.verdict) {
        out.push_str(&format!(
            "  {:<16} {:.2} images/s ({:.2} per worker, {} workers; {} images in {:.2} s{})\n",
            "loader",
            l.images_per_s,
            l.images_per_s_per_worker,
            l.workers,
            l.images,
            l.seconds,
            if l.bad_images > 0 {
                format!(", {} unreadable files replaced", l.bad_images)
            } else {
                String::new()
            }
        ));
        out.push_str(&format!(
            "  {:<16} {}: the loader gives {:.2}x the images/s the step takes{}\n",
            "verdict",
            v.describe(),
            l.images_per_s / r.images_per_s,
            match v {
                Verdict::DataBound => "; more --set dinotrain.workers, or the decoded-image cache",
                Verdict::Balanced => "; on the CPU both share the cores",
                Verdict::ComputeBound => "",
            }
        ));
    }
    out
}
