//! The GPU training step against the CPU reference, layer by layer and then whole: the DINO head
//! (forward and backward), each loss with its teacher targets, clipping / AdamW / EMA, the whole
//! `GpuStep` against `ssl::step::forward_backward` on a micro model with the same batch, masks
//! and drop-path draws, and three `Trainer` iterations on CUDA against the CPU. Every GPU test
//! skips with a message without a GPU; the last test (the CPU device of `Trainer::new_on`) runs
//! everywhere.
//!
//! Tolerances are ‖gpu − cpu‖ / ‖cpu‖. Paths in f32 on both sides (losses, targets, optimizer)
//! get 1e-5 .. 1e-4; paths through bf16 GEMM operands (8-bit mantissa, relative rounding
//! 2^-9 per operand) get 1e-2 per GEMM and a few times that after chains of them.

mod cuda_support;
mod trainer_support;

use cuda_support::{assert_close, gpu, randn, to_f64, uniform};
use dinotrain::backend::cpu::optimizer::AdamHyper;
use dinotrain::backend::cpu::Accumulate;
use dinotrain::backend::cuda::model::buffers::Grow;
use dinotrain::backend::cuda::model::head::{GpuHead, HeadCache, HeadScratch};
use dinotrain::backend::cuda::model::losses::{
    dino_loss_forward_backward, ibot_loss_forward_backward, DinoPairs, IbotPairs,
};
use dinotrain::backend::cuda::model::optim::{ema, GpuOptimizer};
use dinotrain::backend::cuda::model::step::{GpuStep, TeacherProbs};
use dinotrain::backend::cuda::model::targets::{GpuCentering, GpuTargets};
use dinotrain::backend::cuda::model::DeviceWeights;
use dinotrain::backend::cuda::{CudaBackend, ResolvedDevice};
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::{DinoHead, Preset};
use dinotrain::optim::{
    clip_grad_norms, ema_update, AdamW, LayerDecay, ParamGroups, SubmoduleSpan,
};
use dinotrain::rng::{keyed, stream};
use dinotrain::ssl::step::{
    forward_backward, HeadConfig, LossConfig, SslModel, StepBatch, TeacherTargets,
};
use dinotrain::ssl::{
    collate_masks, dino_loss_forward_backward as cpu_dino_loss,
    ibot_loss_forward_backward as cpu_ibot_loss, Centering, MaskingGenerator, Method,
};
use dinotrain::train::config::Centering as CenteringMode;
use dinotrain::train::trainer::Trainer;
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

