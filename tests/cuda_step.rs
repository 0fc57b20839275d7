//! The training step on the CUDA backend against the same code on the CPU backend, layer by
//! layer and then whole: the DINO head (forward and backward), each loss with its teacher
//! targets, clipping / AdamW / EMA, the whole `SslStep` on a micro model with the same batch,
//! masks and drop-path draws, and three `Trainer` iterations on CUDA against the CPU. Every GPU
//! test skips with a message without a GPU; the last test (the CPU device of `Trainer::new_on`)
//! runs everywhere.
//!
//! The step, the losses and the optimizer are written once over the `Backend` trait; each
//! comparison runs that code on `CudaBackend` and on `CpuBackend` (f32) with the same inputs.
//! Tolerances are ‖gpu − cpu‖ / ‖cpu‖. Paths in f32 on both sides (losses, targets, optimizer)
//! get 1e-5 .. 1e-4; paths through bf16 GEMM operands (8-bit mantissa, relative rounding
//! 2^-9 per operand) get 1e-2 per GEMM and a few times that after chains of them.

mod cuda_support;
mod trainer_support;

use cuda_support::{assert_close, gpu, randn, to_f64, uniform};
use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::cuda::ResolvedDevice;
use dinotrain::backend::{Accumulate, Backend, Precision, Storage};
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::{DinoHead, HeadCache, HeadScratch, Preset, Prototypes};
use dinotrain::optim::AdamHyper;
use dinotrain::optim::{
    ema_update, AdamW, AdamWState, GradClipper, LayerDecay, ParamGroups, SubmoduleSpan,
};
use dinotrain::rng::{keyed, stream, Rng};
use dinotrain::ssl::step::{
    HeadConfig, LossConfig, SslModel, SslStep, StepBatch, StepInputs, StepOutput, Targets,
    TeacherProbs, TeacherTargets,
};
use dinotrain::ssl::{
    collate_masks, dino_loss_forward_backward, ibot_loss_forward_backward, Centering, DinoPairs,
    DinoStudent, IbotPairs, MaskingGenerator, Method, TargetState,
};
use dinotrain::train::config::Centering as CenteringMode;
use dinotrain::train::trainer::{TrainPlan, Trainer};
use rand::Rng as _;
use trainer_support::{crops, micro_plan};

/// One GEMM with bf16 operands and f32 accumulation.
const BF16_ONE_GEMM: f64 = 1e-2;
/// A gradient after a chain of bf16 GEMMs (head: four layers back; backbone: blocks on top).
const BF16_CHAIN: f64 = 3e-2;
/// f32 on both sides; the GPU's `__expf` and reduction order differ from the CPU's.
const F32: f64 = 1e-5;
/// Teacher and student temperature of the whole-step comparison.
const STEP_TEMP: f32 = 0.2;

/// A buffer of `be` holding `host`.
fn upload<B: Backend>(be: &mut B, host: &[f32]) -> B::BufF32 {
    let mut buf = be.alloc_f32(host.len()).unwrap();
    be.upload_f32(&mut buf, host).unwrap();
    buf
}

fn params_with_random_gains(table: &ParamTable, seed: u64) -> Vec<f32> {
    let mut p = table.init(&mut keyed(seed, &[stream::TEST]));
    // weight_g starts at 1: vary it so its gradient path is exercised. LayerScale starts at
    // 1e-5, which leaves every image's CLS token within ~1e-5 of the others: KoLeo's
    // `-log(nearest distance)` would then compare bf16 noise (a mid-training model has grown
    // gammas; give it those).
    for spec in table
        .specs()
        .iter()
        .filter(|s| s.name.ends_with("weight_g") || s.name.ends_with(".gamma"))
    {
        let g = uniform(seed + 1, spec.at.len, 0.5, 1.5);
        p[spec.at.range()].copy_from_slice(&g);
    }
    p
}

// ---- DINO head -------------------------------------------------------------------------------

/// The head's forward and two backward passes on `be` (the second one accumulating): logits,
/// then (dx, grads) after the first backward and after the second.
struct HeadRun {
    logits: Vec<f32>,
    once: (Vec<f32>, Vec<f32>),
    twice: (Vec<f32>, Vec<f32>),
}

