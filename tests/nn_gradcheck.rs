//! Gradient checks of every layer: the analytic f32 backward against central finite
//! differences of an independent f64 evaluation of the same forward (small naive reference
//! implementations in `nn_reference`, written from the spec, not from the layer code). Each check also
//! compares the f32 forward with the f64 reference, so the reference is the same function.
//!
//! Objective: `L = Σ out · cot` with a random cotangent `cot`.
//!
//! The layers run on the CPU backend in f32 (its operands are f32 slices), as the model runs
//! them: forward into the layer's buffers, parameter gradients then the input gradient.

mod nn_reference;

use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::prelude::*;
use dinotrain::backend::{
    Accumulate, InputGrad, LinearOut, LnSaved, LnStats, NormOut, NormShape, Storage, WeightStore,
};
use dinotrain::nn::attention::{Attention, AttnScratch};
use dinotrain::nn::block::{Block, BlockConfig, BlockRunner};
use dinotrain::nn::dino_head::{DinoHead, HeadCache, HeadScratch, Prototypes};
use dinotrain::nn::drop_path::{draw_subset, Subset};
use dinotrain::nn::ffn::swiglu_width;
use dinotrain::nn::ffn::{Ffn, FfnLayer};
use dinotrain::nn::layernorm::LayerNorm;
use dinotrain::nn::linear::{Bias, Linear};
use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::nn::patch_embed::PatchEmbed;
use dinotrain::nn::pos_embed::{PosEmbed, Resampling};
use dinotrain::nn::vit::{Vit, VitConfig};
use dinotrain::nn::{ImageGrad, OutputGrads, VitWorkspaces};
use dinotrain::rng::{keyed, stream};
use nn_reference::*;

type Weights = <CpuBackend as Buffers>::Weights;

/// The CPU backend (f32) and `params` as its weights.
fn cpu(params: &[f32]) -> (CpuBackend, Weights) {
    let mut be = CpuBackend::default();
    let w = be.weights(params).unwrap();
    (be, w)
}

// ---------------------------------------------------------------------------------------------
// Checks

