//! Golden cases of the backbone and the head (see `tests/golden/README.md`): `layernorm`,
//! `attention`, `block`, `vit_forward`, `pos_interp`, `dino_head`.
//!
//! Each case declares the module in a fresh [`ParamTable`] (keys as in the fixture's
//! `in.param.*`), loads the fixture's values, runs forward, then backward with the fixture's
//! cotangents, and returns the outputs and every parameter gradient.

use super::{out, Fixture, Outputs};
use crate::error::{Error, Result};
use crate::nn::attention::Attention;
use crate::nn::block::{Block, BlockConfig};
use crate::nn::dino_head::DinoHead;
use crate::nn::ffn::Ffn;
use crate::nn::layernorm::LayerNorm;
use crate::nn::linear::Bias;
use crate::nn::params::ParamTable;
use crate::nn::pos_embed::{PosEmbed, Resampling};
use crate::nn::vit::Vit;
use crate::tensor::Tensor;

pub fn compute(fx: &Fixture) -> Result<Outputs> {
    match fx.case.as_str() {
        "layernorm" => layernorm(fx),
        "attention" => attention(fx),
        "block" => block(fx),
        "vit_forward" => vit_forward(fx),
        "pos_interp" => pos_interp(fx),
        "dino_head" => dino_head(fx),
        other => Err(Error::Unsupported(format!("nn golden case '{other}'"))),
    }
}

/// The fixture's parameters loaded into `table`'s layout.
pub(crate) fn load_params(fx: &Fixture, table: &ParamTable) -> Result<Vec<f32>> {
    let mut flat = vec![0f32; table.len()];
    let named = fx.inputs_with_prefix("in.param.")?;
    table.load(&mut flat, &named, &fx.path.display().to_string())?;
    Ok(flat)
}

/// `out.grad.param.<key>` for every parameter of `table`.
pub(crate) fn param_grads(outputs: &mut Outputs, table: &ParamTable, grads: &[f32]) {
    for spec in table.specs() {
        let t = Tensor {
            shape: spec.shape.clone(),
            data: grads[spec.at.range()].to_vec(),
        };
        out(outputs, &format!("grad.param.{}", spec.name), t);
    }
}

/// The input `name`, checked to have `shape`.
pub(crate) fn input_shaped<'a>(fx: &'a Fixture, name: &str, shape: &[usize]) -> Result<&'a Tensor> {
    let t = fx.input(name)?;
    if t.shape != shape {
        return Err(fx.error(
            &format!("in.{name}"),
            format!("shape {:?}, expected {shape:?}", t.shape),
        ));
    }
    Ok(t)
}

pub(crate) fn tensor(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
    Tensor::from_vec(shape, data)
}

/// `(batch, ntok, dim)` of a token-sequence case.
pub(super) fn dims3(fx: &Fixture) -> Result<(usize, usize, usize)> {
    Ok((
        fx.param_usize("batch")?,
        fx.param_usize("ntok")?,
        fx.param_usize("dim")?,
    ))
}

/// The attention module an `attention` case describes, with its parameter table.
pub(super) fn attention_module(fx: &Fixture, d: usize) -> Result<(ParamTable, Attention)> {
    let mut table = ParamTable::new();
    let attn = Attention::new(
        &mut table,
        "",
        d,
        fx.param_usize("num_heads")?,
        Bias::from(fx.param_bool("qkv_bias")?),
        Bias::from(fx.param_bool("proj_bias")?),
    );
    Ok((table, attn))
}

fn layernorm(fx: &Fixture) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let eps = fx.param_f64("eps")? as f32;
    let mut table = ParamTable::new();
    let ln = LayerNorm::new(&mut table, "", d, eps);
    let params = load_params(fx, &table)?;
    let x = input_shaped(fx, "x", &[b, t, d])?;
    let dy = input_shaped(fx, "grad_out", &[b, t, d])?;
    let rows = b * t;
    let mut y = vec![0f32; rows * d];
    let stats = ln.forward(&mut y, &x.data, &params, rows);
    let mut grads = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * d];
    ln.backward(
        &mut dx, &mut grads, &dy.data, &x.data, &stats, &params, rows,
    );
    let mut o = Outputs::new();
    out(&mut o, "out", tensor(&[b, t, d], y)?);
    out(&mut o, "grad.x", tensor(&[b, t, d], dx)?);
    param_grads(&mut o, &table, &grads);
    Ok(o)
}

