//! Gradient clipping by total norm, per student submodule (backbone, dino_head, ibot_head
//! separately, as the official loop clips each FSDP module on its own).

use crate::error::{Error, Result};
use crate::nn::params::ParamTable;
use rayon::prelude::*;
use std::ops::Range;

/// The official `clip_grad` and the eps added to the norm.
pub const CLIP_GRAD: f32 = 3.0;
pub const CLIP_EPS: f64 = 1e-6;

/// The parts of the flat buffer that belong to one submodule.
#[derive(Clone, Debug, PartialEq)]
pub struct SubmoduleSpan {
    pub name: String,
    pub ranges: Vec<Range<usize>>,
}

impl SubmoduleSpan {
    /// One span per submodule of `table`, in order of first appearance; adjacent parameters
    /// merge into one range.
    pub fn from_table(table: &ParamTable) -> Vec<SubmoduleSpan> {
        let mut spans: Vec<SubmoduleSpan> = Vec::new();
        for s in table.specs() {
            let r = s.at.range();
            match spans.iter_mut().find(|sp| sp.name == s.submodule()) {
                Some(sp) => match sp.ranges.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => sp.ranges.push(r),
                },
                None => spans.push(SubmoduleSpan {
                    name: s.submodule().to_string(),
                    ranges: vec![r],
                }),
            }
        }
        spans
    }
}

/// Clips each submodule's gradients to total L2 norm `max_norm`:
/// `coef = min(max_norm / (norm + 1e-6), 1)`, `g *= coef`. Returns the norms measured before
/// clipping, one per span. A non-finite norm leaves that submodule's gradients unscaled (the
/// caller sees the norm and skips the step).
pub fn clip_grad_norms(
    grads: &mut [f32],
    spans: &[SubmoduleSpan],
    max_norm: f32,
) -> Result<Vec<f32>> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip_grad must be positive, got {max_norm}"
        )));
    }
    let mut norms = Vec::with_capacity(spans.len());
    for span in spans {
        if let Some(r) = span.ranges.iter().find(|r| r.end > grads.len()) {
            return Err(Error::shape(
                "clip_grad_norms",
                format!(
                    "{}: range {r:?} exceeds {} gradients",
                    span.name,
                    grads.len()
                ),
            ));
        }
        let sum_sq: f64 = span
            .ranges
            .iter()
            .map(|r| {
                grads[r.clone()]
                    .par_chunks(1 << 15)
                    .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
                    .sum::<f64>()
            })
            .sum();
        let norm = sum_sq.sqrt();
        norms.push(norm as f32);
        if !norm.is_finite() {
            continue;
        }
        let coef = (max_norm as f64 / (norm + CLIP_EPS)).min(1.0) as f32;
        if coef < 1.0 {
            for r in &span.ranges {
                grads[r.clone()].par_iter_mut().for_each(|g| *g *= coef);
            }
        }
    }
    Ok(norms)
}
