//! [`CpuBackend`]: the [`Backend`] seam on the CPU, over the kernels of this folder.
//!
//! Buffers are plain `Vec`s and windows plain slices. GEMM operands ([`Backend::Half`]) are f32;
//! under [`Precision::Bf16`] every value written into an operand buffer is rounded to the nearest
//! bf16 (ties to even), at the places the CUDA backend rounds, so a CPU run reproduces a GPU
//! run's roundings (the products themselves stay f32: a product of two bf16 values is exact in
//! f32). The golden fixtures run in [`Precision::F32`].

use super::attention::{attention_backward, attention_forward};
use super::elementwise::{
    gelu, gelu_backward, layerscale_backward, swiglu_backward, swiglu_forward,
};
use super::gemm::matmul;
use super::head::{
    l2_normalize_backward, l2_normalize_forward, weight_norm_backward, weight_norm_forward,
};
use super::koleo::{koleo_backward, koleo_forward, KoleoSaved};
use super::layernorm::{layernorm_backward, layernorm_forward, residual_layernorm_forward};
use super::loss::{
    center_update, check_len, mean_row_entropy, paired_cross_entropy, softmax_centered_forward,
};
use super::optimizer::{adamw_step_segments, ema_update, AdamHyper, AdamwSegment};
use super::sinkhorn::sinkhorn_knopp;
use super::tokens;
use crate::backend::{
    Accumulate, AdamWBuffers, AdamWStep, AttentionShape, Backend, Counters, Gemm, GemmBatch,
    InputGrad, LinearDims, LinearOut, LnParams, LnSaved, LnStats, NormOut, NormShape, PatchLayout,
    Precision, Residual, SampleSubset, TokenLayout, Transpose, WeightStore,
};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Elements per rayon task of the elementwise passes.
const CHUNK: usize = 1 << 14;
/// Rows per rayon task of the bias loops.
const ROWS_PER_TASK: usize = 256;

/// The CPU backend: rayon for parallel loops, the `gemm` crate for matrix products.
#[derive(Debug)]
pub struct CpuBackend {
    precision: Precision,
    allocations: u64,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new(Precision::F32)
    }
}

impl CpuBackend {
    pub fn new(precision: Precision) -> Self {
        CpuBackend {
            precision,
            allocations: 0,
        }
    }

    /// Rounds operand values to bf16 under [`Precision::Bf16`] (nothing under f32).
    fn round(&self, x: &mut [f32]) {
        if self.precision == Precision::Bf16 {
            x.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|v| *v = round_bf16(*v)));
        }
    }
}

/// The nearest bf16 value (ties to even), as f32.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// A model's parameters on the CPU: the f32 master, and its bf16-rounded copy under bf16.
#[derive(Clone, Debug)]
pub struct CpuWeights {
    master: Vec<f32>,
    rounded: Option<Vec<f32>>,
}

impl WeightStore<CpuBackend> for CpuWeights {
    fn f32(&self) -> &[f32] {
        &self.master
    }
    fn f32_mut(&mut self) -> &mut [f32] {
        &mut self.master
    }
    fn half(&self) -> &[f32] {
        self.rounded.as_deref().unwrap_or(&self.master)
    }
}

/// A cross-entropy pairing table: `teacher`, `weight` `[capacity, pairs]`, `rows` in use.
#[derive(Clone, Debug)]
pub struct CpuPairs {
    pairs: usize,
    rows: usize,
    teacher: Vec<i32>,
    weight: Vec<f32>,
}

/// AdamW segments: `(start, len, group)`.
#[derive(Clone, Debug)]
pub struct CpuSegments {
    segments: Vec<(usize, usize, usize)>,
    groups: usize,
    numel: usize,
}

fn check(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    check_len(op, what, got, want)
}

/// `len / c` when `c` divides `len`, for row counts implied by a buffer.
fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || len % c != 0 {
        return Err(Error::shape(
            op,
            format!("{what} holds {len} values, not a whole number of rows of {c}"),
        ));
    }
    Ok(len / c)
}

/// `out[r] += bias` for every row of `out [rows, n]`.
fn add_bias(out: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    out.par_chunks_mut(ROWS_PER_TASK * n).for_each(|chunk| {
        for row in chunk.chunks_mut(n) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    });
}

