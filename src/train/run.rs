//! `dinotrain::train`: from a resolved configuration to a trained, evaluated, exported model.
//!
//! The loop: prepare the run folder, build the trainer (random init, pretrained backbone, or a
//! checkpoint to resume), start the loader at the resumed step, then per step: one iteration,
//! metrics, the observer, periodic checkpoints, plots and k-NN; at the end (or when the observer
//! or the cancel handle stops the run) a last checkpoint and the teacher backbone exported with
//! official keys; at the end also k-NN of the trained teacher next to the same model at
//! initialisation.

use super::checkpoint::{self, CheckpointRef, ConfigCheck, RunPosition};
use super::config::{ResolvedConfig, StartingPoint};
use super::health::{feature_spread, FeatureSpread, Finding, HealthMonitor};
use super::metrics::{HealthWarning, MetricsWriter, StepMetrics};
use super::observer::{CancelHandle, Control, LogMessages, RunStart, StopReason, TrainObserver};
use super::outdir::{OutdirMode, RunDir, RunLog};
pub use super::plan::{crops_from_config, plan_from_config};
use super::plot;
use super::tensorboard::{EventWriter, TENSORBOARD_DIR};
use super::trainer::{EvalWeights, StepRecord, Trainer};
use crate::backend::cuda::resolve_device;
use crate::data::scan::Labels;
use crate::data::source::needed_short_side;
use crate::data::{
    demo_split, DecodeOptions, FolderSource, ImageSource, Loader, LoaderConfig, ScanOptions, Split,
};
use crate::error::{Error, Result};
use crate::eval::backbone::arch_metadata;
use crate::eval::embed::{knn_top1, source_features, source_labels};
use crate::eval::probe::{linear_probe, ProbeOptions, ProbeResult};
use crate::io::export::{export_backbone, load_backbone_into, read_backbone, KeyNaming};
use crate::optim::AdamWState;
use crate::ssl::step::SslModel;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How to run: the resolved configuration, what to do with the output folder, and who
/// watches. [`TrainOptions::new`] gives the defaults; the other methods change one each.
///
/// ```
/// use dinotrain::train::{CancelHandle, OutdirMode, Preset, TrainConfig, TrainOptions};
///
/// let cancel = CancelHandle::new(); // keep a clone to stop the run from another thread
/// let options = TrainOptions::new(TrainConfig::preset(Preset::Demo).resolve()?)
///     .outdir(OutdirMode::Resume)
///     .cancel(cancel.clone());
/// assert!(options.observer.is_none());
/// # Ok::<(), dinotrain::Error>(())
/// ```
pub struct TrainOptions {
    pub config: ResolvedConfig,
    /// Fresh folder (the default), resume from its last checkpoint, or overwrite dinotrain's
    /// files in it.
    pub outdir: OutdirMode,
    /// Resume even though the configuration changed (the differences are logged). Default:
    /// false.
    pub allow_config_change: bool,
    /// Sees every step, checkpoint, k-NN result and message, and may stop the run. Default:
    /// none (messages go to the `log` crate).
    pub observer: Option<Box<dyn TrainObserver + Send>>,
    /// Stops the run from another thread after its current step. Default: none.
    pub cancel: Option<CancelHandle>,
}

impl TrainOptions {
    /// A fresh run folder, no observer, no cancel handle.
    pub fn new(config: ResolvedConfig) -> Self {
        TrainOptions {
            config,
            outdir: OutdirMode::Fresh,
            allow_config_change: false,
            observer: None,
            cancel: None,
        }
    }

    /// Fresh, resume or overwrite.
    pub fn outdir(mut self, mode: OutdirMode) -> Self {
        self.outdir = mode;
        self
    }

    /// Whether a resume may change the configuration.
    pub fn allow_config_change(mut self, allow: bool) -> Self {
        self.allow_config_change = allow;
        self
    }

    /// Who watches the run.
    pub fn observer(mut self, observer: impl TrainObserver + Send + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// The handle that stops the run.
    pub fn cancel(mut self, cancel: CancelHandle) -> Self {
        self.cancel = Some(cancel);
        self
    }
}

impl std::fmt::Debug for TrainOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainOptions")
            .field("config", &self.config)
            .field("outdir", &self.outdir)
            .field("allow_config_change", &self.allow_config_change)
            .field("observer", &self.observer.as_ref().map(|_| ".."))
            .field("cancel", &self.cancel)
            .finish()
    }
}

