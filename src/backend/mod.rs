//! Compute backends, behind one seam: the [`Backend`] trait.
//!
//! The model, the SSL step and the optimizer (`nn`, `ssl`, `optim`) are written once against
//! this trait; a backend supplies buffers and the operations the model needs, at the level of
//! its kernels: GEMMs with their bias epilogues, LayerNorm (fused with the residual add),
//! attention, GELU / SwiGLU, LayerScale, the batch-subset residual of stochastic depth, token
//! assembly and row gathers, the loss kernels (teacher softmax, centering, the paired
//! cross-entropy, Sinkhorn-Knopp, KoLeo) and the optimizer passes.
//!
//! Why a trait with associated buffer types: the CPU and CUDA backends keep their memory as
//! different things (`[f32]` slices and device allocations), and each chooses its own storage
//! for the GEMM operands ([`Buffers::Half`]: bf16 on CUDA, f32 on the CPU, rounded to bf16 values
//! under [`Precision::Bf16`]). Fusions (bias in the GEMM epilogue, residual add + LayerNorm) and
//! fallbacks (a GEMM cuBLASLt refuses) stay inside the backend; the model only states what it
//! needs computed. Generic code is monomorphised per backend: no dynamic dispatch in the step.
//!
//! This layer imports nothing above it. [`cpu`] is always available and is the reference every
//! CUDA kernel is tested against; [`cuda`] loads the CUDA libraries at run time, so every build
//! has it and a machine without a GPU gets a typed error.

pub mod cpu;
pub mod cuda;
mod shapes;
mod storage;

pub use shapes::{check_len, check_lens};
pub use shapes::{
    Accumulate, AdamWStep, AttentionShape, Gemm, GemmBatch, LinearDims, NormShape, PatchLayout,
    Precision, TokenLayout, Transpose, CLIP_EPS,
};
pub(crate) use storage::workspace;
pub use storage::{check_windows, Grow, Storage};

use crate::error::{Error, Result};
use std::fmt;
use std::ops::DerefMut;
use std::str::FromStr;

/// Where a linear layer's output goes.
pub enum LinearOut<'a, B: Buffers> {
    /// `[rows, out]` f32.
    F32(&'a mut B::F32),
    /// `[rows, out]` in the operand precision, rounded once from the f32 result (bias included),
    /// for a consumer that reads operands only (the attention's qkv).
    Half(&'a mut B::Half),
    /// fc1 and its GELU: `pre = x·Wᵀ + b` (f32, kept for backward), `act = gelu(pre)` as an
    /// operand.
    Gelu {
        pre: &'a mut B::F32,
        act: &'a mut B::Half,
    },
}

/// Where a linear layer's input gradient `dinp [rows, in] = dout · W` goes.
pub enum InputGrad<'a, B: Buffers> {
    /// f32, written or added.
    F32(&'a mut B::F32, Accumulate),
    /// In the operand precision, for a consumer that reads operands only (the attention backward).
    Half(&'a mut B::Half),
}

/// Where a LayerNorm's output goes.
pub enum NormOut<'a, B: Buffers> {
    F32(&'a mut B::F32),
    Half(&'a mut B::Half),
}

/// A LayerNorm's affine parameters and epsilon.
pub struct LnParams<'a, B: Buffers> {
    pub weight: &'a B::F32, // [C]
    pub bias: &'a B::F32,   // [C]
    pub eps: f32,
}

/// The statistics a LayerNorm forward writes for its backward.
pub struct LnStats<'a, B: Buffers> {
    pub mean: &'a mut B::F32, // [R]
    pub rstd: &'a mut B::F32, // [R]
}

/// The residual add that precedes a fused LayerNorm: `stream += gamma ∘ branch`.
pub struct Residual<'a, B: Buffers> {
    pub stream: &'a mut B::F32, // [R, C]
    pub branch: &'a B::F32,     // [R, C]
    pub gamma: Option<&'a B::F32>,
}

/// What a LayerNorm backward reads.
pub struct LnSaved<'a, B: Buffers> {
    pub dout: &'a B::F32,   // [R, C]
    pub inp: &'a B::F32,    // [R, C]
    pub weight: &'a B::F32, // [C]
    pub mean: &'a B::F32,   // [R]
    pub rstd: &'a B::F32,   // [R]
}

