//! SwiGLU FFN (`SwiGLUFFNFused`): fused `w12` (first half gate x1 → SiLU, second half x2),
//! `silu(x1) * x2`, then `w3`.

use super::attention::LINEAR_INIT;
use super::linear::{Bias, Linear};
use super::params::ParamTable;
use crate::backend::cpu::elementwise::{swiglu_backward, swiglu_forward};

/// The fused SwiGLU width for a nominal MLP width: `(int(hidden·2/3) + 7) / 8 · 8`.
pub fn swiglu_width(hidden: usize) -> usize {
    (hidden * 2 / 3).div_ceil(8) * 8
}

#[derive(Clone, Debug)]
pub struct SwiGlu {
    pub w12: Linear, // D -> 2·width
    pub w3: Linear,  // width -> D
    pub width: usize,
}

/// Activations saved by [`SwiGlu::forward`].
#[derive(Clone, Debug, Default)]
pub struct SwiGluCache {
    pub x12: Vec<f32>,   // [rows, 2·width]
    pub gated: Vec<f32>, // [rows, width]
}

impl SwiGlu {
    /// `hidden` is the nominal MLP width (D·mlp_ratio); the layer uses [`swiglu_width`].
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, hidden: usize, bias: Bias) -> Self {
        let width = swiglu_width(hidden);
        SwiGlu {
            w12: Linear::new(
                table,
                &format!("{name}w12."),
                dim,
                2 * width,
                bias,
                LINEAR_INIT,
            ),
            w3: Linear::new(table, &format!("{name}w3."), width, dim, bias, LINEAR_INIT),
            width,
        }
    }

    pub fn forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        params: &[f32],
        rows: usize,
    ) -> SwiGluCache {
        let w = self.width;
        let mut cache = SwiGluCache {
            x12: vec![0.0; rows * 2 * w],
            gated: vec![0.0; rows * w],
        };
        self.w12.forward(&mut cache.x12, inp, params, rows);
        swiglu_forward(&mut cache.gated, &cache.x12, rows, w);
        self.w3.forward(out, &cache.gated, params, rows);
        cache
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dinp: &mut [f32],
        grads: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        cache: &SwiGluCache,
        params: &[f32],
        rows: usize,
    ) {
        let w = self.width;
        let mut dgated = vec![0f32; rows * w];
        self.w3
            .backward(Some(&mut dgated), grads, dout, &cache.gated, params, rows);
        let mut dx12 = vec![0f32; rows * 2 * w];
        swiglu_backward(&mut dx12, &dgated, &cache.x12, rows, w);
        self.w12
            .backward(Some(dinp), grads, &dx12, inp, params, rows);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn swiglu_width_matches_the_official_sizes() {
        // hidden' = 1024 (S), 2048 (B), 2736 (L), 4096 (g) for hidden = 4D.
        let w: Vec<usize> = [384, 768, 1024, 1536]
            .iter()
            .map(|d| super::swiglu_width(4 * d))
            .collect();
        assert_eq!(w, vec![1024, 2048, 2736, 4096]);
    }
}
