//! Row-major single-precision GEMM on the CPU, through the `gemm` crate (AVX-512 / AVX2 kernels
//! chosen at run time; see `CPU.md` for measured rates).
//!
//! Every matrix is a contiguous row-major slice. `Transpose::Yes` means the operand is *stored*
//! transposed, e.g. a `Linear` weight `[out, in]` used as the right operand of `x · Wᵀ`.

pub use crate::backend::{Accumulate, Transpose};

/// Products smaller than this many multiply-adds run on the calling thread: the rayon hand-off
/// costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `C[m,n] (=|+=) op(A)[m,k] · op(B)[k,n]`.
///
/// `a` holds `A` as `[m,k]` (or `[k,m]` with `ta = Yes`); `b` holds `B` as `[k,n]` (or `[n,k]` with
/// `tb = Yes`). Panics if a slice is shorter than its declared shape (a programming error inside
/// the engine, never user input).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    ta: Transpose,
    b: &[f32],
    tb: Transpose,
    m: usize,
    k: usize,
    n: usize,
    acc: Accumulate,
) {
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

/// Reference triple loop (f64 accumulation) used by tests to check [`matmul`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_reference(
    c: &mut [f32],
    a: &[f32],
    ta: Transpose,
    b: &[f32],
    tb: Transpose,
    m: usize,
    k: usize,
    n: usize,
    acc: Accumulate,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let av = match ta {
                    Transpose::No => a[i * k + p],
                    Transpose::Yes => a[p * m + i],
                };
                let bv = match tb {
                    Transpose::No => b[p * n + j],
                    Transpose::Yes => b[j * k + p],
                };
                s += av as f64 * bv as f64;
            }
            let prev = if acc == Accumulate::Add {
                c[i * n + j] as f64
            } else {
                0.0
            };
            c[i * n + j] = (prev + s) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_reference_for_every_transpose_and_accumulate() {
        let (m, k, n) = (37, 53, 29);
        let a = seeded(m * k, 1);
        let b = seeded(k * n, 2);
        for ta in [Transpose::No, Transpose::Yes] {
            for tb in [Transpose::No, Transpose::Yes] {
                for acc in [Accumulate::Overwrite, Accumulate::Add] {
                    let mut c = seeded(m * n, 3);
                    let mut r = c.clone();
                    matmul(&mut c, &a, ta, &b, tb, m, k, n, acc);
                    matmul_reference(&mut r, &a, ta, &b, tb, m, k, n, acc);
                    for (x, y) in c.iter().zip(&r) {
                        assert!(
                            (x - y).abs() <= 1e-5 + 1e-5 * y.abs(),
                            "{ta:?} {tb:?} {acc:?}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
}