/// Which samples of a batch a residual branch covers: `kept [samples]` (unique indices) or, with
/// `None`, samples `0..samples` in order; and how the batch is laid out.
pub struct SampleSubset<'a, B: Buffers> {
    pub kept: Option<&'a B::I64>,
    pub samples: usize,
    pub batch: usize,
    /// Elements per sample (`t · d`).
    pub sample_len: usize,
    pub channels: usize,
}

/// The buffers of one AdamW update over the flat parameter buffer.
pub struct AdamWBuffers<'a, B: Buffers> {
    pub params: &'a mut B::F32,
    pub exp_avg: &'a mut B::F32,
    pub exp_avg_sq: &'a mut B::F32,
    pub grads: &'a B::F32,
}

/// A model's parameters on a backend: f32 master weights and the operand copy GEMMs read.
pub trait WeightStore<B: Buffers> {
    /// `[P]` the f32 master weights.
    fn f32(&self) -> &B::F32;
    /// `[P]` writable (the optimizer and the EMA update them; refresh the operand copy after).
    fn f32_mut(&mut self) -> &mut B::F32;
    /// `[P]` the GEMM operand copy (the master itself where the backend reads f32 operands).
    fn half(&self) -> &B::Half;
}

/// What a backend has done so far, for benches and the steady-state checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Buffers allocated through the backend (workspaces included): constant in a warm step.
    pub allocations: u64,
    /// Hand-written kernels launched (CUDA).
    pub kernel_launches: Option<u64>,
    /// Which library ran the GEMMs (CUDA).
    pub gemms: Option<cuda::GemmStats>,
}

/// A compute backend: buffers (this trait) and the operation families the model is written
/// against ([`GemmOps`], [`NormOps`], [`AttentionOps`], [`ElementwiseOps`], [`TokenOps`],
/// [`HeadOps`], [`LossOps`], [`OptimizerOps`]); [`Backend`] is all of them. Each backend
/// implements each family in the file that mirrors the family's `kernels/*.cu` (the CPU file
/// is the reference the CUDA kernels are tested against).
///
/// Shapes are given by the dimensions; every operation checks each buffer's length against them
/// and returns [`Error::Shape`] before computing anything. Unless said otherwise an output is
/// overwritten; parameter gradients accumulate (llm.c's contract).
pub trait Buffers: Sized {
    /// f32 values.
    type F32: Storage<Elem = f32> + ?Sized;
    /// GEMM operands and activations that only feed GEMMs (bf16 on CUDA).
    type Half: Storage + ?Sized;
    type I64: Storage<Elem = i64> + ?Sized;
    type U8: Storage<Elem = u8> + ?Sized;
    type BufF32: DerefMut<Target = Self::F32>;
    type BufHalf: DerefMut<Target = Self::Half>;
    type BufI64: DerefMut<Target = Self::I64>;
    type BufU8: DerefMut<Target = Self::U8>;
    type Weights: WeightStore<Self>;

    /// A short name for logs (`cpu (2 threads, f32)`, `cuda (NVIDIA H100 ..., sm_90)`).
    fn describe(&self) -> String;
    /// The precision this backend runs the model in.
    fn precision(&self) -> Precision;
    fn counters(&self) -> Counters;
    /// Waits until queued work is done.
    fn synchronize(&mut self) -> Result<()>;
    /// Device memory in use (bytes), where the device reports it.
    fn memory_in_use(&self) -> Option<u64> {
        None
    }

    // ---- Memory. Allocations are zero-filled and counted.

