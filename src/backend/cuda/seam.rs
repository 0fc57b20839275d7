//! [`CudaBackend`] behind the [`Backend`] seam: each operation maps onto its launcher(s).
//!
//! GEMM operands are bf16 ([`Precision::Bf16`] is the only precision this backend runs). Where
//! cuBLASLt cannot fuse an epilogue (or write bf16 directly) the fallback pass runs here, on
//! work buffers the backend owns and reuses ([`Work`]), so the model never sees it.

use super::{
    bf16, CrossEntropyPairs, CudaBackend, DevBuf, EpilogueRun, GemmShape, GradWrite, KoleoSaved,
    LtOutcome, ParamSegments,
};
use crate::backend::{
    Accumulate, AdamWBuffers, AdamWStep, AttentionShape, Backend, Counters, Gemm, GemmBatch,
    InputGrad, LinearDims, LinearOut, LnParams, LnSaved, LnStats, NormOut, NormShape, PatchLayout,
    Precision, Residual, SampleSubset, Storage, TokenLayout, Transpose, WeightStore,
};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// One model's parameters on the device: f32 master and the bf16 copy the GEMMs read.
#[derive(Debug)]
pub struct CudaWeights {
    pub master: CudaSlice<f32>,
    pub bf16: CudaSlice<bf16>,
}

impl WeightStore<CudaBackend> for CudaWeights {
    fn f32(&self) -> &CudaSlice<f32> {
        &self.master
    }
    fn f32_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.master
    }
    fn half(&self) -> &CudaSlice<bf16> {
        &self.bf16
    }
}

/// The backend's own f32 work buffers (fallback passes, per-row losses, Sinkhorn's scaling
/// vectors, the attention backward's row sums): grown on demand, counted, then reused.
#[derive(Debug, Default)]
pub(super) struct Work {
    slots: [Option<CudaSlice<f32>>; 2],
}

/// Which work buffer an operation takes.
#[derive(Clone, Copy)]
enum Slot {
    A = 0,
    B = 1,
}

impl CudaBackend {
    /// Takes work buffer `slot` with at least `len` values (put it back with [`Self::put_work`]).
    fn take_work(&mut self, slot: Slot, len: usize) -> Result<CudaSlice<f32>> {
        match self.work.slots[slot as usize].take() {
            Some(buf) if buf.len() >= len.max(1) => Ok(buf),
            _ => {
                self.allocations += 1;
                self.alloc_zeros(len.max(1).next_power_of_two())
            }
        }
    }

    fn put_work(&mut self, slot: Slot, buf: CudaSlice<f32>) {
        self.work.slots[slot as usize] = Some(buf);
    }

    /// Runs `f` with the first `len` values of work buffer `slot`.
    fn with_work<R>(
        &mut self,
        slot: Slot,
        len: usize,
        f: impl FnOnce(&mut Self, &mut CudaSlice<f32>) -> Result<R>,
    ) -> Result<R> {
        let mut buf = self.take_work(slot, len)?;
        let result = match buf.window_mut(0..len) {
            Ok(mut w) => f(self, &mut w),
            Err(e) => Err(e),
        };
        self.put_work(slot, buf);
        result
    }

    fn counted<T: DeviceRepr + ValidAsZeroBits>(&mut self, len: usize) -> Result<DevBuf<T>> {
        self.allocations += 1;
        // CUDA refuses empty allocations: one element, of which callers see an empty window.
        let buf = self.alloc_zeros::<T>(len.max(1))?;
        Ok(DevBuf(buf))
    }

