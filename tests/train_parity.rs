//! Fifty training iterations against the official DINOv2 code (`tests/parity`, made by
//! `tools/make-parity-steps.py`): from the fixture's initial weights, with the crops the official
//! augmentation made and the masks the official collate drew, the `Trainer` runs the whole
//! iteration (schedules, teacher targets with centering or Sinkhorn-Knopp, DINO + KoLeo + iBOT,
//! clipping per submodule, AdamW with the official parameter groups and last-layer freeze, EMA)
//! and must follow the official losses at every step and end at the official student, teacher
//! and centers. The single-step golden fixtures check each piece; this checks that nothing
//! drifts when they are composed over many steps (a schedule off by one iteration, a center
//! applied one step early, a moment not carried).
//!
//! Tolerances come with the fixture (`tols`): 10x what a float32 run of the official code itself
//! differs from its float64 run after the same steps, rounded up to a power of ten.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dinotrain::backend::Precision;
use dinotrain::golden::{rel_err, Fixture};
use dinotrain::nn::drop_path::Subset;
use dinotrain::nn::{Ffn, GivenSubsets, VitConfig};
use dinotrain::optim::{AdamHyper, LayerDecay, ScheduleConfig, Schedules};
use dinotrain::ssl::step::{HeadConfig, LossConfig, SslModel};
use dinotrain::ssl::{MaskBatch, Method};
use dinotrain::train::config::Centering;
use dinotrain::train::trainer::{MicroBatch, TrainPlan, Trainer};

fn fixture(variant: &str) -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/parity")
        .join(format!("train_steps-{variant}.safetensors"));
    Fixture::load(&path).unwrap()
}

/// The plan the fixture's `params` describe.
fn plan(fx: &Fixture) -> TrainPlan {
    let u = |k: &str| fx.param_usize(k).unwrap();
    let f = |k: &str| fx.param_f64(k).unwrap();
    let embed_dim = u("embed_dim");
    let vit = VitConfig {
        img_size: u("global_crops_size"),
        patch_size: u("patch_size"),
        in_chans: 3,
        embed_dim,
        depth: u("depth"),
        num_heads: u("num_heads"),
        ffn: Ffn::Mlp {
            hidden: (embed_dim as f64 * f("mlp_ratio")) as usize,
        },
        num_register_tokens: u("num_register_tokens"),
        layerscale: Some(f("layerscale") as f32),
        interpolate_offset: f("interpolate_offset") as f32,
        interpolate_antialias: fx.param_bool("interpolate_antialias").unwrap(),
        qkv_bias: true,
        proj_bias: true,
        ffn_bias: true,
    };
    assert!(!fx.param_bool("ibot_separate_head").unwrap());
    let centering = match fx.param_str("centering").unwrap() {
        "centering" => Centering::Softmax,
        "sinkhorn_knopp" => Centering::SinkhornKnopp,
        other => panic!("unknown centering {other}"),
    };
    let schedules = Schedules::new(&ScheduleConfig {
        epochs: u("epochs") as u64,
        epoch_length: u("official_epoch_length") as u64,
        warmup_epochs: u("warmup_epochs") as u64,
        freeze_last_layer_epochs: u("freeze_last_layer_epochs") as u64,
        warmup_teacher_temp_epochs: u("warmup_teacher_temp_epochs") as u64,
        batch_size_per_gpu: u("n_img") as u64,
        world_size: 1,
        base_lr: f("base_lr"),
        min_lr: f("min_lr"),
        weight_decay: f("weight_decay"),
        weight_decay_end: f("weight_decay_end"),
        momentum_teacher: f("momentum_teacher"),
        final_momentum_teacher: f("final_momentum_teacher"),
        warmup_teacher_temp: f("warmup_teacher_temp"),
        teacher_temp: f("teacher_temp"),
    })
    .unwrap();
    let (lo, hi): (f32, f32) = fx.param_as("mask_ratio_min_max").unwrap();
    TrainPlan {
        layer_decay: LayerDecay {
            depth: vit.depth,
            layerwise_decay: f("layerwise_decay"),
            patch_embed_lr_mult: f("patch_embed_lr_mult"),
        },
        vit,
        dino_head: HeadConfig {
            hidden_dim: u("head_hidden_dim"),
            bottleneck_dim: u("head_bottleneck_dim"),
            n_prototypes: u("head_n_prototypes"),
        },
        ibot_head: None,
        losses: LossConfig {
            method: Method::Dinov2,
            dino_loss_weight: f("dino_loss_weight") as f32,
            koleo_loss_weight: f("koleo_loss_weight") as f32,
            ibot_loss_weight: f("ibot_loss_weight") as f32,
            student_temp: 0.1,
        },
        centering,
        batch_size: u("n_img"),
        accumulate: 1,
        n_local_crops: u("local_crops_number"),
        global_crop_size: u("global_crops_size"),
        local_crop_size: u("local_crops_size"),
        mask_probability: f("mask_sample_probability") as f32,
        mask_ratio_min_max: (lo, hi),
        drop_path_rate: f("drop_path_rate") as f32,
        schedules,
        adam: AdamHyper {
            beta1: f("adamw_beta1"),
            beta2: f("adamw_beta2"),
            eps: 1e-8,
        },
        clip_grad: f("clip_grad") as f32,
        seed: 0,
        precision: Some(Precision::F32),
    }
}

