//! The DINO projection head on the GPU, mirroring [`crate::nn::DinoHead`]: three Linear layers
//! with GELU between them, row L2 normalisation (eps 1e-12), and the weight-normalised
//! prototypes `W_k = g_k · v_k / ‖v_k‖` (trainable `weight_g`, no bias).
//!
//! bf16 GEMM operands with f32 accumulation and f32 outputs; biases, GELU pre-activations, the
//! normalisation and every gradient in f32. Dimensions: `n` rows, `in_dim`, `hidden`,
//! `bn` (bottleneck), `k` prototypes.
//!
//! Gradient contract (llm.c): parameter gradients accumulate into the flat `grads [P]`; the
//! input gradient is written or added as the caller asks (the student's CLS gradient also
//! receives KoLeo's).

use super::buffers::Grow;
use super::linear::{
    linear_forward, linear_gelu_forward, linear_input_grad, linear_param_grads, DoutF32,
};
use super::DeviceWeights;
use crate::backend::cpu::{Accumulate, Transpose};
use crate::backend::cuda::{bf16, CudaBackend};
use crate::error::{Error, Result};
use crate::nn::dino_head::NORMALIZE_EPS;
use crate::nn::DinoHead;
use cudarc::driver::CudaSlice;

/// The effective prototypes `W [k, bn]` of one model's current weights.
#[derive(Debug)]
struct LastLayer {
    w: CudaSlice<f32>,        // [k, bn]
    w_bf16: CudaSlice<bf16>,  // [k, bn]
    inv_norm: CudaSlice<f32>, // [k] 1 / ‖v_k‖
}

/// One model's head on the device: the parameter views of [`DinoHead`] and the effective
/// prototypes, recomputed by [`GpuHead::prepare`] after every weight update.
#[derive(Debug)]
pub struct GpuHead {
    pub head: DinoHead,
    last: LastLayer,
}

/// What one head call saves for its backward (also its output, `logits`). Buffers keep their
/// capacity across steps; `n` may change from call to call.
#[derive(Debug, Default)]
pub struct HeadCache {
    n: usize,
    x_bf16: Grow<bf16>,    // [n, in_dim]
    pre0: Grow<f32>,       // [n, hidden] after the bias (GELU input)
    act0: Grow<bf16>,      // [n, hidden]
    pre2: Grow<f32>,       // [n, hidden]
    act2: Grow<bf16>,      // [n, hidden]
    y: Grow<f32>,          // [n, bn] before normalisation
    z: Grow<f32>,          // [n, bn] normalised
    z_bf16: Grow<bf16>,    // [n, bn]
    y_norm: Grow<f32>,     // [n] ‖y‖
    pub logits: Grow<f32>, // [n, k]
}

impl HeadCache {
    /// Capacity for `rows` rows of `head` (a row count that varies per step, such as the masked
    /// patches, then never reallocates below its bound).
    pub fn reserve(&mut self, gpu: &CudaBackend, head: &DinoHead, rows: usize) -> Result<()> {
        let (in_dim, hidden, bn, k) = dims(head);
        self.x_bf16.reserve(gpu, rows * in_dim)?;
        for buf in [&mut self.pre0, &mut self.pre2] {
            buf.reserve(gpu, rows * hidden)?;
        }
        for buf in [&mut self.act0, &mut self.act2] {
            buf.reserve(gpu, rows * hidden)?;
        }
        for buf in [&mut self.y, &mut self.z] {
            buf.reserve(gpu, rows * bn)?;
        }
        self.z_bf16.reserve(gpu, rows * bn)?;
        self.y_norm.reserve(gpu, rows)?;
        self.logits.reserve(gpu, rows * k)
    }

    /// Rows of the last forward.
    pub fn rows(&self) -> usize {
        self.n
    }
}

/// Backward scratch shared by every head call of a step (backward calls run one at a time).
#[derive(Debug, Default)]
pub struct HeadScratch {
    d_out_bf16: Grow<bf16>, // [n, k]
    dz: Grow<f32>,          // [n, bn]
    dy: Grow<f32>,          // [n, bn]
    dy_bf16: Grow<bf16>,    // [n, bn]
    dact: Grow<f32>,        // [n, hidden] dL/d(activation), then in place dL/d(pre-activation)
    dpre_bf16: Grow<bf16>,  // [n, hidden]
    dw: Grow<f32>,          // [k, bn] dL/dW of the effective prototypes
}

impl HeadScratch {
    /// Capacity for backward calls of up to `rows` rows of `head`.
    pub fn reserve(&mut self, gpu: &CudaBackend, head: &DinoHead, rows: usize) -> Result<()> {
        let (_, hidden, bn, k) = dims(head);
        self.d_out_bf16.reserve(gpu, rows * k)?;
        for buf in [&mut self.dz, &mut self.dy] {
            buf.reserve(gpu, rows * bn)?;
        }
        self.dy_bf16.reserve(gpu, rows * bn)?;
        self.dact.reserve(gpu, rows * hidden)?;
        self.dpre_bf16.reserve(gpu, rows * hidden)?;
        self.dw.reserve(gpu, k * bn)
    }
}

