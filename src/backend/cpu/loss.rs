//! Loss kernels (CPU reference of the CUDA loss family): teacher softmax with centering, the
//! center update, and the student softmax cross-entropy with its gradient.
//!
//! Dimensions: `R` rows (samples), `K` prototypes (up to 131072). Rows are independent, so every
//! kernel is row-parallel; a row of 65536 logits (256 KiB) stays in L2 between the passes.
//! Reductions over `K` accumulate in f64 (eight lanes, so they still vectorise).

use super::backend::{one_scalar, rows_of, CpuBackend, CpuPairs};
use super::sinkhorn::sinkhorn_knopp;
use crate::backend::{check_lens, LossOps};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// `exp(x)` in f32 without a libm call, so loops over it vectorise. Cephes' `expf` range
/// reduction and polynomial: relative error below 2e-7 on `[-87, 88]`; `0` below `-87.3`,
/// saturates at `exp(88)` above. Callers feed shifted logits (`<= 0`), so neither end is hit in
/// practice.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n through the exponent bits; n = bits(t) - bits(MAGIC) fits in [-126, 127].
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// Sum in f64 over eight lanes (vectorises; exact enough for K = 131072).
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in tail {
        s += v as f64;
    }
    s
}

/// Dot product in f64 over eight lanes.
#[inline(always)]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (&x, &y) in ta.iter().zip(tb) {
        s += x as f64 * y as f64;
    }
    s
}

/// Largest value of a slice (`-inf` when empty).
#[inline(always)]
pub fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        m = m.max(v);
    }
    m
}

pub(crate) fn check_temp(op: &'static str, what: &str, t: f32) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::Config(format!(
            "{op}: {what} must be a positive number, got {t}"
        )));
    }
    Ok(())
}

