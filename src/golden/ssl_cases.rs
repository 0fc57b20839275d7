//! Golden cases of the method pieces (see `tests/golden/README.md`): DINO and iBOT losses,
//! KoLeo, schedules, parameter groups, AdamW with a frozen last layer, clipping, EMA, k-NN.
//! `ssl_step` is composed by the training step and answered elsewhere.

use super::nn_cases::upload;
use super::{out, Fixture, Outputs};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::eval::knn_classify;
use crate::io::Value;
use crate::nn::params::ParamRef;
use crate::optim::{
    ema_update, AdamHyper, AdamW, AdamWState, GradClipper, GroupSettings, LayerDecay, ParamGroups,
    ScheduleConfig, Schedules, SubmoduleSpan,
};
use crate::ssl::dino_loss::dino_terms;
use crate::ssl::{
    dino_loss_forward_backward, ibot_loss_forward_backward, koleo_loss_forward_backward, Centering,
    DinoLossTerms, DinoPairs, DinoStudent, IbotPairs, TargetState,
};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

pub(crate) fn f32_param(fx: &Fixture, key: &str) -> Result<f32> {
    fx.param_f64(key).map(|v| v as f32)
}

/// The centering mode of a loss fixture (`params.mode`), with its state from the inputs.
pub(crate) fn centering(fx: &Fixture, k: usize) -> Result<Centering> {
    match fx.param_str("mode")? {
        "centering" => Ok(Centering::Softmax {
            center: fx.input("center")?.data.clone(),
            momentum: f32_param(fx, "center_momentum")?,
        }),
        "sinkhorn" => Ok(Centering::SinkhornKnopp {
            n_iters: fx.param_usize("sinkhorn_iterations")?,
        }),
        other => Err(fx.error("params.mode", format!("unknown mode '{other}'"))),
    }
    .and_then(|c| match c.center() {
        Some(center) if center.len() != k => Err(fx.error(
            "in.center",
            format!("{} values, expected K = {k}", center.len()),
        )),
        _ => Ok(c),
    })
}

/// The inputs of a `dino_loss_*` fixture.
pub(crate) struct DinoLossCase<'a> {
    pub b: usize,
    pub nl: usize,
    pub k: usize,
    pub student_temp: f32,
    pub teacher_temp: f32,
    pub loss_weight: f32,
    pub student_global: &'a [f32], // [2B, K]
    pub student_local: Vec<f32>,   // [nl·B, K]
    pub teacher_global: &'a [f32], // [2B, K]
    pub centering: Centering,
}

pub(crate) fn dino_loss_case(fx: &Fixture) -> Result<DinoLossCase<'_>> {
    let b = fx.param_usize("batch_per_crop")?;
    let nl = fx.param_usize("n_local_crops")?;
    let k = fx.param_usize("out_dim")?;
    let sg = fx.input("student_global")?;
    sg.expect_shape("student_global", &[2 * b, k])?;
    let tg = fx.input("teacher_global")?;
    tg.expect_shape("teacher_global", &[2 * b, k])?;
    let student_local = if nl > 0 {
        let sl = fx.input("student_local")?;
        sl.expect_shape("student_local", &[nl * b, k])?;
        sl.data.clone()
    } else {
        Vec::new()
    };
    Ok(DinoLossCase {
        b,
        nl,
        k,
        student_temp: f32_param(fx, "student_temp")?,
        teacher_temp: f32_param(fx, "teacher_temp")?,
        loss_weight: f32_param(fx, "dino_loss_weight")?,
        student_global: &sg.data,
        student_local,
        teacher_global: &tg.data,
        centering: centering(fx, k)?,
    })
}

/// The `out.*` tensors of a `dino_loss_*` case (`probs`, `dg`, `dl` as computed; the centering
/// after its update).
pub(crate) fn dino_loss_outputs(
    case: &DinoLossCase<'_>,
    terms: DinoLossTerms,
    probs: Vec<f32>,
    dg: Vec<f32>,
    dl: Vec<f32>,
    centering: &Centering,
) -> Result<Outputs> {
    let (b, nl, k) = (case.b, case.nl, case.k);
    let mut o = Outputs::new();
    out(&mut o, "loss", Tensor::scalar(terms.total));
    out(
        &mut o,
        "dino_global_crops_loss",
        Tensor::scalar(terms.global),
    );
    if nl > 0 {
        out(&mut o, "dino_local_crops_loss", Tensor::scalar(terms.local));
        out(
            &mut o,
            "grad.student_local",
            Tensor::from_vec(&[nl * b, k], dl)?,
        );
    }
    out(
        &mut o,
        "teacher_probs",
        Tensor::from_vec(&[2 * b, k], probs)?,
    );
    out(
        &mut o,
        "grad.student_global",
        Tensor::from_vec(&[2 * b, k], dg)?,
    );
    if let Some(c) = centering.center() {
        out(&mut o, "center_new", Tensor::from_vec(&[1, k], c.to_vec())?);
    }
    Ok(o)
}