fn head_run<B: Backend>(
    be: &mut B,
    head: &DinoHead,
    params: &[f32],
    x: &[f32],
    d_out: &[f32],
    n: usize,
) -> HeadRun {
    let w = be.weights(params).unwrap();
    let mut protos = Prototypes::new(be, head).unwrap();
    protos.prepare(be, head, &w).unwrap();
    let mut cache = HeadCache::default();
    let x = upload(be, x);
    head.forward(be, &mut cache, &protos, &w, &x, n).unwrap();
    let logits = be.download_f32(&*cache.logits.get().unwrap()).unwrap();
    let d_out = upload(be, d_out);
    let mut grads = be.alloc_f32(params.len()).unwrap();
    let mut dx = be.alloc_f32(n * head.mlp0.in_dim).unwrap();
    let mut scratch = HeadScratch::default();
    let mut backward = |be: &mut B, grads: &mut B::F32, dx: &mut B::F32, write: Accumulate| {
        let saved = (&cache, &protos);
        head.backward(be, &mut scratch, grads, (dx, write), saved, &w, &d_out)
            .unwrap();
        (
            be.download_f32(dx).unwrap(),
            be.download_f32(grads).unwrap(),
        )
    };
    let once = backward(be, &mut grads, &mut dx, Accumulate::Overwrite);
    // A second backward adds: parameter gradients and (Accumulate::Add) the input gradient.
    let twice = backward(be, &mut grads, &mut dx, Accumulate::Add);
    HeadRun {
        logits,
        once,
        twice,
    }
}

#[test]
fn head_forward_and_backward_match_the_cpu_head() {
    let Some(mut gpu) = gpu() else { return };
    let (in_dim, hidden, bn, k, n) = (32, 48, 16, 64, 12);
    let mut table = ParamTable::new();
    let head = DinoHead::new(in_dim, hidden, bn, k, &mut table, "");
    let params = params_with_random_gains(&table, 1);
    let x = randn(2, n * in_dim, 1.0);
    let d_out = randn(3, n * k, 0.1);

    let cpu = head_run(&mut CpuBackend::default(), &head, &params, &x, &d_out, n);
    let run = head_run(&mut gpu, &head, &params, &x, &d_out, n);
    assert_close(
        "head logits",
        &run.logits,
        &to_f64(&cpu.logits),
        BF16_ONE_GEMM,
    );
    let ((dx_gpu, g_gpu), (dx_ref, grads_ref)) = (&run.once, &cpu.once);
    assert_close("head dx", dx_gpu, &to_f64(dx_ref), BF16_CHAIN);
    for spec in table.specs() {
        assert_close(
            &format!("head grad {}", spec.name),
            &g_gpu[spec.at.range()],
            &to_f64(&grads_ref[spec.at.range()]),
            BF16_CHAIN,
        );
    }

    // The second backward added: parameter gradients and the input gradient doubled.
    let twice: Vec<f64> = dx_gpu.iter().map(|&v| 2.0 * v as f64).collect();
    assert_close("head dx accumulated", &run.twice.0, &twice, 1e-6);
    let twice: Vec<f64> = g_gpu.iter().map(|&v| 2.0 * v as f64).collect();
    assert_close("head grads accumulated", &run.twice.1, &twice, 1e-6);
}

// ---- losses and teacher targets ------------------------------------------------------------

/// What a DINO loss run reads back: teacher probs, the terms [global, local], the student
/// gradients (global, local) and the targets' state after.
struct DinoRun {
    probs: Vec<f32>,
    terms: Vec<f32>,
    d_global: Vec<f32>,
    d_local: Vec<f32>,
    centering: Centering,
}

#[allow(clippy::too_many_arguments)]
fn dino_run<B: Backend>(
    be: &mut B,
    centering: &Centering,
    s_global: &[f32],
    s_local: &[f32],
    t_global: &[f32],
    (b, nl, k): (usize, usize, usize),
    (tt, ts): (f32, f32),
    weight: f32,
) -> DinoRun {
    let mut targets = TargetState::new(be, centering).unwrap();
    let t = upload(be, t_global);
    let mut probs = be.alloc_f32(2 * b * k).unwrap();
    targets
        .teacher_probs(be, &mut probs, &t, (2 * b, k), tt)
        .unwrap();
    let mut terms = be.alloc_f32(2).unwrap();
    let mut dg = be.alloc_f32(2 * b * k).unwrap();
    let sg = upload(be, s_global);
    // The local logits and their gradient as windows of larger buffers (the step's workspaces
    // are windows too; without local crops, empty ones).
    let local = nl * b * k;
    let sl_buf = upload(be, &[s_local, &[0.0]].concat());
    let sl = sl_buf.window(0..local).unwrap();
    let mut dl_buf = be.alloc_f32(local + 1).unwrap();
    let mut dl = dl_buf.window_mut(0..local).unwrap();
    let student = DinoStudent::<B> {
        global: &sg,
        local: &sl,
        d_global: &mut dg,
        d_local: &mut dl,
    };
    let mut pairs = DinoPairs::default();
    dino_loss_forward_backward(
        be,
        &mut pairs,
        &mut terms,
        student,
        &probs,
        (b, nl, k),
        ts,
        weight,
    )
    .unwrap();
    DinoRun {
        probs: be.download_f32(&probs).unwrap(),
        terms: be.download_f32(&terms).unwrap(),
        d_global: be.download_f32(&dg).unwrap(),
        d_local: be.download_f32(&dl).unwrap(),
        centering: targets.to_host(be).unwrap(),
    }
}

