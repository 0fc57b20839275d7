//! Checks beyond the golden outputs: the fixtures' metadata (fused groups, mask index lists) and
//! the losses at shapes the fixtures do not cover, against literal f64 references.

mod kernel_support;

use dinotrain::backend::cpu::sinkhorn::sinkhorn_knopp;
use dinotrain::backend::cpu::CpuBackend;
use dinotrain::golden::{rel_err, Fixture};
use dinotrain::io::Value;
use dinotrain::optim::{LayerDecay, ParamGroups};
use dinotrain::ssl::dino_loss::dino_terms;
use dinotrain::ssl::{
    dino_loss_forward_backward, Centering, DinoPairs, DinoStudent, MaskBatch, TargetState,
};
use kernel_support::reference::sinkhorn_knopp_reference;
use std::path::Path;

fn fixture(name: &str) -> Fixture {
    Fixture::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name),
    )
    .unwrap()
}

#[test]
fn fused_groups_equal_the_fixture_metadata() {
    for name in [
        "param_groups-s0.safetensors",
        "param_groups-reg4-s1.safetensors",
    ] {
        let fx = fixture(name);
        let names: Vec<String> =
            serde_json::from_value(fx.meta_json("param_names").unwrap()).unwrap();
        let decay = LayerDecay {
            depth: fx.param_usize("depth").unwrap(),
            layerwise_decay: fx.param_f64("layerwise_decay").unwrap(),
            patch_embed_lr_mult: fx.param_f64("patch_embed_lr_mult").unwrap(),
        };
        let groups = ParamGroups::from_names(&names, &decay).unwrap();
        let want = fx.meta_json("fused_groups").unwrap();
        let want = want.as_array().unwrap();
        assert_eq!(groups.groups.len(), want.len(), "{name}");
        for (g, w) in groups.groups.iter().zip(want) {
            assert_eq!(g.submodule, w["submodule"].as_str().unwrap());
            assert!(
                (g.settings.lr_multiplier - w["lr_multiplier"].as_f64().unwrap()).abs() < 1e-12
            );
            assert_eq!(
                g.settings.wd_multiplier,
                w["wd_multiplier"].as_f64().unwrap()
            );
            assert_eq!(
                g.settings.is_last_layer,
                w["is_last_layer"].as_bool().unwrap()
            );
            let params: Vec<String> = serde_json::from_value(w["params"].clone()).unwrap();
            assert_eq!(g.params, params, "{name}");
        }
    }
}

#[test]
fn mask_index_list_and_weights_rebuild_from_the_fixture_masks() {
    for name in [
        "ibot_loss-centering-s0.safetensors",
        "ibot_loss-centering-s1.safetensors",
        "ibot_loss-sinkhorn-s0.safetensors",
        "ibot_loss-sinkhorn-s1.safetensors",
    ] {
        let fx = fixture(name);
        let (shape, masks) = fx.input_u8("masks").unwrap();
        let b = MaskBatch::from_masks(
            masks.iter().map(|&m| m == 1).collect(),
            shape[0],
            shape[1],
            0,
        )
        .unwrap();
        let (_, idx) = fx.input_i64("mask_indices_list").unwrap();
        let idx: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
        assert_eq!(b.mask_indices, idx, "{name}");
        assert_eq!(
            b.masks_weight,
            fx.input("masks_weight").unwrap().data,
            "{name}"
        );
        match fx.file.tensors.get("in.n_masked_patches") {
            Some(Value::I64 { data, .. }) => assert_eq!(data[0] as usize, b.n_masked()),
            _ => panic!("n_masked_patches missing"),
        }
    }
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    dinotrain::rng::uniform_vec(seed, n, scale)
}

/// Literal DINO loss in f64: every (student crop, teacher crop) pair, mean over images.
fn dino_reference(
    sg: &[f64],
    sl: &[f64],
    p: &[f32],
    b: usize,
    nl: usize,
    k: usize,
    ts: f64,
) -> (f64, f64) {
    let ce = |s: &[f64], p: &[f32]| -> f64 {
        let x: Vec<f64> = s.iter().map(|v| v / ts).collect();
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        -x.iter()
            .zip(p)
            .map(|(xv, &pv)| pv as f64 * (xv - lse))
            .sum::<f64>()
    };
    let row = |buf: &[f64], r: usize| buf[r * k..(r + 1) * k].to_vec();
    let prow = |r: usize| &p[r * k..(r + 1) * k];
    let dn = (2 + (2 * nl).max(1)) as f64;
    let mut global = 0.0;
    for i in 0..b {
        global += ce(&row(sg, i), prow(b + i)) / b as f64; // S_A vs P_B
        global += ce(&row(sg, b + i), prow(i)) / b as f64; // S_B vs P_A
    }
    let mut local = 0.0;
    for l in 0..nl {
        for i in 0..b {
            local += ce(&row(sl, l * b + i), prow(i)) / b as f64;
            local += ce(&row(sl, l * b + i), prow(b + i)) / b as f64;
        }
    }
    (local / dn, global / dn)
}

