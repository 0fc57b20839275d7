//! `dinotrain::train`: from a resolved configuration to a trained, evaluated, exported model.
//!
//! The loop: prepare the run folder, build the trainer (random init, pretrained backbone, or a
//! checkpoint to resume), start the loader at the resumed step, then per step: one iteration,
//! metrics, progress, periodic checkpoints, plots and k-NN; at the end a last checkpoint, the
//! teacher backbone exported with official keys, and k-NN of the trained teacher next to the
//! same model at initialisation.

use super::checkpoint::{self, CheckpointRef, ConfigCheck, RunPosition};
use super::config::{FfnLayer, ResolvedConfig, StartingPoint};
use super::export::{export_backbone, load_backbone_into, read_backbone, KeyNaming};
use super::metrics::{MetricsWriter, StepMetrics};
use super::outdir::{OutdirMode, RunDir, RunLog};
use super::plot;
use super::progress::{Progress, ProgressMode, StepReport};
use super::trainer::{EvalWeights, StepRecord, TrainPlan, Trainer};
use crate::backend::cpu::optimizer::AdamHyper;
use crate::backend::cuda::resolve_device;
use crate::data::scan::Labels;
use crate::data::source::needed_short_side;
use crate::data::{
    demo_split, DecodeOptions, FolderSource, ImageSource, Loader, LoaderConfig, MultiCropConfig,
    ScanOptions, Split,
};
use crate::error::{Error, Result};
use crate::eval::backbone::arch_metadata;
use crate::eval::embed::{knn_top1, source_features, source_labels};
use crate::nn::{Ffn, VitConfig};
use crate::optim::AdamWState;
use crate::optim::LayerDecay;
use crate::ssl::dino_loss::STUDENT_TEMP;
use crate::ssl::step::{HeadConfig, LossConfig, SslModel};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// How to run: the resolved configuration plus what the command line decides about the folder.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub config: ResolvedConfig,
    /// Fresh folder, resume from its last checkpoint, or overwrite dinotrain's files in it.
    pub outdir: OutdirMode,
    /// Resume even though the configuration changed (the differences are logged).
    pub allow_config_change: bool,
    pub progress: ProgressMode,
}

/// k-NN top-1 accuracy of the teacher's normalised CLS token, trained and at initialisation.
#[derive(Clone, Debug, PartialEq)]
pub struct KnnReport {
    pub k: usize,
    pub initial_top1: f64,
    pub trained_top1: f64,
    pub n_train: usize,
    pub n_test: usize,
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub output_dir: PathBuf,
    /// Iterations completed (including those before a resume).
    pub steps: u64,
    /// Iterations run by this call.
    pub steps_this_run: u64,
    pub last: Option<StepMetrics>,
    pub knn: Option<KnnReport>,
    pub checkpoint: Option<PathBuf>,
    pub export: PathBuf,
    pub wall_seconds: f64,
    /// Mean training throughput of this call.
    pub images_per_s: f64,
    /// Share of this call's step time spent waiting for data.
    pub data_wait_share: f64,
    /// On CUDA: which library ran this process's GEMMs (cuBLASLt with fused epilogues or
    /// cuBLAS) and how often.
    pub gemms: Option<crate::backend::cuda::GemmStats>,
}

