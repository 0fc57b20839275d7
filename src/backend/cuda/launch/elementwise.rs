//! Launchers of `kernels/elementwise.cu`: casts, bias, GELU, SwiGLU, LayerScale, and the deterministic
//! reductions (column sums for parameter gradients, full sums for losses and norms).

use super::{
    blocks, check_len, column_chunks, config, dim, grid_stride, launch, write_code, BLOCK,
};
use crate::backend::cuda::{bf16, CudaBackend, KernelFamily};
use crate::backend::{check_lens, Accumulate, ElementwiseOps, NormShape};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// What [`CudaBackend::sum`] adds up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    SumOfSquares,
}

impl ReduceOp {
    pub(in crate::backend::cuda) fn code(self) -> i32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::SumOfSquares => 1,
        }
    }
}

/// Blocks of the first stage of [`CudaBackend::sum`].
pub(in crate::backend::cuda) const SUM_GROUPS: usize = 264;

fn matrix(op: &'static str, rows: usize, channels: usize) -> Result<(i32, i32)> {
    if channels == 0 {
        return Err(Error::shape(op, "zero channels"));
    }
    Ok((dim(op, "rows", rows)?, dim(op, "channels", channels)?))
}

/// `(rows, width)` as the kernels' ints; x12's `2·width` channels must fit one too.
fn swiglu_dims(op: &'static str, rows: usize, width: usize) -> Result<(i32, i32)> {
    matrix(op, rows, 2 * width)?;
    Ok((dim(op, "rows", rows)?, dim(op, "width", width)?))
}

impl CudaBackend {
    /// `out[i] = f(inp[i])` by the grid-stride kernel `name` (a cast, GELU).
    pub(in crate::backend::cuda) fn map_elements<O, I>(
        &self,
        (op, name): (&'static str, &'static str),
        out: &mut CudaSlice<O>,
        inp: &CudaSlice<I>,
    ) -> Result<()> {
        check_len(op, "out", out.len(), inp.len())?;
        let n = inp.len() as i64;
        launch!(
            self,
            KernelFamily::Elementwise,
            name,
            grid_stride(inp.len()),
            [out, inp, &n]
        );
        Ok(())
    }

    /// `x[r, c] += bias[c]`, x `[rows, channels]`.
    pub fn add_bias(
        &self,
        x: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cuda add_bias";
        let (n, c) = matrix(OP, rows, channels)?;
        check_lens(
            OP,
            &[
                ("x", x.len(), rows * channels),
                ("bias", bias.len(), channels),
            ],
        )?;
        launch!(
            self,
            KernelFamily::Elementwise,
            "add_bias",
            grid_stride(rows * channels),
            [x, bias, &n, &c]
        );
        Ok(())
    }

    /// `pre += bias` (in place: `pre` holds the GEMM output and becomes the saved
    /// pre-activation), `act = bf16(gelu(pre))`.
    pub fn bias_gelu_forward(
        &self,
        pre: &mut CudaSlice<f32>,
        act: &mut CudaSlice<bf16>,
        bias: Option<&CudaSlice<f32>>,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cuda bias_gelu_forward";
        let (n, c) = matrix(OP, rows, channels)?;
        check_lens(
            OP,
            &[
                ("pre", pre.len(), rows * channels),
                ("act", act.len(), rows * channels),
                ("bias", bias.map_or(channels, |b| b.len()), channels),
            ],
        )?;
        let bias_ptr = self.optional_ptr(bias);
        let pre_ptr = self.device_ptr_mut_raw(pre);
        launch!(
            self,
            KernelFamily::Elementwise,
            "bias_gelu_forward",
            grid_stride(rows * channels),
            [&pre_ptr, act, &pre_ptr, &bias_ptr, &n, &c]
        );
        Ok(())
    }

    /// `out = gelu(inp)` (exact erf form), f32.
    pub fn gelu_forward(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>) -> Result<()> {
        self.map_elements(("cuda gelu_forward", "gelu_forward"), out, inp)
    }

