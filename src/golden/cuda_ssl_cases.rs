//! The method's golden cases on the GPU (`verify --device cuda`): the DINO head, the DINO and
//! iBOT losses with their teacher targets, KoLeo, clipping, EMA, AdamW with a frozen last layer,
//! and the whole `ssl_step`, each through the same code the GPU training step runs and returning
//! the same `out.*` tensors as the CPU case (whose input parsing it reuses).

use super::nn_cases::{dino_head_case, dino_head_outputs};
use super::ssl_cases::{
    adamw_case, adamw_outputs, clip_case, clip_outputs, dino_loss_case, dino_loss_outputs,
    ibot_loss_case, ibot_loss_outputs, koleo_input,
};
use super::step_case::{outputs as step_outputs, parse as parse_step};
use super::{out, Fixture, Outputs};
use crate::backend::cpu::Accumulate;
use crate::backend::cuda::model::buffers::{upload_into, Grow};
use crate::backend::cuda::model::head::{GpuHead, HeadCache, HeadScratch};
use crate::backend::cuda::model::losses::{
    dino_loss_forward_backward, ibot_loss_forward_backward, DinoPairs, IbotPairs,
};
use crate::backend::cuda::model::optim::{ema as ema_update, GpuOptimizer};
use crate::backend::cuda::model::step::{GpuStep, TeacherProbs};
use crate::backend::cuda::model::targets::{GpuCentering, GpuTargets};
use crate::backend::cuda::model::DeviceWeights;
use crate::backend::cuda::{CudaBackend, KoleoSaved};
use crate::error::{Error, Result};
use crate::ssl::DinoLossTerms;
use crate::tensor::Tensor;

/// Runs the case of `fx` on the GPU and returns every `out.*` tensor.
pub fn compute(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    match fx.case.as_str() {
        "dino_head" => dino_head(fx, gpu),
        "dino_loss_centering" | "dino_loss_sinkhorn" => dino_loss(fx, gpu),
        "ibot_loss" => ibot_loss(fx, gpu),
        "koleo" => koleo(fx, gpu),
        "clip_grad" => clip_grad(fx, gpu),
        "ema" => ema(fx, gpu),
        "adamw_freeze" => adamw_freeze(fx, gpu),
        "ssl_step" => ssl_step(fx, gpu),
        other => Err(Error::Unsupported(format!(
            "golden case '{other}' is not one of the method's CUDA cases"
        ))),
    }
}

/// Host values in a device buffer of exactly their length (possibly empty).
fn to_device(gpu: &CudaBackend, host: &[f32]) -> Result<Grow<f32>> {
    let mut buf = Grow::default();
    buf.resize(gpu, host.len())?;
    upload_into(gpu, &mut *buf.get_mut(gpu)?, host)?;
    Ok(buf)
}

fn zeros(gpu: &CudaBackend, len: usize) -> Result<Grow<f32>> {
    let mut buf = Grow::default();
    buf.resize(gpu, len)?;
    Ok(buf)
}

fn download(gpu: &CudaBackend, buf: &Grow<f32>) -> Result<Vec<f32>> {
    gpu.download(&*buf.get(gpu)?)
}

fn dino_head(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let case = dino_head_case(fx)?;
    let n = case.n;
    let w = DeviceWeights::upload(gpu, &case.params)?;
    let mut head = GpuHead::new(gpu, &case.head)?;
    head.prepare(gpu, &w.f32)?;
    let mut cache = HeadCache::default();
    let x = to_device(gpu, &case.x.data)?;
    head.forward(gpu, &mut cache, &w, &*x.get(gpu)?, n)?;
    let d_out = to_device(gpu, &case.grad_out.data)?;
    let mut grads = zeros(gpu, case.table.len())?;
    let mut dx = zeros(gpu, n * case.head.mlp0.in_dim)?;
    head.backward(
        gpu,
        &mut HeadScratch::default(),
        &mut *grads.get_mut(gpu)?,
        &mut *dx.get_mut(gpu)?,
        Accumulate::Overwrite,
        &cache,
        &w,
        &*d_out.get(gpu)?,
    )?;
    dino_head_outputs(
        &case,
        download(gpu, &cache.logits)?,
        download(gpu, &dx)?,
        &download(gpu, &grads)?,
    )
}

