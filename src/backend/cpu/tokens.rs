//! `TokenOps` on the CPU (the reference of `patch.cu` and the sample kernels of
//! `elementwise.cu`): token assembly, mask-token substitution, row gathers and scatters by flat
//! index, and the batch-subset gather and residual add of stochastic depth.

use super::backend::{rows_of, CpuBackend};
use crate::backend::{check_lens, PatchLayout, SampleSubset, TokenLayout, TokenOps};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Refuses repeated indices or indices outside `0..limit`.
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

/// The checks of a row gather or scatter: the same indices on both sides, strictly increasing
/// inside the layout, and the buffers' sizes.
fn check_rows(
    op: &'static str,
    (gathered, tokens): (usize, usize),
    indices: &[i64],
    host: &[i64],
    layout: PatchLayout,
) -> Result<()> {
    if indices != host {
        return Err(Error::shape(op, "device and host indices differ"));
    }
    layout.check(op, host)?;
    let all = layout.crops * layout.tokens * layout.channels;
    check_lens(
        op,
        &[
            ("gathered", gathered, host.len() * layout.channels),
            ("tokens", tokens, all),
        ],
    )
}

impl TokenOps for CpuBackend {
    fn assemble_tokens(
        &mut self,
        x: &mut [f32],
        pe: &[f32],
        cls: &[f32],
        reg: Option<&[f32]>,
        pos: &[f32],
        layout: TokenLayout,
    ) -> Result<()> {
        let (n, r, d, t) = (
            layout.patches,
            layout.registers,
            layout.channels,
            layout.tokens(),
        );
        check_lens(
            "cpu assemble_tokens",
            &[
                ("x", x.len(), layout.batch * t * d),
                ("pe", pe.len(), layout.batch * n * d),
                ("cls", cls.len(), d),
                ("pos", pos.len(), (1 + n) * d),
                ("reg", reg.map_or(0, <[f32]>::len), r * d),
            ],
        )?;
        x.par_chunks_mut(t * d)
            .zip(pe.par_chunks(n * d))
            .for_each(|(xb, pb)| {
                for j in 0..d {
                    xb[j] = cls[j] + pos[j];
                }
                if let Some(reg) = reg {
                    xb[d..(1 + r) * d].copy_from_slice(reg);
                }
                let patches = xb[(1 + r) * d..].iter_mut().zip(pb).zip(&pos[d..]);
                patches.for_each(|((o, s), q)| *o = s + q);
            });
        Ok(())
    }

    fn mask_token_substitute(
        &mut self,
        x: &mut [f32],
        masks: &[u8],
        token: &[f32],
        channels: usize,
    ) -> Result<()> {
        check_lens(
            "cpu mask_token_substitute",
            &[
                ("token", token.len(), channels),
                ("x", x.len(), masks.len() * channels),
            ],
        )?;
        x.par_chunks_mut(channels)
            .zip(masks.par_iter())
            .filter(|(_, &m)| m != 0)
            .for_each(|(row, _)| row.copy_from_slice(token));
        Ok(())
    }

    /// In row order (deterministic).
    fn mask_token_backward(
        &mut self,
        dtoken: &mut [f32],
        dx: &mut [f32],
        masks: &[u8],
        channels: usize,
    ) -> Result<()> {
        check_lens(
            "cpu mask_token_backward",
            &[
                ("dtoken", dtoken.len(), channels),
                ("dx", dx.len(), masks.len() * channels),
            ],
        )?;
        for (row, _) in dx.chunks_mut(channels).zip(masks).filter(|(_, &m)| m != 0) {
            dtoken
                .iter_mut()
                .zip(row.iter())
                .for_each(|(a, &g)| *a += g);
            row.fill(0.0);
        }
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
        let lens = (out.len(), tokens.len());
        check_rows("cpu gather_rows", lens, indices, indices_host, layout)?;
        let d = layout.channels;
        out.par_chunks_mut(d)
            .zip(indices.par_iter())
            .for_each(|(o, &i)| {
                let row = layout.token_row(i as usize);
                o.copy_from_slice(&tokens[row * d..(row + 1) * d]);
            });
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
        let lens = (dgathered.len(), dtokens.len());
        check_rows("cpu scatter_rows_add", lens, indices, indices_host, layout)?;
        let d = layout.channels;
        for (g, &i) in dgathered.chunks(d).zip(indices) {
            let row = layout.token_row(i as usize);
            let dst = dtokens[row * d..(row + 1) * d].iter_mut();
            dst.zip(g).for_each(|(a, &v)| *a += v);
        }
        Ok(())
    }

    fn gather_samples_scaled(
        &mut self,
        out: &mut [f32],
        x: &[f32],
        kept: &[i64],
        len: usize,
        alpha: f32,
    ) -> Result<()> {
        const OP: &str = "cpu gather_samples_scaled";
        check_lens(OP, &[("out", out.len(), kept.len() * len)])?;
        check_indices(OP, kept, rows_of(OP, "x", x.len(), len)?)?;
        out.par_chunks_mut(len)
            .zip(kept.par_iter())
            .for_each(|(o, &i)| {
                let src = &x[i as usize * len..(i as usize + 1) * len];
                o.iter_mut().zip(src).for_each(|(o, &v)| *o = alpha * v);
            });
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
            sample_len: len,
            channels: c,
        } = subset;
        check_lens(
            OP,
            &[
                ("x", x.len(), batch * len),
                ("y", y.len(), samples * len),
                ("gamma", gamma.map_or(c, <[f32]>::len), c),
                ("kept", kept.map_or(samples, <[i64]>::len), samples),
            ],
        )?;
        // Where each sample's branch output lives in `y` (None = dropped).
        let mut src: Vec<Option<usize>> = vec![None; batch];
        match kept {
            Some(kept) => {
                check_indices(OP, kept, batch)?;
                kept.iter()
                    .enumerate()
                    .for_each(|(j, &i)| src[i as usize] = Some(j));
            }
            None if samples > batch => {
                return Err(Error::shape(OP, format!("{samples} samples of {batch}")))
            }
            None => (0..samples).for_each(|i| src[i] = Some(i)),
        }
        x.par_chunks_mut(len)
            .zip(src.par_iter())
            .for_each(|(xs, j)| {
                let Some(j) = *j else { return };
                let ys = &y[j * len..(j + 1) * len];
                match gamma {
                    Some(g) => {
                        for (xr, yr) in xs.chunks_mut(c).zip(ys.chunks(c)) {
                            (0..c).for_each(|i| xr[i] += alpha * g[i] * yr[i]);
                        }
                    }
                    None => xs.iter_mut().zip(ys).for_each(|(a, v)| *a += alpha * v),
                }
            });
        Ok(())
    }
}