/// (in_dim, hidden, bottleneck, prototypes) of a head.
fn dims(h: &DinoHead) -> (usize, usize, usize, usize) {
    (h.mlp0.in_dim, h.mlp0.out_dim, h.bottleneck, h.out_dim)
}

impl GpuHead {
    /// Buffers for the effective prototypes of `head` (one allocation each, once).
    pub fn new(gpu: &CudaBackend, head: &DinoHead) -> Result<Self> {
        let (k, bn) = (head.out_dim, head.bottleneck);
        Ok(GpuHead {
            head: head.clone(),
            last: LastLayer {
                w: super::buffers::alloc_counted(gpu, k * bn)?,
                w_bf16: super::buffers::alloc_counted(gpu, k * bn)?,
                inv_norm: super::buffers::alloc_counted(gpu, k)?,
            },
        })
    }

    /// Recomputes `W = g · v / ‖v‖` from the f32 parameters (after each weight update).
    pub fn prepare(&mut self, gpu: &CudaBackend, params: &CudaSlice<f32>) -> Result<()> {
        let (k, bn) = (self.head.out_dim, self.head.bottleneck);
        let g = gpu.sub(params, self.head.weight_g.range())?;
        let v = gpu.sub(params, self.head.weight_v.range())?;
        gpu.weight_norm_forward(&mut self.last.w, &mut self.last.inv_norm, &g, &v, k, bn)?;
        gpu.cast_f32_to_bf16(&mut self.last.w_bf16, &self.last.w)
    }

    /// Forward of `x [n, in_dim]` (f32); the logits `[n, k]` are left in `cache.logits`.
    /// `w` holds the model's parameters (biases read in f32, GEMM weights in bf16);
    /// [`prepare`](Self::prepare) must have run on the same weights.
    pub fn forward(
        &self,
        gpu: &CudaBackend,
        cache: &mut HeadCache,
        w: &DeviceWeights,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "gpu dino head forward";
        let h = &self.head;
        let (in_dim, hidden, bn, k) = (h.mlp0.in_dim, h.mlp0.out_dim, h.bottleneck, h.out_dim);
        if x.len() != n * in_dim {
            return Err(Error::shape(
                OP,
                format!("x holds {} values, expected [{n}, {in_dim}]", x.len()),
            ));
        }
        cache.n = n;
        cache.x_bf16.resize(gpu, n * in_dim)?;
        for buf in [&mut cache.pre0, &mut cache.pre2] {
            buf.resize(gpu, n * hidden)?;
        }
        for buf in [&mut cache.act0, &mut cache.act2] {
            buf.resize(gpu, n * hidden)?;
        }
        for buf in [&mut cache.y, &mut cache.z] {
            buf.resize(gpu, n * bn)?;
        }
        cache.z_bf16.resize(gpu, n * bn)?;
        cache.y_norm.resize(gpu, n)?;
        cache.logits.resize(gpu, n * k)?;
        if n == 0 {
            return Ok(());
        }

        let mut x_bf16 = cache.x_bf16.get_mut(gpu)?;
        gpu.cast_f32_to_bf16(&mut x_bf16, x)?;
        // Hidden layers: pre = inp · Wᵀ + b (f32, saved), act = bf16(gelu(pre)).
        {
            let mut pre = cache.pre0.get_mut(gpu)?;
            let mut act = cache.act0.get_mut(gpu)?;
            linear_gelu_forward(gpu, &mut pre, &mut act, &x_bf16, &h.mlp0, w, n)?;
        }
        {
            let act0 = cache.act0.get(gpu)?;
            let mut pre = cache.pre2.get_mut(gpu)?;
            let mut act = cache.act2.get_mut(gpu)?;
            linear_gelu_forward(gpu, &mut pre, &mut act, &act0, &h.mlp2, w, n)?;
        }
        // Bottleneck, then z = y / max(‖y‖, eps).
        let act2 = cache.act2.get(gpu)?;
        let mut y = cache.y.get_mut(gpu)?;
        linear_forward(gpu, &mut y, &act2, &h.mlp4, w, n)?;
        let mut z = cache.z.get_mut(gpu)?;
        let mut z_bf16 = cache.z_bf16.get_mut(gpu)?;
        let mut y_norm = cache.y_norm.get_mut(gpu)?;
        gpu.l2_normalize_forward(&mut z, &mut z_bf16, &mut y_norm, &y, NORMALIZE_EPS, n, bn)?;
        // logits = z · Wᵀ.
        let mut logits = cache.logits.get_mut(gpu)?;
        gpu.matmul_bf16(
            &mut logits,
            &z_bf16,
            Transpose::No,
            &self.last.w_bf16,
            Transpose::Yes,
            n,
            bn,
            k,
            Accumulate::Overwrite,
        )
    }