/// k-NN top-1 accuracy of the teacher's normalised CLS token, trained and at initialisation.
#[derive(Clone, Debug, PartialEq)]
pub struct KnnReport {
    pub k: usize,
    pub initial_top1: f64,
    pub trained_top1: f64,
    pub n_train: usize,
    pub n_test: usize,
    /// Linear-probe top-1 (%) of the trained teacher on the same features.
    pub probe_top1: Option<f64>,
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
    /// The exported teacher backbone (absent when the run stopped by `dinotrain.stop_after`).
    pub export: PathBuf,
    /// Why the run returned before its last step; `None` when it ran to the end.
    pub stopped: Option<StopReason>,
    pub wall_seconds: f64,
    /// Mean training throughput of this call.
    pub images_per_s: f64,
    /// Share of this call's step time spent waiting for data.
    pub data_wait_share: f64,
    /// On CUDA: which library ran this process's GEMMs (cuBLASLt with fused epilogues or
    /// cuBLAS) and how often.
    pub gemms: Option<crate::backend::cuda::GemmStats>,
}

/// The training images: a folder, or the embedded demo set.
fn training_source(r: &ResolvedConfig) -> Result<Arc<dyn ImageSource>> {
    match &r.config.dinotrain.data {
        Some(dir) => Ok(Arc::new(training_folder(dir, r)?)),
        None => Ok(Arc::new(demo_split(Split::Train)?)),
    }
}

/// A folder of training images, decoded no smaller than the configuration's crops need (also
/// what `bench --data` times).
pub fn training_folder(dir: &Path, r: &ResolvedConfig) -> Result<FolderSource> {
    let decode = DecodeOptions {
        min_side_hint: Some(needed_short_side(
            r.config.crops.global_crops_size as u32,
            r.config.crops.global_crops_scale[0],
        )),
        ..DecodeOptions::default()
    };
    FolderSource::open(dir, &ScanOptions::default(), decode)
}

/// Labelled (train, test) images for k-NN.
type KnnSources = (Arc<dyn ImageSource>, Arc<dyn ImageSource>);

/// The k-NN sources, when the run has them.
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

/// A k-NN evaluation: top-1 (%), the spread of the test images' features and, when asked, a
/// linear probe on the same features.
#[derive(Clone, Copy, Debug)]
struct KnnEval {
    top1: f64,
    spread: FeatureSpread,
    probe: Option<ProbeResult>,
}

