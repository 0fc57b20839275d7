//! `dinotrain bench`: the throughput of the full training iteration ([`Trainer::train_step`]:
//! teacher forward, student forward and backward, heads, losses, clipping, AdamW, EMA) on
//! synthetic crops, with an analytical FLOP count, utilisation against a peak, and peak memory.
//!
//! The plan comes from the official configuration through the same path as `dinotrain train`
//! ([`ConfigBuilder`] → [`ResolvedConfig`] → [`plan_from_config`]), with the model preset, crop
//! sizes, batch and method as overrides, and random (official) initialisation. Drop path is off
//! by default (`student.drop_path_rate = 0`): the official batch-subset drop path skips the
//! dropped samples' branches, so the work done would be less than the FLOP count says; pass
//! `--set student.drop_path_rate=0.3` to time it anyway.
//!
//! # FLOP count
//! Analytical, in `flops.rs`: matrix products only, backward = 2 × forward, teacher forward on the
//! global crops, heads on CLS tokens and the expected masked patches. ViT-S/14: 12.25 GFLOP per
//! 224-px forward, about 166 GFLOP per image per DINOv2 step (593 for ViT-B/14), as in `GPU.md`.
//!
//! # JSON (`--json FILE`, [`BenchReport`])
//! `schema` ("dinotrain-bench/1"), `device`, `device_kind` (cpu|cuda), `model`, `method`,
//! `embed_dim`, `depth`, `num_heads`, `patch_size`, `batch_size`, `global_crops`, `global_size`,
//! `local_crops`, `local_size`, `dino_prototypes`, `warmup_steps`, `timed_steps`,
//! `step_seconds {median, min, mean, all}`, `cpu_seconds` (the same over the process's CPU time
//! per step, CPU runs only, else null), `images_per_s` (batch / median step time),
//! `flops_per_image`, `flops {student_backbone, teacher_backbone, student_heads, teacher_heads,
//! forward_global_crop, forward_local_crop, masked_patches_per_image}`, `achieved_tflops`,
//! `peak_tflops`, `peak_source`, `utilisation` (fraction of the peak), `peak_memory_bytes`
//! (null when unknown), `peak_memory_source`, `gemms_per_step` (CUDA: `{cublaslt,
//! fused_epilogues, cublas, separate_epilogues}` per timed step and `refused_problems` in all,
//! null on the CPU), `kernel_launches_per_step` (CUDA, else null), `minor_faults_per_step`
//! (page faults of the process per timed step, null where /proc is missing), `loss_first`,
//! `loss_last`, `config_warnings`; with `--data`, `loader {images, workers, batches, seconds,
//! images_per_s, images_per_s_per_worker, bad_images}` and `verdict` (`data_bound`,
//! `balanced`, `compute_bound`), else null.

mod flops;
pub mod loader;

pub use flops::{head_forward_flops, vit_forward_flops, StepFlops};
pub use loader::{LoaderReport, Verdict};

use crate::backend::cpu::matmul;
use crate::backend::cuda::{resolve_device, GemmStats, ResolvedDevice};
use crate::backend::Device;
use crate::backend::Gemm;
use crate::error::{Error, Result};
use crate::nn::{Ffn, Preset as SizePreset};
use crate::rng::{keyed, stream};
use crate::train::config::{ConfigBuilder, Method, Preset, ResolvedConfig};
use crate::train::plan::plan_from_config;
use crate::train::trainer::Trainer;
use rand::Rng as _;
use rand_distr::StandardNormal;
use serde::Serialize;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

/// Dense bf16 peak of the H100 / H200 (SXM), TFLOP/s.
pub const H100_BF16_PEAK_TFLOPS: f64 = 989.0;
/// Side of the square matrices of the in-process CPU GEMM peak measurement.
const CPU_PEAK_GEMM_SIZE: usize = 2048;
/// Timed repetitions of that product (the best counts).
const CPU_PEAK_GEMM_REPS: usize = 5;

/// The models `dinotrain bench` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchModel {
    /// The demo configuration of a plain `dinotrain train` (D 192, depth 6, patch 4, 32/16 px,
    /// K 4096, batch 64).
    Demo,
    /// D 32, depth 2, 2 heads (tests).
    Micro,
    /// D 192, depth 6, 3 heads.
    Tiny,
    Vits14,
    Vitb14,
    Vitl14,
    Vitg14,
}