pub(super) fn dino_loss<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let case = dino_loss_case(fx)?;
    let (b, nl, k) = (case.b, case.nl, case.k);
    let mut targets = TargetState::new(be, &case.centering)?;
    let teacher = upload(be, case.teacher_global)?;
    let (sg, sl) = (
        upload(be, case.student_global)?,
        upload(be, &case.student_local)?,
    );
    let mut probs = be.alloc_f32(2 * b * k)?;
    targets.teacher_probs(be, &mut probs, &teacher, (2 * b, k), case.teacher_temp)?;
    let (mut dg, mut dl, mut terms) = (
        be.alloc_f32(2 * b * k)?,
        be.alloc_f32(nl * b * k)?,
        be.alloc_f32(2)?,
    );
    let student = DinoStudent::<B> {
        global: &sg,
        local: &sl,
        d_global: &mut dg,
        d_local: &mut dl,
    };
    let mut pairs = DinoPairs::default();
    let (temp, weight) = (case.student_temp, case.loss_weight);
    dino_loss_forward_backward(
        be,
        &mut pairs,
        &mut terms,
        student,
        &probs,
        (b, nl, k),
        temp,
        weight,
    )?;
    let terms = dino_terms(&be.download_f32(&terms)?, case.loss_weight);
    let (probs, dg, dl) = (
        be.download_f32(&probs)?,
        be.download_f32(&dg)?,
        be.download_f32(&dl)?,
    );
    let centering = targets.to_host(be)?;
    dino_loss_outputs(&case, terms, probs, dg, dl, &centering)
}

/// The inputs of an `ibot_loss` fixture.
pub(crate) struct IbotLossCase<'a> {
    pub m: usize,
    pub k: usize,
    pub n_crops: usize,
    pub student_temp: f32,
    pub teacher_temp: f32,
    pub student: &'a [f32],      // [M, K]
    pub teacher: &'a [f32],      // [M, K]
    pub masks_weight: &'a [f32], // [M]
    pub centering: Centering,
}

pub(crate) fn ibot_loss_case(fx: &Fixture) -> Result<IbotLossCase<'_>> {
    let k = fx.param_usize("out_dim")?;
    let (mask_shape, _) = fx.input_u8("masks")?;
    let n_crops = *mask_shape
        .first()
        .ok_or_else(|| fx.error("in.masks", "needs a crop dimension"))?;
    let s = fx.input("student_patch_masked")?;
    let t = fx.input("teacher_patch_masked")?;
    let m = t.shape.first().copied().unwrap_or(0);
    s.expect_shape("student_patch_masked", &[m, k])?;
    t.expect_shape("teacher_patch_masked", &[m, k])?;
    let weights = fx.input("masks_weight")?;
    weights.expect_shape("masks_weight", &[m])?;
    Ok(IbotLossCase {
        m,
        k,
        n_crops,
        student_temp: f32_param(fx, "student_temp")?,
        teacher_temp: f32_param(fx, "teacher_temp")?,
        student: &s.data,
        teacher: &t.data,
        masks_weight: &weights.data,
        centering: centering(fx, k)?,
    })
}

pub(crate) fn ibot_loss_outputs(
    case: &IbotLossCase<'_>,
    loss: f32,
    probs: Vec<f32>,
    ds: Vec<f32>,
    centering: &Centering,
) -> Result<Outputs> {
    let (m, k) = (case.m, case.k);
    let mut o = Outputs::new();
    out(&mut o, "loss", Tensor::scalar(loss));
    out(&mut o, "teacher_probs", Tensor::from_vec(&[m, k], probs)?);
    out(
        &mut o,
        "grad.student_patch_masked",
        Tensor::from_vec(&[m, k], ds)?,
    );
    if let Some(c) = centering.center() {
        out(
            &mut o,
            "center_new",
            Tensor::from_vec(&[1, 1, k], c.to_vec())?,
        );
    }
    Ok(o)
}

