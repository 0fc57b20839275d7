//! Golden case `ssl_step`: the forward and backward of one whole DINOv2 step (teacher, student,
//! heads, DINO + KoLeo + iBOT losses) against the official implementation.

use super::nn_cases::vit_config;
use super::{load_params, param_grads, put, Fixture, Outputs};
use crate::backend::Backend;
use crate::error::Result;
use crate::ssl::step::{
    HeadConfig, LossConfig, SslModel, SslStep, StepBatch, Targets, TeacherProbs, TeacherTargets,
};
use crate::ssl::{Centering, MaskBatch, Method, StepInputs};

/// The head `params.<key>` describes (null: none).
fn head_config(fx: &Fixture, key: &str) -> Result<Option<HeadConfig>> {
    let v = fx.param(key)?;
    if v.is_null() {
        return Ok(None);
    }
    let field = |name: &str| {
        v.get(name)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| fx.error(&format!("params.{key}.{name}"), "missing or not an integer"))
    };
    Ok(Some(HeadConfig {
        hidden_dim: field("hidden_dim")?,
        bottleneck_dim: field("bottleneck_dim")?,
        n_prototypes: field("out_dim")?,
    }))
}

/// The teacher targets `params.centering` names, with the centers of the fixture (`k` DINO and
/// `ki` iBOT prototypes).
fn teacher_targets(fx: &Fixture, k: usize, ki: usize) -> Result<TeacherTargets> {
    Ok(match fx.param_str("centering")? {
        "centering" => {
            let momentum = fx.param_f32("center_momentum")?;
            let softmax = |name: &str, shape: &[usize]| -> Result<Centering> {
                Ok(Centering::Softmax {
                    center: fx.input_shaped(name, shape)?.data.clone(),
                    momentum,
                })
            };
            TeacherTargets {
                dino: softmax("dino_center", &[1, k])?,
                ibot: softmax("ibot_center", &[1, 1, ki])?,
            }
        }
        "sinkhorn_knopp" => TeacherTargets {
            dino: Centering::sinkhorn_knopp(),
            ibot: Centering::sinkhorn_knopp(),
        },
        other => return Err(fx.error("params.centering", format!("unknown mode '{other}'"))),
    })
}

/// One step of the fixture's model on `be`, with the teacher targets read back.
pub(super) fn ssl_step<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let vit = vit_config(fx)?;
    let dino =
        head_config(fx, "dino_head")?.ok_or_else(|| fx.error("params.dino_head", "missing"))?;
    let ibot = if fx.param_bool("ibot_separate_head")? {
        Some(head_config(fx, "ibot_head")?.ok_or_else(|| fx.error("params.ibot_head", "missing"))?)
    } else {
        None
    };
    let model = SslModel::new(&vit, dino, ibot)?;
    let student = be.weights(&load_params(fx, "student.", &model.table)?)?;
    let teacher = be.weights(&load_params(fx, "teacher.", &model.table)?)?;

    let n_img = fx.param_usize("n_img")?;
    let n_local = fx.param_usize("n_local_crops")?;
    let g_size = fx.param_usize("global_crops_size")?;
    let l_size = fx.param_usize("local_crops_size")?;
    let n_patches = (g_size / vit.patch_size).pow(2);
    let global = fx.input_shaped("global_crops", &[2 * n_img, vit.in_chans, g_size, g_size])?;
    let local: &[f32] = if fx.has("in.local_crops") {
        let shape = [n_local * n_img, vit.in_chans, l_size, l_size];
        &fx.input_shaped("local_crops", &shape)?.data
    } else {
        &[]
    };
    let (mask_shape, mask_data) = fx.input_u8("masks")?;
    fx.check_shape("in.masks", mask_shape, &[2 * n_img, n_patches])?;
    let masks = MaskBatch::from_masks(
        mask_data.iter().map(|&m| m != 0).collect(),
        2 * n_img,
        n_patches,
        fx.param_usize("upperbound")?,
    )?;
    // The fixture's index list and weights must be what the masks imply.
    let (_, indices) = fx.input_i64("mask_indices_list")?;
    if indices
        .iter()
        .map(|&i| i as usize)
        .ne(masks.mask_indices.iter().copied())
    {
        return Err(fx.error("in.mask_indices_list", "disagrees with in.masks"));
    }
    if super::rel_err(&masks.masks_weight, &fx.input("masks_weight")?.data) > 1e-6 {
        return Err(fx.error("in.masks_weight", "disagrees with in.masks"));
    }

    let k = dino.n_prototypes;
    let ki = ibot.map_or(k, |h| h.n_prototypes);
    let losses = LossConfig {
        method: Method::Dinov2,
        dino_loss_weight: fx.param_f32("dino_loss_weight")?,
        koleo_loss_weight: fx.param_f32("koleo_loss_weight")?,
        ibot_loss_weight: fx.param_f32("ibot_loss_weight")?,
        student_temp: fx.param_f32("student_temp")?,
    };
    let batch = StepBatch {
        global: &global.data,
        local,
        n_img,
        n_local,
        global_size: g_size,
        local_size: l_size,
        masks: Some(&masks),
        drop_path: None,
    };
    let mut grads = be.alloc_f32(model.table.len())?;
    let mut targets = Targets::new(be, &teacher_targets(fx, k, ki)?)?;
    let mut step = SslStep::new(be, &model)?;
    let inp = StepInputs {
        model: &model,
        student: &student,
        teacher: &teacher,
        batches: std::slice::from_ref(&batch),
        teacher_temp: fx.param_f32("teacher_temp")?,
        losses: &losses,
        drop_path: None,
        dist: None,
    };
    let out = step.forward_backward(be, inp, &mut grads, &mut targets, TeacherProbs::Download)?;
    let grads = be.download_f32(&grads)?;
    let targets = targets.to_host(be)?;

    let mut o = Outputs::new();
    for (name, value) in out.terms() {
        put(&mut o, name, &[1], vec![value])?;
    }
    put(
        &mut o,
        "teacher_dino_probs",
        &[2 * n_img, k],
        out.teacher_dino_probs,
    )?;
    let n_masked = masks.n_masked();
    put(
        &mut o,
        "teacher_ibot_probs",
        &[n_masked, ki],
        out.teacher_ibot_probs,
    )?;
    if let (Some(dc), Some(ic)) = (targets.dino.center(), targets.ibot.center()) {
        put(&mut o, "dino_center_new", &[1, k], dc.to_vec())?;
        put(&mut o, "ibot_center_new", &[1, 1, ki], ic.to_vec())?;
    }
    param_grads(&mut o, "student.", &model.table, &grads)?;
    Ok(o)
}
