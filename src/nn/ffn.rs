//! The block's feed-forward layer: plain MLP (S/B/L) or fused SwiGLU (g).

use super::linear::Bias;
use super::mlp::{Mlp, MlpCache};
use super::params::ParamTable;
use super::swiglu::{SwiGlu, SwiGluCache};

/// Which FFN a block uses; `hidden` is the nominal width D·mlp_ratio (SwiGLU derives its own
/// width from it, see [`super::swiglu::swiglu_width`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ffn {
    Mlp { hidden: usize },
    SwiGlu { hidden: usize },
}

#[derive(Clone, Debug)]
pub enum FfnLayer {
    Mlp(Mlp),
    SwiGlu(SwiGlu),
}

#[derive(Clone, Debug)]
pub enum FfnCache {
    Mlp(MlpCache),
    SwiGlu(SwiGluCache),
}

impl FfnLayer {
    /// Registers `<name>fc1/fc2` or `<name>w12/w3`.
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, ffn: Ffn, bias: Bias) -> Self {
        match ffn {
            Ffn::Mlp { hidden } => FfnLayer::Mlp(Mlp::new(table, name, dim, hidden, bias)),
            Ffn::SwiGlu { hidden } => FfnLayer::SwiGlu(SwiGlu::new(table, name, dim, hidden, bias)),
        }
    }

    pub fn forward(&self, out: &mut [f32], inp: &[f32], params: &[f32], rows: usize) -> FfnCache {
        match self {
            FfnLayer::Mlp(m) => FfnCache::Mlp(m.forward(out, inp, params, rows)),
            FfnLayer::SwiGlu(s) => FfnCache::SwiGlu(s.forward(out, inp, params, rows)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dinp: &mut [f32],
        grads: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        cache: &FfnCache,
        params: &[f32],
        rows: usize,
    ) {
        match (self, cache) {
            (FfnLayer::Mlp(m), FfnCache::Mlp(c)) => {
                m.backward(dinp, grads, dout, inp, c, params, rows)
            }
            (FfnLayer::SwiGlu(s), FfnCache::SwiGlu(c)) => {
                s.backward(dinp, grads, dout, inp, c, params, rows)
            }
            // A cache always comes from the same layer's forward.
            _ => unreachable!("FFN cache from a different layer kind"),
        }
    }

    /// Multiply-adds per token (for FLOP counts).
    pub fn macs_per_row(&self) -> usize {
        match self {
            FfnLayer::Mlp(m) => m.fc1.macs_per_row() + m.fc2.macs_per_row(),
            FfnLayer::SwiGlu(s) => s.w12.macs_per_row() + s.w3.macs_per_row(),
        }
    }
}
