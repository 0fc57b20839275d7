//! f64 references of the kernels, written on the exact values the kernels see (operands
//! rounded to bf16 first where the backend rounds them). The kernel tests check these against
//! finite differences or literal definitions before trusting them.

use dinotrain::backend::{AttentionShape, Transpose};

/// `c [m, n] += op(a) · op(b)` in f64 (`a` is `[m, k]`, or `[k, m]` transposed; `b` is
/// `[k, n]`, or `[n, k]` transposed).
#[allow(clippy::too_many_arguments)]
pub fn gemm_reference(
    c: &mut [f64],
    a: &[f32],
    ta: Transpose,
    b: &[f32],
    tb: Transpose,
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                let av = match ta {
                    Transpose::No => a[i * k + p],
                    Transpose::Yes => a[p * m + i],
                };
                let bv = match tb {
                    Transpose::No => b[p * n + j],
                    Transpose::Yes => b[j * k + p],
                };
                acc += av as f64 * bv as f64;
            }
            c[i * n + j] += acc;
        }
    }
}

/// An f64 reference as a kernel that rounds its f32 result to bf16 stores it.
pub fn rounded_bf16(reference: &[f64]) -> Vec<f64> {
    reference
        .iter()
        .map(|&v| f32::from(half::bf16::from_f32(v as f32)) as f64)
        .collect()
}

// ---- attention ----------------------------------------------------------------------------

pub struct HeadView<'a> {
    pub qkv: &'a [f64],
    pub s: AttentionShape,
}

impl HeadView<'_> {
    pub fn at(&self, b: usize, t: usize, which: usize, h: usize, d: usize) -> f64 {
        let s = &self.s;
        self.qkv[((b * s.tokens + t) * 3 + which) * s.heads * s.head_dim + h * s.head_dim + d]
    }
}

/// Softmax probabilities `[T, T]` of one (image, head), and each row's log-sum-exp.
pub fn attention_probs(v: &HeadView, b: usize, h: usize) -> (Vec<f64>, Vec<f64>) {
    let (t, hd) = (v.s.tokens, v.s.head_dim);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut p = vec![0.0f64; t * t];
    let mut lse = vec![0.0f64; t];
    for i in 0..t {
        let row = &mut p[i * t..(i + 1) * t];
        for (j, x) in row.iter_mut().enumerate() {
            *x = (0..hd)
                .map(|d| v.at(b, i, 0, h, d) * v.at(b, j, 1, h, d))
                .sum::<f64>()
                * scale;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
        lse[i] = max + sum.ln();
        row.iter_mut().for_each(|x| *x = (*x - lse[i]).exp());
    }
    (p, lse)
}

/// f64 reference forward: `out [B,T,H,hd]` and `lse [B,H,T]`.
pub fn attention_forward_reference(qkv: &[f64], s: AttentionShape) -> (Vec<f64>, Vec<f64>) {
    let view = HeadView { qkv, s };
    let (t, hd, nh) = (s.tokens, s.head_dim, s.heads);
    let mut out = vec![0.0f64; s.out_len()];
    let mut lse = vec![0.0f64; s.stats_len()];
    for b in 0..s.batch {
        for h in 0..nh {
            let (p, lse_row) = attention_probs(&view, b, h);
            lse[(b * nh + h) * t..(b * nh + h + 1) * t].copy_from_slice(&lse_row);
            for i in 0..t {
                for d in 0..hd {
                    out[(b * t + i) * nh * hd + h * hd + d] =
                        (0..t).map(|j| p[i * t + j] * view.at(b, j, 2, h, d)).sum();
                }
            }
        }
    }
    (out, lse)
}

/// f64 reference backward: `dqkv [B,T,3,H,hd]` of `L = sum(out * dout)`.
pub fn attention_backward_reference(qkv: &[f64], dout: &[f64], s: AttentionShape) -> Vec<f64> {
    let view = HeadView { qkv, s };
    let (t, hd, nh) = (s.tokens, s.head_dim, s.heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut dqkv = vec![0.0f64; s.qkv_len()];
    let idx = |b: usize, tok: usize, which: usize, h: usize, d: usize| {
        ((b * t + tok) * 3 + which) * nh * hd + h * hd + d
    };
    let dout_at =
        |b: usize, tok: usize, h: usize, d: usize| dout[(b * t + tok) * nh * hd + h * hd + d];
    for b in 0..s.batch {
        for h in 0..nh {
            let (p, _) = attention_probs(&view, b, h);
            let mut ds = vec![0.0f64; t * t]; // d loss / d (scaled logits)
            for i in 0..t {
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..hd)
                            .map(|d| dout_at(b, i, h, d) * view.at(b, j, 2, h, d))
                            .sum()
                    })
                    .collect();
                let delta_i: f64 = (0..t).map(|j| p[i * t + j] * dp[j]).sum();
                for j in 0..t {
                    ds[i * t + j] = p[i * t + j] * (dp[j] - delta_i);
                }
            }
            for i in 0..t {
                for d in 0..hd {
                    dqkv[idx(b, i, 0, h, d)] = scale
                        * (0..t)
                            .map(|j| ds[i * t + j] * view.at(b, j, 1, h, d))
                            .sum::<f64>();
                    dqkv[idx(b, i, 1, h, d)] = scale
                        * (0..t)
                            .map(|j| ds[j * t + i] * view.at(b, j, 0, h, d))
                            .sum::<f64>();
                    dqkv[idx(b, i, 2, h, d)] = (0..t)
                        .map(|j| p[j * t + i] * dout_at(b, j, h, d))
                        .sum::<f64>();
                }
            }
        }
    }
    dqkv
}