fn dino_loss(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let case = dino_loss_case(fx)?;
    let (b, nl, k) = (case.b, case.nl, case.k);
    let mut centering = GpuCentering::upload(gpu, &case.centering)?;
    let teacher = to_device(gpu, case.teacher_global)?;
    let mut probs = zeros(gpu, 2 * b * k)?;
    centering.teacher_probs(
        gpu,
        &mut *probs.get_mut(gpu)?,
        &*teacher.get(gpu)?,
        2 * b,
        k,
        case.teacher_temp,
    )?;
    let s_global = to_device(gpu, case.student_global)?;
    let s_local = to_device(gpu, &case.student_local)?;
    let mut terms = zeros(gpu, 2)?;
    let (mut dg, mut dl) = (zeros(gpu, 2 * b * k)?, zeros(gpu, nl * b * k)?);
    dino_loss_forward_backward(
        gpu,
        &mut DinoPairs::default(),
        &mut *terms.get_mut(gpu)?,
        &mut Grow::default(),
        &mut *dg.get_mut(gpu)?,
        &mut *dl.get_mut(gpu)?,
        &*s_global.get(gpu)?,
        &*s_local.get(gpu)?,
        &*probs.get(gpu)?,
        b,
        nl,
        k,
        case.student_temp,
        case.loss_weight,
    )?;
    let t = download(gpu, &terms)?;
    let (global, local) = (t[0] as f64, if nl > 0 { t[1] as f64 } else { 0.0 });
    let terms = DinoLossTerms {
        global: global as f32,
        local: local as f32,
        total: (case.loss_weight as f64 * (global + local)) as f32,
    };
    let mut moved = case.centering.clone();
    centering.download_into(gpu, &mut moved)?;
    dino_loss_outputs(
        &case,
        terms,
        download(gpu, &probs)?,
        download(gpu, &dg)?,
        download(gpu, &dl)?,
        &moved,
    )
}

fn ibot_loss(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let case = ibot_loss_case(fx)?;
    let (m, k) = (case.m, case.k);
    let mut centering = GpuCentering::upload(gpu, &case.centering)?;
    let teacher = to_device(gpu, case.teacher)?;
    let mut probs = zeros(gpu, m * k)?;
    centering.teacher_probs(
        gpu,
        &mut *probs.get_mut(gpu)?,
        &*teacher.get(gpu)?,
        m,
        k,
        case.teacher_temp,
    )?;
    let mut pairs = IbotPairs::default();
    pairs.set(gpu, case.masks_weight, case.n_crops, 0)?;
    let student = to_device(gpu, case.student)?;
    let (mut loss, mut ds) = (zeros(gpu, 1)?, zeros(gpu, m * k)?);
    ibot_loss_forward_backward(
        gpu,
        &pairs,
        &mut *loss.get_mut(gpu)?,
        &mut Grow::default(),
        &mut *ds.get_mut(gpu)?,
        &*student.get(gpu)?,
        &*probs.get(gpu)?,
        k,
        case.student_temp,
        1.0,
    )?;
    let mut moved = case.centering.clone();
    centering.download_into(gpu, &mut moved)?;
    ibot_loss_outputs(
        &case,
        download(gpu, &loss)?[0],
        download(gpu, &probs)?,
        download(gpu, &ds)?,
        &moved,
    )
}

fn koleo(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let (x, b, d) = koleo_input(fx)?;
    let x_d = to_device(gpu, &x.data)?;
    let mut saved = KoleoSaved::new(gpu, b, d)?;
    let (mut loss, mut dx) = (zeros(gpu, 1)?, zeros(gpu, b * d)?);
    gpu.koleo_forward(&mut *loss.get_mut(gpu)?, &mut saved, &*x_d.get(gpu)?, b, d)?;
    gpu.koleo_backward(&mut *dx.get_mut(gpu)?, &saved, 1.0, b, d)?;
    let mut o = Outputs::new();
    out(&mut o, "loss", Tensor::scalar(download(gpu, &loss)?[0]));
    out(
        &mut o,
        "grad.x",
        Tensor::from_vec(&[b, d], download(gpu, &dx)?)?,
    );
    Ok(o)
}

