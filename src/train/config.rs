//! The configuration tree: every key of the official `ssl_default_config.yaml` with its official
//! default, plus dinotrain's own `dinotrain:` section.
//!
//! Two stages (ripgrep's pattern): [`TrainConfig`] is the raw user input, and
//! [`ResolvedConfig`] is the validated plan with derived values (the scaled learning rate,
//! iteration counts, the architecture).
//!
//! Library code builds a [`TrainConfig`] directly: a [`Preset`], typed setters for the common
//! settings, and any other key as a field (`config.optim.base_lr = 0.002`):
//!
//! ```
//! use dinotrain::train::{Preset, TrainConfig};
//!
//! let mut config = TrainConfig::preset(Preset::Demo).steps(50);
//! config.optim.base_lr = 0.002;
//! let plan = config.resolve()?;
//! assert_eq!(plan.total_iters, 50);
//! // lr = base_lr * sqrt(batch / 1024), batch 64 in the demo preset.
//! assert!((plan.lr - 0.002 * 0.25).abs() < 1e-12);
//! # Ok::<(), dinotrain::Error>(())
//! ```
//!
//! The command line layers text instead, through [`ConfigBuilder`]: the preset, then a YAML
//! file merged over it like OmegaConf, then `--set key=value` overrides, each value checked
//! against its key's type, unknown keys reported with the closest known ones:
//!
//! ```
//! use dinotrain::train::config::{ConfigBuilder, Preset, ResolvedConfig};
//!
//! let mut builder = ConfigBuilder::new(Preset::Demo)?;
//! builder.set("optim.base_lr=0.002")?.flag("steps", "50")?;
//! // builder.file(Path::new("vitl16_short.yaml"))? merges an official train config.
//! let (config, warnings) = builder.build()?;
//! let plan = ResolvedConfig::resolve(config, warnings)?;
//! assert_eq!(plan.total_iters, 50);
//! # Ok::<(), dinotrain::Error>(())
//! ```
//!
//! Key names are the official ones (`optim.base_lr`, `crops.local_crops_number`,
//! `train.OFFICIAL_EPOCH_LENGTH`, `MODEL.WEIGHTS`), so an official train config loads unchanged.

mod overrides;
mod recipe;
mod resolve;

pub use overrides::{ConfigBuilder, ConfigWarning, FLAG_KEYS};
pub use recipe::{Recipe, RecipeSetting};
pub use resolve::{Architecture, ResolvedConfig, StartingPoint};

use crate::backend::Device;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The name this type had before it became the library's configuration type.
pub type Config = TrainConfig;

/// The whole configuration, official groups first, then `dinotrain`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(rename = "MODEL")]
    pub model: ModelSection,
    pub compute_precision: ComputePrecision,
    pub dino: DinoSection,
    pub ibot: IbotSection,
    pub train: TrainSection,
    pub student: StudentSection,
    pub teacher: TeacherSection,
    pub optim: OptimSection,
    pub crops: CropsSection,
    pub evaluation: EvaluationSection,
    pub dinotrain: DinotrainSection,
}

/// `MODEL:` (used by the official evaluation scripts to name weights; ignored here).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    #[serde(rename = "WEIGHTS")]
    pub weights: String,
}

/// `compute_precision:` FSDP sharding and mixed-precision settings. dinotrain chooses precision
/// per device (f32 on CPU, bf16 with f32 master weights on CUDA), so these are kept only so
/// that official files load; changing them draws a warning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputePrecision {
    pub grad_scaler: bool,
    pub teacher: ModulePrecisions,
    pub student: ModulePrecisions,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModulePrecisions {
    pub backbone: FsdpModule,
    pub dino_head: FsdpModule,
    pub ibot_head: FsdpModule,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsdpModule {
    pub sharding_strategy: String,
    pub mixed_precision: MixedPrecision,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixedPrecision {
    pub param_dtype: String,
    pub reduce_dtype: String,
    pub buffer_dtype: String,
}

impl FsdpModule {
    fn official(reduce_dtype: &str) -> Self {
        FsdpModule {
            sharding_strategy: "SHARD_GRAD_OP".into(),
            mixed_precision: MixedPrecision {
                param_dtype: "fp16".into(),
                reduce_dtype: reduce_dtype.into(),
                buffer_dtype: "fp32".into(),
            },
        }
    }
}

/// `dino:` the DINO (CLS token) loss and head, and KoLeo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DinoSection {
    pub loss_weight: f64,
    pub head_n_prototypes: usize,
    pub head_bottleneck_dim: usize,
    pub head_nlayers: usize,
    pub head_hidden_dim: usize,
    pub koleo_loss_weight: f64,
}

/// `ibot:` the masked patch loss, its masking and (optionally separate) head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IbotSection {
    pub loss_weight: f64,
    pub mask_sample_probability: f64,
    pub mask_ratio_min_max: [f64; 2],
    pub separate_head: bool,
    pub head_n_prototypes: usize,
    pub head_bottleneck_dim: usize,
    pub head_nlayers: usize,
    pub head_hidden_dim: usize,
}

