//! Gradient checks of every layer: the analytic f32 backward against central finite
//! differences of an independent f64 evaluation of the same forward (small naive reference
//! implementations in `nn_reference`, written from the spec, not from the layer code). Each check also
//! compares the f32 forward with the f64 reference, so the reference is the same function.
//!
//! Objective: `L = Σ out · cot` with a random cotangent `cot`.

mod nn_reference;

use dinotrain::nn::attention::Attention;
use dinotrain::nn::block::{Block, BlockCache, BlockConfig};
use dinotrain::nn::dino_head::DinoHead;
use dinotrain::nn::drop_path::DropPath;
use dinotrain::nn::ffn::{Ffn, FfnLayer};
use dinotrain::nn::layernorm::LayerNorm;
use dinotrain::nn::linear::{Bias, Linear};
use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::nn::patch_embed::PatchEmbed;
use dinotrain::nn::pos_embed::{PosEmbed, Resampling};
use dinotrain::nn::swiglu::swiglu_width;
use dinotrain::nn::vit::{Vit, VitConfig};
use dinotrain::rng::{keyed, stream};
use nn_reference::*;

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
    let mut y = vec![0f32; rows * n];
    layer.forward(&mut y, &x, &params, rows);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * k];
    layer.backward(Some(&mut dx), &mut g, &cot, &x, &params, rows);
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
    let mut y = vec![0f32; rows * d];
    let stats = ln.forward(&mut y, &x, &params, rows);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * d];
    ln.backward(&mut dx, &mut g, &cot, &x, &stats, &params, rows);
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
    use dinotrain::backend::cpu::elementwise::{gelu_backward, gelu_forward};
    let mut rng = keyed(3, &[stream::TEST]);
    let x = uniform(&mut rng, 64, 4.0);
    let cot = uniform(&mut rng, 64, 1.0);
    let mut y = vec![0f32; 64];
    gelu_forward(&mut y, &x);
    let mut dx = vec![0f32; 64];
    gelu_backward(&mut dx, &cot, &x);
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
    let mut y = vec![0f32; b * t * d];
    let cache = attn.forward(&mut y, &x, &params, b, t);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; b * t * d];
    attn.backward(&mut dx, &mut g, &cot, &x, &cache, &params, b, t);
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
    let mut y = vec![0f32; rows * d];
    let cache = layer.forward(&mut y, &x, &params, rows);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * d];
    layer.backward(&mut dx, &mut g, &cot, &x, &cache, &params, rows);
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

fn block_check(drop_rate: f32, ffn_kind: Ffn, layerscale: Option<f32>, seed: u64) -> BlockCache {
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
    let mut dp_rng = keyed(seed, &[stream::DROP_PATH]);
    let dp = (drop_rate > 0.0).then_some(DropPath {
        rate: drop_rate,
        rng: &mut dp_rng,
    });
    let cache = match dp {
        Some(mut dp) => blk.forward(&mut y, &params, b, t, Some(&mut dp)),
        None => blk.forward(&mut y, &params, b, t, None),
    };
    let mut g = vec![0f32; table.len()];
    let mut dx = cot.clone();
    blk.backward(&mut dx, &mut g, &cache, &params);
    let subsets = [
        cache.attn.subset.as_ref().map(|s| s.kept.clone()),
        cache.ffn.subset.as_ref().map(|s| s.kept.clone()),
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
    cache
}

#[test]
fn block_gradients() {
    block_check(0.0, Ffn::Mlp { hidden: 16 }, Some(0.7), 8);
    block_check(0.0, Ffn::SwiGlu { hidden: 16 }, None, 9);
}

#[test]
fn block_gradients_with_batch_subset_drop_path() {
    let cache = block_check(0.5, Ffn::Mlp { hidden: 16 }, Some(0.7), 10);
    let (a, f) = (cache.attn.subset.unwrap(), cache.ffn.subset.unwrap());
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
    let mut y = vec![0f32; b * n * d];
    let mut cols = vec![0f32; b * n * c * ps * ps];
    pe.forward(&mut y, &mut cols, &img, &params, b, h, w);
    let mut g = vec![0f32; table.len()];
    let mut dimg = vec![0f32; img.len()];
    pe.backward(Some(&mut dimg), &mut g, &cot, &cols, &params, b, h, w);
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
    let plan = pos.plan(h, w, gh, gw);
    let n = 1 + gh * gw;
    let cot = uniform(&mut keyed(12, &[stream::TEST]), n * d, 1.0);
    let mut y = vec![0f32; n * d];
    pos.forward(&mut y, &params, &plan);
    let mut g = vec![0f32; table.len()];
    pos.backward(&mut g, &cot, &plan);
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
    let (y, cache) = head.forward(&params, &x, n);
    let mut g = vec![0f32; table.len()];
    let dx = head.backward(&params, &mut g, &cache, &cot);
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
    let (out, cache) = model
        .forward(&params, &img, b, h, w, masks.as_deref(), None)
        .unwrap();
    let mut g = vec![0f32; table.len()];
    let dimg = model
        .backward(&params, &mut g, &cache, &c_cls, &c_patch, Some(&c_reg))
        .unwrap();
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
