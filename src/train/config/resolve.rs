//! Stage two: a validated [`ResolvedConfig`] with every derived value the loop needs (scaled
//! learning rate, iteration counts, schedule parameters, the architecture, the starting point).

use super::{Arch, ConfigWarning, FfnLayer, Method, ScalingRule, StepsSchedule, TrainConfig};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::pretrained::WeightsSource;
use crate::nn::{Ffn, VitConfig};
use crate::optim::{CosineScheduler, Schedules};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The backbone to build (student and teacher share it; the teacher has no drop path).
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    /// The model itself; its construction size (`img_size`, which sizes the position
    /// embedding) is the global crop size, or 518 for a released backbone.
    pub vit: VitConfig,
    /// The student's drop-path rate, the same in every block (`drop_path_uniform`).
    pub drop_path_rate: f64,
}

/// Where the backbone's weights come from; heads always start fresh (official behaviour).
#[derive(Clone, Debug, PartialEq)]
pub enum StartingPoint {
    /// The official initialisation, drawn from the run seed.
    Random,
    Weights(WeightsSource),
}

/// The validated plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedConfig {
    /// The configuration as given, with `optim.lr` set by the scaling rule.
    pub config: TrainConfig,
    pub warnings: Vec<ConfigWarning>,
    pub method: Method,
    pub device: Device,
    /// Processes taking part (dinotrain runs one).
    pub world_size: usize,
    /// Images per optimizer step: `batch_size_per_gpu · world_size · dinotrain.accumulate`.
    pub total_batch: usize,
    /// The peak learning rate after the scaling rule.
    pub lr: f64,
    /// Iterations of the run.
    pub total_iters: u64,
    /// Iterations per "epoch" as the schedules see it (OFFICIAL_EPOCH_LENGTH, or steps / epochs
    /// when `--steps` stretches the schedules).
    pub epoch_length: f64,
    pub schedules: Schedules,
    pub arch: Architecture,
    pub start: StartingPoint,
    pub checkpoint_every: u64,
    pub output_dir: PathBuf,
}

/// Keys that may change between a run and its resume without changing what is computed.
const RESUME_VOLATILE: &[&str] = &[
    "MODEL.",
    "compute_precision.",
    "evaluation.",
    "train.output_dir",
    "train.num_workers",
    "train.saveckp_freq",
    "train.cache_dataset",
    "dinotrain.device",
    "dinotrain.workers",
    "dinotrain.log_every",
    "dinotrain.plot_every",
    "dinotrain.checkpoint_every",
    "dinotrain.keep_checkpoints",
    "dinotrain.stop_after",
    "dinotrain.knn_",
];

impl ResolvedConfig {
    /// Validates `config` and derives the plan.
    pub fn resolve(mut config: TrainConfig, mut warnings: Vec<ConfigWarning>) -> Result<Self> {
        validate(&config)?;
        let device: Device = config.dinotrain.device.parse()?;
        let world_size = 1;
        let total_batch =
            config.train.batch_size_per_gpu * world_size * config.dinotrain.accumulate;
        let lr = match config.optim.scaling_rule {
            ScalingRule::SqrtWrt1024 => config.optim.base_lr * (total_batch as f64 / 1024.0).sqrt(),
        };
        // A given lr is overwritten, as officially; a config.yaml written by dinotrain holds
        // the scaled value already, which is not worth a warning.
        let given = config.optim.lr;
        if given != 0.0 && (given - lr).abs() > 1e-9 * lr.abs() {
            warnings.push(ConfigWarning::IgnoredKey {
                key: "optim.lr".into(),
                why:
                    "it is derived from optim.base_lr by the scaling rule, as in the official code",
            });
        }
        config.optim.lr = lr;

        let o = &config.optim;
        let official_total = (o.epochs * config.train.official_epoch_length as f64).round() as u64;
        let (total_iters, epoch_length) =
            match (config.dinotrain.steps, config.dinotrain.steps_schedule) {
                (None, _) => (official_total, config.train.official_epoch_length as f64),
                (Some(steps), StepsSchedule::Stretch) => (steps, steps as f64 / o.epochs),
                (Some(steps), StepsSchedule::Truncate) => {
                    (steps, config.train.official_epoch_length as f64)
                }
            };
        let iters = |epochs: f64| (epochs * epoch_length).round() as u64;
        let schedule_total = iters(o.epochs);
        let lr_warmup = iters(o.warmup_epochs).min(schedule_total);
        let t = &config.teacher;
        let temp_iters = iters(t.warmup_teacher_temp_epochs);
        let schedules = Schedules {
            lr: CosineScheduler::new(lr, o.min_lr, schedule_total, lr_warmup, 0.0, 0)?,
            wd: CosineScheduler::new(
                o.weight_decay,
                o.weight_decay_end,
                schedule_total,
                0,
                0.0,
                0,
            )?,
            momentum: CosineScheduler::new(
                t.momentum_teacher,
                t.final_momentum_teacher,
                schedule_total,
                0,
                0.0,
                0,
            )?,
            teacher_temp: CosineScheduler::new(
                t.teacher_temp,
                t.teacher_temp,
                temp_iters,
                temp_iters,
                t.warmup_teacher_temp,
                0,
            )?,
            freeze_last_layer_iters: iters(o.freeze_last_layer_epochs),
            lr_peak: lr,
        };

        fit_crops_to_released_patch(&mut config, &mut warnings)?;
        let (arch, start) = architecture(&config)?;
        let checkpoint_every = config
            .dinotrain
            .checkpoint_every
            .unwrap_or(epoch_length.round().max(1.0) as u64)
            .max(1);
        Ok(ResolvedConfig {
            method: config.dinotrain.method,
            output_dir: config.train.output_dir.clone(),
            config,
            warnings,
            device,
            world_size,
            total_batch,
            lr,
            total_iters,
            epoch_length,
            schedules,
            arch,
            start,
            checkpoint_every,
        })
    }

