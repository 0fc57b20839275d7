//! The augmentation against torchvision / Pillow as the official `DataAugmentationDINO` calls
//! them: per-operation pixels for fixed parameters (reference values made by
//! tools/make-augment-golden.py, committed in tests/data/reference/augment.safetensors.gz),
//! and the distributions of the random parameters over many draws.

use dinotrain::data::augment::{
    apply_crop_plan, draw_crop_plan, flip_horizontal, normalize_chw, random_resized_crop_params,
    CropKind, CropPlan, JitterOp, JitterPlan, MultiCropConfig, Scratch,
};
use dinotrain::data::blur::gaussian_blur;
use dinotrain::data::color;
use dinotrain::data::resize::{resize_bicubic, Rect};
use dinotrain::data::RgbImage;
use dinotrain::io::safetensors::{TensorFile, Value};
use dinotrain::rng::{keyed, stream};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

fn fixture() -> TensorFile {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference/augment.safetensors.gz");
    let gz = std::fs::read(&path).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut bytes)
        .unwrap();
    TensorFile::from_bytes(&bytes, &path).unwrap()
}

fn cases(f: &TensorFile) -> Vec<Json> {
    serde_json::from_str::<Json>(&f.metadata["cases"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn image(f: &TensorFile, name: &str) -> RgbImage {
    match &f.tensors[&format!("in.{name}")] {
        Value::U8 { shape, data } => RgbImage {
            width: shape[1] as u32,
            height: shape[0] as u32,
            data: data.clone(),
        },
        _ => panic!("in.{name} is not U8"),
    }
}

fn jitter_op(name: &str) -> JitterOp {
    match name {
        "brightness" => JitterOp::Brightness,
        "contrast" => JitterOp::Contrast,
        "saturation" => JitterOp::Saturation,
        "hue" => JitterOp::Hue,
        _ => panic!("jitter op {name}"),
    }
}

fn apply_jitter(px: &mut [u8], op: JitterOp, factor: f32) {
    match op {
        JitterOp::Brightness => color::adjust_brightness(px, factor),
        JitterOp::Contrast => color::adjust_contrast(px, factor),
        JitterOp::Saturation => color::adjust_saturation(px, factor),
        JitterOp::Hue => color::adjust_hue(px, factor),
    }
}

fn f(v: &Json) -> f64 {
    v.as_f64().unwrap()
}

fn u(v: &Json) -> u32 {
    v.as_u64().unwrap() as u32
}

/// dinotrain's output for one case: 8-bit pixels or a normalised CHW tensor.
enum Out {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

fn compute(img: &RgbImage, op: &str, p: &Json) -> Out {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut px = img.data.clone();
    let mut tmp = Vec::new();
    let mut ftmp = Vec::new();
    let cfg = MultiCropConfig::default();
    match op {
        "resized_crop" => {
            let b: Vec<u32> = p["box"].as_array().unwrap().iter().map(u).collect();
            let size = u(&p["size"]);
            let region = Rect {
                y: b[0],
                x: b[1],
                height: b[2],
                width: b[3],
            };
            let mut out = vec![0u8; (size * size * 3) as usize];
            resize_bicubic(&mut out, &mut tmp, &img.data, img.width, region, size, size);
            return Out::U8(out);
        }
        "hflip" => flip_horizontal(&mut px, w),
        "brightness" | "contrast" | "saturation" | "hue" => {
            apply_jitter(&mut px, jitter_op(op), f(&p["factor"]) as f32)
        }
        "jitter" => {
            for o in p["ops"].as_array().unwrap() {
                apply_jitter(&mut px, jitter_op(o[0].as_str().unwrap()), f(&o[1]) as f32);
            }
        }
        "grayscale" => color::grayscale(&mut px),
        "blur" => gaussian_blur(
            &mut px,
            &mut ftmp,
            w,
            h,
            p["kernel_size"].as_u64().unwrap() as usize,
            f(&p["sigma"]) as f32,
        ),
        "solarize" => color::solarize(&mut px, u(&p["threshold"]) as u8),
        "normalize" => {
            let mut out = vec![0f32; px.len()];
            normalize_chw(&mut out, &px, cfg.mean, cfg.std);
            return Out::F32(out);
        }
        "crop" => {
            let b: Vec<u32> = p["box"].as_array().unwrap().iter().map(u).collect();
            let size = u(&p["size"]);
            let ops = p["jitter"].as_array().unwrap();
            let jitter = (!ops.is_empty()).then(|| {
                let mut factors = HashMap::new();
                let order: Vec<JitterOp> = ops
                    .iter()
                    .map(|o| {
                        let op = jitter_op(o[0].as_str().unwrap());
                        factors.insert(format!("{op:?}"), f(&o[1]) as f32);
                        op
                    })
                    .collect();
                JitterPlan {
                    order: order.try_into().unwrap(),
                    brightness: factors["Brightness"],
                    contrast: factors["Contrast"],
                    saturation: factors["Saturation"],
                    hue: factors["Hue"],
                }
            });
            let plan = CropPlan {
                region: Rect {
                    y: b[0],
                    x: b[1],
                    height: b[2],
                    width: b[3],
                },
                flip: p["flip"].as_bool().unwrap(),
                jitter,
                grayscale: p["gray"].as_bool().unwrap(),
                blur_sigma: p["sigma"].as_f64().map(|s| s as f32),
                solarize: p["solarize"].as_bool().unwrap(),
            };
            let mut out = vec![0f32; (3 * size * size) as usize];
            apply_crop_plan(&mut out, &mut Scratch::default(), img, &cfg, size, &plan);
            return Out::F32(out);
        }
        _ => panic!("unknown op {op}"),
    }
    Out::U8(px)
}

/// (largest absolute difference, fraction of values that differ).
fn errors(got: &Out, want: &Value) -> (f64, f64) {
    let diffs: Vec<f64> = match (got, want) {
        (Out::U8(a), Value::U8 { data, .. }) => {
            assert_eq!(a.len(), data.len());
            a.iter()
                .zip(data)
                .map(|(&x, &y)| x.abs_diff(y) as f64)
                .collect()
        }
        (Out::F32(a), Value::F32(t)) => {
            assert_eq!(a.len(), t.data.len());
            a.iter()
                .zip(&t.data)
                .map(|(&x, &y)| (x as f64 - y as f64).abs())
                .collect()
        }
        _ => panic!("output kinds differ"),
    };
    let max = diffs.iter().cloned().fold(0.0, f64::max);
    let frac = diffs.iter().filter(|&&d| d > 0.0).count() as f64 / diffs.len() as f64;
    (max, frac)
}

/// Every operation with fixed parameters against torchvision / Pillow, within each case's
/// tolerance (0 for the integer operations; see the generator for the blur's and the
/// normalisation's).
#[test]
fn every_operation_matches_torchvision_for_fixed_parameters() {
    let fx = fixture();
    let mut failures = Vec::new();
    let mut checked = 0;
    for c in cases(&fx) {
        let op = c["op"].as_str().unwrap();
        if op == "rrc_params" {
            continue;
        }
        let name = c["name"].as_str().unwrap();
        let img = image(&fx, c["input"].as_str().unwrap());
        let got = compute(&img, op, &c["params"]);
        let (max, frac) = errors(&got, &fx.tensors[&format!("out.{name}")]);
        let (tol_abs, tol_frac) = (f(&c["tol"]["max_abs"]), f(&c["tol"]["max_frac"]));
        if max > 0.0 {
            eprintln!(
                "{name}: max |diff| {max:.3e}, {:.3}% of values differ",
                100.0 * frac
            );
        }
        if max > tol_abs || frac > tol_frac {
            failures.push(format!(
                "{name}: max |diff| {max:.3e} (tol {tol_abs:e}), {:.2}% values differ (tol {:.2}%)",
                100.0 * frac,
                100.0 * tol_frac
            ));
        }
        checked += 1;
    }
    assert!(checked > 100, "only {checked} cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn hist(f: &TensorFile, name: &str) -> Vec<i64> {
    match &f.tensors[name] {
        Value::I64 { data, .. } => data.clone(),
        _ => panic!("{name} is not I64"),
    }
}

/// The chi-square value that a chi-square variable with `df` degrees of freedom exceeds with
/// probability about 1e-9 (Wilson-Hilferty, z = 6).
fn chi2_limit(df: f64) -> f64 {
    let z = 6.0;
    let t = 2.0 / (9.0 * df);
    df * (1.0 - t + z * t.sqrt()).powi(3)
}

/// Two-sample chi-square of two histograms with the same total (bins with fewer than 20
/// counts together are pooled into one): (statistic, degrees of freedom).
fn chi2_two_sample(a: &[i64], b: &[i64]) -> (f64, f64) {
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pa, mut pb) = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        if x + y < 20.0 {
            pa += x;
            pb += y;
        } else {
            stat += (x - y).powi(2) / (x + y);
            bins += 1;
        }
    }
    if pa + pb > 0.0 {
        stat += (pa - pb).powi(2) / (pa + pb);
        bins += 1;
    }
    (stat, (bins.max(2) - 1) as f64)
}

/// RandomResizedCrop's boxes (the scale and log-ratio draws, ten tries, the centre-crop
/// fallback, Python's rounding and the uniform position) against the histograms of
/// torchvision's own `get_params` over the same number of draws.
#[test]
fn random_resized_crop_boxes_follow_torchvision() {
    let fx = fixture();
    let mut report = Vec::new();
    let mut failed = false;
    for c in cases(&fx).iter().filter(|c| c["op"] == "rrc_params") {
        let name = c["name"].as_str().unwrap();
        let p = &c["params"];
        let (w, h) = (u(&p["width"]), u(&p["height"]));
        let scale = (f(&p["scale"][0]), f(&p["scale"][1]));
        let ratio = (f(&p["ratio"][0]), f(&p["ratio"][1]));
        let n = p["draws"].as_u64().unwrap() as usize;
        let mut wh = vec![0i64; ((w + 1) * (h + 1)) as usize];
        let (mut xs, mut ys) = (vec![0i64; w as usize], vec![0i64; h as usize]);
        let mut rng = keyed(19, &[stream::TEST, n as u64, w as u64, h as u64]);
        for _ in 0..n {
            let r = random_resized_crop_params(&mut rng, w, h, scale, ratio);
            wh[(r.width * (h + 1) + r.height) as usize] += 1;
            xs[r.x as usize] += 1;
            ys[r.y as usize] += 1;
        }
        for (part, ours) in [("wh", &wh), ("x", &xs), ("y", &ys)] {
            let theirs = hist(&fx, &format!("out.{name}.{part}"));
            let (stat, df) = chi2_two_sample(ours, &theirs);
            let limit = chi2_limit(df);
            report.push(format!(
                "{name}.{part}: chi2 {stat:.1}, df {df}, limit {limit:.1}"
            ));
            failed |= stat > limit;
        }
    }
    assert_eq!(report.len(), 12);
    eprintln!("{}", report.join("\n"));
    assert!(!failed, "{}", report.join("\n"));
}

/// Kolmogorov-Smirnov distance of a sample from U(lo, hi), times sqrt(n).
fn ks_uniform(mut xs: Vec<f64>, lo: f64, hi: f64) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = xs.len() as f64;
    let d = xs.iter().enumerate().fold(0.0f64, |d, (i, &x)| {
        let cdf = ((x - lo) / (hi - lo)).clamp(0.0, 1.0);
        d.max((cdf - i as f64 / n).abs())
            .max((cdf - (i + 1) as f64 / n).abs())
    });
    d * n.sqrt()
}

/// sqrt(n)·D above which a uniform sample is rejected at p ~ 1e-7 (Kolmogorov distribution).
const KS_LIMIT: f64 = 2.8;

/// One-sample chi-square of counts against expected probabilities.
fn chi2_counts(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

fn plans(kind: CropKind, n: usize, seed: u64) -> Vec<CropPlan> {
    let cfg = MultiCropConfig::default();
    let mut rng = keyed(seed, &[stream::TEST]);
    (0..n)
        .map(|_| draw_crop_plan(&mut rng, 28, 28, &cfg, kind))
        .collect()
}

/// ColorJitter's factors: brightness and contrast U(0.6, 1.4), saturation U(0.8, 1.2), hue
/// U(-0.1, 0.1), each drawn once per jittered crop; its order a uniform permutation of 4.
#[test]
fn jitter_factors_and_order_follow_torchvision() {
    let ps = plans(CropKind::Local, 60_000, 191);
    let js: Vec<&JitterPlan> = ps.iter().filter_map(|p| p.jitter.as_ref()).collect();
    let pick = |f: &dyn Fn(&JitterPlan) -> f32| js.iter().map(|j| f(j) as f64).collect();
    for (what, xs, lo, hi) in [
        ("brightness", pick(&|j| j.brightness), 0.6, 1.4),
        ("contrast", pick(&|j| j.contrast), 0.6, 1.4),
        ("saturation", pick(&|j| j.saturation), 0.8, 1.2),
        ("hue", pick(&|j| j.hue), -0.1, 0.1),
    ] {
        let ks = ks_uniform(xs, lo, hi);
        assert!(ks < KS_LIMIT, "{what}: sqrt(n) D = {ks}");
    }
    let mut orders: HashMap<String, usize> = HashMap::new();
    for j in &js {
        *orders.entry(format!("{:?}", j.order)).or_default() += 1;
    }
    assert_eq!(orders.len(), 24, "all 24 orders occur");
    let counts: Vec<usize> = orders.values().copied().collect();
    let stat = chi2_counts(&counts, &[1.0 / 24.0; 24]);
    assert!(stat < chi2_limit(23.0), "order: chi2 {stat}");
    // Which operation comes first, and which last: uniform over the four.
    for pos in [0, 3] {
        let mut c = [0usize; 4];
        for j in &js {
            c[j.order[pos] as usize] += 1;
        }
        let stat = chi2_counts(&c, &[0.25; 4]);
        assert!(stat < chi2_limit(3.0), "position {pos}: {c:?}");
    }
}

/// The blur σ ~ U(0.1, 2.0) on every crop kind that blurs.
#[test]
fn blur_sigma_is_uniform_on_its_range() {
    for (kind, seed) in [(CropKind::Global2, 192), (CropKind::Local, 193)] {
        let xs = plans(kind, 40_000, seed)
            .iter()
            .filter_map(|p| p.blur_sigma.map(|s| s as f64))
            .collect();
        let ks = ks_uniform(xs, 0.1, 2.0);
        assert!(ks < KS_LIMIT, "{kind:?}: sqrt(n) D = {ks}");
    }
}

/// The probabilities per crop: flip 0.5, jitter 0.8, grayscale 0.2 everywhere; blur as the
/// official wrapper really applies it (written 1.0 / 0.1 / 0.5, applied with 0 / 0.9 / 0.5);
/// solarize 0.2 on global crop 2 only. The events are independent: checked on the 32 joint
/// outcomes with one chi-square.
#[test]
fn crop_decisions_have_the_official_probabilities_jointly() {
    for (kind, blur_p, solar_p, seed) in [
        (CropKind::Global1, 0.0, 0.0, 194),
        (CropKind::Global2, 0.9, 0.2, 195),
        (CropKind::Local, 0.5, 0.0, 196),
    ] {
        let n = 200_000;
        let ps = plans(kind, n, seed);
        let marg = [0.5, 0.8, 0.2, blur_p, solar_p];
        let mut counts = vec![0usize; 32];
        for p in &ps {
            let bits = [
                p.flip,
                p.jitter.is_some(),
                p.grayscale,
                p.blur_sigma.is_some(),
                p.solarize,
            ];
            counts[bits
                .iter()
                .enumerate()
                .map(|(i, &b)| (b as usize) << i)
                .sum::<usize>()] += 1;
        }
        let probs: Vec<f64> = (0..32)
            .map(|k| {
                (0..5)
                    .map(|i| {
                        if k >> i & 1 == 1 {
                            marg[i]
                        } else {
                            1.0 - marg[i]
                        }
                    })
                    .product()
            })
            .collect();
        // Outcomes of probability 0 must never happen; the rest go into the chi-square.
        let (mut c, mut e) = (Vec::new(), Vec::new());
        for (k, &p) in probs.iter().enumerate() {
            if p == 0.0 {
                assert_eq!(counts[k], 0, "{kind:?}: impossible outcome {k:#07b} drawn");
            } else {
                c.push(counts[k]);
                e.push(p);
            }
        }
        let stat = chi2_counts(&c, &e);
        let limit = chi2_limit((c.len() - 1) as f64);
        assert!(stat < limit, "{kind:?}: chi2 {stat} > {limit}; {counts:?}");
    }
}
