//! Shared by the nn tests: the gradient-check harness and naive f64 reference implementations
//! of every layer, written from the spec (`spec/dinov2.md` §1–2), not from the layer code.

#![allow(dead_code)]

use dinotrain::nn::ffn::swiglu_width;
use dinotrain::nn::ffn::Ffn;
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::vit::VitConfig;
use dinotrain::rng::{keyed, stream, Rng};
use rand::Rng as _;

// ---------------------------------------------------------------------------------------------
// Harness

pub fn uniform(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Random parameters of moderate size: LayerNorm weights and weight_g around 1.
pub fn random_params(table: &ParamTable, seed: u64) -> Vec<f32> {
    let mut rng = keyed(seed, &[stream::TEST, 1]);
    let mut flat = uniform(&mut rng, table.len(), 0.5);
    for s in table.specs() {
        let around_one =
            (s.name.contains("norm") && s.name.ends_with("weight")) || s.name.ends_with("weight_g");
        if around_one {
            flat[s.at.range()].iter_mut().for_each(|v| *v += 1.0);
        }
    }
    flat
}

/// f64 parameters addressed by name.
pub struct P<'a> {
    pub table: &'a ParamTable,
    pub vals: &'a [f64],
}

impl P<'_> {
    pub fn get(&self, name: &str) -> &[f64] {
        let s = self
            .table
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        &self.vals[s.at.range()]
    }
    pub fn opt(&self, name: &str) -> Option<&[f64]> {
        self.table.get(name).map(|s| &self.vals[s.at.range()])
    }
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn dot(a: &[f64], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, &y)| x * y as f64).sum()
}

pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, b)| (a as f64 - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    let err = num / den.max(1e-12);
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.1e}");
}

/// Compares analytic gradients with central differences of `loss(params64, input64)` on
/// sampled coordinates of every parameter tensor and of the input.
pub fn check_grads(
    what: &str,
    table: &ParamTable,
    params: &[f32],
    input: &[f32],
    dparams: &[f32],
    dinput: &[f32],
    loss: &dyn Fn(&P, &[f64]) -> f64,
) {
    const SAMPLES: usize = 6;
    const H: f64 = 1e-5;
    const TOL: f64 = 2e-3;
    let mut p64 = to64(params);
    let mut x64 = to64(input);
    let mut rng = keyed(7, &[stream::TEST, 2]);
    let mut groups: Vec<(String, Vec<usize>, bool)> = table
        .specs()
        .iter()
        .map(|s| {
            let idx: Vec<usize> = if s.at.len <= SAMPLES {
                s.at.range().collect()
            } else {
                (0..SAMPLES)
                    .map(|_| s.at.offset + rng.random_range(0..s.at.len))
                    .collect()
            };
            (s.name.clone(), idx, true)
        })
        .collect();
    if !input.is_empty() {
        let idx = (0..2 * SAMPLES)
            .map(|_| rng.random_range(0..input.len()))
            .collect();
        groups.push(("<input>".into(), idx, false));
    }
    for (name, idx, is_param) in groups {
        let mut num = Vec::new();
        let mut ana = Vec::new();
        for &i in &idx {
            let eval = |p: &[f64], x: &[f64]| loss(&P { table, vals: p }, x);
            let d = if is_param {
                let v = p64[i];
                p64[i] = v + H;
                let lp = eval(&p64, &x64);
                p64[i] = v - H;
                let lm = eval(&p64, &x64);
                p64[i] = v;
                (lp - lm) / (2.0 * H)
            } else {
                let v = x64[i];
                x64[i] = v + H;
                let lp = eval(&p64, &x64);
                x64[i] = v - H;
                let lm = eval(&p64, &x64);
                x64[i] = v;
                (lp - lm) / (2.0 * H)
            };
            num.push(d);
            ana.push(if is_param { dparams[i] } else { dinput[i] } as f64);
        }
        let diff: f64 = num
            .iter()
            .zip(&ana)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = num.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(
            diff <= TOL * norm || diff <= 1e-6,
            "{what}: gradient of {name}: |analytic - numeric| = {diff:.3e}, |numeric| = {norm:.3e}\n  analytic {ana:?}\n  numeric  {num:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// f64 reference implementations (from the spec)

pub fn erf(x: f64) -> f64 {
    libm::erf(x)
}

pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / 2f64.sqrt()))
}

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// `x W^T + b`, x [rows, k], W [n, k].
pub fn linear(
    x: &[f64],
    rows: usize,
    w: &[f64],
    b: Option<&[f64]>,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; rows * n];
    for r in 0..rows {
        for o in 0..n {
            let mut s = b.map_or(0.0, |b| b[o]);
            for i in 0..k {
                s += x[r * k + i] * w[o * k + i];
            }
            y[r * n + o] = s;
        }
    }
    y
}