/// How teacher outputs become targets (spec section 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Centering {
    /// Softmax of (teacher − lagged EMA center) / temperature.
    #[serde(rename = "centering")]
    Softmax,
    /// Sinkhorn-Knopp normalisation (3 iterations).
    #[serde(rename = "sinkhorn_knopp")]
    SinkhornKnopp,
}

/// `train:` batch, data and loop settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub batch_size_per_gpu: usize,
    /// Official dataset string (`ImageNet:split=TRAIN`); dinotrain reads `dinotrain.data`.
    pub dataset_path: String,
    pub output_dir: PathBuf,
    /// Official: checkpoint period in epochs; dinotrain uses `dinotrain.checkpoint_every`.
    pub saveckp_freq: u64,
    pub seed: u64,
    pub num_workers: usize,
    /// Iterations per "epoch", independent of the dataset size.
    #[serde(rename = "OFFICIAL_EPOCH_LENGTH")]
    pub official_epoch_length: u64,
    pub cache_dataset: bool,
    pub centering: Centering,
}

/// Official architecture factories (`vision_transformer.py`), plus DINOv1's `vit_tiny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// D 192, depth 12, 3 heads (DINOv1's size; not an official DINOv2 factory).
    #[serde(rename = "vit_tiny")]
    VitTiny,
    #[serde(rename = "vit_small")]
    VitSmall,
    #[serde(rename = "vit_base")]
    VitBase,
    #[serde(rename = "vit_large")]
    VitLarge,
    #[serde(rename = "vit_giant2")]
    VitGiant2,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::VitTiny,
        Arch::VitSmall,
        Arch::VitBase,
        Arch::VitLarge,
        Arch::VitGiant2,
    ];

    /// The factory's name (`vit_small`, ...), as `student.arch` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::VitTiny => "vit_tiny",
            Arch::VitSmall => "vit_small",
            Arch::VitBase => "vit_base",
            Arch::VitLarge => "vit_large",
            Arch::VitGiant2 => "vit_giant2",
        }
    }

    /// The factory with these (embed dim, depth, heads), if one has them.
    pub fn matching(embed_dim: usize, depth: usize, num_heads: usize) -> Option<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.dims() == (embed_dim, depth, num_heads))
    }

    /// (embed dim, depth, heads) of the factory.
    pub fn dims(self) -> (usize, usize, usize) {
        match self {
            Arch::VitTiny => (192, 12, 3),
            Arch::VitSmall => (384, 12, 6),
            Arch::VitBase => (768, 12, 12),
            Arch::VitLarge => (1024, 24, 16),
            Arch::VitGiant2 => (1536, 40, 24),
        }
    }
}

/// The block's feed-forward layer (`student.ffn_layer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnLayer {
    /// fc1 → GELU → fc2, hidden = 4·D.
    #[serde(rename = "mlp")]
    Mlp,
    /// SwiGLU, hidden = (int(4·D·2/3) + 7) / 8 · 8.
    #[serde(rename = "swiglu")]
    Swiglu,
    /// The official fused SwiGLU (same maths as `swiglu`).
    #[serde(rename = "swiglufused")]
    SwigluFused,
    #[serde(rename = "identity")]
    Identity,
}

