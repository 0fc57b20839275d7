//! The `train` command end to end: a killed run resumed from its checkpoint reproduces the
//! uninterrupted run's losses bit for bit; a folder of real images trains, and its exported
//! teacher feeds `embed`, `knn` and `export`; a non-empty output folder is refused.

mod run_support;

use run_support::{check_resume_reproduces_the_run, SMALL};
use std::path::{Path, PathBuf};
use std::process::Command;

fn dinotrain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dinotrain"))
}

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

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_losses_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    check_resume_reproduces_the_run(tmp.path(), &|args| {
        run(args);
    });
}

#[test]
fn an_accumulating_run_resumes_bit_for_bit_and_scales_the_lr_by_its_total_batch() {
    let tmp = tempfile::tempdir().unwrap();
    check_resume_reproduces_the_run(tmp.path(), &|args| {
        run(&[args, &["--accumulate", "2"]].concat());
    });
    // Two micro-batches of 8: the official scaling rule sees a batch of 16.
    let config = std::fs::read_to_string(tmp.path().join("whole/config.yaml")).unwrap();
    assert!(config.contains("sqrt(16 / 1024)"), "{config}");
    assert!(config.contains("accumulate: 2"), "{config}");
    let log = std::fs::read_to_string(tmp.path().join("whole/train.log")).unwrap();
    assert!(log.contains("batch 16 (2 micro-batches of 8)"), "{log}");
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