    fn upload_prefix<T: DeviceRepr>(&self, dst: &mut CudaSlice<T>, src: &[T]) -> Result<()> {
        if src.len() > dst.len() {
            return Err(Error::shape(
                "cuda upload",
                format!("{} values into a buffer of {}", src.len(), dst.len()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.stream()
            .memcpy_htod(src, dst)
            .map_err(|e| super::cuda_error("cuMemcpyHtoD", e))
    }
}

fn write_code(acc: Accumulate) -> GradWrite {
    match acc {
        Accumulate::Overwrite => GradWrite::Overwrite,
        Accumulate::Add => GradWrite::Accumulate,
    }
}

fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || len % c != 0 {
        return Err(Error::shape(
            op,
            format!("{what} holds {len} values, not a whole number of rows of {c}"),
        ));
    }
    Ok(len / c)
}

impl Backend for CudaBackend {
    type F32 = CudaSlice<f32>;
    type Half = CudaSlice<bf16>;
    type I64 = CudaSlice<i64>;
    type U8 = CudaSlice<u8>;
    type BufF32 = DevBuf<f32>;
    type BufHalf = DevBuf<bf16>;
    type BufI64 = DevBuf<i64>;
    type BufU8 = DevBuf<u8>;
    type Weights = CudaWeights;
    type Pairs = CrossEntropyPairs;
    type Segments = ParamSegments;
    type Koleo = KoleoSaved;

    fn describe(&self) -> String {
        CudaBackend::describe(self)
            .map(|d| format!("cuda ({d})"))
            .unwrap_or_else(|_| "cuda".to_string())
    }

    fn precision(&self) -> Precision {
        Precision::Bf16
    }

    fn counters(&self) -> Counters {
        Counters {
            allocations: self.allocations,
            kernel_launches: Some(self.kernel_launches()),
            gemms: Some(self.gemm_stats()),
        }
    }

    fn synchronize(&mut self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn memory_in_use(&self) -> Option<u64> {
        self.stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| total.saturating_sub(free) as u64)
    }

    fn alloc_f32(&mut self, len: usize) -> Result<DevBuf<f32>> {
        self.counted(len)
    }

    fn alloc_half(&mut self, len: usize) -> Result<DevBuf<bf16>> {
        self.counted(len)
    }

    fn alloc_i64(&mut self, len: usize) -> Result<DevBuf<i64>> {
        self.counted(len)
    }

    fn alloc_u8(&mut self, len: usize) -> Result<DevBuf<u8>> {
        self.counted(len)
    }

    fn upload_f32(&mut self, dst: &mut CudaSlice<f32>, src: &[f32]) -> Result<()> {
        self.upload_prefix(dst, src)
    }

    fn upload_half(&mut self, dst: &mut CudaSlice<bf16>, src: &[f32]) -> Result<()> {
        let rounded: Vec<bf16> = src.iter().map(|&v| bf16::from_f32(v)).collect();
        self.upload_prefix(dst, &rounded)
    }

    fn upload_i64(&mut self, dst: &mut CudaSlice<i64>, src: &[i64]) -> Result<()> {
        self.upload_prefix(dst, src)
    }

    fn upload_u8(&mut self, dst: &mut CudaSlice<u8>, src: &[u8]) -> Result<()> {
        self.upload_prefix(dst, src)
    }

    fn download_f32(&mut self, src: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.download(src)
    }

    fn download_half(&mut self, src: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        self.download_bf16(src)
    }

    fn copy_f32(&mut self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::shape(
                "cuda copy",
                format!("{} values into {}", src.len(), dst.len()),
            ));
        }
        self.stream()
            .memcpy_dtod(src, dst)
            .map_err(|e| super::cuda_error("cuMemcpyDtoD", e))
    }

    fn zero_f32(&mut self, dst: &mut CudaSlice<f32>) -> Result<()> {
        self.stream()
            .memset_zeros(dst)
            .map_err(|e| super::cuda_error("cuMemsetD8", e))
    }

    fn weights(&mut self, host: &[f32]) -> Result<CudaWeights> {
        self.allocations += 2;
        let master = self.upload(host)?;
        let mut w = CudaWeights {
            master,
            bf16: self.alloc_zeros::<bf16>(host.len().max(1))?,
        };
        if host.is_empty() {
            return Ok(w);
        }
        self.refresh_weights(&mut w)?;
        Ok(w)
    }

    fn refresh_weights(&mut self, w: &mut CudaWeights) -> Result<()> {
        if w.master.is_empty() {
            return Ok(());
        }
        let n = w.master.len();
        let mut half = w.bf16.window_mut(0..n)?;
        self.cast_f32_to_bf16(&mut half, &w.master)
    }

    fn cast_to_half(&mut self, out: &mut CudaSlice<bf16>, inp: &CudaSlice<f32>) -> Result<()> {
        self.cast_f32_to_bf16(out, inp)
    }

    fn cast_to_f32(&mut self, out: &mut CudaSlice<f32>, inp: &CudaSlice<bf16>) -> Result<()> {
        self.cast_bf16_to_f32(out, inp)
    }

    fn matmul(
        &mut self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        g: Gemm,
    ) -> Result<()> {
        self.matmul_bf16(c, a, g.ta, b, g.tb, g.m, g.k, g.n, g.acc)
    }

    fn matmul_f32(
        &mut self,
        c: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        g: GemmBatch,
    ) -> Result<()> {
        let shape = GemmShape {
            m: g.gemm.m,
            k: g.gemm.k,
            n: g.gemm.n,
            batch: g.batch,
            stride_a: g.stride_a,
            stride_b: g.stride_b,
            stride_c: g.stride_c,
        };
        self.matmul_f32_batched(c, a, g.gemm.ta, b, g.gemm.tb, shape, g.gemm.acc)
    }

    fn linear_forward(
        &mut self,
        out: LinearOut<'_, Self>,
        inp: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        bias: Option<&CudaSlice<f32>>,
        dims: LinearDims,
    ) -> Result<()> {
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        let yes = Transpose::Yes;
        match out {
            LinearOut::F32(y) => self.matmul_bf16_bias(y, inp, weight, yes, bias, rows, k, n),
            LinearOut::Half(y) => {
                let direct = self.matmul_bf16_to_bf16(y, inp, weight, yes, bias, rows, k, n)?;
                if direct == LtOutcome::Unsupported {
                    // f32 result (bias included) rounded once, through a work buffer.
                    self.with_work(Slot::A, rows * n, |gpu, f32_out| {
                        gpu.matmul_bf16_bias(f32_out, inp, weight, yes, bias, rows, k, n)?;
                        gpu.cast_f32_to_bf16(y, f32_out)
                    })?;
                }
                Ok(())
            }
            LinearOut::Gelu { pre, act } => {
                let run = self.matmul_bf16_try_bias(pre, inp, weight, yes, bias, rows, k, n)?;
                let left = match run {
                    EpilogueRun::Fused => None,
                    EpilogueRun::Separate => bias,
                };
                self.bias_gelu_forward(pre, act, left, rows, n)
            }
        }
    }

    fn linear_input_grad(
        &mut self,
        dinp: InputGrad<'_, Self>,
        dout: &CudaSlice<bf16>,
        weight: &CudaSlice<bf16>,
        dims: LinearDims,
    ) -> Result<()> {
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        let no = Transpose::No;
        match dinp {
            InputGrad::F32(dx, acc) => self.matmul_bf16(dx, dout, no, weight, no, rows, n, k, acc),
            InputGrad::Half(dx) => {
                let direct = self.matmul_bf16_to_bf16(dx, dout, weight, no, None, rows, n, k)?;
                if direct == LtOutcome::Unsupported {
                    self.with_work(Slot::A, rows * k, |gpu, f32_out| {
                        let acc = Accumulate::Overwrite;
                        gpu.matmul_bf16(f32_out, dout, no, weight, no, rows, n, k, acc)?;
                        gpu.cast_f32_to_bf16(dx, f32_out)
                    })?;
                }
                Ok(())
            }
        }
    }

    fn linear_param_grads(
        &mut self,
        dweight: &mut CudaSlice<f32>,
        dbias: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<bf16>,
        dout_f32: Option<&CudaSlice<f32>>,
        inp: &CudaSlice<bf16>,
        dims: LinearDims,
    ) -> Result<()> {
        let LinearDims {
            rows,
            in_dim: k,
            out_dim: n,
        } = dims;
        let (yes, no, add) = (Transpose::Yes, Transpose::No, Accumulate::Add);
        let Some(db) = dbias else {
            self.matmul_bf16_with_row_sums(dweight, dout, yes, inp, no, n, rows, k, add, None)?;
            return Ok(());
        };
        let run =
            self.matmul_bf16_with_row_sums(dweight, dout, yes, inp, no, n, rows, k, add, Some(db))?;
        if run == EpilogueRun::Separate {
            match dout_f32 {
                Some(ready) => self.bias_backward(db, ready, rows, n)?,
                None => self.with_work(Slot::A, rows * n, |gpu, wide| {
                    gpu.cast_bf16_to_f32(wide, dout)?;
                    gpu.bias_backward(db, wide, rows, n)
                })?,
            }
        }
        Ok(())
    }

    fn layernorm_forward(
        &mut self,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        inp: &CudaSlice<f32>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        let LnStats { mean, rstd } = stats;
        let (w, b, eps) = (p.weight, p.bias, p.eps);
        match out {
            NormOut::F32(o) => {
                CudaBackend::layernorm_forward(self, o, mean, rstd, inp, w, b, shape, eps)
            }
            NormOut::Half(o) => {
                CudaBackend::layernorm_forward(self, o, mean, rstd, inp, w, b, shape, eps)
            }
        }
    }

    fn residual_layernorm_forward(
        &mut self,
        res: Residual<'_, Self>,
        out: NormOut<'_, Self>,
        stats: LnStats<'_, Self>,
        p: LnParams<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        let LnStats { mean, rstd } = stats;
        let Residual {
            stream,
            branch,
            gamma,
        } = res;
        let (w, b, eps) = (p.weight, p.bias, p.eps);
        match out {
            NormOut::F32(o) => CudaBackend::residual_layernorm_forward(
                self, stream, o, mean, rstd, branch, gamma, w, b, shape, eps,
            ),
            NormOut::Half(o) => CudaBackend::residual_layernorm_forward(
                self, stream, o, mean, rstd, branch, gamma, w, b, shape, eps,
            ),
        }
    }

    fn layernorm_backward(
        &mut self,
        dinp: &mut CudaSlice<f32>,
        dinp_write: Accumulate,
        dweight: &mut CudaSlice<f32>,
        dbias: &mut CudaSlice<f32>,
        saved: LnSaved<'_, Self>,
        shape: NormShape,
    ) -> Result<()> {
        let LnSaved {
            dout,
            inp,
            weight,
            mean,
            rstd,
        } = saved;
        let write = write_code(dinp_write);
        CudaBackend::layernorm_backward(
            self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, shape, write,
        )
    }

    fn attention_forward(
        &mut self,
        out: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<f32>,
        qkv: &CudaSlice<bf16>,
        shape: AttentionShape,
    ) -> Result<()> {
        CudaBackend::attention_forward(self, out, lse, qkv, shape)
    }

    fn attention_backward(
        &mut self,
        dqkv: &mut CudaSlice<bf16>,
        dout: &CudaSlice<bf16>,
        qkv: &CudaSlice<bf16>,
        out: &CudaSlice<bf16>,
        lse: &CudaSlice<f32>,
        shape: AttentionShape,
    ) -> Result<()> {
        self.with_work(Slot::B, shape.stats_len(), |gpu, delta| {
            CudaBackend::attention_backward(gpu, dqkv, delta, dout, qkv, out, lse, shape)
        })
    }

    fn gelu_backward(
        &mut self,
        dpre: &mut CudaSlice<bf16>,
        dact: &CudaSlice<f32>,
        pre: &CudaSlice<f32>,
    ) -> Result<()> {
        CudaBackend::gelu_backward(self, dpre, dact, pre)
    }

    fn swiglu_forward(
        &mut self,
        gated: &mut CudaSlice<bf16>,
        x12: &CudaSlice<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        CudaBackend::swiglu_forward(self, gated, x12, rows, width)
    }

    fn swiglu_backward(
        &mut self,
        dx12: &mut CudaSlice<bf16>,
        dgated: &CudaSlice<f32>,
        x12: &CudaSlice<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        CudaBackend::swiglu_backward(self, dx12, dgated, x12, rows, width)
    }

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
        CudaBackend::layerscale_backward(
            self, dbranch, dgamma, dresidual, branch, gamma, rows, channels,
        )
    }

