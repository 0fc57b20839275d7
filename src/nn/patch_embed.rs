//! Patch embedding: Conv2d(C → D, kernel = stride = p) computed as one GEMM over unfolded
//! patches. Patches are numbered row-major over the (H/p, W/p) grid, as `flatten(2).transpose`.
//!
//! Dimensions: `b` images, `c` channels, `h × w` pixels, `gh × gw = (h/p) × (w/p)` patches,
//! `k = c·p·p` values per patch (ordered channel, kernel row, kernel column, like the weight).

use super::linear::Linear;
use super::params::{Init, ParamTable};
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub struct PatchEmbed {
    /// The conv as a linear map over unfolded patches: weight `[D, c·p·p]` (= `[D, c, p, p]`).
    pub proj: Linear,
    pub patch: usize,
    pub in_chans: usize,
    pub dim: usize,
}

impl PatchEmbed {
    /// Registers `<name>proj.weight [D, c, p, p]` and `<name>proj.bias [D]` with PyTorch's
    /// default Conv2d init, U(±1/√(c·p·p)) for both.
    pub fn new(
        table: &mut ParamTable,
        name: &str,
        in_chans: usize,
        patch: usize,
        dim: usize,
    ) -> Self {
        let k = in_chans * patch * patch;
        let bound = 1.0 / (k as f32).sqrt();
        let weight = table.push(
            format!("{name}proj.weight"),
            &[dim, in_chans, patch, patch],
            Init::Uniform { bound },
        );
        let bias = table.push(format!("{name}proj.bias"), &[dim], Init::Uniform { bound });
        PatchEmbed {
            proj: Linear {
                weight,
                bias: Some(bias),
                in_dim: k,
                out_dim: dim,
            },
            patch,
            in_chans,
            dim,
        }
    }

    /// Unfolds images `[b, c, h, w]` into patch rows `[b·gh·gw, c·p·p]`.
    pub fn unfold(&self, cols: &mut [f32], images: &[f32], b: usize, h: usize, w: usize) {
        let (p, c) = (self.patch, self.in_chans);
        let (gh, gw) = (h / p, w / p);
        let k = c * p * p;
        cols[..b * gh * gw * k]
            .par_chunks_mut(gw * k)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, i) = (row / gh, row % gh);
                for j in 0..gw {
                    for ch in 0..c {
                        for ki in 0..p {
                            let src = ((img * c + ch) * h + i * p + ki) * w + j * p;
                            let at = j * k + (ch * p + ki) * p;
                            dst[at..at + p].copy_from_slice(&images[src..src + p]);
                        }
                    }
                }
            });
    }

    /// Adds patch-row gradients `[b·gh·gw, c·p·p]` back into image positions (`=`; patches do
    /// not overlap, so every pixel of the covered area is written once).
    pub fn fold(&self, dimages: &mut [f32], dcols: &[f32], b: usize, h: usize, w: usize) {
        let (p, c) = (self.patch, self.in_chans);
        let (gh, gw) = (h / p, w / p);
        let k = c * p * p;
        dimages[..b * c * h * w].fill(0.0);
        // One task per image: each writes only its own plane.
        dimages[..b * c * h * w]
            .par_chunks_mut(c * h * w)
            .enumerate()
            .for_each(|(img, dst)| {
                for i in 0..gh {
                    for j in 0..gw {
                        let row = &dcols[((img * gh + i) * gw + j) * k..][..k];
                        for ch in 0..c {
                            for ki in 0..p {
                                let at = (ch * h + i * p + ki) * w + j * p;
                                dst[at..at + p].copy_from_slice(&row[(ch * p + ki) * p..][..p]);
                            }
                        }
                    }
                }
            });
    }
}