#[test]
fn dino_loss_and_targets_match_the_cpu_loss() {
    let Some(mut gpu) = gpu() else { return };
    let (b, k, tt, ts, weight) = (3usize, 50usize, 0.07f32, 0.1f32, 0.7f32);
    for (case, nl, centering) in [
        ("softmax, no local crops", 0usize, Centering::softmax(k)),
        ("softmax, 2 local crops", 2, Centering::softmax(k)),
        ("sinkhorn, 2 local crops", 2, Centering::sinkhorn_knopp()),
    ] {
        let centering = match centering {
            Centering::Softmax { momentum, .. } => Centering::Softmax {
                center: randn(10, k, 0.5),
                momentum,
            },
            c => c,
        };
        let s_global = randn(11, 2 * b * k, 2.0);
        let s_local = randn(12, nl * b * k, 2.0);
        // Head logits are cosines times g ~ 1: |t| <~ 1 keeps exp(t / tt) inside f32 range.
        let t_global = randn(13, 2 * b * k, 0.5);
        let dims = (b, nl, k);
        let r = dino_run(
            &mut CpuBackend::default(),
            &centering,
            &s_global,
            &s_local,
            &t_global,
            dims,
            (tt, ts),
            weight,
        );
        let g = dino_run(
            &mut gpu,
            &centering,
            &s_global,
            &s_local,
            &t_global,
            dims,
            (tt, ts),
            weight,
        );
        let bound = if case.starts_with("sinkhorn") {
            1e-4
        } else {
            F32
        };
        assert_close(
            &format!("{case}: teacher probs"),
            &g.probs,
            &to_f64(&r.probs),
            bound,
        );
        assert_close(
            &format!("{case}: global term"),
            &g.terms[..1],
            &to_f64(&r.terms[..1]),
            bound,
        );
        if nl > 0 {
            assert_close(
                &format!("{case}: local term"),
                &g.terms[1..],
                &to_f64(&r.terms[1..]),
                bound,
            );
            assert_close(
                &format!("{case}: d local"),
                &g.d_local,
                &to_f64(&r.d_local),
                bound,
            );
        }
        assert_close(
            &format!("{case}: d global"),
            &g.d_global,
            &to_f64(&r.d_global),
            bound,
        );
        if let (Some(c), Some(rc)) = (g.centering.center(), r.centering.center()) {
            assert_close(&format!("{case}: center"), c, &to_f64(rc), 1e-6);
        }
    }
}

/// What an iBOT loss run reads back: teacher probs, the loss, the student gradient and the
/// targets' state after.
#[allow(clippy::too_many_arguments)]
fn ibot_run<B: Backend>(
    be: &mut B,
    centering: &Centering,
    (s, t): (&[f32], &[f32]),
    masks_weight: &[f32],
    (n_crops, capacity): (usize, usize),
    (m, k): (usize, usize),
    (tt, ts): (f32, f32),
    weight: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Centering) {
    let mut targets = TargetState::new(be, centering).unwrap();
    let (t, s) = (upload(be, t), upload(be, s));
    let mut probs = be.alloc_f32(m * k).unwrap();
    targets
        .teacher_probs(be, &mut probs, &t, (m, k), tt)
        .unwrap();
    let mut pairs = IbotPairs::default();
    pairs.set(be, masks_weight, n_crops, capacity).unwrap();
    let mut loss = be.alloc_f32(1).unwrap();
    let mut ds = be.alloc_f32(m * k).unwrap();
    ibot_loss_forward_backward(be, &pairs, &mut loss, &mut ds, &s, &probs, k, (ts, weight))
        .unwrap();
    (
        be.download_f32(&probs).unwrap(),
        be.download_f32(&loss).unwrap(),
        be.download_f32(&ds).unwrap(),
        targets.to_host(be).unwrap(),
    )
}