    fn residual_add_samples(
        &mut self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        gamma: Option<&CudaSlice<f32>>,
        subset: SampleSubset<'_, Self>,
        alpha: f32,
    ) -> Result<()> {
        let SampleSubset {
            kept,
            samples,
            batch,
            sample_len,
            channels,
        } = subset;
        let kept = super::KeptSamples { kept, samples };
        CudaBackend::residual_add_samples(
            self, x, y, gamma, kept, batch, sample_len, channels, alpha,
        )
    }

    fn gather_samples_scaled(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        kept: &CudaSlice<i64>,
        sample_len: usize,
        alpha: f32,
    ) -> Result<()> {
        let batch = rows_of("cuda gather_samples_scaled", "x", x.len(), sample_len)?;
        CudaBackend::gather_samples_scaled(self, out, x, kept, batch, sample_len, alpha)
    }

    fn column_sum(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rows: usize,
        write: Accumulate,
    ) -> Result<()> {
        let c = out.len();
        CudaBackend::column_sum(self, out, x, None, rows, c, write_code(write))
    }

    fn assemble_tokens(
        &mut self,
        x: &mut CudaSlice<f32>,
        pe: &CudaSlice<f32>,
        cls: &CudaSlice<f32>,
        reg: Option<&CudaSlice<f32>>,
        pos: &CudaSlice<f32>,
        layout: TokenLayout,
    ) -> Result<()> {
        CudaBackend::assemble_tokens(self, x, pe, cls, reg, pos, layout)
    }

