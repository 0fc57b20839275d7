//! The full training iteration (step, clipping, AdamW, EMA) on a micro model, and the seed's
//! pitfalls that only show at this level.

mod trainer_support;

use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::prelude::*;
use dinotrain::nn::VitWorkspaces;
use dinotrain::ssl::Method;
use dinotrain::train::state::HostState;
use dinotrain::train::trainer::Trainer;
use trainer_support::{crops, micro_plan};

fn param<'a>(t: &Trainer, buf: &'a [f32], name: &str) -> &'a [f32] {
    &buf[t.model.table.get(name).unwrap().at.range()]
}

/// The trainer's whole state on the host.
fn state(t: &mut Trainer) -> HostState {
    t.snapshot().unwrap()
}

#[test]
fn every_method_trains_and_the_teacher_follows_the_student() {
    for method in [Method::Dino, Method::Ibot, Method::Dinov2] {
        let mut t = Trainer::new(micro_plan(method)).unwrap();
        let before = state(&mut t).student;
        for s in 0..4 {
            let (g, l) = crops(&t, s);
            let r = t.train_step(&g, &l).unwrap();
            assert_eq!(r.step, s);
            assert!(r.losses.loss.is_finite() && r.losses.loss > 0.0);
            assert_eq!(r.n_masked > 0, method.uses_ibot(), "{method}");
            assert_eq!(r.losses.koleo_loss != 0.0, method.uses_koleo(), "{method}");
            assert_eq!(r.grad_norms.len(), 2);
        }
        let after = state(&mut t);
        assert_ne!(after.student, before);
        assert_ne!(after.teacher, before);
        assert_ne!(after.teacher, after.student);
    }
}

#[test]
fn same_seed_same_losses_and_a_rebuilt_trainer_continues_bit_identically() {
    let run = |split_at: Option<u64>| {
        let mut t = Trainer::new(micro_plan(Method::Dinov2)).unwrap();
        let mut losses = Vec::new();
        for s in 0..5 {
            if Some(s) == split_at {
                // Rebuild from the explicit state only, as a resume from a checkpoint does
                // (a fresh trainer from the student weights, then the whole state restored).
                let saved = state(&mut t);
                let mut r =
                    Trainer::from_parts(t.plan.clone(), t.model.clone(), saved.student.clone())
                        .unwrap();
                let host = HostState {
                    student: saved.student,
                    teacher: saved.teacher,
                    optimizer: saved.optimizer,
                    targets: saved.targets,
                    step: saved.step,
                };
                r.restore(&host).unwrap();
                assert_eq!(r.step(), s);
                t = r;
            }
            let (g, l) = crops(&t, s);
            losses.push(t.train_step(&g, &l).unwrap().losses.loss.to_bits());
        }
        losses
    };
    assert_eq!(run(None), run(None));
    assert_eq!(run(None), run(Some(3)));
}

#[test]
fn koleo_acts_on_the_backbone_cls_token_not_the_head_output() {
    // Only KoLeo on: the heads get no gradient, the backbone does, and the logged value is
    // KoLeo of the backbone's normalised CLS tokens of each global crop (halved).
    let mut plan = micro_plan(Method::Dinov2);
    plan.losses.dino_loss_weight = 0.0;
    plan.losses.ibot_loss_weight = 0.0;
    plan.drop_path_rate = 0.0;
    plan.clip_grad = 1e9;
    let mut t = Trainer::new(plan).unwrap();
    let (g, l) = crops(&t, 0);
    let student0 = state(&mut t).student;
    let r = t.train_step(&g, &l).unwrap();
    let head_grad_norm = r
        .grad_norms
        .iter()
        .find(|(n, _)| n == "dino_head")
        .unwrap()
        .1;
    let backbone_grad_norm = r
        .grad_norms
        .iter()
        .find(|(n, _)| n == "backbone")
        .unwrap()
        .1;
    assert_eq!(head_grad_norm, 0.0);
    assert!(backbone_grad_norm > 0.0);

    // The logged value is KoLeo of the backbone's CLS tokens (no masks, no drop path here, so
    // the student's global pass equals a plain forward), 0.1 times the sum over crops, halved.
    let mut plan = micro_plan(Method::Dinov2);
    plan.losses.dino_loss_weight = 0.0;
    plan.losses.ibot_loss_weight = 0.0;
    plan.mask_probability = 0.0;
    plan.drop_path_rate = 0.0;
    let mut t = Trainer::new(plan).unwrap();
    let student = state(&mut t).student;
    assert_eq!(student, student0);
    let mut be = CpuBackend::default();
    let w = be.weights(&student).unwrap();
    let vit = &t.model.backbone;
    let out = VitWorkspaces::new(vit)
        .forward_inference(&mut be, vit, &w, &g, (8, 16, 16))
        .unwrap()
        .to_host(&mut be)
        .unwrap();
    let d = t.model.backbone.cfg.embed_dim;
    let mut expected = 0.0;
    let mut koleo = be.koleo_state(4, d).unwrap();
    for crop in 0..2 {
        let x = &out.cls[crop * 4 * d..(crop + 1) * 4 * d];
        let mut dx = vec![0f32; x.len()];
        let mut kl = [0f32];
        dinotrain::ssl::koleo_loss_forward_backward(
            &mut be,
            &mut koleo,
            &mut kl,
            &mut dx,
            x,
            (4, d),
            1.0,
        )
        .unwrap();
        expected += 0.1 * kl[0] / 2.0;
    }
    let r = t.train_step(&g, &l).unwrap();
    assert!(
        (r.losses.koleo_loss - expected).abs() <= 1e-6 * expected.abs(),
        "{} vs {expected}",
        r.losses.koleo_loss
    );
}