/// The iteration plan a resolved configuration describes.
pub fn plan_from_config(r: &ResolvedConfig) -> Result<TrainPlan> {
    let c = &r.config;
    let a = &r.arch;
    let ffn = match a.ffn_layer {
        FfnLayer::Mlp => Ffn::Mlp {
            hidden: a.ffn_hidden_dim,
        },
        // The SwiGLU layer derives its width from 4·D exactly as `SwiGLUFFNFused` does.
        FfnLayer::Swiglu | FfnLayer::SwigluFused => Ffn::SwiGlu {
            hidden: 4 * a.embed_dim,
        },
        FfnLayer::Identity => {
            return Err(Error::Unsupported(
                "student.ffn_layer = identity (no FFN) is not implemented".into(),
            ))
        }
    };
    if !a.drop_path_uniform && a.drop_path_rate > 0.0 {
        return Err(Error::Unsupported(
            "student.drop_path_uniform = false (linearly increasing rates) is not implemented; \
             every official config uses uniform rates"
                .into(),
        ));
    }
    let vit = VitConfig {
        img_size: a.img_size,
        patch_size: a.patch_size,
        in_chans: 3,
        embed_dim: a.embed_dim,
        depth: a.depth,
        num_heads: a.num_heads,
        ffn,
        num_register_tokens: a.num_register_tokens,
        layerscale: (a.layerscale > 0.0).then_some(a.layerscale as f32),
        interpolate_offset: a.interpolate_offset as f32,
        interpolate_antialias: a.interpolate_antialias,
        qkv_bias: a.qkv_bias,
        proj_bias: a.proj_bias,
        ffn_bias: a.ffn_bias,
    };
    let head = |hidden, bottleneck, k| HeadConfig {
        hidden_dim: hidden,
        bottleneck_dim: bottleneck,
        n_prototypes: k,
    };
    Ok(TrainPlan {
        dino_head: head(
            c.dino.head_hidden_dim,
            c.dino.head_bottleneck_dim,
            c.dino.head_n_prototypes,
        ),
        ibot_head: c.ibot.separate_head.then(|| {
            head(
                c.ibot.head_hidden_dim,
                c.ibot.head_bottleneck_dim,
                c.ibot.head_n_prototypes,
            )
        }),
        losses: LossConfig {
            method: r.method,
            dino_loss_weight: c.dino.loss_weight as f32,
            koleo_loss_weight: c.dino.koleo_loss_weight as f32,
            ibot_loss_weight: c.ibot.loss_weight as f32,
            student_temp: STUDENT_TEMP,
        },
        centering: c.train.centering,
        batch_size: c.train.batch_size_per_gpu,
        n_local_crops: c.crops.local_crops_number,
        global_crop_size: c.crops.global_crops_size,
        local_crop_size: c.crops.local_crops_size,
        mask_probability: c.ibot.mask_sample_probability as f32,
        mask_ratio_min_max: (
            c.ibot.mask_ratio_min_max[0] as f32,
            c.ibot.mask_ratio_min_max[1] as f32,
        ),
        drop_path_rate: a.drop_path_rate as f32,
        schedules: r.schedules,
        layer_decay: LayerDecay {
            depth: a.depth,
            layerwise_decay: c.optim.layerwise_decay,
            patch_embed_lr_mult: c.optim.patch_embed_lr_mult,
        },
        adam: AdamHyper {
            beta1: c.optim.adamw_beta1,
            beta2: c.optim.adamw_beta2,
            ..AdamHyper::default()
        },
        clip_grad: c.optim.clip_grad as f32,
        seed: c.train.seed,
        precision: None,
        vit,
    })
}

/// The multi-crop recipe of the configuration (official probabilities and jitter).
pub fn crops_from_config(r: &ResolvedConfig) -> MultiCropConfig {
    let c = &r.config.crops;
    MultiCropConfig {
        global_size: c.global_crops_size as u32,
        local_size: c.local_crops_size as u32,
        n_global: 2,
        n_local: c.local_crops_number,
        global_scale: (c.global_crops_scale[0], c.global_crops_scale[1]),
        local_scale: (c.local_crops_scale[0], c.local_crops_scale[1]),
        ..MultiCropConfig::default()
    }
}

/// The training images: a folder, or the embedded demo set.
fn training_source(r: &ResolvedConfig) -> Result<Arc<dyn ImageSource>> {
    match &r.config.dinotrain.data {
        Some(dir) => {
            let decode = DecodeOptions {
                min_side_hint: Some(needed_short_side(
                    r.config.crops.global_crops_size as u32,
                    r.config.crops.global_crops_scale[0],
                )),
                ..DecodeOptions::default()
            };
            Ok(Arc::new(FolderSource::open(
                dir,
                &ScanOptions::default(),
                decode,
            )?))
        }
        None => Ok(Arc::new(demo_split(Split::Train)?)),
    }
}