/// The tensors `<prefix><key>` of the fixture as one flat vector in the model's layout.
fn flat_params(fx: &Fixture, model: &SslModel, prefix: &str) -> Vec<f32> {
    let named = fx.inputs_with_prefix(prefix).unwrap();
    let mut flat = vec![0f32; model.table.len()];
    model
        .table
        .load(&mut flat, &named, &fx.path.display().to_string())
        .unwrap();
    flat
}

fn tolerances(fx: &Fixture) -> BTreeMap<String, f64> {
    serde_json::from_value(fx.meta_json("tols").unwrap()).unwrap()
}

fn check(name: &str, got: &[f32], want: &[f32], tols: &BTreeMap<String, f64>, key: &str) {
    let err = rel_err(got, want);
    let tol = tols[key];
    eprintln!("{name}: relative error {err:.3e} (tol {tol:.0e})");
    assert!(err <= tol, "{name}: relative error {err:.3e} > {tol:.0e}");
}

/// The official run's drop-path subsets of every step (`in.drop_path.global` / `.local`
/// `[steps, 2·depth, keep]`), or `None` for a fixture without drop path.
fn recorded_subsets(fx: &Fixture, plan: &TrainPlan, steps: usize) -> Option<Vec<GivenSubsets>> {
    if plan.drop_path_rate == 0.0 {
        assert!(!fx.has("in.drop_path.global"));
        return None;
    }
    let branches = 2 * plan.vit.depth;
    let sets = [
        ("global", 2 * plan.batch_size),
        ("local", plan.n_local_crops * plan.batch_size),
    ];
    let per_set: Vec<Vec<Vec<Option<Subset>>>> = sets
        .iter()
        .map(|&(name, b)| {
            let (shape, kept) = fx.input_i64(&format!("drop_path.{name}")).unwrap();
            let keep = ((b as f64) * (1.0 - f64::from(plan.drop_path_rate))) as usize;
            assert_eq!(shape, &[steps, branches, keep.max(1)], "{name}");
            kept.chunks(shape[2])
                .map(|k| Some(Subset::new(k.iter().map(|&i| i as usize).collect(), b).unwrap()))
                .collect::<Vec<_>>()
                .chunks(branches)
                .map(<[_]>::to_vec)
                .collect()
        })
        .collect();
    let [global, local] = <[_; 2]>::try_from(per_set).unwrap();
    Some(
        global
            .into_iter()
            .zip(local)
            .map(|(global, local)| GivenSubsets { global, local })
            .collect(),
    )
}

