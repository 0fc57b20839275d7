//! Kernel tests of the method's operations on every backend: masked patches, Sinkhorn-Knopp,
//! KoLeo, teacher targets and the DINO/iBOT cross-entropy, and the optimizer family. Each check
//! runs through the `Backend` trait on the CPU (always, in f32) and on CUDA when a device opens
//! (skipping with a message otherwise), against f64 references. These paths run in f32 on both
//! backends, so the bounds are f32-sized (1e-6 .. 1e-4). A few checks run on the CPU only, where
//! they test what only the CPU backend promises (said at each).

mod kernel_support;

use dinotrain::backend::{
    AdamWBuffers, AdamWStep, Backend, HeadOps, LossOps, NormShape, PatchLayout, Storage,
};
use dinotrain::ssl::dino_loss::{dino_loss_denominator, dino_terms};
use dinotrain::ssl::{
    dino_loss_forward_backward, koleo_loss_forward_backward, Centering, DinoPairs, DinoStudent,
    TargetState,
};
use dinotrain::Error;
use kernel_support::reference::{koleo_loss_f64, koleo_reference, sinkhorn_reference};
use kernel_support::{
    as_operand, assert_close, assert_each_close, bits, cpu, down, down_half, gpu, nans, nans_half,
    randn, rel_err, to_f64, uniform, up, up_i64, up_u8, Tol,
};

/// The draws the CPU unit tests used (uniform in `[-scale, scale)`).
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    dinotrain::rng::uniform_vec(seed, n, scale)
}

// ---- masked patches -----------------------------------------------------------------------