    fn mask_token_substitute(
        &mut self,
        x: &mut CudaSlice<f32>,
        masks: &CudaSlice<u8>,
        token: &CudaSlice<f32>,
        channels: usize,
    ) -> Result<()> {
        let rows = masks.len();
        CudaBackend::mask_token_substitute(self, x, masks, token, rows, channels)
    }

    fn mask_token_backward(
        &mut self,
        dtoken: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        masks: &CudaSlice<u8>,
        channels: usize,
    ) -> Result<()> {
        let rows = masks.len();
        CudaBackend::mask_token_backward(self, dtoken, dx, masks, rows, channels)
    }

    fn gather_rows(
        &mut self,
        out: &mut CudaSlice<f32>,
        tokens: &CudaSlice<f32>,
        indices: &CudaSlice<i64>,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        self.gather_masked_patches(out, tokens, indices, indices_host, layout)
    }

    fn scatter_rows_add(
        &mut self,
        dtokens: &mut CudaSlice<f32>,
        dgathered: &CudaSlice<f32>,
        indices: &CudaSlice<i64>,
        indices_host: &[i64],
        layout: PatchLayout,
    ) -> Result<()> {
        self.scatter_masked_patches_add(dtokens, dgathered, indices, indices_host, layout)
    }

    fn l2_normalize_forward(
        &mut self,
        z: &mut CudaSlice<f32>,
        z_half: &mut CudaSlice<bf16>,
        norm: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        CudaBackend::l2_normalize_forward(self, z, z_half, norm, y, eps, rows, channels)
    }