/// Labelled (train, test) sources for k-NN, when the run has them.
/// Labelled (train, test) images for k-NN.
type KnnSources = (Arc<dyn ImageSource>, Arc<dyn ImageSource>);

fn knn_sources(r: &ResolvedConfig) -> Result<Option<KnnSources>> {
    let d = &r.config.dinotrain;
    if !d.knn {
        return Ok(None);
    }
    let labelled = |dir: &PathBuf| -> Result<Arc<dyn ImageSource>> {
        let scan = ScanOptions {
            labels: Labels::Subfolder,
            ..ScanOptions::default()
        };
        Ok(Arc::new(FolderSource::open(
            dir,
            &scan,
            DecodeOptions::default(),
        )?))
    };
    match (&d.knn_train, &d.knn_val, &d.data) {
        (Some(t), Some(v), _) => Ok(Some((labelled(t)?, labelled(v)?))),
        (None, None, None) => Ok(Some((
            Arc::new(demo_split(Split::Train)?),
            Arc::new(demo_split(Split::Test)?),
        ))),
        (Some(_), None, _) | (None, Some(_), _) => Err(Error::Config(
            "k-NN needs both dinotrain.knn_train and dinotrain.knn_val".into(),
        )),
        (None, None, Some(_)) => Ok(None),
    }
}

/// Images decoded and transformed on the host per batch of the k-NN features (the device
/// splits a batch further into its own chunks).
const KNN_HOST_CHUNK: usize = 256;

/// k-NN top-1 (%) of the backbone features of `weights` at k = `k`, computed on the trainer's
/// device.
fn knn_accuracy(
    trainer: &mut Trainer,
    weights: EvalWeights<'_>,
    sources: &KnnSources,
    k: usize,
    temperature: f32,
) -> Result<f64> {
    let size = trainer.plan.global_crop_size;
    let (train, test) = sources;
    let d = trainer.model.backbone.cfg.embed_dim;
    let (train_f, test_f) = {
        let mut extractor = trainer.feature_extractor(weights)?;
        (
            source_features(&mut extractor, train.as_ref(), size, KNN_HOST_CHUNK)?,
            source_features(&mut extractor, test.as_ref(), size, KNN_HOST_CHUNK)?,
        )
    };
    let k = k.min(train.len());
    let acc = knn_top1(
        &train_f,
        &source_labels(train.as_ref())?,
        &test_f,
        &source_labels(test.as_ref())?,
        d,
        &[k],
        temperature,
    )?;
    Ok(acc[0].1)
}

/// Student weights at the start of a run: official initialisation from the seed, with the
/// backbone replaced by pretrained weights when the configuration names some.
fn initial_student(model: &SslModel, seed: u64, start: &StartingPoint) -> Result<Vec<f32>> {
    let mut student = model
        .table
        .init(&mut crate::rng::keyed(seed, &[crate::rng::stream::INIT]));
    if let StartingPoint::Weights(source) = start {
        let (path, format) = source.locate()?;
        let backbone = read_backbone(&path, format)?;
        load_backbone_into(
            &model.table,
            &mut student,
            &backbone,
            &path.display().to_string(),
        )?;
    }
    Ok(student)
}

fn center_tensor(center: Option<&[f32]>) -> Option<Tensor> {
    center.map(|c| Tensor {
        shape: vec![c.len()],
        data: c.to_vec(),
    })
}

