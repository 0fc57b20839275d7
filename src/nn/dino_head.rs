//! The DINO projection head (spec 2): a 3-layer MLP with GELU, L2 normalisation (eps 1e-12),
//! and weight-normalised prototypes `W_k = g_k · v_k / ‖v_k‖` with a trainable gain `g`.
//!
//! Dimensions: `n` rows, `in_dim`, `hidden`, `bottleneck` (`bn`), `out_dim` prototypes (`k`).

use super::attention::LINEAR_INIT;
use super::linear::{Bias, Linear};
use super::params::{Init, ParamRef, ParamTable};
use crate::backend::cpu::elementwise::{gelu_backward, gelu_forward};
use crate::backend::cpu::{matmul, Accumulate, Transpose};

/// `F.normalize`'s eps for f32 inputs.
pub const NORMALIZE_EPS: f32 = 1e-12;

#[derive(Clone, Debug)]
pub struct DinoHead {
    pub mlp0: Linear,       // in_dim -> hidden
    pub mlp2: Linear,       // hidden -> hidden
    pub mlp4: Linear,       // hidden -> bottleneck
    pub weight_g: ParamRef, // [k, 1]
    pub weight_v: ParamRef, // [k, bn]
    pub out_dim: usize,
    pub bottleneck: usize,
}

/// Activations saved by [`DinoHead::forward`].
#[derive(Clone, Debug, Default)]
pub struct HeadCache {
    pub n: usize,
    pub x: Vec<f32>,      // [n, in_dim]
    pub pre0: Vec<f32>,   // [n, hidden]
    pub act0: Vec<f32>,   // [n, hidden]
    pub pre2: Vec<f32>,   // [n, hidden]
    pub act2: Vec<f32>,   // [n, hidden]
    pub y: Vec<f32>,      // [n, bn] before normalisation
    pub z: Vec<f32>,      // [n, bn] normalised
    pub y_norm: Vec<f32>, // [n] max(‖y‖, eps)
}

/// `W = g · v / ‖v‖` per prototype row (no eps, as `weight_norm`); also returns ‖v_k‖.
fn effective_weight(g: &[f32], v: &[f32], k: usize, bn: usize) -> (Vec<f32>, Vec<f32>) {
    let mut w = vec![0f32; k * bn]; // [k, bn]
    let mut norms = vec![0f32; k]; // [k]
    for r in 0..k {
        let vr = &v[r * bn..(r + 1) * bn];
        let norm = vr.iter().map(|a| a * a).sum::<f32>().sqrt();
        norms[r] = norm;
        let s = g[r] / norm;
        w[r * bn..(r + 1) * bn]
            .iter_mut()
            .zip(vr)
            .for_each(|(o, a)| *o = a * s);
    }
    (w, norms)
}

impl DinoHead {
    /// Registers `<prefix>mlp.{0,2,4}.{weight,bias}` (trunc-normal 0.02, zero bias) and
    /// `<prefix>last_layer.weight_g [k, 1]` (ones), `weight_v [k, bn]` (U(±1/√bn)).
    pub fn new(
        in_dim: usize,
        hidden_dim: usize,
        bottleneck_dim: usize,
        out_dim: usize,
        table: &mut ParamTable,
        prefix: &str,
    ) -> Self {
        let lin = |table: &mut ParamTable, i: usize, a: usize, b: usize| {
            Linear::new(
                table,
                &format!("{prefix}mlp.{i}."),
                a,
                b,
                Bias::Yes,
                LINEAR_INIT,
            )
        };
        let mlp0 = lin(table, 0, in_dim, hidden_dim);
        let mlp2 = lin(table, 2, hidden_dim, hidden_dim);
        let mlp4 = lin(table, 4, hidden_dim, bottleneck_dim);
        let weight_g = table.push(
            format!("{prefix}last_layer.weight_g"),
            &[out_dim, 1],
            Init::Const(1.0),
        );
        let bound = 1.0 / (bottleneck_dim as f32).sqrt();
        let weight_v = table.push(
            format!("{prefix}last_layer.weight_v"),
            &[out_dim, bottleneck_dim],
            Init::Uniform { bound },
        );
        DinoHead {
            mlp0,
            mlp2,
            mlp4,
            weight_g,
            weight_v,
            out_dim,
            bottleneck: bottleneck_dim,
        }
    }