    /// Backward from `d_logits [n, k]` of the forward saved in `cache`: parameter gradients
    /// accumulate into `grads [P]`; `dx [n, in_dim]` is written or added per `dx_write`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        gpu: &mut CudaBackend,
        scratch: &mut HeadScratch,
        grads: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dx_write: Accumulate,
        cache: &HeadCache,
        w: &DeviceWeights,
        d_logits: &CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "gpu dino head backward";
        let h = &self.head;
        let (in_dim, hidden, bn, k) = (h.mlp0.in_dim, h.mlp0.out_dim, h.bottleneck, h.out_dim);
        let n = cache.n;
        if d_logits.len() != n * k || dx.len() != n * in_dim {
            return Err(Error::shape(
                OP,
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
        scratch.d_out_bf16.resize(gpu, n * k)?;
        for buf in [&mut scratch.dz, &mut scratch.dy] {
            buf.resize(gpu, n * bn)?;
        }
        scratch.dy_bf16.resize(gpu, n * bn)?;
        scratch.dact.resize(gpu, n * hidden)?;
        scratch.dpre_bf16.resize(gpu, n * hidden)?;
        scratch.dw.resize(gpu, k * bn)?;

        // logits = z · Wᵀ: dz = d_logits · W, dW = d_logitsᵀ · z.
        let mut d_out_bf16 = scratch.d_out_bf16.get_mut(gpu)?;
        gpu.cast_f32_to_bf16(&mut d_out_bf16, d_logits)?;
        let mut dz = scratch.dz.get_mut(gpu)?;
        gpu.matmul_bf16(
            &mut dz,
            &d_out_bf16,
            Transpose::No,
            &self.last.w_bf16,
            Transpose::No,
            n,
            k,
            bn,
            Accumulate::Overwrite,
        )?;
        let z_bf16 = cache.z_bf16.get(gpu)?;
        let mut dw = scratch.dw.get_mut(gpu)?;
        gpu.matmul_bf16(
            &mut dw,
            &d_out_bf16,
            Transpose::Yes,
            &z_bf16,
            Transpose::No,
            k,
            n,
            bn,
            Accumulate::Overwrite,
        )?;
        {
            let [mut dg, mut dv] =
                gpu.sub_mut_disjoint(grads, [h.weight_g.range(), h.weight_v.range()])?;
            let g = gpu.sub(&w.f32, h.weight_g.range())?;
            let v = gpu.sub(&w.f32, h.weight_v.range())?;
            gpu.weight_norm_backward(&mut dg, &mut dv, &dw, &g, &v, &self.last.inv_norm, k, bn)?;
        }
        // Through the normalisation.
        let mut dy = scratch.dy.get_mut(gpu)?;
        let mut dy_bf16 = scratch.dy_bf16.get_mut(gpu)?;
        let z = cache.z.get(gpu)?;
        let y_norm = cache.y_norm.get(gpu)?;
        gpu.l2_normalize_backward(
            &mut dy,
            &mut dy_bf16,
            &dz,
            &z,
            &y_norm,
            NORMALIZE_EPS,
            n,
            bn,
        )?;

        // Bottleneck layer: parameter gradients, then dact2 = dy · W4.
        let act2 = cache.act2.get(gpu)?;
        linear_param_grads(gpu, grads, &h.mlp4, &dy_bf16, DoutF32::Ready(&dy), &act2, n)?;
        let mut dact = scratch.dact.get_mut(gpu)?;
        let mut dpre_bf16 = scratch.dpre_bf16.get_mut(gpu)?;
        linear_input_grad(
            gpu,
            &mut dact,
            &dy_bf16,
            &h.mlp4,
            w,
            n,
            Accumulate::Overwrite,
        )?;
        // Second hidden layer (dact is spent once dpre is made: it takes dpre in f32 if the
        // bias gradient needs it).
        let pre2 = cache.pre2.get(gpu)?;
        gpu.gelu_backward(&mut dpre_bf16, &dact, &pre2)?;
        let act0 = cache.act0.get(gpu)?;
        linear_param_grads(
            gpu,
            grads,
            &h.mlp2,
            &dpre_bf16,
            DoutF32::Widen(&mut dact),
            &act0,
            n,
        )?;
        linear_input_grad(
            gpu,
            &mut dact,
            &dpre_bf16,
            &h.mlp2,
            w,
            n,
            Accumulate::Overwrite,
        )?;
        // First hidden layer.
        let pre0 = cache.pre0.get(gpu)?;
        gpu.gelu_backward(&mut dpre_bf16, &dact, &pre0)?;
        let x_bf16 = cache.x_bf16.get(gpu)?;
        linear_param_grads(
            gpu,
            grads,
            &h.mlp0,
            &dpre_bf16,
            DoutF32::Widen(&mut dact),
            &x_bf16,
            n,
        )?;
        linear_input_grad(gpu, dx, &dpre_bf16, &h.mlp0, w, n, dx_write)
    }
}
