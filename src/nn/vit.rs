//! The DINOv2 backbone (`DinoVisionTransformer`): patch embedding, mask-token substitution,
//! CLS token, position embedding (interpolated when needed), register tokens, blocks, final
//! LayerNorm, and the three outputs (spec 1.2–1.7).
//!
//! Dimensions: `b` images, `c` channels, `h × w` pixels, `p` patch size, `n = (h/p)·(w/p)`
//! patch tokens, `r` registers, `t = 1 + r + n` tokens, `d` channels.
//! Token order: `[cls, reg_0..reg_{r-1}, patch_0..patch_{n-1}]`.

use super::block::{Block, BlockConfig};
use super::ffn::Ffn;
use super::layernorm::{LayerNorm, LN_EPS};
use super::params::{Init, ParamRef, ParamTable};
use super::patch_embed::PatchEmbed;
use super::pos_embed::{PosEmbed, Resampling};
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

/// The backbone's outputs (all after the final LayerNorm), on the host.
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
}
