//! The `train` command end to end: a killed run resumed from its checkpoint reproduces the
//! uninterrupted run's losses bit for bit; a folder of real images trains, and its exported
//! teacher feeds `embed`, `knn` and `export`; a non-empty output folder is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

fn dinotrain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dinotrain"))
}

/// A small model on the demo images: fast enough for a test, every loss term on.
const SMALL: &[&str] = &[
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

fn run(args: &[&str]) -> std::process::Output {
    let out = dinotrain().args(args).args(SMALL).output().unwrap();
    assert!(
        out.status.success(),
        "dinotrain {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `(step, total loss bits)` of every record in a run's metrics.jsonl.
fn losses(dir: &Path) -> Vec<(u64, u64)> {
    let records = dinotrain::train::metrics::read(&dir.join("metrics.jsonl")).unwrap();
    records
        .iter()
        .map(|r| (r.step, r.losses["total"].to_bits()))
        .collect()
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_losses_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let parts = tmp.path().join("parts");
    let (whole_s, parts_s) = (whole.to_str().unwrap(), parts.to_str().unwrap());
    let common = ["--set", "dinotrain.checkpoint_every=3"];
    run(&[&["train", "--out", whole_s, "--steps", "6"], &common[..]].concat());
    // The same run killed after 4 steps (its last checkpoint is from step 3), then resumed:
    // step 4 runs again from the checkpoint and must come out identical.
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
    // The exported teachers are identical too.
    let read = |dir: &Path| {
        dinotrain::io::TensorFile::read(&dir.join("teacher_backbone.safetensors"))
            .unwrap()
            .tensors
    };
    let (a, b) = (read(&whole), read(&parts));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(b[name] == *t, "exported {name} differs after resume");
    }
}

#[test]
fn a_non_empty_output_folder_needs_resume_or_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let out = dinotrain()
        .args([
            "train",
            "--out",
            tmp.path().to_str().unwrap(),
            "--steps",
            "1",
        ])
        .args(SMALL)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("notes.txt")).unwrap(),
        "mine"
    );
}

fn photos() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/photos")
}

#[test]
fn a_folder_of_real_images_trains_then_embeds_knn_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let run_s = run_dir.to_str().unwrap();
    let data = photos();
    run(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run_s,
        "--steps",
        "2",
        "--set",
        "student.patch_size=8",
        "--set",
        "crops.global_crops_size=32",
        "--set",
        "crops.local_crops_size=16",
        // LayerScale 1 so that two steps leave distinct features for distinct images.
        "--set",
        "student.layerscale=1.0",
    ]);
    for f in [
        "config.yaml",
        "train.log",
        "metrics.jsonl",
        "teacher_backbone.safetensors",
    ] {
        assert!(run_dir.join(f).exists(), "{f} missing");
    }
    let emb = tmp.path().join("emb.safetensors");
    let out = dinotrain()
        .args(["embed", "--model", run_s, "--data", data.to_str().unwrap()])
        .args(["--out", emb.to_str().unwrap(), "--size", "32"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dinotrain::io::TensorFile::read(&emb).unwrap();
    let n_photos = std::fs::read_dir(&data).unwrap().count();
    assert_eq!(file.tensors["cls"].shape(), &[n_photos, 32]);

    // Labelled folders: two classes made of the photos.
    let (train, val) = (tmp.path().join("train"), tmp.path().join("val"));
    for (i, entry) in std::fs::read_dir(&data).unwrap().enumerate() {
        let p = entry.unwrap().path();
        let class = if i % 2 == 0 { "a" } else { "b" };
        for root in [&train, &val] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            std::fs::copy(&p, root.join(class).join(p.file_name().unwrap())).unwrap();
        }
    }
    let out = dinotrain()
        .args(["knn", "--model", run_s, "--k", "1", "--size", "32"])
        .args([
            "--train",
            train.to_str().unwrap(),
            "--val",
            val.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Validation images are copies of training images: their nearest neighbour is themselves.
    assert!(String::from_utf8_lossy(&out.stdout).contains("100.00"));

    let hf = tmp.path().join("hf.safetensors");
    let out = dinotrain()
        .args([
            "export",
            "--model",
            run_s,
            "--out",
            hf.to_str().unwrap(),
            "--keys",
            "hf",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dinotrain::io::TensorFile::read(&hf).unwrap();
    assert!(file.tensors.contains_key("embeddings.cls_token"));
}
