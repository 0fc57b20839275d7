//! The teacher EMA over the flat buffers: `teacher = m · teacher + (1 − m) · student`, every
//! parameter (weight_g, LayerScale, mask_token included), after the optimizer step.

use crate::backend::{Backend, Storage};
use crate::error::{Error, Result};

/// Updates `teacher [P]` towards `student [P]` with momentum `m ∈ [0, 1]`.
pub fn ema_update<B: Backend>(
    be: &mut B,
    teacher: &mut B::F32,
    student: &B::F32,
    momentum: f64,
) -> Result<()> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::Config(format!(
            "teacher momentum must lie in [0, 1], got {momentum}"
        )));
    }
    if teacher.len() != student.len() {
        return Err(Error::shape(
            "ema_update",
            format!(
                "teacher {} / student {} values",
                teacher.len(),
                student.len()
            ),
        ));
    }
    be.ema_update(teacher, student, momentum)
}