#[test]
fn ibot_loss_and_targets_match_the_cpu_loss() {
    let Some(mut gpu) = gpu() else { return };
    let (m, k, n_crops, tt, ts, weight) = (7usize, 40usize, 4usize, 0.06f32, 0.1f32, 1.3f32);
    let s = randn(21, m * k, 2.0);
    let t = randn(22, m * k, 0.5);
    let masks_weight = uniform(23, m, 0.1, 1.0);
    let centering = Centering::Softmax {
        center: randn(24, k, 0.3),
        momentum: 0.9,
    };
    let dims = (m, k);
    let temps = (tt, ts);
    let cpu = &mut CpuBackend::default();
    let (probs_ref, loss_ref, ds_ref, center_ref) = ibot_run(
        cpu,
        &centering,
        (&s, &t),
        &masks_weight,
        (n_crops, 0),
        dims,
        temps,
        weight,
    );
    // A capacity above M, as the step reserves the masks' upper bound.
    let (probs, loss, ds, center) = ibot_run(
        &mut gpu,
        &centering,
        (&s, &t),
        &masks_weight,
        (n_crops, 3 * m),
        dims,
        temps,
        weight,
    );
    assert_close("ibot probs", &probs, &to_f64(&probs_ref), F32);
    assert_close("ibot loss", &loss, &to_f64(&loss_ref), F32);
    assert_close("ibot dstudent", &ds, &to_f64(&ds_ref), F32);
    assert_close(
        "ibot center",
        center.center().unwrap(),
        &to_f64(center_ref.center().unwrap()),
        1e-6,
    );
}

// ---- clipping, AdamW, EMA --------------------------------------------------------------------

fn micro_model(separate_ibot: bool) -> SslModel {
    let vit = Preset::Micro.config(16, 4, 1);
    let head = HeadConfig {
        hidden_dim: 24,
        bottleneck_dim: 8,
        n_prototypes: 16,
    };
    let ibot = separate_ibot.then_some(HeadConfig {
        hidden_dim: 20,
        bottleneck_dim: 8,
        n_prototypes: 12,
    });
    SslModel::new(&vit, head, ibot).unwrap()
}

/// Clipping, AdamW and the EMA teacher on one backend, with the parameters on it.
struct Optimizer<B: Backend> {
    be: B,
    clipper: GradClipper<B>,
    adamw: AdamW<B>,
    params: B::BufF32,
    teacher: B::BufF32,
}

impl<B: Backend> Optimizer<B> {
    fn new(mut be: B, model: &SslModel, params: &[f32], teacher: &[f32]) -> Self {
        let table = &model.table;
        let groups =
            ParamGroups::from_table(table, &LayerDecay::official(model.backbone.cfg.depth))
                .unwrap();
        let spans = SubmoduleSpan::from_table(table);
        let zeros = AdamWState::zeros(table.len());
        let adamw = AdamW::new(&mut be, table, &groups, AdamHyper::default(), &zeros).unwrap();
        Optimizer {
            clipper: GradClipper::new(&mut be, &spans).unwrap(),
            adamw,
            params: upload(&mut be, params),
            teacher: upload(&mut be, teacher),
            be,
        }
    }

    /// Clips `grads`, steps AdamW and the EMA: returns the norms before clipping and the
    /// clipped gradients.
    fn step(&mut self, grads: &[f32], lrs: (f64, f64, f64), momentum: f64) -> (Vec<f32>, Vec<f32>) {
        let be = &mut self.be;
        let mut g = upload(be, grads);
        self.clipper.clip(be, &mut g, 3.0).unwrap();
        self.adamw.step(be, &mut self.params, &g, lrs).unwrap();
        ema_update(be, &mut self.teacher, &self.params, momentum).unwrap();
        (
            be.download_f32(self.clipper.norms()).unwrap(),
            be.download_f32(&g).unwrap(),
        )
    }

    /// Parameters, AdamW's state and the teacher.
    fn read(&mut self) -> (Vec<f32>, AdamWState, Vec<f32>) {
        let be = &mut self.be;
        (
            be.download_f32(&self.params).unwrap(),
            self.adamw.state(be).unwrap(),
            be.download_f32(&self.teacher).unwrap(),
        )
    }
}