    /// The configuration as it trains: the given one with the architecture made explicit,
    /// `student.arch` naming the factory whose (embed dim, depth, heads) the model has (left as
    /// given when none has them) and `dinotrain.embed_dim` / `depth` / `num_heads` holding the
    /// model's. Resolving it again gives the same plan.
    pub fn recorded_config(&self) -> TrainConfig {
        let mut c = self.config.clone();
        let v = &self.arch.vit;
        if let Some(arch) = Arch::matching(v.embed_dim, v.depth, v.num_heads) {
            c.student.arch = arch;
        }
        c.dinotrain.embed_dim = Some(v.embed_dim);
        c.dinotrain.depth = Some(v.depth);
        c.dinotrain.num_heads = Some(v.num_heads);
        c
    }

    /// One line naming the architecture that trains, every dimension included.
    pub fn architecture_summary(&self) -> String {
        let v = &self.arch.vit;
        let name =
            Arch::matching(v.embed_dim, v.depth, v.num_heads).map_or("no factory size", Arch::name);
        let ffn = match v.ffn {
            Ffn::Mlp { hidden } => format!("MLP hidden {hidden}"),
            Ffn::SwiGlu { .. } => format!("SwiGLU hidden {}", v.ffn.width()),
        };
        let layerscale = v
            .layerscale
            .map_or("no LayerScale".to_string(), |l| format!("LayerScale {l:e}"));
        format!(
            "{name}: embed dim {}, depth {}, {} heads, patch {}, {} register tokens, {ffn}, \
             {layerscale}, drop path {}, position embedding for {} px",
            v.embed_dim,
            v.depth,
            v.num_heads,
            v.patch_size,
            v.num_register_tokens,
            self.arch.drop_path_rate,
            v.img_size
        )
    }

    /// The configuration as YAML ([`Self::recorded_config`]): readable back with `--config`.
    pub fn to_yaml(&self) -> Result<String> {
        self.recorded_config().to_yaml()
    }

