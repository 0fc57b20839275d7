//! Model sizes: the official ViT-S/B/L/g (spec 1.1) and small CPU presets.

use super::ffn::Ffn;
use super::vit::VitConfig;
use crate::error::{Error, Result};
use std::str::FromStr;

/// A named backbone size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// D 32, depth 2, 2 heads: unit tests.
    Micro,
    /// D 192, depth 6, 3 heads: the CPU demo model (32 px images, patch 4).
    Tiny,
    /// ViT-S: D 384, depth 12, 6 heads, MLP 1536.
    Small,
    /// ViT-B: D 768, depth 12, 12 heads, MLP 3072.
    Base,
    /// ViT-L: D 1024, depth 24, 16 heads, MLP 4096 (as released).
    Large,
    /// ViT-g: D 1536, depth 40, 24 heads, SwiGLU (width 4096).
    Giant,
}

impl Preset {
    /// (embed_dim, depth, num_heads, ffn)
    fn sizes(self) -> (usize, usize, usize, Ffn) {
        match self {
            Preset::Micro => (32, 2, 2, Ffn::Mlp { hidden: 128 }),
            Preset::Tiny => (192, 6, 3, Ffn::Mlp { hidden: 768 }),
            Preset::Small => (384, 12, 6, Ffn::Mlp { hidden: 1536 }),
            Preset::Base => (768, 12, 12, Ffn::Mlp { hidden: 3072 }),
            Preset::Large => (1024, 24, 16, Ffn::Mlp { hidden: 4096 }),
            Preset::Giant => (1536, 40, 24, Ffn::SwiGlu { hidden: 6144 }),
        }
    }

    /// The backbone config for `img_size` (construction size) and `patch_size`, with
    /// `num_register_tokens` registers. Training defaults: LayerScale 1e-5, all biases on,
    /// interpolation offset 0.1 without antialias (the released register models use offset 0
    /// with antialias: set those two fields to load them).
    pub fn config(
        self,
        img_size: usize,
        patch_size: usize,
        num_register_tokens: usize,
    ) -> VitConfig {
        let (embed_dim, depth, num_heads, ffn) = self.sizes();
        VitConfig {
            img_size,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            ffn,
            num_register_tokens,
            layerscale: Some(1e-5),
            interpolate_offset: 0.1,
            interpolate_antialias: false,
            qkv_bias: true,
            proj_bias: true,
            ffn_bias: true,
        }
    }

    /// The config of a released hub backbone (`dinov2_vit{s,b,l,g}14[_reg4]`): 518 px, patch 14,
    /// LayerScale, and the interpolation mode its checkpoint was trained with.
    pub fn released(self, registers: bool) -> VitConfig {
        let mut cfg = self.config(518, 14, if registers { 4 } else { 0 });
        cfg.layerscale = Some(1.0);
        if registers {
            cfg.interpolate_offset = 0.0;
            cfg.interpolate_antialias = true;
        }
        cfg
    }
}

impl FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "micro" => Ok(Preset::Micro),
            "tiny" => Ok(Preset::Tiny),
            "small" | "vits" | "vit_small" => Ok(Preset::Small),
            "base" | "vitb" | "vit_base" => Ok(Preset::Base),
            "large" | "vitl" | "vit_large" => Ok(Preset::Large),
            "giant" | "vitg" | "vit_giant2" => Ok(Preset::Giant),
            _ => Err(Error::Config(format!(
                "unknown model '{s}' (expected micro, tiny, small, base, large or giant)"
            ))),
        }
    }
}