#[test]
fn clipping_adamw_and_ema_match_the_cpu_optimizer() {
    let Some(gpu) = gpu() else { return };
    let model = micro_model(true);
    let table = &model.table;
    let p = table.len();
    let params = table.init(&mut keyed(5, &[stream::TEST]));
    let teacher: Vec<f32> = params.iter().map(|v| v * 0.9).collect();
    let mut cpu = Optimizer::new(CpuBackend::default(), &model, &params, &teacher);
    let mut cuda = Optimizer::new(gpu, &model, &params, &teacher);
    for step in 1..=3u64 {
        // Step 1 has the last layer frozen (lr 0: its moments still move).
        let lrs = (1e-3, if step == 1 { 0.0 } else { 2e-3 }, 0.04);
        let mut grads = randn(30 + step, p, 0.5);
        grads[..10].iter_mut().for_each(|g| *g *= 100.0); // backbone norm above clip_grad
        let (norms_ref, clipped_ref) = cpu.step(&grads, lrs, 0.99);
        let (norms, clipped) = cuda.step(&grads, lrs, 0.99);
        assert_close(
            &format!("step {step}: norms"),
            &norms,
            &to_f64(&norms_ref),
            F32,
        );
        assert_close(
            &format!("step {step}: clipped grads"),
            &clipped,
            &to_f64(&clipped_ref),
            F32,
        );
        let (params_ref, state_ref, teacher_ref) = cpu.read();
        let (params_gpu, state, teacher_gpu) = cuda.read();
        assert_eq!(state.step, step);
        assert_eq!(state_ref.step, step);
        assert_close(
            &format!("step {step}: params"),
            &params_gpu,
            &to_f64(&params_ref),
            1e-6,
        );
        assert_close(
            &format!("step {step}: exp_avg"),
            &state.exp_avg,
            &to_f64(&state_ref.exp_avg),
            1e-6,
        );
        assert_close(
            &format!("step {step}: exp_avg_sq"),
            &state.exp_avg_sq,
            &to_f64(&state_ref.exp_avg_sq),
            1e-6,
        );
        assert_close(
            &format!("step {step}: teacher"),
            &teacher_gpu,
            &to_f64(&teacher_ref),
            1e-6,
        );
    }
    // The frozen step left the last layer's moments moving (lr 0 only stops the update).
    let v = table.get("dino_head.last_layer.weight_v").unwrap().at;
    let state_ref = cpu.read().1;
    assert_ne!(state_ref.exp_avg[v.range()], vec![0.0; v.len][..]);
}

// ---- the whole step --------------------------------------------------------------------------

struct StepCase {
    name: &'static str,
    method: Method,
    separate_ibot: bool,
    centering: CenteringMode,
    drop_path: f32,
}

/// One whole step on `be`: the output (teacher targets downloaded), the student gradients and
/// the teacher-target state after. `rng` draws the student's drop-path subsets.
#[allow(clippy::too_many_arguments)]
fn step_run<B: Backend>(
    be: &mut B,
    model: &SslModel,
    (student, teacher): (&[f32], &[f32]),
    batch: &StepBatch<'_>,
    targets: &TeacherTargets,
    losses: &LossConfig,
    drop_path: Option<(f32, &mut Rng)>,
) -> (StepOutput, Vec<f32>, TeacherTargets) {
    let s_w = be.weights(student).unwrap();
    let t_w = be.weights(teacher).unwrap();
    let mut targets = Targets::new(be, targets).unwrap();
    let mut grads = be.alloc_f32(model.table.len()).unwrap();
    let mut step = SslStep::new(be, model).unwrap();
    let inputs = StepInputs {
        model,
        student: &s_w,
        teacher: &t_w,
        batches: std::slice::from_ref(batch),
        teacher_temp: STEP_TEMP,
        losses,
        drop_path,
        dist: None,
    };
    let out = step
        .forward_backward(be, inputs, &mut grads, &mut targets, TeacherProbs::Download)
        .unwrap();
    (
        out,
        be.download_f32(&grads).unwrap(),
        targets.to_host(be).unwrap(),
    )
}

