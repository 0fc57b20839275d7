//! Backbone behaviour: the patch-leak regression, batch-subset stochastic depth, presets and
//! official key names, bad input as typed errors, and the cache-free forward.

use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::prelude::*;
use dinotrain::backend::Counters;
use dinotrain::nn::block::{Block, BlockConfig, BlockRunner};
use dinotrain::nn::drop_path::{draw_subset, DropPath, Subset};
use dinotrain::nn::ffn::Ffn;
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::presets::Preset;
use dinotrain::nn::vit::{Vit, VitConfig, VitOutput};
use dinotrain::nn::{DinoHead, ImageGrad, OutputGrads, VitWorkspaces};
use dinotrain::rng::{keyed, stream, Rng};
use dinotrain::Result;
use rand::Rng as _;

/// A backbone on the CPU backend with host parameters.
struct Cpu<'a> {
    be: CpuBackend,
    vit: &'a Vit,
    w: <CpuBackend as Buffers>::Weights,
    ws: VitWorkspaces<CpuBackend>,
}

impl<'a> Cpu<'a> {
    fn new(vit: &'a Vit, params: &[f32]) -> Result<Self> {
        let mut be = CpuBackend::default();
        let w = be.weights(params)?;
        Ok(Cpu {
            be,
            vit,
            w,
            ws: VitWorkspaces::new(vit),
        })
    }

    fn infer(&mut self, img: &[f32], (b, h, w): (usize, usize, usize)) -> Result<VitOutput> {
        let out = self
            .ws
            .forward_inference(&mut self.be, self.vit, &self.w, img, (b, h, w))?;
        out.to_host(&mut self.be)
    }

    fn train(
        &mut self,
        img: &[f32],
        key: (usize, usize, usize),
        masks: Option<&[bool]>,
        dp: Option<DropPath<'_>>,
    ) -> Result<VitOutput> {
        let out = self
            .ws
            .forward(&mut self.be, self.vit, &self.w, img, key, masks, dp)?;
        out.to_host(&mut self.be)
    }

    fn backward(
        &mut self,
        grads: &mut [f32],
        key: (usize, usize, usize),
        d_cls: &[f32],
        d_patch: &[f32],
    ) -> Result<()> {
        let d = OutputGrads::<CpuBackend> {
            cls: d_cls,
            patch: d_patch,
            reg: None,
        };
        self.ws
            .backward(
                &mut self.be,
                self.vit,
                &self.w,
                grads,
                key,
                d,
                ImageGrad::Skip,
            )
            .map(drop)
    }

    fn counters(&self) -> Counters {
        self.be.counters()
    }
}

/// `x [b, t, d]` through one block on the CPU backend with the branches' subsets.
fn block_forward(
    blk: &Block,
    params: &[f32],
    x: &mut [f32],
    b: usize,
    t: usize,
    subsets: [Option<&Subset>; 2],
) {
    let mut be = CpuBackend::default();
    let w = be.weights(params).unwrap();
    let mut runner = BlockRunner::new(&mut be, blk, b, t).unwrap();
    runner.forward(&mut be, blk, &w, x, subsets).unwrap();
}