    /// `residual += gamma ∘ branch`.
    pub fn layerscale_residual_forward(
        &self,
        residual: &mut CudaSlice<f32>,
        branch: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cuda layerscale_residual_forward";
        let (n, c) = matrix(OP, rows, channels)?;
        check_lens(
            OP,
            &[
                ("residual", residual.len(), rows * channels),
                ("branch", branch.len(), rows * channels),
                ("gamma", gamma.len(), channels),
            ],
        )?;
        launch!(
            self,
            KernelFamily::Elementwise,
            "layerscale_residual_forward",
            grid_stride(rows * channels),
            [residual, branch, gamma, &n, &c]
        );
        Ok(())
    }

    /// `out[c] (=|+=) Σ_r x[r, c] · y[r, c]` (`Σ_r x[r, c]` without `y`), `c < out.len()`;
    /// deterministic (fixed-order chunks).
    pub fn column_sum_product(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        y: Option<&CudaSlice<f32>>,
        rows: usize,
        write: Accumulate,
    ) -> Result<()> {
        const OP: &str = "cuda column_sum";
        let channels = out.len();
        let (n, c) = matrix(OP, rows, channels)?;
        check_lens(
            OP,
            &[
                ("x", x.len(), rows * channels),
                ("y", y.map_or(rows * channels, |y| y.len()), rows * channels),
            ],
        )?;
        let chunks = column_chunks(OP, rows, channels)?;
        self.reserve_scratch(chunks.groups * channels)?;
        let partial = self.scratch_ptr(0);
        let y_ptr = self.optional_ptr(y);
        launch!(
            self,
            KernelFamily::Elementwise,
            "column_sum_partial",
            config(chunks.grid, BLOCK),
            [&partial, x, &y_ptr, &n, &c, &chunks.per_chunk]
        );
        self.column_partial_reduce_raw(out, partial, chunks.groups, channels, 1.0, write)
    }

    /// `out[c] (=|+=) scale · Σ_g partial[g, c]` with `partial` a raw device address.
    pub(in crate::backend::cuda) fn column_partial_reduce_raw(
        &self,
        out: &mut CudaSlice<f32>,
        partial: u64,
        groups: usize,
        channels: usize,
        scale: f32,
        write: Accumulate,
    ) -> Result<()> {
        const OP: &str = "cuda column_partial_reduce";
        check_len(OP, "out", out.len(), channels)?;
        let g = dim(OP, "groups", groups)?;
        let c = dim(OP, "channels", channels)?;
        let write = write_code(write);
        let grid = (blocks(OP, channels.div_ceil(BLOCK as usize))?, 1, 1);
        launch!(
            self,
            KernelFamily::Elementwise,
            "column_partial_reduce",
            config(grid, BLOCK),
            [out, &partial, &g, &c, &scale, &write]
        );
        Ok(())
    }

    /// `out[0] = scale · Σ x` (or `Σ x²`), deterministic two-stage reduction.
    pub fn sum(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        op: ReduceOp,
        scale: f32,
    ) -> Result<()> {
        check_len("cuda sum", "out", out.len(), 1)?;
        self.reserve_scratch(SUM_GROUPS)?;
        let out = self.device_ptr_mut_raw(out);
        self.sum_into(out, self.scratch_ptr(0), x, op, scale)
    }

    /// [`sum`](Self::sum) into the raw address `out`, with the partials at a raw scratch
    /// address (`SUM_GROUPS` floats).
    pub(in crate::backend::cuda) fn sum_into(
        &self,
        out: u64,
        partial: u64,
        x: &CudaSlice<f32>,
        op: ReduceOp,
        scale: f32,
    ) -> Result<()> {
        let n = x.len() as i64;
        let code = op.code();
        let groups = SUM_GROUPS as i32;
        launch!(
            self,
            KernelFamily::Elementwise,
            "sum_partial",
            config((SUM_GROUPS as u32, 1, 1), BLOCK),
            [&partial, x, &n, &code]
        );
        launch!(
            self,
            KernelFamily::Elementwise,
            "sum_finalize",
            config((1, 1, 1), BLOCK),
            [&out, &partial, &groups, &scale]
        );
        Ok(())
    }
}