#[test]
fn whole_gpu_step_matches_the_cpu_step() {
    let Some(mut gpu) = gpu() else { return };
    let cases = [
        StepCase {
            name: "dinov2, separate iBOT head, softmax centering, drop path",
            method: Method::Dinov2,
            separate_ibot: true,
            centering: CenteringMode::Softmax,
            drop_path: 0.25,
        },
        StepCase {
            name: "ibot, shared head, Sinkhorn-Knopp",
            method: Method::Ibot,
            separate_ibot: false,
            centering: CenteringMode::SinkhornKnopp,
            drop_path: 0.0,
        },
        StepCase {
            name: "dino",
            method: Method::Dino,
            separate_ibot: false,
            centering: CenteringMode::Softmax,
            drop_path: 0.0,
        },
    ];
    for case in cases {
        let model = micro_model(case.separate_ibot);
        let (b, nl, g_size, l_size) = (4, 2, 16, 8);
        let student = params_with_random_gains(&model.table, 40);
        let teacher: Vec<f32> = student
            .iter()
            .zip(randn(41, student.len(), 0.01))
            .map(|(s, e)| s + e)
            .collect();
        let global = randn(42, 2 * b * 3 * g_size * g_size, 1.0);
        let local = randn(43, nl * b * 3 * l_size * l_size, 1.0);
        let masks = collate_masks(
            &mut keyed(44, &[stream::MASKS]),
            &MaskingGenerator::official(g_size, 4).unwrap(),
            2 * b,
            0.5,
            (0.1, 0.5),
        )
        .unwrap();
        let batch = StepBatch {
            global: &global,
            local: &local,
            n_img: b,
            n_local: nl,
            global_size: g_size,
            local_size: l_size,
            masks: case.method.uses_ibot().then_some(&masks),
            drop_path: None,
        };
        let k = model.dino_head.out_dim;
        let ki = model.patch_head().out_dim;
        let centering = |k: usize| match case.centering {
            CenteringMode::Softmax => Centering::Softmax {
                center: randn(45 + k as u64, k, 0.2),
                momentum: 0.9,
            },
            CenteringMode::SinkhornKnopp => Centering::sinkhorn_knopp(),
        };
        let targets = TeacherTargets {
            dino: centering(k),
            ibot: centering(ki),
        };
        // Temperatures 0.2, not the official 0.04-0.1: 1/T multiplies the bf16 logit error
        // (~3e-3 absolute) into the softmaxes; the official ones are the golden ssl_step's.
        let losses = LossConfig {
            student_temp: STEP_TEMP,
            ..LossConfig::official(case.method)
        };
        let weights = (&student[..], &teacher[..]);

        let mut rng_cpu = keyed(46, &[stream::DROP_PATH]);
        let drop = (case.drop_path > 0.0).then_some((case.drop_path, &mut rng_cpu));
        let cpu = &mut CpuBackend::default();
        let (out_ref, grads_ref, targets_ref) =
            step_run(cpu, &model, weights, &batch, &targets, &losses, drop);
        let mut rng_gpu = keyed(46, &[stream::DROP_PATH]);
        let drop = (case.drop_path > 0.0).then_some((case.drop_path, &mut rng_gpu));
        let (out, g, targets_gpu) =
            step_run(&mut gpu, &model, weights, &batch, &targets, &losses, drop);
        // The same number of draws on both sides: the generators end in the same state.
        assert_eq!(
            rng_cpu.random::<u64>(),
            rng_gpu.random::<u64>(),
            "{}: drop-path draws differ",
            case.name
        );

        // Loss terms: logits carry bf16 GEMM error, the cross-entropies average it.
        for ((name, v), (_, r)) in out.terms().into_iter().zip(out_ref.terms()) {
            assert_close(
                &format!("{}: {name}", case.name),
                &[v],
                &[r as f64],
                BF16_ONE_GEMM,
            );
        }
        assert_close(
            &format!("{}: teacher entropy", case.name),
            &[out.teacher_entropy],
            &[out_ref.teacher_entropy as f64],
            BF16_ONE_GEMM,
        );
        assert_close(
            &format!("{}: teacher DINO probs", case.name),
            &out.teacher_dino_probs,
            &to_f64(&out_ref.teacher_dino_probs),
            BF16_CHAIN,
        );
        assert_eq!(
            out.teacher_ibot_probs.len(),
            out_ref.teacher_ibot_probs.len()
        );
        if !out_ref.teacher_ibot_probs.is_empty() {
            assert_close(
                &format!("{}: teacher iBOT probs", case.name),
                &out.teacher_ibot_probs,
                &to_f64(&out_ref.teacher_ibot_probs),
                BF16_CHAIN,
            );
        }
        if let (Some(c), Some(r)) = (targets_gpu.dino.center(), targets_ref.dino.center()) {
            assert_close(
                &format!("{}: DINO center", case.name),
                c,
                &to_f64(r),
                BF16_ONE_GEMM,
            );
        }

        // Every gradient: the whole vector, then each tensor (a tensor whose gradient is zero
        // on the CPU must be zero on the GPU too).
        assert_close(
            &format!("{}: all gradients", case.name),
            &g,
            &to_f64(&grads_ref),
            BF16_CHAIN,
        );
        for spec in model.table.specs() {
            let r = &grads_ref[spec.at.range()];
            if r.iter().all(|&v| v == 0.0) {
                assert!(
                    g[spec.at.range()].iter().all(|&v| v == 0.0),
                    "{}: {} should have no gradient",
                    case.name,
                    spec.name
                );
                continue;
            }
            // Per tensor: the backbone gradients pass through every block's bf16 GEMMs and
            // the attention kernel, so they get twice the chain bound.
            assert_close(
                &format!("{}: grad {}", case.name, spec.name),
                &g[spec.at.range()],
                &to_f64(r),
                2.0 * BF16_CHAIN,
            );
        }
    }
}

