//! GPU-vs-reference tests of the method's kernels: masked patches, Sinkhorn-Knopp, KoLeo, the
//! DINO/iBOT cross-entropy, and the optimizer family. Each skips with a message without a GPU.
//! These paths run in f32 on the GPU, so the bounds are f32-sized (1e-6 .. 1e-4).

mod cuda_support;

use cuda_support::{assert_close, gpu, randn, round_bf16, to_f64, uniform};
use dinotrain::backend::cuda::{
    bf16, AdamWStep, CrossEntropyPairs, KoleoSaved, ParamSegments, PatchLayout,
};
use dinotrain::Error;

// ---- masked patches -----------------------------------------------------------------------

#[test]
fn mask_tokens_and_patch_gather_scatter_match_reference() {
    let Some(mut gpu) = gpu() else { return };
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
    let (d_masks, d_token) = (gpu.upload(&masks).unwrap(), gpu.upload(&token).unwrap());
    let mut d_x = gpu.upload(&x).unwrap();
    gpu.mask_token_substitute(&mut d_x, &d_masks, &d_token, rows, c)
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
    assert_eq!(gpu.download(&d_x).unwrap(), expected);

    let dx = randn(4, rows * c, 1.0);
    let dtoken0 = randn(5, c, 1.0);
    let mut d_dx = gpu.upload(&dx).unwrap();
    let mut d_dtoken = gpu.upload(&dtoken0).unwrap();
    gpu.mask_token_backward(&mut d_dtoken, &mut d_dx, &d_masks, rows, c)
        .unwrap();
    let mut ref_dtoken = to_f64(&dtoken0);
    let mut ref_dx = dx.clone();
    for r in (0..rows).filter(|&r| masks[r] == 1) {
        for k in 0..c {
            ref_dtoken[k] += dx[r * c + k] as f64;
            ref_dx[r * c + k] = 0.0;
        }
    }
    assert_eq!(gpu.download(&d_dx).unwrap(), ref_dx);
    assert_close(
        "mask_token_backward dmask_token",
        &gpu.download(&d_dtoken).unwrap(),
        &ref_dtoken,
        1e-6,
    );

    let indices: Vec<i64> = (0..rows as i64)
        .filter(|&i| masks[i as usize] == 1)
        .collect();
    let m = indices.len();
    let tokens = randn(6, layout.crops * layout.tokens * c, 1.0);
    let d_indices = gpu.upload(&indices).unwrap();
    let d_tokens = gpu.upload(&tokens).unwrap();
    let mut gathered = gpu.alloc_zeros::<f32>(m * c).unwrap();
    gpu.gather_masked_patches(&mut gathered, &d_tokens, &d_indices, &indices, layout)
        .unwrap();
    let row_of = |flat: i64| {
        let flat = flat as usize;
        (flat / layout.patches) * layout.tokens + layout.token_offset + flat % layout.patches
    };
    let ref_gathered: Vec<f32> = indices
        .iter()
        .flat_map(|&i| tokens[row_of(i) * c..(row_of(i) + 1) * c].to_vec())
        .collect();
    assert_eq!(gpu.download(&gathered).unwrap(), ref_gathered);

    let tokens_bf16 = gpu.upload_bf16(&tokens).unwrap();
    let mut gathered_bf16 = gpu.alloc_zeros::<bf16>(m * c).unwrap();
    gpu.gather_masked_patches(
        &mut gathered_bf16,
        &tokens_bf16,
        &d_indices,
        &indices,
        layout,
    )
    .unwrap();
    assert_eq!(
        gpu.download_bf16(&gathered_bf16).unwrap(),
        round_bf16(&ref_gathered)
    );

    let dgathered = randn(7, m * c, 1.0);
    let d_dgathered = gpu.upload(&dgathered).unwrap();
    let mut dtokens = gpu.upload(&tokens).unwrap();
    gpu.scatter_masked_patches_add(&mut dtokens, &d_dgathered, &d_indices, &indices, layout)
        .unwrap();
    let mut ref_dtokens = tokens.clone();
    for (mi, &i) in indices.iter().enumerate() {
        for k in 0..c {
            ref_dtokens[row_of(i) * c + k] += dgathered[mi * c + k];
        }
    }
    assert_eq!(gpu.download(&dtokens).unwrap(), ref_dtokens);

    let unsorted = vec![3i64, 1];
    let d_unsorted = gpu.upload(&unsorted).unwrap();
    let mut two = gpu.alloc_zeros::<f32>(2 * c).unwrap();
    assert!(matches!(
        gpu.gather_masked_patches(&mut two, &d_tokens, &d_unsorted, &unsorted, layout),
        Err(Error::Shape { .. })
    ));
}

