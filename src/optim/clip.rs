//! Gradient clipping by total norm, per student submodule (backbone, dino_head, ibot_head
//! separately, as the official loop clips each FSDP module on its own).

use crate::backend::{Backend, Storage};
use crate::error::{Error, Result};
use crate::nn::params::ParamTable;
use std::ops::Range;

pub use crate::backend::CLIP_EPS;

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

/// Gradient clipping per submodule on a backend: one contiguous range of the flat buffer per
/// submodule (the model registers its submodules one after the other), and the norms of the
/// last clip on the backend, where the SSL step's `read` picks them up.
pub struct GradClipper<B: Backend> {
    spans: Vec<(String, Range<usize>)>,
    /// `[S]` gradient norms of the last [`GradClipper::clip`], before clipping.
    norms: B::BufF32,
}

impl<B: Backend> GradClipper<B> {
    pub fn new(be: &mut B, spans: &[SubmoduleSpan]) -> Result<Self> {
        let spans = spans
            .iter()
            .map(|s| match s.ranges.as_slice() {
                [r] => Ok((s.name.clone(), r.clone())),
                _ => Err(Error::Unsupported(format!(
                    "gradient clipping needs each submodule in one range of the flat buffer; \
                     {} has {:?}",
                    s.name, s.ranges
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GradClipper {
            norms: be.alloc_f32(spans.len())?,
            spans,
        })
    }

    /// The submodule names, in the order of the norms.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.spans.iter().map(|(name, _)| name.as_str())
    }

    /// `[S]` the norms of the last clip (on the backend).
    pub fn norms(&self) -> &B::F32 {
        &self.norms
    }

    /// Clips each submodule's gradients to total L2 norm `max_norm`:
    /// `coef = min(max_norm / (norm + 1e-6), 1)`, `g *= coef`; the norms measured before
    /// clipping stay on the backend ([`GradClipper::norms`]). A non-finite norm leaves that
    /// submodule's gradients unscaled (the caller sees the norm and skips the step).
    pub fn clip(&mut self, be: &mut B, grads: &mut B::F32, max_norm: f32) -> Result<()> {
        if max_norm.is_nan() || max_norm <= 0.0 {
            return Err(Error::Config(format!(
                "clip_grad must be positive, got {max_norm}"
            )));
        }
        for (i, (name, range)) in self.spans.iter().enumerate() {
            if range.end > grads.len() {
                return Err(Error::shape(
                    "clip_grad_norms",
                    format!("{name}: range {range:?} exceeds {} gradients", grads.len()),
                ));
            }
            let mut g = grads.window_mut(range.clone())?;
            let mut norm = self.norms.window_mut(i..i + 1)?;
            be.clip_grad_norm(&mut g, &mut norm, max_norm)?;
        }
        Ok(())
    }
}