// ---- the trainer -----------------------------------------------------------------------------

#[test]
fn three_trainer_iterations_on_cuda_follow_the_cpu() {
    let Some(gpu) = gpu() else { return };
    // LayerScale 0.1 instead of the official 1e-5: at 1e-5 every image's CLS feature is nearly
    // the same, KoLeo's nearest-neighbour distances are differences of nearly equal numbers, and
    // its 1/distance gradient turns reduction-order noise into the backbone gradient (on an H200
    // the backbone gradient norm differed by 6.4e-2, 3.8e-2 and 1.4e-1 over three steps, with
    // every single-step check passing). The CPU reference runs the CUDA path's precision policy
    // (bf16 GEMM operands; f32 statistics, softmax, losses and state).
    let mut plan = micro_plan(Method::Dinov2);
    plan.vit.layerscale = Some(0.1);
    let cpu_plan = TrainPlan {
        precision: Some(Precision::Bf16),
        ..plan.clone()
    };
    let mut cpu = Trainer::new(cpu_plan).unwrap();
    let mut cuda = Trainer::new_on(plan, ResolvedDevice::Cuda(Box::new(gpu))).unwrap();
    assert!(
        cuda.device_name().starts_with("cuda"),
        "{}",
        cuda.device_name()
    );
    assert_eq!(
        cpu.snapshot().unwrap().student,
        cuda.snapshot().unwrap().student
    );
    let mut allocations = Vec::new();
    for step in 0..3 {
        let (g, l) = crops(&cpu, step);
        let r_cpu = cpu.train_step(&g, &l).unwrap();
        let r_gpu = cuda.train_step(&g, &l).unwrap();
        allocations.push(cuda.device_allocations());
        assert_eq!((r_gpu.step, r_gpu.n_masked), (r_cpu.step, r_cpu.n_masked));
        for ((name, v), (_, r)) in r_gpu.losses.terms().into_iter().zip(r_cpu.losses.terms()) {
            // Official temperatures (teacher 0.04-0.07, student 0.1) multiply the bf16 logit
            // error by 1/T; the losses average it over rows: a few 1e-2.
            assert_close(&format!("step {step}: {name}"), &[v], &[r as f64], 5e-2);
        }
        assert_eq!(r_gpu.grad_norms.len(), r_cpu.grad_norms.len());
        for ((n1, v1), (n2, v2)) in r_gpu.grad_norms.iter().zip(&r_cpu.grad_norms) {
            assert_eq!(n1, n2);
            // Gradients carry that magnified error undiminished.
            assert_close(
                &format!("step {step}: {n1} norm"),
                &[*v1],
                &[*v2 as f64],
                1e-1,
            );
        }
    }
    // The steady state allocates nothing (the step's workspaces grew during the first step).
    assert_eq!(
        allocations[1], allocations[2],
        "allocations per step: {allocations:?}"
    );
    assert!(cuda.peak_device_memory().is_some_and(|b| b > 0));
    let (s_gpu, s_cpu) = (cuda.snapshot().unwrap(), cpu.snapshot().unwrap());
    assert_eq!(s_gpu.optimizer.step, s_cpu.optimizer.step);
    assert_eq!(s_gpu.step, s_cpu.step);
    for (name, a, r) in [
        ("student", &s_gpu.student, &s_cpu.student),
        ("teacher", &s_gpu.teacher, &s_cpu.teacher),
    ] {
        // AdamW moves each parameter by about lr (< 2e-4 here) per step whatever the
        // gradient's size, so parameters (rms ~0.02) agree to ~1e-2 even where bf16 flips the
        // sign of a small gradient.
        assert_close(&format!("after 3 steps: {name}"), a, &to_f64(r), 1e-2);
    }
    let (c_gpu, c_cpu) = (
        s_gpu.targets.dino.center().unwrap(),
        s_cpu.targets.dino.center().unwrap(),
    );
    // The center averages teacher logits (no temperature): bf16 GEMM level.
    assert_close(
        "after 3 steps: DINO center",
        c_gpu,
        &to_f64(c_cpu),
        BF16_CHAIN,
    );

    // A host state reaches the device: a resume-like restore of the CPU's state, then one more
    // step on both.
    cuda.restore(&s_cpu).unwrap();
    assert_eq!(cuda.snapshot().unwrap(), s_cpu);
    let (g, l) = crops(&cpu, 3);
    let r_cpu = cpu.train_step(&g, &l).unwrap();
    let r_gpu = cuda.train_step(&g, &l).unwrap();
    assert_close(
        "after upload: loss",
        &[r_gpu.losses.loss],
        &[r_cpu.losses.loss as f64],
        5e-2,
    );
}

