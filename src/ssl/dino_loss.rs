//! The DINO CLS-token loss with the official crop pairing and denominators.
//!
//! `B` images, `nl` local crops, `K` prototypes. Global rows are crop-major (`[0, B)` crop A,
//! `[B, 2B)` crop B), local rows too. Each global student crop is paired only with the teacher
//! of the *other* global crop; every local crop with both teachers. Every pair contributes the
//! mean over images of its cross-entropy, and the pair sums are divided by
//! `Dn = 2 + max(2·nl, 1)` (so with no local crop the global term is divided by 3: official).

use crate::backend::cpu::loss::{check_len, softmax_cross_entropy_forward_backward};
use crate::error::{Error, Result};
use crate::ssl::Centering;

/// The official student temperature.
pub const STUDENT_TEMP: f32 = 0.1;

/// The DINO loss terms of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DinoLossTerms {
    /// `dino_local_crops_loss` (unweighted, 0 without local crops).
    pub local: f32,
    /// `dino_global_crops_loss` (unweighted).
    pub global: f32,
    /// `loss_weight · (local + global)`: the value the gradients belong to.
    pub total: f32,
}

/// The DINO loss denominator `2 + max(2·nl, 1)`.
pub fn dino_loss_denominator(n_local: usize) -> usize {
    2 + (2 * n_local).max(1)
}

/// Forward and backward of the DINO CLS loss.
///
/// Inputs: `student_global [2B,K]`, `student_local [nl·B,K]` (head logits), `teacher_probs
/// [2B,K]` (targets in the same natural row order, from [`super::Centering`]). Outputs (both
/// overwritten): `dstudent_global [2B,K]`, `dstudent_local [nl·B,K]` = d total / d logits.
#[allow(clippy::too_many_arguments)]
pub fn dino_loss_forward_backward(
    dstudent_global: &mut [f32],
    dstudent_local: &mut [f32],
    student_global: &[f32],
    student_local: &[f32],
    teacher_probs: &[f32],
    n_img: usize,
    n_local: usize,
    k: usize,
    student_temp: f32,
    loss_weight: f32,
) -> Result<DinoLossTerms> {
    const OP: &str = "dino_loss";
    let b = n_img;
    if b == 0 || k == 0 {
        return Err(Error::shape(
            OP,
            format!("needs images and prototypes, got B {b}, K {k}"),
        ));
    }
    check_len(OP, "student_global", student_global.len(), 2 * b * k)?;
    check_len(OP, "dstudent_global", dstudent_global.len(), 2 * b * k)?;
    check_len(OP, "teacher_probs", teacher_probs.len(), 2 * b * k)?;
    check_len(OP, "student_local", student_local.len(), n_local * b * k)?;
    check_len(OP, "dstudent_local", dstudent_local.len(), n_local * b * k)?;
    let scale = 1.0 / (b as f64 * dino_loss_denominator(n_local) as f64);
    let weights = vec![(loss_weight as f64 * scale) as f32; n_local.max(2) * b];
    let (p_a, p_b) = teacher_probs.split_at(b * k);

    // Global: S_A against P_B, S_B against P_A.
    let mut loss_rows = vec![0f32; n_local.max(2) * b];
    let (s_a, s_b) = student_global.split_at(b * k);
    let (d_a, d_b) = dstudent_global.split_at_mut(b * k);
    let (l_a, l_rest) = loss_rows.split_at_mut(b);
    for (d, s, p, l) in [(d_a, s_a, p_b, l_a), (d_b, s_b, p_a, &mut l_rest[..b])] {
        softmax_cross_entropy_forward_backward(l, d, s, p, &weights[..b], b, b, k, student_temp)?;
    }
    let global = loss_rows[..2 * b].iter().map(|&v| v as f64).sum::<f64>() * scale;

    // Local: each crop against P_A + P_B (the cross-entropy is linear in the target).
    let mut local = 0.0;
    if n_local > 0 {
        let p_sum: Vec<f32> = p_a.iter().zip(p_b).map(|(&x, &y)| x + y).collect(); // [B,K]
        let rows = n_local * b;
        softmax_cross_entropy_forward_backward(
            &mut loss_rows[..rows],
            dstudent_local,
            student_local,
            &p_sum,
            &weights[..rows],
            rows,
            b,
            k,
            student_temp,
        )?;
        local = loss_rows[..rows].iter().map(|&v| v as f64).sum::<f64>() * scale;
    }
    Ok(DinoLossTerms {
        local: local as f32,
        global: global as f32,
        total: (loss_weight as f64 * (local + global)) as f32,
    })
}

/// The whole DINO loss of a step: teacher targets `teacher_probs [2B,K]` from `teacher_global
/// [2B,K]` (natural row order) by `centering` (all `2B` rows jointly; the softmax center moves
/// after use), then [`dino_loss_forward_backward`].
#[allow(clippy::too_many_arguments)]
pub fn dino_loss_with_targets(
    teacher_probs: &mut [f32],
    dstudent_global: &mut [f32],
    dstudent_local: &mut [f32],
    centering: &mut Centering,
    student_global: &[f32],
    student_local: &[f32],
    teacher_global: &[f32],
    n_img: usize,
    n_local: usize,
    k: usize,
    teacher_temp: f32,
    student_temp: f32,
    loss_weight: f32,
) -> Result<DinoLossTerms> {
    centering.teacher_probs(teacher_probs, teacher_global, 2 * n_img, k, teacher_temp)?;
    dino_loss_forward_backward(
        dstudent_global,
        dstudent_local,
        student_global,
        student_local,
        teacher_probs,
        n_img,
        n_local,
        k,
        student_temp,
        loss_weight,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denominator_is_official_including_the_no_local_quirk() {
        assert_eq!(dino_loss_denominator(8), 18);
        assert_eq!(dino_loss_denominator(2), 6);
        assert_eq!(dino_loss_denominator(0), 3);
    }

    #[test]
    fn pairs_each_global_crop_with_the_other_teacher_only() {
        // B = 1, K = 2. Teacher A is one-hot on prototype 0, teacher B on prototype 1.
        let p = [1.0f32, 0.0, 0.0, 1.0];
        // Student A is confident in prototype 1 (agrees with teacher B): small loss. Student B
        // confident in prototype 0 (agrees with teacher A): small loss. Same-view pairing
        // would give a large loss.
        let s = [0.0f32, 2.0, 2.0, 0.0];
        let mut d = [0f32; 4];
        let t =
            dino_loss_forward_backward(&mut d, &mut [], &s, &[], &p, 1, 0, 2, 0.1, 1.0).unwrap();
        let ce = (1.0f64 + (-20.0f64).exp()).ln(); // −log softmax([20, 0])_0
        assert!((t.global as f64 - 2.0 * ce / 3.0).abs() < 1e-7);
        assert_eq!(t.local, 0.0);
        assert!(
            dino_loss_forward_backward(&mut d, &mut [], &s[..3], &[], &p, 1, 0, 2, 0.1, 1.0)
                .is_err()
        );
    }
}