// ---- LayerNorm ----------------------------------------------------------------------------

/// `(out, mean, rstd)` of a LayerNorm over rows of `c` (biased variance).
pub fn layernorm_reference(
    x: &[f64],
    w: &[f32],
    b: &[f32],
    c: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / c;
    let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &x[r * c..(r + 1) * c];
        let m = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - m).powi(2)).sum::<f64>() / c as f64;
        let s = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            out[r * c + i] = (row[i] - m) * s * w[i] as f64 + b[i] as f64;
        }
        mean[r] = m;
        rstd[r] = s;
    }
    (out, mean, rstd)
}

// ---- elementwise --------------------------------------------------------------------------

pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

pub fn gelu_grad(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
        + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

pub fn silu_grad(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// erf to ~1e-15 (series for small |x|, continued fraction tail otherwise).
pub fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series: 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0f64;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), accurate for |x| >= 2.5
        let z = x.abs();
        let mut f = z;
        let (mut c, mut d) = (z, 0.0);
        for k in 1..200 {
            let a = k as f64 / 2.0;
            d = z + a * d;
            d = 1.0 / d;
            c = z + a / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        let erfc = (-z * z).exp() / (f * std::f64::consts::PI.sqrt());
        (1.0 - erfc).copysign(x)
    }
}

// ---- Sinkhorn-Knopp -----------------------------------------------------------------------

/// The official algorithm literally, in f64: `Q = exp(T / tt)ᵀ` normalised to a total of 1,
/// then `iters` times every prototype divided by its sum and by `K`, every sample by its sum
/// and by `R`; finally `· R`. One global shift before `exp` (it cancels in the total); the
/// `R` rows are normalised jointly. `[R, K]` out, every row summing to 1.
pub fn sinkhorn_reference(t: &[f32], r: usize, k: usize, tt: f64, iters: usize) -> Vec<f64> {
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
                .for_each(|v| *v /= s * r as f64);
        }
    }
    q.iter_mut().for_each(|v| *v *= r as f64);
    q
}

/// [`sinkhorn_reference`] rounded to f32 (`logits [R, K]`, temperature, iterations).
pub fn sinkhorn_knopp_reference(
    logits: &[f32],
    rows: usize,
    k: usize,
    teacher_temp: f32,
    n_iters: usize,
) -> Vec<f32> {
    sinkhorn_reference(logits, rows, k, teacher_temp as f64, n_iters)
        .iter()
        .map(|&v| v as f32)
        .collect()
}

// ---- KoLeo --------------------------------------------------------------------------------

/// KoLeo's loss and `d loss / d x` in f64, nearest neighbours chosen here (max cosine). The
/// official eps placements (all 1e-8): normalisation `x / max(‖x‖, eps)`, eps added to every
/// component of the difference before its norm, and to the distance inside the log.
pub fn koleo_reference(x: &[f32], b: usize, d: usize) -> (f64, Vec<f64>) {
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

/// The KoLeo loss alone on f64 input (nearest neighbours re-chosen: fine for small steps).
pub fn koleo_loss_f64(x: &[f64], b: usize, d: usize) -> f64 {
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
