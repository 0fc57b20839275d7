//! [`CpuBackend`]: the [`Backend`] seam on the CPU, over the kernels of this folder.
//!
//! Buffers are plain `Vec`s and windows plain slices. GEMM operands ([`Backend::Half`]) are f32;
//! under [`Precision::Bf16`] every value written into an operand buffer is rounded to the nearest
//! bf16 (ties to even), at the places the CUDA backend rounds, so a CPU run reproduces a GPU
//! run's roundings (the products themselves stay f32: a product of two bf16 values is exact in
//! f32). The golden fixtures run in [`Precision::F32`].

use crate::backend::{check_len, Buffers, Counters, Precision, WeightStore};
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
    pub(super) allocations: u64,
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
    pub(super) fn round(&self, x: &mut [f32]) {
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
    pub(super) pairs: usize,
    pub(super) rows: usize,
    pub(super) teacher: Vec<i32>,
    pub(super) weight: Vec<f32>,
}

/// AdamW segments: `(start, len, group)`.
#[derive(Clone, Debug)]
pub struct CpuSegments {
    pub(super) segments: Vec<(usize, usize, usize)>,
    pub(super) groups: usize,
    pub(super) numel: usize,
}

/// `len / c` when `c` divides `len`, for row counts implied by a buffer.
pub(super) fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || len % c != 0 {
        return Err(Error::shape(
            op,
            format!("{what} holds {len} values, not a whole number of rows of {c}"),
        ));
    }
    Ok(len / c)
}

/// `out[r] += bias` for every row of `out [rows, n]`.
pub(super) fn add_bias(out: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    out.par_chunks_mut(ROWS_PER_TASK * n).for_each(|chunk| {
        for row in chunk.chunks_mut(n) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    });
}

pub(super) fn one_scalar(op: &'static str, out: &mut [f32], v: f32) -> Result<()> {
    check_len(op, "out", out.len(), 1)?;
    out[0] = v;
    Ok(())
}

impl Buffers for CpuBackend {
    type F32 = [f32];

    type Half = [f32];

    type I64 = [i64];

    type U8 = [u8];

    type BufF32 = Vec<f32>;

    type BufHalf = Vec<f32>;

    type BufI64 = Vec<i64>;

    type BufU8 = Vec<u8>;

    type Weights = CpuWeights;

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
        check_len("copy_f32", "src", src.len(), dst.len())?;
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
}

pub(super) fn upload<T: Copy>(dst: &mut [T], src: &[T]) -> Result<()> {
    if src.len() > dst.len() {
        return Err(Error::shape(
            "cpu upload",
            format!("{} values into a buffer of {}", src.len(), dst.len()),
        ));
    }
    dst[..src.len()].copy_from_slice(src);
    Ok(())
}
