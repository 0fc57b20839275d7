//! Collapse and no-learning warnings on deliberately broken runs: they reach train.log and
//! metrics.jsonl with what to change.

mod run_support;

use std::path::Path;
use std::process::Command;

fn train(out: &Path, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_dinotrain"))
        .args(["train", "--out", out.to_str().unwrap()])
        .args(run_support::SMALL)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    std::fs::read_to_string(out.join("train.log")).unwrap()
}

/// `(step, kind)` of every warning recorded in a run's metrics.jsonl.
fn recorded_warnings(out: &Path) -> Vec<(u64, String)> {
    let records = dinotrain::train::metrics::read(&out.join("metrics.jsonl")).unwrap();
    (records.iter())
        .flat_map(|r| r.warnings.iter().map(|w| (r.step, w.kind.clone())))
        .collect()
}

#[test]
fn a_teacher_temperature_of_one_is_reported_as_uniform_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hot");
    let log = train(
        &out,
        &[
            "--steps",
            "20",
            "--set",
            "teacher.teacher_temp=1.0",
            "--set",
            "teacher.warmup_teacher_temp=1.0",
        ],
    );
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("uniform teacher targets"), "{log}");
    assert!(warnings[0].contains("teacher.teacher_temp"), "{log}");
    let recorded = recorded_warnings(&out);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    // Judged after a tenth of the run, over a full window of 5 steps.
    assert_eq!(recorded[0].1, "uniform_targets");
    assert!(recorded[0].0 >= 4, "{recorded:?}");
}

#[test]
fn a_learning_rate_of_zero_is_reported_as_no_learning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("frozen");
    // k-NN on the demo split; a sharp teacher (0.04) keeps the uniform-targets check quiet.
    let log = train(
        &out,
        &[
            "--steps",
            "4",
            "--recipe",
            "official",
            "--set",
            "optim.base_lr=0",
            "--set",
            "dinotrain.knn=true",
            "--set",
            "dinotrain.knn_every=2",
            "--set",
            "teacher.teacher_temp=0.04",
        ],
    );
    let no_learning: Vec<&str> = log.lines().filter(|l| l.contains("no learning")).collect();
    assert_eq!(no_learning.len(), 1, "reported once: {log}");
    assert!(no_learning[0].contains("optim.base_lr"), "{log}");
    // LayerScale 1e-5 (the official recipe) gives every image nearly the same CLS token, and
    // lr 0 keeps it so: the features are reported as collapsed too, at the same evaluation.
    assert_eq!(
        recorded_warnings(&out),
        vec![
            (1, "collapsed_features".to_string()),
            (1, "no_learning".to_string())
        ]
    );
    let records = dinotrain::train::metrics::read(&out.join("metrics.jsonl")).unwrap();
    let evaluated = &records[1].extra;
    assert!(evaluated["knn_top1"] > 0.0, "{evaluated:?}");
    assert!(evaluated["cls_effective_dims"] >= 1.0, "{evaluated:?}");
    // The record holds the evaluation the log reports.
    let logged = format!("step 2: k-NN top-1 (k=20) {:.2}%", evaluated["knn_top1"]);
    assert!(log.contains(&logged), "{logged} not in {log}");
}