    /// Writes `config.yaml` into `dir` atomically and returns its path.
    pub fn write_yaml(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("config.yaml");
        let text = format!(
            "# dinotrain resolved configuration (optim.lr = base_lr * sqrt({} / 1024) = {:.6e}; \
             {} iterations).\n# Architecture: {}.\n# Pass it back with --config to repeat the run.\n{}",
            self.total_batch,
            self.lr,
            self.total_iters,
            self.architecture_summary(),
            self.to_yaml()?
        );
        crate::io::write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// The keys that decide what a run computes (`key → value`): a resumed run must match them.
    pub fn resume_identity(&self) -> Result<BTreeMap<String, String>> {
        let mut flat = self.config.flatten()?;
        flat.retain(|key, _| {
            !RESUME_VOLATILE.iter().any(|pattern| {
                key == pattern
                    || (pattern.ends_with('.') || pattern.ends_with('_'))
                        && key.starts_with(pattern)
            })
        });
        Ok(flat)
    }
}

/// A released backbone (`--model dinov2/vits14`, patch 14) with crop sizes made for patch 16
/// (the defaults 224 / 96): a size that is not a multiple of 14 becomes the nearest one that is
/// (96 -> 98, the official ViT-*/14 configs' local size), with a warning. A patch size the user
/// chose keeps the error of [`architecture`].
fn fit_crops_to_released_patch(
    config: &mut TrainConfig,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<()> {
    let Some(name) = config.dinotrain.model.as_deref() else {
        return Ok(());
    };
    let Some(WeightsSource::Pretrained(m)) = WeightsSource::parse(name).ok() else {
        return Ok(());
    };
    let patch = m.architecture().patch_size;
    for (key, size) in [
        (
            "crops.global_crops_size",
            &mut config.crops.global_crops_size,
        ),
        ("crops.local_crops_size", &mut config.crops.local_crops_size),
    ] {
        if *size % patch != 0 {
            let fitted = ((*size as f64 / patch as f64).round() as usize).max(1) * patch;
            warnings.push(ConfigWarning::Adjusted {
                key: key.into(),
                from: size.to_string(),
                to: fitted.to_string(),
                why: format!("{} has patch size {patch}", m.name()),
            });
            *size = fitted;
        }
    }
    Ok(())
}

fn architecture(config: &TrainConfig) -> Result<(Architecture, StartingPoint)> {
    let s = &config.student;
    let d = &config.dinotrain;
    let weights = match (&d.model, s.pretrained_weights.as_str()) {
        (Some(m), _) => Some(WeightsSource::parse(m)?),
        (None, "") => None,
        (None, path) => Some(WeightsSource::parse(path)?),
    };
    let (embed_dim, depth, num_heads) = s.arch.dims();
    let embed_dim = d.embed_dim.unwrap_or(embed_dim);
    let ffn = match s.ffn_layer {
        FfnLayer::Mlp => Ffn::Mlp {
            hidden: 4 * embed_dim,
        },
        // The SwiGLU layer derives its width from 4·D exactly as `SwiGLUFFNFused` does.
        FfnLayer::Swiglu | FfnLayer::SwigluFused => Ffn::SwiGlu {
            hidden: 4 * embed_dim,
        },
        FfnLayer::Identity => {
            return Err(Error::Unsupported(
                "student.ffn_layer = identity (no FFN) is not implemented".into(),
            ))
        }
    };
    if !s.drop_path_uniform && s.drop_path_rate > 0.0 {
        return Err(Error::Unsupported(
            "student.drop_path_uniform = false (linearly increasing rates) is not implemented; \
             every official config uses uniform rates"
                .into(),
        ));
    }
    let configured = VitConfig {
        img_size: config.crops.global_crops_size,
        patch_size: s.patch_size,
        in_chans: 3,
        embed_dim,
        depth: d.depth.unwrap_or(depth),
        num_heads: d.num_heads.unwrap_or(num_heads),
        ffn,
        num_register_tokens: s.num_register_tokens,
        layerscale: (s.layerscale > 0.0).then_some(s.layerscale as f32),
        interpolate_offset: s.interpolate_offset as f32,
        interpolate_antialias: s.interpolate_antialias,
        qkv_bias: s.qkv_bias,
        proj_bias: s.proj_bias,
        ffn_bias: s.ffn_bias,
    };
    // A released backbone fixes its shapes and interpolation; LayerScale's init and the
    // biases stay as configured (the loaded weights hold the trained values).
    let vit = match &weights {
        Some(WeightsSource::Pretrained(m)) => VitConfig {
            layerscale: configured.layerscale,
            qkv_bias: configured.qkv_bias,
            proj_bias: configured.proj_bias,
            ffn_bias: configured.ffn_bias,
            ..m.architecture()
        },
        _ => configured,
    };
    let (embed_dim, depth, num_heads) = (vit.embed_dim, vit.depth, vit.num_heads);
    if embed_dim == 0 || depth == 0 || num_heads == 0 || embed_dim % num_heads != 0 {
        return Err(Error::Config(format!(
            "embed dim {embed_dim} must be a positive multiple of the head count {num_heads}, \
             with depth {depth} > 0"
        )));
    }
    for (what, size) in [
        ("crops.global_crops_size", config.crops.global_crops_size),
        ("crops.local_crops_size", config.crops.local_crops_size),
    ] {
        if size == 0 || size % vit.patch_size != 0 {
            return Err(Error::Config(format!(
                "{what} = {size} must be a positive multiple of the patch size {}",
                vit.patch_size
            )));
        }
    }
    let start = weights.map_or(StartingPoint::Random, StartingPoint::Weights);
    let arch = Architecture {
        vit,
        drop_path_rate: s.drop_path_rate,
    };
    Ok((arch, start))
}

fn validate(c: &TrainConfig) -> Result<()> {
    let mut problems = Vec::new();
    let mut need = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    need(
        c.train.batch_size_per_gpu > 0,
        "train.batch_size_per_gpu must be > 0".into(),
    );
    need(
        c.dinotrain.accumulate > 0,
        "dinotrain.accumulate must be > 0 (1 = no gradient accumulation)".into(),
    );
    need(
        c.train.official_epoch_length > 0,
        "train.OFFICIAL_EPOCH_LENGTH must be > 0".into(),
    );
    need(c.optim.epochs > 0.0, "optim.epochs must be > 0".into());
    need(
        c.dinotrain.steps != Some(0),
        "dinotrain.steps must be > 0".into(),
    );
    for (key, v) in [
        ("optim.warmup_epochs", c.optim.warmup_epochs),
        (
            "optim.freeze_last_layer_epochs",
            c.optim.freeze_last_layer_epochs,
        ),
        (
            "teacher.warmup_teacher_temp_epochs",
            c.teacher.warmup_teacher_temp_epochs,
        ),
        ("optim.base_lr", c.optim.base_lr),
        ("optim.min_lr", c.optim.min_lr),
        ("optim.clip_grad", c.optim.clip_grad),
        ("optim.weight_decay", c.optim.weight_decay),
        ("optim.weight_decay_end", c.optim.weight_decay_end),
    ] {
        need(
            v >= 0.0 && v.is_finite(),
            format!("{key} = {v} must be >= 0"),
        );
    }
    need(
        c.optim.warmup_epochs <= c.optim.epochs,
        format!(
            "optim.warmup_epochs = {} exceeds optim.epochs = {}",
            c.optim.warmup_epochs, c.optim.epochs
        ),
    );
    for (key, v) in [
        ("teacher.momentum_teacher", c.teacher.momentum_teacher),
        (
            "teacher.final_momentum_teacher",
            c.teacher.final_momentum_teacher,
        ),
        ("optim.adamw_beta1", c.optim.adamw_beta1),
        ("optim.adamw_beta2", c.optim.adamw_beta2),
        (
            "ibot.mask_sample_probability",
            c.ibot.mask_sample_probability,
        ),
        ("optim.layerwise_decay", c.optim.layerwise_decay),
    ] {
        need(
            (0.0..=1.0).contains(&v),
            format!("{key} = {v} must be in [0, 1]"),
        );
    }
    need(
        (0.0..1.0).contains(&c.student.drop_path_rate),
        format!(
            "student.drop_path_rate = {} must be in [0, 1)",
            c.student.drop_path_rate
        ),
    );
    for (key, t) in [
        ("teacher.teacher_temp", c.teacher.teacher_temp),
        ("teacher.warmup_teacher_temp", c.teacher.warmup_teacher_temp),
    ] {
        need(t > 0.0, format!("{key} = {t} must be > 0"));
    }
    for (key, [lo, hi]) in [
        ("ibot.mask_ratio_min_max", c.ibot.mask_ratio_min_max),
        ("crops.global_crops_scale", c.crops.global_crops_scale),
        ("crops.local_crops_scale", c.crops.local_crops_scale),
    ] {
        need(
            0.0 <= lo && lo <= hi && hi <= 1.0,
            format!("{key} = [{lo}, {hi}] must satisfy 0 <= min <= max <= 1"),
        );
    }
    for (key, n) in [
        ("dino.head_n_prototypes", c.dino.head_n_prototypes),
        ("dino.head_bottleneck_dim", c.dino.head_bottleneck_dim),
        ("dino.head_hidden_dim", c.dino.head_hidden_dim),
        ("dino.head_nlayers", c.dino.head_nlayers),
        ("ibot.head_n_prototypes", c.ibot.head_n_prototypes),
        ("ibot.head_bottleneck_dim", c.ibot.head_bottleneck_dim),
        ("ibot.head_hidden_dim", c.ibot.head_hidden_dim),
        ("ibot.head_nlayers", c.ibot.head_nlayers),
        ("student.patch_size", c.student.patch_size),
        ("dinotrain.keep_checkpoints", c.dinotrain.keep_checkpoints),
        ("dinotrain.log_every", c.dinotrain.log_every as usize),
        ("dinotrain.plot_every", c.dinotrain.plot_every as usize),
        ("dinotrain.knn_k", c.dinotrain.knn_k),
    ] {
        need(n > 0, format!("{key} must be > 0"));
    }
    need(
        c.dinotrain.knn_temperature > 0.0,
        "dinotrain.knn_temperature must be > 0".into(),
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(problems.join("; ")))
    }
}