impl BenchModel {
    /// Every model with its name and the other spellings the command line accepts.
    const NAMES: [(BenchModel, &'static str, &'static [&'static str]); 7] = [
        (BenchModel::Demo, "demo", &[]),
        (BenchModel::Micro, "micro", &[]),
        (BenchModel::Tiny, "tiny", &[]),
        (BenchModel::Vits14, "vits14", &["vits", "small"]),
        (BenchModel::Vitb14, "vitb14", &["vitb", "base"]),
        (BenchModel::Vitl14, "vitl14", &["vitl", "large"]),
        (BenchModel::Vitg14, "vitg14", &["vitg", "giant"]),
    ];

    pub fn name(self) -> &'static str {
        let entry = Self::NAMES.iter().find(|(m, ..)| *m == self);
        entry.map_or("", |(_, name, _)| name)
    }

    /// The backbone size; `None` for the demo, which keeps its preset's.
    fn size(self) -> Option<SizePreset> {
        match self {
            BenchModel::Demo => None,
            BenchModel::Micro => Some(SizePreset::Micro),
            BenchModel::Tiny => Some(SizePreset::Tiny),
            BenchModel::Vits14 => Some(SizePreset::Small),
            BenchModel::Vitb14 => Some(SizePreset::Base),
            BenchModel::Vitl14 => Some(SizePreset::Large),
            BenchModel::Vitg14 => Some(SizePreset::Giant),
        }
    }

    /// A batch that fits: small on the CPU (minutes per run at most), official-sized on a GPU.
    pub fn default_batch(self, device: BenchDevice) -> usize {
        match (device, self) {
            (_, BenchModel::Demo) => 64,
            (BenchDevice::Cpu, BenchModel::Micro | BenchModel::Tiny) => 16,
            (BenchDevice::Cpu, BenchModel::Vits14) => 8,
            (BenchDevice::Cpu, BenchModel::Vitb14) => 4,
            (BenchDevice::Cpu, BenchModel::Vitl14 | BenchModel::Vitg14) => 2,
            (BenchDevice::Cuda, BenchModel::Vitl14) => 32,
            (BenchDevice::Cuda, BenchModel::Vitg14) => 16,
            (BenchDevice::Cuda, _) => 64,
        }
    }
}

impl FromStr for BenchModel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let known = |&&(_, name, also): &&(_, &str, &[&str])| name == s || also.contains(&s);
        match Self::NAMES.iter().find(known) {
            Some(&(model, ..)) => Ok(model),
            None => {
                let names: Vec<&str> = Self::NAMES.iter().map(|(_, name, _)| *name).collect();
                Err(Error::Config(format!(
                    "unknown bench model '{s}' (expected {})",
                    names.join(", ")
                )))
            }
        }
    }
}

impl fmt::Display for BenchModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the benchmark ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

impl BenchDevice {
    fn of(device: &ResolvedDevice) -> Self {
        match device {
            ResolvedDevice::Cpu(_) => BenchDevice::Cpu,
            ResolvedDevice::Cuda(_) => BenchDevice::Cuda,
        }
    }

    /// Timed steps by default.
    pub fn default_steps(self) -> usize {
        match self {
            BenchDevice::Cpu => 5,
            BenchDevice::Cuda => 20,
        }
    }

    /// Untimed warm-up steps by default.
    pub fn default_warmup(self) -> usize {
        match self {
            BenchDevice::Cpu => 1,
            BenchDevice::Cuda => 3,
        }
    }
}

