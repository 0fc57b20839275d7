//! Teacher targets: softmax centering (with its lagged center) or Sinkhorn-Knopp.
//!
//! One state per loss: the DINO CLS loss keeps a `[K]` center over the `2B` global-crop rows,
//! the iBOT loss its own `[K_ibot]` center over the `M` masked-patch rows. [`Centering`] is the
//! host form (configuration and checkpoints); [`TargetState`] lives on a backend and computes.

use crate::backend::{Backend, Grow, Storage};
use crate::error::{Error, Result};

/// The official Sinkhorn-Knopp iteration count.
pub const SINKHORN_ITERATIONS: usize = 3;

/// The official center momentum.
pub const CENTER_MOMENTUM: f32 = 0.9;

/// How teacher logits become target probabilities (`train.centering`), with its state.
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
}

/// One loss's teacher-target state on a backend.
pub enum TargetState<B: Backend> {
    Softmax {
        /// `[K]` the center the next targets use.
        center: B::BufF32,
        /// `[K]` where the moved center is written before the two swap.
        next: B::BufF32,
        momentum: f32,
        /// `[G, K]` each group's row mean (grouped targets only).
        group_means: Grow<B::BufF32>,
    },
    SinkhornKnopp {
        n_iters: usize,
    },
}

impl<B: Backend> TargetState<B> {
    /// The backend copy of a host [`Centering`].
    pub fn new(be: &mut B, host: &Centering) -> Result<Self> {
        match host {
            Centering::Softmax { center, momentum } => {
                if center.is_empty() {
                    return Err(Error::shape("teacher targets", "an empty center"));
                }
                let mut c = be.alloc_f32(center.len())?;
                be.upload_f32(&mut c, center)?;
                Ok(TargetState::Softmax {
                    center: c,
                    next: be.alloc_f32(center.len())?,
                    momentum: *momentum,
                    group_means: Grow::default(),
                })
            }
            Centering::SinkhornKnopp { n_iters } => {
                Ok(TargetState::SinkhornKnopp { n_iters: *n_iters })
            }
        }
    }

    /// The host form of this state.
    pub fn to_host(&self, be: &mut B) -> Result<Centering> {
        Ok(match self {
            TargetState::Softmax {
                center, momentum, ..
            } => Centering::Softmax {
                center: be.download_f32(center)?,
                momentum: *momentum,
            },
            TargetState::SinkhornKnopp { n_iters } => {
                Centering::SinkhornKnopp { n_iters: *n_iters }
            }
        })
    }

    /// Replaces the state with `host`'s (resume); the mode and size must match.
    pub fn restore(&mut self, be: &mut B, host: &Centering) -> Result<()> {
        match (self, host) {
            (
                TargetState::Softmax {
                    center, momentum, ..
                },
                Centering::Softmax {
                    center: h,
                    momentum: m,
                },
            ) => {
                if h.len() != center.len() {
                    return Err(Error::shape(
                        "teacher targets restore",
                        format!("a center of {} for {} prototypes", h.len(), center.len()),
                    ));
                }
                *momentum = *m;
                be.upload_f32(center, h)
            }
            (TargetState::SinkhornKnopp { n_iters }, Centering::SinkhornKnopp { n_iters: n }) => {
                *n_iters = *n;
                Ok(())
            }
            _ => Err(Error::Config(
                "the restored teacher targets use another centering mode".into(),
            )),
        }
    }

    /// Targets `probs [R, K]` of `logits [R, K]` at `teacher_temp`, then (softmax) the center
    /// update from this batch. No rows: nothing changes.
    pub fn teacher_probs(
        &mut self,
        be: &mut B,
        probs: &mut B::F32,
        logits: &B::F32,
        (rows, k): (usize, usize),
        teacher_temp: f32,
    ) -> Result<()> {
        self.teacher_probs_grouped(be, probs, logits, &[rows], k, teacher_temp)
    }

    /// [`TargetState::teacher_probs`] of rows that come in groups of `groups[g]` rows, as the
    /// ranks of a data-parallel step (here: the micro-batches of an accumulated step). The
    /// targets are those of all rows jointly: softmax centering is per row, and Sinkhorn-Knopp
    /// normalises over every row, as the official all-reduced sums do. The softmax center moves
    /// by the mean of the groups' row means, as the official iBOT center averages each rank's
    /// mean over its masked patches (for groups of equal size, the mean over all rows: the
    /// official DINO center). Empty groups are skipped. One group: the plain update.
    pub fn teacher_probs_grouped(
        &mut self,
        be: &mut B,
        probs: &mut B::F32,
        logits: &B::F32,
        groups: &[usize],
        k: usize,
        teacher_temp: f32,
    ) -> Result<()> {
        const OP: &str = "teacher targets";
        if !(teacher_temp.is_finite() && teacher_temp > 0.0) {
            return Err(Error::Config(format!(
                "{OP}: teacher temperature must be a positive number, got {teacher_temp}"
            )));
        }
        let rows: usize = groups.iter().sum();
        if rows == 0 || k == 0 {
            return Ok(());
        }
        match self {
            TargetState::Softmax {
                center,
                next,
                momentum,
                group_means,
            } => {
                if center.len() != k {
                    return Err(Error::shape(
                        OP,
                        format!("the center has {} prototypes, the logits {k}", center.len()),
                    ));
                }
                be.teacher_softmax(probs, logits, Some(center), teacher_temp, k)?;
                let momentum = f64::from(*momentum);
                let non_empty = groups.iter().filter(|&&g| g > 0).count();
                if non_empty == 1 {
                    be.center_ema(next, logits, center, momentum, k)?;
                } else {
                    group_means.resize(non_empty * k, |l| be.alloc_f32(l))?;
                    let (mut first_row, mut slot) = (0, 0);
                    for &g in groups.iter().filter(|&&g| g > 0) {
                        // Momentum 0: the group's row mean.
                        let group = logits.window(first_row * k..(first_row + g) * k)?;
                        let mut mean = group_means.rows_mut(slot * k..(slot + 1) * k)?;
                        be.center_ema(&mut mean, &group, center, 0.0, k)?;
                        (first_row, slot) = (first_row + g, slot + 1);
                    }
                    be.center_ema(next, &*group_means.get()?, center, momentum, k)?;
                }
                std::mem::swap(center, next);
                Ok(())
            }
            TargetState::SinkhornKnopp { n_iters } => {
                if *n_iters == 0 {
                    return Err(Error::Config(format!(
                        "{OP}: Sinkhorn-Knopp needs at least one iteration"
                    )));
                }
                be.sinkhorn_knopp(probs, logits, k, teacher_temp, *n_iters)
            }
        }
    }
}