fn attention(fx: &Fixture) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let (table, attn) = attention_module(fx, d)?;
    let params = load_params(fx, &table)?;
    let x = input_shaped(fx, "x", &[b, t, d])?;
    let dy = input_shaped(fx, "grad_out", &[b, t, d])?;
    let mut y = vec![0f32; b * t * d];
    let cache = attn.forward(&mut y, &x.data, &params, b, t);
    let mut grads = vec![0f32; table.len()];
    let mut dx = vec![0f32; b * t * d];
    attn.backward(
        &mut dx, &mut grads, &dy.data, &x.data, &cache, &params, b, t,
    );
    let mut o = Outputs::new();
    out(&mut o, "out", tensor(&[b, t, d], y)?);
    out(&mut o, "grad.x", tensor(&[b, t, d], dx)?);
    param_grads(&mut o, &table, &grads);
    Ok(o)
}

fn block(fx: &Fixture) -> Result<Outputs> {
    let (b, t, d) = dims3(fx)?;
    let cfg = block_config(fx, d)?;
    let mut table = ParamTable::new();
    let blk = Block::new(&mut table, "", &cfg);
    let params = load_params(fx, &table)?;
    let x = input_shaped(fx, "x", &[b, t, d])?;
    let dy = input_shaped(fx, "grad_out", &[b, t, d])?;
    let mut y = x.data.clone();
    let cache = blk.forward(&mut y, &params, b, t, None);
    let mut grads = vec![0f32; table.len()];
    let mut dx = dy.data.clone();
    blk.backward(&mut dx, &mut grads, &cache, &params);
    let mut o = Outputs::new();
    out(&mut o, "out", tensor(&[b, t, d], y)?);
    out(&mut o, "grad.x", tensor(&[b, t, d], dx)?);
    param_grads(&mut o, &table, &grads);
    Ok(o)
}

/// The `block` case's configuration.
pub(crate) fn block_config(fx: &Fixture, d: usize) -> Result<BlockConfig> {
    Ok(BlockConfig {
        dim: d,
        num_heads: fx.param_usize("num_heads")?,
        ffn: Ffn::Mlp {
            hidden: fx.param_usize("mlp_hidden_dim")?,
        },
        layerscale: fx.param_bool("layerscale")?.then_some(1.0),
        eps: fx.param_f64("ln_eps")? as f32,
        // The case lists no bias flags: a bias exists exactly when the fixture has it.
        qkv_bias: fx.has("in.param.attn.qkv.bias"),
        proj_bias: fx.has("in.param.attn.proj.bias"),
        ffn_bias: fx.has("in.param.mlp.fc1.bias"),
    })
}

fn resampling(fx: &Fixture) -> Result<Resampling> {
    Ok(if fx.param_bool("interpolate_antialias")? {
        Resampling::Antialias
    } else {
        Resampling::Bicubic
    })
}

fn pos_interp(fx: &Fixture) -> Result<Outputs> {
    let m = fx.param_usize("M")?;
    let d = fx.param_usize("embed_dim")?;
    let (h, w) = (fx.param_usize("input_h")?, fx.param_usize("input_w")?);
    let (gh, gw) = (fx.param_usize("out_h")?, fx.param_usize("out_w")?);
    let offset = fx.param_f64("interpolate_offset")? as f32;
    let mut table = ParamTable::new();
    let pos = PosEmbed::new(&mut table, "", m, d, offset, resampling(fx)?);
    let params = load_params(fx, &table)?;
    let plan = pos.plan(h, w, gh, gw);
    let n = 1 + gh * gw;
    let dy = input_shaped(fx, "grad_pos_embed_interp", &[1, n, d])?;
    let mut y = vec![0f32; n * d];
    pos.forward(&mut y, &params, &plan);
    let mut grads = vec![0f32; table.len()];
    pos.backward(&mut grads, &dy.data, &plan);
    let mut o = Outputs::new();
    out(&mut o, "pos_embed_interp", tensor(&[1, n, d], y)?);
    param_grads(&mut o, &table, &grads);
    Ok(o)
}