/// `student:` the backbone (the teacher is built from the same keys, without drop path).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    pub arch: Arch,
    pub patch_size: usize,
    pub drop_path_rate: f64,
    pub layerscale: f64,
    pub drop_path_uniform: bool,
    /// A weights file to start from (official key); `dinotrain.model` also accepts names.
    pub pretrained_weights: String,
    pub ffn_layer: FfnLayer,
    /// FSDP wrapping layout only; parameters are the same, so dinotrain ignores it.
    pub block_chunks: usize,
    pub qkv_bias: bool,
    pub proj_bias: bool,
    pub ffn_bias: bool,
    pub num_register_tokens: usize,
    pub interpolate_antialias: bool,
    pub interpolate_offset: f64,
}

/// `teacher:` EMA momentum and temperatures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    pub momentum_teacher: f64,
    pub final_momentum_teacher: f64,
    pub warmup_teacher_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp_epochs: f64,
}

/// The only scaling rule the official code implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScalingRule {
    /// lr = base_lr · sqrt(total batch / 1024).
    #[serde(rename = "sqrt_wrt_1024")]
    SqrtWrt1024,
}

/// `optim:` AdamW, schedules, clipping, layer-wise decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub epochs: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    /// Learning rate for a total batch of 1024.
    pub base_lr: f64,
    /// Set by the scaling rule at resolution; a user value is overwritten (as officially).
    pub lr: f64,
    pub warmup_epochs: f64,
    pub min_lr: f64,
    pub clip_grad: f64,
    pub freeze_last_layer_epochs: f64,
    pub scaling_rule: ScalingRule,
    pub patch_embed_lr_mult: f64,
    pub layerwise_decay: f64,
    pub adamw_beta1: f64,
    pub adamw_beta2: f64,
}

/// `crops:` multi-crop augmentation sizes and scales.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropsSection {
    pub global_crops_scale: [f64; 2],
    pub local_crops_number: usize,
    pub local_crops_scale: [f64; 2],
    pub global_crops_size: usize,
    pub local_crops_size: usize,
}

/// `evaluation:` official periodic teacher export; dinotrain uses `dinotrain.knn_every`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSection {
    pub eval_period_iterations: u64,
}

/// Which stage of the method trains (`dinotrain.method`, `--method`).
pub use crate::ssl::Method;

/// What `dinotrain.steps` does to the epoch-denominated schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepsSchedule {
    /// Every schedule keeps its shape and is stretched or squeezed to the run's length (the
    /// epoch length becomes steps / epochs), so a short run still warms up and decays.
    #[serde(rename = "stretch")]
    Stretch,
    /// The official schedules are kept as they are and the run stops early.
    #[serde(rename = "truncate")]
    Truncate,
}

/// `dinotrain:` settings the official code does not have.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DinotrainSection {
    pub method: Method,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Run length in iterations; null = `optim.epochs · train.OFFICIAL_EPOCH_LENGTH`.
    pub steps: Option<u64>,
    pub steps_schedule: StepsSchedule,
    /// Image folder to train on; null = the embedded demo data.
    pub data: Option<PathBuf>,
    /// Stop this invocation after this many iterations without a final checkpoint, export or
    /// k-NN, exactly as if the process were killed (time-limited jobs; resume tests).
    pub stop_after: Option<u64>,
    /// Evaluate k-NN at all (at initialisation, every `knn_every` steps, and at the end) when
    /// labelled data is available (the demo split, or `knn_train` + `knn_val`).
    pub knn: bool,
    /// Labelled folders (one subfolder per class) for k-NN during and after training.
    pub knn_train: Option<PathBuf>,
    pub knn_val: Option<PathBuf>,
    /// k-NN every this many steps (0 = only at the end).
    pub knn_every: u64,
    /// Neighbour count for the printed k-NN top-1.
    pub knn_k: usize,
    pub knn_temperature: f64,
    /// A pretrained name (`dinov2/vits14`, ...) or a `.pth`/`.safetensors` path; null = random
    /// init (official init). Sets the architecture for named models.
    pub model: Option<String>,
    /// Overrides of the architecture's size (for small models that no factory names).
    pub embed_dim: Option<usize>,
    pub depth: Option<usize>,
    pub num_heads: Option<usize>,
    /// Checkpoint every this many steps; null = once per epoch (OFFICIAL_EPOCH_LENGTH).
    pub checkpoint_every: Option<u64>,
    /// How many checkpoints to keep (oldest removed first).
    pub keep_checkpoints: usize,
    /// Log line and `metrics.jsonl` record every this many steps.
    pub log_every: u64,
    /// Redraw the loss curves every this many steps.
    pub plot_every: u64,
    /// Data-loading threads; 0 = one per core.
    pub workers: usize,
    /// Micro-batches of `train.batch_size_per_gpu` images per step: their gradients accumulate
    /// into one optimizer step with the semantics of as many data-parallel ranks (teacher
    /// targets over all of them, KoLeo per micro-batch), and the learning rate scales with the
    /// total batch, so a small device reproduces a large-batch recipe.
    pub accumulate: usize,
}