pub fn lin(p: &P, name: &str, x: &[f64], rows: usize, k: usize, n: usize) -> Vec<f64> {
    linear(
        x,
        rows,
        p.get(&format!("{name}weight")),
        p.opt(&format!("{name}bias")),
        k,
        n,
    )
}

pub fn layernorm(p: &P, name: &str, x: &[f64], rows: usize, d: usize) -> Vec<f64> {
    let (w, b) = (
        p.get(&format!("{name}weight")),
        p.get(&format!("{name}bias")),
    );
    let mut y = vec![0.0; rows * d];
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        for i in 0..d {
            y[r * d + i] = (row[i] - mean) / (var + 1e-6).sqrt() * w[i] + b[i];
        }
    }
    y
}

/// Softmax attention on qkv [b, t, 3, h, hd] -> [b, t, h·hd].
pub fn attention_core(qkv: &[f64], b: usize, t: usize, h: usize, hd: usize) -> Vec<f64> {
    let c = h * hd;
    let at = |img: usize, tok: usize, which: usize, head: usize, j: usize| {
        qkv[((img * t + tok) * 3 + which) * c + head * hd + j]
    };
    let scale = (hd as f64).powf(-0.5);
    let mut out = vec![0.0; b * t * c];
    for img in 0..b {
        for head in 0..h {
            for i in 0..t {
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..hd)
                            .map(|e| at(img, i, 0, head, e) * at(img, j, 1, head, e))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for e in 0..hd {
                    out[(img * t + i) * c + head * hd + e] = (0..t)
                        .map(|j| (s[j] - m).exp() / z * at(img, j, 2, head, e))
                        .sum();
                }
            }
        }
    }
    out
}

pub fn attention(p: &P, name: &str, x: &[f64], b: usize, t: usize, d: usize, h: usize) -> Vec<f64> {
    let qkv = lin(p, &format!("{name}qkv."), x, b * t, d, 3 * d);
    let o = attention_core(&qkv, b, t, h, d / h);
    lin(p, &format!("{name}proj."), &o, b * t, d, d)
}

pub fn mlp(p: &P, name: &str, x: &[f64], rows: usize, d: usize, hidden: usize) -> Vec<f64> {
    let a: Vec<f64> = lin(p, &format!("{name}fc1."), x, rows, d, hidden)
        .into_iter()
        .map(gelu)
        .collect();
    lin(p, &format!("{name}fc2."), &a, rows, hidden, d)
}

pub fn swiglu(p: &P, name: &str, x: &[f64], rows: usize, d: usize, width: usize) -> Vec<f64> {
    let x12 = lin(p, &format!("{name}w12."), x, rows, d, 2 * width);
    let mut g = vec![0.0; rows * width];
    for r in 0..rows {
        for i in 0..width {
            g[r * width + i] = silu(x12[r * 2 * width + i]) * x12[r * 2 * width + width + i];
        }
    }
    lin(p, &format!("{name}w3."), &g, rows, width, d)
}

pub fn ffn(p: &P, name: &str, x: &[f64], rows: usize, d: usize, f: Ffn) -> Vec<f64> {
    match f {
        Ffn::Mlp { hidden } => mlp(p, name, x, rows, d, hidden),
        Ffn::SwiGlu { hidden } => swiglu(p, name, x, rows, d, swiglu_width(hidden)),
    }
}