#[test]
fn accumulated_iterations_on_cuda_follow_the_cpu() {
    let Some(gpu) = gpu() else { return };
    // Two micro-batches per step (`--accumulate 2`): the step-wide teacher targets, the grouped
    // iBOT center and the per-micro-batch windows on the device, against the CPU trainer with
    // the CUDA path's precision policy (bounds as in the test above).
    let mut plan = micro_plan(Method::Dinov2);
    plan.vit.layerscale = Some(0.1);
    plan.accumulate = 2;
    let cpu_plan = TrainPlan {
        precision: Some(Precision::Bf16),
        ..plan.clone()
    };
    let mut cpu = Trainer::new(cpu_plan).unwrap();
    let mut cuda = Trainer::new_on(plan, ResolvedDevice::Cuda(Box::new(gpu))).unwrap();
    for step in 0..2 {
        let (g0, l0) = crops(&cpu, 2 * step);
        let (g1, l1) = crops(&cpu, 2 * step + 1);
        let micro = [(&g0[..], &l0[..]), (&g1[..], &l1[..])];
        let r_cpu = cpu.train_micro_batches(&micro).unwrap();
        let r_gpu = cuda.train_micro_batches(&micro).unwrap();
        assert_eq!((r_gpu.step, r_gpu.n_masked), (r_cpu.step, r_cpu.n_masked));
        for ((name, v), (_, r)) in r_gpu.losses.terms().into_iter().zip(r_cpu.losses.terms()) {
            assert_close(&format!("step {step}: {name}"), &[v], &[r as f64], 5e-2);
        }
    }
    let (s_gpu, s_cpu) = (cuda.snapshot().unwrap(), cpu.snapshot().unwrap());
    assert_close(
        "after 2 steps: student",
        &s_gpu.student,
        &to_f64(&s_cpu.student),
        1e-2,
    );
    for (a, r) in [
        (s_gpu.targets.dino.center(), s_cpu.targets.dino.center()),
        (s_gpu.targets.ibot.center(), s_cpu.targets.ibot.center()),
    ] {
        assert_close(
            "after 2 steps: center",
            a.unwrap(),
            &to_f64(r.unwrap()),
            5e-2,
        );
    }
}

#[test]
fn new_on_the_cpu_is_trainer_new() {
    let plan = micro_plan(Method::Dinov2);
    let mut a = Trainer::new(plan.clone()).unwrap();
    let mut b = Trainer::new_on(plan, ResolvedDevice::cpu()).unwrap();
    assert_eq!(a.snapshot().unwrap(), b.snapshot().unwrap());
    assert!(b.device_name().starts_with("cpu"), "{}", b.device_name());
    assert_eq!(b.device_name(), a.device_name());
    assert_eq!(b.peak_device_memory(), None);
    // The CPU has no CUDA counters; its allocations are the same engine's as Trainer::new's.
    assert_eq!((b.gemm_stats(), b.kernel_launches()), (None, None));
    assert_eq!(a.counters(), b.counters());
    // A snapshot restored into the trainer changes nothing.
    let state = b.snapshot().unwrap();
    b.restore(&state).unwrap();
    for step in 0..2 {
        let (g, l) = crops(&a, step);
        let ra = a.train_step(&g, &l).unwrap();
        let rb = b.train_step(&g, &l).unwrap();
        assert_eq!(ra.losses.loss.to_bits(), rb.losses.loss.to_bits());
        assert_eq!(ra.grad_norms, rb.grad_norms);
    }
    let (sa, sb) = (a.snapshot().unwrap(), b.snapshot().unwrap());
    assert_eq!(sa.student, sb.student);
    assert_eq!(sa.teacher, sb.teacher);
    assert_eq!(sa.optimizer, sb.optimizer);
}
