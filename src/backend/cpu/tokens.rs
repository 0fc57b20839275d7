//! Token and row movement on the CPU (references of `patch.cu` and the sample kernels of
//! `elementwise.cu`): token assembly, mask-token substitution, row gathers and scatters by flat
//! index, the batch-subset gather and residual add of stochastic depth, and column sums.
//!
//! Callers (the [`super::CpuBackend`] trait methods) check every length first; these kernels
//! assume the shapes they are given.

use crate::backend::{Accumulate, PatchLayout, TokenLayout};
use rayon::prelude::*;

/// Rows per rayon task of the column sums (fixed, so results do not depend on the thread count).
const ROWS_PER_TASK: usize = 256;

/// `x [B, T, C] = [cls + pos[0], reg.., pe[b, p] + pos[1 + p]]`.
pub fn assemble_tokens(
    x: &mut [f32],
    pe: &[f32],
    cls: &[f32],
    reg: Option<&[f32]>,
    pos: &[f32],
    layout: TokenLayout,
) {
    let (n, r, d) = (layout.patches, layout.registers, layout.channels);
    let t = layout.tokens();
    x.par_chunks_mut(t * d)
        .zip(pe.par_chunks(n * d))
        .for_each(|(xb, pb)| {
            for j in 0..d {
                xb[j] = cls[j] + pos[j];
            }
            if let Some(reg) = reg {
                xb[d..(1 + r) * d].copy_from_slice(reg);
            }
            let patches = &mut xb[(1 + r) * d..];
            for ((o, s), q) in patches.iter_mut().zip(pb).zip(&pos[d..]) {
                *o = s + q;
            }
        });
}

/// Rows of `x [rows, C]` with `masks[r] != 0` become `token`.
pub fn mask_token_substitute(x: &mut [f32], masks: &[u8], token: &[f32]) {
    let d = token.len();
    x.par_chunks_mut(d)
        .zip(masks.par_iter())
        .filter(|(_, &m)| m != 0)
        .for_each(|(row, _)| row.copy_from_slice(token));
}

/// `dtoken += Σ_masked dx[r]` (in row order), and the masked rows of `dx` become zero.
pub fn mask_token_backward(dtoken: &mut [f32], dx: &mut [f32], masks: &[u8]) {
    let d = dtoken.len();
    for (row, _) in dx.chunks_mut(d).zip(masks).filter(|(_, &m)| m != 0) {
        dtoken
            .iter_mut()
            .zip(row.iter())
            .for_each(|(a, &g)| *a += g);
        row.fill(0.0);
    }
}

/// `out [M, C] = tokens[layout.token_row(indices[i])]`.
pub fn gather_rows(out: &mut [f32], tokens: &[f32], indices: &[i64], layout: PatchLayout) {
    let d = layout.channels;
    out.par_chunks_mut(d)
        .zip(indices.par_iter())
        .for_each(|(o, &i)| {
            let row = layout.token_row(i as usize);
            o.copy_from_slice(&tokens[row * d..(row + 1) * d]);
        });
}

/// `dtokens[layout.token_row(indices[i])] += dgathered[i]` (indices are unique).
pub fn scatter_rows_add(
    dtokens: &mut [f32],
    dgathered: &[f32],
    indices: &[i64],
    layout: PatchLayout,
) {
    let d = layout.channels;
    for (g, &i) in dgathered.chunks(d).zip(indices) {
        let row = layout.token_row(i as usize);
        dtokens[row * d..(row + 1) * d]
            .iter_mut()
            .zip(g)
            .for_each(|(a, &v)| *a += v);
    }
}

/// `out [k, len] = alpha · x[kept]` (`x [batch, len]`).
pub fn gather_samples_scaled(out: &mut [f32], x: &[f32], kept: &[i64], len: usize, alpha: f32) {
    out.par_chunks_mut(len)
        .zip(kept.par_iter())
        .for_each(|(o, &i)| {
            let src = &x[i as usize * len..(i as usize + 1) * len];
            if alpha == 1.0 {
                o.copy_from_slice(src);
            } else {
                o.iter_mut().zip(src).for_each(|(o, &v)| *o = alpha * v);
            }
        });
}

