//! The iBOT masked-patch loss.
//!
//! `M` masked patches (rows, in `mask_indices_list` order), `K` prototypes. Each patch's
//! cross-entropy is weighted by `masks_weight` (1 / masked patches of its crop), summed, and
//! divided by the number of **all** global crops `2B`, including unmasked ones (official).

use crate::backend::cpu::loss::{check_len, softmax_cross_entropy_forward_backward};
use crate::error::{Error, Result};
use crate::ssl::Centering;

/// The whole iBOT loss of a step: teacher targets `teacher_probs [M,K]` from `teacher_logits
/// [M,K]` by `centering` (softmax centering: center of the `M` masked rows, moved after use;
/// Sinkhorn-Knopp: `n_samples = M`), then [`ibot_loss_forward_backward`]. Returns the loss.
#[allow(clippy::too_many_arguments)]
pub fn ibot_loss_with_targets(
    teacher_probs: &mut [f32],
    dstudent: &mut [f32],
    centering: &mut Centering,
    student: &[f32],
    teacher_logits: &[f32],
    masks_weight: &[f32],
    n_global_crops: usize,
    m: usize,
    k: usize,
    teacher_temp: f32,
    student_temp: f32,
    loss_weight: f32,
) -> Result<f32> {
    centering.teacher_probs(teacher_probs, teacher_logits, m, k, teacher_temp)?;
    ibot_loss_forward_backward(
        dstudent,
        student,
        teacher_probs,
        masks_weight,
        n_global_crops,
        m,
        k,
        student_temp,
        loss_weight,
    )
}

/// Forward and backward of the iBOT loss. Returns the loss
/// `−(1/n_global_crops) Σ_i masks_weight[i] Σ_k P[i,k] log_softmax(s_i/ts)_k` (unweighted);
/// `dstudent [M,K]` is overwritten with `loss_weight · d loss / d student`.
///
/// `student [M,K]` (head logits of the masked patches), `teacher_probs [M,K]` (targets from
/// [`super::Centering`] over the `M` rows), `masks_weight [M]`.
#[allow(clippy::too_many_arguments)]
pub fn ibot_loss_forward_backward(
    dstudent: &mut [f32],
    student: &[f32],
    teacher_probs: &[f32],
    masks_weight: &[f32],
    n_global_crops: usize,
    m: usize,
    k: usize,
    student_temp: f32,
    loss_weight: f32,
) -> Result<f32> {
    const OP: &str = "ibot_loss";
    if n_global_crops == 0 {
        return Err(Error::shape(OP, "needs at least one global crop"));
    }
    check_len(OP, "student", student.len(), m * k)?;
    check_len(OP, "dstudent", dstudent.len(), m * k)?;
    check_len(OP, "teacher_probs", teacher_probs.len(), m * k)?;
    check_len(OP, "masks_weight", masks_weight.len(), m)?;
    if m == 0 {
        return Ok(0.0);
    }
    let inv_crops = 1.0 / n_global_crops as f64;
    let weights: Vec<f32> = masks_weight
        .iter()
        .map(|&w| (w as f64 * inv_crops * loss_weight as f64) as f32)
        .collect();
    let mut loss_rows = vec![0f32; m];
    softmax_cross_entropy_forward_backward(
        &mut loss_rows,
        dstudent,
        student,
        teacher_probs,
        &weights,
        m,
        m,
        k,
        student_temp,
    )?;
    let loss: f64 = loss_rows
        .iter()
        .zip(masks_weight)
        .map(|(&l, &w)| l as f64 * w as f64)
        .sum::<f64>()
        * inv_crops;
    Ok(loss as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divides_by_all_global_crops_and_weights_rows() {
        // Two masked patches with uniform targets over K = 2 and equal logits: CE = ln 2 each.
        let s = [0.0f32; 4];
        let p = [0.5f32; 4];
        let mut d = [0f32; 4];
        let w = [1.0f32, 0.5];
        let l = ibot_loss_forward_backward(&mut d, &s, &p, &w, 4, 2, 2, 0.1, 1.0).unwrap();
        assert!((l as f64 - 1.5 * std::f64::consts::LN_2 / 4.0).abs() < 1e-7);
        assert!(d.iter().all(|&v| v.abs() < 1e-7));
        assert!(ibot_loss_forward_backward(&mut d, &s, &p, &w, 0, 2, 2, 0.1, 1.0).is_err());
        assert_eq!(
            ibot_loss_forward_backward(&mut [], &[], &[], &[], 4, 0, 2, 0.1, 1.0).unwrap(),
            0.0
        );
    }
}
