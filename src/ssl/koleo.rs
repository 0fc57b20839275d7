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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::koleo::{koleo_backward, koleo_forward, KoleoSaved};
    use crate::backend::Accumulate;

    /// The CPU kernels' forward and backward together (the seam's KoLeo on the CPU).
    fn koleo_loss_forward_backward(
        dx: &mut [f32],
        x: &[f32],
        b: usize,
        d: usize,
        w: f32,
        acc: Accumulate,
    ) -> Result<f32> {
        let mut saved = KoleoSaved::default();
        let l = koleo_forward(&mut saved, x, b, d)?;
        koleo_backward(dx, &saved, w, b, d, acc)?;
        Ok(l)
    }
    use rand::Rng as _;

    fn koleo_f64(x: &[f64], b: usize, d: usize, nn: &[usize]) -> f64 {
        let xn: Vec<f64> = (0..b)
            .flat_map(|i| {
                let r = &x[i * d..(i + 1) * d];
                let n = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-8);
                r.iter().map(move |v| v / n)
            })
            .collect();
        -(0..b)
            .map(|i| {
                let j = nn[i];
                let s: f64 = (0..d)
                    .map(|c| (xn[i * d + c] - xn[j * d + c] + 1e-8).powi(2))
                    .sum();
                (s.sqrt() + 1e-8).ln()
            })
            .sum::<f64>()
            / b as f64
    }

    #[test]
    fn gradient_matches_finite_differences_through_both_ends_of_each_pair() {
        let (b, d) = (6, 5);
        let mut rng = crate::rng::keyed(3, &[crate::rng::stream::TEST]);
        let x: Vec<f32> = (0..b * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut dx = vec![7f32; b * d];
        let mut saved = KoleoSaved::default();
        let l = koleo_forward(&mut saved, &x, b, d).unwrap();
        let loss =
            koleo_loss_forward_backward(&mut dx, &x, b, d, 0.5, Accumulate::Overwrite).unwrap();
        assert_eq!(l, loss);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        assert!((koleo_f64(&x64, b, d, &saved.nn) - loss as f64).abs() < 1e-5);
        for i in 0..b * d {
            let h = 1e-6;
            let (mut a, mut c) = (x64.clone(), x64.clone());
            a[i] += h;
            c[i] -= h;
            let fd =
                0.5 * (koleo_f64(&a, b, d, &saved.nn) - koleo_f64(&c, b, d, &saved.nn)) / (2.0 * h);
            assert!(
                (dx[i] as f64 - fd).abs() < 1e-3 * fd.abs().max(1.0),
                "{i}: {} {fd}",
                dx[i]
            );
        }
        // Accumulate adds on top.
        let mut acc = vec![1f32; b * d];
        koleo_loss_forward_backward(&mut acc, &x, b, d, 0.5, Accumulate::Add).unwrap();
        for (a, g) in acc.iter().zip(&dx) {
            assert!((a - 1.0 - g).abs() < 1e-6);
        }
        assert!(
            koleo_loss_forward_backward(&mut dx[..d], &x[..d], 1, d, 1.0, Accumulate::Add).is_err()
        );
    }

    #[test]
    fn zero_rows_and_exact_duplicates_stay_finite() {
        let (b, d) = (4, 3);
        let x = [
            0.0f32, 0.0, 0.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, -1.0, 0.5, 0.0,
        ];
        let mut dx = vec![0f32; b * d];
        let loss =
            koleo_loss_forward_backward(&mut dx, &x, b, d, 1.0, Accumulate::Overwrite).unwrap();
        assert!(loss.is_finite());
        assert!(dx.iter().all(|v| v.is_finite()));
        // The duplicates sit at distance ‖eps·1‖ from each other: a large loss term.
        assert!(loss > 4.0);
        let mut bad = x;
        bad[4] = f32::NAN;
        assert!(
            koleo_loss_forward_backward(&mut dx, &bad, b, d, 1.0, Accumulate::Overwrite).is_err()
        );
    }
}