/// Whether the row kernels can use their AVX2 build. Both builds give bit-identical results:
/// every reduction has fixed lanes and Rust never contracts `a·b + c` into an FMA, so the wider
/// vectors only change speed.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One row of [`softmax_centered_forward`]: `p [K]`, `t [K]`, `center [K]`.
#[inline(always)]
fn softmax_centered_row(p: &mut [f32], t: &[f32], center: Option<&[f32]>, temp: f32) {
    // [K] scaled logits first (the division is the official order: (t - c) / temp).
    match center {
        Some(center) => {
            for ((pv, &tv), &cv) in p.iter_mut().zip(t).zip(center) {
                *pv = (tv - cv) / temp;
            }
        }
        None => p.iter_mut().zip(t).for_each(|(pv, &tv)| *pv = tv / temp),
    }
    let max = max_f32(p);
    for pv in p.iter_mut() {
        *pv = exp_f32(*pv - max);
    }
    let inv = (1.0 / sum_f64(p)) as f32;
    for pv in p.iter_mut() {
        *pv *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_centered_row_avx2(p: &mut [f32], t: &[f32], center: Option<&[f32]>, temp: f32) {
    softmax_centered_row(p, t, center, temp)
}

/// One row of [`softmax_cross_entropy_forward_backward`]: writes `d [K]`, returns the loss.
#[inline(always)]
fn cross_entropy_row(d: &mut [f32], s: &[f32], p: &[f32], inv_t: f32, w: f32) -> f32 {
    let max = max_f32(s) * inv_t;
    // Pass 1: e = exp(x − max) into d, with Σe, Σp and Σ p·x in f64.
    for (dv, &sv) in d.iter_mut().zip(s) {
        *dv = exp_f32(sv * inv_t - max);
    }
    let sum_e = sum_f64(d);
    let sum_p = sum_f64(p);
    let p_dot_x = dot_f64(p, s) * inv_t as f64;
    let lse = max as f64 + sum_e.ln();
    // Pass 2: d = w · (q · Σp − p) / ts.
    let qs = (sum_p / sum_e) as f32;
    let wt = w * inv_t;
    for (dv, &pv) in d.iter_mut().zip(p) {
        *dv = wt * (*dv * qs - pv);
    }
    (sum_p * lse - p_dot_x) as f32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn cross_entropy_row_avx2(d: &mut [f32], s: &[f32], p: &[f32], inv_t: f32, w: f32) -> f32 {
    cross_entropy_row(d, s, p, inv_t, w)
}

impl LossOps for CpuBackend {
    type Pairs = CpuPairs;

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
        check_lens(
            OP,
            &[("teacher", teacher.len(), n), ("weight", weight.len(), n)],
        )?;
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

    /// `probs = softmax((logits − center) / temp)` per row (no centering without a center).
    fn teacher_softmax(
        &mut self,
        probs: &mut [f32],
        logits: &[f32],
        center: Option<&[f32]>,
        temp: f32,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "cpu teacher_softmax";
        let rows = rows_of(OP, "logits", logits.len(), k)?;
        let c = center.map_or(k, <[f32]>::len);
        check_lens(OP, &[("probs", probs.len(), rows * k), ("center", c, k)])?;
        check_temp(OP, "teacher temperature", temp)?;
        if k == 0 {
            return Ok(());
        }
        let simd = has_avx2();
        probs
            .par_chunks_mut(k)
            .zip(logits.par_chunks(k))
            .for_each(|(p, t)| {
                #[cfg(not(target_arch = "x86_64"))]
                let _ = simd;
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is true only when the CPU has AVX2 (checked at run time).
                    return unsafe { softmax_centered_row_avx2(p, t, center, temp) };
                }
                softmax_centered_row(p, t, center, temp)
            });
        Ok(())
    }

    /// `next = m·center + (1 − m)·mean_rows(logits)`, column sums in f64. With no rows there is
    /// no batch statistic and the center is copied unchanged (the official code would turn it
    /// into NaN).
    fn center_ema(
        &mut self,
        next: &mut [f32],
        logits: &[f32],
        center: &[f32],
        momentum: f64,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "cpu center_ema";
        let rows = rows_of(OP, "logits", logits.len(), k)?;
        check_lens(OP, &[("center", center.len(), k), ("next", next.len(), k)])?;
        next.copy_from_slice(center);
        if rows == 0 || k == 0 {
            return Ok(());
        }
        // Parallel over column blocks so each thread owns its output.
        const COLS: usize = 1024;
        let (inv_rows, m) = (1.0 / rows as f64, momentum as f32 as f64);
        next.par_chunks_mut(COLS).enumerate().for_each(|(blk, c)| {
            let c0 = blk * COLS;
            let mut acc = vec![0f64; c.len()];
            for r in 0..rows {
                let row = &logits[r * k + c0..r * k + c0 + c.len()];
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
            }
            for (cv, a) in c.iter_mut().zip(acc) {
                *cv = (m * *cv as f64 + (1.0 - m) * a * inv_rows) as f32;
            }
        });
        Ok(())
    }

    /// Row `r` is paired with teacher rows `teacher[r·P + p]` (−1 = unused) of weight
    /// `weight[r·P + p]`. With the combined target `q = Σ_p w_p probs[t_p]`, `x = student_r / ts`:
    /// the row's loss is `−Σ_k q_k · log_softmax(x)_k`, `ds_r = grad_scale · (softmax(x) · Σq − q)
    /// / ts`; `loss [1]` is the sum over rows (f64).
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
        const OP: &str = "cpu softmax_cross_entropy";
        let (rows, pairs) = (table.rows, table.pairs);
        check_lens(OP, &[("ds", ds.len(), rows * k), ("s", s.len(), rows * k)])?;
        check_temp(OP, "student temperature", student_temp)?;
        let (teacher, weight) = (
            &table.teacher[..rows * pairs],
            &table.weight[..rows * pairs],
        );
        let teacher_rows = probs.len() / k.max(1);
        let inv_t = 1.0 / student_temp;
        let simd = has_avx2();
        let mut row_loss = vec![0f32; rows];
        if k > 0 {
            row_loss
                .par_iter_mut()
                .zip(ds.par_chunks_mut(k))
                .zip(s.par_chunks(k))
                .enumerate()
                .for_each_init(
                    || vec![0f32; k],
                    |q, (r, ((loss, d), s))| {
                        // The combined target of this row's pairs.
                        q.fill(0.0);
                        for p in r * pairs..(r + 1) * pairs {
                            let t = teacher[p];
                            if t >= 0 && (t as usize) < teacher_rows {
                                let row = &probs[t as usize * k..(t as usize + 1) * k];
                                q.iter_mut()
                                    .zip(row)
                                    .for_each(|(q, &v)| *q += weight[p] * v);
                            }
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = simd;
                        #[cfg(target_arch = "x86_64")]
                        if simd {
                            // SAFETY: `simd` is true only when the CPU has AVX2 (run-time check).
                            *loss = unsafe { cross_entropy_row_avx2(d, s, q, inv_t, grad_scale) };
                            return;
                        }
                        *loss = cross_entropy_row(d, s, q, inv_t, grad_scale);
                    },
                );
        }
        let total: f64 = row_loss.iter().map(|&v| v as f64).sum();
        one_scalar(OP, loss, total as f32)
    }

    /// The mean over rows of `−Σ_k p log p` (nats), accumulated in f64.
    fn mean_row_entropy(&mut self, out: &mut [f32], probs: &[f32], k: usize) -> Result<()> {
        let rows = rows_of("cpu mean_row_entropy", "probs", probs.len(), k)?;
        let total: f64 = probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -(p as f64) * (p as f64).ln())
            .sum();
        one_scalar(
            "cpu mean_row_entropy",
            out,
            (total / rows.max(1) as f64) as f32,
        )
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        crate::rng::uniform_vec(seed, n, scale)
    }

    /// The private row kernels: their AVX2 builds against the baseline (the other CPU loss
    /// checks run through the backend in `tests/ssl_kernels.rs`).
    #[test]
    fn avx2_row_kernels_are_bit_identical_to_the_baseline() {
        if !has_avx2() {
            return; // no AVX2 on this CPU: nothing to compare
        }
        let k = 4099;
        let t = random(k, 7, 3.0);
        let c = random(k, 8, 1.0);
        let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
        softmax_centered_row(&mut a, &t, Some(&c), 0.04);
        // SAFETY: AVX2 checked above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            softmax_centered_row_avx2(&mut b, &t, Some(&c), 0.04)
        };
        assert_eq!(a, b);
        let (mut da, mut db) = (vec![0f32; k], vec![0f32; k]);
        let la = cross_entropy_row(&mut da, &t, &a, 10.0, 0.3);
        #[cfg(target_arch = "x86_64")]
        let lb = unsafe { cross_entropy_row_avx2(&mut db, &t, &a, 10.0, 0.3) };
        assert_eq!((la, da), (lb, db));
    }
}