fn vit_forward(fx: &Fixture) -> Result<Outputs> {
    let cfg = super::step_case::vit_config(fx)?;
    let d = cfg.embed_dim;
    let (b, h, w) = (
        fx.param_usize("batch")?,
        fx.param_usize("input_h")?,
        fx.param_usize("input_w")?,
    );
    let (c, r) = (cfg.in_chans, cfg.num_register_tokens);
    let mut table = ParamTable::new();
    let vit = Vit::new(&cfg, &mut table, "");
    let params = load_params(fx, &table)?;
    let images = input_shaped(fx, "images", &[b, c, h, w])?;
    let n = (h / cfg.patch_size) * (w / cfg.patch_size);
    let masks = vit_masks(fx, b, n)?;
    let (y, cache) = vit.forward(&params, &images.data, b, h, w, masks.as_deref(), None)?;
    let d_cls = input_shaped(fx, "grad_x_norm_clstoken", &[b, d])?;
    let d_patch = input_shaped(fx, "grad_x_norm_patchtokens", &[b, n, d])?;
    let d_reg = if r > 0 {
        Some(&input_shaped(fx, "grad_x_norm_regtokens", &[b, r, d])?.data)
    } else {
        None
    };
    let mut grads = vec![0f32; table.len()];
    let dimages = vit.backward(
        &params,
        &mut grads,
        &cache,
        &d_cls.data,
        &d_patch.data,
        d_reg.map(|v| v.as_slice()),
    )?;
    let mut o = Outputs::new();
    out(&mut o, "x_norm_clstoken", tensor(&[b, d], y.cls)?);
    out(&mut o, "x_norm_patchtokens", tensor(&[b, n, d], y.patch)?);
    if r > 0 {
        out(&mut o, "x_norm_regtokens", tensor(&[b, r, d], y.reg)?);
    }
    out(&mut o, "grad.images", tensor(&[b, c, h, w], dimages)?);
    param_grads(&mut o, &table, &grads);
    Ok(o)
}

/// The `vit_forward` case's optional masks `[b, n]`.
pub(crate) fn vit_masks(fx: &Fixture, b: usize, n: usize) -> Result<Option<Vec<bool>>> {
    if !fx.has("in.masks") {
        return Ok(None);
    }
    let (shape, data) = fx.input_u8("masks")?;
    if shape != [b, n] {
        return Err(fx.error("in.masks", format!("shape {shape:?}, expected [{b}, {n}]")));
    }
    Ok(Some(data.iter().map(|&v| v != 0).collect()))
}

/// The inputs of a `dino_head` fixture.
pub(crate) struct HeadCase<'a> {
    pub table: ParamTable,
    pub head: DinoHead,
    pub params: Vec<f32>,
    pub n: usize,
    pub x: &'a Tensor,        // [n, in_dim]
    pub grad_out: &'a Tensor, // [n, k]
}

pub(crate) fn dino_head_case(fx: &Fixture) -> Result<HeadCase<'_>> {
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
    let params = load_params(fx, &table)?;
    Ok(HeadCase {
        x: input_shaped(fx, "x", &[n, in_dim])?,
        grad_out: input_shaped(fx, "grad_out", &[n, k])?,
        table,
        head,
        params,
        n,
    })
}

/// The `out.*` tensors of a `dino_head` case.
pub(crate) fn dino_head_outputs(
    case: &HeadCase<'_>,
    y: Vec<f32>,
    dx: Vec<f32>,
    grads: &[f32],
) -> Result<Outputs> {
    let (n, in_dim, k) = (case.n, case.head.mlp0.in_dim, case.head.out_dim);
    let mut o = Outputs::new();
    out(&mut o, "out", tensor(&[n, k], y)?);
    out(&mut o, "grad.x", tensor(&[n, in_dim], dx)?);
    param_grads(&mut o, &case.table, grads);
    Ok(o)
}

fn dino_head(fx: &Fixture) -> Result<Outputs> {
    let case = dino_head_case(fx)?;
    let (y, cache) = case.head.forward(&case.params, &case.x.data, case.n);
    let mut grads = vec![0f32; case.table.len()];
    let dx = case
        .head
        .backward(&case.params, &mut grads, &cache, &case.grad_out.data);
    dino_head_outputs(&case, y, dx, &grads)
}