impl Default for TrainConfig {
    /// The official defaults (`ssl_default_config.yaml`) and dinotrain's own.
    fn default() -> Self {
        let precisions = |head_reduce: &str| ModulePrecisions {
            backbone: FsdpModule::official("fp16"),
            dino_head: FsdpModule::official(head_reduce),
            ibot_head: FsdpModule::official(head_reduce),
        };
        TrainConfig {
            model: ModelSection {
                weights: String::new(),
            },
            compute_precision: ComputePrecision {
                grad_scaler: true,
                teacher: precisions("fp16"),
                student: precisions("fp32"),
            },
            dino: DinoSection {
                loss_weight: 1.0,
                head_n_prototypes: 65536,
                head_bottleneck_dim: 256,
                head_nlayers: 3,
                head_hidden_dim: 2048,
                koleo_loss_weight: 0.1,
            },
            ibot: IbotSection {
                loss_weight: 1.0,
                mask_sample_probability: 0.5,
                mask_ratio_min_max: [0.1, 0.5],
                separate_head: false,
                head_n_prototypes: 65536,
                head_bottleneck_dim: 256,
                head_nlayers: 3,
                head_hidden_dim: 2048,
            },
            train: TrainSection {
                batch_size_per_gpu: 64,
                dataset_path: "ImageNet:split=TRAIN".into(),
                output_dir: PathBuf::from("."),
                saveckp_freq: 20,
                seed: 0,
                num_workers: 10,
                official_epoch_length: 1250,
                cache_dataset: true,
                centering: Centering::Softmax,
            },
            student: StudentSection {
                arch: Arch::VitLarge,
                patch_size: 16,
                drop_path_rate: 0.3,
                layerscale: 1.0e-5,
                drop_path_uniform: true,
                pretrained_weights: String::new(),
                ffn_layer: FfnLayer::Mlp,
                block_chunks: 0,
                qkv_bias: true,
                proj_bias: true,
                ffn_bias: true,
                num_register_tokens: 0,
                interpolate_antialias: false,
                interpolate_offset: 0.1,
            },
            teacher: TeacherSection {
                momentum_teacher: 0.992,
                final_momentum_teacher: 1.0,
                warmup_teacher_temp: 0.04,
                teacher_temp: 0.07,
                warmup_teacher_temp_epochs: 30.0,
            },
            optim: OptimSection {
                epochs: 100.0,
                weight_decay: 0.04,
                weight_decay_end: 0.4,
                base_lr: 0.004,
                lr: 0.0,
                warmup_epochs: 10.0,
                min_lr: 1.0e-6,
                clip_grad: 3.0,
                freeze_last_layer_epochs: 1.0,
                scaling_rule: ScalingRule::SqrtWrt1024,
                patch_embed_lr_mult: 0.2,
                layerwise_decay: 0.9,
                adamw_beta1: 0.9,
                adamw_beta2: 0.999,
            },
            crops: CropsSection {
                global_crops_scale: [0.32, 1.0],
                local_crops_number: 8,
                local_crops_scale: [0.05, 0.32],
                global_crops_size: 224,
                local_crops_size: 96,
            },
            evaluation: EvaluationSection {
                eval_period_iterations: 12500,
            },
            dinotrain: DinotrainSection {
                method: Method::Dinov2,
                device: "auto".into(),
                steps: None,
                steps_schedule: StepsSchedule::Stretch,
                data: None,
                stop_after: None,
                knn: true,
                knn_train: None,
                knn_val: None,
                knn_every: 0,
                knn_k: 20,
                knn_temperature: 0.07,
                model: None,
                embed_dim: None,
                depth: None,
                num_heads: None,
                checkpoint_every: None,
                keep_checkpoints: 3,
                log_every: 10,
                plot_every: 50,
                workers: 0,
                accumulate: 1,
            },
        }
    }
}