pub(super) fn ibot_loss<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let case = ibot_loss_case(fx)?;
    let (m, k) = (case.m, case.k);
    let mut targets = TargetState::new(be, &case.centering)?;
    let (teacher, student) = (upload(be, case.teacher)?, upload(be, case.student)?);
    let mut probs = be.alloc_f32(m * k)?;
    targets.teacher_probs(be, &mut probs, &teacher, (m, k), case.teacher_temp)?;
    let mut pairs = IbotPairs::default();
    pairs.set(be, case.masks_weight, case.n_crops, m)?;
    let (mut ds, mut loss) = (be.alloc_f32(m * k)?, be.alloc_f32(1)?);
    let temps = (case.student_temp, 1.0);
    ibot_loss_forward_backward(be, &pairs, &mut loss, &mut ds, &student, &probs, k, temps)?;
    let loss = be.download_f32(&loss)?[0];
    let (probs, ds) = (be.download_f32(&probs)?, be.download_f32(&ds)?);
    let centering = targets.to_host(be)?;
    ibot_loss_outputs(&case, loss, probs, ds, &centering)
}

/// The `[b, d]` input of a `koleo` fixture.
pub(crate) fn koleo_input(fx: &Fixture) -> Result<(&Tensor, usize, usize)> {
    let x = fx.input("x")?;
    match x.shape[..] {
        [b, d] => Ok((x, b, d)),
        _ => Err(fx.error("in.x", format!("expected [b, d], got {:?}", x.shape))),
    }
}

pub(super) fn koleo<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let (x, b, d) = koleo_input(fx)?;
    let x_dev = upload(be, &x.data)?;
    let (mut dx, mut loss) = (be.alloc_f32(b * d)?, be.alloc_f32(1)?);
    let mut state = be.koleo_state(b, d)?;
    koleo_loss_forward_backward(be, &mut state, &mut loss, &mut dx, &x_dev, (b, d), 1.0)?;
    let mut o = Outputs::new();
    out(&mut o, "loss", Tensor::scalar(be.download_f32(&loss)?[0]));
    out(
        &mut o,
        "grad.x",
        Tensor::from_vec(&[b, d], be.download_f32(&dx)?)?,
    );
    Ok(o)
}

pub(super) fn schedules(fx: &Fixture) -> Result<Outputs> {
    let u = |k: &str| fx.param_usize(k).map(|v| v as u64);
    let f = |k: &str| fx.param_f64(k);
    let rule = fx.param_str("scaling_rule")?;
    if rule != "sqrt_wrt_1024" {
        return Err(Error::Unsupported(format!("lr scaling rule '{rule}'")));
    }
    let cfg = ScheduleConfig {
        epochs: u("epochs")?,
        epoch_length: u("OFFICIAL_EPOCH_LENGTH")?,
        warmup_epochs: u("warmup_epochs")?,
        freeze_last_layer_epochs: u("freeze_last_layer_epochs")?,
        warmup_teacher_temp_epochs: u("warmup_teacher_temp_epochs")?,
        batch_size_per_gpu: u("batch_size_per_gpu")?,
        world_size: u("world_size")?,
        base_lr: f("base_lr")?,
        min_lr: f("min_lr")?,
        weight_decay: f("weight_decay")?,
        weight_decay_end: f("weight_decay_end")?,
        momentum_teacher: f("momentum_teacher")?,
        final_momentum_teacher: f("final_momentum_teacher")?,
        warmup_teacher_temp: f("warmup_teacher_temp")?,
        teacher_temp: f("teacher_temp")?,
    };
    let s = Schedules::new(&cfg)?;
    let n_out = u("n_out")?;
    let vals: Vec<_> = (0..n_out).map(|it| s.at(it)).collect();
    let series = |g: fn(&crate::optim::ScheduledValues) -> f64| {
        Tensor::from_vec(
            &[n_out as usize],
            vals.iter().map(|v| g(v) as f32).collect(),
        )
    };
    let mut o = Outputs::new();
    out(&mut o, "lr", series(|v| v.lr)?);
    out(&mut o, "wd", series(|v| v.wd)?);
    out(&mut o, "momentum", series(|v| v.momentum)?);
    out(&mut o, "teacher_temp", series(|v| v.teacher_temp)?);
    out(&mut o, "last_layer_lr", series(|v| v.last_layer_lr)?);
    out(&mut o, "lr_peak", Tensor::scalar(s.lr_peak as f32));
    Ok(o)
}