/// What to benchmark; `None` fields take the model's and device's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    pub device: Device,
    pub model: BenchModel,
    pub batch_size: Option<usize>,
    /// Global crop size (default 224; the demo's 32).
    pub global_size: Option<usize>,
    /// Local crop size (default 98, a multiple of 14; the demo's 16).
    pub local_size: Option<usize>,
    /// Local crops per image (default 8).
    pub local_crops: Option<usize>,
    pub method: Method,
    pub steps: Option<usize>,
    pub warmup: Option<usize>,
    /// Overrides the peak the utilisation is computed against (TFLOP/s).
    pub peak_tflops: Option<f64>,
    /// Extra `key=value` configuration overrides, applied last.
    pub sets: Vec<String>,
    pub seed: u64,
    /// A folder of images: the loader is timed on it too (decode + multi-crop).
    pub data: Option<std::path::PathBuf>,
    /// Loader threads for `data` (None: one per core).
    pub workers: Option<usize>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            device: Device::Auto,
            model: BenchModel::Vits14,
            batch_size: None,
            global_size: None,
            local_size: None,
            local_crops: None,
            method: Method::Dinov2,
            steps: None,
            warmup: None,
            peak_tflops: None,
            sets: Vec::new(),
            seed: 0,
            data: None,
            workers: None,
        }
    }
}

/// The resolved configuration of a benchmark run on a device of kind `device`.
pub fn bench_config(opts: &BenchOptions, device: BenchDevice) -> Result<ResolvedConfig> {
    if opts.steps == Some(0) {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    if let Some(peak) = opts.peak_tflops {
        if !(peak.is_finite() && peak > 0.0) {
            return Err(Error::Config(format!(
                "--peak-tflops must be a positive number, got {peak}"
            )));
        }
    }
    let preset = match opts.model {
        BenchModel::Demo => Preset::Demo,
        _ => Preset::Official,
    };
    let mut b = ConfigBuilder::new(preset)?;
    if let Some(size) = opts.model.size() {
        let vit = size.config(224, 14, 0);
        let ffn = match vit.ffn {
            Ffn::Mlp { .. } => "mlp",
            Ffn::SwiGlu { .. } => "swiglufused",
        };
        b.set_value("dinotrain.embed_dim", &vit.embed_dim.to_string())?
            .set_value("dinotrain.depth", &vit.depth.to_string())?
            .set_value("dinotrain.num_heads", &vit.num_heads.to_string())?
            .set_value("student.ffn_layer", ffn)?
            .set_value("student.patch_size", "14")?
            .set_value("crops.global_crops_size", "224")?
            .set_value("crops.local_crops_size", "98")?;
    }
    b.set_value("student.drop_path_rate", "0")?;
    let batch = opts
        .batch_size
        .unwrap_or_else(|| opts.model.default_batch(device));
    let steps = opts.steps.unwrap_or_else(|| device.default_steps())
        + opts.warmup.unwrap_or_else(|| device.default_warmup());
    let overrides = [
        ("train.batch_size_per_gpu", Some(batch)),
        ("crops.global_crops_size", opts.global_size),
        ("crops.local_crops_size", opts.local_size),
        ("crops.local_crops_number", opts.local_crops),
        // The schedules span the benchmark (their values do not change the work).
        ("dinotrain.steps", Some(steps)),
    ];
    for (key, value) in overrides {
        if let Some(v) = value {
            b.set_value(key, &v.to_string())?;
        }
    }
    b.set_value("dinotrain.method", &opts.method.to_string())?;
    b.set_value("train.seed", &opts.seed.to_string())?;
    for s in &opts.sets {
        b.set(s)?;
    }
    let (config, warnings) = b.build()?;
    ResolvedConfig::resolve(config, warnings)
}

/// Median, min and mean of the timed steps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepSeconds {
    pub median: f64,
    pub min: f64,
    pub mean: f64,
    pub all: Vec<f64>,
}

impl StepSeconds {
    /// Statistics of `times` (at least one).
    pub fn of(times: &[f64]) -> Result<Self> {
        if times.is_empty() {
            return Err(Error::Config("no timed step".into()));
        }
        let mut sorted = times.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            0.5 * (sorted[mid - 1] + sorted[mid])
        };
        Ok(StepSeconds {
            median,
            min: sorted[0],
            mean: times.iter().sum::<f64>() / times.len() as f64,
            all: times.to_vec(),
        })
    }
}

/// One finished step, for progress lines.
#[derive(Clone, Copy, Debug)]
pub struct StepTiming {
    /// 0-based over warm-up and timed steps.
    pub index: usize,
    pub total: usize,
    pub warmup: bool,
    pub seconds: f64,
    pub loss: f32,
}

