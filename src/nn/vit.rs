//! The DINOv2 backbone (`DinoVisionTransformer`): patch embedding, mask-token substitution,
//! CLS token, position embedding (interpolated when needed), register tokens, blocks, final
//! LayerNorm, and the three outputs (spec 1.2–1.7).
//!
//! Dimensions: `b` images, `c` channels, `h × w` pixels, `p` patch size, `n = (h/p)·(w/p)`
//! patch tokens, `r` registers, `t = 1 + r + n` tokens, `d` channels.
//! Token order: `[cls, reg_0..reg_{r-1}, patch_0..patch_{n-1}]`.

use super::block::{Block, BlockCache, BlockConfig};
use super::drop_path::{check_rate, DropPath};
use super::ffn::Ffn;
use super::layernorm::{LayerNorm, LnStats, LN_EPS};
use super::params::{Init, ParamRef, ParamTable};
use super::patch_embed::PatchEmbed;
use super::pos_embed::{PosEmbed, PosPlan, Resampling};
use crate::error::{Error, Result};

/// Backbone hyper-parameters (the official constructor's arguments). Serialised as JSON in
/// exported files (`dinotrain.arch` metadata) so a backbone reloads with its architecture.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    /// Construction size in pixels: the position embedding covers (img_size/p)² patches.
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub ffn: Ffn,
    pub num_register_tokens: usize,
    /// LayerScale init value; `None` = no LayerScale.
    pub layerscale: Option<f32>,
    pub interpolate_offset: f32,
    pub interpolate_antialias: bool,
    pub qkv_bias: bool,
    pub proj_bias: bool,
    pub ffn_bias: bool,
}

impl VitConfig {
    /// Checks the sizes a model can be built from.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("ViT: {msg}")));
        if self.patch_size == 0 || self.img_size == 0 || self.in_chans == 0 || self.embed_dim == 0 {
            return bad(format!("sizes must be positive: {self:?}"));
        }
        if self.img_size % self.patch_size != 0 {
            return bad(format!(
                "img_size {} is not a multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || self.embed_dim % self.num_heads != 0 {
            return bad(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if !self.interpolate_offset.is_finite() || self.interpolate_offset < 0.0 {
            return bad(format!(
                "interpolate_offset {} must be >= 0",
                self.interpolate_offset
            ));
        }
        Ok(())
    }

    /// Side of the position-embedding grid, `img_size / patch_size`.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }
}

/// The backbone: parameter views only; the values live in the flat parameter buffer.
#[derive(Clone, Debug)]
pub struct Vit {
    pub cfg: VitConfig,
    pub cls_token: ParamRef,               // [1, 1, d]
    pub pos: PosEmbed,                     // [1, 1 + M², d]
    pub register_tokens: Option<ParamRef>, // [1, r, d]
    pub mask_token: ParamRef,              // [1, d]
    pub patch_embed: PatchEmbed,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
}

/// The backbone's outputs (all after the final LayerNorm).
#[derive(Clone, Debug, Default)]
pub struct VitOutput {
    pub cls: Vec<f32>,   // [b, d]   x_norm_clstoken
    pub reg: Vec<f32>,   // [b, r, d] x_norm_regtokens
    pub patch: Vec<f32>, // [b, n, d] x_norm_patchtokens
    pub b: usize,
    pub n_patches: usize,
    pub n_registers: usize,
    pub dim: usize,
}

/// Everything backward needs from one forward.
#[derive(Debug)]
pub struct VitCache {
    b: usize,
    h: usize,
    w: usize,
    n: usize,
    cols: Vec<f32>, // [b·n, c·p·p] unfolded patches
    masks: Option<Vec<bool>>,
    plan: PosPlan,
    blocks: Vec<BlockCache>,
    x_final: Vec<f32>, // [b, t, d] before the final norm
    norm_stats: LnStats,
}

/// Whether forward keeps what backward needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    Cache,
    Nothing,
}

impl VitCache {
    /// Bytes held for backward (activations and saved statistics), for memory planning.
    pub fn activation_bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(BlockCache::floats).sum();
        let floats = self.cols.len()
            + self.x_final.len()
            + self.norm_stats.mean.len()
            + self.norm_stats.rstd.len();
        4 * (blocks + floats) + self.masks.as_ref().map_or(0, Vec::len)
    }
}

impl Vit {
    /// Declares every parameter in `table` under `prefix` (`"backbone."` or `""`), in the
    /// official registration order, with the official initialisation.
    pub fn new(cfg: &VitConfig, table: &mut ParamTable, prefix: &str) -> Self {
        let d = cfg.embed_dim;
        let cls_token = table.push(
            format!("{prefix}cls_token"),
            &[1, 1, d],
            Init::Normal { std: 1e-6 },
        );
        let resampling = if cfg.interpolate_antialias {
            Resampling::Antialias
        } else {
            Resampling::Bicubic
        };
        let pos = PosEmbed::new(
            table,
            prefix,
            cfg.grid(),
            d,
            cfg.interpolate_offset,
            resampling,
        );
        let register_tokens = (cfg.num_register_tokens > 0).then(|| {
            table.push(
                format!("{prefix}register_tokens"),
                &[1, cfg.num_register_tokens, d],
                Init::Normal { std: 1e-6 },
            )
        });
        let mask_token = table.push(format!("{prefix}mask_token"), &[1, d], Init::Zeros);
        let patch_embed = PatchEmbed::new(
            table,
            &format!("{prefix}patch_embed."),
            cfg.in_chans,
            cfg.patch_size,
            d,
        );
        let bcfg = BlockConfig {
            dim: d,
            num_heads: cfg.num_heads,
            ffn: cfg.ffn,
            layerscale: cfg.layerscale,
            eps: LN_EPS,
            qkv_bias: cfg.qkv_bias,
            proj_bias: cfg.proj_bias,
            ffn_bias: cfg.ffn_bias,
        };
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(table, &format!("{prefix}blocks.{i}."), &bcfg))
            .collect();
        let norm = LayerNorm::new(table, &format!("{prefix}norm."), d, LN_EPS);
        Vit {
            cfg: cfg.clone(),
            cls_token,
            pos,
            register_tokens,
            mask_token,
            patch_embed,
            blocks,
            norm,
        }
    }

