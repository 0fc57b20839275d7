//! Golden cases of the backbone and the head (see `tests/golden/README.md`): `layernorm`,
//! `attention`, `block`, `vit_forward`, `pos_interp`, `dino_head`.
//!
//! Each case declares the module in a fresh [`ParamTable`] (keys as in the fixture's
//! `in.param.*`), loads the fixture's values, runs forward, then backward with the fixture's
//! cotangents, and returns the outputs and every parameter gradient.

use super::{load_params, param_grads, put, upload, Fixture, Outputs};
use crate::backend::{
    Accumulate, Backend, LnSaved, LnStats, NormOut, NormShape, Storage, WeightStore,
};
use crate::error::{Error, Result};
use crate::nn::attention::{Attention, AttnScratch};
use crate::nn::block::{Block, BlockConfig, BlockRunner};
use crate::nn::dino_head::{DinoHead, HeadCache, HeadScratch, Prototypes};
use crate::nn::ffn::Ffn;
use crate::nn::layernorm::LayerNorm;
use crate::nn::linear::Bias;
use crate::nn::params::ParamTable;
use crate::nn::pos_embed::{PosEmbed, Resampling};
use crate::nn::vit::Vit;
use crate::nn::{ImageGrad, OutputGrads, VitConfig, VitWorkspaces};

/// `(batch, ntok, dim)` of a token-sequence case.
fn dims3(fx: &Fixture) -> Result<(usize, usize, usize)> {
    Ok((
        fx.param_usize("batch")?,
        fx.param_usize("ntok")?,
        fx.param_usize("dim")?,
    ))
}

/// The FFN `params.ffn_layer` names (`mlp` when absent, as in the first `block` fixtures) with
/// the nominal width `mlp_hidden_dim`.
fn ffn(fx: &Fixture) -> Result<Ffn> {
    let hidden = fx.param_usize("mlp_hidden_dim")?;
    let kind = match fx.params.get("ffn_layer") {
        None => "mlp",
        Some(_) => fx.param_str("ffn_layer")?,
    };
    match kind {
        "mlp" => Ok(Ffn::Mlp { hidden }),
        "swiglu" | "swiglufused" => Ok(Ffn::SwiGlu { hidden }),
        other => Err(fx.error("params.ffn_layer", format!("unknown FFN '{other}'"))),
    }
}

/// The backbone configuration a fixture's `params` describe (`vit_forward`, `ssl_step`).
pub(super) fn vit_config(fx: &Fixture) -> Result<VitConfig> {
    let cfg = VitConfig {
        img_size: fx.param_usize("img_size")?,
        patch_size: fx.param_usize("patch_size")?,
        in_chans: fx.param_usize("in_chans")?,
        embed_dim: fx.param_usize("embed_dim")?,
        depth: fx.param_usize("depth")?,
        num_heads: fx.param_usize("num_heads")?,
        ffn: ffn(fx)?,
        num_register_tokens: fx.param_usize("num_register_tokens")?,
        layerscale: fx.param_bool("layerscale")?.then_some(1.0),
        interpolate_offset: fx.param_f32("interpolate_offset")?,
        interpolate_antialias: fx.param_bool("interpolate_antialias")?,
        qkv_bias: fx.param_bool("qkv_bias")?,
        proj_bias: fx.param_bool("proj_bias")?,
        ffn_bias: fx.param_bool("ffn_bias")?,
    };
    cfg.validate()?;
    Ok(cfg)
}

pub(super) fn layernorm<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let mut table = ParamTable::new();
    let ln = LayerNorm::new(&mut table, "", d, fx.param_f32("eps")?);
    let w = be.weights(&load_params(fx, "", &table)?)?;
    let x = upload(be, &fx.input_shaped("x", &[b, t, d])?.data)?;
    let dy = upload(be, &fx.input_shaped("grad_out", &[b, t, d])?.data)?;
    let rows = b * t;
    let shape = NormShape { rows, channels: d };
    let (mut y, mut mean, mut rstd) = (
        be.alloc_f32(rows * d)?,
        be.alloc_f32(rows)?,
        be.alloc_f32(rows)?,
    );
    ln.with_params::<B, _>(&w, |p| {
        let stats = LnStats {
            mean: &mut *mean,
            rstd: &mut *rstd,
        };
        be.layernorm_forward(NormOut::F32(&mut *y), stats, &x, p, shape)
    })?;
    let (mut dx, mut grads) = (be.alloc_f32(rows * d)?, be.alloc_f32(table.len())?);
    {
        let weight = w.f32().window(ln.weight.range())?;
        let [mut dw, mut db] = grads.windows_mut([ln.weight.range(), ln.bias.range()])?;
        let saved = LnSaved {
            dout: &*dy,
            inp: &*x,
            weight: &*weight,
            mean: &*mean,
            rstd: &*rstd,
        };
        let dx_to = Accumulate::Overwrite;
        be.layernorm_backward(&mut dx, dx_to, &mut dw, &mut db, saved, shape)?;
    }
    let mut o = Outputs::new();
    put(&mut o, "out", &[b, t, d], be.download_f32(&y)?)?;
    put(&mut o, "grad.x", &[b, t, d], be.download_f32(&dx)?)?;
    param_grads(&mut o, "", &table, &be.download_f32(&grads)?)?;
    Ok(o)
}