/// The result of a benchmark run (also the JSON written by `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub schema: &'static str,
    pub device: String,
    pub device_kind: BenchDevice,
    pub model: String,
    pub method: Method,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub batch_size: usize,
    pub global_crops: usize,
    pub global_size: usize,
    pub local_crops: usize,
    pub local_size: usize,
    pub dino_prototypes: usize,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub step_seconds: StepSeconds,
    /// CPU time of the process per timed step (all threads; CPU runs only). On a shared
    /// machine it moves less with the load than the wall-clock time does.
    pub cpu_seconds: Option<StepSeconds>,
    pub images_per_s: f64,
    pub flops_per_image: f64,
    pub flops: StepFlops,
    pub achieved_tflops: f64,
    pub peak_tflops: f64,
    pub peak_source: String,
    /// Achieved / peak.
    pub utilisation: f64,
    pub peak_memory_bytes: Option<u64>,
    pub peak_memory_source: String,
    /// GEMMs of one timed step by library (CUDA runs; the same every step).
    pub gemms_per_step: Option<GemmStats>,
    /// Hand-written kernels launched per timed step (CUDA runs).
    pub kernel_launches_per_step: Option<f64>,
    /// Minor page faults of the process per timed step (Linux): near 0 when the steady-state
    /// step allocates nothing new.
    pub minor_faults_per_step: Option<f64>,
    pub loss_first: f32,
    pub loss_last: f32,
    pub config_warnings: Vec<String>,
    /// The loader on `--data`, timed after the steps.
    pub loader: Option<LoaderReport>,
    pub verdict: Option<Verdict>,
}

impl BenchReport {
    /// Writes the report as pretty JSON, atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("cannot serialise the bench report: {e}")))?;
        crate::io::write_atomic(path, format!("{text}\n").as_bytes())
    }
}