/// Named starting configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The official defaults (ViT-L/16, 224/96 px, 65536 prototypes).
    Official,
    /// A small ViT on the embedded demo data with the official recipe (patch 4, LayerScale
    /// 1e-5, 200 steps: `dinotrain train --recipe official`). `dinotrain train` with no
    /// arguments is this preset with [`Recipe::Small`] over it:
    /// `TrainConfig::preset(Preset::Demo).recipe(Recipe::Small)?`.
    Demo,
}

impl Preset {
    pub const NAMES: [&'static str; 2] = ["official", "demo"];

    /// Parses a preset name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "official" => Ok(Preset::Official),
            "demo" => Ok(Preset::Demo),
            _ => Err(Error::Config(format!(
                "unknown preset '{name}' (known: {})",
                Preset::NAMES.join(", ")
            ))),
        }
    }

    /// The preset's configuration.
    pub fn config(self) -> TrainConfig {
        let mut c = TrainConfig::default();
        if self == Preset::Demo {
            c.student.arch = Arch::VitTiny;
            c.dinotrain.embed_dim = Some(192);
            c.dinotrain.depth = Some(6);
            c.dinotrain.num_heads = Some(3);
            c.student.patch_size = 4;
            c.student.drop_path_rate = 0.0;
            c.crops.global_crops_size = 32;
            c.crops.local_crops_size = 16;
            for head in [
                (&mut c.dino.head_n_prototypes, &mut c.dino.head_hidden_dim),
                (&mut c.ibot.head_n_prototypes, &mut c.ibot.head_hidden_dim),
            ] {
                *head.0 = 4096;
                *head.1 = 512;
            }
            c.dino.head_bottleneck_dim = 128;
            c.ibot.head_bottleneck_dim = 128;
            c.train.batch_size_per_gpu = 64;
            c.train.dataset_path = "demo:fashion-mnist".into();
            c.dinotrain.device = "cpu".into();
            // 200 steps: about 8.5 minutes on the 2-core build machine, k-NN included.
            c.dinotrain.steps = Some(200);
            c.dinotrain.checkpoint_every = Some(100);
            c.dinotrain.knn_every = 100;
        }
        c
    }
}

/// Typed setters for the common settings: each sets one key and returns the configuration, so
/// a configuration reads as one expression. Every other key is a public field.
impl TrainConfig {
    /// A preset's configuration (the same as [`Preset::config`]).
    pub fn preset(preset: Preset) -> Self {
        preset.config()
    }

    /// Validates the configuration and derives the plan (learning rate, iterations, schedules,
    /// architecture); the same as `ResolvedConfig::resolve(self, vec![])`.
    pub fn resolve(self) -> Result<ResolvedConfig> {
        ResolvedConfig::resolve(self, Vec::new())
    }

    /// The folder of training images (searched recursively): `dinotrain.data`. Without one, the
    /// embedded Fashion-MNIST demo images.
    pub fn data(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dinotrain.data = Some(dir.into());
        self
    }