    fn l2_normalize_backward(
        &mut self,
        dy: &mut CudaSlice<f32>,
        dy_half: &mut CudaSlice<bf16>,
        dz: &CudaSlice<f32>,
        z: &CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        eps: f32,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        CudaBackend::l2_normalize_backward(self, dy, dy_half, dz, z, norm, eps, rows, channels)
    }

    fn weight_norm_forward(
        &mut self,
        w: &mut CudaSlice<f32>,
        inv_norm: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        CudaBackend::weight_norm_forward(self, w, inv_norm, g, v, rows, channels)
    }

    fn weight_norm_backward(
        &mut self,
        dg: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        dw: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        inv_norm: &CudaSlice<f32>,
        shape: NormShape,
    ) -> Result<()> {
        let NormShape { rows, channels } = shape;
        CudaBackend::weight_norm_backward(self, dg, dv, dw, g, v, inv_norm, rows, channels)
    }

    fn pairs(&mut self, capacity: usize, pairs: usize) -> Result<CrossEntropyPairs> {
        self.allocations += 2;
        let n = capacity.max(1) * pairs;
        let mut table =
            CrossEntropyPairs::new(self, capacity.max(1), pairs, &vec![-1; n], &vec![0.0; n])?;
        table.student_rows = 0;
        Ok(table)
    }

    fn set_pairs(
        &mut self,
        table: &mut CrossEntropyPairs,
        rows: usize,
        teacher: &[i32],
        weight: &[f32],
    ) -> Result<()> {
        const OP: &str = "cuda set_pairs";
        let n = rows * table.pairs;
        if teacher.len() != n || weight.len() != n || n > table.teacher.len() {
            return Err(Error::shape(
                OP,
                format!(
                    "{rows} rows of {} pairs ({} / {} values) for a table of {}",
                    table.pairs,
                    teacher.len(),
                    weight.len(),
                    table.teacher.len()
                ),
            ));
        }
        self.upload_prefix(&mut table.teacher, teacher)?;
        self.upload_prefix(&mut table.weight, weight)?;
        table.student_rows = rows;
        Ok(())
    }

    fn teacher_softmax(
        &mut self,
        probs: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        center: Option<&CudaSlice<f32>>,
        temp: f32,
        k: usize,
    ) -> Result<()> {
        let rows = rows_of("cuda teacher_softmax", "logits", logits.len(), k)?;
        CudaBackend::teacher_softmax(self, probs, logits, center, temp, rows, k)
    }

