//! The ViT MLP: `fc1` → exact GELU → `fc2`.

use super::attention::LINEAR_INIT;
use super::linear::{Bias, Linear};
use super::params::ParamTable;
use crate::backend::cpu::elementwise::{gelu_backward, gelu_forward};

#[derive(Clone, Debug)]
pub struct Mlp {
    pub fc1: Linear, // D -> hidden
    pub fc2: Linear, // hidden -> D
}

/// Activations saved by [`Mlp::forward`].
#[derive(Clone, Debug, Default)]
pub struct MlpCache {
    pub pre: Vec<f32>, // [rows, hidden] fc1 output
    pub act: Vec<f32>, // [rows, hidden] gelu(pre)
}

impl Mlp {
    pub fn new(table: &mut ParamTable, name: &str, dim: usize, hidden: usize, bias: Bias) -> Self {
        Mlp {
            fc1: Linear::new(
                table,
                &format!("{name}fc1."),
                dim,
                hidden,
                bias,
                LINEAR_INIT,
            ),
            fc2: Linear::new(
                table,
                &format!("{name}fc2."),
                hidden,
                dim,
                bias,
                LINEAR_INIT,
            ),
        }
    }

    pub fn forward(&self, out: &mut [f32], inp: &[f32], params: &[f32], rows: usize) -> MlpCache {
        let hidden = self.fc1.out_dim;
        let mut cache = MlpCache {
            pre: vec![0.0; rows * hidden],
            act: vec![0.0; rows * hidden],
        };
        self.fc1.forward(&mut cache.pre, inp, params, rows);
        gelu_forward(&mut cache.act, &cache.pre);
        self.fc2.forward(out, &cache.act, params, rows);
        cache
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dinp: &mut [f32],
        grads: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        cache: &MlpCache,
        params: &[f32],
        rows: usize,
    ) {
        let hidden = self.fc1.out_dim;
        let mut dact = vec![0f32; rows * hidden]; // [rows, hidden]
        self.fc2
            .backward(Some(&mut dact), grads, dout, &cache.act, params, rows);
        let mut dpre = vec![0f32; rows * hidden];
        gelu_backward(&mut dpre, &dact, &cache.pre);
        self.fc1
            .backward(Some(dinp), grads, &dpre, inp, params, rows);
    }
}