/// Block with explicit kept subsets per branch (`None` = all samples, scale 1).
#[allow(clippy::too_many_arguments)]
pub fn block(
    p: &P,
    name: &str,
    x: &[f64],
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
    f: Ffn,
    subsets: [Option<&[usize]>; 2],
) -> Vec<f64> {
    let mut x = x.to_vec();
    let sample = t * d;
    for (branch, subset) in subsets.iter().enumerate() {
        let kept: Vec<usize> = subset.map_or((0..b).collect(), |s| s.to_vec());
        let scale = b as f64 / kept.len() as f64;
        let xs: Vec<f64> = kept
            .iter()
            .flat_map(|&i| x[i * sample..(i + 1) * sample].to_vec())
            .collect();
        let bs = kept.len();
        let (norm, ls) = if branch == 0 {
            ("norm1.", "ls1.gamma")
        } else {
            ("norm2.", "ls2.gamma")
        };
        let ln = layernorm(p, &format!("{name}{norm}"), &xs, bs * t, d);
        let y = if branch == 0 {
            attention(p, &format!("{name}attn."), &ln, bs, t, d, heads)
        } else {
            ffn(p, &format!("{name}mlp."), &ln, bs * t, d, f)
        };
        let gamma = p.opt(&format!("{name}{ls}"));
        for (j, &i) in kept.iter().enumerate() {
            for e in 0..sample {
                let g = gamma.map_or(1.0, |g| g[e % d]);
                x[i * sample + e] += scale * g * y[j * sample + e];
            }
        }
    }
    x
}

/// Keys' cubic kernel.
pub fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        (a + 2.0) * x.powi(3) - (a + 3.0) * x * x + 1.0
    } else if x < 2.0 {
        a * x.powi(3) - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

/// 1-D resampling weights [out, m] per spec 1.5.
pub fn resample_weights(m: usize, g: usize, offset: f64, antialias: bool) -> Vec<Vec<f64>> {
    let step = if offset > 0.0 {
        m as f64 / (g as f64 + offset)
    } else {
        m as f64 / g as f64
    };
    (0..g)
        .map(|i| {
            let mut w = vec![0.0; m];
            if antialias {
                let support = 2.0 * step.max(1.0);
                let inv = if step >= 1.0 { 1.0 / step } else { 1.0 };
                let center = step * (i as f64 + 0.5);
                let lo = ((center - support + 0.5).trunc() as i64).max(0) as usize;
                let hi = ((center + support + 0.5).trunc() as i64).min(m as i64) as usize;
                for (j, wj) in w.iter_mut().enumerate().take(hi).skip(lo) {
                    *wj = cubic((j as f64 - center + 0.5) * inv, -0.5);
                }
                let s: f64 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= s);
            } else {
                let src = (i as f64 + 0.5) * step - 0.5;
                let i0 = src.floor();
                let t = src - i0;
                let taps = [
                    cubic(t + 1.0, -0.75),
                    cubic(t, -0.75),
                    cubic(1.0 - t, -0.75),
                    cubic(2.0 - t, -0.75),
                ];
                for (k, tw) in taps.iter().enumerate() {
                    let idx = (i0 as i64 - 1 + k as i64).clamp(0, m as i64 - 1) as usize;
                    w[idx] += tw;
                }
            }
            w
        })
        .collect()
}

/// pos_embed [1 + m², d] -> [1 + gh·gw, d].
#[allow(clippy::too_many_arguments)]
pub fn pos_interp(
    pe: &[f64],
    m: usize,
    d: usize,
    h: usize,
    w: usize,
    gh: usize,
    gw: usize,
    offset: f64,
    antialias: bool,
) -> Vec<f64> {
    if gh * gw == m * m && h == w {
        return pe.to_vec();
    }
    let (wr, wc) = (
        resample_weights(m, gh, offset, antialias),
        resample_weights(m, gw, offset, antialias),
    );
    let mut out = vec![0.0; (1 + gh * gw) * d];
    out[..d].copy_from_slice(&pe[..d]);
    for i in 0..gh {
        for j in 0..gw {
            for e in 0..d {
                let mut s = 0.0;
                for a in 0..m {
                    for bb in 0..m {
                        s += wr[i][a] * wc[j][bb] * pe[d + (a * m + bb) * d + e];
                    }
                }
                out[d + (i * gw + j) * d + e] = s;
            }
        }
    }
    out
}