fn one_scalar(op: &'static str, out: &mut [f32], v: f32) -> Result<()> {
    check(op, "out", out.len(), 1)?;
    out[0] = v;
    Ok(())
}

impl Backend for CpuBackend {
    type F32 = [f32];
    type Half = [f32];
    type I64 = [i64];
    type U8 = [u8];
    type BufF32 = Vec<f32>;
    type BufHalf = Vec<f32>;
    type BufI64 = Vec<i64>;
    type BufU8 = Vec<u8>;
    type Weights = CpuWeights;
    type Pairs = CpuPairs;
    type Segments = CpuSegments;
    type Koleo = KoleoSaved;

    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, {})",
            rayon::current_num_threads(),
            self.precision
        )
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn counters(&self) -> Counters {
        Counters {
            allocations: self.allocations,
            kernel_launches: None,
            gemms: None,
        }
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    fn alloc_f32(&mut self, len: usize) -> Result<Vec<f32>> {
        self.allocations += 1;
        Ok(vec![0.0; len])
    }

    fn alloc_half(&mut self, len: usize) -> Result<Vec<f32>> {
        self.alloc_f32(len)
    }

    fn alloc_i64(&mut self, len: usize) -> Result<Vec<i64>> {
        self.allocations += 1;
        Ok(vec![0; len])
    }

    fn alloc_u8(&mut self, len: usize) -> Result<Vec<u8>> {
        self.allocations += 1;
        Ok(vec![0; len])
    }

    fn upload_f32(&mut self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        upload(dst, src)
    }

    fn upload_half(&mut self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        upload(dst, src)?;
        self.round(&mut dst[..src.len()]);
        Ok(())
    }

    fn upload_i64(&mut self, dst: &mut [i64], src: &[i64]) -> Result<()> {
        upload(dst, src)
    }

    fn upload_u8(&mut self, dst: &mut [u8], src: &[u8]) -> Result<()> {
        upload(dst, src)
    }

    fn download_f32(&mut self, src: &[f32]) -> Result<Vec<f32>> {
        Ok(src.to_vec())
    }

    fn download_half(&mut self, src: &[f32]) -> Result<Vec<f32>> {
        Ok(src.to_vec())
    }

    fn copy_f32(&mut self, dst: &mut [f32], src: &[f32]) -> Result<()> {
        check("copy_f32", "src", src.len(), dst.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn zero_f32(&mut self, dst: &mut [f32]) -> Result<()> {
        dst.fill(0.0);
        Ok(())
    }

    fn weights(&mut self, host: &[f32]) -> Result<CpuWeights> {
        self.allocations += 1;
        let mut w = CpuWeights {
            master: host.to_vec(),
            rounded: None,
        };
        if self.precision == Precision::Bf16 {
            self.allocations += 1;
            w.rounded = Some(host.to_vec());
            self.refresh_weights(&mut w)?;
        }
        Ok(w)
    }

    fn refresh_weights(&mut self, w: &mut CpuWeights) -> Result<()> {
        if let Some(r) = &mut w.rounded {
            r.copy_from_slice(&w.master);
            self.round(r);
        }
        Ok(())
    }

    fn cast_to_half(&mut self, out: &mut [f32], inp: &[f32]) -> Result<()> {
        self.copy_f32(out, inp)?;
        self.round(out);
        Ok(())
    }

    fn cast_to_f32(&mut self, out: &mut [f32], inp: &[f32]) -> Result<()> {
        self.copy_f32(out, inp)
    }

    fn matmul(&mut self, c: &mut [f32], a: &[f32], b: &[f32], g: Gemm) -> Result<()> {
        const OP: &str = "cpu matmul";
        check(OP, "c", c.len(), g.m * g.n)?;
        check(OP, "a", a.len(), g.m * g.k)?;
        check(OP, "b", b.len(), g.k * g.n)?;
        matmul(c, a, g.ta, b, g.tb, g.m, g.k, g.n, g.acc);
        Ok(())
    }

    fn matmul_f32(&mut self, c: &mut [f32], a: &[f32], b: &[f32], g: GemmBatch) -> Result<()> {
        const OP: &str = "cpu matmul_f32";
        let Gemm { m, k, n, .. } = g.gemm;
        let last = g.batch.saturating_sub(1);
        if g.batch == 0 {
            return Ok(());
        }
        if c.len() < last * g.stride_c + m * n
            || a.len() < last * g.stride_a + m * k
            || b.len() < last * g.stride_b + k * n
        {
            return Err(Error::shape(OP, format!("{g:?}: operands too short")));
        }
        for i in 0..g.batch {
            let cs = &mut c[i * g.stride_c..i * g.stride_c + m * n];
            let as_ = &a[i * g.stride_a..i * g.stride_a + m * k];
            let bs = &b[i * g.stride_b..i * g.stride_b + k * n];
            let gm = g.gemm;
            matmul(cs, as_, gm.ta, bs, gm.tb, m, k, n, gm.acc);
        }
        Ok(())
    }

    fn linear_forward(
        &mut self,
        out: LinearOut<'_, Self>,
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        dims: LinearDims,
    ) -> Result<()> {
        const OP: &str = "cpu linear_forward";
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        check(OP, "inp", inp.len(), rows * k)?;
        check(OP, "weight", weight.len(), n * k)?;
        if let Some(b) = bias {
            check(OP, "bias", b.len(), n)?;
        }
        let product = |y: &mut [f32]| -> Result<()> {
            check(OP, "out", y.len(), rows * n)?;
            let g = Gemm::nn(rows, k, n).t(Transpose::No, Transpose::Yes);
            matmul(y, inp, g.ta, weight, g.tb, rows, k, n, g.acc);
            if let Some(b) = bias {
                add_bias(y, b);
            }
            Ok(())
        };
        match out {
            LinearOut::F32(y) => product(y),
            LinearOut::Half(y) => {
                product(y)?;
                self.round(y);
                Ok(())
            }
            LinearOut::Gelu { pre, act } => {
                product(pre)?;
                check(OP, "act", act.len(), rows * n)?;
                act.par_chunks_mut(CHUNK)
                    .zip(pre.par_chunks(CHUNK))
                    .for_each(|(a, p)| a.iter_mut().zip(p).for_each(|(a, &p)| *a = gelu(p)));
                self.round(act);
                Ok(())
            }
        }
    }

    fn linear_input_grad(
        &mut self,
        dinp: InputGrad<'_, Self>,
        dout: &[f32],
        weight: &[f32],
        dims: LinearDims,
    ) -> Result<()> {
        const OP: &str = "cpu linear_input_grad";
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        check(OP, "dout", dout.len(), rows * n)?;
        check(OP, "weight", weight.len(), n * k)?;
        let (dx, acc, round) = match dinp {
            InputGrad::F32(dx, acc) => (dx, acc, false),
            InputGrad::Half(dx) => (dx, Accumulate::Overwrite, true),
        };
        check(OP, "dinp", dx.len(), rows * k)?;
        matmul(
            dx,
            dout,
            Transpose::No,
            weight,
            Transpose::No,
            rows,
            n,
            k,
            acc,
        );
        if round {
            self.round(dx);
        }
        Ok(())
    }

    fn linear_param_grads(
        &mut self,
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        _dout_f32: Option<&[f32]>,
        inp: &[f32],
        dims: LinearDims,
    ) -> Result<()> {
        const OP: &str = "cpu linear_param_grads";
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        check(OP, "dweight", dweight.len(), n * k)?;
        check(OP, "dout", dout.len(), rows * n)?;
        check(OP, "inp", inp.len(), rows * k)?;
        matmul(
            dweight,
            dout,
            Transpose::Yes,
            inp,
            Transpose::No,
            n,
            rows,
            k,
            Accumulate::Add,
        );
        if let Some(db) = dbias {
            // Summed from the operand `dout`, as the GPU's fused epilogue does.
            check(OP, "dbias", db.len(), n)?;
            tokens::column_sum(db, dout, rows, Accumulate::Add);
        }
        Ok(())
    }

    fn layernorm_forward(
        &mut self,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        inp: &[f32],
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu layernorm_forward";
        let NormShape { rows, channels: c } = shape;
        check_norm(OP, &stats, &p, shape)?;
        check(OP, "inp", inp.len(), rows * c)?;
        let (out, round) = match out {
            NormOut::F32(o) => (o, false),
            NormOut::Half(o) => (o, true),
        };
        check(OP, "out", out.len(), rows * c)?;
        layernorm_forward(
            out, stats.mean, stats.rstd, inp, p.weight, p.bias, rows, c, p.eps,
        );
        if round {
            self.round(out);
        }
        Ok(())
    }

    fn residual_layernorm_forward(
        &mut self,
        res: Residual<'_, Self>,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu residual_layernorm_forward";
        let NormShape { rows, channels: c } = shape;
        check_norm(OP, &stats, &p, shape)?;
        check(OP, "stream", res.stream.len(), rows * c)?;
        check(OP, "branch", res.branch.len(), rows * c)?;
        if let Some(g) = res.gamma {
            check(OP, "gamma", g.len(), c)?;
        }
        let (out, round) = match out {
            NormOut::F32(o) => (o, false),
            NormOut::Half(o) => (o, true),
        };
        check(OP, "out", out.len(), rows * c)?;
        residual_layernorm_forward(
            res.stream, out, stats.mean, stats.rstd, res.branch, res.gamma, p.weight, p.bias, rows,
            c, p.eps,
        );
        if round {
            self.round(out);
        }
        Ok(())
    }

    fn layernorm_backward(
        &mut self,
        dinp: &mut [f32],
        dinp_write: Accumulate,
        dweight: &mut [f32],
        dbias: &mut [f32],
        saved: LnSaved<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu layernorm_backward";
        let NormShape { rows, channels: c } = shape;
        for (what, len, want) in [
            ("dinp", dinp.len(), rows * c),
            ("dout", saved.dout.len(), rows * c),
            ("inp", saved.inp.len(), rows * c),
            ("mean", saved.mean.len(), rows),
            ("rstd", saved.rstd.len(), rows),
            ("weight", saved.weight.len(), c),
            ("dweight", dweight.len(), c),
            ("dbias", dbias.len(), c),
        ] {
            check(OP, what, len, want)?;
        }
        layernorm_backward(
            dinp,
            dweight,
            dbias,
            saved.dout,
            saved.inp,
            saved.weight,
            saved.mean,
            saved.rstd,
            rows,
            c,
            dinp_write,
        );
        Ok(())
    }

    fn attention_forward(
        &mut self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        shape: AttentionShape,
    ) -> Result<()> {
        const OP: &str = "cpu attention_forward";
        check(OP, "qkv", qkv.len(), shape.qkv_len())?;
        check(OP, "out", out.len(), shape.out_len())?;
        check(OP, "lse", lse.len(), shape.stats_len())?;
        let AttentionShape {
            batch,
            tokens,
            heads,
            head_dim,
        } = shape;
        attention_forward(out, lse, qkv, batch, tokens, heads, head_dim);
        self.round(out);
        Ok(())
    }

    fn attention_backward(
        &mut self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttentionShape,
    ) -> Result<()> {
        const OP: &str = "cpu attention_backward";
        check(OP, "dqkv", dqkv.len(), shape.qkv_len())?;
        check(OP, "qkv", qkv.len(), shape.qkv_len())?;
        check(OP, "dout", dout.len(), shape.out_len())?;
        check(OP, "out", out.len(), shape.out_len())?;
        check(OP, "lse", lse.len(), shape.stats_len())?;
        let AttentionShape {
            batch,
            tokens,
            heads,
            head_dim,
        } = shape;
        attention_backward(dqkv, dout, qkv, lse, batch, tokens, heads, head_dim);
        self.round(dqkv);
        Ok(())
    }

    fn gelu_backward(&mut self, dpre: &mut [f32], dact: &[f32], pre: &[f32]) -> Result<()> {
        const OP: &str = "cpu gelu_backward";
        check(OP, "dact", dact.len(), dpre.len())?;
        check(OP, "pre", pre.len(), dpre.len())?;
        gelu_backward(dpre, dact, pre);
        self.round(dpre);
        Ok(())
    }

    fn swiglu_forward(
        &mut self,
        gated: &mut [f32],
        x12: &[f32],
        rows: usize,
        width: usize,
    ) -> Result<()> {
        const OP: &str = "cpu swiglu_forward";
        check(OP, "gated", gated.len(), rows * width)?;
        check(OP, "x12", x12.len(), rows * 2 * width)?;
        swiglu_forward(gated, x12, rows, width);
        self.round(gated);
        Ok(())
    }

    fn swiglu_backward(
        &mut self,
        dx12: &mut [f32],
        dgated: &[f32],
        x12: &[f32],
        rows: usize,
        width: usize,
    ) -> Result<()> {
        const OP: &str = "cpu swiglu_backward";
        check(OP, "dx12", dx12.len(), rows * 2 * width)?;
        check(OP, "dgated", dgated.len(), rows * width)?;
        check(OP, "x12", x12.len(), rows * 2 * width)?;
        swiglu_backward(dx12, dgated, x12, rows, width);
        self.round(dx12);
        Ok(())
    }

    fn layerscale_backward(
        &mut self,
        dbranch: &mut [f32],
        dgamma: &mut [f32],
        dresidual: &[f32],
        branch: &[f32],
        gamma: &[f32],
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu layerscale_backward";
        let NormShape { rows, channels: c } = shape;
        for (what, len, want) in [
            ("dbranch", dbranch.len(), rows * c),
            ("dresidual", dresidual.len(), rows * c),
            ("branch", branch.len(), rows * c),
            ("gamma", gamma.len(), c),
            ("dgamma", dgamma.len(), c),
        ] {
            check(OP, what, len, want)?;
        }
        layerscale_backward(dbranch, dgamma, dresidual, branch, gamma, rows, c);
        self.round(dbranch);
        Ok(())
    }

    fn residual_add_samples(
        &mut self,
        x: &mut [f32],
        y: &[f32],
        gamma: Option<&[f32]>,
        subset: SampleSubset<'_, Self>,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "cpu residual_add_samples";
        let SampleSubset {
            kept,
            samples,
            batch,
            sample_len,
            channels,
        } = subset;
        check(OP, "x", x.len(), batch * sample_len)?;
        check(OP, "y", y.len(), samples * sample_len)?;
        if let Some(g) = gamma {
            check(OP, "gamma", g.len(), channels)?;
        }
        if let Some(k) = kept {
            check(OP, "kept", k.len(), samples)?;
            check_indices(OP, k, batch)?;
        } else if samples > batch {
            return Err(Error::shape(OP, format!("{samples} samples of {batch}")));
        }
        tokens::residual_add_samples(
            x, y, gamma, kept, samples, batch, sample_len, channels, alpha,
        );
        Ok(())
    }

    fn gather_samples_scaled(
        &mut self,
        out: &mut [f32],
        x: &[f32],
        kept: &[i64],
        sample_len: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "cpu gather_samples_scaled";
        check(OP, "out", out.len(), kept.len() * sample_len)?;
        let batch = rows_of(OP, "x", x.len(), sample_len)?;
        check_indices(OP, kept, batch)?;
        tokens::gather_samples_scaled(out, x, kept, sample_len, alpha);
        Ok(())
    }

    fn column_sum(
        &mut self,
        out: &mut [f32],
        x: &[f32],
        rows: usize,
        write: Accumulate,
    ) -> Result<()> {
        check("cpu column_sum", "x", x.len(), rows * out.len())?;
        tokens::column_sum(out, x, rows, write);
        Ok(())
    }

    fn assemble_tokens(
        &mut self,
        x: &mut [f32],
        pe: &[f32],
        cls: &[f32],
        reg: Option<&[f32]>,
        pos: &[f32],
        layout: TokenLayout,
    ) -> Result<()> {
        const OP: &str = "cpu assemble_tokens";
        let TokenLayout {
            batch,
            patches,
            registers,
            channels: d,
        } = layout;
        check(OP, "x", x.len(), batch * layout.tokens() * d)?;
        check(OP, "pe", pe.len(), batch * patches * d)?;
        check(OP, "cls", cls.len(), d)?;
        check(OP, "pos", pos.len(), (1 + patches) * d)?;
        match reg {
            Some(r) => check(OP, "reg", r.len(), registers * d)?,
            None if registers > 0 => {
                return Err(Error::shape(OP, "registers declared but none given"))
            }
            None => {}
        }
        tokens::assemble_tokens(x, pe, cls, reg, pos, layout);
        Ok(())
    }

    fn mask_token_substitute(
        &mut self,
        x: &mut [f32],
        masks: &[u8],
        token: &[f32],
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cpu mask_token_substitute";
        check(OP, "token", token.len(), channels)?;
        check(OP, "x", x.len(), masks.len() * channels)?;
        tokens::mask_token_substitute(x, masks, token);
        Ok(())
    }

    fn mask_token_backward(
        &mut self,
        dtoken: &mut [f32],
        dx: &mut [f32],
        masks: &[u8],
        channels: usize,
    ) -> Result<()> {
        const OP: &str = "cpu mask_token_backward";
        check(OP, "dtoken", dtoken.len(), channels)?;
        check(OP, "dx", dx.len(), masks.len() * channels)?;
        tokens::mask_token_backward(dtoken, dx, masks);
        Ok(())
    }

    fn gather_rows(
        &mut self,
        out: &mut [f32],
        tokens: &[f32],
        indices: &[i64],
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        const OP: &str = "cpu gather_rows";
        check_rows(OP, out.len(), tokens.len(), indices, indices_host, layout)?;
        tokens::gather_rows(out, tokens, indices, layout);
        Ok(())
    }

    fn scatter_rows_add(
        &mut self,
        dtokens: &mut [f32],
        dgathered: &[f32],
        indices: &[i64],
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        const OP: &str = "cpu scatter_rows_add";
        check_rows(
            OP,
            dgathered.len(),
            dtokens.len(),
            indices,
            indices_host,
            layout,
        )?;
        tokens::scatter_rows_add(dtokens, dgathered, indices, layout);
        Ok(())
    }

    fn l2_normalize_forward(
        &mut self,
        z: &mut [f32],
        z_half: &mut [f32],
        norm: &mut [f32],
        y: &[f32],
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu l2_normalize_forward";
        let NormShape { rows, channels: c } = shape;
        check(OP, "z", z.len(), rows * c)?;
        check(OP, "y", y.len(), rows * c)?;
        check(OP, "norm", norm.len(), rows)?;
        l2_normalize_forward(z, norm, y, eps, c);
        self.cast_to_half(z_half, z)
    }

    fn l2_normalize_backward(
        &mut self,
        dy: &mut [f32],
        dy_half: &mut [f32],
        dz: &[f32],
        z: &[f32],
        norm: &[f32],
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu l2_normalize_backward";
        let NormShape { rows, channels: c } = shape;
        check(OP, "dy", dy.len(), rows * c)?;
        check(OP, "dz", dz.len(), rows * c)?;
        check(OP, "z", z.len(), rows * c)?;
        check(OP, "norm", norm.len(), rows)?;
        l2_normalize_backward(dy, dz, z, norm, eps, c);
        self.cast_to_half(dy_half, dy)
    }

    fn weight_norm_forward(
        &mut self,
        w: &mut [f32],
        inv_norm: &mut [f32],
        g: &[f32],
        v: &[f32],
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu weight_norm_forward";
        let NormShape {
            rows: k,
            channels: bn,
        } = shape;
        check(OP, "w", w.len(), k * bn)?;
        check(OP, "v", v.len(), k * bn)?;
        check(OP, "g", g.len(), k)?;
        check(OP, "inv_norm", inv_norm.len(), k)?;
        weight_norm_forward(w, inv_norm, g, v, bn);
        Ok(())
    }

    fn weight_norm_backward(
        &mut self,
        dg: &mut [f32],
        dv: &mut [f32],
        dw: &[f32],
        g: &[f32],
        v: &[f32],
        inv_norm: &[f32],
        shape: NormShape,
    ) -> Result<()> {
        const OP: &str = "cpu weight_norm_backward";
        let NormShape {
            rows: k,
            channels: bn,
        } = shape;
        for (what, len, want) in [
            ("dg", dg.len(), k),
            ("g", g.len(), k),
            ("inv_norm", inv_norm.len(), k),
            ("dv", dv.len(), k * bn),
            ("dw", dw.len(), k * bn),
            ("v", v.len(), k * bn),
        ] {
            check(OP, what, len, want)?;
        }
        weight_norm_backward(dg, dv, dw, g, v, inv_norm, bn);
        Ok(())
    }

    fn pairs(&mut self, capacity: usize, pairs: usize) -> Result<CpuPairs> {
        self.allocations += 2;
        Ok(CpuPairs {
            pairs,
            rows: 0,
            teacher: vec![-1; capacity * pairs],
            weight: vec![0.0; capacity * pairs],
        })
    }

    fn set_pairs(
        &mut self,
        table: &mut CpuPairs,
        rows: usize,
        teacher: &[i32],
        weight: &[f32],
    ) -> Result<()> {
        const OP: &str = "cpu set_pairs";
        let n = rows * table.pairs;
        check(OP, "teacher", teacher.len(), n)?;
        check(OP, "weight", weight.len(), n)?;
        if n > table.teacher.len() {
            return Err(Error::shape(
                OP,
                format!("{rows} rows exceed the table's capacity"),
            ));
        }
        table.teacher[..n].copy_from_slice(teacher);
        table.weight[..n].copy_from_slice(weight);
        table.rows = rows;
        Ok(())
    }

    fn teacher_softmax(
        &mut self,
        probs: &mut [f32],
        logits: &[f32],
        center: Option<&[f32]>,
        temp: f32,
        k: usize,
    ) -> Result<()> {
        let rows = rows_of("cpu teacher_softmax", "logits", logits.len(), k)?;
        softmax_centered_forward(probs, logits, center, rows, k, temp)
    }

    fn center_ema(
        &mut self,
        next: &mut [f32],
        logits: &[f32],
        center: &[f32],
        momentum: f64,
        k: usize,
    ) -> Result<()> {
        let rows = rows_of("cpu center_ema", "logits", logits.len(), k)?;
        self.copy_f32(next, center)?;
        center_update(next, logits, rows, k, momentum as f32)
    }

    fn softmax_cross_entropy(
        &mut self,
        loss: &mut [f32],
        ds: &mut [f32],
        s: &[f32],
        probs: &[f32],
        table: &CpuPairs,
        student_temp: f32,
        grad_scale: f32,
        k: usize,
    ) -> Result<()> {
        let rows = table.rows;
        let n = rows * table.pairs;
        let mut row_loss = vec![0f32; rows];
        paired_cross_entropy(
            &mut row_loss,
            ds,
            s,
            probs,
            &table.teacher[..n],
            &table.weight[..n],
            table.pairs,
            k,
            student_temp,
            grad_scale,
        )?;
        let total: f64 = row_loss.iter().map(|&v| v as f64).sum();
        one_scalar("cpu softmax_cross_entropy", loss, total as f32)
    }

    fn mean_row_entropy(&mut self, out: &mut [f32], probs: &[f32], k: usize) -> Result<()> {
        rows_of("cpu mean_row_entropy", "probs", probs.len(), k)?;
        one_scalar("cpu mean_row_entropy", out, mean_row_entropy(probs, k))
    }

    fn sinkhorn_knopp(
        &mut self,
        q: &mut [f32],
        logits: &[f32],
        k: usize,
        temp: f32,
        iterations: usize,
    ) -> Result<()> {
        let rows = rows_of("cpu sinkhorn_knopp", "logits", logits.len(), k)?;
        sinkhorn_knopp(q, logits, rows, k, temp, iterations)
    }

    fn koleo_state(&mut self, _b: usize, _d: usize) -> Result<KoleoSaved> {
        self.allocations += 1;
        Ok(KoleoSaved::default())
    }

    fn koleo_forward(
        &mut self,
        loss: &mut [f32],
        state: &mut KoleoSaved,
        x: &[f32],
        b: usize,
        d: usize,
    ) -> Result<()> {
        let v = koleo_forward(state, x, b, d)?;
        one_scalar("cpu koleo_forward", loss, v)
    }

    fn koleo_backward(
        &mut self,
        dx: &mut [f32],
        state: &KoleoSaved,
        weight: f32,
        b: usize,
        d: usize,
    ) -> Result<()> {
        koleo_backward(dx, state, weight, b, d, Accumulate::Overwrite)
    }

    fn segments(
        &mut self,
        starts: &[usize],
        groups: &[usize],
        n_groups: usize,
        numel: usize,
    ) -> Result<CpuSegments> {
        const OP: &str = "cpu segments";
        check(OP, "groups", groups.len(), starts.len())?;
        let ok = starts.first().is_none_or(|&s| s == 0)
            && starts.windows(2).all(|w| w[0] < w[1])
            && starts.last().is_none_or(|&s| s < numel.max(1))
            && groups.iter().all(|&g| g < n_groups);
        if !ok {
            return Err(Error::shape(
                OP,
                format!("segments {starts:?} / groups {groups:?} do not tile {numel} values in {n_groups} groups"),
            ));
        }
        let segments = starts
            .iter()
            .zip(groups)
            .enumerate()
            .map(|(i, (&s, &g))| {
                let end = starts.get(i + 1).copied().unwrap_or(numel);
                (s, end - s, g)
            })
            .collect();
        Ok(CpuSegments {
            segments,
            groups: n_groups,
            numel,
        })
    }

    fn adamw_update(
        &mut self,
        bufs: AdamWBuffers<'_, Self>,
        segments: &CpuSegments,
        group_lr: &[f32],
        group_wd: &[f32],
        hp: AdamWStep,
    ) -> Result<()> {
        const OP: &str = "cpu adamw_update";
        check(OP, "params", bufs.params.len(), segments.numel)?;
        check(OP, "group_lr", group_lr.len(), segments.groups)?;
        check(OP, "group_wd", group_wd.len(), segments.groups)?;
        let segs: Vec<AdamwSegment> = segments
            .segments
            .iter()
            .map(|&(offset, len, g)| AdamwSegment {
                offset,
                len,
                lr: group_lr[g],
                weight_decay: group_wd[g],
            })
            .collect();
        let hyper = AdamHyper {
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
        };
        adamw_step_segments(
            bufs.params,
            bufs.grads,
            bufs.exp_avg,
            bufs.exp_avg_sq,
            &segs,
            &hyper,
            hp.step,
        )
    }

    fn ema_update(&mut self, teacher: &mut [f32], student: &[f32], momentum: f64) -> Result<()> {
        ema_update(teacher, student, momentum)
    }

    fn clip_grad_norm(&mut self, grads: &mut [f32], norm: &mut [f32], max_norm: f32) -> Result<()> {
        let sum_sq: f64 = grads
            .par_chunks(1 << 15)
            .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
            .sum();
        let n = sum_sq.sqrt();
        one_scalar("cpu clip_grad_norm", norm, n as f32)?;
        if !n.is_finite() {
            return Ok(());
        }
        let coef = (max_norm as f64 / (n + crate::backend::CLIP_EPS)).min(1.0) as f32;
        if coef < 1.0 {
            grads.par_iter_mut().for_each(|g| *g *= coef);
        }
        Ok(())
    }
}

fn upload<T: Copy>(dst: &mut [T], src: &[T]) -> Result<()> {
    if src.len() > dst.len() {
        return Err(Error::shape(
            "cpu upload",
            format!("{} values into a buffer of {}", src.len(), dst.len()),
        ));
    }
    dst[..src.len()].copy_from_slice(src);
    Ok(())
}

fn check_norm(
    op: &'static str,
    stats: &LnStats<'_, CpuBackend>,
    p: &LnParams<'_, CpuBackend>,
    shape: NormShape,
) -> Result<()> {
    check(op, "mean", stats.mean.len(), shape.rows)?;
    check(op, "rstd", stats.rstd.len(), shape.rows)?;
    check(op, "weight", p.weight.len(), shape.channels)?;
    check(op, "bias", p.bias.len(), shape.channels)
}

/// Unique indices below `limit`.
fn check_indices(op: &'static str, kept: &[i64], limit: usize) -> Result<()> {
    let mut seen = vec![false; limit];
    for &i in kept {
        if i < 0 || i as usize >= limit || std::mem::replace(&mut seen[i as usize], true) {
            return Err(Error::shape(
                op,
                format!("sample index {i} repeated or outside 0..{limit}"),
            ));
        }
    }
    Ok(())
}

fn check_rows(
    op: &'static str,
    gathered: usize,
    tokens: usize,
    indices: &[i64],
    host: &[i64],
    layout: PatchLayout,
) -> Result<()> {
    if indices != host {
        return Err(Error::shape(op, "device and host indices differ"));
    }
    layout.check(op, host)?;
    check(op, "gathered", gathered, host.len() * layout.channels)?;
    check(
        op,
        "tokens",
        tokens,
        layout.crops * layout.tokens * layout.channels,
    )
}