    /// Tokens per image for an `h × w` input: `1 + r + (h/p)(w/p)`.
    pub fn tokens(&self, h: usize, w: usize) -> usize {
        let p = self.cfg.patch_size;
        1 + self.cfg.num_register_tokens + (h / p) * (w / p)
    }

    /// Floating-point operations of one forward pass for one `h × w` image (multiply-add = 2;
    /// the GEMMs and the two attention products, ignoring elementwise work). Backward costs
    /// about twice this.
    pub fn forward_flops(&self, h: usize, w: usize) -> f64 {
        let p = self.cfg.patch_size;
        let n = ((h / p) * (w / p)) as f64;
        let t = self.tokens(h, w) as f64;
        let d = self.cfg.embed_dim as f64;
        let patch = 2.0 * n * self.patch_embed.proj.macs_per_row() as f64;
        let blocks: f64 = self
            .blocks
            .iter()
            .map(|blk| {
                let linear = blk.attn.qkv.macs_per_row()
                    + blk.attn.proj.macs_per_row()
                    + blk.ffn.macs_per_row();
                2.0 * t * linear as f64 + 4.0 * t * t * d
            })
            .sum();
        patch + blocks
    }

    /// Training forward: images `[b, c, h, w]` (NCHW), masks `[b, n]` (true = masked) or
    /// `None`, drop path `None` = off. Returns the outputs and what backward needs.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        params: &[f32],
        images: &[f32],
        b: usize,
        h: usize,
        w: usize,
        masks: Option<&[bool]>,
        drop_path: Option<DropPath<'_>>,
    ) -> Result<(VitOutput, VitCache)> {
        let (out, cache) = self.run(params, images, b, h, w, masks, drop_path, Keep::Cache)?;
        // `run` returns a cache whenever it is asked to keep one.
        Ok((out, cache.expect("cache kept")))
    }

    /// Forward without a backward cache (teacher, evaluation): each block's activations are
    /// dropped as soon as the next block has run, so memory stays at about one block's worth.
    pub fn forward_inference(
        &self,
        params: &[f32],
        images: &[f32],
        b: usize,
        h: usize,
        w: usize,
        masks: Option<&[bool]>,
    ) -> Result<VitOutput> {
        Ok(self
            .run(params, images, b, h, w, masks, None, Keep::Nothing)?
            .0)
    }

    fn check_inputs(
        &self,
        params: &[f32],
        images: &[f32],
        b: usize,
        h: usize,
        w: usize,
        masks: Option<&[bool]>,
    ) -> Result<()> {
        let (p, c) = (self.cfg.patch_size, self.cfg.in_chans);
        let need = self.norm.bias.offset + self.norm.bias.len;
        if params.len() < need {
            return Err(Error::shape(
                "vit forward",
                format!(
                    "parameter buffer has {} values, the model needs {need}",
                    params.len()
                ),
            ));
        }
        if h == 0 || w == 0 || h % p != 0 || w % p != 0 {
            return Err(Error::shape(
                "vit forward",
                format!("image size {h}x{w} is not a positive multiple of the patch size {p}"),
            ));
        }
        if images.len() != b * c * h * w {
            return Err(Error::shape(
                "vit forward",
                format!(
                    "images hold {} values, expected [{b}, {c}, {h}, {w}] = {}",
                    images.len(),
                    b * c * h * w
                ),
            ));
        }
        let n = (h / p) * (w / p);
        if let Some(m) = masks {
            if m.len() != b * n {
                return Err(Error::shape(
                    "vit forward",
                    format!("masks hold {} values, expected [{b}, {n}]", m.len()),
                ));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        params: &[f32],
        images: &[f32],
        b: usize,
        h: usize,
        w: usize,
        masks: Option<&[bool]>,
        mut drop_path: Option<DropPath<'_>>,
        keep: Keep,
    ) -> Result<(VitOutput, Option<VitCache>)> {
        self.check_inputs(params, images, b, h, w, masks)?;
        if let Some(dp) = &drop_path {
            check_rate(dp.rate)?;
        }
        let (p, d, r) = (
            self.cfg.patch_size,
            self.cfg.embed_dim,
            self.cfg.num_register_tokens,
        );
        let (gh, gw) = (h / p, w / p);
        let n = gh * gw;
        let t = 1 + r + n;

        // Patch embedding, then mask-token substitution (before the position embedding).
        let mut pe = vec![0f32; b * n * d]; // [b, n, d]
        let mut cols = vec![0f32; b * n * self.patch_embed.proj.in_dim]; // [b·n, c·p·p]
        self.patch_embed
            .forward(&mut pe, &mut cols, images, params, b, h, w);
        if let Some(m) = masks {
            let mask_token = &params[self.mask_token.range()];
            for (row, _) in pe.chunks_mut(d).zip(m).filter(|(_, &masked)| masked) {
                row.copy_from_slice(mask_token);
            }
        }

        // Tokens: [cls + pos_0, reg..., patch_i + pos_{1+i}].
        let plan = self.pos.plan(h, w, gh, gw);
        let mut pos = vec![0f32; (1 + n) * d]; // [1 + n, d]
        self.pos.forward(&mut pos, params, &plan);
        let mut x = vec![0f32; b * t * d]; // [b, t, d]
        let cls = &params[self.cls_token.range()];
        for (img, xb) in x.chunks_mut(t * d).enumerate() {
            for j in 0..d {
                xb[j] = cls[j] + pos[j];
            }
            if let Some(reg) = self.register_tokens {
                xb[d..(1 + r) * d].copy_from_slice(&params[reg.range()]);
            }
            let patches = &mut xb[(1 + r) * d..];
            let src = &pe[img * n * d..(img + 1) * n * d];
            for ((o, s), q) in patches.iter_mut().zip(src).zip(&pos[d..]) {
                *o = s + q;
            }
        }
        drop(pe);

        let mut block_caches = Vec::with_capacity(if keep == Keep::Cache {
            self.blocks.len()
        } else {
            0
        });
        for block in &self.blocks {
            let cache = block.forward(&mut x, params, b, t, drop_path.as_mut());
            if keep == Keep::Cache {
                block_caches.push(cache);
            }
        }

        let mut xn = vec![0f32; b * t * d]; // [b, t, d]
        let norm_stats = self.norm.forward(&mut xn, &x, params, b * t);
        let mut out = VitOutput {
            cls: Vec::with_capacity(b * d),
            reg: Vec::with_capacity(b * r * d),
            patch: Vec::with_capacity(b * n * d),
            b,
            n_patches: n,
            n_registers: r,
            dim: d,
        };
        for xb in xn.chunks(t * d) {
            out.cls.extend_from_slice(&xb[..d]);
            out.reg.extend_from_slice(&xb[d..(1 + r) * d]);
            out.patch.extend_from_slice(&xb[(1 + r) * d..]);
        }
        let cache = (keep == Keep::Cache).then(|| VitCache {
            b,
            h,
            w,
            n,
            cols,
            masks: masks.map(<[bool]>::to_vec),
            plan,
            blocks: block_caches,
            x_final: x,
            norm_stats,
        });
        Ok((out, cache))
    }

    /// Backward from the output gradients (`d_cls [b, d]`, `d_patch [b, n, d]`, `d_reg [b, r, d]`
    /// or `None` = zero). Parameter gradients accumulate into `grads` (same layout as
    /// `params`); returns the image gradient `[b, c, h, w]`.
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        cache: &VitCache,
        d_cls: &[f32],
        d_patch: &[f32],
        d_reg: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let (d, r) = (self.cfg.embed_dim, self.cfg.num_register_tokens);
        let (b, n) = (cache.b, cache.n);
        let t = 1 + r + n;
        let shape_err = |what: &str, got: usize, want: usize| {
            Err(Error::shape(
                "vit backward",
                format!("{what} holds {got} values, expected {want}"),
            ))
        };
        if d_cls.len() != b * d {
            return shape_err("d_cls", d_cls.len(), b * d);
        }
        if d_patch.len() != b * n * d {
            return shape_err("d_patch", d_patch.len(), b * n * d);
        }
        if let Some(dr) = d_reg {
            if dr.len() != b * r * d {
                return shape_err("d_reg", dr.len(), b * r * d);
            }
        }
        if grads.len() < params.len() {
            return shape_err("grads", grads.len(), params.len());
        }

        // Output gradients in token layout.
        let mut dxn = vec![0f32; b * t * d]; // [b, t, d]
        for (img, db) in dxn.chunks_mut(t * d).enumerate() {
            db[..d].copy_from_slice(&d_cls[img * d..(img + 1) * d]);
            if let Some(dr) = d_reg {
                db[d..(1 + r) * d].copy_from_slice(&dr[img * r * d..(img + 1) * r * d]);
            }
            db[(1 + r) * d..].copy_from_slice(&d_patch[img * n * d..(img + 1) * n * d]);
        }
        let mut dx = vec![0f32; b * t * d]; // [b, t, d]
        self.norm.backward(
            &mut dx,
            grads,
            &dxn,
            &cache.x_final,
            &cache.norm_stats,
            params,
            b * t,
        );
        drop(dxn);
        for (block, bc) in self.blocks.iter().zip(&cache.blocks).rev() {
            block.backward(&mut dx, grads, bc, params);
        }

        // Token gradients to cls, registers, position embedding, mask token and patches.
        let mut dpos = vec![0f32; (1 + n) * d]; // [1 + n, d]
        let mut dpe = vec![0f32; b * n * d]; // [b, n, d]
        for (img, db) in dx.chunks(t * d).enumerate() {
            {
                let dcls = &mut grads[self.cls_token.range()];
                for j in 0..d {
                    dcls[j] += db[j];
                    dpos[j] += db[j];
                }
            }
            if let Some(reg) = self.register_tokens {
                grads[reg.range()]
                    .iter_mut()
                    .zip(&db[d..(1 + r) * d])
                    .for_each(|(g, v)| *g += v);
            }
            let dpatch = &db[(1 + r) * d..];
            dpos[d..].iter_mut().zip(dpatch).for_each(|(g, v)| *g += v);
            let dst = &mut dpe[img * n * d..(img + 1) * n * d];
            for (i, (o, s)) in dst.chunks_mut(d).zip(dpatch.chunks(d)).enumerate() {
                let masked = cache.masks.as_ref().is_some_and(|m| m[img * n + i]);
                if masked {
                    grads[self.mask_token.range()]
                        .iter_mut()
                        .zip(s)
                        .for_each(|(g, v)| *g += v);
                } else {
                    o.copy_from_slice(s);
                }
            }
        }
        self.pos.backward(grads, &dpos, &cache.plan);
        let (c, h, w) = (self.cfg.in_chans, cache.h, cache.w);
        let mut dimages = vec![0f32; b * c * h * w]; // [b, c, h, w]
        self.patch_embed.backward(
            Some(&mut dimages),
            grads,
            &dpe,
            &cache.cols,
            params,
            b,
            h,
            w,
        );
        Ok(dimages)
    }
}