    fn alloc_f32(&mut self, len: usize) -> Result<Self::BufF32>;
    fn alloc_half(&mut self, len: usize) -> Result<Self::BufHalf>;
    fn alloc_i64(&mut self, len: usize) -> Result<Self::BufI64>;
    fn alloc_u8(&mut self, len: usize) -> Result<Self::BufU8>;
    /// Copies `src` into the first `src.len()` elements of `dst`.
    fn upload_f32(&mut self, dst: &mut Self::F32, src: &[f32]) -> Result<()>;
    /// As [`Buffers::upload_f32`], rounded to the operand precision.
    fn upload_half(&mut self, dst: &mut Self::Half, src: &[f32]) -> Result<()>;
    fn upload_i64(&mut self, dst: &mut Self::I64, src: &[i64]) -> Result<()>;
    fn upload_u8(&mut self, dst: &mut Self::U8, src: &[u8]) -> Result<()>;
    fn download_f32(&mut self, src: &Self::F32) -> Result<Vec<f32>>;
    fn download_half(&mut self, src: &Self::Half) -> Result<Vec<f32>>;
    /// `dst = src` (same length).
    fn copy_f32(&mut self, dst: &mut Self::F32, src: &Self::F32) -> Result<()>;
    fn zero_f32(&mut self, dst: &mut Self::F32) -> Result<()>;
    /// A model's parameters from host values (f32 master and its operand copy).
    fn weights(&mut self, host: &[f32]) -> Result<Self::Weights>;
    /// Re-rounds the operand copy from the master (after each update).
    fn refresh_weights(&mut self, w: &mut Self::Weights) -> Result<()>;

    // ---- Precision.

    fn cast_to_half(&mut self, out: &mut Self::Half, inp: &Self::F32) -> Result<()>;
    fn cast_to_f32(&mut self, out: &mut Self::F32, inp: &Self::Half) -> Result<()>;
}

/// GEMMs: operands in the operand precision ([`Buffers::Half`]), f32 accumulation.
pub trait GemmOps: Buffers {
    /// `c (=|+=) op(a) · op(b)`.
    fn matmul(&mut self, c: &mut Self::F32, a: &Self::Half, b: &Self::Half, g: Gemm) -> Result<()>;
    /// A batch of f32 products (the position-embedding resampling).
    fn matmul_f32(
        &mut self,
        c: &mut Self::F32,
        a: &Self::F32,
        b: &Self::F32,
        g: GemmBatch,
    ) -> Result<()>;
    /// `out = inp [rows, in] · weightᵀ + bias` with `weight [out, in]`.
    fn linear_forward(
        &mut self,
        out: LinearOut<'_, Self>,
        inp: &Self::Half,
        weight: &Self::Half,
        bias: Option<&Self::F32>,
        dims: LinearDims,
    ) -> Result<()>;
    /// `dinp [rows, in] = dout [rows, out] · weight`.
    fn linear_input_grad(
        &mut self,
        dinp: InputGrad<'_, Self>,
        dout: &Self::Half,
        weight: &Self::Half,
        dims: LinearDims,
    ) -> Result<()>;
    /// `dweight += doutᵀ · inp`, `dbias += Σ_rows dout`. `dout_f32` is the f32 form of `dout`
    /// when the caller has it (a backend that cannot sum the bias inside the GEMM reads it).
    #[allow(clippy::too_many_arguments)]
    fn linear_param_grads(
        &mut self,
        dweight: &mut Self::F32,
        dbias: Option<&mut Self::F32>,
        dout: &Self::Half,
        dout_f32: Option<&Self::F32>,
        inp: &Self::Half,
        dims: LinearDims,
    ) -> Result<()>;
}