fn download(gpu: &CudaBackend, buf: &Grow<f32>) -> Vec<f32> {
    gpu.download(&*buf.get(gpu).unwrap()).unwrap()
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

#[test]
fn head_forward_and_backward_match_the_cpu_head() {
    let Some(mut gpu) = gpu() else { return };
    let (in_dim, hidden, bn, k, n) = (32, 48, 16, 64, 12);
    let mut table = ParamTable::new();
    let head = DinoHead::new(in_dim, hidden, bn, k, &mut table, "");
    let params = params_with_random_gains(&table, 1);
    let x = randn(2, n * in_dim, 1.0);
    let d_out = randn(3, n * k, 0.1);

    let (y_ref, cache) = head.forward(&params, &x, n);
    let mut grads_ref = vec![0f32; table.len()];
    let dx_ref = head.backward(&params, &mut grads_ref, &cache, &d_out);

    let w = DeviceWeights::upload(&gpu, &params).unwrap();
    let mut gpu_head = GpuHead::new(&gpu, &head).unwrap();
    gpu_head.prepare(&gpu, &w.f32).unwrap();
    let mut hc = HeadCache::default();
    let x_d = gpu.upload(&x).unwrap();
    gpu_head.forward(&gpu, &mut hc, &w, &x_d, n).unwrap();
    assert_close(
        "head logits",
        &download(&gpu, &hc.logits),
        &to_f64(&y_ref),
        BF16_ONE_GEMM,
    );

    let d_out_d = gpu.upload(&d_out).unwrap();
    let mut grads = gpu.alloc_zeros::<f32>(table.len()).unwrap();
    let mut dx = gpu.alloc_zeros::<f32>(n * in_dim).unwrap();
    let mut scratch = HeadScratch::default();
    gpu_head
        .backward(
            &mut gpu,
            &mut scratch,
            &mut grads,
            &mut dx,
            Accumulate::Overwrite,
            &hc,
            &w,
            &d_out_d,
        )
        .unwrap();
    let dx_gpu = gpu.download(&dx).unwrap();
    let g_gpu = gpu.download(&grads).unwrap();
    assert_close("head dx", &dx_gpu, &to_f64(&dx_ref), BF16_CHAIN);
    for spec in table.specs() {
        assert_close(
            &format!("head grad {}", spec.name),
            &g_gpu[spec.at.range()],
            &to_f64(&grads_ref[spec.at.range()]),
            BF16_CHAIN,
        );
    }

    // A second backward adds: parameter gradients and (Accumulate::Add) the input gradient double.
    gpu_head
        .backward(
            &mut gpu,
            &mut scratch,
            &mut grads,
            &mut dx,
            Accumulate::Add,
            &hc,
            &w,
            &d_out_d,
        )
        .unwrap();
    let twice: Vec<f64> = dx_gpu.iter().map(|&v| 2.0 * v as f64).collect();
    assert_close(
        "head dx accumulated",
        &gpu.download(&dx).unwrap(),
        &twice,
        1e-6,
    );
    let twice: Vec<f64> = g_gpu.iter().map(|&v| 2.0 * v as f64).collect();
    assert_close(
        "head grads accumulated",
        &gpu.download(&grads).unwrap(),
        &twice,
        1e-6,
    );
}

// ---- losses and teacher targets ------------------------------------------------------------

#[test]
fn dino_loss_and_targets_match_the_cpu_loss() {
    let Some(mut gpu) = gpu() else { return };
    let (b, k, tt, ts, weight) = (3usize, 50usize, 0.07f32, 0.1f32, 0.7f32);
    for (case, nl, centering) in [
        ("softmax, no local crops", 0usize, Centering::softmax(k)),
        ("softmax, 2 local crops", 2, Centering::softmax(k)),
        ("sinkhorn, 2 local crops", 2, Centering::sinkhorn_knopp()),
    ] {
        let mut cpu_centering = match centering {
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

        let mut gpu_centering = GpuCentering::upload(&gpu, &cpu_centering).unwrap();
        let mut probs_ref = vec![0f32; 2 * b * k];
        cpu_centering
            .teacher_probs(&mut probs_ref, &t_global, 2 * b, k, tt)
            .unwrap();
        let (mut dg_ref, mut dl_ref) = (vec![0f32; 2 * b * k], vec![0f32; nl * b * k]);
        let terms_ref = cpu_dino_loss(
            &mut dg_ref,
            &mut dl_ref,
            &s_global,
            &s_local,
            &probs_ref,
            b,
            nl,
            k,
            ts,
            weight,
        )
        .unwrap();

        let t_d = gpu.upload(&t_global).unwrap();
        let mut probs = gpu.alloc_zeros::<f32>(2 * b * k).unwrap();
        gpu_centering
            .teacher_probs(&mut gpu, &mut probs, &t_d, 2 * b, k, tt)
            .unwrap();
        let mut terms = gpu.alloc_zeros::<f32>(2).unwrap();
        let mut row_loss = Grow::default();
        let mut dg = gpu.alloc_zeros::<f32>(2 * b * k).unwrap();
        let mut dl = gpu.alloc_zeros::<f32>((nl * b * k).max(1)).unwrap();
        let mut dl_view = gpu.sub_mut(&mut dl, 0..nl * b * k).unwrap();
        let sg = gpu.upload(&s_global).unwrap();
        let sl_buf = gpu.upload(&[s_local.clone(), vec![0.0]].concat()).unwrap();
        let sl = gpu.sub(&sl_buf, 0..nl * b * k).unwrap();
        dino_loss_forward_backward(
            &mut gpu,
            &mut DinoPairs::default(),
            &mut terms,
            &mut row_loss,
            &mut dg,
            &mut dl_view,
            &sg,
            &sl,
            &probs,
            b,
            nl,
            k,
            ts,
            weight,
        )
        .unwrap();
        let bound = if case.starts_with("sinkhorn") {
            1e-4
        } else {
            F32
        };
        assert_close(
            &format!("{case}: teacher probs"),
            &gpu.download(&probs).unwrap(),
            &to_f64(&probs_ref),
            bound,
        );
        let t = gpu.download(&terms).unwrap();
        assert_close(
            &format!("{case}: global term"),
            &t[..1],
            &[terms_ref.global as f64],
            bound,
        );
        if nl > 0 {
            assert_close(
                &format!("{case}: local term"),
                &t[1..],
                &[terms_ref.local as f64],
                bound,
            );
            assert_close(
                &format!("{case}: d local"),
                &gpu.download(&*dl_view).unwrap(),
                &to_f64(&dl_ref),
                bound,
            );
        }
        assert_close(
            &format!("{case}: d global"),
            &gpu.download(&dg).unwrap(),
            &to_f64(&dg_ref),
            bound,
        );
        let mut back = cpu_centering.clone();
        gpu_centering.download_into(&gpu, &mut back).unwrap();
        if let (Some(c), Some(r)) = (back.center(), cpu_centering.center()) {
            assert_close(&format!("{case}: center"), c, &to_f64(r), 1e-6);
        }
    }
}

#[test]
fn ibot_loss_and_targets_match_the_cpu_loss() {
    let Some(mut gpu) = gpu() else { return };
    let (m, k, n_crops, tt, ts, weight) = (7usize, 40usize, 4usize, 0.06f32, 0.1f32, 1.3f32);
    let s = randn(21, m * k, 2.0);
    let t = randn(22, m * k, 0.5);
    let masks_weight = uniform(23, m, 0.1, 1.0);
    let mut centering = Centering::Softmax {
        center: randn(24, k, 0.3),
        momentum: 0.9,
    };
    let mut gpu_centering = GpuCentering::upload(&gpu, &centering).unwrap();
    let mut probs_ref = vec![0f32; m * k];
    centering
        .teacher_probs(&mut probs_ref, &t, m, k, tt)
        .unwrap();
    let mut ds_ref = vec![0f32; m * k];
    let loss_ref = cpu_ibot_loss(
        &mut ds_ref,
        &s,
        &probs_ref,
        &masks_weight,
        n_crops,
        m,
        k,
        ts,
        weight,
    )
    .unwrap();

    let t_d = gpu.upload(&t).unwrap();
    let s_d = gpu.upload(&s).unwrap();
    let mut probs = gpu.alloc_zeros::<f32>(m * k).unwrap();
    gpu_centering
        .teacher_probs(&mut gpu, &mut probs, &t_d, m, k, tt)
        .unwrap();
    let mut pairs = IbotPairs::default();
    // A capacity above M, as the step reserves the masks' upper bound.
    pairs.set(&gpu, &masks_weight, n_crops, 3 * m).unwrap();
    let mut loss = gpu.alloc_zeros::<f32>(1).unwrap();
    let mut ds = gpu.alloc_zeros::<f32>(m * k).unwrap();
    ibot_loss_forward_backward(
        &mut gpu,
        &pairs,
        &mut loss,
        &mut Grow::default(),
        &mut ds,
        &s_d,
        &probs,
        k,
        ts,
        weight,
    )
    .unwrap();
    assert_close(
        "ibot probs",
        &gpu.download(&probs).unwrap(),
        &to_f64(&probs_ref),
        F32,
    );
    assert_close(
        "ibot loss",
        &gpu.download(&loss).unwrap(),
        &[loss_ref as f64],
        F32,
    );
    assert_close(
        "ibot dstudent",
        &gpu.download(&ds).unwrap(),
        &to_f64(&ds_ref),
        F32,
    );
    let mut back = centering.clone();
    gpu_centering.download_into(&gpu, &mut back).unwrap();
    assert_close(
        "ibot center",
        back.center().unwrap(),
        &to_f64(centering.center().unwrap()),
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

#[test]
fn clipping_adamw_and_ema_match_the_cpu_optimizer() {
    let Some(mut gpu) = gpu() else { return };
    let model = micro_model(true);
    let table = &model.table;
    let p = table.len();
    let groups =
        ParamGroups::from_table(table, &LayerDecay::official(model.backbone.cfg.depth)).unwrap();
    let spans = SubmoduleSpan::from_table(table);
    let hyper = AdamHyper::default();
    let mut cpu_opt = AdamW::new(table, &groups, hyper).unwrap();
    let mut gpu_opt = GpuOptimizer::new(
        &gpu,
        table,
        &groups,
        &spans,
        hyper,
        &vec![0.0; p],
        &vec![0.0; p],
    )
    .unwrap();
    let mut params = table.init(&mut keyed(5, &[stream::TEST]));
    let mut teacher: Vec<f32> = params.iter().map(|v| v * 0.9).collect();
    let mut params_d = gpu.upload(&params).unwrap();
    let mut teacher_d = gpu.upload(&teacher).unwrap();
    for step in 1..=3u64 {
        // Step 1 has the last layer frozen (lr 0: its moments still move).
        let (lr, last_lr, wd) = (1e-3, if step == 1 { 0.0 } else { 2e-3 }, 0.04);
        let mut grads = randn(30 + step, p, 0.5);
        grads[..10].iter_mut().for_each(|g| *g *= 100.0); // backbone norm above clip_grad
        let mut grads_d = gpu.upload(&grads).unwrap();
        gpu_opt.clip(&mut gpu, &mut grads_d, 3.0).unwrap();
        let norms_ref = clip_grad_norms(&mut grads, &spans, 3.0).unwrap();
        assert_close(
            &format!("step {step}: norms"),
            &gpu.download(&gpu_opt.norms).unwrap()[..spans.len()],
            &to_f64(&norms_ref),
            F32,
        );
        assert_close(
            &format!("step {step}: clipped grads"),
            &gpu.download(&grads_d).unwrap(),
            &to_f64(&grads),
            F32,
        );
        cpu_opt.step(&mut params, &grads, lr, last_lr, wd).unwrap();
        gpu_opt
            .step(&gpu, &mut params_d, &grads_d, lr, last_lr, wd, step)
            .unwrap();
        ema_update(&mut teacher, &params, 0.99).unwrap();
        ema(&gpu, &mut teacher_d, &params_d, 0.99).unwrap();
        assert_close(
            &format!("step {step}: params"),
            &gpu.download(&params_d).unwrap(),
            &to_f64(&params),
            1e-6,
        );
        assert_close(
            &format!("step {step}: exp_avg"),
            &gpu.download(&gpu_opt.exp_avg).unwrap(),
            &to_f64(&cpu_opt.state.exp_avg),
            1e-6,
        );
        assert_close(
            &format!("step {step}: exp_avg_sq"),
            &gpu.download(&gpu_opt.exp_avg_sq).unwrap(),
            &to_f64(&cpu_opt.state.exp_avg_sq),
            1e-6,
        );
        assert_close(
            &format!("step {step}: teacher"),
            &gpu.download(&teacher_d).unwrap(),
            &to_f64(&teacher),
            1e-6,
        );
    }
    // The frozen step left the last layer's weights alone (lr 0, no decay either).
    let v = table.get("dino_head.last_layer.weight_v").unwrap().at;
    assert_ne!(cpu_opt.state.exp_avg[v.range()], vec![0.0; v.len][..]);
}

// ---- the whole step --------------------------------------------------------------------------

struct StepCase {
    name: &'static str,
    method: Method,
    separate_ibot: bool,
    centering: CenteringMode,
    drop_path: f32,
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
        let mut cpu_targets = TeacherTargets {
            dino: centering(k),
            ibot: centering(ki),
        };
        let mut gpu_targets = GpuTargets::upload(&gpu, &cpu_targets).unwrap();
        // Temperatures 0.2, not the official 0.04-0.1: 1/T multiplies the bf16 logit error
        // (~3e-3 absolute) into the softmaxes; the official ones are the golden ssl_step's.
        let losses = LossConfig {
            student_temp: STEP_TEMP,
            ..LossConfig::official(case.method)
        };

        let mut grads_ref = vec![0f32; model.table.len()];
        let mut rng_cpu = keyed(46, &[stream::DROP_PATH]);
        let out_ref = forward_backward(
            &model,
            &student,
            &teacher,
            &mut grads_ref,
            &batch,
            &mut cpu_targets,
            STEP_TEMP,
            &losses,
            (case.drop_path > 0.0).then_some((case.drop_path, &mut rng_cpu)),
        )
        .unwrap();

        let s_w = DeviceWeights::upload(&gpu, &student).unwrap();
        let t_w = DeviceWeights::upload(&gpu, &teacher).unwrap();
        let mut grads = gpu.alloc_zeros::<f32>(model.table.len()).unwrap();
        let mut step = GpuStep::new(&gpu, &model).unwrap();
        let mut rng_gpu = keyed(46, &[stream::DROP_PATH]);
        let out = step
            .forward_backward(
                &mut gpu,
                &model,
                &s_w,
                &t_w,
                &mut grads,
                &batch,
                &mut gpu_targets,
                STEP_TEMP,
                &losses,
                (case.drop_path > 0.0).then_some((case.drop_path, &mut rng_gpu)),
                TeacherProbs::Download,
            )
            .unwrap();
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
        let mut back = cpu_targets.clone();
        gpu_targets.download_into(&gpu, &mut back).unwrap();
        if let (Some(c), Some(r)) = (back.dino.center(), cpu_targets.dino.center()) {
            assert_close(
                &format!("{}: DINO center", case.name),
                c,
                &to_f64(r),
                BF16_ONE_GEMM,
            );
        }

        // Every gradient: the whole vector, then each tensor (a tensor whose gradient is zero
        // on the CPU must be zero on the GPU too).
        let g = gpu.download(&grads).unwrap();
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
    let plan = micro_plan(Method::Dinov2);
    let mut cpu = Trainer::new(plan.clone()).unwrap();
    let mut cuda = Trainer::new_on(plan, ResolvedDevice::Cuda(Box::new(gpu))).unwrap();
    assert!(
        cuda.device_name().starts_with("cuda"),
        "{}",
        cuda.device_name()
    );
    assert_eq!(cpu.student, cuda.student);
    let mut allocations = Vec::new();
    for step in 0..3 {
        let (g, l) = crops(&cpu, step);
        let r_cpu = cpu.train_step(&g, &l).unwrap();
        let r_gpu = cuda.train_step(&g, &l).unwrap();
        allocations.push(cuda.device_allocations().unwrap());
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
    cuda.sync_to_host().unwrap();
    assert_eq!(cuda.optimizer.state.step, cpu.optimizer.state.step);
    for (name, a, r) in [
        ("student", &cuda.student, &cpu.student),
        ("teacher", &cuda.teacher, &cpu.teacher),
    ] {
        // AdamW moves each parameter by about lr (< 2e-4 here) per step whatever the
        // gradient's size, so parameters (rms ~0.02) agree to ~1e-2 even where bf16 flips the
        // sign of a small gradient.
        assert_close(&format!("after 3 steps: {name}"), a, &to_f64(r), 1e-2);
    }
    let (c_gpu, c_cpu) = (
        cuda.targets.dino.center().unwrap(),
        cpu.targets.dino.center().unwrap(),
    );
    // The center averages teacher logits (no temperature): bf16 GEMM level.
    assert_close(
        "after 3 steps: DINO center",
        c_gpu,
        &to_f64(c_cpu),
        BF16_CHAIN,
    );

    // Host edits reach the device: resume-like upload, then one more step on both.
    cuda.student = cpu.student.clone();
    cuda.teacher = cpu.teacher.clone();
    cuda.optimizer.state = cpu.optimizer.state.clone();
    cuda.targets = cpu.targets.clone();
    cuda.sync_to_device().unwrap();
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
fn new_on_the_cpu_is_trainer_new() {
    let plan = micro_plan(Method::Dinov2);
    let mut a = Trainer::new(plan.clone()).unwrap();
    let mut b = Trainer::new_on(plan, ResolvedDevice::Cpu).unwrap();
    assert_eq!(a.student, b.student);
    assert_eq!(a.teacher, b.teacher);
    assert_eq!(b.device_name(), "cpu");
    assert_eq!(b.peak_device_memory(), None);
    assert_eq!(b.device_allocations(), None);
    b.sync_to_host().unwrap();
    b.sync_to_device().unwrap();
    for step in 0..2 {
        let (g, l) = crops(&a, step);
        let ra = a.train_step(&g, &l).unwrap();
        let rb = b.train_step(&g, &l).unwrap();
        assert_eq!(ra.losses.loss.to_bits(), rb.losses.loss.to_bits());
        assert_eq!(ra.grad_norms, rb.grad_norms);
    }
    assert_eq!(a.student, b.student);
    assert_eq!(a.teacher, b.teacher);
    assert_eq!(a.optimizer.state, b.optimizer.state);
}