#[test]
fn linear_gradients() {
    let (rows, k, n) = (5, 7, 4);
    let mut table = ParamTable::new();
    let layer = Linear::new(&mut table, "", k, n, Bias::Yes, Init::Zeros);
    let params = random_params(&table, 1);
    let mut rng = keyed(1, &[stream::TEST]);
    let x = uniform(&mut rng, rows * k, 1.0);
    let cot = uniform(&mut rng, rows * n, 1.0);
    let (mut be, w) = cpu(&params);
    let mut y = vec![0f32; rows * n];
    layer
        .forward(&mut be, LinearOut::F32(&mut y[..]), &x, &w, rows)
        .unwrap();
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * k];
    layer
        .param_grads(&mut be, &mut g, &cot, Some(&cot), &x, rows)
        .unwrap();
    let dinp = InputGrad::F32(&mut dx[..], Accumulate::Overwrite);
    layer.input_grad(&mut be, dinp, &cot, &w, rows).unwrap();
    let f = |p: &P, x: &[f64]| lin(p, "", x, rows, k, n);
    assert_close(
        "linear forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-6,
    );
    check_grads("linear", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

#[test]
fn layernorm_gradients() {
    let (rows, d) = (6, 9);
    let mut table = ParamTable::new();
    let ln = LayerNorm::new(&mut table, "", d, 1e-6);
    let params = random_params(&table, 2);
    let mut rng = keyed(2, &[stream::TEST]);
    let x = uniform(&mut rng, rows * d, 2.0);
    let cot = uniform(&mut rng, rows * d, 1.0);
    let (mut be, w) = cpu(&params);
    let shape = NormShape { rows, channels: d };
    let mut y = vec![0f32; rows * d];
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    ln.with_params::<CpuBackend, _>(&w, |p| {
        let stats = LnStats {
            mean: &mut mean[..],
            rstd: &mut rstd[..],
        };
        be.layernorm_forward(NormOut::F32(&mut y[..]), stats, &x, p, shape)
    })
    .unwrap();
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * d];
    {
        let weight = w.f32().window(ln.weight.range()).unwrap();
        let [dw, db] = g.windows_mut([ln.weight.range(), ln.bias.range()]).unwrap();
        let saved = LnSaved {
            dout: &cot[..],
            inp: &x[..],
            weight,
            mean: &mean[..],
            rstd: &rstd[..],
        };
        be.layernorm_backward(&mut dx, Accumulate::Overwrite, dw, db, saved, shape)
            .unwrap();
    }
    let f = |p: &P, x: &[f64]| layernorm(p, "", x, rows, d);
    assert_close(
        "layernorm forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-6,
    );
    check_grads("layernorm", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

#[test]
fn gelu_kernel_gradients() {
    use dinotrain::backend::cpu::elementwise::gelu_forward;
    let mut rng = keyed(3, &[stream::TEST]);
    let x = uniform(&mut rng, 64, 4.0);
    let cot = uniform(&mut rng, 64, 1.0);
    let mut y = vec![0f32; 64];
    gelu_forward(&mut y, &x);
    let mut dx = vec![0f32; 64];
    CpuBackend::new(dinotrain::backend::Precision::F32)
        .gelu_backward(&mut dx, &cot, &x)
        .unwrap();
    let f = |x: &[f64]| x.iter().map(|&v| gelu(v)).collect::<Vec<_>>();
    assert_close("gelu forward", &y, &f(&to64(&x)), 1e-6);
    let table = ParamTable::new();
    check_grads("gelu", &table, &[], &x, &[], &dx, &|_, x| dot(&f(x), &cot));
}

#[test]
fn attention_gradients() {
    let (b, t, d, h) = (2, 5, 8, 2);
    let mut table = ParamTable::new();
    let attn = Attention::new(&mut table, "", d, h, Bias::Yes, Bias::Yes);
    let params = random_params(&table, 4);
    let mut rng = keyed(4, &[stream::TEST]);
    let x = uniform(&mut rng, b * t * d, 1.0);
    let cot = uniform(&mut rng, b * t * d, 1.0);
    let (mut be, w) = cpu(&params);
    let mut bufs = attn.bufs(&mut be, b, t).unwrap();
    let mut y = vec![0f32; b * t * d];
    attn.forward(&mut be, &mut bufs, &mut y, &x, &w, (b, t))
        .unwrap();
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; b * t * d];
    let (mut dqkv, mut datt) = (vec![0f32; b * t * 3 * d], vec![0f32; b * t * d]);
    let scratch = AttnScratch {
        dqkv: &mut dqkv[..],
        datt: &mut datt[..],
    };
    let dy = (&cot[..], Some(&cot[..]));
    attn.backward(&mut be, &mut g, &mut dx, scratch, dy, &bufs, &x, &w, (b, t))
        .unwrap();
    let f = |p: &P, x: &[f64]| attention(p, "", x, b, t, d, h);
    assert_close(
        "attention forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    check_grads("attention", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

fn ffn_check(ffn_kind: Ffn, seed: u64) {
    let (rows, d) = (6, 8);
    let mut table = ParamTable::new();
    let layer = FfnLayer::new(&mut table, "", d, ffn_kind, Bias::Yes);
    let params = random_params(&table, seed);
    let mut rng = keyed(seed, &[stream::TEST]);
    let x = uniform(&mut rng, rows * d, 1.0);
    let cot = uniform(&mut rng, rows * d, 1.0);
    let (mut be, w) = cpu(&params);
    let mut bufs = layer.bufs(&mut be, rows).unwrap();
    let mut y = vec![0f32; rows * d];
    layer
        .forward(&mut be, &mut bufs, &mut y, &x, &w, rows)
        .unwrap();
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * d];
    let (fw, hw) = layer.scratch_widths();
    let (mut wide, mut wide_half) = (vec![0f32; rows * fw], vec![0f32; rows * hw]);
    let dy = (&cot[..], Some(&cot[..]));
    layer
        .backward(
            &mut be,
            &mut g,
            &mut dx,
            (&mut wide, &mut wide_half),
            dy,
            &bufs,
            &x,
            &w,
            rows,
        )
        .unwrap();
    let f = |p: &P, x: &[f64]| ffn(p, "", x, rows, d, ffn_kind);
    assert_close(
        "ffn forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    check_grads(
        &format!("{ffn_kind:?}"),
        &table,
        &params,
        &x,
        &g,
        &dx,
        &|p, x| dot(&f(p, x), &cot),
    );
}

#[test]
fn mlp_gradients() {
    ffn_check(Ffn::Mlp { hidden: 12 }, 5);
}

#[test]
fn swiglu_gradients() {
    // Nominal 24 → fused width (16 + 7) / 8 · 8 = 16.
    assert_eq!(swiglu_width(24), 16);
    ffn_check(Ffn::SwiGlu { hidden: 24 }, 6);
}

/// Returns the drop-path subsets the block ran with (attention branch, FFN branch).
fn block_check(
    drop_rate: f32,
    ffn_kind: Ffn,
    layerscale: Option<f32>,
    seed: u64,
) -> [Option<Subset>; 2] {
    let (b, t, d, h) = (4, 3, 8, 2);
    let cfg = BlockConfig {
        dim: d,
        num_heads: h,
        ffn: ffn_kind,
        layerscale,
        eps: 1e-6,
        qkv_bias: true,
        proj_bias: true,
        ffn_bias: true,
    };
    let mut table = ParamTable::new();
    let blk = Block::new(&mut table, "", &cfg);
    let params = random_params(&table, seed);
    let mut rng = keyed(seed, &[stream::TEST]);
    let x = uniform(&mut rng, b * t * d, 1.0);
    let cot = uniform(&mut rng, b * t * d, 1.0);
    let mut y = x.clone();
    // The branches' subsets, drawn in branch order (attention, then FFN) as the backbone does.
    let mut dp_rng = keyed(seed, &[stream::DROP_PATH]);
    let attn_subset = draw_subset(b, drop_rate, &mut dp_rng);
    let ffn_subset = draw_subset(b, drop_rate, &mut dp_rng);
    let (mut be, w) = cpu(&params);
    let mut runner = BlockRunner::new(&mut be, &blk, b, t).unwrap();
    runner
        .forward(
            &mut be,
            &blk,
            &w,
            &mut y,
            [attn_subset.as_ref(), ffn_subset.as_ref()],
        )
        .unwrap();
    let mut g = vec![0f32; table.len()];
    let mut dx = cot.clone();
    runner.backward(&mut be, &blk, &w, &mut g, &mut dx).unwrap();
    let subsets = [
        attn_subset.as_ref().map(|s| s.kept.clone()),
        ffn_subset.as_ref().map(|s| s.kept.clone()),
    ];
    let f = |p: &P, x: &[f64]| {
        block(
            p,
            "",
            x,
            b,
            t,
            d,
            h,
            ffn_kind,
            [subsets[0].as_deref(), subsets[1].as_deref()],
        )
    };
    assert_close(
        "block forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    check_grads("block", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
    [attn_subset, ffn_subset]
}

#[test]
fn block_gradients() {
    block_check(0.0, Ffn::Mlp { hidden: 16 }, Some(0.7), 8);
    block_check(0.0, Ffn::SwiGlu { hidden: 16 }, None, 9);
}

#[test]
fn block_gradients_with_batch_subset_drop_path() {
    let [a, f] = block_check(0.5, Ffn::Mlp { hidden: 16 }, Some(0.7), 10);
    let (a, f) = (a.unwrap(), f.unwrap());
    assert_eq!((a.kept.len(), f.kept.len()), (2, 2));
    assert_eq!((a.scale, f.scale), (2.0, 2.0));
}

#[test]
fn patch_embed_gradients() {
    let (b, c, h, w, ps, d) = (2, 3, 6, 4, 2, 5);
    let mut table = ParamTable::new();
    let pe = PatchEmbed::new(&mut table, "patch_embed.", c, ps, d);
    let params = random_params(&table, 11);
    let mut rng = keyed(11, &[stream::TEST]);
    let img = uniform(&mut rng, b * c * h * w, 1.0);
    let n = (h / ps) * (w / ps);
    let cot = uniform(&mut rng, b * n * d, 1.0);
    // As the embedding runs it: patches unfolded on the host, one GEMM, and back.
    let (mut be, wts) = cpu(&params);
    let mut y = vec![0f32; b * n * d];
    let mut cols = vec![0f32; b * n * c * ps * ps];
    pe.unfold(&mut cols, &img, b, h, w);
    pe.proj
        .forward(&mut be, LinearOut::F32(&mut y[..]), &cols, &wts, b * n)
        .unwrap();
    let mut g = vec![0f32; table.len()];
    pe.proj
        .param_grads(&mut be, &mut g, &cot, Some(&cot), &cols, b * n)
        .unwrap();
    let mut dcols = vec![0f32; cols.len()];
    let dinp = InputGrad::F32(&mut dcols[..], Accumulate::Overwrite);
    pe.proj
        .input_grad(&mut be, dinp, &cot, &wts, b * n)
        .unwrap();
    let mut dimg = vec![0f32; img.len()];
    pe.fold(&mut dimg, &dcols, b, h, w);
    let f = |p: &P, x: &[f64]| patch_embed(p, "patch_embed.", x, b, c, h, w, ps, d);
    assert_close(
        "patch embed forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&img),
        ),
        1e-6,
    );
    check_grads("patch embed", &table, &params, &img, &g, &dimg, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

fn pos_check(h: usize, w: usize, gh: usize, gw: usize, offset: f32, resampling: Resampling) {
    let (m, d) = (4, 3);
    let mut table = ParamTable::new();
    let pos = PosEmbed::new(&mut table, "", m, d, offset, resampling);
    let params = random_params(&table, 12);
    let (mut be, wts) = cpu(&params);
    let mut bufs = pos.bufs(&mut be, (h, w), (gh, gw)).unwrap();
    let n = 1 + gh * gw;
    let cot = uniform(&mut keyed(12, &[stream::TEST]), n * d, 1.0);
    let y = pos.forward(&mut be, &mut bufs, &wts).unwrap().to_vec();
    let mut g = vec![0f32; table.len()];
    pos.backward(&mut be, &mut bufs, &mut g, &cot[..d], &cot[d..])
        .unwrap();
    let aa = resampling == Resampling::Antialias;
    let f = |p: &P| pos_interp(p.get("pos_embed"), m, d, h, w, gh, gw, offset as f64, aa);
    let what = format!("pos interp {h}x{w} -> {gh}x{gw}, offset {offset}, {resampling:?}");
    assert_close(
        &what,
        &y,
        &f(&P {
            table: &table,
            vals: &to64(&params),
        }),
        1e-5,
    );
    check_grads(&what, &table, &params, &[], &g, &[], &|p, _| {
        dot(&f(p), &cot)
    });
}

#[test]
fn pos_interp_gradients_both_modes() {
    for resampling in [Resampling::Bicubic, Resampling::Antialias] {
        for offset in [0.1, 0.0] {
            pos_check(28, 28, 2, 2, offset, resampling); // down
            pos_check(84, 84, 6, 6, offset, resampling); // up
            pos_check(42, 70, 3, 5, offset, resampling); // non-square
            pos_check(56, 56, 4, 4, offset, resampling); // identity
        }
    }
    // Same patch count as the grid but a non-square input: interpolated, not identity.
    pos_check(32, 128, 2, 8, 0.1, Resampling::Bicubic);
}

#[test]
fn dino_head_gradients_including_weight_g() {
    let (n, i, hd, bn, k) = (3, 6, 10, 5, 7);
    let mut table = ParamTable::new();
    let head = DinoHead::new(i, hd, bn, k, &mut table, "");
    let params = random_params(&table, 13);
    let mut rng = keyed(13, &[stream::TEST]);
    let x = uniform(&mut rng, n * i, 1.0);
    let cot = uniform(&mut rng, n * k, 1.0);
    let (mut be, w) = cpu(&params);
    let mut protos = Prototypes::new(&mut be, &head).unwrap();
    protos.prepare(&mut be, &head, &w).unwrap();
    let mut cache = HeadCache::default();
    head.forward(&mut be, &mut cache, &protos, &w, &x, n)
        .unwrap();
    let y = cache.logits.get().unwrap().to_vec();
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; n * i];
    let mut scratch = HeadScratch::default();
    head.backward(
        &mut be,
        &mut scratch,
        &mut g,
        (&mut dx, Accumulate::Overwrite),
        (&cache, &protos),
        &w,
        &cot,
    )
    .unwrap();
    let f = |p: &P, x: &[f64]| dino_head(p, x, n, (i, hd, bn, k));
    assert_close(
        "dino head forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    assert!(g[table.get("last_layer.weight_g").unwrap().at.range()]
        .iter()
        .any(|v| *v != 0.0));
    check_grads("dino head", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

fn vit_check(cfg: &VitConfig, b: usize, h: usize, w: usize, with_masks: bool, seed: u64) {
    let mut table = ParamTable::new();
    let model = Vit::new(cfg, &mut table, "");
    let params = random_params(&table, seed);
    let mut rng = keyed(seed, &[stream::TEST]);
    let img = uniform(&mut rng, b * cfg.in_chans * h * w, 1.0);
    let n = (h / cfg.patch_size) * (w / cfg.patch_size);
    let (d, r) = (cfg.embed_dim, cfg.num_register_tokens);
    let masks: Option<Vec<bool>> = with_masks.then(|| (0..b * n).map(|k| k % 3 == 1).collect());
    let c_cls = uniform(&mut rng, b * d, 1.0);
    let c_reg = uniform(&mut rng, b * r * d, 1.0);
    let c_patch = uniform(&mut rng, b * n * d, 1.0);
    let (mut be, wts) = cpu(&params);
    let mut ws = VitWorkspaces::new(&model);
    let key = (b, h, w);
    let out = ws
        .forward(&mut be, &model, &wts, &img, key, masks.as_deref(), None)
        .unwrap()
        .to_host(&mut be)
        .unwrap();
    let mut g = vec![0f32; table.len()];
    let dout = OutputGrads::<CpuBackend> {
        cls: &c_cls,
        patch: &c_patch,
        reg: Some(&c_reg),
    };
    let dimg = ws
        .backward(&mut be, &model, &wts, &mut g, key, dout, ImageGrad::Compute)
        .unwrap()
        .expect("image gradient asked for");
    let p64 = to64(&params);
    let (cls, reg, patch) = vit(
        &P {
            table: &table,
            vals: &p64,
        },
        cfg,
        &to64(&img),
        b,
        h,
        w,
        masks.as_deref(),
    );
    assert_close("vit cls", &out.cls, &cls, 1e-5);
    assert_close("vit patch", &out.patch, &patch, 1e-5);
    if r > 0 {
        assert_close("vit reg", &out.reg, &reg, 1e-5);
    }
    let mask_grad = &g[table.get("mask_token").unwrap().at.range()];
    assert_eq!(mask_grad.iter().any(|v| *v != 0.0), with_masks);
    check_grads("vit", &table, &params, &img, &g, &dimg, &|p, x| {
        let (cls, reg, patch) = vit(p, cfg, x, b, h, w, masks.as_deref());
        dot(&cls, &c_cls) + dot(&reg, &c_reg) + dot(&patch, &c_patch)
    });
}

fn micro_cfg(registers: usize, offset: f32, antialias: bool, ffn: Ffn) -> VitConfig {
    VitConfig {
        img_size: 8,
        patch_size: 2,
        in_chans: 3,
        embed_dim: 8,
        depth: 2,
        num_heads: 2,
        ffn,
        num_register_tokens: registers,
        layerscale: Some(0.5),
        interpolate_offset: offset,
        interpolate_antialias: antialias,
        qkv_bias: true,
        proj_bias: true,
        ffn_bias: true,
    }
}

#[test]
fn vit_gradients_with_masks_and_registers() {
    vit_check(
        &micro_cfg(2, 0.1, false, Ffn::Mlp { hidden: 16 }),
        2,
        8,
        8,
        true,
        14,
    );
}

#[test]
fn vit_gradients_interpolated_both_modes() {
    vit_check(
        &micro_cfg(0, 0.1, false, Ffn::Mlp { hidden: 16 }),
        2,
        6,
        10,
        true,
        15,
    );
    vit_check(
        &micro_cfg(2, 0.0, true, Ffn::SwiGlu { hidden: 16 }),
        1,
        12,
        12,
        false,
        16,
    );
}
