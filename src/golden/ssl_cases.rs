//! Golden cases of the method pieces (see `tests/golden/README.md`): DINO and iBOT losses,
//! KoLeo, schedules, parameter groups, AdamW with a frozen last layer, clipping, EMA, k-NN.

use super::{put, upload, Fixture, Outputs};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::eval::knn_classify;
use crate::io::Value;
use crate::nn::params::ParamRef;
use crate::optim::{
    ema_update, AdamHyper, AdamW, AdamWState, GradClipper, GroupSettings, LayerDecay, ParamGroups,
    ScheduleConfig, ScheduledValues, Schedules, SubmoduleSpan,
};
use crate::ssl::dino_loss::dino_terms;
use crate::ssl::{
    dino_loss_forward_backward, ibot_loss_forward_backward, koleo_loss_forward_backward, Centering,
    DinoPairs, DinoStudent, IbotPairs, TargetState,
};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// The centering mode of a loss fixture (`params.mode`), with its state from the inputs.
fn centering(fx: &Fixture, k: usize) -> Result<Centering> {
    match fx.param_str("mode")? {
        "centering" => {
            let center = fx.input("center")?;
            if center.numel() != k {
                let detail = format!("{} values, expected K = {k}", center.numel());
                return Err(fx.error("in.center", detail));
            }
            Ok(Centering::Softmax {
                center: center.data.clone(),
                momentum: fx.param_f32("center_momentum")?,
            })
        }
        "sinkhorn" => Ok(Centering::SinkhornKnopp {
            n_iters: fx.param_usize("sinkhorn_iterations")?,
        }),
        other => Err(fx.error("params.mode", format!("unknown mode '{other}'"))),
    }
}

pub(super) fn dino_loss<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let b = fx.param_usize("batch_per_crop")?;
    let nl = fx.param_usize("n_local_crops")?;
    let k = fx.param_usize("out_dim")?;
    let student_global = fx.input_shaped("student_global", &[2 * b, k])?;
    let teacher_global = fx.input_shaped("teacher_global", &[2 * b, k])?;
    let student_local: &[f32] = if nl > 0 {
        &fx.input_shaped("student_local", &[nl * b, k])?.data
    } else {
        &[]
    };
    let weight = fx.param_f32("dino_loss_weight")?;
    let mut targets = TargetState::new(be, &centering(fx, k)?)?;
    let teacher = upload(be, &teacher_global.data)?;
    let (sg, sl) = (
        upload(be, &student_global.data)?,
        upload(be, student_local)?,
    );
    let mut probs = be.alloc_f32(2 * b * k)?;
    let teacher_temp = fx.param_f32("teacher_temp")?;
    targets.teacher_probs(be, &mut probs, &teacher, (2 * b, k), teacher_temp)?;
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
    let (mut pairs, temp) = (DinoPairs::default(), fx.param_f32("student_temp")?);
    let dims = (b, nl, k);
    dino_loss_forward_backward(
        be, &mut pairs, &mut terms, student, &probs, dims, temp, weight,
    )?;
    let terms = dino_terms(&be.download_f32(&terms)?, weight);
    let mut o = Outputs::new();
    put(&mut o, "loss", &[1], vec![terms.total])?;
    put(&mut o, "dino_global_crops_loss", &[1], vec![terms.global])?;
    if nl > 0 {
        put(&mut o, "dino_local_crops_loss", &[1], vec![terms.local])?;
        put(
            &mut o,
            "grad.student_local",
            &[nl * b, k],
            be.download_f32(&dl)?,
        )?;
    }
    put(
        &mut o,
        "teacher_probs",
        &[2 * b, k],
        be.download_f32(&probs)?,
    )?;
    put(
        &mut o,
        "grad.student_global",
        &[2 * b, k],
        be.download_f32(&dg)?,
    )?;
    if let Some(c) = targets.to_host(be)?.center() {
        put(&mut o, "center_new", &[1, k], c.to_vec())?;
    }
    Ok(o)
}