fn check_masked_patches<B: Backend>(be: &mut B, tol: Tol) {
    let layout = PatchLayout {
        crops: 4,
        tokens: 21,
        patches: 16,
        token_offset: 5,
        channels: 64,
    };
    let c = layout.channels;
    let rows = layout.crops * layout.patches;
    let masks: Vec<u8> = uniform(1, rows, 0.0, 1.0)
        .iter()
        .map(|&u| (u < 0.4) as u8)
        .collect();
    let x = randn(2, rows * c, 1.0);
    let token = randn(3, c, 1.0);
    let (d_masks, d_token) = (up_u8(be, &masks), up(be, &token));
    let mut d_x = up(be, &x);
    be.mask_token_substitute(&mut d_x, &d_masks, &d_token, c)
        .unwrap();
    let expected: Vec<f32> = (0..rows * c)
        .map(|i| {
            if masks[i / c] == 1 {
                token[i % c]
            } else {
                x[i]
            }
        })
        .collect();
    assert_eq!(down(be, &d_x), expected);

    let dx = randn(4, rows * c, 1.0);
    let dtoken0 = randn(5, c, 1.0);
    let mut d_dx = up(be, &dx);
    let mut d_dtoken = up(be, &dtoken0);
    be.mask_token_backward(&mut d_dtoken, &mut d_dx, &d_masks, c)
        .unwrap();
    let mut ref_dtoken = to_f64(&dtoken0);
    let mut ref_dx = dx.clone();
    for r in (0..rows).filter(|&r| masks[r] == 1) {
        for k in 0..c {
            ref_dtoken[k] += dx[r * c + k] as f64;
            ref_dx[r * c + k] = 0.0;
        }
    }
    assert_eq!(down(be, &d_dx), ref_dx);
    let got = down(be, &d_dtoken);
    assert_close(
        "mask_token_backward dmask_token",
        &got,
        &ref_dtoken,
        tol.at(1e-6),
    );

    let indices: Vec<i64> = (0..rows as i64)
        .filter(|&i| masks[i as usize] == 1)
        .collect();
    let m = indices.len();
    let tokens = randn(6, layout.crops * layout.tokens * c, 1.0);
    let d_indices = up_i64(be, &indices);
    let d_tokens = up(be, &tokens);
    let mut gathered = nans(be, m * c);
    be.gather_rows(&mut gathered, &d_tokens, &d_indices, &indices, layout)
        .unwrap();
    let row_of = |flat: i64| {
        let flat = flat as usize;
        (flat / layout.patches) * layout.tokens + layout.token_offset + flat % layout.patches
    };
    let ref_gathered: Vec<f32> = indices
        .iter()
        .flat_map(|&i| tokens[row_of(i) * c..(row_of(i) + 1) * c].to_vec())
        .collect();
    assert_eq!(down(be, &gathered), ref_gathered);

    let dgathered = randn(7, m * c, 1.0);
    let d_dgathered = up(be, &dgathered);
    let mut dtokens = up(be, &tokens);
    be.scatter_rows_add(&mut dtokens, &d_dgathered, &d_indices, &indices, layout)
        .unwrap();
    let mut ref_dtokens = tokens.clone();
    for (mi, &i) in indices.iter().enumerate() {
        for k in 0..c {
            ref_dtokens[row_of(i) * c + k] += dgathered[mi * c + k];
        }
    }
    assert_eq!(down(be, &dtokens), ref_dtokens);

    let unsorted = vec![3i64, 1];
    let d_unsorted = up_i64(be, &unsorted);
    let mut two = nans(be, 2 * c);
    assert!(matches!(
        be.gather_rows(&mut two, &d_tokens, &d_unsorted, &unsorted, layout),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn mask_tokens_and_patch_gather_scatter_match_reference() {
    check_masked_patches(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_masked_patches(&mut gpu, Tol::CUDA);
}

// ---- Sinkhorn-Knopp -----------------------------------------------------------------------

#[test]
fn sinkhorn_reference_rows_sum_to_one() {
    let (r, k) = (5, 12);
    let q = sinkhorn_reference(&uniform(65, r * k, -1.0, 1.0), r, k, 0.05, 3);
    for i in 0..r {
        assert!((q[i * k..(i + 1) * k].iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

/// Sinkhorn-Knopp targets against the literal algorithm, up to K = 131072, and every sample's
/// targets summing to one.
fn check_sinkhorn<B: Backend>(be: &mut B, tol: Tol) {
    // Head logits are cosine similarities (normalised features, weight-normed prototypes with
    // g = 1): in [-1, 1].
    let cases = [
        (37, 1000, 0.05f32, 3, uniform(60, 37 * 1000, -1.0, 1.0)),
        (6, 40, 0.04, 3, uniform(61, 6 * 40, -1.0, 1.0)),
        (64, 131_072, 0.07, 3, uniform(62, 64 * 131_072, -1.0, 1.0)),
        (6, 40, 0.04, 3, random(6 * 40, 6, 1.0)),
        (16, 1000, 0.07, 3, random(16 * 1000, 16, 1.0)),
        (7, 9, 0.05, 5, random(7 * 9, 7, 1.0)),
    ];
    for (r, k, tt, iters, t) in cases {
        let d_t = up(be, &t);
        let mut q = nans(be, r * k);
        be.sinkhorn_knopp(&mut q, &d_t, k, tt, iters).unwrap();
        let got = down(be, &q);
        let reference = sinkhorn_reference(&t, r, k, tt as f64, iters);
        let name = format!("sinkhorn {r}x{k} tt {tt}, {iters} iterations");
        assert_close(&name, &got, &reference, tol.at(1e-4));
        for (i, row) in got.chunks(k).enumerate() {
            let sum: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((sum - 1.0).abs() < 1e-5, "{name}: row {i} sums to {sum}");
        }
    }
}

#[test]
fn sinkhorn_knopp_matches_the_literal_algorithm() {
    check_sinkhorn(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_sinkhorn(&mut gpu, Tol::CUDA);
}

/// Guards against "simplifying" the kernel to a per-row max: it is not equivalent.
fn check_sinkhorn_is_changed_by_a_per_sample_shift<B: Backend>(be: &mut B) {
    let (r, k) = (4, 50);
    let t = random(r * k, 11, 1.0);
    let mut shifted = t.clone();
    for v in &mut shifted[..k] {
        *v -= 0.5;
    }
    let (d_t, d_shifted) = (up(be, &t), up(be, &shifted));
    let (mut a, mut b) = (nans(be, r * k), nans(be, r * k));
    be.sinkhorn_knopp(&mut a, &d_t, k, 0.1, 3).unwrap();
    be.sinkhorn_knopp(&mut b, &d_shifted, k, 0.1, 3).unwrap();
    let (a, b) = (down(be, &a), down(be, &b));
    assert!(rel_err(&a, &to_f64(&b)) > 1e-4);
}

#[test]
fn sinkhorn_is_changed_by_a_per_sample_shift() {
    check_sinkhorn_is_changed_by_a_per_sample_shift(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_sinkhorn_is_changed_by_a_per_sample_shift(&mut gpu);
}

/// |t| / tt up to 250: `exp` would overflow in f32 without a shift. The CPU shifts each
/// prototype by its maximum over the samples (exactly cancelling), so any logits work and a
/// global shift changes nothing. (The CUDA kernels shift by the global maximum only, enough
/// for the head's cosine-similarity logits, |t| <= 1.)
#[test]
fn cpu_sinkhorn_with_large_logits_does_not_overflow_and_ignores_a_global_shift() {
    let mut be = cpu();
    let (r, k) = (8, 300);
    let t = random(r * k, 9, 10.0);
    let shifted: Vec<f32> = t.iter().map(|v| v - 3.0).collect();
    let (mut a, mut b) = (vec![0f32; r * k], vec![0f32; r * k]);
    be.sinkhorn_knopp(&mut a, &t, k, 0.04, 3).unwrap();
    assert!(a.iter().all(|v| v.is_finite()));
    be.sinkhorn_knopp(&mut b, &shifted, k, 0.04, 3).unwrap();
    assert!(rel_err(&a, &to_f64(&b)) < 1e-5);
}

fn check_sinkhorn_rejects_bad_shapes_and_temperatures<B: Backend>(be: &mut B) {
    let mut out = nans(be, 6);
    let (five, six) = (up(be, &[0.0; 5]), up(be, &[0.0; 6]));
    assert!(be.sinkhorn_knopp(&mut out, &five, 3, 0.1, 3).is_err());
    assert!(be.sinkhorn_knopp(&mut out, &six, 3, 0.0, 3).is_err());
}

#[test]
fn sinkhorn_rejects_bad_shapes_and_temperatures() {
    check_sinkhorn_rejects_bad_shapes_and_temperatures(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_sinkhorn_rejects_bad_shapes_and_temperatures(&mut gpu);
}

/// What the CPU also refuses (the CUDA kernels check shapes and the temperature only): no
/// iteration, a non-finite logit, and a sample whose weights all underflow (its logits are more
/// than ~87·tt below every prototype's best sample), which the official code turns into NaN.
#[test]
fn cpu_sinkhorn_rejects_no_iterations_non_finite_logits_and_vanishing_samples() {
    let mut be = cpu();
    let mut out = vec![0f32; 6];
    assert!(be.sinkhorn_knopp(&mut out, &[0.0; 6], 3, 0.1, 0).is_err());
    let nan = [0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0];
    assert!(be.sinkhorn_knopp(&mut out, &nan, 3, 0.1, 3).is_err());
    // Sample 1 is 100 below sample 0 on every prototype: its weights underflow.
    let t = [0.0, 0.0, 0.0, -100.0, -100.0, -100.0];
    assert!(be.sinkhorn_knopp(&mut out, &t, 3, 0.04, 3).is_err());
}

// ---- KoLeo --------------------------------------------------------------------------------

#[test]
fn koleo_reference_gradient_matches_finite_differences() {
    // Runs everywhere: checks the f64 reference that the KoLeo checks trust.
    let (b, d) = (6, 5);
    let x = randn(75, b * d, 1.0);
    let (_, grad) = koleo_reference(&x, b, d);
    let step = 1e-4f64;
    for (i, &analytic) in grad.iter().enumerate() {
        // The reference takes f32 input: perturb in f64 through a tiny re-implementation.
        let loss_at = |delta: f64| {
            let xs: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(j, &v)| v as f64 + if j == i { delta } else { 0.0 })
                .collect();
            koleo_loss_f64(&xs, b, d)
        };
        let numeric = (loss_at(step) - loss_at(-step)) / (2.0 * step);
        assert!(
            (numeric - analytic).abs() < 1e-6 * (1.0 + analytic.abs()),
            "dx[{i}]: {numeric} vs {analytic}"
        );
    }
    let (loss, _) = koleo_reference(&x, b, d);
    let xs = to_f64(&x);
    assert!((loss - koleo_loss_f64(&xs, b, d)).abs() < 1e-12);
}

/// The six rows of five features the CPU unit test drew.
fn koleo_small_input() -> Vec<f32> {
    use rand::Rng as _;
    let mut rng = dinotrain::rng::keyed(3, &[dinotrain::rng::stream::TEST]);
    (0..6 * 5).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// KoLeo's loss and weighted gradient (the method's `koleo_loss_forward_backward` over the
/// backend's forward and backward) against f64, up to the kernels' largest feature dim; fewer
/// than two rows are refused.
fn check_koleo<B: Backend>(be: &mut B, tol: Tol) {
    let cases = [
        (16, 32, randn(70, 16 * 32, 1.0)),
        (64, 384, randn(71, 64 * 384, 1.0)),
        (9, 2048, randn(72, 9 * 2048, 1.0)),
        (6, 5, koleo_small_input()),
    ];
    let dloss = 0.7f32;
    for (b, d, x) in cases {
        let d_x = up(be, &x);
        let mut state = be.koleo_state(b, d).unwrap();
        let (mut loss, mut dx) = (nans(be, 1), nans(be, b * d));
        koleo_loss_forward_backward(be, &mut state, &mut loss, &mut dx, &d_x, (b, d), dloss)
            .unwrap();
        let (ref_loss, ref_dx) = koleo_reference(&x, b, d);
        let ref_dx: Vec<f64> = ref_dx.iter().map(|v| v * dloss as f64).collect();
        let got = down(be, &loss);
        assert_close(
            &format!("koleo loss b{b} d{d}"),
            &got,
            &[ref_loss],
            tol.at(1e-5),
        );
        let got = down(be, &dx);
        assert_close(&format!("koleo dx b{b} d{d}"), &got, &ref_dx, tol.at(1e-4));
        // The forward alone gives the same loss.
        let mut alone = nans(be, 1);
        be.koleo_forward(&mut alone, &mut state, &d_x, b, d)
            .unwrap();
        assert_eq!(bits(&down(be, &alone)), bits(&down(be, &loss)));
    }
    let one_row = up(be, &[1.0, 2.0, 3.0]);
    let mut state = be.koleo_state(1, 3).unwrap();
    let mut loss = nans(be, 1);
    assert!(be
        .koleo_forward(&mut loss, &mut state, &one_row, 1, 3)
        .is_err());
}

#[test]
fn koleo_forward_and_backward_match_f64() {
    check_koleo(&mut cpu(), Tol::f32(3e-6));
    let Some(mut gpu) = gpu() else { return };
    check_koleo(&mut gpu, Tol::CUDA);
}

/// A zero row and two identical rows (at distance ‖eps·1‖ from each other: a large loss
/// term) stay finite.
fn check_koleo_zero_rows_and_exact_duplicates<B: Backend>(be: &mut B) {
    let (b, d) = (4, 3);
    let x = [
        0.0f32, 0.0, 0.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, -1.0, 0.5, 0.0,
    ];
    let d_x = up(be, &x);
    let mut state = be.koleo_state(b, d).unwrap();
    let (mut loss, mut dx) = (nans(be, 1), nans(be, b * d));
    koleo_loss_forward_backward(be, &mut state, &mut loss, &mut dx, &d_x, (b, d), 1.0).unwrap();
    let loss = down(be, &loss)[0];
    assert!(loss.is_finite());
    assert!(down(be, &dx).iter().all(|v| v.is_finite()));
    assert!(loss > 4.0, "{loss}");
}

#[test]
fn koleo_of_zero_rows_and_exact_duplicates_stays_finite() {
    let mut be = cpu();
    check_koleo_zero_rows_and_exact_duplicates(&mut be);
    // The CPU also refuses non-finite input (the CUDA kernels do not look).
    let mut bad = [
        0.0f32, 0.0, 0.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, -1.0, 0.5, 0.0,
    ];
    bad[4] = f32::NAN;
    let mut state = be.koleo_state(4, 3).unwrap();
    let mut loss = [0f32];
    assert!(be.koleo_forward(&mut loss, &mut state, &bad, 4, 3).is_err());
    let Some(mut gpu) = gpu() else { return };
    check_koleo_zero_rows_and_exact_duplicates(&mut gpu);
}

/// The DINO head's row L2 normalisation, forward (f32 and as an operand) and backward, with
/// one row below `eps` (clamped: `z = y / eps`, `dy = dz / eps`).
fn check_l2_normalize<B: Backend>(be: &mut B, tol: Tol) {
    let (rows, c, eps, small) = (37, 64, 1e-3f32, 5);
    let shape = NormShape { rows, channels: c };
    let mut y = randn(110, rows * c, 1.0);
    y[small * c..(small + 1) * c]
        .iter_mut()
        .for_each(|v| *v *= 1e-5);
    let dz = randn(111, rows * c, 1.0);
    let (d_y, d_dz) = (up(be, &y), up(be, &dz));
    let (mut z, mut z_half, mut norm) =
        (nans(be, rows * c), nans_half(be, rows * c), nans(be, rows));
    be.l2_normalize_forward(&mut z, &mut z_half, &mut norm, &d_y, eps, shape)
        .unwrap();
    let (mut dy, mut dy_half) = (nans(be, rows * c), nans_half(be, rows * c));
    be.l2_normalize_backward(&mut dy, &mut dy_half, &d_dz, &z, &norm, eps, shape)
        .unwrap();
    let norms: Vec<f64> = y
        .chunks(c)
        .map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    assert!(norms[small] < eps as f64 && norms.iter().filter(|&&n| n < eps as f64).count() == 1);
    let (mut ref_z, mut ref_dy) = (vec![0.0f64; rows * c], vec![0.0f64; rows * c]);
    for (r, &norm) in norms.iter().enumerate() {
        let n = norm.max(eps as f64);
        let range = r * c..(r + 1) * c;
        let zr: Vec<f64> = y[range.clone()].iter().map(|&v| v as f64 / n).collect();
        let dot: f64 = if r == small {
            0.0
        } else {
            zr.iter()
                .zip(&dz[range.clone()])
                .map(|(a, &b)| a * b as f64)
                .sum()
        };
        for (j, i) in range.enumerate() {
            ref_z[i] = zr[j];
            ref_dy[i] = (dz[i] as f64 - zr[j] * dot) / n;
        }
    }
    // The unclamped rows, then the clamped row on its own (its gradient is 1/eps larger).
    let (z, z_half, dy, dy_half) = (
        down(be, &z),
        down_half(be, &z_half),
        down(be, &dy),
        down_half(be, &dy_half),
    );
    let (z_op, dy_op) = (as_operand(be, &ref_z), as_operand(be, &ref_dy));
    for clamped in [false, true] {
        let pick = |v: &[f32]| rows_where(v, c, |r| (r == small) == clamped);
        let pick_ref = |v: &[f64]| rows_where(v, c, |r| (r == small) == clamped);
        let name = |what: &str| format!("l2_normalize {what} (clamped row: {clamped})");
        assert_close(&name("z"), &pick(&z), &pick_ref(&ref_z), tol.at(1e-6));
        let (got, want) = (pick(&z_half), pick_ref(&z_op));
        assert_close(&name("z operand"), &got, &want, tol.at(1e-4));
        assert_close(&name("dy"), &pick(&dy), &pick_ref(&ref_dy), tol.at(1e-5));
        let (got, want) = (pick(&dy_half), pick_ref(&dy_op));
        assert_close(&name("dy operand"), &got, &want, tol.at(1e-4));
    }
    // The norms of the rows that were not clamped. (A clamped row's stored norm differs: the
    // CPU keeps max(‖y‖, eps), CUDA ‖y‖; both backwards read it as max(·, eps).)
    let got = rows_where(&down(be, &norm), 1, |r| r != small);
    let want = rows_where(&norms, 1, |r| r != small);
    assert_close("l2_normalize norm", &got, &want, tol.at(1e-6));
}

/// The rows of `v` (rows of `c`) whose index passes `keep`, concatenated.
fn rows_where<T: Copy>(v: &[T], c: usize, keep: impl Fn(usize) -> bool) -> Vec<T> {
    let rows = v.chunks(c).enumerate().filter(|(r, _)| keep(*r));
    rows.flat_map(|(_, row)| row.to_vec()).collect()
}

#[test]
fn l2_normalize_forward_and_backward_match_f64() {
    check_l2_normalize(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_l2_normalize(&mut gpu, Tol::CUDA);
}

// ---- teacher targets and the DINO / iBOT cross-entropy ------------------------------------

/// Teacher softmax with centering, the centre EMA and the paired cross-entropy of the DINO
/// loss (each global crop with the other teacher, each local crop with both) at K = 65536.
fn check_dino_loss_with_centering<B: Backend>(be: &mut B, tol: Tol) {
    let (n_img, n_local, k) = (3usize, 2usize, 65_536usize);
    let (tt, ts, momentum, weight) = (0.04f32, 0.1f32, 0.9f64, 1.0f32);
    let rt = 2 * n_img;
    let rs = rt + n_local * n_img;
    let teacher = randn(80, rt * k, 2.0);
    let center = randn(81, k, 0.5);
    let student = randn(82, rs * k, 2.0);
    let (d_teacher, d_center, d_student) = (up(be, &teacher), up(be, &center), up(be, &student));

    let mut probs = nans(be, rt * k);
    be.teacher_softmax(&mut probs, &d_teacher, Some(&d_center), tt, k)
        .unwrap();
    let mut center_new = nans(be, k);
    be.center_ema(&mut center_new, &d_teacher, &d_center, momentum, k)
        .unwrap();

    // Pairing: global A <- teacher B, global B <- teacher A, each local <- both.
    let dn = 2 + (2 * n_local).max(1);
    let w = weight / (dn * n_img) as f32;
    let mut pair_teacher = Vec::new();
    let mut pair_weight = Vec::new();
    for r in 0..rs {
        let (t0, t1) = if r < n_img {
            ((r + n_img) as i32, -1)
        } else if r < rt {
            ((r - n_img) as i32, -1)
        } else {
            let b = (r - rt) % n_img;
            (b as i32, (b + n_img) as i32)
        };
        pair_teacher.extend([t0, t1]);
        pair_weight.extend([w, if t1 >= 0 { w } else { 0.0 }]);
    }
    let mut pairs = be.pairs(rs, 2).unwrap();
    be.set_pairs(&mut pairs, rs, &pair_teacher, &pair_weight)
        .unwrap();
    let mut loss = nans(be, 1);
    let mut dstudent = nans(be, rs * k);
    be.softmax_cross_entropy(
        &mut loss,
        &mut dstudent,
        &d_student,
        &probs,
        &pairs,
        ts,
        1.0,
        k,
    )
    .unwrap();

    // f64 reference
    let mut ref_p = vec![0.0f64; rt * k];
    for r in 0..rt {
        let z: Vec<f64> = (0..k)
            .map(|j| (teacher[r * k + j] as f64 - center[j] as f64) / tt as f64)
            .collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
        (0..k).for_each(|j| ref_p[r * k + j] = (z[j] - max).exp() / sum);
    }
    let ref_center: Vec<f64> = (0..k)
        .map(|j| {
            momentum * center[j] as f64
                + (1.0 - momentum) * (0..rt).map(|r| teacher[r * k + j] as f64).sum::<f64>()
                    / rt as f64
        })
        .collect();
    let mut ref_loss = 0.0f64;
    let mut ref_ds = vec![0.0f64; rs * k];
    for r in 0..rs {
        let z: Vec<f64> = (0..k)
            .map(|j| student[r * k + j] as f64 / ts as f64)
            .collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        for p in 0..2 {
            let t = pair_teacher[r * 2 + p];
            if t < 0 {
                continue;
            }
            let wp = pair_weight[r * 2 + p] as f64;
            for j in 0..k {
                let q = wp * ref_p[t as usize * k + j];
                ref_loss += q * (lse - z[j]);
                ref_ds[r * k + j] += (wp * (z[j] - lse).exp() - q) / ts as f64;
            }
        }
    }
    let got = down(be, &probs);
    assert_close("teacher_softmax", &got, &ref_p, tol.at(1e-5));
    let got = down(be, &center_new);
    assert_close("center_ema", &got, &ref_center, tol.at(1e-6));
    let got = down(be, &loss);
    assert_close("dino loss", &got, &[ref_loss], tol.at(1e-5));
    let got = down(be, &dstudent);
    assert_close("dino dstudent", &got, &ref_ds, tol.at(1e-4));
}

#[test]
fn dino_loss_with_centering_matches_f64_at_k_65536() {
    check_dino_loss_with_centering(&mut cpu(), Tol::f32(1e-5));
    let Some(mut gpu) = gpu() else { return };
    check_dino_loss_with_centering(&mut gpu, Tol::CUDA);
}

/// The mean over rows of the targets' entropy `−Σ p log p` (nats), zeros included.
fn check_mean_row_entropy<B: Backend>(be: &mut B, tol: Tol) {
    let (rows, k) = (6, 1000);
    let mut p = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let e: Vec<f64> = randn(120 + r as u64, k, 3.0)
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                if r == 0 && j % 3 == 0 {
                    0.0
                } else {
                    (v as f64).exp()
                }
            })
            .collect();
        let sum: f64 = e.iter().sum();
        p.extend(e.iter().map(|v| (v / sum) as f32));
    }
    let d_p = up(be, &p);
    let mut out = nans(be, 1);
    be.mean_row_entropy(&mut out, &d_p, k).unwrap();
    let want = p
        .iter()
        .filter(|&&v| v > 0.0)
        .map(|&v| -(v as f64) * (v as f64).ln())
        .sum::<f64>()
        / rows as f64;
    assert_close("mean_row_entropy", &down(be, &out), &[want], tol.at(1e-5));
}

#[test]
fn mean_row_entropy_matches_f64() {
    check_mean_row_entropy(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_mean_row_entropy(&mut gpu, Tol::CUDA);
}

/// Element by element against f64, from the scaled logits rounded to f32 as the CPU kernel
/// (and torch) forms them, `(t − c) / temp`: what is checked is everything after that
/// rounding. (CUDA multiplies by `1 / temp` and takes the fast exp; its bound is the norm-wise
/// one of the DINO loss check.)
#[test]
fn cpu_teacher_softmax_matches_f64_element_by_element() {
    let (r, k) = (5, 333);
    let t = random(r * k, 1, 3.0);
    let c = random(k, 2, 1.0);
    let mut p = vec![0f32; r * k];
    cpu()
        .teacher_softmax(&mut p, &t, Some(&c), 0.04, k)
        .unwrap();
    for row in 0..r {
        let z: Vec<f64> = (0..k)
            .map(|j| ((t[row * k + j] - c[j]) / 0.04) as f64)
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let want: Vec<f64> = z.iter().map(|v| (v - m).exp() / s).collect();
        let name = format!("teacher_softmax row {row}");
        assert_each_close(&name, &p[row * k..(row + 1) * k], &want, 1e-12, 1e-6);
    }
}

/// The CPU's vectorisable f32 `exp` (Cephes' range reduction and polynomial) against f64.
#[test]
fn cpu_exp_f32_matches_f64_exp() {
    use dinotrain::backend::cpu::loss::exp_f32;
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let want = (x as f64).exp();
        let got = exp_f32(x) as f64;
        worst = worst.max(((got - want) / want).abs());
        x += 0.001_7;
    }
    assert!(worst < 3e-7, "worst relative error {worst}");
    assert_eq!(exp_f32(-200.0), 0.0);
    assert_eq!(exp_f32(0.0), 1.0);
}

/// The paired cross-entropy's gradient against central differences of the f64 loss, with
/// unnormalised targets (a sum of two distributions) and a gradient scale.
fn check_cross_entropy_gradient<B: Backend>(be: &mut B) {
    let (r, k, ts) = (3, 17, 0.1f32);
    let s = random(r * k, 3, 1.0);
    let p: Vec<f32> = random(r * k, 4, 1.0).iter().map(|v| v.abs()).collect();
    // Row r pairs with teacher row r (weight w[r]) and, in its second slot, with row r + 1
    // (weight 0.25; unused, -1, for the last row).
    let w = [0.5f32, 1.0, 2.0];
    let teacher: Vec<i32> = (0..r as i32)
        .flat_map(|i| [i, if i + 1 < r as i32 { i + 1 } else { -1 }])
        .collect();
    let weight: Vec<f32> = w.iter().flat_map(|&v| [v, 0.25]).collect();
    let grad_scale = 0.7f32;
    let (d_s, d_p) = (up(be, &s), up(be, &p));
    let (mut loss, mut d) = (nans(be, 1), nans(be, r * k));
    let mut table = be.pairs(r, 2).unwrap();
    be.set_pairs(&mut table, r, &teacher, &weight).unwrap();
    be.softmax_cross_entropy(&mut loss, &mut d, &d_s, &d_p, &table, ts, grad_scale, k)
        .unwrap();
    let (loss, d) = (down(be, &loss), down(be, &d));
    let mut total = 0f64;
    let ce = |row: &[f64], p: &[f32]| -> f64 {
        let x: Vec<f64> = row.iter().map(|v| v / ts as f64).collect();
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        -x.iter()
            .zip(p)
            .map(|(xv, &pv)| pv as f64 * (xv - lse))
            .sum::<f64>()
    };
    for row in 0..r {
        let base = to_f64(&s[row * k..(row + 1) * k]);
        let q: Vec<f32> = (0..k)
            .map(|j| {
                let next = if row + 1 < r {
                    0.25 * p[(row + 1) * k + j]
                } else {
                    0.0
                };
                w[row] * p[row * k + j] + next
            })
            .collect();
        total += ce(&base, &q);
        for j in 0..k {
            let h = 1e-5;
            let (mut a, mut b) = (base.clone(), base.clone());
            a[j] += h;
            b[j] -= h;
            let fd = grad_scale as f64 * (ce(&a, &q) - ce(&b, &q)) / (2.0 * h);
            let got = d[row * k + j] as f64;
            assert!(
                (got - fd).abs() < 1e-4 * fd.abs().max(1.0),
                "{row},{j}: {got} {fd}"
            );
        }
    }
    assert!((loss[0] as f64 - total).abs() < 1e-5 * total.abs().max(1.0));
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    check_cross_entropy_gradient(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_cross_entropy_gradient(&mut gpu);
}

/// `next = m · center + (1 − m) · mean_rows(t)`, element by element; a centre of the wrong
/// size is refused.
fn check_center_ema<B: Backend>(be: &mut B) {
    let (r, k) = (4, 2500);
    let t = random(r * k, 5, 2.0);
    let c0 = random(k, 6, 1.0);
    let (d_t, d_c0) = (up(be, &t), up(be, &c0));
    let mut c = nans(be, k);
    be.center_ema(&mut c, &d_t, &d_c0, 0.9, k).unwrap();
    let want: Vec<f64> = (0..k)
        .map(|j| {
            let mean: f64 = (0..r).map(|i| t[i * k + j] as f64).sum::<f64>() / r as f64;
            0.9 * c0[j] as f64 + 0.1 * mean
        })
        .collect();
    assert_each_close("center_ema", &down(be, &c), &want, 1e-6, 0.0);
    assert!(be.center_ema(&mut c, &d_t, &d_c0, 0.9, k + 1).is_err());
}

#[test]
fn center_update_is_the_momentum_average_of_the_row_mean() {
    let mut be = cpu();
    check_center_ema(&mut be);
    // No teacher rows on the CPU: no batch statistic, the center is copied unchanged (the
    // CUDA launcher refuses the empty batch).
    let before = random(2500, 6, 1.0);
    let mut c = vec![0f32; 2500];
    be.center_ema(&mut c, &[], &before, 0.9, 2500).unwrap();
    assert_eq!(c, before);
    let Some(mut gpu) = gpu() else { return };
    check_center_ema(&mut gpu);
}

/// The teacher targets' state: softmax centering uses the old center, then moves it.
fn check_softmax_centering<B: Backend>(be: &mut B) {
    let k = 3;
    let mut c = TargetState::new(be, &Centering::softmax(k)).unwrap();
    let t = up(be, &[1.0f32, 0.0, 0.0, 3.0, 0.0, 0.0]);
    let mut p = nans(be, 6);
    c.teacher_probs(be, &mut p, &t, (2, k), 1.0).unwrap();
    // Old center 0: plain softmax of the logits.
    let e = std::f32::consts::E;
    let got = down(be, &p);
    assert!((got[0] - e / (e + 2.0)).abs() < 1e-6, "{}", got[0]);
    // New center: 0.1 · mean = [0.2, 0, 0].
    let host = c.to_host(be).unwrap();
    let center = host.center().unwrap();
    assert!(
        (center[0] - 0.2).abs() < 1e-7 && center[1] == 0.0,
        "{center:?}"
    );
    // The next step uses it.
    c.teacher_probs(be, &mut p, &t, (2, k), 1.0).unwrap();
    let got = down(be, &p);
    let e8 = 0.8f32.exp();
    assert!((got[0] - e8 / (e8 + 2.0)).abs() < 1e-6, "{}", got[0]);
    let mut p4 = nans(be, 4);
    let t4 = t.window(0..4).unwrap();
    assert!(c.teacher_probs(be, &mut p4, &t4, (2, 2), 1.0).is_err());
}

#[test]
fn softmax_centering_uses_the_old_center_then_updates_it() {
    check_softmax_centering(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_softmax_centering(&mut gpu);
}

/// Grouped targets (the micro-batches of an accumulated step, as ranks): the softmax center
/// moves by the mean of the groups' row means (the official iBOT center), empty groups skipped;
/// the targets are per row as without groups.
fn check_grouped_centering<B: Backend>(be: &mut B) {
    let k = 2;
    // Group 0: one row [3, 0]; group 1: three rows with mean [0, 1].
    let logits = [3.0f32, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0];
    let t = up(be, &logits);
    let mut grouped = TargetState::new(be, &Centering::softmax(k)).unwrap();
    let mut p = nans(be, 8);
    grouped
        .teacher_probs_grouped(be, &mut p, &t, &[1, 0, 3], k, 1.0)
        .unwrap();
    let host = grouped.to_host(be).unwrap();
    // 0.1 · ([3, 0] + [0, 1]) / 2; the mean over all four rows would give [0.075, 0.075].
    let center = host.center().unwrap();
    assert!(
        (center[0] - 0.15).abs() < 1e-7 && (center[1] - 0.05).abs() < 1e-7,
        "{center:?}"
    );
    let mut plain = TargetState::new(be, &Centering::softmax(k)).unwrap();
    let mut q = nans(be, 8);
    plain.teacher_probs(be, &mut q, &t, (4, k), 1.0).unwrap();
    assert_eq!(down(be, &p), down(be, &q), "targets are per row");
    let center = plain.to_host(be).unwrap();
    let center = center.center().unwrap();
    assert!((center[0] - 0.075).abs() < 1e-7, "{center:?}");
}

#[test]
fn grouped_centering_averages_the_group_means() {
    check_grouped_centering(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_grouped_centering(&mut gpu);
}

fn check_sinkhorn_targets<B: Backend>(be: &mut B) {
    let mut c = TargetState::new(be, &Centering::sinkhorn_knopp()).unwrap();
    let t = up(be, &[1.0f32, 0.5, -0.5, 0.25, 2.0, 0.0]);
    let mut p = nans(be, 6);
    c.teacher_probs(be, &mut p, &t, (2, 3), 0.1).unwrap();
    let got = down(be, &p);
    assert!((got[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6, "{got:?}");
    assert!(c.to_host(be).unwrap().center().is_none());
}

#[test]
fn sinkhorn_targets_rows_sum_to_one_and_keep_no_center() {
    check_sinkhorn_targets(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_sinkhorn_targets(&mut gpu);
}

#[test]
fn dino_denominator_is_official_including_the_no_local_quirk() {
    assert_eq!(dino_loss_denominator(8), 18);
    assert_eq!(dino_loss_denominator(2), 6);
    assert_eq!(dino_loss_denominator(0), 3);
}

/// B = 1, K = 2. Teacher A is one-hot on prototype 0, teacher B on prototype 1. Student A is
/// confident in prototype 1 (agrees with teacher B): small loss; student B confident in
/// prototype 0 (agrees with teacher A): small loss. Same-view pairing would give a large loss.
fn check_dino_pairs_each_global_crop_with_the_other_teacher<B: Backend>(be: &mut B) {
    let p = up(be, &[1.0f32, 0.0, 0.0, 1.0]);
    let s = up(be, &[0.0f32, 2.0, 2.0, 0.0]);
    let mut pairs = DinoPairs::default();
    let (mut d, mut terms) = (nans(be, 4), nans(be, 2));
    // No local crop: empty windows (a device may not allocate nothing).
    let (none, mut d_none) = (be.alloc_f32(0).unwrap(), be.alloc_f32(0).unwrap());
    let local = none.window(0..0).unwrap();
    let mut d_local = d_none.window_mut(0..0).unwrap();
    let student = DinoStudent::<B> {
        global: &s,
        local: &local,
        d_global: &mut d,
        d_local: &mut d_local,
    };
    let dims = (1, 0, 2);
    dino_loss_forward_backward(be, &mut pairs, &mut terms, student, &p, dims, 0.1, 1.0).unwrap();
    let t = dino_terms(&down(be, &terms), 1.0);
    let ce = (1.0f64 + (-20.0f64).exp()).ln(); // −log softmax([20, 0])_0
    assert!((t.global as f64 - 2.0 * ce / 3.0).abs() < 1e-7, "{t:?}");
    assert_eq!(t.local, 0.0);
    let three = s.window(0..3).unwrap();
    let student = DinoStudent::<B> {
        global: &three,
        local: &local,
        d_global: &mut d,
        d_local: &mut d_local,
    };
    let run = dino_loss_forward_backward(be, &mut pairs, &mut terms, student, &p, dims, 0.1, 1.0);
    assert!(run.is_err());
}

#[test]
fn dino_loss_pairs_each_global_crop_with_the_other_teacher_only() {
    check_dino_pairs_each_global_crop_with_the_other_teacher(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_dino_pairs_each_global_crop_with_the_other_teacher(&mut gpu);
}

// ---- optimizer family ---------------------------------------------------------------------

fn hyper(step: u64) -> AdamWStep {
    AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step,
    }
}

/// `torch.optim.AdamW` in f64: decoupled weight decay, then the Adam step with bias
/// corrections.
#[allow(clippy::too_many_arguments)]
fn adamw_reference(
    p: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f32],
    lr_wd: impl Fn(usize) -> (f64, f64),
    step: u64,
) {
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let (bc1, bc2) = (1.0 - beta1.powi(step as i32), 1.0 - beta2.powi(step as i32));
    for i in 0..p.len() {
        let (lr, wd) = lr_wd(i);
        p[i] *= 1.0 - lr * wd;
        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i] as f64;
        v[i] = beta2 * v[i] + (1.0 - beta2) * (g[i] as f64).powi(2);
        p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
    }
}

/// One step of AdamW on the backend's flat buffers.
#[allow(clippy::too_many_arguments)]
fn adamw_step<B: Backend>(
    be: &mut B,
    p: &mut B::F32,
    m: &mut B::F32,
    v: &mut B::F32,
    g: &[f32],
    segments: &B::Segments,
    (lr, wd): (&B::F32, &B::F32),
    step: u64,
) -> dinotrain::Result<()> {
    let grads = up(be, g);
    let bufs = AdamWBuffers {
        params: p,
        exp_avg: m,
        exp_avg_sq: v,
        grads: &*grads,
    };
    be.adamw_update(bufs, segments, lr, wd, hyper(step))
}

/// Three steps with three groups (one of them the frozen last layer, lr 0).
fn check_adamw_with_groups<B: Backend>(be: &mut B, tol: Tol) {
    let numel = 500;
    let starts = [0usize, 100, 250, 400];
    let groups = [0usize, 1, 0, 2];
    let group_lr = [1e-3f32, 5e-4, 0.0]; // group 2: the frozen last layer
    let group_wd = [0.04f32, 0.0, 0.04];
    let segments = be.segments(&starts, &groups, 3, numel).unwrap();
    let p0 = randn(90, numel, 1.0);
    let mut d_p = up(be, &p0);
    let (mut d_m, mut d_v) = (be.alloc_f32(numel).unwrap(), be.alloc_f32(numel).unwrap());
    let (d_lr, d_wd) = (up(be, &group_lr), up(be, &group_wd));
    let mut p = to_f64(&p0);
    let (mut m, mut v) = (vec![0.0f64; numel], vec![0.0f64; numel]);
    let group_of = |i: usize| groups[starts.iter().rposition(|&s| s <= i).unwrap()];
    let lr_wd = |i: usize| {
        let g = group_of(i);
        (group_lr[g] as f64, group_wd[g] as f64)
    };
    for step in 1..=3u64 {
        let g = randn(90 + step, numel, 1.0);
        let hp = (&*d_lr, &*d_wd);
        adamw_step(be, &mut d_p, &mut d_m, &mut d_v, &g, &segments, hp, step).unwrap();
        adamw_reference(&mut p, &mut m, &mut v, &g, lr_wd, step);
    }
    let got = down(be, &d_p);
    assert_close("adamw params", &got, &p, tol.at(1e-6));
    assert_close("adamw exp_avg", &down(be, &d_m), &m, tol.at(1e-6));
    assert_close("adamw exp_avg_sq", &down(be, &d_v), &v, tol.at(1e-6));
    assert_eq!(
        &got[400..],
        &p0[400..],
        "lr 0 must leave the frozen group unchanged"
    );
}

#[test]
fn adamw_with_groups_and_a_frozen_group_matches_f64() {
    check_adamw_with_groups(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_adamw_with_groups(&mut gpu, Tol::CUDA);
}

/// Four steps over 100003 parameters in one group (more than one parallel chunk on the CPU).
fn check_adamw_one_large_group<B: Backend>(be: &mut B, tol: Tol) {
    let n = 100_003;
    let p0: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let (lr, wd) = (1e-3f32, 0.04f32);
    let segments = be.segments(&[0], &[0], 1, n).unwrap();
    let (d_lr, d_wd) = (up(be, &[lr]), up(be, &[wd]));
    let mut d_p = up(be, &p0);
    let (mut d_m, mut d_v) = (be.alloc_f32(n).unwrap(), be.alloc_f32(n).unwrap());
    let mut p = to_f64(&p0);
    let (mut m, mut v) = (vec![0f64; n], vec![0f64; n]);
    for step in 1..=4u64 {
        let g: Vec<f32> = (0..n)
            .map(|i| (((i * 7 + step as usize) % 31) as f32 - 15.0) * 0.1)
            .collect();
        let hp = (&*d_lr, &*d_wd);
        adamw_step(be, &mut d_p, &mut d_m, &mut d_v, &g, &segments, hp, step).unwrap();
        adamw_reference(&mut p, &mut m, &mut v, &g, |_| (lr as f64, wd as f64), step);
    }
    assert_close("adamw params", &down(be, &d_p), &p, tol.at(1e-6));
}

#[test]
fn adamw_over_one_large_group_matches_f64() {
    check_adamw_one_large_group(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_adamw_one_large_group(&mut gpu, Tol::CUDA);
}

/// Each segment takes its group's lr and weight decay: lr 0.1 moves every weight by 0.1 on the
/// first step (`m̂ / √v̂ = sign(g)`); lr 0 leaves the weights exactly as they were while the
/// moments advance. Segments that do not tile the buffer and step 0 are refused.
fn check_adamw_segments<B: Backend>(be: &mut B) {
    let segments = be.segments(&[0, 3, 6], &[0, 1, 2], 3, 10).unwrap();
    let (d_lr, d_wd) = (up(be, &[0.1f32, 0.0, 0.0]), up(be, &[0.0f32, 0.0, 0.1]));
    let mut d_p = up(be, &[1f32; 10]);
    let (mut d_m, mut d_v) = (be.alloc_f32(10).unwrap(), be.alloc_f32(10).unwrap());
    let hp = (&*d_lr, &*d_wd);
    let g = [0.5f32; 10];
    adamw_step(be, &mut d_p, &mut d_m, &mut d_v, &g, &segments, hp, 1).unwrap();
    let (p, m) = (down(be, &d_p), down(be, &d_m));
    assert!(p[..3].iter().all(|&x| (x - 0.9).abs() < 1e-6), "{p:?}");
    assert_eq!(&p[3..], &[1.0; 7]);
    assert!(m.iter().all(|&x| (x - 0.05).abs() < 1e-7), "{m:?}");
    let step0 = adamw_step(be, &mut d_p, &mut d_m, &mut d_v, &g, &segments, hp, 0);
    assert!(step0.is_err());
    assert!(be.segments(&[0, 5, 4], &[0, 0, 0], 1, 10).is_err());
    assert!(be.segments(&[1, 5], &[0, 0], 1, 10).is_err());
    assert!(be.segments(&[0, 5], &[0, 1], 1, 10).is_err());
}

#[test]
fn adamw_segments_take_their_group_lr_and_weight_decay() {
    check_adamw_segments(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_adamw_segments(&mut gpu);
}

fn check_ema_is_the_convex_combination<B: Backend>(be: &mut B) {
    let mut t = up(be, &[1f32, 2.0, 3.0]);
    let s = up(be, &[3f32, 2.0, 1.0]);
    be.ema_update(&mut t, &s, 0.75).unwrap();
    assert_eq!(down(be, &t), vec![1.5, 2.0, 2.5]);
    let one = up(be, &[1f32]);
    assert!(be.ema_update(&mut t, &one, 0.5).is_err());
}

#[test]
fn ema_is_the_convex_combination() {
    check_ema_is_the_convex_combination(&mut cpu());
    let Some(mut gpu) = gpu() else { return };
    check_ema_is_the_convex_combination(&mut gpu);
}

/// The teacher EMA, gradient clipping (which must clip here) and the weight-normalised last
/// layer's forward and backward.
fn check_ema_clip_and_weight_norm<B: Backend>(be: &mut B, tol: Tol) {
    let n = 10_000;
    let (teacher, student) = (randn(100, n, 1.0), randn(101, n, 1.0));
    let mut d_t = up(be, &teacher);
    let d_s = up(be, &student);
    be.ema_update(&mut d_t, &d_s, 0.996).unwrap();
    let ref_t: Vec<f64> = (0..n)
        .map(|i| 0.996 * teacher[i] as f64 + (1.0 - 0.996) * student[i] as f64)
        .collect();
    assert_close("ema", &down(be, &d_t), &ref_t, tol.at(1e-6));

    let grads = randn(102, n, 0.1);
    let mut d_g = up(be, &grads);
    let mut norm = nans(be, 1);
    be.clip_grad_norm(&mut d_g, &mut norm, 3.0).unwrap();
    let total = grads
        .iter()
        .map(|&g| (g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let coef = (3.0 / (total + 1e-6)).min(1.0);
    assert!(coef < 1.0, "the test must exercise clipping");
    assert_close("clip norm", &down(be, &norm), &[total], tol.at(1e-5));
    let ref_g: Vec<f64> = grads.iter().map(|&g| g as f64 * coef).collect();
    assert_close("clipped grads", &down(be, &d_g), &ref_g, tol.at(1e-5));

    let (k, bn) = (300, 256);
    let shape = NormShape {
        rows: k,
        channels: bn,
    };
    let (g, v) = (uniform(103, k, 0.5, 2.0), randn(104, k * bn, 1.0));
    let (d_gain, d_v) = (up(be, &g), up(be, &v));
    let (mut w, mut inv_norm) = (nans(be, k * bn), nans(be, k));
    be.weight_norm_forward(&mut w, &mut inv_norm, &d_gain, &d_v, shape)
        .unwrap();
    let dw = randn(105, k * bn, 1.0);
    let (dg0, dv0) = (randn(106, k, 1.0), randn(107, k * bn, 1.0));
    let (mut d_dg, mut d_dv) = (up(be, &dg0), up(be, &dv0));
    let d_dw = up(be, &dw);
    be.weight_norm_backward(&mut d_dg, &mut d_dv, &d_dw, &d_gain, &d_v, &inv_norm, shape)
        .unwrap();
    let mut ref_w = vec![0.0f64; k * bn];
    let (mut ref_dg, mut ref_dv) = (to_f64(&dg0), to_f64(&dv0));
    for r in 0..k {
        let row = &v[r * bn..(r + 1) * bn];
        let nrm = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let dot: f64 = (0..bn)
            .map(|j| dw[r * bn + j] as f64 * row[j] as f64 / nrm)
            .sum();
        ref_dg[r] += dot;
        for j in 0..bn {
            ref_w[r * bn + j] = g[r] as f64 * row[j] as f64 / nrm;
            ref_dv[r * bn + j] +=
                g[r] as f64 / nrm * (dw[r * bn + j] as f64 - row[j] as f64 / nrm * dot);
        }
    }
    assert_close("weight_norm W", &down(be, &w), &ref_w, tol.at(1e-6));
    assert_close(
        "weight_norm dg (+=)",
        &down(be, &d_dg),
        &ref_dg,
        tol.at(1e-5),
    );
    assert_close(
        "weight_norm dv (+=)",
        &down(be, &d_dv),
        &ref_dv,
        tol.at(1e-5),
    );
}

#[test]
fn ema_clip_and_weight_norm_match_f64() {
    check_ema_clip_and_weight_norm(&mut cpu(), Tol::f32(1e-6));
    let Some(mut gpu) = gpu() else { return };
    check_ema_clip_and_weight_norm(&mut gpu, Tol::CUDA);
}
