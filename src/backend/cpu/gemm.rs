//! Row-major single-precision GEMM on the CPU, through the `gemm` crate (AVX-512 / AVX2 kernels
//! chosen at run time; see `CPU.md` for measured rates).
//!
//! Every matrix is a contiguous row-major slice. `Transpose::Yes` means the operand is *stored*
//! transposed, e.g. a `Linear` weight `[out, in]` used as the right operand of `x · Wᵀ`.

use super::backend::{add_bias, CpuBackend};
use super::elementwise::gelu;
use crate::backend::{
    check_len, ElementwiseOps, Gemm, GemmBatch, GemmOps, InputGrad, LinearDims, LinearOut,
};
pub use crate::backend::{Accumulate, Transpose};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Elements per rayon task of the GELU pass.
const CHUNK: usize = 1 << 14;

/// Products smaller than this many multiply-adds run on the calling thread: the rayon hand-off
/// costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `C[m,n] (=|+=) op(A)[m,k] · op(B)[k,n]` as `g` describes it.
///
/// `a` holds `A` as `[m,k]` (or `[k,m]` with `g.ta = Yes`); `b` holds `B` as `[k,n]` (or `[n,k]`
/// with `g.tb = Yes`). Panics if a slice is shorter than its declared shape (a programming error
/// inside the engine, never user input).
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], g: Gemm) {
    let Gemm {
        m,
        k,
        n,
        ta,
        tb,
        acc,
    } = g;
    assert!(c.len() >= m * n, "matmul: C too small");
    assert!(a.len() >= m * k, "matmul: A too small");
    assert!(b.len() >= k * n, "matmul: B too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc == Accumulate::Overwrite {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (column stride, row stride) of each operand in elements.
    let (a_cs, a_rs) = match ta {
        Transpose::No => (1, k as isize),
        Transpose::Yes => (m as isize, 1),
    };
    let (b_cs, b_rs) = match tb {
        Transpose::No => (1, n as isize),
        Transpose::Yes => (k as isize, 1),
    };
    let parallelism = if m * n * k >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let read_dst = acc == Accumulate::Add;
    // SAFETY: the asserts above guarantee every index the strides reach lies inside its slice,
    // and `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl GemmOps for CpuBackend {
    fn matmul(&mut self, c: &mut [f32], a: &[f32], b: &[f32], g: Gemm) -> Result<()> {
        const OP: &str = "cpu matmul";
        check_len(OP, "c", c.len(), g.m * g.n)?;
        check_len(OP, "a", a.len(), g.m * g.k)?;
        check_len(OP, "b", b.len(), g.k * g.n)?;
        matmul(c, a, b, g);
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
            matmul(cs, as_, bs, g.gemm);
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
        check_len(OP, "inp", inp.len(), rows * k)?;
        check_len(OP, "weight", weight.len(), n * k)?;
        if let Some(b) = bias {
            check_len(OP, "bias", b.len(), n)?;
        }
        let product = |y: &mut [f32]| -> Result<()> {
            check_len(OP, "out", y.len(), rows * n)?;
            let g = Gemm::nn(rows, k, n).t(Transpose::No, Transpose::Yes);
            matmul(y, inp, weight, g);
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
                check_len(OP, "act", act.len(), rows * n)?;
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
        check_len(OP, "dout", dout.len(), rows * n)?;
        check_len(OP, "weight", weight.len(), n * k)?;
        let (dx, acc, round) = match dinp {
            InputGrad::F32(dx, acc) => (dx, acc, false),
            InputGrad::Half(dx) => (dx, Accumulate::Overwrite, true),
        };
        check_len(OP, "dinp", dx.len(), rows * k)?;
        matmul(dx, dout, weight, Gemm::nn(rows, n, k).acc(acc));
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
        check_len(OP, "dweight", dweight.len(), n * k)?;
        check_len(OP, "dout", dout.len(), rows * n)?;
        check_len(OP, "inp", inp.len(), rows * k)?;
        let g = Gemm::nn(n, rows, k).t(Transpose::Yes, Transpose::No);
        matmul(dweight, dout, inp, g.acc(Accumulate::Add));
        if let Some(db) = dbias {
            // Summed from the operand `dout`, as the GPU's fused epilogue does.
            check_len(OP, "dbias", db.len(), n)?;
            self.column_sum(db, dout, rows, Accumulate::Add)?;
        }
        Ok(())
    }
}