/// The attention module alone: the input becomes an operand (it is a GEMM input), qkv,
/// attention, proj; backward to the input.
pub(super) fn attention<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let mut table = ParamTable::new();
    let attn = Attention::new(
        &mut table,
        "",
        d,
        fx.param_usize("num_heads")?,
        Bias::from(fx.param_bool("qkv_bias")?),
        Bias::from(fx.param_bool("proj_bias")?),
    );
    let w = be.weights(&load_params(fx, "", &table)?)?;
    let rows = b * t;
    let mut x = be.alloc_half(rows * d)?;
    be.upload_half(&mut x, &fx.input_shaped("x", &[b, t, d])?.data)?;
    let dy_host = &fx.input_shaped("grad_out", &[b, t, d])?.data;
    let mut bufs = attn.bufs(be, b, t)?;
    let mut y = be.alloc_f32(rows * d)?;
    attn.forward(be, &mut bufs, &mut y, &x, &w, (b, t))?;
    // The body reads its output gradient as an operand (from LayerScale's backward in a block).
    let dy = upload(be, dy_host)?;
    let mut dy_half = be.alloc_half(rows * d)?;
    be.cast_to_half(&mut dy_half, &dy)?;
    let (mut dqkv, mut datt) = (be.alloc_half(rows * 3 * d)?, be.alloc_half(rows * d)?);
    let scratch = AttnScratch {
        dqkv: &mut *dqkv,
        datt: &mut *datt,
    };
    let (mut dx, mut grads) = (be.alloc_f32(rows * d)?, be.alloc_f32(table.len())?);
    let dys = (&*dy_half, Some(&*dy));
    attn.backward(be, &mut grads, &mut dx, scratch, dys, &bufs, &x, &w, (b, t))?;
    let mut o = Outputs::new();
    put(&mut o, "out", &[b, t, d], be.download_f32(&y)?)?;
    put(&mut o, "grad.x", &[b, t, d], be.download_f32(&dx)?)?;
    param_grads(&mut o, "", &table, &be.download_f32(&grads)?)?;
    Ok(o)
}

pub(super) fn block<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let cfg = BlockConfig {
        dim: d,
        num_heads: fx.param_usize("num_heads")?,
        ffn: ffn(fx)?,
        layerscale: fx.param_bool("layerscale")?.then_some(1.0),
        eps: fx.param_f32("ln_eps")?,
        // The case lists no bias flags: a bias exists exactly when the fixture has it.
        qkv_bias: fx.has("in.param.attn.qkv.bias"),
        proj_bias: fx.has("in.param.attn.proj.bias"),
        ffn_bias: fx.has("in.param.mlp.fc1.bias") || fx.has("in.param.mlp.w12.bias"),
    };
    let mut table = ParamTable::new();
    let blk = Block::new(&mut table, "", &cfg);
    let w = be.weights(&load_params(fx, "", &table)?)?;
    let mut x = upload(be, &fx.input_shaped("x", &[b, t, d])?.data)?;
    let mut dx = upload(be, &fx.input_shaped("grad_out", &[b, t, d])?.data)?;
    let mut runner = BlockRunner::new(be, &blk, b, t)?;
    runner.forward(be, &blk, &w, &mut x, [None, None])?;
    let mut grads = be.alloc_f32(table.len())?;
    runner.backward(be, &blk, &w, &mut grads, &mut dx)?;
    let mut o = Outputs::new();
    put(&mut o, "out", &[b, t, d], be.download_f32(&x)?)?;
    put(&mut o, "grad.x", &[b, t, d], be.download_f32(&dx)?)?;
    param_grads(&mut o, "", &table, &be.download_f32(&grads)?)?;
    Ok(o)
}

pub(super) fn pos_interp<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let m = fx.param_usize("M")?;
    let d = fx.param_usize("embed_dim")?;
    let (h, w) = (fx.param_usize("input_h")?, fx.param_usize("input_w")?);
    let (gh, gw) = (fx.param_usize("out_h")?, fx.param_usize("out_w")?);
    let offset = fx.param_f32("interpolate_offset")?;
    let resampling = if fx.param_bool("interpolate_antialias")? {
        Resampling::Antialias
    } else {
        Resampling::Bicubic
    };
    let mut table = ParamTable::new();
    let pos = PosEmbed::new(&mut table, "", m, d, offset, resampling);
    let weights = be.weights(&load_params(fx, "", &table)?)?;
    let mut bufs = pos.bufs(be, (h, w), (gh, gw))?;
    let n = 1 + gh * gw;
    let dy = upload(
        be,
        &fx.input_shaped("grad_pos_embed_interp", &[1, n, d])?.data,
    )?;
    let y = {
        let y = pos.forward(be, &mut bufs, &weights)?;
        be.download_f32(&y)?
    };
    let mut grads = be.alloc_f32(table.len())?;
    let (dcls, dgrid) = (dy.window(0..d)?, dy.window(d..n * d)?);
    pos.backward(be, &mut bufs, &mut grads, &dcls, &dgrid)?;
    let mut o = Outputs::new();
    put(&mut o, "pos_embed_interp", &[1, n, d], y)?;
    param_grads(&mut o, "", &table, &be.download_f32(&grads)?)?;
    Ok(o)
}