// ---- Sinkhorn-Knopp -----------------------------------------------------------------------

/// The golden README's SK, literally, in f64 (one global shift before exp).
fn sinkhorn_reference(
    t: &[f32],
    r: usize,
    k: usize,
    tt: f64,
    n_samples: usize,
    iters: usize,
) -> Vec<f64> {
    let max = t.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut q: Vec<f64> = t.iter().map(|&v| ((v as f64 - max) / tt).exp()).collect(); // [R, K]
    let total: f64 = q.iter().sum();
    q.iter_mut().for_each(|v| *v /= total);
    for _ in 0..iters {
        for j in 0..k {
            let s: f64 = (0..r).map(|i| q[i * k + j]).sum();
            (0..r).for_each(|i| q[i * k + j] /= s * k as f64);
        }
        for i in 0..r {
            let s: f64 = q[i * k..(i + 1) * k].iter().sum();
            q[i * k..(i + 1) * k]
                .iter_mut()
                .for_each(|v| *v /= s * n_samples as f64);
        }
    }
    q.iter_mut().for_each(|v| *v *= n_samples as f64);
    q
}

#[test]
fn sinkhorn_knopp_matches_f64() {
    let Some(mut gpu) = gpu() else { return };
    for (seed, (r, k, tt)) in [
        (37usize, 1000usize, 0.05f32),
        (6, 40, 0.04),
        (64, 131_072, 0.07),
    ]
    .into_iter()
    .enumerate()
    {
        // Head logits are cosine similarities (normalised features, weight-normed prototypes
        // with g = 1): in [-1, 1]. The reference's unshifted exp(T / tt) is only safe there.
        let t = uniform(60 + seed as u64, r * k, -1.0, 1.0);
        let d_t = gpu.upload(&t).unwrap();
        let mut q = gpu.alloc_zeros::<f32>(r * k).unwrap();
        let mut a = gpu.alloc_zeros::<f32>(k).unwrap();
        let mut b = gpu.alloc_zeros::<f32>(r).unwrap();
        gpu.sinkhorn_knopp(&mut q, &mut a, &mut b, &d_t, r, k, tt, r, 3)
            .unwrap();
        let reference = sinkhorn_reference(&t, r, k, tt as f64, r, 3);
        assert_close(
            &format!("sinkhorn {r}x{k} tt {tt}"),
            &gpu.download(&q).unwrap(),
            &reference,
            1e-4,
        );
    }
}

// ---- KoLeo --------------------------------------------------------------------------------