/// Writes a checkpoint of the trainer's state (read back from its device).
fn save_checkpoint(
    run: &RunDir,
    trainer: &mut Trainer,
    identity: &BTreeMap<String, String>,
    n_images: u64,
) -> Result<PathBuf> {
    let state = trainer.snapshot()?;
    let dino = center_tensor(state.targets.dino.center());
    let ibot = center_tensor(state.targets.ibot.center());
    let mut buffers: Vec<(&str, &Tensor)> = Vec::new();
    if let Some(t) = &dino {
        buffers.push(("dino_center", t));
    }
    if let Some(t) = &ibot {
        buffers.push(("ibot_center", t));
    }
    let mut extra = BTreeMap::new();
    extra.insert("dinotrain_version".into(), env!("CARGO_PKG_VERSION").into());
    let images_seen = state.step * trainer.plan.batch_size as u64;
    let ckpt = CheckpointRef {
        params: &trainer.model.table,
        student: &state.student,
        teacher: &state.teacher,
        exp_avg: &state.optimizer.exp_avg,
        exp_avg_sq: &state.optimizer.exp_avg_sq,
        adam_step: state.optimizer.step,
        buffers: &buffers,
        position: RunPosition {
            step: state.step,
            epoch: images_seen / n_images.max(1),
            seed: trainer.plan.seed,
            images_in_epoch: images_seen % n_images.max(1),
        },
        config: identity,
        extra: &extra,
    };
    checkpoint::save(&run.checkpoints(), &ckpt)
}

/// Restores the trainer from the run folder's latest checkpoint.
fn resume(
    run: &RunDir,
    trainer: &mut Trainer,
    identity: &BTreeMap<String, String>,
    allow_change: bool,
    log: &mut RunLog,
) -> Result<()> {
    let path = run.latest_checkpoint()?.ok_or_else(|| {
        Error::Config(format!(
            "--resume: no checkpoint in {}",
            run.checkpoints().display()
        ))
    })?;
    let check = if allow_change {
        ConfigCheck::AllowChanges
    } else {
        ConfigCheck::Strict
    };
    let ckpt = checkpoint::load(&path, &trainer.model.table, identity, check)?;
    let diffs = checkpoint::config_diffs(&ckpt.config, identity);
    if !diffs.is_empty() {
        log.line(&format!(
            "resuming with changed settings: {}",
            diffs.join("; ")
        ))?;
    }
    let mut state = trainer.snapshot()?;
    state.student = ckpt.student;
    state.teacher = ckpt.teacher;
    state.optimizer = AdamWState {
        exp_avg: ckpt.exp_avg,
        exp_avg_sq: ckpt.exp_avg_sq,
        step: ckpt.adam_step,
    };
    for (name, centering) in [
        ("dino_center", &mut state.targets.dino),
        ("ibot_center", &mut state.targets.ibot),
    ] {
        if let crate::ssl::Centering::Softmax { center, .. } = centering {
            let t = ckpt.buffers.get(name).ok_or_else(|| Error::Checkpoint {
                file: path.clone(),
                detail: format!("buffer '{name}' is missing (softmax centering needs it)"),
            })?;
            if t.data.len() != center.len() {
                return Err(Error::Checkpoint {
                    file: path.clone(),
                    detail: format!(
                        "buffer '{name}' holds {} values, the model has {} prototypes",
                        t.data.len(),
                        center.len()
                    ),
                });
            }
            center.copy_from_slice(&t.data);
        }
    }
    state.step = ckpt.position.step;
    trainer.restore(&state)?;
    log.line(&format!(
        "resumed from {} at step {}",
        path.display(),
        trainer.step()
    ))?;
    Ok(())
}

fn metrics_of(
    record: &StepRecord,
    epoch: u64,
    images_per_s: f64,
    data_wait_share: f64,
    elapsed_s: f64,
) -> StepMetrics {
    let l = &record.losses;
    let mut losses = BTreeMap::new();
    for (name, value) in l.terms() {
        let key = if name == "loss" { "total" } else { name };
        losses.insert(key.to_string(), value as f64);
    }
    let mut grad_norms: BTreeMap<String, f64> = record
        .grad_norms
        .iter()
        .map(|(n, v)| (n.clone(), *v as f64))
        .collect();
    let total = grad_norms.values().map(|v| v * v).sum::<f64>().sqrt();
    grad_norms.insert("total".into(), total);
    let mut extra = BTreeMap::new();
    extra.insert("teacher_entropy".into(), l.teacher_entropy as f64);
    extra.insert("masked_patches".into(), record.n_masked as f64);
    StepMetrics {
        step: record.step,
        epoch,
        losses,
        lr: record.scheduled.lr,
        last_layer_lr: record.scheduled.last_layer_lr,
        weight_decay: record.scheduled.wd,
        momentum: record.scheduled.momentum,
        teacher_temp: record.scheduled.teacher_temp,
        grad_norms,
        images_per_s,
        data_wait_share,
        elapsed_s,
        extra,
    }
}

