//! The iBOT masked-patch loss over the backend's paired cross-entropy: masked patch `i`
//! against teacher row `i`, weighted `masks_weight[i] / n_global_crops` (the official loss
//! divides by all global crops, masked or not).

use crate::backend::{workspace, Backend, Storage};
use crate::error::{Error, Result};

workspace! {
    /// The pairing table of one step's masks, in a buffer that grows to the largest mask count
    /// (the masks' official upper bound on the first step), so later steps only copy.
    pub struct IbotPairs<B: Backend> {
        pairs: Option<B::Pairs>,
        capacity: usize,
        rows: usize,
    }
}

impl<B: Backend> IbotPairs<B> {
    /// Pairs masked patch i with teacher row i, weight `masks_weight[i] / n_global_crops`.
    pub fn set(
        &mut self,
        be: &mut B,
        masks_weight: &[f32],
        n_global_crops: usize,
        capacity_hint: usize,
    ) -> Result<()> {
        if n_global_crops == 0 {
            return Err(Error::shape("ibot loss", "needs at least one global crop"));
        }
        let m = masks_weight.len();
        let teacher: Vec<i32> = (0..m as i32).collect();
        let inv_crops = 1.0 / n_global_crops as f64;
        let weight: Vec<f32> = masks_weight
            .iter()
            .map(|&w| (w as f64 * inv_crops) as f32)
            .collect();
        if self.pairs.is_none() || self.capacity < m {
            self.capacity = m.max(capacity_hint).max(1);
            self.pairs = Some(be.pairs(self.capacity, 1)?);
        }
        let table = self
            .pairs
            .as_mut()
            .ok_or_else(|| Error::Unsupported("iBOT pairs missing".into()))?;
        be.set_pairs(table, m, &teacher, &weight)?;
        self.rows = m;
        Ok(())
    }

    /// Rows of the current table (`M`).
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Forward and backward of the iBOT loss over the `M` rows [`IbotPairs::set`] paired:
/// `loss [1]` = the unweighted loss, `ds [M, K]` (=) `loss_weight · d loss / d s`. `s [M, K]`
/// student logits of the masked patches, `teacher_probs [M, K]`.
#[allow(clippy::too_many_arguments)]
pub fn ibot_loss_forward_backward<B: Backend>(
    be: &mut B,
    pairs: &IbotPairs<B>,
    loss: &mut B::F32,
    ds: &mut B::F32,
    s: &B::F32,
    teacher_probs: &B::F32,
    k: usize,
    (student_temp, loss_weight): (f32, f32),
) -> Result<()> {
    let m = pairs.rows();
    if s.len() != m * k || teacher_probs.len() != m * k {
        return Err(Error::shape(
            "ibot loss",
            format!(
                "student {} / teacher {} values for {m} masked patches of {k}",
                s.len(),
                teacher_probs.len()
            ),
        ));
    }
    if m == 0 {
        return be.zero_f32(loss);
    }
    let table = pairs
        .pairs
        .as_ref()
        .ok_or_else(|| Error::Unsupported("iBOT pairs missing: IbotPairs::set first".into()))?;
    be.softmax_cross_entropy(
        loss,
        ds,
        s,
        teacher_probs,
        table,
        student_temp,
        loss_weight,
        k,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn divides_by_all_global_crops_and_weights_rows() {
        // Two masked patches with uniform targets over K = 2 and equal logits: CE = ln 2 each.
        let (s, p, w) = ([0.0f32; 4], [0.5f32; 4], [1.0f32, 0.5]);
        let mut be = CpuBackend::default();
        let mut pairs = IbotPairs::default();
        let (mut d, mut l) = ([0f32; 4], [0f32; 1]);
        pairs.set(&mut be, &w, 4, 0).unwrap();
        ibot_loss_forward_backward(&mut be, &pairs, &mut l, &mut d, &s, &p, 2, (0.1, 1.0)).unwrap();
        assert!((l[0] as f64 - 1.5 * std::f64::consts::LN_2 / 4.0).abs() < 1e-7);
        assert!(d.iter().all(|&v| v.abs() < 1e-7));
        assert!(pairs.set(&mut be, &w, 0, 0).is_err());
        pairs.set(&mut be, &[], 4, 0).unwrap();
        ibot_loss_forward_backward(&mut be, &pairs, &mut l, &mut [], &[], &[], 2, (0.1, 1.0))
            .unwrap();
        assert_eq!(l[0], 0.0);
    }
}