/// Conv2d(kernel = stride = p) as a direct sum: [b, c, h, w] -> [b, n, d].
#[allow(clippy::too_many_arguments)]
pub fn patch_embed(
    p: &P,
    name: &str,
    img: &[f64],
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    ps: usize,
    d: usize,
) -> Vec<f64> {
    let (wt, bias) = (
        p.get(&format!("{name}proj.weight")),
        p.get(&format!("{name}proj.bias")),
    );
    let (gh, gw) = (h / ps, w / ps);
    let mut out = vec![0.0; b * gh * gw * d];
    for n in 0..b {
        for i in 0..gh {
            for j in 0..gw {
                for o in 0..d {
                    let mut s = bias[o];
                    for ch in 0..c {
                        for ki in 0..ps {
                            for kj in 0..ps {
                                s += wt[((o * c + ch) * ps + ki) * ps + kj]
                                    * img[((n * c + ch) * h + i * ps + ki) * w + j * ps + kj];
                            }
                        }
                    }
                    out[((n * gh + i) * gw + j) * d + o] = s;
                }
            }
        }
    }
    out
}

/// The ViT: returns (cls [b,d], reg [b,r,d], patch [b,n,d]).
pub fn vit(
    p: &P,
    cfg: &VitConfig,
    img: &[f64],
    b: usize,
    h: usize,
    w: usize,
    masks: Option<&[bool]>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (ps, d, r, c) = (
        cfg.patch_size,
        cfg.embed_dim,
        cfg.num_register_tokens,
        cfg.in_chans,
    );
    let (gh, gw) = (h / ps, w / ps);
    let n = gh * gw;
    let t = 1 + r + n;
    let mut pe = patch_embed(p, "patch_embed.", img, b, c, h, w, ps, d);
    if let Some(m) = masks {
        for (k, &masked) in m.iter().enumerate() {
            if masked {
                pe[k * d..(k + 1) * d].copy_from_slice(p.get("mask_token"));
            }
        }
    }
    let pos = pos_interp(
        p.get("pos_embed"),
        cfg.grid(),
        d,
        h,
        w,
        gh,
        gw,
        cfg.interpolate_offset as f64,
        cfg.interpolate_antialias,
    );
    let mut x = vec![0.0; b * t * d];
    for n_ in 0..b {
        for e in 0..d {
            x[n_ * t * d + e] = p.get("cls_token")[e] + pos[e];
        }
        for k in 0..r * d {
            x[n_ * t * d + d + k] = p.get("register_tokens")[k];
        }
        for k in 0..n * d {
            x[n_ * t * d + (1 + r) * d + k] = pe[n_ * n * d + k] + pos[d + k];
        }
    }
    for i in 0..cfg.depth {
        x = block(
            p,
            &format!("blocks.{i}."),
            &x,
            b,
            t,
            d,
            cfg.num_heads,
            cfg.ffn,
            [None, None],
        );
    }
    let xn = layernorm(p, "norm.", &x, b * t, d);
    let (mut cls, mut reg, mut patch) = (vec![], vec![], vec![]);
    for n_ in 0..b {
        let row = &xn[n_ * t * d..(n_ + 1) * t * d];
        cls.extend_from_slice(&row[..d]);
        reg.extend_from_slice(&row[d..(1 + r) * d]);
        patch.extend_from_slice(&row[(1 + r) * d..]);
    }
    (cls, reg, patch)
}

pub fn dino_head(p: &P, x: &[f64], n: usize, dims: (usize, usize, usize, usize)) -> Vec<f64> {
    let (i, hd, bn, k) = dims;
    let a: Vec<f64> = lin(p, "mlp.0.", x, n, i, hd)
        .into_iter()
        .map(gelu)
        .collect();
    let a: Vec<f64> = lin(p, "mlp.2.", &a, n, hd, hd)
        .into_iter()
        .map(gelu)
        .collect();
    let mut z = lin(p, "mlp.4.", &a, n, hd, bn);
    for row in z.chunks_mut(bn) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let (g, v) = (p.get("last_layer.weight_g"), p.get("last_layer.weight_v"));
    let mut wn = vec![0.0; k * bn];
    for r in 0..k {
        let norm = v[r * bn..(r + 1) * bn]
            .iter()
            .map(|a| a * a)
            .sum::<f64>()
            .sqrt();
        for j in 0..bn {
            wn[r * bn + j] = g[r] * v[r * bn + j] / norm;
        }
    }
    linear(&z, n, &wn, None, bn, k)
}
