//! Shared by the tests that train with k-NN on labelled folders (on the CPU and on the emulated
//! CUDA device): tiny labelled folders, and the check that the k-NN a run reports is the one
//! `dinotrain knn` computes from the run's exported teacher on the same device.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Output;

/// Copies `tests/data/kinds/<from>` to `dir/<to>` for each pair.
pub fn small_images(dir: &Path, files: &[(&str, &str)]) {
    let kinds = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kinds");
    for (from, to) in files {
        let dest = dir.join(to);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(kinds.join(from), dest).unwrap();
    }
}

/// `root/knn_train` (two classes of three small images) and `root/knn_val` (three images).
pub fn labelled_folders(root: &Path) -> (PathBuf, PathBuf) {
    let (train, val) = (root.join("knn_train"), root.join("knn_val"));
    small_images(
        &train,
        &[
            ("rgb.png", "colour/1.png"),
            ("palette.png", "colour/2.png"),
            ("baseline.jpg", "colour/3.jpg"),
            ("gray.jpg", "grey/1.jpg"),
            ("image.pgm", "grey/2.pgm"),
            ("gray-alpha.png", "grey/3.png"),
        ],
    );
    small_images(
        &val,
        &[
            ("rgba.png", "colour/1.png"),
            ("image.ppm", "colour/2.ppm"),
            ("gray16.png", "grey/1.png"),
        ],
    );
    (train, val)
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Trains 2 steps of `model_args` on `device` with k-NN on tiny labelled folders after every
/// step; `run` executes one `dinotrain` call. Checks the k-NN lines of the log (at
/// initialisation, after step 1, at the end), `knn.json`, and that its trained top-1 is what
/// `dinotrain knn --device <device>` reports for the run folder. Returns the run's log.
pub fn check_training_knn(
    tmp: &Path,
    device: &str,
    model_args: &[&str],
    run: &dyn Fn(&[String]) -> Output,
) -> String {
    let (train, val) = labelled_folders(tmp);
    let out = tmp.join("run");
    let s = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = ["train", "--out", &s(&out), "--steps", "2"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(model_args.iter().map(|a| a.to_string()));
    for set in [
        // LayerScale at its official 1e-5 mutes every block of an untrained model: all CLS
        // features then agree to ~1e-9 (cosine 1.0) and the k-NN is a tie broken by rounding,
        // which two correct computations (the run's device teacher, the exported backbone in
        // another buffer layout) may break differently. At 1.0 the features differ by image.
        "student.layerscale=1.0".to_string(),
        "dinotrain.knn=true".to_string(),
        "dinotrain.knn_every=1".to_string(),
        format!("dinotrain.knn_train={}", s(&train)),
        format!("dinotrain.knn_val={}", s(&val)),
    ] {
        args.extend(["--set".to_string(), set]);
    }
    args.extend(["--device".to_string(), device.to_string()]);
    let output = run(&args);
    assert!(output.status.success(), "{}", text(&output));
    let log = std::fs::read_to_string(out.join("train.log")).unwrap();
    assert!(log.contains("k-NN top-1 (k=20) at initialisation"), "{log}");
    assert!(log.contains("step 1: k-NN top-1 (k=20)"), "{log}");
    assert!(log.contains("trained teacher"), "{log}");
    let knn: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("knn.json")).unwrap()).unwrap();
    assert_eq!(
        (knn["n_train"].as_u64(), knn["n_test"].as_u64()),
        (Some(6), Some(3)),
        "{knn}"
    );
    let trained = knn["trained_top1"].as_f64().unwrap();
    for key in ["initial_top1", "trained_top1"] {
        let v = knn[key].as_f64().unwrap();
        // Three test images: a multiple of 33.3 %.
        assert!(
            (0.0..=100.0).contains(&v)
                && (v * 3.0 / 100.0 - (v * 3.0 / 100.0).round()).abs() < 1e-9,
            "{key}: {knn}"
        );
    }
    // k = 20 is cut to the 6 training images; the construction size is the global crop size.
    let cli = run(&[
        "knn".into(),
        "--model".into(),
        s(&out),
        "--train".into(),
        s(&train),
        "--val".into(),
        s(&val),
        "--k".into(),
        "6".into(),
        "--device".into(),
        device.into(),
        "--probe".into(),
    ]);
    assert!(cli.status.success(), "{}", text(&cli));
    let stdout = String::from_utf8_lossy(&cli.stdout);
    let top1: f64 = stdout
        .lines()
        .find(|l| l.starts_with("k=6 "))
        .and_then(|l| l.split("top-1").nth(1))
        .and_then(|r| r.trim().trim_end_matches('%').trim().parse().ok())
        .unwrap_or_else(|| panic!("no k=6 top-1 line:\n{}", text(&cli)));
    assert!(
        (top1 - trained).abs() < 0.006,
        "the run reports {trained} %, `dinotrain knn` {top1} %"
    );
    // The linear probe on the same features: the run's final report and `knn --probe` agree.
    let probe: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("linear probe top-1"))
        .and_then(|r| r.split('%').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no linear probe line:\n{}", text(&cli)));
    let run_probe = knn["probe_top1"].as_f64().unwrap();
    assert!(
        (probe - run_probe).abs() < 0.006,
        "the run's probe {run_probe} %, `dinotrain knn --probe` {probe} %"
    );
    assert!(log.contains("linear probe top-1: trained teacher"), "{log}");
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("embedding on"), "{stderr}");
    log
}
