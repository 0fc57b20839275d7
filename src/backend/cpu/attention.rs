//! `AttentionOps` on the CPU: multi-head softmax attention on the official fused qkv layout
//! (the reference of `kernels/attention.cu`).
//!
//! Dimensions: `b` images, `t` tokens, `h` heads, `hd` head dim, `c = h·hd` channels.
//! `qkv` is `[b, t, 3, h, hd]` (channels q | k | v, then head, then hd), the output is
//! `[b, t, c]` with channel `head·hd + j`. Scale `hd^-0.5`.
//!
//! Each (image, head) is computed with three GEMMs over a `[t, t]` score tile; forward saves
//! only the log-sum-exp of every score row (`[b, h, t]`), and backward recomputes the
//! probabilities from it (flash-attention style), so memory is O(b·h·t) beyond the tiles.
//! Images run in parallel; a tile is at most t² floats (7.8 MB at t = 1400).

use super::backend::CpuBackend;
use super::gemm::matmul;
use crate::backend::{check_lens, AttentionOps, AttentionShape, Gemm, Transpose};
use crate::error::Result;
use rayon::prelude::*;

/// Copies channel block `which` (0 = q, 1 = k, 2 = v) of head `head` out of one image's qkv
/// into a contiguous `[t, hd]` buffer, multiplied by `mul`.
#[allow(clippy::too_many_arguments)]
fn gather(
    dst: &mut [f32],
    qkv: &[f32],
    which: usize,
    head: usize,
    t: usize,
    h: usize,
    hd: usize,
    mul: f32,
) {
    let c3 = 3 * h * hd;
    let off = which * h * hd + head * hd;
    for i in 0..t {
        let src = &qkv[i * c3 + off..i * c3 + off + hd];
        for (d, s) in dst[i * hd..(i + 1) * hd].iter_mut().zip(src) {
            *d = s * mul;
        }
    }
}

/// Converts raw scores into probabilities in place, row by row; returns nothing but writes
/// each row's log-sum-exp into `lse`.
fn softmax_rows(scores: &mut [f32], lse: &mut [f32], t: usize) {
    for (row, l) in scores.chunks_mut(t).zip(lse.iter_mut()) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
        *l = max + sum.ln();
    }
}

/// `[t, a] · [t, b]ᵀ`-style products of one head: `nt` is `x · yᵀ`, `tn` is `xᵀ · y`.
fn nt(m: usize, k: usize, n: usize) -> Gemm {
    Gemm::nn(m, k, n).t(Transpose::No, Transpose::Yes)
}

fn tn(m: usize, k: usize, n: usize) -> Gemm {
    Gemm::nn(m, k, n).t(Transpose::Yes, Transpose::No)
}

impl AttentionOps for CpuBackend {
    /// `out = softmax(q kᵀ · hd^-0.5) v` per image and head; saves `lse` for backward.
    fn attention_forward(
        &mut self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        shape: AttentionShape,
    ) -> Result<()> {
        check_lens(
            "cpu attention_forward",
            &[
                ("qkv", qkv.len(), shape.qkv_len()),
                ("out", out.len(), shape.out_len()),
                ("lse", lse.len(), shape.stats_len()),
            ],
        )?;
        let (t, h, hd) = (shape.tokens, shape.heads, shape.head_dim);
        let c = h * hd;
        if shape.batch == 0 || t == 0 || c == 0 {
            return Ok(());
        }
        let scale = (hd as f32).powf(-0.5);
        out.par_chunks_mut(t * c)
            .zip(lse.par_chunks_mut(h * t))
            .zip(qkv.par_chunks(t * 3 * c))
            .for_each(|((out, lse), qkv)| {
                let mut q = vec![0f32; t * hd]; // [t, hd], pre-scaled
                let mut k = vec![0f32; t * hd]; // [t, hd]
                let mut v = vec![0f32; t * hd]; // [t, hd]
                let mut o = vec![0f32; t * hd]; // [t, hd]
                let mut p = vec![0f32; t * t]; // [t, t]
                for head in 0..h {
                    gather(&mut q, qkv, 0, head, t, h, hd, scale);
                    gather(&mut k, qkv, 1, head, t, h, hd, 1.0);
                    gather(&mut v, qkv, 2, head, t, h, hd, 1.0);
                    matmul(&mut p, &q, &k, nt(t, hd, t));
                    softmax_rows(&mut p, &mut lse[head * t..(head + 1) * t], t);
                    matmul(&mut o, &p, &v, Gemm::nn(t, t, hd));
                    for i in 0..t {
                        out[i * c + head * hd..i * c + (head + 1) * hd]
                            .copy_from_slice(&o[i * hd..(i + 1) * hd]);
                    }
                }
            });
        self.round(out);
        Ok(())
    }

