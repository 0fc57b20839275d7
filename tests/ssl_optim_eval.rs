//! Optimizer state resume, per-submodule clipping, and k-NN across several test chunks.

use dinotrain::backend::cpu::CpuBackend;
use dinotrain::eval::{knn::TEST_CHUNK, knn_classify};
use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::optim::AdamHyper;
use dinotrain::optim::{AdamW, AdamWState, GradClipper, LayerDecay, ParamGroups, SubmoduleSpan};

fn random(n: usize, seed: u64) -> Vec<f32> {
    dinotrain::rng::uniform_vec(seed, n, 1.0)
}

fn table() -> ParamTable {
    let mut t = ParamTable::new();
    t.push("backbone.cls_token", &[1, 1, 4], Init::Zeros);
    t.push("backbone.blocks.0.attn.qkv.weight", &[12, 4], Init::Zeros);
    t.push("backbone.norm.bias", &[4], Init::Zeros);
    t.push("dino_head.mlp.0.weight", &[6, 4], Init::Zeros);
    t.push("dino_head.last_layer.weight_g", &[3, 1], Init::Zeros);
    t.push("ibot_head.mlp.0.bias", &[6], Init::Zeros);
    t
}

#[test]
fn adamw_resume_from_exported_state_is_bit_exact() {
    let t = table();
    let groups = ParamGroups::from_table(&t, &LayerDecay::official(1)).unwrap();
    let grads: Vec<Vec<f32>> = (0..5).map(|s| random(t.len(), 10 + s)).collect();
    let lr = |s: usize| 1e-3 * (s + 1) as f64;
    let mut be = CpuBackend::default();
    let zeros = AdamWState::zeros(t.len());
    let hyper = AdamHyper::default();
    let mut straight = AdamW::new(&mut be, &t, &groups, hyper, &zeros).unwrap();
    let mut p1 = random(t.len(), 1);
    let mut p2 = p1.clone();
    for (s, g) in grads.iter().enumerate() {
        let lrs = (lr(s), if s < 2 { 0.0 } else { lr(s) }, 0.04);
        straight.step(&mut be, &mut p1, g, lrs).unwrap();
    }
    let mut first = AdamW::new(&mut be, &t, &groups, hyper, &zeros).unwrap();
    for (s, g) in grads.iter().enumerate().take(3) {
        let lrs = (lr(s), if s < 2 { 0.0 } else { lr(s) }, 0.04);
        first.step(&mut be, &mut p2, g, lrs).unwrap();
    }
    let saved = first.state(&mut be).unwrap().export(&t);
    assert_eq!(saved["step"].data, vec![3.0]);
    let mut resumed = AdamW::new(&mut be, &t, &groups, hyper, &zeros).unwrap();
    resumed
        .restore(
            &mut be,
            &AdamWState::import(&t, &saved, "checkpoint").unwrap(),
        )
        .unwrap();
    for (s, g) in grads.iter().enumerate().skip(3) {
        resumed
            .step(&mut be, &mut p2, g, (lr(s), lr(s), 0.04))
            .unwrap();
    }
    assert_eq!(p1, p2);
    assert_eq!(
        straight.state(&mut be).unwrap(),
        resumed.state(&mut be).unwrap()
    );
    let mut broken = saved.clone();
    broken.remove("exp_avg.backbone.norm.bias");
    assert!(AdamWState::import(&t, &broken, "checkpoint").is_err());
}

#[test]
fn clipping_is_per_submodule_and_reports_norms_before() {
    let t = table();
    let spans = SubmoduleSpan::from_table(&t);
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["backbone", "dino_head", "ibot_head"]);
    let mut g = vec![0f32; t.len()];
    // Backbone norm 10 (clipped to 3), dino_head norm 2 (untouched), ibot_head norm 5 (clipped).
    let bb = spans[0].ranges[0].clone();
    g[bb.start] = 6.0;
    g[bb.start + 1] = 8.0;
    g[spans[1].ranges[0].start] = 2.0;
    g[spans[2].ranges[0].start] = 3.0;
    g[spans[2].ranges[0].start + 1] = 4.0;
    let before = g.clone();
    let mut be = CpuBackend::default();
    let mut clipper = GradClipper::new(&mut be, &spans).unwrap();
    clipper.clip(&mut be, &mut g, 3.0).unwrap();
    assert_eq!(clipper.norms(), [10.0, 2.0, 5.0]);
    let coef = (3.0 / (10.0 + 1e-6)) as f32;
    assert!((g[bb.start] - 6.0 * coef).abs() < 1e-6);
    assert_eq!(
        g[spans[1].ranges[0].clone()],
        before[spans[1].ranges[0].clone()]
    );
    let ib = spans[2].ranges[0].start;
    assert!((g[ib + 1] - 4.0 * (3.0 / (5.0 + 1e-6)) as f32).abs() < 1e-6);
    assert!(clipper.clip(&mut be, &mut g, 0.0).is_err());
}

#[test]
fn knn_over_several_test_chunks_matches_brute_force() {
    let (n_train, n_test, dim) = (300, TEST_CHUNK + 77, 8);
    let train = random(n_train * dim, 1);
    let test = random(n_test * dim, 2);
    let labels: Vec<usize> = (0..n_train).map(|i| (i * 7) % 6).collect();
    let r = knn_classify(&train, &labels, &test, dim, &[20, 1, 5], 0.07).unwrap();
    assert_eq!(r.num_classes, 6);
    let norm = |v: &[f32]| -> Vec<f64> {
        let n = v
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        v.iter().map(|&x| x as f64 / n).collect()
    };
    let tn: Vec<Vec<f64>> = train.chunks(dim).map(norm).collect();
    for (q, row) in test.chunks(dim).enumerate() {
        let x = norm(row);
        let mut sims: Vec<(f64, usize)> = tn
            .iter()
            .enumerate()
            .map(|(j, t)| (t.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>(), j))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (j, s) in sims.iter().take(20).enumerate() {
            assert!(
                (r.topk_sims[q * 20 + j] as f64 - s.0).abs() < 1e-5,
                "test {q} rank {j}"
            );
        }
        // Labels agree wherever consecutive similarities are not (near-)tied.
        if (sims[0].0 - sims[1].0).abs() > 1e-5 {
            assert_eq!(r.topk_labels[q * 20], labels[sims[0].1]);
        }
        let w: Vec<f64> = {
            let e: Vec<f64> = sims[..20]
                .iter()
                .map(|s| ((s.0 - sims[0].0) / 0.07).exp())
                .collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        let k5 = r.per_k.iter().find(|p| p.k == 5).unwrap();
        let mut want = [0f64; 6];
        for j in 0..5 {
            want[labels[sims[j].1]] += w[j];
        }
        for (c, wc) in want.iter().enumerate() {
            assert!(
                (k5.probas[q * 6 + c] as f64 - wc).abs() < 1e-4,
                "test {q} class {c}"
            );
        }
    }
}