    fn center_ema(
        &mut self,
        next: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        center: &CudaSlice<f32>,
        momentum: f64,
        k: usize,
    ) -> Result<()> {
        let rows = rows_of("cuda center_ema", "logits", logits.len(), k)?;
        CudaBackend::center_ema(self, next, logits, center, momentum, rows, k)
    }

    fn softmax_cross_entropy(
        &mut self,
        loss: &mut CudaSlice<f32>,
        ds: &mut CudaSlice<f32>,
        s: &CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        table: &CrossEntropyPairs,
        student_temp: f32,
        grad_scale: f32,
        k: usize,
    ) -> Result<()> {
        let rows = table.student_rows;
        if rows == 0 {
            return self.zero_f32(loss);
        }
        let teacher_rows = rows_of("cuda softmax_cross_entropy", "probs", probs.len(), k)?;
        self.with_work(Slot::A, rows, |gpu, row_loss| {
            CudaBackend::softmax_cross_entropy(
                gpu,
                loss,
                row_loss,
                ds,
                s,
                probs,
                table,
                student_temp,
                grad_scale,
                teacher_rows,
                k,
            )
        })
    }

    fn mean_row_entropy(
        &mut self,
        out: &mut CudaSlice<f32>,
        probs: &CudaSlice<f32>,
        k: usize,
    ) -> Result<()> {
        let rows = rows_of("cuda mean_row_entropy", "probs", probs.len(), k)?;
        self.with_work(Slot::A, rows, |gpu, row| {
            CudaBackend::mean_row_entropy(gpu, out, row, probs, rows, k)
        })
    }

    fn sinkhorn_knopp(
        &mut self,
        q: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        k: usize,
        temp: f32,
        iterations: usize,
    ) -> Result<()> {
        let rows = rows_of("cuda sinkhorn_knopp", "logits", logits.len(), k)?;
        let mut b = self.take_work(Slot::B, rows)?;
        let result = self.with_work(Slot::A, k, |gpu, a| {
            let mut b = b.window_mut(0..rows)?;
            CudaBackend::sinkhorn_knopp(gpu, q, a, &mut b, logits, rows, k, temp, rows, iterations)
        });
        self.put_work(Slot::B, b);
        result
    }

    fn koleo_state(&mut self, b: usize, d: usize) -> Result<KoleoSaved> {
        self.allocations += 5;
        KoleoSaved::new(self, b, d)
    }

    fn koleo_forward(
        &mut self,
        loss: &mut CudaSlice<f32>,
        state: &mut KoleoSaved,
        x: &CudaSlice<f32>,
        b: usize,
        d: usize,
    ) -> Result<()> {
        CudaBackend::koleo_forward(self, loss, state, x, b, d)
    }

    fn koleo_backward(
        &mut self,
        dx: &mut CudaSlice<f32>,
        state: &KoleoSaved,
        weight: f32,
        b: usize,
        d: usize,
    ) -> Result<()> {
        CudaBackend::koleo_backward(self, dx, state, weight, b, d)
    }

    fn segments(
        &mut self,
        starts: &[usize],
        groups: &[usize],
        n_groups: usize,
        numel: usize,
    ) -> Result<ParamSegments> {
        self.allocations += 2;
        ParamSegments::new(self, starts, groups, n_groups, numel)
    }

    fn adamw_update(
        &mut self,
        bufs: AdamWBuffers<'_, Self>,
        segments: &ParamSegments,
        group_lr: &CudaSlice<f32>,
        group_wd: &CudaSlice<f32>,
        hp: AdamWStep,
    ) -> Result<()> {
        let AdamWBuffers {
            params,
            exp_avg,
            exp_avg_sq,
            grads,
        } = bufs;
        CudaBackend::adamw_update(
            self, params, exp_avg, exp_avg_sq, grads, segments, group_lr, group_wd, hp,
        )
    }

    fn ema_update(
        &mut self,
        teacher: &mut CudaSlice<f32>,
        student: &CudaSlice<f32>,
        momentum: f64,
    ) -> Result<()> {
        CudaBackend::ema_update(self, teacher, student, momentum)
    }

    fn clip_grad_norm(
        &mut self,
        grads: &mut CudaSlice<f32>,
        norm: &mut CudaSlice<f32>,
        max_norm: f32,
    ) -> Result<()> {
        CudaBackend::clip_grad_norm(self, grads, norm, max_norm)
    }
}
