//! Golden case `ssl_step`: the forward and backward of one whole DINOv2 step (teacher, student,
//! heads, DINO + KoLeo + iBOT losses) against the official implementation.

use super::{out, Fixture, Outputs};
use crate::backend::Backend;
use crate::error::Result;
use crate::nn::{Ffn, VitConfig};
use crate::ssl::step::{
    HeadConfig, LossConfig, SslModel, SslStep, StepBatch, StepOutput, Targets, TeacherProbs,
    TeacherTargets,
};
use crate::ssl::{Centering, MaskBatch, Method, StepInputs as SslInputs};
use crate::tensor::Tensor;

/// The backbone configuration a fixture's `params` describe (`vit_forward`, `ssl_step`).
pub(super) fn vit_config(fx: &Fixture) -> Result<VitConfig> {
    let hidden = fx.param_usize("mlp_hidden_dim")?;
    let ffn = match fx.param_str("ffn_layer")? {
        "mlp" => Ffn::Mlp { hidden },
        s if s.starts_with("swiglu") => Ffn::SwiGlu { hidden },
        other => return Err(fx.error("params.ffn_layer", format!("unknown FFN '{other}'"))),
    };
    let cfg = VitConfig {
        img_size: fx.param_usize("img_size")?,
        patch_size: fx.param_usize("patch_size")?,
        in_chans: fx.param_usize("in_chans")?,
        embed_dim: fx.param_usize("embed_dim")?,
        depth: fx.param_usize("depth")?,
        num_heads: fx.param_usize("num_heads")?,
        ffn,
        num_register_tokens: fx.param_usize("num_register_tokens")?,
        layerscale: fx.param_bool("layerscale")?.then_some(1.0),
        interpolate_offset: fx.param_f64("interpolate_offset")? as f32,
        interpolate_antialias: fx.param_bool("interpolate_antialias")?,
        qkv_bias: fx.param_bool("qkv_bias")?,
        proj_bias: fx.param_bool("proj_bias")?,
        ffn_bias: fx.param_bool("ffn_bias")?,
    };
    cfg.validate()?;
    Ok(cfg)
}

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

/// Everything a `ssl_step` fixture describes, parsed and checked.
pub(crate) struct StepInputs<'a> {
    pub model: SslModel,
    pub student: Vec<f32>,
    pub teacher: Vec<f32>,
    pub global: &'a [f32],
    pub local: &'a [f32],
    pub n_img: usize,
    pub n_local: usize,
    pub global_size: usize,
    pub local_size: usize,
    pub masks: MaskBatch,
    pub targets: TeacherTargets,
    pub losses: LossConfig,
    pub teacher_temp: f32,
}

impl StepInputs<'_> {
    /// The fixture's batch.
    pub fn batch(&self) -> StepBatch<'_> {
        StepBatch {
            global: self.global,
            local: self.local,
            n_img: self.n_img,
            n_local: self.n_local,
            global_size: self.global_size,
            local_size: self.local_size,
            masks: Some(&self.masks),
        }
    }
}

