//! The KoLeo regulariser on the student backbone's CLS tokens (before any head), applied to each
//! global crop's `B` vectors separately by the training step.

use crate::backend::Backend;
use crate::error::Result;

/// The official KoLeo weight (`dino.koleo_loss_weight`).
pub const KOLEO_LOSS_WEIGHT: f32 = 0.1;

/// Forward and backward of KoLeo on `x [b, d]` on a backend: `loss [1]` = KoLeo(x)
/// (unweighted), `dx [b, d]` = `loss_weight · d KoLeo / d x` (written).
#[allow(clippy::too_many_arguments)]
pub fn koleo_loss_forward_backward<B: Backend>(
    be: &mut B,
    state: &mut B::Koleo,
    loss: &mut B::F32,
    dx: &mut B::F32,
    x: &B::F32,
    (b, d): (usize, usize),
    loss_weight: f32,
) -> Result<()> {
    be.koleo_forward(loss, state, x, b, d)?;
    be.koleo_backward(dx, state, loss_weight, b, d)
}