    /// The run folder (config, log, metrics, checkpoints, the exported teacher):
    /// `train.output_dir`.
    pub fn output_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.train.output_dir = dir.into();
        self
    }

    /// The configuration with a recipe's settings applied over it ([`Recipe`]; every key it
    /// sets is a public field, so later setters still win).
    pub fn recipe(self, recipe: Recipe) -> Result<Self> {
        let mut b = ConfigBuilder::from_config(&self)?;
        b.recipe(recipe)?;
        Ok(b.build()?.0)
    }

    /// The run's length in iterations, the schedules stretched to fit: `dinotrain.steps`.
    pub fn steps(mut self, steps: u64) -> Self {
        self.dinotrain.steps = Some(steps);
        self
    }

    /// The run's length in official epochs (`optim.epochs` × `train.OFFICIAL_EPOCH_LENGTH`
    /// iterations); clears `dinotrain.steps`.
    pub fn epochs(mut self, epochs: f64) -> Self {
        self.optim.epochs = epochs;
        self.dinotrain.steps = None;
        self
    }

    /// Images per iteration: `train.batch_size_per_gpu`.
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.train.batch_size_per_gpu = batch;
        self
    }

    /// Where the steps run: `dinotrain.device`.
    pub fn device(mut self, device: Device) -> Self {
        self.dinotrain.device = device.to_string();
        self
    }

    /// The method stage (DINO, iBOT, DINOv2): `dinotrain.method`.
    pub fn method(mut self, method: Method) -> Self {
        self.dinotrain.method = method;
        self
    }

    /// The run seed (initialisation, crops, masks, drop path): `train.seed`.
    pub fn seed(mut self, seed: u64) -> Self {
        self.train.seed = seed;
        self
    }

    /// The starting backbone: a released name (`dinov2/vits14`, ...) or a `.pth` /
    /// `.safetensors` file; it sets the architecture for released names: `dinotrain.model`.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.dinotrain.model = Some(model.into());
        self
    }

    /// Whether k-NN runs (at initialisation, every `dinotrain.knn_every` steps and at the end)
    /// when labelled images are available: `dinotrain.knn`.
    pub fn knn(mut self, on: bool) -> Self {
        self.dinotrain.knn = on;
        self
    }

    /// A checkpoint every this many steps: `dinotrain.checkpoint_every`.
    pub fn checkpoint_every(mut self, steps: u64) -> Self {
        self.dinotrain.checkpoint_every = Some(steps);
        self
    }

    /// The configuration as YAML (every key, official names).
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml_ng::to_string(self)
            .map_err(|e| Error::Config(format!("cannot write the configuration as YAML: {e}")))
    }

    /// Every leaf as `dotted.key → value` (values in YAML flow form), for fingerprints and diffs.
    pub fn flatten(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let tree = serde_yaml_ng::to_value(self)
            .map_err(|e| Error::Config(format!("cannot flatten the configuration: {e}")))?;
        let mut out = std::collections::BTreeMap::new();
        overrides::flatten_into(&tree, "", &mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_yaml() {
        let c = TrainConfig::default();
        let yaml = c.to_yaml().unwrap();
        assert!(yaml.contains("OFFICIAL_EPOCH_LENGTH: 1250"), "{yaml}");
        assert!(yaml.contains("WEIGHTS: ''"), "{yaml}");
        let back: TrainConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn flatten_names_official_keys() {
        let flat = TrainConfig::default().flatten().unwrap();
        assert_eq!(flat["optim.base_lr"], "0.004");
        assert_eq!(flat["crops.local_crops_number"], "8");
        assert_eq!(flat["train.centering"], "centering");
        assert_eq!(flat["ibot.mask_ratio_min_max"], "[0.1, 0.5]");
        assert_eq!(
            flat["compute_precision.student.dino_head.mixed_precision.reduce_dtype"],
            "fp32"
        );
        assert_eq!(flat["dinotrain.steps"], "null");
    }

    #[test]
    fn typed_setters_set_the_keys_their_flags_set() {
        let typed = TrainConfig::preset(Preset::Demo)
            .data("imgs")
            .output_dir("out/x")
            .steps(7)
            .batch_size(16)
            .device(Device::Cuda(1))
            .method(Method::Ibot)
            .seed(3)
            .model("dinov2/vits14");
        let mut b = ConfigBuilder::new(Preset::Demo).unwrap();
        for (flag, value) in [
            ("data", "imgs"),
            ("out", "out/x"),
            ("steps", "7"),
            ("batch-size", "16"),
            ("device", "cuda:1"),
            ("method", "ibot"),
            ("seed", "3"),
            ("model", "dinov2/vits14"),
        ] {
            b.flag(flag, value).unwrap();
        }
        assert_eq!(typed, b.build().unwrap().0);
        let by_epochs = typed.epochs(2.0);
        assert_eq!(
            (by_epochs.optim.epochs, by_epochs.dinotrain.steps),
            (2.0, None)
        );
    }

    #[test]
    fn presets_parse_and_demo_is_small() {
        assert_eq!(
            Preset::from_name("official").unwrap().config(),
            TrainConfig::default()
        );
        let demo = Preset::from_name("demo").unwrap().config();
        assert_eq!(demo.dinotrain.embed_dim, Some(192));
        assert_eq!(demo.dino.head_n_prototypes, 4096);
        assert_eq!(demo.crops.global_crops_size, 32);
        let err = Preset::from_name("huge").unwrap_err().to_string();
        assert!(err.contains("demo"), "{err}");
    }
}