/// Runs the benchmark; `on_step` sees every step as it finishes.
pub fn run(opts: &BenchOptions, on_step: &mut dyn FnMut(&StepTiming)) -> Result<BenchReport> {
    let device = resolve_device(opts.device)?;
    let mut kind = BenchDevice::of(&device);
    let mut config = bench_config(opts, kind)?;
    let mut trainer = match Trainer::new_on(plan_from_config(&config)?, device) {
        Ok(t) => t,
        // `auto` found a GPU but this build cannot train on it: fall back like a missing GPU.
        Err(Error::Unsupported(why))
            if opts.device == Device::Auto && kind == BenchDevice::Cuda =>
        {
            log::info!("device auto: using the CPU ({why})");
            kind = BenchDevice::Cpu;
            config = bench_config(opts, kind)?;
            Trainer::new_on(plan_from_config(&config)?, ResolvedDevice::cpu())?
        }
        Err(e) => return Err(e),
    };
    let steps = opts.steps.unwrap_or_else(|| kind.default_steps());
    let warmup = opts.warmup.unwrap_or_else(|| kind.default_warmup());

    // Synthetic crops from a seeded normal (never zeros: a zero image makes every token equal
    // and can take cheaper paths); one batch serves every step.
    let mut rng = keyed(opts.seed, &[stream::TEST, 0xbe7c]);
    let global: Vec<f32> = (0..trainer.global_len())
        .map(|_| rng.sample(StandardNormal))
        .collect();
    let local: Vec<f32> = (0..trainer.local_len())
        .map(|_| rng.sample(StandardNormal))
        .collect();

    // On a shared CPU the practical GEMM peak moves with the load: measure it before and after
    // the steps and keep the better, so utilisation is not flattered by one slow measurement.
    let cpu_peak_before =
        (kind == BenchDevice::Cpu && opts.peak_tflops.is_none()).then(cpu_gemm_peak_gflops);

    let TimedSteps {
        timed,
        timed_cpu,
        losses,
        gemms_per_step,
        kernel_launches_per_step,
        minor_faults_per_step,
    } = time_steps(&mut trainer, (&global, &local), warmup, steps, on_step)?;
    let (peak_memory_bytes, peak_memory_source) = match kind {
        BenchDevice::Cpu => (
            peak_rss_bytes(),
            "VmHWM (process resident peak)".to_string(),
        ),
        BenchDevice::Cuda => (
            trainer.peak_device_memory(),
            "device memory in use, the trainer's peak (Trainer::peak_device_memory)".to_string(),
        ),
    };
    let device_description = match kind {
        BenchDevice::Cpu => cpu_description(),
        BenchDevice::Cuda => trainer.device_name(),
    };
    let (peak_tflops, peak_source) = match (opts.peak_tflops, kind) {
        (Some(p), _) => (p, "given with --peak-tflops".to_string()),
        (None, BenchDevice::Cuda) => cuda_peak(&device_description),
        (None, BenchDevice::Cpu) => {
            let gflops = cpu_gemm_peak_gflops().max(cpu_peak_before.unwrap_or(0.0));
            (
                gflops / 1e3,
                format!(
                    "CPU f32 GEMM measured in-process ({n}x{n}x{n} matmul, best of \
                     {CPU_PEAK_GEMM_REPS} before and {CPU_PEAK_GEMM_REPS} after the steps)",
                    n = CPU_PEAK_GEMM_SIZE
                ),
            )
        }
    };

    let plan = &trainer.plan;
    let flops = StepFlops::of(plan);
    let step_seconds = StepSeconds::of(&timed)?;
    // Only where every timed step was measured, and only on the CPU (a GPU step's host time
    // says little about the step).
    let cpu_seconds = match kind {
        BenchDevice::Cpu if timed_cpu.len() == timed.len() => Some(StepSeconds::of(&timed_cpu)?),
        _ => None,
    };
    let images_per_s = plan.batch_size as f64 / step_seconds.median;
    let achieved_tflops = flops.total() * images_per_s / 1e12;
    // After the steps, so that the two do not compete for the cores.
    let loader = match &opts.data {
        Some(dir) => Some(loader::time_loader(
            dir,
            &config,
            plan.batch_size,
            (2 * steps).max(10),
            2,
            opts.workers.unwrap_or(0),
        )?),
        None => None,
    };
    let verdict = loader
        .as_ref()
        .map(|l| Verdict::of(l.images_per_s, images_per_s));
    Ok(BenchReport {
        schema: "dinotrain-bench/1",
        device: device_description,
        device_kind: kind,
        model: opts.model.name().to_string(),
        method: plan.losses.method,
        embed_dim: plan.vit.embed_dim,
        depth: plan.vit.depth,
        num_heads: plan.vit.num_heads,
        patch_size: plan.vit.patch_size,
        batch_size: plan.batch_size,
        global_crops: 2,
        global_size: plan.global_crop_size,
        local_crops: plan.n_local_crops,
        local_size: plan.local_crop_size,
        dino_prototypes: plan.dino_head.n_prototypes,
        warmup_steps: warmup,
        timed_steps: steps,
        images_per_s,
        flops_per_image: flops.total(),
        flops,
        achieved_tflops,
        peak_tflops,
        peak_source,
        utilisation: achieved_tflops / peak_tflops,
        peak_memory_bytes,
        peak_memory_source,
        gemms_per_step,
        kernel_launches_per_step,
        minor_faults_per_step,
        // `total >= steps >= 1`, so there is a first and a last loss.
        loss_first: losses.first().copied().unwrap_or(f32::NAN),
        loss_last: losses.last().copied().unwrap_or(f32::NAN),
        config_warnings: config.warnings.iter().map(|w| w.to_string()).collect(),
        step_seconds,
        cpu_seconds,
        loader,
        verdict,
    })
}

/// What the timing loop measured.
struct TimedSteps {
    timed: Vec<f64>,
    timed_cpu: Vec<f64>,
    losses: Vec<f32>,
    gemms_per_step: Option<GemmStats>,
    kernel_launches_per_step: Option<f64>,
    minor_faults_per_step: Option<f64>,
}