    /// `dqkv` (every element written) from `dout` and the saved `lse`: the probabilities are
    /// recomputed (flash-attention style); `out` is not read on the CPU.
    fn attention_backward(
        &mut self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        out: &[f32],
        lse: &[f32],
        shape: AttentionShape,
    ) -> Result<()> {
        check_lens(
            "cpu attention_backward",
            &[
                ("dqkv", dqkv.len(), shape.qkv_len()),
                ("qkv", qkv.len(), shape.qkv_len()),
                ("dout", dout.len(), shape.out_len()),
                ("out", out.len(), shape.out_len()),
                ("lse", lse.len(), shape.stats_len()),
            ],
        )?;
        let (t, h, hd) = (shape.tokens, shape.heads, shape.head_dim);
        let c = h * hd;
        if shape.batch == 0 || t == 0 || c == 0 {
            return Ok(());
        }
        let scale = (hd as f32).powf(-0.5);
        dqkv.par_chunks_mut(t * 3 * c)
            .zip(dout.par_chunks(t * c))
            .zip(qkv.par_chunks(t * 3 * c))
            .zip(lse.par_chunks(h * t))
            .for_each(|(((dqkv, dout), qkv), lse)| {
                let mut q = vec![0f32; t * hd]; // [t, hd], pre-scaled
                let mut k = vec![0f32; t * hd];
                let mut v = vec![0f32; t * hd];
                let mut dout_h = vec![0f32; t * hd];
                let mut dq = vec![0f32; t * hd];
                let mut dk = vec![0f32; t * hd];
                let mut dv = vec![0f32; t * hd];
                let mut p = vec![0f32; t * t]; // [t, t] probabilities
                let mut dp = vec![0f32; t * t]; // [t, t] d probabilities, then d scores
                for head in 0..h {
                    gather(&mut q, qkv, 0, head, t, h, hd, scale);
                    gather(&mut k, qkv, 1, head, t, h, hd, 1.0);
                    gather(&mut v, qkv, 2, head, t, h, hd, 1.0);
                    for i in 0..t {
                        dout_h[i * hd..(i + 1) * hd]
                            .copy_from_slice(&dout[i * c + head * hd..i * c + (head + 1) * hd]);
                    }
                    // Recompute P = exp(S - lse).
                    matmul(&mut p, &q, &k, nt(t, hd, t));
                    for (row, &l) in p.chunks_mut(t).zip(&lse[head * t..(head + 1) * t]) {
                        row.iter_mut().for_each(|x| *x = (*x - l).exp());
                    }
                    // dV = Pᵀ dO ; dP = dO Vᵀ
                    matmul(&mut dv, &p, &dout_h, tn(t, t, hd));
                    matmul(&mut dp, &dout_h, &v, nt(t, hd, t));
                    // dS = P ∘ (dP − rowsum(P ∘ dP))
                    for (prow, dprow) in p.chunks(t).zip(dp.chunks_mut(t)) {
                        let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                        dprow
                            .iter_mut()
                            .zip(prow)
                            .for_each(|(d, &pv)| *d = pv * (*d - dot));
                    }
                    // dQ = scale · dS K ; dK = dSᵀ (scale · Q)
                    matmul(&mut dq, &dp, &k, Gemm::nn(t, t, hd));
                    matmul(&mut dk, &dp, &q, tn(t, t, hd));
                    for i in 0..t {
                        let row = &mut dqkv[i * 3 * c..(i + 1) * 3 * c];
                        for j in 0..hd {
                            row[head * hd + j] = dq[i * hd + j] * scale;
                            row[c + head * hd + j] = dk[i * hd + j];
                            row[2 * c + head * hd + j] = dv[i * hd + j];
                        }
                    }
                }
            });
        self.round(dqkv);
        Ok(())
    }
}