/// The layer decay of a `param_groups` fixture.
fn fixture_layer_decay(fx: &Fixture) -> Result<LayerDecay> {
    Ok(LayerDecay {
        depth: fx.param_usize("depth")?,
        layerwise_decay: fx.param_f64("layerwise_decay")?,
        patch_embed_lr_mult: fx.param_f64("patch_embed_lr_mult")?,
    })
}

/// The parameter names of a `param_groups` fixture (metadata `param_names`).
fn fixture_param_names(fx: &Fixture) -> Result<Vec<String>> {
    serde_json::from_value(fx.meta_json("param_names")?)
        .map_err(|e| fx.error("metadata.param_names", e.to_string()))
}

pub(super) fn param_groups(fx: &Fixture) -> Result<Outputs> {
    let names = fixture_param_names(fx)?;
    let groups = ParamGroups::from_names(&names, &fixture_layer_decay(fx)?)?;
    let p = names.len();
    let col = |g: fn(&GroupSettings) -> f32| {
        Tensor::from_vec(&[p], groups.per_param.iter().map(g).collect())
    };
    let mut o = Outputs::new();
    out(&mut o, "lr_multiplier", col(|s| s.lr_multiplier as f32)?);
    out(&mut o, "wd_multiplier", col(|s| s.wd_multiplier as f32)?);
    o.insert(
        "out.is_last_layer".into(),
        Value::U8 {
            shape: vec![p],
            data: groups
                .per_param
                .iter()
                .map(|s| s.is_last_layer as u8)
                .collect(),
        },
    );
    Ok(o)
}

/// Named tensors laid out one after the other in a flat buffer (name order).
pub(crate) struct Flat {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub refs: Vec<ParamRef>,
    pub data: Vec<f32>,
}

impl Flat {
    fn new(tensors: &BTreeMap<String, Tensor>) -> Self {
        let mut f = Flat {
            names: Vec::new(),
            shapes: Vec::new(),
            refs: Vec::new(),
            data: Vec::new(),
        };
        for (name, t) in tensors {
            f.refs.push(ParamRef {
                offset: f.data.len(),
                len: t.numel(),
            });
            f.names.push(name.clone());
            f.shapes.push(t.shape.clone());
            f.data.extend_from_slice(&t.data);
        }
        f
    }
}

/// The inputs of an `adamw_freeze` fixture: the parameters laid out flat (name order), their
/// settings, and each step's flat gradients and scheduled scalars.
pub(crate) struct AdamwCase {
    pub steps: usize,
    pub hyper: AdamHyper,
    pub flat: Flat,
    pub settings: Vec<(ParamRef, GroupSettings)>,
    /// `[steps][P]`
    pub grads: Vec<Vec<f32>>,
    pub lr: Vec<f32>,
    pub wd: Vec<f32>,
    pub last_layer_lr: Vec<f32>,
}