/// `warmup` untimed then `steps` timed training steps on one synthetic batch.
fn time_steps(
    trainer: &mut Trainer,
    (global, local): (&[f32], &[f32]),
    warmup: usize,
    steps: usize,
    on_step: &mut dyn FnMut(&StepTiming),
) -> Result<TimedSteps> {
    let total = warmup + steps;
    let mut timed = Vec::with_capacity(steps);
    let mut timed_cpu = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(total);
    let (mut gemms_before_timing, mut launches_before_timing) = (None, None);
    let mut faults_before_timing = None;
    for index in 0..total {
        if index == warmup {
            gemms_before_timing = trainer.gemm_stats();
            launches_before_timing = trainer.kernel_launches();
            faults_before_timing = process_minor_faults();
        }
        let cpu_start = process_cpu_seconds();
        let start = Instant::now();
        // `train_step` returns host losses: on CUDA that copy waits for the step's queued
        // work, so the clock stops after the GPU is done.
        let record = trainer.train_step(global, local)?;
        let seconds = start.elapsed().as_secs_f64();
        let is_warmup = index < warmup;
        if !is_warmup {
            timed.push(seconds);
            if let (Some(a), Some(b)) = (cpu_start, process_cpu_seconds()) {
                timed_cpu.push(b - a);
            }
        }
        losses.push(record.losses.loss);
        on_step(&StepTiming {
            index,
            total,
            warmup: is_warmup,
            seconds,
            loss: record.losses.loss,
        });
    }

    let steps_u64 = steps.max(1) as u64;
    let gemms_per_step = match (trainer.gemm_stats(), gemms_before_timing) {
        (Some(now), Some(before)) => {
            let d = now.since(&before);
            Some(GemmStats {
                cublaslt: d.cublaslt / steps_u64,
                fused_epilogues: d.fused_epilogues / steps_u64,
                cublas: d.cublas / steps_u64,
                separate_epilogues: d.separate_epilogues / steps_u64,
                // Problems, not calls: refused once, whenever it happened.
                refused_problems: now.refused_problems,
            })
        }
        _ => None,
    };
    let kernel_launches_per_step = match (trainer.kernel_launches(), launches_before_timing) {
        (Some(now), Some(before)) => Some((now - before) as f64 / steps_u64 as f64),
        _ => None,
    };
    let minor_faults_per_step = match (process_minor_faults(), faults_before_timing) {
        (Some(now), Some(before)) => Some(now.saturating_sub(before) as f64 / steps_u64 as f64),
        _ => None,
    };
    Ok(TimedSteps {
        timed,
        timed_cpu,
        losses,
        gemms_per_step,
        kernel_launches_per_step,
        minor_faults_per_step,
    })
}

/// The peak of a CUDA device from its description.
fn cuda_peak(description: &str) -> (f64, String) {
    let known = description.contains("H100") || description.contains("H200");
    let source = if known {
        "H100/H200 dense bf16 (989 TFLOP/s)"
    } else {
        "assumed H100/H200 dense bf16 (989 TFLOP/s); give this card's with --peak-tflops"
    };
    (H100_BF16_PEAK_TFLOPS, source.to_string())
}