pub(super) fn ibot_loss<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let k = fx.param_usize("out_dim")?;
    let (mask_shape, _) = fx.input_u8("masks")?;
    let n_crops = *mask_shape
        .first()
        .ok_or_else(|| fx.error("in.masks", "needs a crop dimension"))?;
    let t = fx.input("teacher_patch_masked")?;
    let m = t.shape.first().copied().unwrap_or(0);
    fx.check_shape("in.teacher_patch_masked", &t.shape, &[m, k])?;
    let s = fx.input_shaped("student_patch_masked", &[m, k])?;
    let masks_weight = fx.input_shaped("masks_weight", &[m])?;
    let mut targets = TargetState::new(be, &centering(fx, k)?)?;
    let (teacher, student) = (upload(be, &t.data)?, upload(be, &s.data)?);
    let mut probs = be.alloc_f32(m * k)?;
    let teacher_temp = fx.param_f32("teacher_temp")?;
    targets.teacher_probs(be, &mut probs, &teacher, (m, k), teacher_temp)?;
    let mut pairs = IbotPairs::default();
    pairs.set(be, &masks_weight.data, n_crops, m)?;
    let (mut ds, mut loss) = (be.alloc_f32(m * k)?, be.alloc_f32(1)?);
    let temps = (fx.param_f32("student_temp")?, 1.0);
    ibot_loss_forward_backward(be, &pairs, &mut loss, &mut ds, &student, &probs, k, temps)?;
    let mut o = Outputs::new();
    put(&mut o, "loss", &[1], be.download_f32(&loss)?)?;
    put(&mut o, "teacher_probs", &[m, k], be.download_f32(&probs)?)?;
    put(
        &mut o,
        "grad.student_patch_masked",
        &[m, k],
        be.download_f32(&ds)?,
    )?;
    if let Some(c) = targets.to_host(be)?.center() {
        put(&mut o, "center_new", &[1, 1, k], c.to_vec())?;
    }
    Ok(o)
}

pub(super) fn koleo<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let x = fx.input("x")?;
    let [b, d] = x.shape[..] else {
        return Err(fx.error("in.x", format!("expected [b, d], got {:?}", x.shape)));
    };
    let x_dev = upload(be, &x.data)?;
    let (mut dx, mut loss) = (be.alloc_f32(b * d)?, be.alloc_f32(1)?);
    let mut state = be.koleo_state(b, d)?;
    koleo_loss_forward_backward(be, &mut state, &mut loss, &mut dx, &x_dev, (b, d), 1.0)?;
    let mut o = Outputs::new();
    put(&mut o, "loss", &[1], be.download_f32(&loss)?)?;
    put(&mut o, "grad.x", &[b, d], be.download_f32(&dx)?)?;
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
    let series =
        |g: fn(&ScheduledValues) -> f64| -> Vec<f32> { vals.iter().map(|v| g(v) as f32).collect() };
    let n = [n_out as usize];
    let mut o = Outputs::new();
    put(&mut o, "lr", &n, series(|v| v.lr))?;
    put(&mut o, "wd", &n, series(|v| v.wd))?;
    put(&mut o, "momentum", &n, series(|v| v.momentum))?;
    put(&mut o, "teacher_temp", &n, series(|v| v.teacher_temp))?;
    put(&mut o, "last_layer_lr", &n, series(|v| v.last_layer_lr))?;
    put(&mut o, "lr_peak", &[1], vec![s.lr_peak as f32])?;
    Ok(o)
}

pub(super) fn param_groups(fx: &Fixture) -> Result<Outputs> {
    let names: Vec<String> = serde_json::from_value(fx.meta_json("param_names")?)
        .map_err(|e| fx.error("metadata.param_names", e.to_string()))?;
    let decay = LayerDecay {
        depth: fx.param_usize("depth")?,
        layerwise_decay: fx.param_f64("layerwise_decay")?,
        patch_embed_lr_mult: fx.param_f64("patch_embed_lr_mult")?,
    };
    let groups = ParamGroups::from_names(&names, &decay)?;
    let p = [names.len()];
    let col =
        |g: fn(&GroupSettings) -> f32| -> Vec<f32> { groups.per_param.iter().map(g).collect() };
    let mut o = Outputs::new();
    put(&mut o, "lr_multiplier", &p, col(|s| s.lr_multiplier as f32))?;
    put(&mut o, "wd_multiplier", &p, col(|s| s.wd_multiplier as f32))?;
    let is_last_layer = groups.per_param.iter().map(|s| s.is_last_layer as u8);
    o.insert(
        "out.is_last_layer".into(),
        Value::U8 {
            shape: p.to_vec(),
            data: is_last_layer.collect(),
        },
    );
    Ok(o)
}

/// Named tensors laid out one after the other in a flat buffer (name order), with each one's
/// name, place and shape.
struct Flat {
    entries: Vec<(String, ParamRef, Vec<usize>)>,
    data: Vec<f32>,
}

impl Flat {
    fn new(tensors: &BTreeMap<String, Tensor>) -> Self {
        let (mut entries, mut data) = (Vec::new(), Vec::new());
        for (name, t) in tensors {
            let at = ParamRef {
                offset: data.len(),
                len: t.numel(),
            };
            entries.push((name.clone(), at, t.shape.clone()));
            data.extend_from_slice(&t.data);
        }
        Flat { entries, data }
    }
}