#[test]
fn dino_loss_matches_the_literal_pairing_at_other_shapes() {
    for &(b, nl, k, sk) in &[
        (4usize, 0usize, 30usize, false),
        (3, 3, 50, true),
        (1, 1, 20, false),
    ] {
        let sg = random(2 * b * k, 1 + b as u64, 2.0);
        let sl = random(nl * b * k, 2 + nl as u64, 2.0);
        let tg = random(2 * b * k, 3, 2.0);
        let host = if sk {
            Centering::sinkhorn_knopp()
        } else {
            Centering::softmax(k)
        };
        let mut be = CpuBackend::default();
        let mut cent = TargetState::new(&mut be, &host).unwrap();
        let mut p = vec![0f32; 2 * b * k];
        cent.teacher_probs(&mut be, &mut p, &tg, (2 * b, k), 0.05)
            .unwrap();
        let (w, ts) = (0.7f32, 0.1f32);
        let mut dg = vec![0f32; 2 * b * k];
        let mut dl = vec![0f32; nl * b * k];
        let mut terms = [0f32; 2];
        let student = DinoStudent::<CpuBackend> {
            global: &sg,
            local: &sl,
            d_global: &mut dg,
            d_local: &mut dl,
        };
        let mut pairs = DinoPairs::default();
        dino_loss_forward_backward(
            &mut be,
            &mut pairs,
            &mut terms,
            student,
            &p,
            (b, nl, k),
            ts,
            w,
        )
        .unwrap();
        let t = dino_terms(&terms, w);
        let sg64: Vec<f64> = sg.iter().map(|&v| v as f64).collect();
        let sl64: Vec<f64> = sl.iter().map(|&v| v as f64).collect();
        let (rl, rg) = dino_reference(&sg64, &sl64, &p, b, nl, k, ts as f64);
        assert!(
            (t.local as f64 - rl).abs() < 1e-5 * rl.abs().max(1.0),
            "B {b} nl {nl}"
        );
        assert!(
            (t.global as f64 - rg).abs() < 1e-5 * rg.abs().max(1.0),
            "B {b} nl {nl}"
        );
        assert!((t.total as f64 - w as f64 * (rl + rg)).abs() < 1e-5);
        // Gradients by central differences on a few entries of each input.
        let h = 1e-4;
        for idx in (0..2 * b * k).step_by(7) {
            let (mut a, mut c) = (sg64.clone(), sg64.clone());
            a[idx] += h;
            c[idx] -= h;
            let (la, ga) = dino_reference(&a, &sl64, &p, b, nl, k, ts as f64);
            let (lc, gc) = dino_reference(&c, &sl64, &p, b, nl, k, ts as f64);
            let fd = w as f64 * ((la + ga) - (lc + gc)) / (2.0 * h);
            assert!(
                (dg[idx] as f64 - fd).abs() < 1e-4 * fd.abs().max(1e-2),
                "global {idx}: {} {fd}",
                dg[idx]
            );
        }
        for idx in (0..nl * b * k).step_by(5) {
            let (mut a, mut c) = (sl64.clone(), sl64.clone());
            a[idx] += h;
            c[idx] -= h;
            let (la, ga) = dino_reference(&sg64, &a, &p, b, nl, k, ts as f64);
            let (lc, gc) = dino_reference(&sg64, &c, &p, b, nl, k, ts as f64);
            let fd = w as f64 * ((la + ga) - (lc + gc)) / (2.0 * h);
            assert!(
                (dl[idx] as f64 - fd).abs() < 1e-4 * fd.abs().max(1e-2),
                "local {idx}: {} {fd}",
                dl[idx]
            );
        }
    }
}

#[test]
fn sinkhorn_at_65536_prototypes_matches_the_literal_algorithm() {
    let (r, k) = (16, 65536);
    // Head logits are cosines times weight_g: |t| <= ~1, at tt 0.04 -> |t/tt| <= 25.
    let t = random(r * k, 42, 1.0);
    let mut got = vec![0f32; r * k];
    sinkhorn_knopp(&mut got, &t, r, k, 0.04, 3).unwrap();
    let want = sinkhorn_knopp_reference(&t, r, k, 0.04, 3);
    let err = rel_err(&got, &want);
    assert!(err < 1e-5, "relative error {err}");
}