pub(crate) fn adamw_case(fx: &Fixture) -> Result<AdamwCase> {
    let steps = fx.param_usize("steps")?;
    let hyper = AdamHyper {
        beta1: fx.param_f64("beta1")?,
        beta2: fx.param_f64("beta2")?,
        eps: fx.param_f64("eps")?,
    };
    if fx.param_bool("amsgrad")? {
        return Err(Error::Unsupported("AMSGrad".into()));
    }
    let groups = fx.param("groups")?;
    let flat = Flat::new(&fx.inputs_with_prefix("in.param.")?);
    let mut settings = Vec::new();
    for (name, r) in flat.names.iter().zip(&flat.refs) {
        let g = groups
            .get(name)
            .ok_or_else(|| fx.error(&format!("params.groups.{name}"), "missing"))?;
        let num = |k: &str| {
            g.get(k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| fx.error(&format!("params.groups.{name}.{k}"), "not a number"))
        };
        let s = GroupSettings {
            lr_multiplier: num("lr_multiplier")?,
            wd_multiplier: num("wd_multiplier")?,
            is_last_layer: g
                .get("is_last_layer")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        settings.push((*r, s));
    }
    let grads = fx.inputs_with_prefix("in.grads.")?;
    let lr = fx.input("lr")?;
    let wd = fx.input("wd")?;
    let ll = fx.input("last_layer_lr")?;
    lr.expect_shape("adamw_freeze lr", &[steps])?;
    wd.expect_shape("adamw_freeze wd", &[steps])?;
    ll.expect_shape("adamw_freeze last_layer_lr", &[steps])?;
    let mut per_step = Vec::with_capacity(steps);
    for s in 0..steps {
        let mut grad = vec![0f32; flat.data.len()];
        for ((name, r), shape) in flat.names.iter().zip(&flat.refs).zip(&flat.shapes) {
            let g = grads
                .get(name)
                .ok_or_else(|| fx.error(&format!("in.grads.{name}"), "missing"))?;
            let mut want = vec![steps];
            want.extend(shape);
            g.expect_shape("grads", &want)?;
            grad[r.range()].copy_from_slice(&g.data[s * r.len..(s + 1) * r.len]);
        }
        per_step.push(grad);
    }
    Ok(AdamwCase {
        steps,
        hyper,
        flat,
        settings,
        grads: per_step,
        lr: lr.data.clone(),
        wd: wd.data.clone(),
        last_layer_lr: ll.data.clone(),
    })
}

/// The `out.*` tensors of an `adamw_freeze` case from the `[steps]` histories of the flat
/// parameters, first and second moments.
pub(crate) fn adamw_outputs(case: &AdamwCase, hist: &[Vec<Vec<f32>>; 3]) -> Result<Outputs> {
    let (flat, steps) = (&case.flat, case.steps);
    let mut o = Outputs::new();
    for (prefix, h) in ["param", "exp_avg", "exp_avg_sq"].iter().zip(hist) {
        for ((name, r), shape) in flat.names.iter().zip(&flat.refs).zip(&flat.shapes) {
            let mut sh = vec![steps];
            sh.extend(shape);
            let data = h
                .iter()
                .flat_map(|buf| buf[r.range()].iter().copied())
                .collect();
            out(
                &mut o,
                &format!("{prefix}.{name}"),
                Tensor::from_vec(&sh, data)?,
            );
        }
    }
    out(
        &mut o,
        "step",
        Tensor::from_vec(&[steps], (1..=steps).map(|s| s as f32).collect())?,
    );
    Ok(o)
}

pub(super) fn adamw_freeze<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let case = adamw_case(fx)?;
    let n = case.flat.data.len();
    let mut params = upload(be, &case.flat.data)?;
    let state = AdamWState::zeros(n);
    let mut opt = AdamW::from_parts(be, &case.settings, n, case.hyper, &state)?;
    // [S, P] history of each buffer.
    let mut hist = [Vec::new(), Vec::new(), Vec::new()];
    for s in 0..case.steps {
        let grads = upload(be, &case.grads[s])?;
        let lrs = (
            case.lr[s] as f64,
            case.last_layer_lr[s] as f64,
            case.wd[s] as f64,
        );
        opt.step(be, &mut params, &grads, lrs)?;
        let st = opt.state(be)?;
        hist[0].push(be.download_f32(&params)?);
        hist[1].push(st.exp_avg);
        hist[2].push(st.exp_avg_sq);
    }
    adamw_outputs(&case, &hist)
}

/// The inputs of a `clip_grad` fixture: every submodule's gradients in one flat buffer.
pub(crate) struct ClipCase {
    pub max_norm: f32,
    pub submodules: Vec<String>,
    /// Each submodule's start in `data` and its tensors.
    pub flats: Vec<(usize, Flat)>,
    pub spans: Vec<SubmoduleSpan>,
    pub data: Vec<f32>,
}

pub(crate) fn clip_case(fx: &Fixture) -> Result<ClipCase> {
    let max_norm = f32_param(fx, "max_norm")?;
    let norm_type = fx.param_f64("norm_type")?;
    if norm_type != 2.0 {
        return Err(Error::Unsupported(format!(
            "gradient clipping with norm type {norm_type}"
        )));
    }
    let submodules: Vec<String> = serde_json::from_value(fx.param("submodules")?.clone())
        .map_err(|e| fx.error("params.submodules", e.to_string()))?;
    let mut spans = Vec::new();
    let mut flats = Vec::new();
    let mut data = Vec::new();
    for sub in &submodules {
        let flat = Flat::new(&fx.inputs_with_prefix(&format!("in.grads.{sub}."))?);
        let start = data.len();
        data.extend_from_slice(&flat.data);
        spans.push(SubmoduleSpan {
            name: sub.clone(),
            ranges: std::iter::once(start..data.len()).collect(),
        });
        flats.push((start, flat));
    }
    Ok(ClipCase {
        max_norm,
        submodules,
        flats,
        spans,
        data,
    })
}