fn uniform(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn model(cfg: &VitConfig, seed: u64) -> (Vit, ParamTable, Vec<f32>) {
    let mut table = ParamTable::new();
    let vit = Vit::new(cfg, &mut table, "backbone.");
    // Official init, then larger cls/pos values so every token differs visibly.
    let mut params = table.init(&mut keyed(seed, &[stream::INIT]));
    let mut rng = keyed(seed, &[stream::TEST]);
    for name in ["backbone.cls_token", "backbone.pos_embed"] {
        let r = table.get(name).unwrap().at;
        params[r.range()].copy_from_slice(&uniform(&mut rng, r.len, 1.0));
    }
    (vit, table, params)
}

fn depth0(patch: usize, registers: usize) -> VitConfig {
    let mut cfg = Preset::Micro.config(8 * patch, patch, registers);
    cfg.depth = 0;
    cfg
}

/// The seed's leak: a token must only see its own patch. With no blocks, changing the pixels
/// of one patch changes exactly that patch's output token and nothing else, bit for bit.
#[test]
fn regression_patch_pixels_leak_only_into_their_own_token() {
    let (p, b, h, w) = (4, 2, 32, 24);
    let cfg = depth0(p, 2);
    let (vit, _, params) = model(&cfg, 1);
    let mut cpu = Cpu::new(&vit, &params).unwrap();
    let img = uniform(&mut keyed(2, &[stream::TEST]), b * 3 * h * w, 1.0);
    let base = cpu.infer(&img, (b, h, w)).unwrap();
    let (gh, gw) = (h / p, w / p);
    for &(img_i, pi, pj) in &[(0, 0, 0), (1, 3, 5), (0, gh - 1, gw - 1), (1, 5, 0)] {
        let mut changed = img.clone();
        for c in 0..3 {
            for y in pi * p..(pi + 1) * p {
                for x in pj * p..(pj + 1) * p {
                    changed[((img_i * 3 + c) * h + y) * w + x] += 0.5;
                }
            }
        }
        let out = cpu.infer(&changed, (b, h, w)).unwrap();
        assert_eq!(out.cls, base.cls, "cls changed");
        assert_eq!(out.reg, base.reg, "registers changed");
        let d = cfg.embed_dim;
        let target = img_i * gh * gw + pi * gw + pj;
        for (k, (a, o)) in out.patch.chunks(d).zip(base.patch.chunks(d)).enumerate() {
            if k == target {
                assert_ne!(a, o, "patch ({pi},{pj}) of image {img_i} did not change");
            } else {
                assert_eq!(
                    a, o,
                    "token {k} changed when patch ({pi},{pj}) of image {img_i} did"
                );
            }
        }
    }
}

/// A masked patch's output does not depend on its pixels (mask token substitution), and its
/// token is mask_token + its position embedding.
#[test]
fn masked_patches_ignore_their_pixels() {
    let (p, b, h, w) = (4, 1, 32, 32);
    let cfg = depth0(p, 0);
    let (vit, _, params) = model(&cfg, 3);
    let n = (h / p) * (w / p);
    let masks: Vec<bool> = (0..b * n).map(|k| k % 5 == 2).collect();
    let img = uniform(&mut keyed(4, &[stream::TEST]), b * 3 * h * w, 1.0);
    let other = uniform(&mut keyed(5, &[stream::TEST]), b * 3 * h * w, 1.0);
    let mut cpu = Cpu::new(&vit, &params).unwrap();
    let a = cpu.train(&img, (b, h, w), Some(&masks), None).unwrap();
    let o = cpu.train(&other, (b, h, w), Some(&masks), None).unwrap();
    let d = cfg.embed_dim;
    for (k, &m) in masks.iter().enumerate() {
        let same = a.patch[k * d..(k + 1) * d] == o.patch[k * d..(k + 1) * d];
        assert_eq!(same, m, "token {k}");
    }
}

fn block_setup(seed: u64, zero_branch: Option<&str>) -> (Block, Vec<f32>, Vec<f32>) {
    let cfg = BlockConfig {
        dim: 8,
        num_heads: 2,
        ffn: Ffn::Mlp { hidden: 16 },
        layerscale: Some(1.0),
        eps: 1e-6,
        qkv_bias: true,
        proj_bias: true,
        ffn_bias: true,
    };
    let mut table = ParamTable::new();
    let blk = Block::new(&mut table, "", &cfg);
    let mut params = table.init(&mut keyed(seed, &[stream::INIT]));
    if let Some(name) = zero_branch {
        params[table.get(name).unwrap().at.range()].fill(0.0);
    }
    let x = uniform(&mut keyed(seed, &[stream::TEST]), 10 * 3 * 8, 1.0);
    (blk, params, x)
}

/// With one branch silenced (gamma 0), the other branch under drop path adds `b/keep` times
/// its plain contribution to the kept samples and nothing to the others.
#[test]
fn drop_path_keeps_max_int_b_times_one_minus_rate_samples_scaled_by_b_over_keep() {
    let (b, t, d) = (10, 3, 8);
    for (silenced, branch) in [("ls2.gamma", "attn"), ("ls1.gamma", "ffn")] {
        let (blk, params, x) = block_setup(6, Some(silenced));
        let mut plain = x.clone();
        block_forward(&blk, &params, &mut plain, b, t, [None, None]);
        let mut dropped = x.clone();
        let mut rng = keyed(9, &[stream::DROP_PATH]);
        let attn = draw_subset(b, 0.3, &mut rng).unwrap();
        let ffn = draw_subset(b, 0.3, &mut rng).unwrap();
        block_forward(&blk, &params, &mut dropped, b, t, [Some(&attn), Some(&ffn)]);
        let subset = if branch == "attn" { attn } else { ffn };
        // Python: int(10 · (1 − 0.3)) = 7.
        assert_eq!(subset.kept.len(), 7);
        assert!((subset.scale - 10.0 / 7.0).abs() < 1e-7);
        for i in 0..b {
            let s = i * t * d..(i + 1) * t * d;
            if subset.kept.contains(&i) {
                for e in s {
                    let want = x[e] + subset.scale * (plain[e] - x[e]);
                    assert!((dropped[e] - want).abs() < 1e-5, "{branch} sample {i}");
                }
            } else {
                assert_eq!(
                    &dropped[s.clone()],
                    &x[s],
                    "{branch}: dropped sample {i} changed"
                );
            }
        }
    }
}

#[test]
fn drop_path_is_deterministic_per_seed_and_rate_zero_is_the_plain_residual() {
    let (b, t) = (10, 3);
    let (blk, params, x) = block_setup(7, None);
    let run = |seed: u64, rate: f32| {
        let mut y = x.clone();
        let mut rng = keyed(seed, &[stream::DROP_PATH]);
        let attn = draw_subset(b, rate, &mut rng);
        let ffn = draw_subset(b, rate, &mut rng);
        block_forward(&blk, &params, &mut y, b, t, [attn.as_ref(), ffn.as_ref()]);
        (y, attn.map(|s| s.kept), ffn.map(|s| s.kept))
    };
    let a = run(1, 0.4);
    assert_eq!(a, run(1, 0.4));
    let other = run(2, 0.4);
    assert!(
        a.1 != other.1 || a.2 != other.2,
        "different seeds drew the same subsets"
    );
    // Two independent draws per block (attention and FFN).
    assert!(a.1.as_ref().unwrap().len() == 6 && a.2.as_ref().unwrap().len() == 6);
    let mut plain = x.clone();
    block_forward(&blk, &params, &mut plain, b, t, [None, None]);
    let zero = run(3, 0.0);
    assert_eq!(zero.0, plain);
    assert_eq!((zero.1, zero.2), (None, None));
}

/// The official count from spec 10.1's key table, written out per tensor.
fn official_count(
    d: usize,
    depth: usize,
    grid: usize,
    p: usize,
    regs: usize,
    ffn_in: usize,
    ffn_hidden_out: usize,
) -> usize {
    let top = d + (1 + grid * grid) * d + d + regs * d + (d * 3 * p * p + d) + 2 * d;
    let block = 2 * d // norm1
        + (3 * d * d + 3 * d) // qkv
        + (d * d + d) // proj
        + d // ls1
        + 2 * d // norm2
        + (ffn_in * d + ffn_in) // fc1 / w12
        + (d * ffn_hidden_out + d) // fc2 / w3
        + d; // ls2
    top + depth * block
}

#[test]
fn preset_parameter_counts_match_the_official_tables() {
    let count = |cfg: &VitConfig| {
        let mut t = ParamTable::new();
        Vit::new(cfg, &mut t, "");
        t.len()
    };
    let s = Preset::Small.released(false);
    assert_eq!(count(&s), 22_056_576); // ViT-S/14 at 518 px: ~22.06 M
    assert_eq!(count(&s), official_count(384, 12, 37, 14, 0, 1536, 1536));
    assert_eq!(count(&Preset::Small.released(true)), 22_056_576 + 4 * 384);
    assert_eq!(
        count(&Preset::Base.released(false)),
        official_count(768, 12, 37, 14, 0, 3072, 3072)
    );
    assert_eq!(
        count(&Preset::Large.released(false)),
        official_count(1024, 24, 37, 14, 0, 4096, 4096)
    );
    assert_eq!(
        count(&Preset::Giant.released(true)),
        official_count(1536, 40, 37, 14, 4, 8192, 4096)
    );
    // Training ViT-S/14 at 224 px (16×16 grid).
    assert_eq!(
        count(&Preset::Small.config(224, 14, 0)),
        official_count(384, 12, 16, 14, 0, 1536, 1536)
    );
}

#[test]
fn preset_keys_are_the_official_state_dict_keys() {
    let keys = |cfg: &VitConfig| {
        let mut t = ParamTable::new();
        Vit::new(cfg, &mut t, "backbone.");
        t
    };
    let s = keys(&Preset::Small.released(false));
    let first: Vec<&str> = s.specs().iter().take(6).map(|p| p.name.as_str()).collect();
    assert_eq!(
        first,
        [
            "backbone.cls_token",
            "backbone.pos_embed",
            "backbone.mask_token",
            "backbone.patch_embed.proj.weight",
            "backbone.patch_embed.proj.bias",
            "backbone.blocks.0.norm1.weight"
        ]
    );
    let shape = |t: &ParamTable, k: &str| t.get(k).unwrap_or_else(|| panic!("{k}")).shape.clone();
    assert_eq!(shape(&s, "backbone.pos_embed"), [1, 1370, 384]);
    assert_eq!(shape(&s, "backbone.mask_token"), [1, 384]);
    assert_eq!(
        shape(&s, "backbone.patch_embed.proj.weight"),
        [384, 3, 14, 14]
    );
    assert_eq!(shape(&s, "backbone.blocks.11.attn.qkv.weight"), [1152, 384]);
    assert_eq!(shape(&s, "backbone.blocks.11.ls2.gamma"), [384]);
    assert_eq!(shape(&s, "backbone.blocks.11.mlp.fc2.weight"), [384, 1536]);
    assert_eq!(shape(&s, "backbone.norm.bias"), [384]);
    assert!(
        s.get("backbone.register_tokens").is_none()
            && s.get("backbone.blocks.12.norm1.weight").is_none()
    );
    let b = keys(&Preset::Base.released(true));
    assert_eq!(shape(&b, "backbone.register_tokens"), [1, 4, 768]);
    assert_eq!(shape(&b, "backbone.blocks.11.mlp.fc1.weight"), [3072, 768]);
    let l = keys(&Preset::Large.released(false));
    assert_eq!(
        shape(&l, "backbone.blocks.23.attn.proj.weight"),
        [1024, 1024]
    );
    let g = keys(&Preset::Giant.released(true));
    assert_eq!(shape(&g, "backbone.blocks.39.mlp.w12.weight"), [8192, 1536]);
    assert_eq!(shape(&g, "backbone.blocks.39.mlp.w3.weight"), [1536, 4096]);
    assert!(g.get("backbone.blocks.0.mlp.fc1.weight").is_none());
    let mut h = ParamTable::new();
    DinoHead::new(384, 2048, 256, 65536, &mut h, "dino_head.");
    assert_eq!(shape(&h, "dino_head.last_layer.weight_g"), [65536, 1]);
    assert_eq!(shape(&h, "dino_head.last_layer.weight_v"), [65536, 256]);
    assert_eq!(shape(&h, "dino_head.mlp.4.weight"), [256, 2048]);
}

#[test]
fn official_init_statistics() {
    let cfg = Preset::Small.config(224, 14, 4);
    let mut table = ParamTable::new();
    Vit::new(&cfg, &mut table, "backbone.");
    DinoHead::new(384, 2048, 256, 4096, &mut table, "dino_head.");
    let p = table.init(&mut keyed(0, &[stream::INIT]));
    let get = |k: &str| &p[table.get(k).unwrap().at.range()];
    let std =
        |v: &[f32]| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    assert!((std(get("backbone.blocks.0.attn.qkv.weight")) - 0.02).abs() < 0.001);
    assert!((std(get("backbone.pos_embed")) - 0.02).abs() < 0.002);
    assert!(std(get("backbone.cls_token")) < 1e-5 && std(get("backbone.register_tokens")) < 1e-5);
    assert!(get("backbone.mask_token").iter().all(|v| *v == 0.0));
    assert!(get("backbone.blocks.0.attn.qkv.bias")
        .iter()
        .all(|v| *v == 0.0));
    assert!(get("backbone.blocks.3.ls1.gamma")
        .iter()
        .all(|v| *v == 1e-5));
    assert!(get("backbone.norm.weight").iter().all(|v| *v == 1.0));
    let bound = 1.0 / (3.0f32 * 14.0 * 14.0).sqrt();
    let pw = get("backbone.patch_embed.proj.weight");
    assert!(pw.iter().all(|v| v.abs() <= bound) && pw.iter().any(|v| v.abs() > 0.9 * bound));
    assert!(get("backbone.patch_embed.proj.bias")
        .iter()
        .all(|v| v.abs() <= bound));
    assert!(get("dino_head.last_layer.weight_g")
        .iter()
        .all(|v| *v == 1.0));
    let v = get("dino_head.last_layer.weight_v");
    assert!(v.iter().all(|x| x.abs() <= 1.0 / 16.0) && v.iter().any(|x| x.abs() > 0.06));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let cfg = Preset::Micro.config(16, 4, 0);
    let (vit, table, params) = model(&cfg, 8);
    let img = vec![0f32; 3 * 16 * 16];
    let mut cpu = Cpu::new(&vit, &params).unwrap();
    assert!(cpu.train(&img, (1, 16, 16), None, None).is_ok());
    assert!(cpu.train(&img, (1, 16, 15), None, None).is_err()); // not a multiple of p
    assert!(cpu.train(&img, (2, 16, 16), None, None).is_err()); // wrong image count
    assert!(cpu
        .train(&img, (1, 16, 16), Some(&[true; 3]), None)
        .is_err()); // masks
    assert!(Cpu::new(&vit, &params[..10])
        .unwrap()
        .train(&img, (1, 16, 16), None, None)
        .is_err()); // params
    let mut rng = keyed(0, &[]);
    let dp = DropPath {
        rate: 1.0,
        rng: &mut rng,
    };
    assert!(cpu.train(&img, (1, 16, 16), None, Some(dp)).is_err());
    cpu.train(&img, (1, 16, 16), None, None).unwrap();
    let mut grads = vec![0f32; table.len()];
    assert!(cpu
        .backward(&mut grads, (1, 16, 16), &[0.0; 31], &[0.0; 16 * 32])
        .is_err());
    // Backward of a size that has not run forward.
    assert!(cpu
        .backward(&mut grads, (2, 16, 16), &[0.0; 64], &[0.0; 2 * 16 * 32])
        .is_err());
    let mut bad = cfg.clone();
    bad.num_heads = 3;
    assert!(bad.validate().is_err());
    assert!("vitq".parse::<Preset>().is_err());
}

#[test]
fn inference_forward_equals_training_forward_and_backward_accumulates() {
    let cfg = Preset::Micro.config(16, 4, 2);
    let (vit, table, params) = model(&cfg, 9);
    let (b, h, w) = (2, 16, 20);
    let img = uniform(&mut keyed(10, &[stream::TEST]), b * 3 * h * w, 1.0);
    let mut cpu = Cpu::new(&vit, &params).unwrap();
    let train = cpu.train(&img, (b, h, w), None, None).unwrap();
    let infer = cpu.infer(&img, (b, h, w)).unwrap();
    assert_eq!(
        (train.cls, train.reg, train.patch),
        (infer.cls.clone(), infer.reg.clone(), infer.patch.clone())
    );
    // Workspaces are sized once per input size: another forward of both kinds allocates nothing.
    let before = cpu.counters().allocations;
    cpu.train(&img, (b, h, w), None, None).unwrap();
    cpu.infer(&img, (b, h, w)).unwrap();
    assert_eq!(cpu.counters().allocations, before);
    // Parameter gradients accumulate: two backward passes give twice one.
    let d = cfg.embed_dim;
    let n = infer.n_patches;
    let dc = uniform(&mut keyed(11, &[stream::TEST]), b * d, 1.0);
    let dpch = uniform(&mut keyed(12, &[stream::TEST]), b * n * d, 1.0);
    let mut g1 = vec![0f32; table.len()];
    cpu.backward(&mut g1, (b, h, w), &dc, &dpch).unwrap();
    let mut g2 = g1.clone();
    cpu.backward(&mut g2, (b, h, w), &dc, &dpch).unwrap();
    for (a, b2) in g1.iter().zip(&g2) {
        assert!((2.0 * a - b2).abs() <= 1e-5 * (1.0 + a.abs()));
    }
}

/// Drop path through the whole backbone: deterministic per seed, different across seeds, and
/// rate 0 gives exactly the plain forward.
#[test]
fn vit_drop_path_is_seeded_and_rate_zero_is_plain() {
    let cfg = Preset::Micro.config(16, 4, 0);
    let (vit, _, params) = model(&cfg, 12);
    let (b, h, w) = (6, 16, 16);
    let img = uniform(&mut keyed(13, &[stream::TEST]), b * 3 * h * w, 1.0);
    let mut cpu = Cpu::new(&vit, &params).unwrap();
    let mut run = |seed: u64, rate: f32| {
        let mut rng = keyed(seed, &[stream::DROP_PATH]);
        let dp = DropPath {
            rate,
            rng: &mut rng,
        };
        cpu.train(&img, (b, h, w), None, Some(dp)).unwrap().cls
    };
    let a = run(1, 0.5);
    assert_eq!(run(1, 0.0), run(1, 0.0));
    assert_eq!(a, run(1, 0.5));
    assert_ne!(a, run(2, 0.5));
    let plain = Cpu::new(&vit, &params)
        .unwrap()
        .train(&img, (b, h, w), None, None)
        .unwrap()
        .cls;
    assert_eq!(run(1, 0.0), plain);
    assert_ne!(a, plain);
}