/// k-NN top-1 (%) of the backbone features of `weights` at k = `k`, computed on the trainer's
/// device, with the spread of the test features (a collapse signal).
fn knn_accuracy(
    trainer: &mut Trainer,
    weights: EvalWeights<'_>,
    sources: &KnnSources,
    k: usize,
    temperature: f32,
    probe: bool,
) -> Result<KnnEval> {
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
    let spread = feature_spread(&test_f, test.len(), d);
    let (train_labels, test_labels) = (
        source_labels(train.as_ref())?,
        source_labels(test.as_ref())?,
    );
    let acc = knn_top1(
        &train_f,
        &train_labels,
        &test_f,
        &test_labels,
        d,
        &[k],
        temperature,
    )?;
    let probe = match probe {
        true => Some(linear_probe(
            &train_f,
            &train_labels,
            &test_f,
            &test_labels,
            d,
            ProbeOptions::default(),
        )?),
        false => None,
    };
    Ok(KnnEval {
        top1: acc[0].1,
        spread,
        probe,
    })
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
    // The whole architecture (heads included), for embed / knn / export of the checkpoint.
    extra.extend(arch_metadata(&trainer.model.backbone.cfg));
    let images_seen = state.step * trainer.plan.images_per_step() as u64;
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
        warnings: Vec::new(),
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

/// How the steps of a call ended, for the summary.
#[derive(Default)]
struct RunEnd {
    knn: Option<KnnReport>,
    checkpoint: Option<PathBuf>,
    /// The step count of the last checkpoint this call wrote.
    saved_at: Option<u64>,
    stopped: Option<StopReason>,
    /// Unreadable images the loader replaced.
    bad_images: u64,
}

/// What [`Session::build`] makes.
struct Parts {
    r: ResolvedConfig,
    run: RunDir,
    identity: BTreeMap<String, String>,
    trainer: Trainer,
    source: Arc<dyn ImageSource>,
    knn: Option<KnnSources>,
    initial: Vec<f32>,
}

/// One call of [`train`]: the run folder, the trainer on its device, and who hears about it.
struct Session {
    r: ResolvedConfig,
    run: RunDir,
    log: RunLog,
    identity: BTreeMap<String, String>,
    trainer: Trainer,
    source: Arc<dyn ImageSource>,
    knn: Option<KnnSources>,
    observer: Box<dyn TrainObserver + Send>,
    cancel: Option<CancelHandle>,
    times: LoopTimes,
    resuming: bool,
    first_step: u64,
    /// Every step's metrics so far, those before a resume included (for the plots).
    records: Vec<StepMetrics>,
    end: RunEnd,
    health: HealthMonitor,
    /// k-NN top-1 (%) of the initial weights, when evaluated; what "no learning" compares with.
    initial_knn: Option<f64>,
}

impl Session {
    /// Prepares the run folder, builds the trainer on its device and resumes it when asked;
    /// also returns the initial student weights (the k-NN baseline).
    fn open(options: TrainOptions) -> Result<(Self, Vec<f32>)> {
        let started = Instant::now();
        let TrainOptions {
            config: r,
            outdir,
            allow_config_change,
            observer,
            cancel,
        } = options;
        let run = RunDir::prepare(&r.output_dir, outdir)?;
        let outdir = run.mode;
        let mut log = RunLog::open(&run.log_path())?;
        // Errors from here on are also written to train.log.
        let logged = |log: &mut RunLog, e: Error| -> Error {
            let _ = log.line(&format!("error: {e}"));
            e
        };
        match Self::build(r, run, &mut log, outdir, allow_config_change) {
            Ok(parts) => Ok(Self::assemble(
                parts, log, observer, cancel, started, outdir,
            )),
            Err(e) => Err(logged(&mut log, e)),
        }
    }

    /// The fallible part of [`Session::open`] after the folder is locked and the log open.
    fn build(
        r: ResolvedConfig,
        run: RunDir,
        log: &mut RunLog,
        outdir: OutdirMode,
        allow_config_change: bool,
    ) -> Result<Parts> {
        let plan = plan_from_config(&r)?;
        super::resources::check(&plan, r.config.dinotrain.workers)?;
        for w in &r.warnings {
            if w.is_warning() {
                log.line(&format!("warning: {w}"))?;
                log::warn!("{w}");
            } else {
                log.line(&w.to_string())?;
                log::debug!("{w}");
            }
        }
        let identity = r.resume_identity()?;
        let source = training_source(&r)?;
        let knn = knn_sources(&r)?;
        // The device is resolved once: `auto` falls back to the CPU with one line saying why.
        let device = resolve_device(r.device)?;
        let model = SslModel::new(&plan.vit, plan.dino_head, plan.ibot_head)?;
        let initial = initial_student(&model, plan.seed, &r.start)?;
        let mut trainer = Trainer::from_parts_on(plan, model, initial.clone(), device)?;
        log.line(&format!("device: {}", trainer.device_name()))?;
        if outdir == OutdirMode::Resume {
            resume(&run, &mut trainer, &identity, allow_config_change, log)?;
        }
        // Written once the resume is accepted: a refused one leaves the run's own config.
        r.write_yaml(&run.root)?;
        let first_step = trainer.step();
        let backbone: usize = (trainer.model.table.specs().iter())
            .filter(|s| s.submodule() == "backbone")
            .map(|s| s.at.len)
            .sum();
        log.line(&format!(
            "{} images; model {} parameters ({backbone} backbone); {} steps from step {first_step}; batch {}{}; lr {:.3e}",
            source.len(),
            trainer.model.table.len(),
            r.total_iters,
            trainer.plan.images_per_step(),
            match trainer.plan.accumulate {
                1 => String::new(),
                n => format!(" ({n} micro-batches of {})", trainer.plan.batch_size),
            },
            r.lr
        ))?;
        Ok(Parts {
            r,
            run,
            identity,
            trainer,
            source,
            knn,
            initial,
        })
    }

    fn assemble(
        parts: Parts,
        log: RunLog,
        observer: Option<Box<dyn TrainObserver + Send>>,
        cancel: Option<CancelHandle>,
        started: Instant,
        outdir: OutdirMode,
    ) -> (Self, Vec<f32>) {
        let Parts {
            r,
            run,
            identity,
            trainer,
            source,
            knn,
            initial,
        } = parts;
        let first_step = trainer.step();
        let session = Session {
            run,
            log,
            identity,
            trainer,
            source,
            knn,
            observer: observer.unwrap_or_else(|| Box::new(LogMessages)),
            cancel,
            times: LoopTimes {
                started,
                train_seconds: 0.0,
                wait_seconds: 0.0,
            },
            resuming: outdir == OutdirMode::Resume,
            first_step,
            records: Vec::new(),
            end: RunEnd::default(),
            health: HealthMonitor::new(r.config.dino.head_n_prototypes, r.total_iters),
            initial_knn: None,
            r,
        };
        (session, initial)
    }

    /// k-NN top-1 (%) of `weights` on the run's labelled sources (`None` without them).
    fn knn_of(&mut self, weights: EvalWeights<'_>, probe: bool) -> Result<Option<KnnEval>> {
        let d = &self.r.config.dinotrain;
        let (k, temperature) = (d.knn_k, d.knn_temperature as f32);
        match &self.knn {
            Some(sources) => {
                knn_accuracy(&mut self.trainer, weights, sources, k, temperature, probe).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The health of step `m.step`: the teacher-entropy check and, when `evaluate`, k-NN of the
    /// teacher and the spread of its features. Results and findings go into `m` (written after)
    /// and the findings are reported.
    fn judge_step(&mut self, m: &mut StepMetrics, entropy: f64, evaluate: bool) -> Result<()> {
        let mut findings: Vec<Finding> = self.health.on_step(m.step, entropy).into_iter().collect();
        // The teacher is read where it lives: no download of the whole state.
        if let Some(eval) = evaluate.then(|| self.knn_of(EvalWeights::Teacher, false)) {
            if let Some(eval) = eval? {
                let k = self.r.config.dinotrain.knn_k;
                let line = format!("step {}: k-NN top-1 (k={k}) {:.2}%", m.step + 1, eval.top1);
                self.observer.on_knn(m.step + 1, k, eval.top1);
                self.observer.on_message(&line);
                self.log.line(&line)?;
                m.extra.insert("knn_top1".into(), eval.top1);
                m.extra
                    .insert("cls_relative_std".into(), eval.spread.relative_std);
                m.extra
                    .insert("cls_effective_dims".into(), eval.spread.effective_dims);
                findings.extend(self.judge_eval(eval));
            }
        }
        for f in &findings {
            self.warn(f)?;
        }
        m.warnings = (findings.iter())
            .map(|f| HealthWarning {
                kind: f.kind().into(),
                message: f.to_string(),
            })
            .collect();
        Ok(())
    }

    /// The health findings of an evaluation of the trained teacher.
    fn judge_eval(&mut self, eval: KnnEval) -> Vec<Finding> {
        let mut findings: Vec<Finding> = self.health.on_features(eval.spread).into_iter().collect();
        // From pretrained weights a flat k-NN is not a failure to learn from scratch.
        if let (Some(initial), StartingPoint::Random) = (self.initial_knn, &self.r.start) {
            findings.extend(self.health.on_knn(initial, eval.top1));
        }
        findings
    }

    /// Reports a health finding: train.log, the library's log and the observer.
    fn warn(&mut self, finding: &Finding) -> Result<()> {
        let line = format!("warning: {finding}");
        log::warn!("{finding}");
        self.observer.on_message(&line);
        self.log.line(&line)
    }

    /// Writes a checkpoint, prunes the old ones and tells the observer.
    fn checkpoint(&mut self) -> Result<()> {
        let n_images = self.source.len() as u64;
        let path = save_checkpoint(&self.run, &mut self.trainer, &self.identity, n_images)?;
        let keep = self.r.config.dinotrain.keep_checkpoints.max(1);
        checkpoint::prune(&self.run.checkpoints(), keep)?;
        self.observer.on_checkpoint(&path, self.trainer.step());
        self.end.checkpoint = Some(path);
        self.end.saved_at = Some(self.trainer.step());
        Ok(())
    }

    /// Runs the steps up to the end of the run, or until a stop (recorded in `self.end`).
    fn steps(&mut self) -> Result<()> {
        let (r, plan) = (&self.r, &self.trainer.plan);
        let loader_cfg = LoaderConfig {
            crops: crops_from_config(r),
            workers: match r.config.dinotrain.workers {
                0 => LoaderConfig::default().workers,
                n => n,
            },
            ..LoaderConfig::default()
        };
        let first_step = self.first_step;
        // The loader counts micro-batches: step s takes micro-batches s·n .. (s + 1)·n.
        let accumulate = plan.accumulate;
        let mut loader = Loader::new(
            Arc::clone(&self.source),
            loader_cfg,
            plan.batch_size,
            plan.seed,
            first_step * accumulate as u64,
        )?;
        let mut metrics = MetricsWriter::open(&self.run.metrics_path(), Some(first_step))?;
        let mut events = EventWriter::create(&self.run.root.join(TENSORBOARD_DIR))?;
        if self.resuming {
            self.records = super::metrics::read(&self.run.metrics_path())?;
        }
        self.records.retain(|m| m.step < first_step);
        let every = |n: u64, step: u64| n > 0 && (step + 1) % n == 0;
        let (total, checkpoint_every) = (self.r.total_iters, self.r.checkpoint_every);
        let d = self.r.config.dinotrain.clone();
        let loop_start = Instant::now();
        while self.trainer.step() < total {
            let step_start = Instant::now();
            let waited_before = loader.wait_seconds();
            let batches = (0..accumulate)
                .map(|_| loader.next_batch())
                .collect::<Result<Vec<_>>>()?;
            let crops: Vec<(&[f32], &[f32])> = (batches.iter())
                .map(|b| (&b.global[..], &b.local[..]))
                .collect();
            let record = match self.trainer.train_micro_batches(&crops) {
                Ok(record) => record,
                Err(e @ (Error::NonFinite { .. } | Error::Numeric { .. })) => {
                    self.observer.on_loop_end();
                    return Err(self.diverged(e));
                }
                Err(e) => return Err(e),
            };
            let epoch = batches.last().map_or(0, |b| b.epoch);
            for batch in batches {
                loader.recycle(batch);
            }
            let step_seconds = step_start.elapsed().as_secs_f64();
            let waited = loader.wait_seconds() - waited_before;
            self.times.train_seconds += step_seconds;
            self.times.wait_seconds += waited;
            let mut m = metrics_of(
                &record,
                epoch,
                self.trainer.plan.images_per_step() as f64 / step_seconds.max(1e-9),
                waited / step_seconds.max(1e-9),
                loop_start.elapsed().as_secs_f64(),
            );
            let step = record.step;
            let more = self.trainer.step() < total;
            let cancelled = self.cancel.as_ref().is_some_and(CancelHandle::is_cancelled);
            let evaluate = every(d.knn_every, step) && more && !cancelled;
            self.judge_step(&mut m, record.losses.teacher_entropy as f64, evaluate)?;
            metrics.write(&m)?;
            events.write(&m)?;
            let control = self.observer.on_step(&m);
            self.records.push(m);
            if every(checkpoint_every, step) && more {
                self.checkpoint()?;
            }
            if every(d.plot_every, step) {
                plot::write_png(&self.records, "dinotrain", &self.run.plot_path())?;
            }
            let cancelled = self.cancel.as_ref().is_some_and(CancelHandle::is_cancelled);
            self.end.stopped = match (control, cancelled) {
                _ if !more => None,
                (Control::Stop, _) => Some(StopReason::Observer),
                (_, true) => Some(StopReason::Cancelled),
                _ if d.stop_after == Some(self.trainer.step() - first_step) => {
                    Some(StopReason::StopAfter)
                }
                _ => None,
            };
            if self.end.stopped.is_some() {
                break;
            }
        }
        self.observer.on_loop_end();
        self.end.bad_images = loader.bad_images();
        Ok(())
    }

    /// The error a step that met a non-finite value ends the run with: the step, the cause,
    /// where the last good state is, and what to try.
    fn diverged(&self, e: Error) -> Error {
        let step = self.trainer.step() + 1;
        let cause = match &e {
            Error::NonFinite { what, .. } => format!("the {what} is not finite"),
            other => format!("a non-finite value in the step ({other})"),
        };
        let kept = match self.run.latest_checkpoint() {
            Ok(Some(p)) => format!("the last good checkpoint {} is kept", p.display()),
            _ => "no checkpoint was written yet".into(),
        };
        let start = match &self.r.start {
            StartingPoint::Weights(crate::io::pretrained::WeightsSource::File { path, .. }) => {
                format!(", or check the starting weights {}", path.display())
            }
            StartingPoint::Weights(crate::io::pretrained::WeightsSource::Pretrained(m)) => {
                format!(", or check the starting weights ({m})")
            }
            _ => String::new(),
        };
        Error::Diverged {
            step,
            cause,
            hint: format!(
                "{kept}; lower optim.base_lr, lengthen the warm-up (optim.warmup_epochs) or \
                 clip harder (optim.clip_grad){start}, then start again or --resume"
            ),
        }
    }

    /// After the steps: a last checkpoint, the plots, the exported teacher and, for a run that
    /// reached its end, k-NN of the trained teacher next to `initial_knn`.
    fn finish(&mut self, initial_knn: Option<f64>) -> Result<()> {
        let step = self.trainer.step();
        match self.end.stopped {
            Some(StopReason::StopAfter) => {
                let n = step - self.first_step;
                let line =
                    format!("stopped after {n} steps (dinotrain.stop_after), at step {step}");
                self.log.line(&line)?;
                return Ok(());
            }
            Some(reason) => self
                .log
                .line(&format!("stopped at step {step} ({reason})"))?,
            None => {}
        }
        // A stop right after a periodic checkpoint needs no second one.
        if self.end.saved_at != Some(step) {
            self.checkpoint()?;
        }
        if !self.records.is_empty() {
            plot::write_png(&self.records, "dinotrain", &self.run.plot_path())?;
        }
        export_teacher(&self.run, &mut self.trainer, &mut self.log)?;
        if let (Some(initial_top1), None) = (initial_knn, self.end.stopped) {
            if let Some(trained) = self.knn_of(EvalWeights::Teacher, true)? {
                self.final_knn(initial_top1, trained)?;
                for f in self.judge_eval(trained) {
                    self.warn(&f)?;
                }
            }
        }
        let bad = self.end.bad_images;
        if bad > 0 {
            let line = format!("{bad} unreadable images were replaced during training");
            self.log.line(&line)?;
        }
        Ok(())
    }

    /// Reports and records k-NN of the trained teacher.
    fn final_knn(&mut self, initial_top1: f64, eval: KnnEval) -> Result<()> {
        let trained = eval.top1;
        let Some((train, test)) = &self.knn else {
            return Ok(());
        };
        let k = self.r.config.dinotrain.knn_k;
        let step = self.trainer.step();
        self.observer.on_knn(step, k, trained);
        let report = KnnReport {
            k,
            initial_top1,
            trained_top1: trained,
            n_train: train.len(),
            n_test: test.len(),
            probe_top1: eval.probe.map(|p| p.test_top1),
        };
        self.log.line(&format!(
            "k-NN top-1 (k={k}): trained teacher {trained:.2}%, at initialisation {initial_top1:.2}%"
        ))?;
        if let Some(p) = eval.probe {
            self.log.line(&format!(
                "linear probe top-1: trained teacher {:.2}% (training images {:.2}%)",
                p.test_top1, p.train_top1
            ))?;
        }
        let json = serde_json::json!({
            "k": k, "trained_top1": trained, "initial_top1": initial_top1,
            "n_train": report.n_train, "n_test": report.n_test, "step": step,
            "cls_relative_std": eval.spread.relative_std,
            "cls_effective_dims": eval.spread.effective_dims,
            "probe_top1": eval.probe.map(|p| p.test_top1),
            "probe_train_top1": eval.probe.map(|p| p.train_top1),
        });
        crate::io::write_atomic(&self.run.knn_path(), json.to_string().as_bytes())?;
        self.end.knn = Some(report);
        Ok(())
    }

    fn summary(self) -> TrainSummary {
        let trainer = &self.trainer;
        let t = &self.times;
        let steps_this_run = trainer.step() - self.first_step;
        let images = steps_this_run as f64 * trainer.plan.images_per_step() as f64;
        TrainSummary {
            output_dir: self.run.root.clone(),
            steps: trainer.step(),
            steps_this_run,
            last: self.records.last().cloned(),
            knn: self.end.knn,
            checkpoint: self.end.checkpoint,
            export: self.run.export_path(),
            stopped: self.end.stopped,
            wall_seconds: t.started.elapsed().as_secs_f64(),
            images_per_s: images / t.train_seconds.max(1e-9),
            data_wait_share: t.wait_seconds / t.train_seconds.max(1e-9),
            gemms: trainer.gemm_stats(),
        }
    }
}

/// Exports the teacher backbone with official keys.
fn export_teacher(run: &RunDir, trainer: &mut Trainer, log: &mut RunLog) -> Result<()> {
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
    ))
}

/// Trains as configured: see the module documentation. An observer in `options` sees every
/// step and may stop the run; so may its cancel handle. A stopped run writes a checkpoint and
/// the teacher backbone, skips the final k-NN, and says why in [`TrainSummary::stopped`].
///
/// ```
/// use dinotrain::train::{train, Preset, Recipe, TrainConfig, TrainOptions};
///
/// let out = std::env::temp_dir().join(format!("dinotrain-doc-{}", std::process::id()));
/// let config = TrainConfig::preset(Preset::Demo) // the demo model on the embedded images
///     .recipe(Recipe::Small)? // the no-argument run's recipe
///     .steps(2)
///     .batch_size(8)
///     .output_dir(&out)
///     .knn(false); // skip k-NN to keep the example fast
/// let summary = train(TrainOptions::new(config.resolve()?))?;
/// assert_eq!(summary.steps, 2);
/// assert!(summary.export.exists());
/// # std::fs::remove_dir_all(&out).ok();
/// # Ok::<(), dinotrain::Error>(())
/// ```
pub fn train(options: TrainOptions) -> Result<TrainSummary> {
    let (mut s, initial) = Session::open(options)?;
    match run_session(&mut s, initial) {
        Ok(()) => Ok(s.summary()),
        Err(e) => {
            // Also in train.log (best effort: the error may be that the disk is full).
            let _ = s.log.line(&format!("error: {e}"));
            Err(e)
        }
    }
}

/// The steps and the end of an opened session.
fn run_session(s: &mut Session, initial: Vec<f32>) -> Result<()> {
    let total = s.r.total_iters;
    s.observer.on_start(&RunStart {
        first_step: s.first_step,
        total_steps: total,
        batch_size: s.trainer.plan.images_per_step(),
        device: s.trainer.device_name(),
    });
    let device = s.trainer.device_name();
    s.observer.on_message(&format!("training on {device}"));
    let initial_knn = if s.knn.is_some() && (s.first_step < total || !s.resuming) {
        s.observer
            .on_message("k-NN of the model at initialisation ...");
        let acc = s
            .knn_of(EvalWeights::Host(&initial), false)?
            .map(|e| e.top1);
        if let Some(acc) = acc {
            let k = s.r.config.dinotrain.knn_k;
            s.observer.on_knn(0, k, acc);
            s.log
                .line(&format!("k-NN top-1 (k={k}) at initialisation: {acc:.2}%"))?;
        }
        acc
    } else {
        None
    };
    drop(initial);
    s.initial_knn = initial_knn;
    s.steps()?;
    s.finish(initial_knn)
}

/// The k-NN accuracy summary line for people.
pub fn knn_line(r: &KnnReport) -> String {
    let probe = r
        .probe_top1
        .map(|p| format!("; linear probe {p:.2}%"))
        .unwrap_or_default();
    format!(
        "k-NN top-1 (k={}, {} train / {} test images): trained teacher {:.2}%, same model at initialisation {:.2}%{probe}",
        r.k, r.n_train, r.n_test, r.trained_top1, r.initial_top1
    )
}
