//! Shared by the tests that drive `dinotrain train` end to end: a small configuration on the
//! demo images and the loss record of a run folder.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

/// A small model on the demo images: fast enough for a test, every loss term on.
pub const SMALL: &[&str] = &[
    "--set",
    "dinotrain.embed_dim=32",
    "--set",
    "dinotrain.depth=2",
    "--set",
    "dinotrain.num_heads=2",
    "--set",
    "dino.head_n_prototypes=64",
    "--set",
    "ibot.head_n_prototypes=64",
    "--set",
    "dino.head_hidden_dim=32",
    "--set",
    "dino.head_bottleneck_dim=16",
    "--set",
    "crops.local_crops_number=2",
    "--set",
    "student.drop_path_rate=0.1",
    "--set",
    "dinotrain.knn=false",
    "--batch-size",
    "8",
];

/// `(step, total loss bits)` of every record in a run's metrics.jsonl.
pub fn losses(dir: &Path) -> Vec<(u64, u64)> {
    let records = dinotrain::train::metrics::read(&dir.join("metrics.jsonl")).unwrap();
    records
        .iter()
        .map(|r| (r.step, r.losses["total"].to_bits()))
        .collect()
}

/// The exported teacher's tensors.
pub fn exported_teacher(dir: &Path) -> std::collections::BTreeMap<String, dinotrain::io::Value> {
    dinotrain::io::TensorFile::read(&dir.join("teacher_backbone.safetensors"))
        .unwrap()
        .tensors
}

/// Trains 6 steps in one go and, in a second folder, 4 steps (a run killed after step 4,
/// its last checkpoint from step 3) then resumed to 6; `run` executes one `dinotrain` call
/// with the extra arguments. Asserts that the resumed run reproduces the uninterrupted one bit
/// for bit: every loss and the exported teacher.
pub fn check_resume_reproduces_the_run(tmp: &Path, run: &dyn Fn(&[&str])) {
    let whole = tmp.join("whole");
    let parts = tmp.join("parts");
    let (whole_s, parts_s) = (whole.to_str().unwrap(), parts.to_str().unwrap());
    let common = ["--set", "dinotrain.checkpoint_every=3"];
    run(&[&["train", "--out", whole_s, "--steps", "6"], &common[..]].concat());
    run(&[
        &["train", "--out", parts_s, "--steps", "6"],
        &common[..],
        &["--set", "dinotrain.stop_after=4"],
    ]
    .concat());
    assert_eq!(losses(&parts).len(), 4);
    assert!(!parts.join("teacher_backbone.safetensors").exists());
    run(&[
        &["train", "--out", parts_s, "--steps", "6", "--resume"],
        &common[..],
    ]
    .concat());
    let want = losses(&whole);
    assert_eq!(want.len(), 6);
    assert_eq!(losses(&parts), want);
    let (a, b) = (exported_teacher(&whole), exported_teacher(&parts));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(b[name] == *t, "exported {name} differs after resume");
    }
}
