//! Regression tests for the pitfalls the seed project fell into, named after them.

use dinotrain::backend::cpu::CpuBackend;
use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::optim::AdamHyper;
use dinotrain::optim::{
    ema_update, AdamW, AdamWState, LayerDecay, ParamGroups, ScheduleConfig, Schedules,
};

/// A backbone weight and the weight-normalised last layer of a DINO head.
fn tiny_model() -> (ParamTable, Vec<f32>) {
    let mut t = ParamTable::new();
    t.push("backbone.norm.weight", &[3], Init::Const(1.0));
    t.push(
        "backbone.blocks.0.mlp.fc1.weight",
        &[4, 3],
        Init::Uniform { bound: 0.5 },
    );
    t.push("dino_head.last_layer.weight_g", &[5, 1], Init::Const(1.0));
    t.push(
        "dino_head.last_layer.weight_v",
        &[5, 3],
        Init::Uniform { bound: 0.5 },
    );
    let flat = t.init(&mut dinotrain::rng::keyed(
        0,
        &[dinotrain::rng::stream::INIT],
    ));
    (t, flat)
}

fn schedules() -> Schedules {
    Schedules::new(&ScheduleConfig {
        epochs: 4,
        epoch_length: 2,
        warmup_epochs: 1,
        freeze_last_layer_epochs: 1,
        warmup_teacher_temp_epochs: 1,
        ..ScheduleConfig::default()
    })
    .unwrap()
}

fn grads(n: usize, it: u64) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 1.0) * (it as f32 + 1.5)).sin())
        .collect()
}

#[test]
fn last_layer_frozen_by_zero_lr_keeps_adam_state_moving() {
    let (table, init) = tiny_model();
    let groups = ParamGroups::from_table(&table, &LayerDecay::official(1)).unwrap();
    let sched = schedules();
    let mut be = CpuBackend::default();
    let zeros = AdamWState::zeros(table.len());
    let mut opt = AdamW::new(&mut be, &table, &groups, AdamHyper::default(), &zeros).unwrap();
    let mut p = init.clone();
    let last = table
        .get("dino_head.last_layer.weight_g")
        .unwrap()
        .at
        .offset
        ..table
            .get("dino_head.last_layer.weight_v")
            .unwrap()
            .at
            .range()
            .end;
    let fc1 = table
        .get("backbone.blocks.0.mlp.fc1.weight")
        .unwrap()
        .at
        .range();
    // Iterations 0 and 1 are frozen (1 epoch of 2 iterations); iteration 0 has lr 0 (warm-up).
    assert_eq!(sched.at(1).last_layer_lr, 0.0);
    assert!(sched.at(1).lr > 0.0 && sched.at(2).last_layer_lr > 0.0);
    for it in 0..2u64 {
        let v = sched.at(it);
        let m_before = opt.state(&mut be).unwrap().exp_avg[last.clone()].to_vec();
        let g = grads(p.len(), it);
        opt.step(&mut be, &mut p, &g, (v.lr, v.last_layer_lr, v.wd))
            .unwrap();
        let state = opt.state(&mut be).unwrap();
        assert_eq!(state.step, it + 1);
        // Weights unchanged (weight decay is scaled by lr = 0 too) ...
        assert_eq!(&p[last.clone()], &init[last.clone()], "iteration {it}");
        // ... but both moments advance.
        assert_ne!(&state.exp_avg[last.clone()], &m_before[..]);
        assert!(state.exp_avg_sq[last.clone()].iter().all(|&v| v > 0.0));
    }
    // Other parameters did train at iteration 1.
    assert_ne!(&p[fc1.clone()], &init[fc1]);

    // Iteration 2: the last layer moves, with warm moments and step-3 bias corrections.
    let v = sched.at(2);
    let g2 = grads(p.len(), 2);
    opt.step(&mut be, &mut p, &g2, (v.lr, v.last_layer_lr, v.wd))
        .unwrap();
    assert_ne!(&p[last.clone()], &init[last.clone()]);

    // The v1 way (drop the gradient while frozen) starts the last layer from cold state at
    // iteration 2: a different update. Emulate it with an optimizer over the last layer only.
    let mut cold = AdamW::from_parts(
        &mut be,
        &[(
            dinotrain::nn::params::ParamRef {
                offset: 0,
                len: last.len(),
            },
            groups.per_param[2],
        )],
        last.len(),
        AdamHyper::default(),
        &AdamWState::zeros(last.len()),
    )
    .unwrap();
    let mut q = init[last.clone()].to_vec();
    let lrs = (v.lr, v.last_layer_lr, v.wd);
    cold.step(&mut be, &mut q, &g2[last.clone()], lrs).unwrap();
    let warm_delta: Vec<f32> = p[last.clone()]
        .iter()
        .zip(&init[last.clone()])
        .map(|(a, b)| a - b)
        .collect();
    let cold_delta: Vec<f32> = q
        .iter()
        .zip(&init[last.clone()])
        .map(|(a, b)| a - b)
        .collect();
    let diff = dinotrain::golden::rel_err(&warm_delta, &cold_delta);
    assert!(
        diff > 0.05,
        "zero-lr freezing and gradient dropping should differ, rel diff {diff}"
    );
}

#[test]
fn weight_g_is_trainable_decayed_and_averaged() {
    let (table, init) = tiny_model();
    let groups = ParamGroups::from_table(&table, &LayerDecay::official(1)).unwrap();
    let names: Vec<&str> = table.specs().iter().map(|s| s.name.as_str()).collect();
    let gi = names
        .iter()
        .position(|n| *n == "dino_head.last_layer.weight_g")
        .unwrap();
    let s = groups.per_param[gi];
    assert_eq!(s.wd_multiplier, 1.0, "weight_g must get weight decay");
    assert_eq!(s.lr_multiplier, 1.0);
    assert!(s.is_last_layer);
    // It sits in a trainable group with weight_v.
    let g = groups
        .groups
        .iter()
        .find(|g| g.params.iter().any(|p| p.ends_with("weight_g")))
        .unwrap();
    assert!(g.params.iter().any(|p| p.ends_with("weight_v")));

    // AdamW changes it once the last-layer lr is positive; with a zero gradient only weight
    // decay acts: g · (1 − lr · wd).
    let mut be = CpuBackend::default();
    let zeros = AdamWState::zeros(table.len());
    let mut opt = AdamW::new(&mut be, &table, &groups, AdamHyper::default(), &zeros).unwrap();
    let mut p = init.clone();
    let r = table
        .get("dino_head.last_layer.weight_g")
        .unwrap()
        .at
        .range();
    let zero = vec![0f32; p.len()];
    opt.step(&mut be, &mut p, &zero, (0.1, 0.1, 0.5)).unwrap();
    for &v in &p[r.clone()] {
        assert!((v - 0.95).abs() < 1e-6, "{v}");
    }
    let mut g = zero.clone();
    g[r.clone()].fill(1.0);
    opt.step(&mut be, &mut p, &g, (0.1, 0.1, 0.0)).unwrap();
    assert!(p[r.clone()].iter().all(|&v| v < 0.9));

    // EMA averages it into the teacher.
    let mut teacher = init.clone();
    ema_update(&mut be, &mut teacher[..], &p[..], 0.9).unwrap();
    for (t, (&i, &s)) in teacher[r.clone()]
        .iter()
        .zip(init[r.clone()].iter().zip(&p[r.clone()]))
    {
        assert!((t - (0.9 * i + 0.1 * s)).abs() < 1e-6);
    }
}
