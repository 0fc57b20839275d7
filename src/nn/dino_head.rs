//! The DINO projection head (spec 2): three Linear layers with GELU between them, row L2
//! normalisation (eps 1e-12), and the weight-normalised prototypes `W_k = g_k · v_k / ‖v_k‖`
//! (trainable `weight_g`, no bias), over the backend seam.
//!
//! Operands (GEMM inputs) in the backend's operand precision; biases, GELU pre-activations,
//! the normalisation and every gradient in f32. Dimensions: `n` rows, `in_dim`, `hidden`,
//! `bn` (bottleneck), `k` prototypes.
//!
//! Gradient contract (llm.c): parameter gradients accumulate into the flat `grads [P]`; the
//! input gradient is written or added as the caller asks (the student's CLS gradient also
//! receives KoLeo's).

use super::attention::LINEAR_INIT;
use super::linear::{Bias, Linear};
use super::params::{Init, ParamRef, ParamTable};
use crate::backend::{
    workspace, Accumulate, Backend, Gemm, Grow, InputGrad, LinearOut, NormShape, Storage,
    Transpose, WeightStore,
};
use crate::error::{Error, Result};

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

    /// (in_dim, hidden, bottleneck, prototypes).
    fn dims(&self) -> (usize, usize, usize, usize) {
        (
            self.mlp0.in_dim,
            self.mlp0.out_dim,
            self.bottleneck,
            self.out_dim,
        )
    }
}

/// One model's effective prototypes `W [k, bn]` for its current weights, recomputed by
/// [`Prototypes::prepare`] after every weight update.
pub struct Prototypes<B: Backend> {
    w: B::BufF32,        // [k, bn]
    w_half: B::BufHalf,  // [k, bn]
    inv_norm: B::BufF32, // [k] 1 / ‖v_k‖
}

impl<B: Backend> Prototypes<B> {
    pub fn new(be: &mut B, head: &DinoHead) -> Result<Self> {
        let (k, bn) = (head.out_dim, head.bottleneck);
        Ok(Prototypes {
            w: be.alloc_f32(k * bn)?,
            w_half: be.alloc_half(k * bn)?,
            inv_norm: be.alloc_f32(k)?,
        })
    }

    /// Recomputes `W = g · v / ‖v‖` from the f32 parameters.
    pub fn prepare(&mut self, be: &mut B, head: &DinoHead, w: &B::Weights) -> Result<()> {
        let shape = NormShape {
            rows: head.out_dim,
            channels: head.bottleneck,
        };
        let g = w.f32().window(head.weight_g.range())?;
        let v = w.f32().window(head.weight_v.range())?;
        be.weight_norm_forward(&mut self.w, &mut self.inv_norm, &g, &v, shape)?;
        be.cast_to_half(&mut self.w_half, &self.w)
    }
}

workspace! {
    /// What one head call saves for its backward (also its output, `logits`). Buffers keep their
    /// capacity across steps; `n` may change from call to call.
    pub struct HeadCache<B: Backend> {
        n: usize,
        x_half: Grow<B::BufHalf>,    // [n, in_dim]
        pre0: Grow<B::BufF32>,       // [n, hidden] after the bias (GELU input)
        act0: Grow<B::BufHalf>,      // [n, hidden]
        pre2: Grow<B::BufF32>,       // [n, hidden]
        act2: Grow<B::BufHalf>,      // [n, hidden]
        y: Grow<B::BufF32>,          // [n, bn] before normalisation
        z: Grow<B::BufF32>,          // [n, bn] normalised
        z_half: Grow<B::BufHalf>,    // [n, bn]
        y_norm: Grow<B::BufF32>,     // [n] max(‖y‖, eps)
        pub logits: Grow<B::BufF32>, // [n, k]
    }
}

impl<B: Backend> HeadCache<B> {
    /// Sizes every buffer for `rows` rows (allocating only beyond the capacity).
    fn size(&mut self, be: &mut B, head: &DinoHead, rows: usize) -> Result<()> {
        let (in_dim, hidden, bn, k) = head.dims();
        self.x_half.resize(rows * in_dim, |l| be.alloc_half(l))?;
        self.pre0.resize(rows * hidden, |l| be.alloc_f32(l))?;
        self.act0.resize(rows * hidden, |l| be.alloc_half(l))?;
        self.pre2.resize(rows * hidden, |l| be.alloc_f32(l))?;
        self.act2.resize(rows * hidden, |l| be.alloc_half(l))?;
        self.y.resize(rows * bn, |l| be.alloc_f32(l))?;
        self.z.resize(rows * bn, |l| be.alloc_f32(l))?;
        self.z_half.resize(rows * bn, |l| be.alloc_half(l))?;
        self.y_norm.resize(rows, |l| be.alloc_f32(l))?;
        self.logits.resize(rows * k, |l| be.alloc_f32(l))
    }