fn replay(variant: &str) {
    let fx = fixture(variant);
    let plan = plan(&fx);
    let tols = tolerances(&fx);
    let model = SslModel::new(&plan.vit, plan.dino_head, plan.ibot_head).unwrap();
    let init = flat_params(&fx, &model, "in.param.");
    let mut trainer = Trainer::from_parts(plan.clone(), model.clone(), init).unwrap();

    let steps = fx.param_usize("steps").unwrap();
    let upperbounds: Vec<usize> = fx.param_as("upperbound").unwrap();
    let (n_crops, g, lc) = (
        2 * plan.batch_size,
        plan.global_crop_size,
        plan.local_crop_size,
    );
    let n_patches = (g / plan.vit.patch_size).pow(2);
    let global = fx
        .input_shaped("global_crops", &[steps, n_crops, 3, g, g])
        .unwrap();
    let local = fx
        .input_shaped(
            "local_crops",
            &[steps, plan.n_local_crops * plan.batch_size, 3, lc, lc],
        )
        .unwrap();
    let (mask_shape, masks) = fx.input_u8("masks").unwrap();
    assert_eq!(mask_shape, &[steps, n_crops, n_patches]);
    let want_losses = &fx.f32("out.losses").unwrap().data;
    let drop_path = recorded_subsets(&fx, &plan, steps);

    let mut losses = Vec::with_capacity(steps * 5);
    let (g_len, l_len, m_len) = (
        trainer.global_len(),
        trainer.local_len(),
        n_crops * n_patches,
    );
    for step in 0..steps {
        let m = MaskBatch::from_masks(
            masks[step * m_len..(step + 1) * m_len]
                .iter()
                .map(|&v| v != 0)
                .collect(),
            n_crops,
            n_patches,
            upperbounds[step],
        )
        .unwrap();
        let record = trainer
            .train_step_with_masks(&[MicroBatch {
                global: &global.data[step * g_len..(step + 1) * g_len],
                local: &local.data[step * l_len..(step + 1) * l_len],
                masks: Some(&m),
                drop_path: drop_path.as_ref().map(|d| &d[step]),
            }])
            .unwrap();
        let terms: Vec<f32> = record.losses.terms().into_iter().map(|(_, v)| v).collect();
        assert_eq!(terms.len(), 5);
        // Each step on its own, so a drift says where it starts.
        let want = &want_losses[step * 5..(step + 1) * 5];
        let err = rel_err(&terms, want);
        assert!(
            err <= tols["losses"],
            "step {step}: losses {terms:?} vs official {want:?} (relative error {err:.3e})"
        );
        losses.extend(terms);
    }
    check(
        &format!("{variant}: losses of {steps} steps"),
        &losses,
        want_losses,
        &tols,
        "losses",
    );

    let state = trainer.snapshot().unwrap();
    for (name, got) in [("student", &state.student), ("teacher", &state.teacher)] {
        let want = flat_params(&fx, &model, &format!("out.{name}."));
        check(
            &format!("{variant}: {name} after {steps} steps"),
            got,
            &want,
            &tols,
            name,
        );
    }
    if let (Some(dino), Some(ibot)) = (state.targets.dino.center(), state.targets.ibot.center()) {
        for (name, got) in [("dino_center", dino), ("ibot_center", ibot)] {
            let want = &fx.f32(&format!("out.{name}")).unwrap().data;
            check(&format!("{variant}: {name}"), got, want, &tols, name);
        }
    }
}

#[test]
fn fifty_steps_with_softmax_centering_follow_the_official_run() {
    replay("centering-s0");
}

#[test]
fn fifty_steps_with_sinkhorn_knopp_follow_the_official_run() {
    replay("sinkhorn-s1");
}

#[test]
fn fifty_steps_with_drop_path_follow_the_official_run() {
    // The official run's random batch subsets of every student branch, replayed.
    replay("drop-path-s2");
}

#[test]
fn the_fixtures_are_the_ones_the_generator_writes() {
    // Every fixture in tests/parity is replayed above: a new one must get its test.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/parity");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "train_steps-centering-s0.safetensors",
            "train_steps-drop-path-s2.safetensors",
            "train_steps-sinkhorn-s1.safetensors"
        ]
    );
}