impl ElementwiseOps for CudaBackend {
    /// `dpre = bf16(dact ∘ gelu'(pre))`: the gradient of the pre-activation, rounded once for
    /// the GEMMs that read it.
    fn gelu_backward(
        &mut self,
        dpre: &mut CudaSlice<bf16>,
        dact: &CudaSlice<f32>,
        pre: &CudaSlice<f32>,
    ) -> Result<()> {
        check_len("cuda gelu_backward", "dpre", dpre.len(), pre.len())?;
        check_len("cuda gelu_backward", "dact", dact.len(), pre.len())?;
        let n = pre.len() as i64;
        launch!(
            self,
            KernelFamily::Elementwise,
            "gelu_backward",
            grid_stride(pre.len()),
            [dpre, dact, pre, &n]
        );
        Ok(())
    }

    /// SwiGLU gate: `gated [rows, width] = bf16(silu(x1) ∘ x2)` with `x12 [rows, 2·width]` =
    /// `[x1 | x2]` per row (the fused w12 output, bias included); `gated` is w3's operand.
    fn swiglu_forward(
        &mut self,
        gated: &mut CudaSlice<bf16>,
        x12: &CudaSlice<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        const OP: &str = "cuda swiglu_forward";
        let (n, w) = swiglu_dims(OP, rows, width)?;
        check_len(OP, "x12", x12.len(), rows * 2 * width)?;
        check_len(OP, "gated", gated.len(), rows * width)?;
        launch!(
            self,
            KernelFamily::Elementwise,
            "swiglu_forward",
            grid_stride(rows * width),
            [gated, x12, &n, &w]
        );
        Ok(())
    }

    /// SwiGLU backward: `dx12 [rows, 2·width] = bf16([dgated ∘ x2 ∘ silu'(x1) | dgated ∘
    /// silu(x1)])` (written; w12's operand) from `dgated [rows, width]` and the forward's `x12`.
    fn swiglu_backward(
        &mut self,
        dx12: &mut CudaSlice<bf16>,
        dgated: &CudaSlice<f32>,
        x12: &CudaSlice<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        const OP: &str = "cuda swiglu_backward";
        let (n, w) = swiglu_dims(OP, rows, width)?;
        check_len(OP, "dx12", dx12.len(), rows * 2 * width)?;
        check_len(OP, "dgated", dgated.len(), rows * width)?;
        check_len(OP, "x12", x12.len(), rows * 2 * width)?;
        launch!(
            self,
            KernelFamily::Elementwise,
            "swiglu_backward",
            grid_stride(rows * width),
            [dx12, dgated, x12, &n, &w]
        );
        Ok(())
    }

    /// LayerScale backward: `dbranch = bf16(gamma ∘ dresidual)` (the branch's GEMMs read it in
    /// bf16), `dgamma += Σ_rows dresidual ∘ branch` (f32).
    fn layerscale_backward(
        &mut self,
        dbranch: &mut CudaSlice<bf16>,
        dgamma: &mut CudaSlice<f32>,
        dresidual: &CudaSlice<f32>,
        branch: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        const OP: &str = "cuda layerscale_backward";
        let (n, c) = matrix(OP, rows, channels)?;
        for (name, len) in [
            ("dbranch", dbranch.len()),
            ("dresidual", dresidual.len()),
            ("branch", branch.len()),
        ] {
            check_len(OP, name, len, rows * channels)?;
        }
        check_len(OP, "dgamma", dgamma.len(), channels)?;
        check_len(OP, "gamma", gamma.len(), channels)?;
        launch!(
            self,
            KernelFamily::Elementwise,
            "layerscale_backward_input",
            grid_stride(rows * channels),
            [dbranch, dresidual, gamma, &n, &c]
        );
        self.column_sum_product(dgamma, dresidual, Some(branch), rows, Accumulate::Add)
    }

    fn column_sum(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rows: usize,
        write: Accumulate,
    ) -> Result<()> {
        self.column_sum_product(out, x, None, rows, write)
    }
}