/// Wall time of a call and the time its steps took, for the summary.
struct LoopTimes {
    started: Instant,
    /// Seconds spent in steps (waiting for data included).
    train_seconds: f64,
    /// Seconds of those spent waiting for the loader.
    wait_seconds: f64,
}

impl LoopTimes {
    fn summary(
        &self,
        run: &RunDir,
        trainer: &Trainer,
        first_step: u64,
        records: &[StepMetrics],
        knn: Option<KnnReport>,
        checkpoint: Option<PathBuf>,
    ) -> TrainSummary {
        let steps_this_run = trainer.step() - first_step;
        let images = steps_this_run as f64 * trainer.plan.batch_size as f64;
        TrainSummary {
            output_dir: run.root.clone(),
            steps: trainer.step(),
            steps_this_run,
            last: records.last().cloned(),
            knn,
            checkpoint,
            export: run.export_path(),
            wall_seconds: self.started.elapsed().as_secs_f64(),
            images_per_s: images / self.train_seconds.max(1e-9),
            data_wait_share: self.wait_seconds / self.train_seconds.max(1e-9),
            gemms: trainer.gemm_stats(),
        }
    }
}

/// Trains as configured. See the module documentation.
///
/// ```
/// use dinotrain::train::config::{ConfigBuilder, Preset, ResolvedConfig};
/// use dinotrain::train::{outdir::OutdirMode, progress::ProgressMode, train, TrainOptions};
///
/// let out = std::env::temp_dir().join(format!("dinotrain-doc-{}", std::process::id()));
/// let mut b = ConfigBuilder::new(Preset::Demo)?; // the demo model on the embedded images
/// b.flag("out", &out.to_string_lossy())?.flag("steps", "2")?.flag("batch-size", "8")?;
/// b.set("dinotrain.knn=false")?; // skip k-NN to keep the example fast
/// let (config, warnings) = b.build()?;
/// let summary = train(TrainOptions {
///     config: ResolvedConfig::resolve(config, warnings)?,
///     outdir: OutdirMode::Fresh,
///     allow_config_change: false,
///     progress: ProgressMode::Silent,
/// })?;
/// assert_eq!(summary.steps, 2);
/// assert!(summary.export.exists());
/// # std::fs::remove_dir_all(&out).ok();
/// # Ok::<(), dinotrain::Error>(())
/// ```
pub fn train(options: TrainOptions) -> Result<TrainSummary> {
    let mut times = LoopTimes {
        started: Instant::now(),
        train_seconds: 0.0,
        wait_seconds: 0.0,
    };
    let r = &options.config;
    let plan = plan_from_config(r)?;
    let run = RunDir::prepare(&r.output_dir, options.outdir)?;
    r.write_yaml(&run.root)?;
    let mut log = RunLog::open(&run.log_path())?;
    for w in &r.warnings {
        log.line(&format!("warning: {w}"))?;
        log::warn!("{w}");
    }
    let identity = r.resume_identity()?;

    let source = training_source(r)?;
    let n_images = source.len() as u64;
    let knn = knn_sources(r)?;
    // The device is resolved once: `auto` falls back to the CPU with one line saying why.
    let device = resolve_device(r.device)?;
    let model = SslModel::new(&plan.vit, plan.dino_head, plan.ibot_head)?;
    let initial = initial_student(&model, plan.seed, &r.start)?;
    let mut trainer = Trainer::from_parts_on(plan.clone(), model, initial.clone(), device)?;
    log.line(&format!("device: {}", trainer.device_name()))?;
    let resuming = options.outdir == OutdirMode::Resume;
    if resuming {
        resume(
            &run,
            &mut trainer,
            &identity,
            options.allow_config_change,
            &mut log,
        )?;
    }
    let first_step = trainer.step();
    let total = r.total_iters;
    log.line(&format!(
        "{} images; model {} parameters ({} backbone); {} steps from step {first_step}; batch {}; lr {:.3e}",
        n_images,
        trainer.model.table.len(),
        trainer
            .model
            .table
            .specs()
            .iter()
            .filter(|s| s.submodule() == "backbone")
            .map(|s| s.at.len)
            .sum::<usize>(),
        total,
        plan.batch_size,
        r.lr
    ))?;

    let k = r.config.dinotrain.knn_k;
    let temperature = r.config.dinotrain.knn_temperature as f32;
    let mut progress = Progress::new(options.progress, first_step, total);
    progress.message(&format!("training on {}", trainer.device_name()));
    let initial_knn = match &knn {
        Some(sources) if first_step < total || !resuming => {
            progress.message("k-NN of the model at initialisation ...");
            Some(knn_accuracy(
                &mut trainer,
                EvalWeights::Host(&initial),
                sources,
                k,
                temperature,
            )?)
        }
        _ => None,
    };
    if let Some(acc) = initial_knn {
        log.line(&format!("k-NN top-1 (k={k}) at initialisation: {acc:.2}%"))?;
    }

    let loader_cfg = LoaderConfig {
        crops: crops_from_config(r),
        workers: match r.config.dinotrain.workers {
            0 => LoaderConfig::default().workers,
            n => n,
        },
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(
        Arc::clone(&source),
        loader_cfg,
        plan.batch_size,
        plan.seed,
        first_step,
    )?;
    let mut metrics = MetricsWriter::open(&run.metrics_path(), Some(first_step))?;
    let mut records = if resuming {
        super::metrics::read(&run.metrics_path())?
    } else {
        Vec::new()
    };
    records.retain(|m| m.step < first_step);
    let every = |n: u64, step: u64| n > 0 && (step + 1) % n == 0;
    let d = &r.config.dinotrain;
    let mut last_checkpoint = None;
    let loop_start = Instant::now();
    while trainer.step() < total {
        let step_start = Instant::now();
        let waited_before = loader.wait_seconds();
        let batch = loader.next_batch()?;
        let record = match trainer.train_step(&batch.global, &batch.local) {
            Ok(record) => record,
            Err(e @ Error::NonFinite { .. }) => {
                log.line(&format!("stopped: {e}; the last good checkpoint is kept"))?;
                progress.finish();
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let epoch = batch.epoch;
        loader.recycle(batch);
        let step_seconds = step_start.elapsed().as_secs_f64();
        let waited = loader.wait_seconds() - waited_before;
        times.train_seconds += step_seconds;
        times.wait_seconds += waited;
        let images_per_s = plan.batch_size as f64 / step_seconds.max(1e-9);
        let wait_share = waited / step_seconds.max(1e-9);
        let m = metrics_of(
            &record,
            epoch,
            images_per_s,
            wait_share,
            loop_start.elapsed().as_secs_f64(),
        );
        metrics.write(&m)?;
        progress.step(&StepReport {
            step: record.step,
            epoch,
            loss: record.losses.loss as f64,
            images_per_s,
            data_wait_share: wait_share,
        });
        records.push(m);
        let step = record.step;
        if every(r.checkpoint_every, step) && trainer.step() < total {
            last_checkpoint = Some(save_checkpoint(&run, &mut trainer, &identity, n_images)?);
            checkpoint::prune(&run.checkpoints(), d.keep_checkpoints.max(1))?;
        }
        if every(d.plot_every, step) {
            plot::write_png(&records, "dinotrain", &run.plot_path())?;
        }
        if d.stop_after == Some(trainer.step() - first_step) && trainer.step() < total {
            progress.finish();
            log.line(&format!(
                "stopped after {} steps (dinotrain.stop_after), at step {}",
                trainer.step() - first_step,
                trainer.step()
            ))?;
            return Ok(times.summary(&run, &trainer, first_step, &records, None, last_checkpoint));
        }
        if let Some(sources) = &knn {
            if every(d.knn_every, step) && trainer.step() < total {
                // The teacher is read where it lives: no download of the whole state.
                let acc =
                    knn_accuracy(&mut trainer, EvalWeights::Teacher, sources, k, temperature)?;
                progress.message(&format!("step {}: k-NN top-1 (k={k}) {acc:.2}%", step + 1));
                log.line(&format!("step {}: k-NN top-1 (k={k}) {acc:.2}%", step + 1))?;
            }
        }
    }
    progress.finish();
    let steps_this_run = trainer.step() - first_step;
    if steps_this_run > 0 || last_checkpoint.is_none() {
        last_checkpoint = Some(save_checkpoint(&run, &mut trainer, &identity, n_images)?);
        checkpoint::prune(&run.checkpoints(), d.keep_checkpoints.max(1))?;
    }
    if !records.is_empty() {
        plot::write_png(&records, "dinotrain", &run.plot_path())?;
    }
    let export = run.export_path();
    let mut meta = arch_metadata(&trainer.model.backbone.cfg);
    meta.insert("dinotrain.step".into(), trainer.step().to_string());
    let state = trainer.snapshot()?;
    export_backbone(
        &export,
        &trainer.model.table,
        &state.teacher,
        KeyNaming::Official,
        &meta,
    )?;
    log.line(&format!(
        "exported the teacher backbone to {}",
        export.display()
    ))?;

    let knn_report = match (&knn, initial_knn) {
        (Some(sources), Some(initial_top1)) => {
            let trained =
                knn_accuracy(&mut trainer, EvalWeights::Teacher, sources, k, temperature)?;
            let report = KnnReport {
                k,
                initial_top1,
                trained_top1: trained,
                n_train: sources.0.len(),
                n_test: sources.1.len(),
            };
            log.line(&format!(
                "k-NN top-1 (k={k}): trained teacher {trained:.2}%, at initialisation {initial_top1:.2}%"
            ))?;
            let json = serde_json::json!({
                "k": k, "trained_top1": trained, "initial_top1": initial_top1,
                "n_train": report.n_train, "n_test": report.n_test, "step": trainer.step(),
            });
            crate::io::write_atomic(&run.knn_path(), json.to_string().as_bytes())?;
            Some(report)
        }
        _ => None,
    };
    let bad = loader.bad_images();
    if bad > 0 {
        log.line(&format!(
            "{bad} unreadable images were replaced during training"
        ))?;
    }
    Ok(times.summary(
        &run,
        &trainer,
        first_step,
        &records,
        knn_report,
        last_checkpoint,
    ))
}

/// The k-NN accuracy summary line for people.
pub fn knn_line(r: &KnnReport) -> String {
    format!(
        "k-NN top-1 (k={}, {} train / {} test images): trained teacher {:.2}%, same model at initialisation {:.2}%",
        r.k, r.n_train, r.n_test, r.trained_top1, r.initial_top1
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::{ConfigBuilder, Preset};

    #[test]
    fn the_demo_preset_resolves_to_a_valid_plan() {
        let (config, warnings) = ConfigBuilder::new(Preset::Demo).unwrap().build().unwrap();
        let r = ResolvedConfig::resolve(config, warnings).unwrap();
        let plan = plan_from_config(&r).unwrap();
        assert_eq!(plan.vit.patch_size, r.arch.patch_size);
        assert_eq!(plan.global_crop_size % plan.vit.patch_size, 0);
        assert_eq!(plan.centering, r.config.train.centering);
        assert!(matches!(plan.vit.ffn, Ffn::Mlp { hidden } if hidden == 4 * plan.vit.embed_dim));
    }

    #[test]
    fn swiglu_configs_build_the_official_width() {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        b.set("student.ffn_layer=swiglufused").unwrap();
        b.set("student.arch=vit_small").unwrap();
        let (config, warnings) = b.build().unwrap();
        let r = ResolvedConfig::resolve(config, warnings).unwrap();
        let plan = plan_from_config(&r).unwrap();
        assert_eq!(plan.vit.ffn, Ffn::SwiGlu { hidden: 4 * 384 });
    }
}