#[test]
fn last_layer_is_frozen_by_zero_lr_then_moves_and_weight_g_is_averaged_into_the_teacher() {
    let mut t = Trainer::new(micro_plan(Method::Dinov2)).unwrap();
    let name_g = "dino_head.last_layer.weight_g";
    let name_v = "dino_head.last_layer.weight_v";
    let s0 = state(&mut t);
    let g0 = param(&t, &s0.student, name_g).to_vec();
    let v0 = param(&t, &s0.student, name_v).to_vec();
    // Freeze lasts freeze_last_layer_epochs · epoch_length = 3 iterations.
    for s in 0..3 {
        let (g, l) = crops(&t, s);
        let r = t.train_step(&g, &l).unwrap();
        assert_eq!(r.scheduled.last_layer_lr, 0.0);
        let now = state(&mut t);
        assert_eq!(param(&t, &now.student, name_g), &g0[..]);
        assert_eq!(param(&t, &now.student, name_v), &v0[..]);
    }
    // The optimizer state of the frozen layer kept moving.
    let at = t.model.table.get(name_v).unwrap().at.range();
    let opt = state(&mut t).optimizer;
    assert!(opt.exp_avg[at.clone()].iter().any(|&m| m != 0.0));
    assert!(opt.exp_avg_sq[at].iter().any(|&v| v != 0.0));
    let (g, l) = crops(&t, 3);
    let r = t.train_step(&g, &l).unwrap();
    assert!(r.scheduled.last_layer_lr > 0.0);
    let now = state(&mut t);
    assert_ne!(param(&t, &now.student, name_g), &g0[..]);
    assert_ne!(param(&t, &now.teacher, name_g), &g0[..]);
}

#[test]
fn a_non_finite_input_stops_the_step_with_the_term_named() {
    let mut t = Trainer::new(micro_plan(Method::Dinov2)).unwrap();
    let (mut g, l) = crops(&t, 0);
    g[5] = f32::NAN;
    let before = state(&mut t);
    let err = t.train_step(&g, &l).unwrap_err().to_string();
    assert!(
        err.contains("step 0") || err.contains("non-finite") || err.contains("NaN"),
        "{err}"
    );
    // Nothing of the state moved: weights, optimizer, step, and the softmax centers the step
    // had begun to update.
    let after = state(&mut t);
    assert_eq!(after.student, before.student);
    assert_eq!(after.teacher, before.teacher);
    assert_eq!(after.targets, before.targets);
    assert_eq!(after.step, before.step);
    // The next good step runs from the same state as if the bad one never came.
    let (g, l) = crops(&t, 0);
    let mut fresh = Trainer::new(micro_plan(Method::Dinov2)).unwrap();
    let want = fresh.train_step(&g, &l).unwrap().losses.loss;
    assert_eq!(
        t.train_step(&g, &l).unwrap().losses.loss.to_bits(),
        want.to_bits()
    );
}
