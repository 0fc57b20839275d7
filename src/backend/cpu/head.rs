//! The DINO head's normalisations on the CPU (references of the CUDA `l2_normalize_*` and
//! `weight_norm_*` kernels): row L2 normalisation with `F.normalize`'s eps, and the
//! weight-normalised prototypes `W_k = g_k · v_k / ‖v_k‖` (no eps, as `weight_norm`).
//!
//! Dimensions: `rows` rows of `c` channels; `k` prototypes of `bn` (the bottleneck).

use rayon::prelude::*;

/// `z = y / max(‖y‖, eps)` per row, `norm = max(‖y‖, eps)`.
pub fn l2_normalize_forward(z: &mut [f32], norm: &mut [f32], y: &[f32], eps: f32, c: usize) {
    z.par_chunks_mut(c)
        .zip(norm.par_iter_mut())
        .zip(y.par_chunks(c))
        .for_each(|((z, n), y)| {
            let v = y.iter().map(|a| a * a).sum::<f32>().sqrt().max(eps);
            *n = v;
            z.iter_mut().zip(y).for_each(|(z, a)| *z = a / v);
        });
}

/// Backward of [`l2_normalize_forward`]: `dy = (dz − z (z·dz)) / norm` where the norm was not
/// clamped, `dz / eps` where it was.
pub fn l2_normalize_backward(
    dy: &mut [f32],
    dz: &[f32],
    z: &[f32],
    norm: &[f32],
    eps: f32,
    c: usize,
) {
    dy.par_chunks_mut(c)
        .zip(dz.par_chunks(c))
        .zip(z.par_chunks(c))
        .zip(norm.par_iter())
        .for_each(|(((dy, dz), z), &n)| {
            if n > eps {
                let dot: f32 = z.iter().zip(dz).map(|(a, b)| a * b).sum();
                for j in 0..c {
                    dy[j] = (dz[j] - z[j] * dot) / n;
                }
            } else {
                dy.iter_mut().zip(dz).for_each(|(d, g)| *d = g / n);
            }
        });
}

/// `w [k, bn] = g · v / ‖v‖` per prototype row, `inv_norm [k] = 1 / ‖v‖`.
pub fn weight_norm_forward(w: &mut [f32], inv_norm: &mut [f32], g: &[f32], v: &[f32], bn: usize) {
    w.par_chunks_mut(bn)
        .zip(inv_norm.par_iter_mut())
        .zip(v.par_chunks(bn))
        .zip(g.par_iter())
        .for_each(|(((w, inv), v), &g)| {
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            *inv = 1.0 / norm;
            let s = g / norm;
            w.iter_mut().zip(v).for_each(|(o, a)| *o = a * s);
        });
}

/// Backward of [`weight_norm_forward`] from `dw [k, bn]`: `dg_k += dW_k·v̂_k`,
/// `dv_k += (g_k/‖v_k‖)(dW_k − (dW_k·v̂_k) v̂_k)`.
pub fn weight_norm_backward(
    dg: &mut [f32],
    dv: &mut [f32],
    dw: &[f32],
    g: &[f32],
    v: &[f32],
    inv_norm: &[f32],
    bn: usize,
) {
    dg.par_iter_mut()
        .zip(dv.par_chunks_mut(bn))
        .enumerate()
        .for_each(|(r, (dg, dv))| {
            let vr = &v[r * bn..(r + 1) * bn];
            let dwr = &dw[r * bn..(r + 1) * bn];
            let inv = inv_norm[r];
            let dot = dwr.iter().zip(vr).map(|(a, b)| a * b).sum::<f32>() * inv; // dW_k · v̂_k
            *dg += dot;
            let s = g[r] * inv;
            for j in 0..bn {
                dv[j] += s * (dwr[j] - dot * vr[j] * inv);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_rows_have_unit_norm_and_clamped_rows_scale_by_eps() {
        let y = [3.0f32, 4.0, 0.0, 0.0];
        let (mut z, mut n) = (vec![0f32; 4], vec![0f32; 2]);
        l2_normalize_forward(&mut z, &mut n, &y, 1e-12, 2);
        assert_eq!((z[0], z[1], n[0], n[1]), (0.6, 0.8, 5.0, 1e-12));
        let mut dy = vec![0f32; 4];
        l2_normalize_backward(&mut dy, &[1.0, 0.0, 1e-12, 0.0], &z, &n, 1e-12, 2);
        // The gradient along z vanishes; the clamped row passes dz / eps.
        assert!((dy[0] - 0.64 / 5.0).abs() < 1e-7 && (dy[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn weight_norm_rows_have_norm_g() {
        let v = [3.0f32, 4.0, 1.0, 0.0];
        let (mut w, mut inv) = (vec![0f32; 4], vec![0f32; 2]);
        weight_norm_forward(&mut w, &mut inv, &[2.0, 0.5], &v, 2);
        assert_eq!((w[0], w[1], w[2], inv[0]), (1.2, 1.6, 0.5, 0.2));
    }
}