    /// Logits `[n, k]` for `x [n, in_dim]`. Drop the cache for a forward-only (teacher) pass.
    ///
    /// Panics if `x` is not `[n, in_dim]` (a caller bug: sizes come from the model).
    pub fn forward(&self, params: &[f32], x: &[f32], n: usize) -> (Vec<f32>, HeadCache) {
        let (hidden, bn, k) = (self.mlp0.out_dim, self.bottleneck, self.out_dim);
        assert_eq!(
            x.len(),
            n * self.mlp0.in_dim,
            "DinoHead::forward: x must be [n, in_dim]"
        );
        let mut c = HeadCache {
            n,
            x: x.to_vec(),
            pre0: vec![0.0; n * hidden],
            act0: vec![0.0; n * hidden],
            pre2: vec![0.0; n * hidden],
            act2: vec![0.0; n * hidden],
            y: vec![0.0; n * bn],
            z: vec![0.0; n * bn],
            y_norm: vec![0.0; n],
        };
        self.mlp0.forward(&mut c.pre0, x, params, n);
        gelu_forward(&mut c.act0, &c.pre0);
        self.mlp2.forward(&mut c.pre2, &c.act0, params, n);
        gelu_forward(&mut c.act2, &c.pre2);
        self.mlp4.forward(&mut c.y, &c.act2, params, n);
        for r in 0..n {
            let y = &c.y[r * bn..(r + 1) * bn];
            let norm = y
                .iter()
                .map(|a| a * a)
                .sum::<f32>()
                .sqrt()
                .max(NORMALIZE_EPS);
            c.y_norm[r] = norm;
            c.z[r * bn..(r + 1) * bn]
                .iter_mut()
                .zip(y)
                .for_each(|(z, a)| *z = a / norm);
        }
        let (w, _) = effective_weight(
            &params[self.weight_g.range()],
            &params[self.weight_v.range()],
            k,
            bn,
        );
        let mut out = vec![0f32; n * k]; // [n, k]
        matmul(
            &mut out,
            &c.z,
            Transpose::No,
            &w,
            Transpose::Yes,
            n,
            bn,
            k,
            Accumulate::Overwrite,
        );
        (out, c)
    }

    /// Backward from `d_out [n, k]`: parameter gradients accumulate; returns `d x [n, in_dim]`.
    ///
    /// Panics if `d_out` is not `[n, k]` for the cache's `n`.
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        cache: &HeadCache,
        d_out: &[f32],
    ) -> Vec<f32> {
        let (hidden, bn, k, n) = (self.mlp0.out_dim, self.bottleneck, self.out_dim, cache.n);
        assert_eq!(
            d_out.len(),
            n * k,
            "DinoHead::backward: d_out must be [n, k]"
        );
        let g = &params[self.weight_g.range()];
        let v = &params[self.weight_v.range()];
        let (w, norms) = effective_weight(g, v, k, bn);

        // out = z Wᵀ: dz = d_out W ; dW = d_outᵀ z.
        let mut dz = vec![0f32; n * bn]; // [n, bn]
        matmul(
            &mut dz,
            d_out,
            Transpose::No,
            &w,
            Transpose::No,
            n,
            k,
            bn,
            Accumulate::Overwrite,
        );
        let mut dw = vec![0f32; k * bn]; // [k, bn]
        matmul(
            &mut dw,
            d_out,
            Transpose::Yes,
            &cache.z,
            Transpose::No,
            k,
            n,
            bn,
            Accumulate::Overwrite,
        );
        // W_k = g_k v̂_k: dg_k = dW_k·v̂_k ; dv_k = (g_k/‖v_k‖)(dW_k − (dW_k·v̂_k) v̂_k).
        for r in 0..k {
            let vr = &v[r * bn..(r + 1) * bn];
            let dwr = &dw[r * bn..(r + 1) * bn];
            let inv = 1.0 / norms[r];
            let dot = dwr.iter().zip(vr).map(|(a, b)| a * b).sum::<f32>() * inv; // dW_k · v̂_k
            grads[self.weight_g.offset + r] += dot;
            let s = g[r] * inv;
            let dv = &mut grads[self.weight_v.offset + r * bn..self.weight_v.offset + (r + 1) * bn];
            for j in 0..bn {
                dv[j] += s * (dwr[j] - dot * vr[j] * inv);
            }
        }
        // z = y / max(‖y‖, eps): dy = (dz − z (z·dz)) / ‖y‖ above eps, dz / eps below.
        let mut dy = vec![0f32; n * bn]; // [n, bn]
        for r in 0..n {
            let z = &cache.z[r * bn..(r + 1) * bn];
            let dzr = &dz[r * bn..(r + 1) * bn];
            let norm = cache.y_norm[r];
            let dyr = &mut dy[r * bn..(r + 1) * bn];
            let raw = cache.y[r * bn..(r + 1) * bn]
                .iter()
                .map(|a| a * a)
                .sum::<f32>()
                .sqrt();
            if raw > NORMALIZE_EPS {
                let dot: f32 = z.iter().zip(dzr).map(|(a, b)| a * b).sum();
                for j in 0..bn {
                    dyr[j] = (dzr[j] - z[j] * dot) / norm;
                }
            } else {
                for j in 0..bn {
                    dyr[j] = dzr[j] / norm;
                }
            }
        }
        let mut dact2 = vec![0f32; n * hidden];
        self.mlp4
            .backward(Some(&mut dact2), grads, &dy, &cache.act2, params, n);
        let mut dpre2 = vec![0f32; n * hidden];
        gelu_backward(&mut dpre2, &dact2, &cache.pre2);
        let mut dact0 = vec![0f32; n * hidden];
        self.mlp2
            .backward(Some(&mut dact0), grads, &dpre2, &cache.act0, params, n);
        let mut dpre0 = vec![0f32; n * hidden];
        gelu_backward(&mut dpre0, &dact0, &cache.pre0);
        let mut dx = vec![0f32; n * self.mlp0.in_dim];
        self.mlp0
            .backward(Some(&mut dx), grads, &dpre0, &cache.x, params, n);
        dx
    }
}