fn clip_grad(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let case = clip_case(fx)?;
    let mut data = to_device(gpu, &case.data)?;
    let mut norms = zeros(gpu, case.spans.len())?;
    for (i, span) in case.spans.iter().enumerate() {
        for range in &span.ranges {
            let mut all = data.get_mut(gpu)?;
            let mut g = gpu.sub_mut(&mut all, range.clone())?;
            let mut norm = norms.rows_mut(gpu, i..i + 1)?;
            gpu.clip_grad_norm(&mut g, &mut norm, case.max_norm)?;
        }
    }
    clip_outputs(&case, &download(gpu, &data)?, &download(gpu, &norms)?)
}

fn ema(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let m = fx.param_f64("momentum")?;
    let teacher = fx.inputs_with_prefix("in.teacher.")?;
    let student = fx.inputs_with_prefix("in.student.")?;
    let mut o = Outputs::new();
    for (name, t) in teacher {
        let s = student
            .get(&name)
            .ok_or_else(|| fx.error(&format!("in.student.{name}"), "missing"))?;
        s.expect_shape("student", &t.shape)?;
        let mut t_d = to_device(gpu, &t.data)?;
        let s_d = to_device(gpu, &s.data)?;
        ema_update(gpu, &mut *t_d.get_mut(gpu)?, &*s_d.get(gpu)?, m)?;
        out(
            &mut o,
            &format!("teacher_new.{name}"),
            Tensor::from_vec(&t.shape, download(gpu, &t_d)?)?,
        );
    }
    Ok(o)
}

fn adamw_freeze(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let case = adamw_case(fx)?;
    let n = case.flat.data.len();
    let zeros_host = vec![0f32; n];
    let mut opt = GpuOptimizer::from_parts(
        gpu,
        &case.settings,
        n,
        &[],
        case.hyper,
        &zeros_host,
        &zeros_host,
    )?;
    let mut params = to_device(gpu, &case.flat.data)?;
    let mut grads = zeros(gpu, n)?;
    let mut hist = [Vec::new(), Vec::new(), Vec::new()];
    for s in 0..case.steps {
        upload_into(gpu, &mut *grads.get_mut(gpu)?, &case.grads[s])?;
        opt.step(
            gpu,
            &mut *params.get_mut(gpu)?,
            &*grads.get(gpu)?,
            case.lr[s] as f64,
            case.last_layer_lr[s] as f64,
            case.wd[s] as f64,
            s as u64 + 1,
        )?;
        hist[0].push(download(gpu, &params)?);
        hist[1].push(gpu.download(&opt.exp_avg)?);
        hist[2].push(gpu.download(&opt.exp_avg_sq)?);
    }
    adamw_outputs(&case, &hist)
}

fn ssl_step(fx: &Fixture, gpu: &mut CudaBackend) -> Result<Outputs> {
    let mut inputs = parse_step(fx)?;
    let student = DeviceWeights::upload(gpu, &inputs.student)?;
    let teacher = DeviceWeights::upload(gpu, &inputs.teacher)?;
    let mut grads = zeros(gpu, inputs.model.table.len())?;
    let mut targets = GpuTargets::upload(gpu, &inputs.targets)?;
    let mut step = GpuStep::new(gpu, &inputs.model)?;
    let output = step.forward_backward(
        gpu,
        &inputs.model,
        &student,
        &teacher,
        &mut *grads.get_mut(gpu)?,
        &inputs.batch(),
        &mut targets,
        inputs.teacher_temp,
        &inputs.losses,
        None,
        TeacherProbs::Download,
    )?;
    let mut moved = inputs.targets.clone();
    targets.download_into(gpu, &mut moved)?;
    inputs.targets = moved;
    let grads = download(gpu, &grads)?;
    step_outputs(&inputs, output, &grads)
}