pub(super) fn vit_forward<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let cfg = vit_config(fx)?;
    let d = cfg.embed_dim;
    let (b, h, w_px) = (
        fx.param_usize("batch")?,
        fx.param_usize("input_h")?,
        fx.param_usize("input_w")?,
    );
    let (c, r) = (cfg.in_chans, cfg.num_register_tokens);
    let mut table = ParamTable::new();
    let vit = Vit::new(&cfg, &mut table, "");
    let w = be.weights(&load_params(fx, "", &table)?)?;
    let images = fx.input_shaped("images", &[b, c, h, w_px])?;
    let n = (h / cfg.patch_size) * (w_px / cfg.patch_size);
    let masks = if fx.has("in.masks") {
        let (shape, data) = fx.input_u8("masks")?;
        fx.check_shape("in.masks", shape, &[b, n])?;
        Some(data.iter().map(|&v| v != 0).collect::<Vec<bool>>())
    } else {
        None
    };
    let mut runner = VitWorkspaces::new(&vit);
    let key = (b, h, w_px);
    let y = runner
        .forward(be, &vit, &w, &images.data, key, masks.as_deref(), None)?
        .to_host(be)?;
    let d_cls = upload(be, &fx.input_shaped("grad_x_norm_clstoken", &[b, d])?.data)?;
    let d_patch = fx.input_shaped("grad_x_norm_patchtokens", &[b, n, d])?;
    let d_patch = upload(be, &d_patch.data)?;
    let d_reg = if r > 0 {
        let t = fx.input_shaped("grad_x_norm_regtokens", &[b, r, d])?;
        Some(upload(be, &t.data)?)
    } else {
        None
    };
    let mut grads = be.alloc_f32(table.len())?;
    let dout = OutputGrads {
        cls: &*d_cls,
        patch: &*d_patch,
        reg: d_reg.as_deref(),
    };
    let dimages = runner
        .backward(be, &vit, &w, &mut grads, key, dout, ImageGrad::Compute)?
        .ok_or_else(|| Error::Unsupported("vit backward returned no image gradient".into()))?;
    let mut o = Outputs::new();
    put(&mut o, "x_norm_clstoken", &[b, d], y.cls)?;
    put(&mut o, "x_norm_patchtokens", &[b, n, d], y.patch)?;
    if r > 0 {
        put(&mut o, "x_norm_regtokens", &[b, r, d], y.reg)?;
    }
    put(&mut o, "grad.images", &[b, c, h, w_px], dimages)?;
    param_grads(&mut o, "", &table, &be.download_f32(&grads)?)?;
    Ok(o)
}

pub(super) fn dino_head<B: Backend>(fx: &Fixture, be: &mut B) -> Result<Outputs> {
    let (in_dim, k) = (fx.param_usize("in_dim")?, fx.param_usize("out_dim")?);
    let (hidden, bn, n) = (
        fx.param_usize("hidden_dim")?,
        fx.param_usize("bottleneck_dim")?,
        fx.param_usize("n")?,
    );
    if fx.param_usize("nlayers")? != 3 {
        return Err(Error::Unsupported("DINO head with nlayers != 3".into()));
    }
    let mut table = ParamTable::new();
    let head = DinoHead::new(in_dim, hidden, bn, k, &mut table, "");
    let w = be.weights(&load_params(fx, "", &table)?)?;
    let x = upload(be, &fx.input_shaped("x", &[n, in_dim])?.data)?;
    let d_out = upload(be, &fx.input_shaped("grad_out", &[n, k])?.data)?;
    let mut protos = Prototypes::new(be, &head)?;
    protos.prepare(be, &head, &w)?;
    let mut cache = HeadCache::default();
    head.forward(be, &mut cache, &protos, &w, &x, n)?;
    let y = be.download_f32(&*cache.logits.get()?)?;
    let (mut dx, mut grads) = (be.alloc_f32(n * in_dim)?, be.alloc_f32(table.len())?);
    let mut scratch = HeadScratch::default();
    let dx_to = (&mut *dx, Accumulate::Overwrite);
    let saved = (&cache, &protos);
    head.backward(be, &mut scratch, &mut grads, dx_to, saved, &w, &d_out)?;
    let mut o = Outputs::new();
    put(&mut o, "out", &[n, k], y)?;
    put(&mut o, "grad.x", &[n, in_dim], be.download_f32(&dx)?)?;
    param_grads(&mut o, "", &table, &be.download_f32(&grads)?)?;
    Ok(o)
}