    /// Capacity for `rows` rows of `head` (a row count that varies per step, such as the masked
    /// patches, then never reallocates below its bound); the lengths stay those of the last
    /// forward.
    pub fn reserve(&mut self, be: &mut B, head: &DinoHead, rows: usize) -> Result<()> {
        self.size(be, head, rows)?;
        self.size(be, head, self.n)
    }

    /// Rows of the last forward.
    pub fn rows(&self) -> usize {
        self.n
    }
}

workspace! {
    /// Backward scratch shared by every head call of a step (backward calls run one at a time).
    pub struct HeadScratch<B: Backend> {
        d_out_half: Grow<B::BufHalf>, // [n, k]
        dz: Grow<B::BufF32>,          // [n, bn]
        dy: Grow<B::BufF32>,          // [n, bn]
        dy_half: Grow<B::BufHalf>,    // [n, bn]
        dact: Grow<B::BufF32>,        // [n, hidden]
        dpre_half: Grow<B::BufHalf>,  // [n, hidden]
        dw: Grow<B::BufF32>,          // [k, bn] dL/dW of the effective prototypes
    }
}

impl<B: Backend> HeadScratch<B> {
    /// Sizes every buffer for backward calls of `n` rows of `head` (a backward sizes it for its
    /// own rows first, so a larger size is a reservation).
    pub fn reserve(&mut self, be: &mut B, head: &DinoHead, n: usize) -> Result<()> {
        let (_, hidden, bn, k) = head.dims();
        self.d_out_half.resize(n * k, |l| be.alloc_half(l))?;
        self.dz.resize(n * bn, |l| be.alloc_f32(l))?;
        self.dy.resize(n * bn, |l| be.alloc_f32(l))?;
        self.dy_half.resize(n * bn, |l| be.alloc_half(l))?;
        self.dact.resize(n * hidden, |l| be.alloc_f32(l))?;
        self.dpre_half.resize(n * hidden, |l| be.alloc_half(l))?;
        self.dw.resize(k * bn, |l| be.alloc_f32(l))
    }
}

impl DinoHead {
    /// Forward of `x [n, in_dim]` (f32); the logits `[n, k]` are left in `cache.logits`.
    /// `protos` must have been prepared from the same weights `w`.
    pub fn forward<B: Backend>(
        &self,
        be: &mut B,
        cache: &mut HeadCache<B>,
        protos: &Prototypes<B>,
        w: &B::Weights,
        x: &B::F32,
        n: usize,
    ) -> Result<()> {
        let (in_dim, _, bn, k) = self.dims();
        if x.len() != n * in_dim {
            return Err(Error::shape(
                "dino head forward",
                format!("x holds {} values, expected [{n}, {in_dim}]", x.len()),
            ));
        }
        cache.n = n;
        cache.size(be, self, n)?;
        if n == 0 {
            return Ok(());
        }
        let mut x_half = cache.x_half.get_mut()?;
        be.cast_to_half(&mut x_half, x)?;
        // Hidden layers: pre = inp · Wᵀ + b (f32, saved), act = gelu(pre) (operand).
        {
            let (mut pre, mut act) = (cache.pre0.get_mut()?, cache.act0.get_mut()?);
            let out = LinearOut::Gelu {
                pre: &mut *pre,
                act: &mut *act,
            };
            self.mlp0.forward(be, out, &x_half, w, n)?;
        }
        {
            let act0 = cache.act0.get()?;
            let (mut pre, mut act) = (cache.pre2.get_mut()?, cache.act2.get_mut()?);
            let out = LinearOut::Gelu {
                pre: &mut *pre,
                act: &mut *act,
            };
            self.mlp2.forward(be, out, &act0, w, n)?;
        }
        // Bottleneck, then z = y / max(‖y‖, eps).
        let act2 = cache.act2.get()?;
        let mut y = cache.y.get_mut()?;
        self.mlp4
            .forward(be, LinearOut::F32(&mut *y), &act2, w, n)?;
        let (mut z, mut z_half) = (cache.z.get_mut()?, cache.z_half.get_mut()?);
        let mut y_norm = cache.y_norm.get_mut()?;
        let shape = NormShape {
            rows: n,
            channels: bn,
        };
        be.l2_normalize_forward(&mut z, &mut z_half, &mut y_norm, &y, NORMALIZE_EPS, shape)?;
        // logits = z · Wᵀ.
        let mut logits = cache.logits.get_mut()?;
        let g = Gemm::nn(n, bn, k).t(Transpose::No, Transpose::Yes);
        be.matmul(&mut logits, &z_half, &protos.w_half, g)
    }