/// Reads and checks a `ssl_step` fixture's inputs.
pub(crate) fn parse(fx: &Fixture) -> Result<StepInputs<'_>> {
    let vit = vit_config(fx)?;
    let dino =
        head_config(fx, "dino_head")?.ok_or_else(|| fx.error("params.dino_head", "missing"))?;
    let ibot = if fx.param_bool("ibot_separate_head")? {
        Some(head_config(fx, "ibot_head")?.ok_or_else(|| fx.error("params.ibot_head", "missing"))?)
    } else {
        None
    };
    let model = SslModel::new(&vit, dino, ibot)?;
    let source = fx.path.display().to_string();
    let mut student = vec![0f32; model.table.len()];
    let mut teacher = vec![0f32; model.table.len()];
    model.table.load(
        &mut student,
        &fx.inputs_with_prefix("in.param.student.")?,
        &source,
    )?;
    model.table.load(
        &mut teacher,
        &fx.inputs_with_prefix("in.param.teacher.")?,
        &source,
    )?;

    let n_img = fx.param_usize("n_img")?;
    let n_local = fx.param_usize("n_local_crops")?;
    let g_size = fx.param_usize("global_crops_size")?;
    let l_size = fx.param_usize("local_crops_size")?;
    let n_patches = (g_size / vit.patch_size).pow(2);
    let global = fx.input("global_crops")?;
    global.expect_shape(
        "in.global_crops",
        &[2 * n_img, vit.in_chans, g_size, g_size],
    )?;
    let local_data: &[f32] = match fx.input_opt("local_crops")? {
        Some(t) => {
            t.expect_shape(
                "in.local_crops",
                &[n_local * n_img, vit.in_chans, l_size, l_size],
            )?;
            &t.data
        }
        None => &[],
    };
    let (mask_shape, mask_data) = fx.input_u8("masks")?;
    if mask_shape != [2 * n_img, n_patches] {
        return Err(fx.error(
            "in.masks",
            format!(
                "shape {mask_shape:?}, expected [{}, {n_patches}]",
                2 * n_img
            ),
        ));
    }
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
    let weights = fx.input("masks_weight")?;
    if super::rel_err(&masks.masks_weight, &weights.data) > 1e-6 {
        return Err(fx.error("in.masks_weight", "disagrees with in.masks"));
    }

    let k = dino.n_prototypes;
    let ki = ibot.map_or(k, |h| h.n_prototypes);
    let centering = fx.param_str("centering")?;
    let targets = match centering {
        "centering" => {
            let momentum = fx.param_f64("center_momentum")? as f32;
            let dino_center = fx.input("dino_center")?;
            dino_center.expect_shape("in.dino_center", &[1, k])?;
            let ibot_center = fx.input("ibot_center")?;
            ibot_center.expect_shape("in.ibot_center", &[1, 1, ki])?;
            TeacherTargets {
                dino: Centering::Softmax {
                    center: dino_center.data.clone(),
                    momentum,
                },
                ibot: Centering::Softmax {
                    center: ibot_center.data.clone(),
                    momentum,
                },
            }
        }
        "sinkhorn_knopp" => TeacherTargets {
            dino: Centering::sinkhorn_knopp(),
            ibot: Centering::sinkhorn_knopp(),
        },
        other => return Err(fx.error("params.centering", format!("unknown mode '{other}'"))),
    };
    let losses = LossConfig {
        method: Method::Dinov2,
        dino_loss_weight: fx.param_f64("dino_loss_weight")? as f32,
        koleo_loss_weight: fx.param_f64("koleo_loss_weight")? as f32,
        ibot_loss_weight: fx.param_f64("ibot_loss_weight")? as f32,
        student_temp: fx.param_f64("student_temp")? as f32,
    };
    Ok(StepInputs {
        model,
        student,
        teacher,
        global: &global.data,
        local: local_data,
        n_img,
        n_local,
        global_size: g_size,
        local_size: l_size,
        masks,
        targets,
        losses,
        teacher_temp: fx.param_f64("teacher_temp")? as f32,
    })
}

/// One step of the fixture's model on `be`, with the teacher targets read back.
pub(super) fn ssl_step<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let mut inputs = parse(fx)?;
    let (student, teacher) = (be.weights(&inputs.student)?, be.weights(&inputs.teacher)?);
    let mut grads = be.alloc_f32(inputs.model.table.len())?;
    let mut targets = Targets::new(be, &inputs.targets)?;
    let mut step = SslStep::new(be, &inputs.model)?;
    let batch = inputs.batch();
    let inp = SslInputs {
        model: &inputs.model,
        student: &student,
        teacher: &teacher,
        batch: &batch,
        teacher_temp: inputs.teacher_temp,
        losses: &inputs.losses,
        drop_path: None,
    };
    let out = step.forward_backward(be, inp, &mut grads, &mut targets, TeacherProbs::Download)?;
    let grads = be.download_f32(&grads)?;
    inputs.targets = targets.to_host(be)?;
    outputs(&inputs, out, &grads)
}

/// The case's `out.*` tensors from a step's output, the moved teacher targets (in
/// `inputs.targets`) and the student gradients.
pub(crate) fn outputs(inputs: &StepInputs<'_>, step: StepOutput, grads: &[f32]) -> Result<Outputs> {
    let model = &inputs.model;
    let targets = &inputs.targets;
    let masks = &inputs.masks;
    let n_img = inputs.n_img;
    let k = model.dino_head.out_dim;
    let ki = model.patch_head().out_dim;
    let mut outputs = Outputs::new();
    for (name, value) in step.terms() {
        out(&mut outputs, name, Tensor::scalar(value));
    }
    out(
        &mut outputs,
        "teacher_dino_probs",
        Tensor::from_vec(&[2 * n_img, k], step.teacher_dino_probs)?,
    );
    out(
        &mut outputs,
        "teacher_ibot_probs",
        Tensor::from_vec(&[masks.n_masked(), ki], step.teacher_ibot_probs)?,
    );
    if let (Some(dc), Some(ic)) = (targets.dino.center(), targets.ibot.center()) {
        out(
            &mut outputs,
            "dino_center_new",
            Tensor::from_vec(&[1, k], dc.to_vec())?,
        );
        out(
            &mut outputs,
            "ibot_center_new",
            Tensor::from_vec(&[1, 1, ki], ic.to_vec())?,
        );
    }
    for spec in model.table.specs() {
        let t = Tensor::from_vec(&spec.shape, grads[spec.at.range()].to_vec())?;
        out(
            &mut outputs,
            &format!("grad.param.student.{}", spec.name),
            t,
        );
    }
    Ok(outputs)
}