fn koleo_reference(x: &[f32], b: usize, d: usize) -> (f64, Vec<f64>) {
    let eps = 1e-8f64;
    let norms: Vec<f64> = (0..b)
        .map(|i| {
            x[i * d..(i + 1) * d]
                .iter()
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let xn: Vec<f64> = (0..b * d)
        .map(|i| x[i] as f64 / norms[i / d].max(eps))
        .collect();
    let nn: Vec<usize> = (0..b)
        .map(|i| {
            (0..b)
                .filter(|&j| j != i)
                .max_by(|&p, &q| {
                    let dot = |j: usize| (0..d).map(|c| xn[i * d + c] * xn[j * d + c]).sum::<f64>();
                    dot(p).total_cmp(&dot(q))
                })
                .unwrap()
        })
        .collect();
    let mut loss = 0.0;
    let mut gxn = vec![0.0f64; b * d];
    for i in 0..b {
        let j = nn[i];
        let diff: Vec<f64> = (0..d)
            .map(|c| xn[i * d + c] - xn[j * d + c] + eps)
            .collect();
        let dist = diff.iter().map(|v| v * v).sum::<f64>().sqrt();
        loss -= (dist + eps).ln() / b as f64;
        let w = -1.0 / (b as f64 * (dist + eps) * dist);
        for c in 0..d {
            gxn[i * d + c] += w * diff[c];
            gxn[j * d + c] -= w * diff[c];
        }
    }
    let mut dx = vec![0.0f64; b * d];
    for i in 0..b {
        let dot: f64 = (0..d).map(|c| xn[i * d + c] * gxn[i * d + c]).sum();
        for c in 0..d {
            dx[i * d + c] = (gxn[i * d + c] - xn[i * d + c] * dot) / norms[i];
        }
    }
    (loss, dx)
}

#[test]
fn koleo_reference_gradient_matches_finite_differences() {
    // Runs everywhere: checks the f64 reference that the GPU test trusts.
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

/// The KoLeo loss alone on f64 input (nearest neighbours re-chosen: fine for small steps).
fn koleo_loss_f64(x: &[f64], b: usize, d: usize) -> f64 {
    let eps = 1e-8f64;
    let xn: Vec<f64> = (0..b * d)
        .map(|i| {
            let r = i / d;
            let n = x[r * d..(r + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt();
            x[i] / n.max(eps)
        })
        .collect();
    let mut loss = 0.0;
    for i in 0..b {
        let dot = |j: usize| (0..d).map(|c| xn[i * d + c] * xn[j * d + c]).sum::<f64>();
        let j = (0..b)
            .filter(|&j| j != i)
            .max_by(|&p, &q| dot(p).total_cmp(&dot(q)))
            .unwrap();
        let dist = (0..d)
            .map(|c| (xn[i * d + c] - xn[j * d + c] + eps).powi(2))
            .sum::<f64>()
            .sqrt();
        loss -= (dist + eps).ln() / b as f64;
    }
    loss
}

#[test]
fn sinkhorn_reference_rows_sum_to_one() {
    let (r, k) = (5, 12);
    let q = sinkhorn_reference(&uniform(65, r * k, -1.0, 1.0), r, k, 0.05, r, 3);
    for i in 0..r {
        assert!((q[i * k..(i + 1) * k].iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

#[test]
fn koleo_forward_and_backward_match_f64() {
    let Some(mut gpu) = gpu() else { return };
    for (seed, (b, d)) in [(16usize, 32usize), (64, 384), (9, 2048)]
        .into_iter()
        .enumerate()
    {
        let x = randn(70 + seed as u64, b * d, 1.0);
        let d_x = gpu.upload(&x).unwrap();
        let mut saved = KoleoSaved::new(&gpu, b, d).unwrap();
        let mut loss = gpu.alloc_zeros::<f32>(1).unwrap();
        gpu.koleo_forward(&mut loss, &mut saved, &d_x, b, d)
            .unwrap();
        let mut dx = gpu.alloc_zeros::<f32>(b * d).unwrap();
        let dloss = 0.7f32;
        gpu.koleo_backward(&mut dx, &saved, dloss, b, d).unwrap();
        let (ref_loss, ref_dx) = koleo_reference(&x, b, d);
        let ref_dx: Vec<f64> = ref_dx.iter().map(|v| v * dloss as f64).collect();
        assert_close(
            &format!("koleo loss b{b} d{d}"),
            &gpu.download(&loss).unwrap(),
            &[ref_loss],
            1e-5,
        );
        assert_close(
            &format!("koleo dx b{b} d{d}"),
            &gpu.download(&dx).unwrap(),
            &ref_dx,
            1e-4,
        );
    }
}

// ---- DINO / iBOT cross-entropy ------------------------------------------------------------

#[test]
fn dino_loss_with_centering_matches_f64_at_k_65536() {
    let Some(mut gpu) = gpu() else { return };
    let (n_img, n_local, k) = (3usize, 2usize, 65_536usize);
    let (tt, ts, momentum, weight) = (0.04f32, 0.1f32, 0.9f64, 1.0f32);
    let rt = 2 * n_img;
    let rs = rt + n_local * n_img;
    let teacher = randn(80, rt * k, 2.0);
    let center = randn(81, k, 0.5);
    let student = randn(82, rs * k, 2.0);
    let (d_teacher, d_center, d_student) = (
        gpu.upload(&teacher).unwrap(),
        gpu.upload(&center).unwrap(),
        gpu.upload(&student).unwrap(),
    );

    let mut probs = gpu.alloc_zeros::<f32>(rt * k).unwrap();
    gpu.teacher_softmax(&mut probs, &d_teacher, Some(&d_center), tt, rt, k)
        .unwrap();
    let mut center_new = gpu.alloc_zeros::<f32>(k).unwrap();
    gpu.center_ema(&mut center_new, &d_teacher, &d_center, momentum, rt, k)
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
    let pairs = CrossEntropyPairs::new(&gpu, rs, 2, &pair_teacher, &pair_weight).unwrap();
    let mut loss = gpu.alloc_zeros::<f32>(1).unwrap();
    let mut row_loss = gpu.alloc_zeros::<f32>(rs).unwrap();
    let mut dstudent = gpu.alloc_zeros::<f32>(rs * k).unwrap();
    gpu.softmax_cross_entropy(
        &mut loss,
        &mut row_loss,
        &mut dstudent,
        &d_student,
        &probs,
        &pairs,
        ts,
        1.0,
        rt,
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
    assert_close(
        "teacher_softmax",
        &gpu.download(&probs).unwrap(),
        &ref_p,
        1e-5,
    );
    assert_close(
        "center_ema",
        &gpu.download(&center_new).unwrap(),
        &ref_center,
        1e-6,
    );
    assert_close(
        "dino loss",
        &gpu.download(&loss).unwrap(),
        &[ref_loss],
        1e-5,
    );
    assert_close(
        "dino dstudent",
        &gpu.download(&dstudent).unwrap(),
        &ref_ds,
        1e-4,
    );
}

// ---- optimizer family ---------------------------------------------------------------------

#[test]
fn adamw_with_groups_and_a_frozen_group_matches_f64() {
    let Some(gpu) = gpu() else { return };
    let numel = 500;
    let starts = [0usize, 100, 250, 400];
    let groups = [0usize, 1, 0, 2];
    let group_lr = [1e-3f32, 5e-4, 0.0]; // group 2: the frozen last layer
    let group_wd = [0.04f32, 0.0, 0.04];
    let segments = ParamSegments::new(&gpu, &starts, &groups, 3, numel).unwrap();
    let p0 = randn(90, numel, 1.0);
    let mut d_p = gpu.upload(&p0).unwrap();
    let mut d_m = gpu.alloc_zeros::<f32>(numel).unwrap();
    let mut d_v = gpu.alloc_zeros::<f32>(numel).unwrap();
    let (d_lr, d_wd) = (
        gpu.upload(&group_lr).unwrap(),
        gpu.upload(&group_wd).unwrap(),
    );
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut p = to_f64(&p0);
    let (mut m, mut v) = (vec![0.0f64; numel], vec![0.0f64; numel]);
    let group_of = |i: usize| groups[starts.iter().rposition(|&s| s <= i).unwrap()];
    for step in 1..=3u64 {
        let g = randn(90 + step, numel, 1.0);
        let d_g = gpu.upload(&g).unwrap();
        gpu.adamw_update(
            &mut d_p,
            &mut d_m,
            &mut d_v,
            &d_g,
            &segments,
            &d_lr,
            &d_wd,
            AdamWStep {
                beta1,
                beta2,
                eps,
                step,
            },
        )
        .unwrap();
        let (bc1, bc2) = (1.0 - beta1.powi(step as i32), 1.0 - beta2.powi(step as i32));
        for i in 0..numel {
            let (lr, wd) = (group_lr[group_of(i)] as f64, group_wd[group_of(i)] as f64);
            p[i] *= 1.0 - lr * wd;
            m[i] = beta1 * m[i] + (1.0 - beta1) * g[i] as f64;
            v[i] = beta2 * v[i] + (1.0 - beta2) * (g[i] as f64).powi(2);
            p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
        }
    }
    let got = gpu.download(&d_p).unwrap();
    assert_close("adamw params", &got, &p, 1e-6);
    assert_close("adamw exp_avg", &gpu.download(&d_m).unwrap(), &m, 1e-6);
    assert_close("adamw exp_avg_sq", &gpu.download(&d_v).unwrap(), &v, 1e-6);
    assert_eq!(
        &got[400..],
        &p0[400..],
        "lr 0 must leave the frozen group unchanged"
    );
}

#[test]
fn ema_clip_and_weight_norm_match_f64() {
    let Some(mut gpu) = gpu() else { return };
    let n = 10_000;
    let (teacher, student) = (randn(100, n, 1.0), randn(101, n, 1.0));
    let mut d_t = gpu.upload(&teacher).unwrap();
    gpu.ema_update(&mut d_t, &gpu.upload(&student).unwrap(), 0.996)
        .unwrap();
    let ref_t: Vec<f64> = (0..n)
        .map(|i| 0.996 * teacher[i] as f64 + (1.0 - 0.996) * student[i] as f64)
        .collect();
    assert_close("ema", &gpu.download(&d_t).unwrap(), &ref_t, 1e-6);

    let grads = randn(102, n, 0.1);
    let mut d_g = gpu.upload(&grads).unwrap();
    let mut norm = gpu.alloc_zeros::<f32>(1).unwrap();
    gpu.clip_grad_norm(&mut d_g, &mut norm, 3.0).unwrap();
    let total = grads
        .iter()
        .map(|&g| (g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let coef = (3.0 / (total + 1e-6)).min(1.0);
    assert!(coef < 1.0, "the test must exercise clipping");
    assert_close("clip norm", &gpu.download(&norm).unwrap(), &[total], 1e-5);
    let ref_g: Vec<f64> = grads.iter().map(|&g| g as f64 * coef).collect();
    assert_close("clipped grads", &gpu.download(&d_g).unwrap(), &ref_g, 1e-5);

    let (k, bn) = (300, 256);
    let (g, v) = (uniform(103, k, 0.5, 2.0), randn(104, k * bn, 1.0));
    let (d_gain, d_v) = (gpu.upload(&g).unwrap(), gpu.upload(&v).unwrap());
    let mut w = gpu.alloc_zeros::<f32>(k * bn).unwrap();
    let mut inv_norm = gpu.alloc_zeros::<f32>(k).unwrap();
    gpu.weight_norm_forward(&mut w, &mut inv_norm, &d_gain, &d_v, k, bn)
        .unwrap();
    let dw = randn(105, k * bn, 1.0);
    let (dg0, dv0) = (randn(106, k, 1.0), randn(107, k * bn, 1.0));
    let (mut d_dg, mut d_dv) = (gpu.upload(&dg0).unwrap(), gpu.upload(&dv0).unwrap());
    gpu.weight_norm_backward(
        &mut d_dg,
        &mut d_dv,
        &gpu.upload(&dw).unwrap(),
        &d_gain,
        &d_v,
        &inv_norm,
        k,
        bn,
    )
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
    assert_close("weight_norm W", &gpu.download(&w).unwrap(), &ref_w, 1e-6);
    assert_close(
        "weight_norm dg (+=)",
        &gpu.download(&d_dg).unwrap(),
        &ref_dg,
        1e-5,
    );
    assert_close(
        "weight_norm dv (+=)",
        &gpu.download(&d_dv).unwrap(),
        &ref_dv,
        1e-5,
    );
}