    /// Backward from `d_logits [n, k]` of the forward saved in `cache`: parameter gradients
    /// accumulate into `grads [P]`; `dx [n, in_dim]` is written or added per `dx_write`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &mut B,
        scratch: &mut HeadScratch<B>,
        grads: &mut B::F32,
        (dx, dx_write): (&mut B::F32, Accumulate),
        (cache, protos): (&HeadCache<B>, &Prototypes<B>),
        w: &B::Weights,
        d_logits: &B::F32,
    ) -> Result<()> {
        let (in_dim, _, bn, k) = self.dims();
        let n = cache.n;
        if d_logits.len() != n * k || dx.len() != n * in_dim {
            return Err(Error::shape(
                "dino head backward",
                format!(
                    "d_logits holds {}, dx {} values; the forward had {n} rows ([{n}, {k}], [{n}, {in_dim}])",
                    d_logits.len(),
                    dx.len()
                ),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        scratch.reserve(be, self, n)?;
        // logits = z · Wᵀ: dz = d_logits · W, dW = d_logitsᵀ · z.
        let mut d_out_half = scratch.d_out_half.get_mut()?;
        be.cast_to_half(&mut d_out_half, d_logits)?;
        let mut dz = scratch.dz.get_mut()?;
        be.matmul(&mut dz, &d_out_half, &protos.w_half, Gemm::nn(n, k, bn))?;
        let z_half = cache.z_half.get()?;
        let mut dw = scratch.dw.get_mut()?;
        let g = Gemm::nn(k, n, bn).t(Transpose::Yes, Transpose::No);
        be.matmul(&mut dw, &d_out_half, &z_half, g)?;
        {
            let [mut dg, mut dv] =
                grads.windows_mut([self.weight_g.range(), self.weight_v.range()])?;
            let gw = w.f32().window(self.weight_g.range())?;
            let v = w.f32().window(self.weight_v.range())?;
            let shape = NormShape {
                rows: k,
                channels: bn,
            };
            be.weight_norm_backward(&mut dg, &mut dv, &dw, &gw, &v, &protos.inv_norm, shape)?;
        }
        // Through the normalisation.
        let (mut dy, mut dy_half) = (scratch.dy.get_mut()?, scratch.dy_half.get_mut()?);
        let (z, y_norm) = (cache.z.get()?, cache.y_norm.get()?);
        let shape = NormShape {
            rows: n,
            channels: bn,
        };
        be.l2_normalize_backward(
            &mut dy,
            &mut dy_half,
            &dz,
            &z,
            &y_norm,
            NORMALIZE_EPS,
            shape,
        )?;
        // Bottleneck layer, then the two hidden layers back to the input.
        let act2 = cache.act2.get()?;
        self.mlp4
            .param_grads(be, grads, &dy_half, Some(&dy), &act2, n)?;
        let (mut dact, mut dpre) = (scratch.dact.get_mut()?, scratch.dpre_half.get_mut()?);
        let overwrite = Accumulate::Overwrite;
        self.mlp4
            .input_grad(be, InputGrad::F32(&mut *dact, overwrite), &dy_half, w, n)?;
        let pre2 = cache.pre2.get()?;
        be.gelu_backward(&mut dpre, &dact, &pre2)?;
        let act0 = cache.act0.get()?;
        self.mlp2.param_grads(be, grads, &dpre, None, &act0, n)?;
        self.mlp2
            .input_grad(be, InputGrad::F32(&mut *dact, overwrite), &dpre, w, n)?;
        let pre0 = cache.pre0.get()?;
        be.gelu_backward(&mut dpre, &dact, &pre0)?;
        let x_half = cache.x_half.get()?;
        self.mlp0.param_grads(be, grads, &dpre, None, &x_half, n)?;
        self.mlp0
            .input_grad(be, InputGrad::F32(dx, dx_write), &dpre, w, n)
    }
}