/// The practical f32 GEMM peak of this machine (GFLOP/s): the best of a few large square
/// products through [`matmul`], after one untimed run.
pub fn cpu_gemm_peak_gflops() -> f64 {
    let n = CPU_PEAK_GEMM_SIZE;
    let a = crate::rng::uniform_vec(1, n * n, 1.0);
    let b = crate::rng::uniform_vec(2, n * n, 1.0);
    let mut c = vec![0f32; n * n];
    let mut best = f64::INFINITY;
    for rep in 0..=CPU_PEAK_GEMM_REPS {
        let start = Instant::now();
        matmul(&mut c, &a, &b, Gemm::nn(n, n, n));
        let seconds = start.elapsed().as_secs_f64();
        if rep > 0 {
            best = best.min(seconds);
        }
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// The process's resident-set peak (`VmHWM` of `/proc/self/status`), where Linux provides it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// User + system CPU time of this process, all threads (`/proc/self/stat` fields 14 and 15),
/// where Linux provides it.
pub fn process_cpu_seconds() -> Option<f64> {
    parse_proc_stat_cpu(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// The kernel reports these times in USER_HZ ticks, which is 100 on every Linux architecture
/// the project builds for (the /proc ABI fixes it, whatever the kernel's internal HZ).
const USER_HZ: f64 = 100.0;

/// Minor page faults of the process so far (`/proc/self/stat` field 10): the steady-state
/// count per step says whether the step still allocates (fresh pages fault on first touch).
pub fn process_minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    proc_stat_field(&stat, 10)?.parse().ok()
}

fn parse_proc_stat_cpu(stat: &str) -> Option<f64> {
    let utime: u64 = proc_stat_field(stat, 14)?.parse().ok()?;
    let stime: u64 = proc_stat_field(stat, 15)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Field `n` (1-based, as `man proc` numbers them, n >= 3) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may hold spaces: count from after it.
fn proc_stat_field(stat: &str, n: usize) -> Option<&str> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(n - 3)
}

/// `cpu (model name, N threads)`.
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        });
    let threads = rayon::current_num_threads();
    match model {
        Some(m) => format!("cpu ({m}, {threads} threads)"),
        None => format!("cpu ({threads} threads)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::trainer::TrainPlan;

    /// The CPU plan of a benchmark model at `batch` (also for the FLOP-count tests).
    pub(super) fn plan(model: BenchModel, batch: usize) -> TrainPlan {
        let opts = BenchOptions {
            model,
            batch_size: Some(batch),
            ..BenchOptions::default()
        };
        plan_from_config(&bench_config(&opts, BenchDevice::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn presets_and_overrides_reach_the_plan() {
        let demo = plan(BenchModel::Demo, 64);
        assert_eq!(
            (demo.vit.embed_dim, demo.vit.depth, demo.vit.patch_size),
            (192, 6, 4)
        );
        assert_eq!((demo.global_crop_size, demo.local_crop_size), (32, 16));
        assert_eq!(demo.dino_head.n_prototypes, 4096);
        let opts = BenchOptions {
            model: BenchModel::Micro,
            batch_size: Some(3),
            global_size: Some(56),
            local_size: Some(28),
            local_crops: Some(2),
            method: Method::Ibot,
            sets: vec!["dino.head_n_prototypes=128".into()],
            ..BenchOptions::default()
        };
        let p = plan_from_config(&bench_config(&opts, BenchDevice::Cpu).unwrap()).unwrap();
        assert_eq!((p.vit.embed_dim, p.vit.depth, p.vit.num_heads), (32, 2, 2));
        assert_eq!(
            (p.batch_size, p.global_crop_size, p.local_crop_size),
            (3, 56, 28)
        );
        assert_eq!(p.n_local_crops, 2);
        assert_eq!(p.losses.method, Method::Ibot);
        assert_eq!(p.dino_head.n_prototypes, 128);
        assert_eq!(p.drop_path_rate, 0.0);
        let vits = plan(BenchModel::Vits14, 8);
        assert_eq!((vits.vit.embed_dim, vits.vit.patch_size), (384, 14));
        assert_eq!((vits.global_crop_size, vits.local_crop_size), (224, 98));
        assert_eq!(vits.dino_head.n_prototypes, 65536);
    }

    #[test]
    fn bad_options_are_config_errors() {
        for (opts, needle) in [
            (
                BenchOptions {
                    steps: Some(0),
                    ..BenchOptions::default()
                },
                "--steps",
            ),
            (
                BenchOptions {
                    peak_tflops: Some(-1.0),
                    ..BenchOptions::default()
                },
                "--peak-tflops",
            ),
            (
                BenchOptions {
                    local_size: Some(100),
                    ..BenchOptions::default()
                },
                "multiple of the patch size",
            ),
            (
                BenchOptions {
                    batch_size: Some(0),
                    ..BenchOptions::default()
                },
                "batch_size_per_gpu",
            ),
            (
                BenchOptions {
                    sets: vec!["optim.base_lrr=1".into()],
                    ..BenchOptions::default()
                },
                "optim.base_lr",
            ),
        ] {
            let err = bench_config(&opts, BenchDevice::Cpu).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        let err = "vitz14".parse::<BenchModel>().unwrap_err().to_string();
        assert!(err.contains("vits14"), "{err}");
    }

    #[test]
    fn step_statistics_and_vm_hwm() {
        let s = StepSeconds::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.mean), (2.5, 1.0, 4.0));
        assert_eq!(StepSeconds::of(&[2.0, 1.0, 7.0]).unwrap().median, 2.0);
        assert!(StepSeconds::of(&[]).is_err());
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 10 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB\n"), None);
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        let stat = "4242 (a name) with) R 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0";
        assert_eq!(parse_proc_stat_cpu(stat), Some(2.81));
        assert_eq!(parse_proc_stat_cpu("4242 (x) R 1 2"), None);
        assert!(process_cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