/// `x[kept[j]] += alpha · gamma ∘ y[j]` for every `j < samples` (`kept` `None` = `0..samples`).
#[allow(clippy::too_many_arguments)]
pub fn residual_add_samples(
    x: &mut [f32],
    y: &[f32],
    gamma: Option<&[f32]>,
    kept: Option<&[i64]>,
    samples: usize,
    batch: usize,
    len: usize,
    channels: usize,
    alpha: f32,
) {
    // Where each sample's branch output lives in `y` (None = dropped).
    let mut src: Vec<Option<usize>> = vec![None; batch];
    match kept {
        Some(kept) => kept
            .iter()
            .enumerate()
            .for_each(|(j, &i)| src[i as usize] = Some(j)),
        None => src[..samples]
            .iter_mut()
            .enumerate()
            .for_each(|(i, s)| *s = Some(i)),
    }
    x[..batch * len]
        .par_chunks_mut(len)
        .zip(src.par_iter())
        .for_each(|(xs, j)| {
            let Some(j) = *j else { return };
            let ys = &y[j * len..(j + 1) * len];
            match gamma {
                Some(g) => {
                    for (xr, yr) in xs.chunks_mut(channels).zip(ys.chunks(channels)) {
                        for c in 0..channels {
                            xr[c] += alpha * g[c] * yr[c];
                        }
                    }
                }
                None => xs.iter_mut().zip(ys).for_each(|(a, v)| *a += alpha * v),
            }
        });
}

/// `out [C] (=|+=) Σ_rows x [rows, C]`: partial sums per fixed chunk of rows, added in order.
pub fn column_sum(out: &mut [f32], x: &[f32], rows: usize, write: Accumulate) {
    let c = out.len();
    if write == Accumulate::Overwrite {
        out.fill(0.0);
    }
    if c == 0 || rows == 0 {
        return;
    }
    let partials: Vec<Vec<f32>> = x[..rows * c]
        .par_chunks(ROWS_PER_TASK * c)
        .map(|chunk| {
            let mut acc = vec![0f32; c];
            for row in chunk.chunks(c) {
                acc.iter_mut().zip(row).for_each(|(a, g)| *a += g);
            }
            acc
        })
        .collect();
    for p in &partials {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_then_scatter_is_adjoint_over_the_layout() {
        let layout = PatchLayout {
            crops: 2,
            tokens: 4,
            patches: 3,
            token_offset: 1,
            channels: 2,
        };
        let tokens: Vec<f32> = (0..16).map(|v| v as f32).collect(); // [2, 4, 2]
        let idx = [0i64, 4, 5];
        let mut out = vec![0f32; 6];
        gather_rows(&mut out, &tokens, &idx, layout);
        // Flat index 4 = crop 1, patch 1 = token row 4 + 1 + 1 = 6.
        assert_eq!(out, vec![2., 3., 12., 13., 14., 15.]);
        let mut d = vec![0f32; 16];
        scatter_rows_add(&mut d, &[1.0; 6], &idx, layout);
        assert_eq!(d.iter().sum::<f32>(), 6.0);
        assert_eq!((d[2], d[12], d[14], d[0]), (1.0, 1.0, 1.0, 0.0));
    }

    #[test]
    fn masked_rows_take_the_token_and_give_it_their_gradient() {
        let mut x = vec![1f32; 6]; // [3, 2]
        mask_token_substitute(&mut x, &[0, 1, 1], &[7.0, 8.0]);
        assert_eq!(x, vec![1., 1., 7., 8., 7., 8.]);
        let mut dtok = vec![0f32; 2];
        let mut dx = vec![1f32, 2., 3., 4., 5., 6.];
        mask_token_backward(&mut dtok, &mut dx, &[0, 1, 1]);
        assert_eq!((dtok, dx), (vec![8., 10.], vec![1., 2., 0., 0., 0., 0.]));
    }

    #[test]
    fn residual_add_covers_only_the_kept_samples() {
        let mut x = vec![0f32; 8]; // [4, 2]
        let y = vec![1f32, 1., 2., 2.]; // [2, 2]
        residual_add_samples(
            &mut x,
            &y,
            Some(&[2.0, 3.0]),
            Some(&[1, 3]),
            2,
            4,
            2,
            2,
            0.5,
        );
        assert_eq!(x, vec![0., 0., 1., 1.5, 0., 0., 2., 3.]);
        let mut out = vec![0f32; 2];
        column_sum(&mut out, &x, 4, Accumulate::Overwrite);
        assert_eq!(out, vec![3.0, 4.5]);
    }
}