/// The `out.*` tensors of a `clip_grad` case from the clipped flat buffer and the norms.
pub(crate) fn clip_outputs(case: &ClipCase, clipped: &[f32], norms: &[f32]) -> Result<Outputs> {
    let mut o = Outputs::new();
    for ((sub, (start, flat)), &norm) in case.submodules.iter().zip(&case.flats).zip(norms) {
        for ((name, r), shape) in flat.names.iter().zip(&flat.refs).zip(&flat.shapes) {
            let d = clipped[start + r.offset..start + r.offset + r.len].to_vec();
            out(
                &mut o,
                &format!("clipped.{sub}.{name}"),
                Tensor::from_vec(shape, d)?,
            );
        }
        out(&mut o, &format!("total_norm.{sub}"), Tensor::scalar(norm));
    }
    Ok(o)
}

pub(super) fn clip_grad<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let case = clip_case(fx)?;
    let mut data = upload(be, &case.data)?;
    let mut clipper = GradClipper::new(be, &case.spans)?;
    clipper.clip(be, &mut data, case.max_norm)?;
    let norms = be.download_f32(clipper.norms())?;
    clip_outputs(&case, &be.download_f32(&data)?, &norms)
}

pub(super) fn ema<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let m = fx.param_f64("momentum")?;
    let teacher = fx.inputs_with_prefix("in.teacher.")?;
    let student = fx.inputs_with_prefix("in.student.")?;
    let mut o = Outputs::new();
    for (name, t) in teacher {
        let s = student
            .get(&name)
            .ok_or_else(|| fx.error(&format!("in.student.{name}"), "missing"))?;
        s.expect_shape("student", &t.shape)?;
        let (mut td, sd) = (upload(be, &t.data)?, upload(be, &s.data)?);
        ema_update(be, &mut td, &sd, m)?;
        let data = be.download_f32(&td)?;
        out(
            &mut o,
            &format!("teacher_new.{name}"),
            Tensor::from_vec(&t.shape, data)?,
        );
    }
    Ok(o)
}

pub(super) fn knn(fx: &Fixture) -> Result<Outputs> {
    let train = fx.input("train_features")?;
    let test = fx.input("test_features")?;
    let (_, labels) = fx.input_i64("train_labels")?;
    let labels: Vec<usize> = labels
        .iter()
        .map(|&l| {
            usize::try_from(l)
                .map_err(|_| fx.error("in.train_labels", format!("negative label {l}")))
        })
        .collect::<Result<_>>()?;
    let dim = *train.shape.last().unwrap_or(&0);
    let nb_knn: Vec<usize> = serde_json::from_value(fx.param("nb_knn")?.clone())
        .map_err(|e| fx.error("params.nb_knn", e.to_string()))?;
    let r = knn_classify(
        &train.data,
        &labels,
        &test.data,
        dim,
        &nb_knn,
        f32_param(fx, "T")?,
    )?;
    let n_test = test.data.len() / dim.max(1);
    let i64s = |v: &[usize], shape: Vec<usize>| Value::I64 {
        shape,
        data: v.iter().map(|&x| x as i64).collect(),
    };
    let mut o = Outputs::new();
    out(
        &mut o,
        "topk_sims",
        Tensor::from_vec(&[n_test, r.max_k], r.topk_sims.clone())?,
    );
    o.insert(
        "out.topk_labels".into(),
        i64s(&r.topk_labels, vec![n_test, r.max_k]),
    );
    for pk in &r.per_k {
        out(
            &mut o,
            &format!("probas_k{}", pk.k),
            Tensor::from_vec(&[n_test, r.num_classes], pk.probas.clone())?,
        );
        o.insert(format!("out.top1_k{}", pk.k), i64s(&pk.top1, vec![n_test]));
    }
    Ok(o)
}