/// LayerNorm over the last dimension (f32 statistics).
pub trait NormOps: Buffers {
    fn layernorm_forward(
        &mut self,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        inp: &Self::F32,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()>;
    /// `res.stream += gamma ∘ res.branch`, then the LayerNorm of the updated stream (one pass).
    fn residual_layernorm_forward(
        &mut self,
        res: Residual<'_, Self>,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()>;
    /// `dinp (=|+=) ∂/∂inp`, `dweight += `, `dbias += `.
    fn layernorm_backward(
        &mut self,
        dinp: &mut Self::F32,
        dinp_write: Accumulate,
        dweight: &mut Self::F32,
        dbias: &mut Self::F32,
        saved: LnSaved<'_, Self>,
        shape: NormShape,
    ) -> Result<()>;
}

/// Attention: `softmax(q kᵀ · hd^-0.5) v` per sequence and head.
pub trait AttentionOps: Buffers {
    fn attention_forward(
        &mut self,
        out: &mut Self::Half,
        lse: &mut Self::F32,
        qkv: &Self::Half,
        shape: AttentionShape,
    ) -> Result<()>;
    fn attention_backward(
        &mut self,
        dqkv: &mut Self::Half,
        dout: &Self::Half,
        qkv: &Self::Half,
        out: &Self::Half,
        lse: &Self::F32,
        shape: AttentionShape,
    ) -> Result<()>;
}

/// Elementwise passes.
pub trait ElementwiseOps: Buffers {
    /// `dpre = dact · gelu'(pre)` (exact erf GELU), as an operand.
    fn gelu_backward(
        &mut self,
        dpre: &mut Self::Half,
        dact: &Self::F32,
        pre: &Self::F32,
    ) -> Result<()>;
    /// SwiGLU: `gated [rows, w] = silu(x12[:, :w]) · x12[:, w:]`, as an operand.
    fn swiglu_forward(
        &mut self,
        gated: &mut Self::Half,
        x12: &Self::F32,
        rows: usize,
        width: usize,
    ) -> Result<()>;
    /// Backward of [`ElementwiseOps::swiglu_forward`]: `dx12 [rows, 2w]`, as an operand.
    fn swiglu_backward(
        &mut self,
        dx12: &mut Self::Half,
        dgated: &Self::F32,
        x12: &Self::F32,
        rows: usize,
        width: usize,
    ) -> Result<()>;
    /// LayerScale backward: `dbranch = dresidual ∘ gamma` (an operand), `dgamma += Σ dresidual ∘ branch`.
    fn layerscale_backward(
        &mut self,
        dbranch: &mut Self::Half,
        dgamma: &mut Self::F32,
        dresidual: &Self::F32,
        branch: &Self::F32,
        gamma: &Self::F32,
        shape: NormShape,
    ) -> Result<()>;
    /// `out [channels] (=|+=) Σ_rows x [rows, channels]` (deterministic order).
    fn column_sum(
        &mut self,
        out: &mut Self::F32,
        x: &Self::F32,
        rows: usize,
        write: Accumulate,
    ) -> Result<()>;
}

/// Tokens, rows and samples: assembly, mask tokens, row gathers, the batch subsets of
/// stochastic depth.
pub trait TokenOps: Buffers {
    /// `x [B, T, C] = [cls + pos[0], reg.., pe[b, p] + pos[1 + p]]`.
    fn assemble_tokens(
        &mut self,
        x: &mut Self::F32,
        pe: &Self::F32,
        cls: &Self::F32,
        reg: Option<&Self::F32>,
        pos: &Self::F32,
        layout: TokenLayout,
    ) -> Result<()>;
    /// Rows `r` of `x [rows, C]` with `masks[r] != 0` become `token`.
    fn mask_token_substitute(
        &mut self,
        x: &mut Self::F32,
        masks: &Self::U8,
        token: &Self::F32,
        channels: usize,
    ) -> Result<()>;
    /// `dtoken += Σ_masked dx[r]`, and the masked rows of `dx` become zero.
    fn mask_token_backward(
        &mut self,
        dtoken: &mut Self::F32,
        dx: &mut Self::F32,
        masks: &Self::U8,
        channels: usize,
    ) -> Result<()>;
    /// `out [M, C] = tokens[layout.token_row(indices[i])]`; `indices_host` is the same list on
    /// the host (checked against the layout).
    fn gather_rows(
        &mut self,
        out: &mut Self::F32,
        tokens: &Self::F32,
        indices: &Self::I64,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()>;
    /// `dtokens[layout.token_row(indices[i])] += dgathered[i]`.
    fn scatter_rows_add(
        &mut self,
        dtokens: &mut Self::F32,
        dgathered: &Self::F32,
        indices: &Self::I64,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()>;
    /// `out [k, sample_len] = alpha · x[kept]` (`x [batch, sample_len]`).
    fn gather_samples_scaled(
        &mut self,
        out: &mut Self::F32,
        x: &Self::F32,
        kept: &Self::I64,
        sample_len: usize,
        alpha: f32,
    ) -> Result<()>;
    /// `x[kept[j]] += alpha · gamma ∘ y[j]` per sample `j < samples` (`x [batch, sample_len]`,
    /// `y [samples, sample_len]`, `gamma [channels]` or none).
    fn residual_add_samples(
        &mut self,
        x: &mut Self::F32,
        y: &Self::F32,
        gamma: Option<&Self::F32>,
        subset: SampleSubset<'_, Self>,
        alpha: f32,
    ) -> Result<()>;
}

/// The DINO head's normalisations and KoLeo (both on L2-normalised rows).
pub trait HeadOps: Buffers {
    /// What KoLeo's forward saves for its backward.
    type Koleo;

    /// `z = y / max(‖y‖, eps)` per row (f32 and as an operand), `norm = max(‖y‖, eps)`.
    #[allow(clippy::too_many_arguments)]
    fn l2_normalize_forward(
        &mut self,
        z: &mut Self::F32,
        z_half: &mut Self::Half,
        norm: &mut Self::F32,
        y: &Self::F32,
        eps: f32,
        shape: NormShape,
    ) -> Result<()>;
    /// Backward of [`HeadOps::l2_normalize_forward`] (`dy` f32 and as an operand).
    #[allow(clippy::too_many_arguments)]
    fn l2_normalize_backward(
        &mut self,
        dy: &mut Self::F32,
        dy_half: &mut Self::Half,
        dz: &Self::F32,
        z: &Self::F32,
        norm: &Self::F32,
        eps: f32,
        shape: NormShape,
    ) -> Result<()>;
    /// `w [K, bn] = g · v / ‖v_k‖` per row (no eps), `inv_norm [K] = 1 / ‖v_k‖`.
    fn weight_norm_forward(
        &mut self,
        w: &mut Self::F32,
        inv_norm: &mut Self::F32,
        g: &Self::F32,
        v: &Self::F32,
        shape: NormShape,
    ) -> Result<()>;
    /// `dg += `, `dv += ` from `dw [K, bn]`.
    #[allow(clippy::too_many_arguments)]
    fn weight_norm_backward(
        &mut self,
        dg: &mut Self::F32,
        dv: &mut Self::F32,
        dw: &Self::F32,
        g: &Self::F32,
        v: &Self::F32,
        inv_norm: &Self::F32,
        shape: NormShape,
    ) -> Result<()>;
    /// KoLeo's saved state for `b` rows of `d`.
    fn koleo_state(&mut self, b: usize, d: usize) -> Result<Self::Koleo>;
    /// `loss [1]` = KoLeo of `x [b, d]`; saves what backward needs.
    fn koleo_forward(
        &mut self,
        loss: &mut Self::F32,
        state: &mut Self::Koleo,
        x: &Self::F32,
        b: usize,
        d: usize,
    ) -> Result<()>;
    /// `dx [b, d] = weight · ∂KoLeo/∂x` (written).
    fn koleo_backward(
        &mut self,
        dx: &mut Self::F32,
        state: &Self::Koleo,
        weight: f32,
        b: usize,
        d: usize,
    ) -> Result<()>;
}

/// Losses and teacher targets.
pub trait LossOps: Buffers {
    /// A cross-entropy pairing table (see [`LossOps::softmax_cross_entropy`]).
    type Pairs;

    /// A pairing table for up to `capacity` student rows of `pairs` pairs each.
    fn pairs(&mut self, capacity: usize, pairs: usize) -> Result<Self::Pairs>;
    /// Fills the table's first `rows` rows: `teacher [rows, P]` teacher rows (-1 = unused),
    /// `weight [rows, P]` their weights.
    fn set_pairs(
        &mut self,
        table: &mut Self::Pairs,
        rows: usize,
        teacher: &[i32],
        weight: &[f32],
    ) -> Result<()>;
    /// `probs [R, K] = softmax((logits − center) / temp)` per row (no center: none subtracted).
    fn teacher_softmax(
        &mut self,
        probs: &mut Self::F32,
        logits: &Self::F32,
        center: Option<&Self::F32>,
        temp: f32,
        k: usize,
    ) -> Result<()>;
    /// `next [K] = m · center + (1 − m) · mean_rows(logits [R, K])`.
    fn center_ema(
        &mut self,
        next: &mut Self::F32,
        logits: &Self::F32,
        center: &Self::F32,
        momentum: f64,
        k: usize,
    ) -> Result<()>;
    /// The paired cross-entropy of the table's rows: with `q = Σ_p w_p probs[t_p]` and
    /// `ls = log_softmax(s_r / ts)`, `loss [1] = Σ_r −Σ_k q_k ls_k` and
    /// `ds_r = grad_scale · (softmax(s_r / ts) · Σq − q) / ts`. `s`, `ds` `[rows, K]`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_cross_entropy(
        &mut self,
        loss: &mut Self::F32,
        ds: &mut Self::F32,
        s: &Self::F32,
        probs: &Self::F32,
        table: &Self::Pairs,
        student_temp: f32,
        grad_scale: f32,
        k: usize,
    ) -> Result<()>;
    /// `out [1]` = mean over rows of `−Σ_k p log p` (nats).
    fn mean_row_entropy(&mut self, out: &mut Self::F32, probs: &Self::F32, k: usize) -> Result<()>;
    /// Sinkhorn-Knopp targets `q [R, K]` of `logits [R, K]` (the official algorithm, the `R`
    /// rows normalised jointly).
    fn sinkhorn_knopp(
        &mut self,
        q: &mut Self::F32,
        logits: &Self::F32,
        k: usize,
        temp: f32,
        iterations: usize,
    ) -> Result<()>;
}

/// Optimizer passes over the flat buffers.
pub trait OptimizerOps: Buffers {
    /// AdamW's parameter segments and their groups.
    type Segments;

    /// Segments `starts[s]..starts[s+1]` of a flat buffer of `numel`, segment `s` in group
    /// `groups[s] < n_groups`.
    fn segments(
        &mut self,
        starts: &[usize],
        groups: &[usize],
        n_groups: usize,
        numel: usize,
    ) -> Result<Self::Segments>;
    /// One AdamW step with per-group lr and weight decay (`group_lr`, `group_wd` `[G]`).
    fn adamw_update(
        &mut self,
        bufs: AdamWBuffers<'_, Self>,
        segments: &Self::Segments,
        group_lr: &Self::F32,
        group_wd: &Self::F32,
        hp: AdamWStep,
    ) -> Result<()>;
    /// `teacher = m · teacher + (1 − m) · student`.
    fn ema_update(
        &mut self,
        teacher: &mut Self::F32,
        student: &Self::F32,
        momentum: f64,
    ) -> Result<()>;
    /// `norm [1] = ‖grads‖`; grads scaled by `min(max_norm / (norm + 1e-6), 1)` (a non-finite
    /// norm leaves them as they are).
    fn clip_grad_norm(
        &mut self,
        grads: &mut Self::F32,
        norm: &mut Self::F32,
        max_norm: f32,
    ) -> Result<()>;
}

/// The backend traits, for code that calls operations on a concrete backend
/// (`use dinotrain::backend::prelude::*`).
pub mod prelude {
    pub use super::{
        AttentionOps, Backend, Buffers, ElementwiseOps, GemmOps, HeadOps, LossOps, NormOps,
        OptimizerOps, TokenOps,
    };
}

/// A whole backend: its buffers and every operation family.
pub trait Backend:
    Buffers
    + GemmOps
    + NormOps
    + AttentionOps
    + ElementwiseOps
    + TokenOps
    + HeadOps
    + LossOps
    + OptimizerOps
{
}

impl<T> Backend for T where
    T: Buffers
        + GemmOps
        + NormOps
        + AttentionOps
        + ElementwiseOps
        + TokenOps
        + HeadOps
        + LossOps
        + OptimizerOps
{
}

/// Where computation runs, as the user asked for it (`--device auto|cpu|cuda[:i]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA device 0 when a driver and device are present, else the CPU (with one line saying so).
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::Config(format!(
                    "unknown device '{s}' (expected auto, cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_device_spelling_and_rejects_junk() {
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
    }
}
