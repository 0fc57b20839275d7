//! The attention module: `qkv` Linear → multi-head softmax attention → `proj` Linear.

use super::linear::{Bias, Linear};
use super::params::{Init, ParamTable};
use crate::backend::cpu::{attention_backward, attention_forward};

/// Linear weights of the backbone: trunc-normal std 0.02 (spec 1.8).
pub const LINEAR_INIT: Init = Init::TruncNormal { std: 0.02 };

#[derive(Clone, Debug)]
pub struct Attention {
    pub qkv: Linear,  // D -> 3D
    pub proj: Linear, // D -> D
    pub num_heads: usize,
    pub dim: usize,
}

/// Activations saved by [`Attention::forward`].
#[derive(Clone, Debug, Default)]
pub struct AttnCache {
    pub qkv: Vec<f32>, // [B, T, 3, H, hd]
    pub lse: Vec<f32>, // [B, H, T]
    pub att: Vec<f32>, // [B, T, D] (attention output, input of proj)
}

impl Attention {
    /// Registers `<name>qkv.*` and `<name>proj.*`.
    pub fn new(
        table: &mut ParamTable,
        name: &str,
        dim: usize,
        num_heads: usize,
        qkv_bias: Bias,
        proj_bias: Bias,
    ) -> Self {
        Attention {
            qkv: Linear::new(
                table,
                &format!("{name}qkv."),
                dim,
                3 * dim,
                qkv_bias,
                LINEAR_INIT,
            ),
            proj: Linear::new(
                table,
                &format!("{name}proj."),
                dim,
                dim,
                proj_bias,
                LINEAR_INIT,
            ),
            num_heads,
            dim,
        }
    }

    /// `out = proj(attention(qkv(inp)))` for `b` sequences of `t` tokens.
    pub fn forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        params: &[f32],
        b: usize,
        t: usize,
    ) -> AttnCache {
        let (d, h) = (self.dim, self.num_heads);
        let rows = b * t;
        let mut cache = AttnCache {
            qkv: vec![0.0; rows * 3 * d],
            lse: vec![0.0; b * h * t],
            att: vec![0.0; rows * d],
        };
        self.qkv.forward(&mut cache.qkv, inp, params, rows);
        attention_forward(&mut cache.att, &mut cache.lse, &cache.qkv, b, t, h, d / h);
        self.proj.forward(out, &cache.att, params, rows);
        cache
    }

    /// Backward: writes `dinp`, accumulates parameter gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dinp: &mut [f32], // [B, T, D]
        grads: &mut [f32],
        dout: &[f32], // [B, T, D]
        inp: &[f32],  // [B, T, D]
        cache: &AttnCache,
        params: &[f32],
        b: usize,
        t: usize,
    ) {
        let (d, h) = (self.dim, self.num_heads);
        let rows = b * t;
        let mut datt = vec![0f32; rows * d]; // [B, T, D]
        self.proj
            .backward(Some(&mut datt), grads, dout, &cache.att, params, rows);
        let mut dqkv = vec![0f32; rows * 3 * d]; // [B, T, 3D]
        attention_backward(&mut dqkv, &datt, &cache.qkv, &cache.lse, b, t, h, d / h);
        self.qkv
            .backward(Some(dinp), grads, &dqkv, inp, params, rows);
    }
}
