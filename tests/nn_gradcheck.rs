//! Gradient checks of every layer: the analytic f32 backward against central finite
//! differences of an independent f64 evaluation of the same forward (small naive reference
//! implementations below, written from the spec, not from the layer code). Each check also
//! compares the f32 forward with the f64 reference, so the reference is the same function.
//!
//! Objective: `L = Σ out · cot` with a random cotangent `cot`.

use dinotrain::nn::attention::Attention;
use dinotrain::nn::block::{Block, BlockCache, BlockConfig};
use dinotrain::nn::dino_head::DinoHead;
use dinotrain::nn::drop_path::DropPath;
use dinotrain::nn::ffn::{Ffn, FfnLayer};
use dinotrain::nn::layernorm::LayerNorm;
use dinotrain::nn::linear::{Bias, Linear};
use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::nn::patch_embed::PatchEmbed;
use dinotrain::nn::pos_embed::{PosEmbed, Resampling};
use dinotrain::nn::swiglu::swiglu_width;
use dinotrain::nn::vit::{Vit, VitConfig};
use dinotrain::rng::{keyed, stream, Rng};
use rand::Rng as _;

// ---------------------------------------------------------------------------------------------
// Harness

fn uniform(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Random parameters of moderate size: LayerNorm weights and weight_g around 1.
fn random_params(table: &ParamTable, seed: u64) -> Vec<f32> {
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
struct P<'a> {
    table: &'a ParamTable,
    vals: &'a [f64],
}

impl P<'_> {
    fn get(&self, name: &str) -> &[f64] {
        let s = self
            .table
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        &self.vals[s.at.range()]
    }
    fn opt(&self, name: &str) -> Option<&[f64]> {
        self.table.get(name).map(|s| &self.vals[s.at.range()])
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, &y)| x * y as f64).sum()
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
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
fn check_grads(
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

fn erf(x: f64) -> f64 {
    libm::erf(x)
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / 2f64.sqrt()))
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// `x W^T + b`, x [rows, k], W [n, k].
fn linear(x: &[f64], rows: usize, w: &[f64], b: Option<&[f64]>, k: usize, n: usize) -> Vec<f64> {
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

fn lin(p: &P, name: &str, x: &[f64], rows: usize, k: usize, n: usize) -> Vec<f64> {
    linear(
        x,
        rows,
        p.get(&format!("{name}weight")),
        p.opt(&format!("{name}bias")),
        k,
        n,
    )
}

fn layernorm(p: &P, name: &str, x: &[f64], rows: usize, d: usize) -> Vec<f64> {
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
fn attention_core(qkv: &[f64], b: usize, t: usize, h: usize, hd: usize) -> Vec<f64> {
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

fn attention(p: &P, name: &str, x: &[f64], b: usize, t: usize, d: usize, h: usize) -> Vec<f64> {
    let qkv = lin(p, &format!("{name}qkv."), x, b * t, d, 3 * d);
    let o = attention_core(&qkv, b, t, h, d / h);
    lin(p, &format!("{name}proj."), &o, b * t, d, d)
}

fn mlp(p: &P, name: &str, x: &[f64], rows: usize, d: usize, hidden: usize) -> Vec<f64> {
    let a: Vec<f64> = lin(p, &format!("{name}fc1."), x, rows, d, hidden)
        .into_iter()
        .map(gelu)
        .collect();
    lin(p, &format!("{name}fc2."), &a, rows, hidden, d)
}

fn swiglu(p: &P, name: &str, x: &[f64], rows: usize, d: usize, width: usize) -> Vec<f64> {
    let x12 = lin(p, &format!("{name}w12."), x, rows, d, 2 * width);
    let mut g = vec![0.0; rows * width];
    for r in 0..rows {
        for i in 0..width {
            g[r * width + i] = silu(x12[r * 2 * width + i]) * x12[r * 2 * width + width + i];
        }
    }
    lin(p, &format!("{name}w3."), &g, rows, width, d)
}

fn ffn(p: &P, name: &str, x: &[f64], rows: usize, d: usize, f: Ffn) -> Vec<f64> {
    match f {
        Ffn::Mlp { hidden } => mlp(p, name, x, rows, d, hidden),
        Ffn::SwiGlu { hidden } => swiglu(p, name, x, rows, d, swiglu_width(hidden)),
    }
}

/// Block with explicit kept subsets per branch (`None` = all samples, scale 1).
#[allow(clippy::too_many_arguments)]
fn block(
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
fn cubic(x: f64, a: f64) -> f64 {
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
fn resample_weights(m: usize, g: usize, offset: f64, antialias: bool) -> Vec<Vec<f64>> {
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
fn pos_interp(
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
fn patch_embed(
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
fn vit(
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

fn dino_head(p: &P, x: &[f64], n: usize, dims: (usize, usize, usize, usize)) -> Vec<f64> {
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

// ---------------------------------------------------------------------------------------------
// Checks

#[test]
fn linear_gradients() {
    let (rows, k, n) = (5, 7, 4);
    let mut table = ParamTable::new();
    let layer = Linear::new(&mut table, "", k, n, Bias::Yes, Init::Zeros);
    let params = random_params(&table, 1);
    let mut rng = keyed(1, &[stream::TEST]);
    let x = uniform(&mut rng, rows * k, 1.0);
    let cot = uniform(&mut rng, rows * n, 1.0);
    let mut y = vec![0f32; rows * n];
    layer.forward(&mut y, &x, &params, rows);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * k];
    layer.backward(Some(&mut dx), &mut g, &cot, &x, &params, rows);
    let f = |p: &P, x: &[f64]| lin(p, "", x, rows, k, n);
    assert_close(
        "linear forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-6,
    );
    check_grads("linear", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

#[test]
fn layernorm_gradients() {
    let (rows, d) = (6, 9);
    let mut table = ParamTable::new();
    let ln = LayerNorm::new(&mut table, "", d, 1e-6);
    let params = random_params(&table, 2);
    let mut rng = keyed(2, &[stream::TEST]);
    let x = uniform(&mut rng, rows * d, 2.0);
    let cot = uniform(&mut rng, rows * d, 1.0);
    let mut y = vec![0f32; rows * d];
    let stats = ln.forward(&mut y, &x, &params, rows);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * d];
    ln.backward(&mut dx, &mut g, &cot, &x, &stats, &params, rows);
    let f = |p: &P, x: &[f64]| layernorm(p, "", x, rows, d);
    assert_close(
        "layernorm forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-6,
    );
    check_grads("layernorm", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

#[test]
fn gelu_kernel_gradients() {
    use dinotrain::backend::cpu::elementwise::{gelu_backward, gelu_forward};
    let mut rng = keyed(3, &[stream::TEST]);
    let x = uniform(&mut rng, 64, 4.0);
    let cot = uniform(&mut rng, 64, 1.0);
    let mut y = vec![0f32; 64];
    gelu_forward(&mut y, &x);
    let mut dx = vec![0f32; 64];
    gelu_backward(&mut dx, &cot, &x);
    let f = |x: &[f64]| x.iter().map(|&v| gelu(v)).collect::<Vec<_>>();
    assert_close("gelu forward", &y, &f(&to64(&x)), 1e-6);
    let table = ParamTable::new();
    check_grads("gelu", &table, &[], &x, &[], &dx, &|_, x| dot(&f(x), &cot));
}

#[test]
fn attention_gradients() {
    let (b, t, d, h) = (2, 5, 8, 2);
    let mut table = ParamTable::new();
    let attn = Attention::new(&mut table, "", d, h, Bias::Yes, Bias::Yes);
    let params = random_params(&table, 4);
    let mut rng = keyed(4, &[stream::TEST]);
    let x = uniform(&mut rng, b * t * d, 1.0);
    let cot = uniform(&mut rng, b * t * d, 1.0);
    let mut y = vec![0f32; b * t * d];
    let cache = attn.forward(&mut y, &x, &params, b, t);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; b * t * d];
    attn.backward(&mut dx, &mut g, &cot, &x, &cache, &params, b, t);
    let f = |p: &P, x: &[f64]| attention(p, "", x, b, t, d, h);
    assert_close(
        "attention forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    check_grads("attention", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

fn ffn_check(ffn_kind: Ffn, seed: u64) {
    let (rows, d) = (6, 8);
    let mut table = ParamTable::new();
    let layer = FfnLayer::new(&mut table, "", d, ffn_kind, Bias::Yes);
    let params = random_params(&table, seed);
    let mut rng = keyed(seed, &[stream::TEST]);
    let x = uniform(&mut rng, rows * d, 1.0);
    let cot = uniform(&mut rng, rows * d, 1.0);
    let mut y = vec![0f32; rows * d];
    let cache = layer.forward(&mut y, &x, &params, rows);
    let mut g = vec![0f32; table.len()];
    let mut dx = vec![0f32; rows * d];
    layer.backward(&mut dx, &mut g, &cot, &x, &cache, &params, rows);
    let f = |p: &P, x: &[f64]| ffn(p, "", x, rows, d, ffn_kind);
    assert_close(
        "ffn forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    check_grads(
        &format!("{ffn_kind:?}"),
        &table,
        &params,
        &x,
        &g,
        &dx,
        &|p, x| dot(&f(p, x), &cot),
    );
}

#[test]
fn mlp_gradients() {
    ffn_check(Ffn::Mlp { hidden: 12 }, 5);
}

#[test]
fn swiglu_gradients() {
    // Nominal 24 → fused width (16 + 7) / 8 · 8 = 16.
    assert_eq!(swiglu_width(24), 16);
    ffn_check(Ffn::SwiGlu { hidden: 24 }, 6);
}

fn block_check(drop_rate: f32, ffn_kind: Ffn, layerscale: Option<f32>, seed: u64) -> BlockCache {
    let (b, t, d, h) = (4, 3, 8, 2);
    let cfg = BlockConfig {
        dim: d,
        num_heads: h,
        ffn: ffn_kind,
        layerscale,
        eps: 1e-6,
        qkv_bias: true,
        proj_bias: true,
        ffn_bias: true,
    };
    let mut table = ParamTable::new();
    let blk = Block::new(&mut table, "", &cfg);
    let params = random_params(&table, seed);
    let mut rng = keyed(seed, &[stream::TEST]);
    let x = uniform(&mut rng, b * t * d, 1.0);
    let cot = uniform(&mut rng, b * t * d, 1.0);
    let mut y = x.clone();
    let mut dp_rng = keyed(seed, &[stream::DROP_PATH]);
    let dp = (drop_rate > 0.0).then_some(DropPath {
        rate: drop_rate,
        rng: &mut dp_rng,
    });
    let cache = match dp {
        Some(mut dp) => blk.forward(&mut y, &params, b, t, Some(&mut dp)),
        None => blk.forward(&mut y, &params, b, t, None),
    };
    let mut g = vec![0f32; table.len()];
    let mut dx = cot.clone();
    blk.backward(&mut dx, &mut g, &cache, &params);
    let subsets = [
        cache.attn.subset.as_ref().map(|s| s.kept.clone()),
        cache.ffn.subset.as_ref().map(|s| s.kept.clone()),
    ];
    let f = |p: &P, x: &[f64]| {
        block(
            p,
            "",
            x,
            b,
            t,
            d,
            h,
            ffn_kind,
            [subsets[0].as_deref(), subsets[1].as_deref()],
        )
    };
    assert_close(
        "block forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    check_grads("block", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
    cache
}

#[test]
fn block_gradients() {
    block_check(0.0, Ffn::Mlp { hidden: 16 }, Some(0.7), 8);
    block_check(0.0, Ffn::SwiGlu { hidden: 16 }, None, 9);
}

#[test]
fn block_gradients_with_batch_subset_drop_path() {
    let cache = block_check(0.5, Ffn::Mlp { hidden: 16 }, Some(0.7), 10);
    let (a, f) = (cache.attn.subset.unwrap(), cache.ffn.subset.unwrap());
    assert_eq!((a.kept.len(), f.kept.len()), (2, 2));
    assert_eq!((a.scale, f.scale), (2.0, 2.0));
}

#[test]
fn patch_embed_gradients() {
    let (b, c, h, w, ps, d) = (2, 3, 6, 4, 2, 5);
    let mut table = ParamTable::new();
    let pe = PatchEmbed::new(&mut table, "patch_embed.", c, ps, d);
    let params = random_params(&table, 11);
    let mut rng = keyed(11, &[stream::TEST]);
    let img = uniform(&mut rng, b * c * h * w, 1.0);
    let n = (h / ps) * (w / ps);
    let cot = uniform(&mut rng, b * n * d, 1.0);
    let mut y = vec![0f32; b * n * d];
    let mut cols = vec![0f32; b * n * c * ps * ps];
    pe.forward(&mut y, &mut cols, &img, &params, b, h, w);
    let mut g = vec![0f32; table.len()];
    let mut dimg = vec![0f32; img.len()];
    pe.backward(Some(&mut dimg), &mut g, &cot, &cols, &params, b, h, w);
    let f = |p: &P, x: &[f64]| patch_embed(p, "patch_embed.", x, b, c, h, w, ps, d);
    assert_close(
        "patch embed forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&img),
        ),
        1e-6,
    );
    check_grads("patch embed", &table, &params, &img, &g, &dimg, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

fn pos_check(h: usize, w: usize, gh: usize, gw: usize, offset: f32, resampling: Resampling) {
    let (m, d) = (4, 3);
    let mut table = ParamTable::new();
    let pos = PosEmbed::new(&mut table, "", m, d, offset, resampling);
    let params = random_params(&table, 12);
    let plan = pos.plan(h, w, gh, gw);
    let n = 1 + gh * gw;
    let cot = uniform(&mut keyed(12, &[stream::TEST]), n * d, 1.0);
    let mut y = vec![0f32; n * d];
    pos.forward(&mut y, &params, &plan);
    let mut g = vec![0f32; table.len()];
    pos.backward(&mut g, &cot, &plan);
    let aa = resampling == Resampling::Antialias;
    let f = |p: &P| pos_interp(p.get("pos_embed"), m, d, h, w, gh, gw, offset as f64, aa);
    let what = format!("pos interp {h}x{w} -> {gh}x{gw}, offset {offset}, {resampling:?}");
    assert_close(
        &what,
        &y,
        &f(&P {
            table: &table,
            vals: &to64(&params),
        }),
        1e-5,
    );
    check_grads(&what, &table, &params, &[], &g, &[], &|p, _| {
        dot(&f(p), &cot)
    });
}

#[test]
fn pos_interp_gradients_both_modes() {
    for resampling in [Resampling::Bicubic, Resampling::Antialias] {
        for offset in [0.1, 0.0] {
            pos_check(28, 28, 2, 2, offset, resampling); // down
            pos_check(84, 84, 6, 6, offset, resampling); // up
            pos_check(42, 70, 3, 5, offset, resampling); // non-square
            pos_check(56, 56, 4, 4, offset, resampling); // identity
        }
    }
    // Same patch count as the grid but a non-square input: interpolated, not identity.
    pos_check(32, 128, 2, 8, 0.1, Resampling::Bicubic);
}

#[test]
fn dino_head_gradients_including_weight_g() {
    let (n, i, hd, bn, k) = (3, 6, 10, 5, 7);
    let mut table = ParamTable::new();
    let head = DinoHead::new(i, hd, bn, k, &mut table, "");
    let params = random_params(&table, 13);
    let mut rng = keyed(13, &[stream::TEST]);
    let x = uniform(&mut rng, n * i, 1.0);
    let cot = uniform(&mut rng, n * k, 1.0);
    let (y, cache) = head.forward(&params, &x, n);
    let mut g = vec![0f32; table.len()];
    let dx = head.backward(&params, &mut g, &cache, &cot);
    let f = |p: &P, x: &[f64]| dino_head(p, x, n, (i, hd, bn, k));
    assert_close(
        "dino head forward",
        &y,
        &f(
            &P {
                table: &table,
                vals: &to64(&params),
            },
            &to64(&x),
        ),
        1e-5,
    );
    assert!(g[table.get("last_layer.weight_g").unwrap().at.range()]
        .iter()
        .any(|v| *v != 0.0));
    check_grads("dino head", &table, &params, &x, &g, &dx, &|p, x| {
        dot(&f(p, x), &cot)
    });
}

fn vit_check(cfg: &VitConfig, b: usize, h: usize, w: usize, with_masks: bool, seed: u64) {
    let mut table = ParamTable::new();
    let model = Vit::new(cfg, &mut table, "");
    let params = random_params(&table, seed);
    let mut rng = keyed(seed, &[stream::TEST]);
    let img = uniform(&mut rng, b * cfg.in_chans * h * w, 1.0);
    let n = (h / cfg.patch_size) * (w / cfg.patch_size);
    let (d, r) = (cfg.embed_dim, cfg.num_register_tokens);
    let masks: Option<Vec<bool>> = with_masks.then(|| (0..b * n).map(|k| k % 3 == 1).collect());
    let c_cls = uniform(&mut rng, b * d, 1.0);
    let c_reg = uniform(&mut rng, b * r * d, 1.0);
    let c_patch = uniform(&mut rng, b * n * d, 1.0);
    let (out, cache) = model
        .forward(&params, &img, b, h, w, masks.as_deref(), None)
        .unwrap();
    let mut g = vec![0f32; table.len()];
    let dimg = model
        .backward(&params, &mut g, &cache, &c_cls, &c_patch, Some(&c_reg))
        .unwrap();
    let p64 = to64(&params);
    let (cls, reg, patch) = vit(
        &P {
            table: &table,
            vals: &p64,
        },
        cfg,
        &to64(&img),
        b,
        h,
        w,
        masks.as_deref(),
    );
    assert_close("vit cls", &out.cls, &cls, 1e-5);
    assert_close("vit patch", &out.patch, &patch, 1e-5);
    if r > 0 {
        assert_close("vit reg", &out.reg, &reg, 1e-5);
    }
    let mask_grad = &g[table.get("mask_token").unwrap().at.range()];
    assert_eq!(mask_grad.iter().any(|v| *v != 0.0), with_masks);
    check_grads("vit", &table, &params, &img, &g, &dimg, &|p, x| {
        let (cls, reg, patch) = vit(p, cfg, x, b, h, w, masks.as_deref());
        dot(&cls, &c_cls) + dot(&reg, &c_reg) + dot(&patch, &c_patch)
    });
}

fn micro_cfg(registers: usize, offset: f32, antialias: bool, ffn: Ffn) -> VitConfig {
    VitConfig {
        img_size: 8,
        patch_size: 2,
        in_chans: 3,
        embed_dim: 8,
        depth: 2,
        num_heads: 2,
        ffn,
        num_register_tokens: registers,
        layerscale: Some(0.5),
        interpolate_offset: offset,
        interpolate_antialias: antialias,
        qkv_bias: true,
        proj_bias: true,
        ffn_bias: true,
    }
}

#[test]
fn vit_gradients_with_masks_and_registers() {
    vit_check(
        &micro_cfg(2, 0.1, false, Ffn::Mlp { hidden: 16 }),
        2,
        8,
        8,
        true,
        14,
    );
}

#[test]
fn vit_gradients_interpolated_both_modes() {
    vit_check(
        &micro_cfg(0, 0.1, false, Ffn::Mlp { hidden: 16 }),
        2,
        6,
        10,
        true,
        15,
    );
    vit_check(
        &micro_cfg(2, 0.0, true, Ffn::SwiGlu { hidden: 16 }),
        1,
        12,
        12,
        false,
        16,
    );
}