/// AdamW over the fixture's parameters laid out flat (name order) with their group settings,
/// one step per row of the `in.grads.*` and scheduled scalars; the parameters and both moments
/// after every step.
pub(super) fn adamw_freeze<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
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
    for (name, r, _) in &flat.entries {
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
    let lr = &fx.input_shaped("lr", &[steps])?.data;
    let wd = &fx.input_shaped("wd", &[steps])?.data;
    let last_layer_lr = &fx.input_shaped("last_layer_lr", &[steps])?.data;
    let n = flat.data.len();
    let mut params = upload(be, &flat.data)?;
    let state = AdamWState::zeros(n);
    let mut opt = AdamW::from_parts(be, &settings, n, hyper, &state)?;
    // [S, P] history of the parameters and both moments.
    let mut hist = [Vec::new(), Vec::new(), Vec::new()];
    for s in 0..steps {
        let mut grad = vec![0f32; n];
        for (name, r, shape) in &flat.entries {
            let g = grads
                .get(name)
                .ok_or_else(|| fx.error(&format!("in.grads.{name}"), "missing"))?;
            let want: Vec<usize> = [steps].iter().chain(shape).copied().collect();
            fx.check_shape(&format!("in.grads.{name}"), &g.shape, &want)?;
            grad[r.range()].copy_from_slice(&g.data[s * r.len..(s + 1) * r.len]);
        }
        let grads = upload(be, &grad)?;
        let lrs = (lr[s] as f64, last_layer_lr[s] as f64, wd[s] as f64);
        opt.step(be, &mut params, &grads, lrs)?;
        let st = opt.state(be)?;
        hist[0].push(be.download_f32(&params)?);
        hist[1].push(st.exp_avg);
        hist[2].push(st.exp_avg_sq);
    }
    let mut o = Outputs::new();
    for (prefix, h) in ["param", "exp_avg", "exp_avg_sq"].iter().zip(&hist) {
        for (name, r, shape) in &flat.entries {
            let sh: Vec<usize> = [steps].iter().chain(shape).copied().collect();
            let data = h.iter().flat_map(|buf| buf[r.range()].iter().copied());
            put(&mut o, &format!("{prefix}.{name}"), &sh, data.collect())?;
        }
    }
    put(
        &mut o,
        "step",
        &[steps],
        (1..=steps).map(|s| s as f32).collect(),
    )?;
    Ok(o)
}

/// Every submodule's gradients in one flat buffer, clipped per submodule.
pub(super) fn clip_grad<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let max_norm = fx.param_f32("max_norm")?;
    let norm_type = fx.param_f64("norm_type")?;
    if norm_type != 2.0 {
        return Err(Error::Unsupported(format!(
            "gradient clipping with norm type {norm_type}"
        )));
    }
    let submodules: Vec<String> = fx.param_as("submodules")?;
    let mut spans = Vec::new();
    // Each submodule's start in `data` and its tensors.
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
    let mut data = upload(be, &data)?;
    let mut clipper = GradClipper::new(be, &spans)?;
    clipper.clip(be, &mut data, max_norm)?;
    let norms = be.download_f32(clipper.norms())?;
    let clipped = be.download_f32(&data)?;
    let mut o = Outputs::new();
    for ((sub, (start, flat)), &norm) in submodules.iter().zip(&flats).zip(&norms) {
        for (name, r, shape) in &flat.entries {
            let d = clipped[start + r.offset..start + r.offset + r.len].to_vec();
            put(&mut o, &format!("clipped.{sub}.{name}"), shape, d)?;
        }
        put(&mut o, &format!("total_norm.{sub}"), &[1], vec![norm])?;
    }
    Ok(o)
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
        fx.check_shape(&format!("in.student.{name}"), &s.shape, &t.shape)?;
        let (mut td, sd) = (upload(be, &t.data)?, upload(be, &s.data)?);
        ema_update(be, &mut td, &sd, m)?;
        put(
            &mut o,
            &format!("teacher_new.{name}"),
            &t.shape,
            be.download_f32(&td)?,
        )?;
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
    let nb_knn: Vec<usize> = fx.param_as("nb_knn")?;
    let temp = fx.param_f32("T")?;
    let r = knn_classify(&train.data, &labels, &test.data, dim, &nb_knn, temp)?;
    let n_test = test.data.len() / dim.max(1);
    let i64s = |v: &[usize], shape: Vec<usize>| Value::I64 {
        shape,
        data: v.iter().map(|&x| x as i64).collect(),
    };
    let mut o = Outputs::new();
    put(&mut o, "topk_sims", &[n_test, r.max_k], r.topk_sims.clone())?;
    o.insert(
        "out.topk_labels".into(),
        i64s(&r.topk_labels, vec![n_test, r.max_k]),
    );
    for pk in &r.per_k {
        let probas = pk.probas.clone();
        put(
            &mut o,
            &format!("probas_k{}", pk.k),
            &[n_test, r.num_classes],
            probas,
        )?;
        o.insert(format!("out.top1_k{}", pk.k), i64s(&pk.top1, vec![n_test]));
    }
    Ok(o)
}
