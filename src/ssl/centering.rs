//! Teacher targets: softmax centering (with its lagged center) or Sinkhorn-Knopp.
//!
//! One [`Centering`] per loss: the DINO CLS loss keeps a `[K]` center over the `2B` global-crop
//! rows, the iBOT loss its own `[K_ibot]` center over the `M` masked-patch rows.

use crate::backend::cpu::loss::{center_update, softmax_centered_forward};
use crate::backend::cpu::sinkhorn::sinkhorn_knopp;
use crate::error::{Error, Result};

/// The official Sinkhorn-Knopp iteration count.
pub const SINKHORN_ITERATIONS: usize = 3;

/// The official center momentum.
pub const CENTER_MOMENTUM: f32 = 0.9;

/// How teacher logits become target probabilities (`train.centering`).
#[derive(Clone, Debug, PartialEq)]
pub enum Centering {
    /// `softmax((t − center) / tt)`; after the targets of a step are computed, the center moves
    /// to `momentum · center + (1 − momentum) · mean_rows(t)`, so step `i` uses the center built
    /// from steps `< i` (the official lagged update).
    Softmax { center: Vec<f32>, momentum: f32 },
    /// Sinkhorn-Knopp over all rows of the batch jointly; no state.
    SinkhornKnopp { n_iters: usize },
}

impl Centering {
    /// Softmax centering with a zero `[k]` center and the official momentum 0.9.
    pub fn softmax(k: usize) -> Self {
        Centering::Softmax {
            center: vec![0.0; k],
            momentum: CENTER_MOMENTUM,
        }
    }

    /// Sinkhorn-Knopp with the official 3 iterations.
    pub fn sinkhorn_knopp() -> Self {
        Centering::SinkhornKnopp {
            n_iters: SINKHORN_ITERATIONS,
        }
    }

    /// The current center (softmax centering), e.g. for a checkpoint.
    pub fn center(&self) -> Option<&[f32]> {
        match self {
            Centering::Softmax { center, .. } => Some(center),
            Centering::SinkhornKnopp { .. } => None,
        }
    }

    /// Teacher targets `probs [R,K]` for `teacher_logits [R,K]` at temperature `teacher_temp`,
    /// then (softmax centering) the center update from this batch. Sinkhorn-Knopp normalises
    /// the `R` rows jointly (`n_samples = R`).
    pub fn teacher_probs(
        &mut self,
        probs: &mut [f32],
        teacher_logits: &[f32],
        rows: usize,
        k: usize,
        teacher_temp: f32,
    ) -> Result<()> {
        match self {
            Centering::Softmax { center, momentum } => {
                if center.len() != k {
                    return Err(Error::shape(
                        "Centering::teacher_probs",
                        format!("center has {} prototypes, logits have {k}", center.len()),
                    ));
                }
                softmax_centered_forward(probs, teacher_logits, center, rows, k, teacher_temp)?;
                center_update(center, teacher_logits, rows, k, *momentum)
            }
            Centering::SinkhornKnopp { n_iters } => {
                sinkhorn_knopp(probs, teacher_logits, rows, k, teacher_temp, *n_iters)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_centering_uses_the_old_center_then_updates_it() {
        let k = 3;
        let mut c = Centering::softmax(k);
        let t = [1.0f32, 0.0, 0.0, 3.0, 0.0, 0.0];
        let mut p = vec![0f32; 6];
        c.teacher_probs(&mut p, &t, 2, k, 1.0).unwrap();
        // Old center 0: plain softmax of the logits.
        let e = std::f32::consts::E;
        assert!((p[0] - e / (e + 2.0)).abs() < 1e-6);
        // New center: 0.1 · mean = [0.2, 0, 0].
        let center = c.center().unwrap();
        assert!((center[0] - 0.2).abs() < 1e-7 && center[1] == 0.0);
        // The next step uses it.
        c.teacher_probs(&mut p, &t, 2, k, 1.0).unwrap();
        let e8 = 0.8f32.exp();
        assert!((p[0] - e8 / (e8 + 2.0)).abs() < 1e-6);
        assert!(c.teacher_probs(&mut p[..4], &t[..4], 2, 2, 1.0).is_err());
    }

    #[test]
    fn sinkhorn_rows_sum_to_one_and_keep_no_center() {
        let mut c = Centering::sinkhorn_knopp();
        let t = [1.0f32, 0.5, -0.5, 0.25, 2.0, 0.0];
        let mut p = vec![0f32; 6];
        c.teacher_probs(&mut p, &t, 2, 3, 0.1).unwrap();
        assert!((p[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(c.center().is_none());
    }
}
