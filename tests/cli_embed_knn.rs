//! The `embed` and `knn` commands on real images with a random micro backbone: shapes and
//! order of all three output formats, unreadable files skipped with a warning, empty folders
//! refused, k-NN on labelled folders and on the demo split.

use dinotrain::eval::backbone::arch_metadata;
use dinotrain::io::export::{export_backbone, KeyNaming};
use dinotrain::io::{TensorFile, Value};
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::{Preset, Vit};
use dinotrain::rng::{keyed, stream};
use rand::Rng as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_dinotrain");
const D: usize = 32; // Micro

/// A random micro backbone (D 32, patch 4) exported to `dir/model.safetensors`.
fn micro_model(dir: &Path) -> PathBuf {
    let cfg = Preset::Micro.config(16, 4, 0);
    let mut table = ParamTable::new();
    Vit::new(&cfg, &mut table, "backbone.");
    let mut rng = keyed(11, &[stream::TEST]);
    let params: Vec<f32> = (0..table.len())
        .map(|_| rng.random_range(-0.5f32..0.5))
        .collect();
    let path = dir.join("model.safetensors");
    export_backbone(
        &path,
        &table,
        &params,
        KeyNaming::Official,
        &arch_metadata(&cfg),
    )
    .unwrap();
    path
}

fn copy(from: &str, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(Path::new("tests/data").join(from), to).unwrap();
}

fn dinotrain(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> Output {
    let out = dinotrain(args);
    assert!(
        out.status.success(),
        "dinotrain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Five readable images (sorted order below) and one corrupt file.
fn image_folder(root: &Path) -> PathBuf {
    let data = root.join("images");
    copy("photos/astronaut.jpg", &data.join("a/astronaut.jpg"));
    copy("photos/chelsea.jpg", &data.join("a/chelsea.jpg"));
    copy("bad/text.jpg", &data.join("b/broken.jpg"));
    copy("photos/coffee.jpg", &data.join("b/coffee.jpg"));
    copy("kinds/rgb.png", &data.join("c.png"));
    copy("photos/rocket.jpg", &data.join("d,rocket.jpg"));
    data
}

const KEPT: [&str; 5] = [
    "a/astronaut.jpg",
    "a/chelsea.jpg",
    "b/coffee.jpg",
    "c.png",
    "d,rocket.jpg",
];

fn npy(path: &Path) -> (String, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8(bytes[10..10 + hlen].to_vec()).unwrap();
    let values = bytes[10 + hlen..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (header, values)
}

#[test]
fn embed_writes_every_format_in_scan_order_and_skips_a_corrupt_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path());
    let data = image_folder(tmp.path());
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();

    // safetensors with the patch mean; batch 2 so the corrupt file falls inside a batch.
    let st = out("emb.safetensors");
    let args = [
        "embed", "--model", m, "--data", d, "--out", &st, "--size", "16",
    ];
    let run = ok(&[&args[..], &["--patch-mean", "--batch", "2"]].concat());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("broken.jpg"), "{stderr}");
    assert!(stderr.contains("1 of 6 images unreadable"), "{stderr}");
    let file = TensorFile::read(Path::new(&st)).unwrap();
    let tensor = |name: &str| match &file.tensors[name] {
        Value::F32(t) => t.clone(),
        v => panic!("{name}: {}", v.dtype_name()),
    };
    let (cls, patch_mean) = (tensor("cls"), tensor("patch_mean"));
    assert_eq!(cls.shape, vec![5, D]);
    assert_eq!(patch_mean.shape, vec![5, D]);
    assert_ne!(cls.data, patch_mean.data);
    let names: Vec<String> = serde_json::from_str(&file.metadata["files"]).unwrap();
    assert_eq!(names, KEPT);
    // Final-norm tokens of different images differ.
    assert_ne!(cls.data[..D], cls.data[D..2 * D]);

    // npy without the patch mean: [5, D], equal to the safetensors rows.
    let np = out("emb.npy");
    ok(&[
        "embed", "--model", m, "--data", d, "--out", &np, "--size", "16",
    ]);
    let (header, values) = npy(Path::new(&np));
    assert!(header.contains("'shape': (5, 32)"), "{header}");
    assert!(header.contains("'<f4'"), "{header}");
    assert_eq!(values, cls.data);
    let listed = std::fs::read_to_string(format!("{np}.files.txt")).unwrap();
    assert_eq!(listed.lines().collect::<Vec<_>>(), KEPT);

    // npy with the patch mean: [5, 2D], CLS then mean per row.
    let np2 = out("both.npy");
    ok(&[
        "embed",
        "--model",
        m,
        "--data",
        d,
        "--out",
        &np2,
        "--size",
        "16",
        "--patch-mean",
    ]);
    let (header, values) = npy(Path::new(&np2));
    assert!(header.contains("'shape': (5, 64)"), "{header}");
    assert_eq!(values[2 * D..3 * D], cls.data[D..2 * D]);
    assert_eq!(values[3 * D..4 * D], patch_mean.data[D..2 * D]);

    // CSV (format by flag): header + one row per image, the comma in a name quoted.
    let csv = out("emb.txt");
    ok(&[
        "embed", "--model", m, "--data", d, "--out", &csv, "--size", "16", "--format", "csv",
    ]);
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[0].starts_with("file,cls_0,cls_1,"));
    assert_eq!(lines[0].split(',').count(), 1 + D);
    assert!(lines[5].starts_with("\"d,rocket.jpg\","), "{}", lines[5]);
    let row: Vec<f32> = lines[1]
        .split(',')
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(row, cls.data[..D]);
}

#[test]
fn embed_refuses_an_empty_folder_and_a_size_off_the_patch_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = tmp.path().join("x.safetensors");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let run = dinotrain(&[
        "embed",
        "--model",
        m,
        "--data",
        empty.to_str().unwrap(),
        "--out",
        o,
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("no image files"), "{stderr}");
    assert!(!out.exists());

    let data = image_folder(tmp.path());
    let d = data.to_str().unwrap();
    let run = dinotrain(&[
        "embed", "--model", m, "--data", d, "--out", o, "--size", "18",
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("patch size 4"), "{stderr}");
}

#[test]
fn knn_on_labelled_folders_finds_exact_copies_and_runs_on_the_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path());
    let (train, val) = (tmp.path().join("train"), tmp.path().join("val"));
    copy("photos/astronaut.jpg", &train.join("people/1.jpg"));
    copy("photos/rocket.jpg", &train.join("people/2.jpg"));
    copy("photos/chelsea.jpg", &train.join("cats/1.jpg"));
    copy("photos/coffee.jpg", &train.join("cats/2.jpg"));
    copy("photos/rocket.jpg", &val.join("people/r.jpg"));
    copy("photos/chelsea.jpg", &val.join("cats/c.jpg"));
    let m = model.to_str().unwrap();
    let run = ok(&[
        "knn",
        "--model",
        m,
        "--train",
        train.to_str().unwrap(),
        "--val",
        val.to_str().unwrap(),
        "--k",
        "1,3",
        "--size",
        "16",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    // Every val image is a copy of a training image: its nearest neighbour has its class.
    assert!(stdout.contains("k=1    top-1 100.00 %"), "{stdout}");
    assert!(stdout.contains("k=3    top-1"), "{stdout}");
    assert!(!stdout.contains("top-5"), "two classes: {stdout}");

    // A val class the training folder lacks is refused by name.
    copy("photos/coffee.jpg", &val.join("mugs/m.jpg"));
    let (t, v) = (train.to_str().unwrap(), val.to_str().unwrap());
    let run = dinotrain(&[
        "knn", "--model", m, "--train", t, "--val", v, "--size", "16",
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("class 'mugs'"), "{stderr}");

    let run = ok(&["knn", "--model", m, "--demo", "--k", "10", "--size", "16"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("10000 train and 2000 val images, 10 classes"),
        "{stdout}"
    );
    let line = stdout.lines().find(|l| l.starts_with("k=10")).unwrap();
    let top1: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    // Ten balanced classes: a random backbone's features still beat chance by far.
    assert!(top1 > 20.0 && top1 <= 100.0, "{line}");
    assert!(line.contains("top-5"), "{line}");
}

#[test]
fn export_writes_a_hugging_face_folder_byte_for_byte_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path());
    let (a, b) = (tmp.path().join("hf-a"), tmp.path().join("hf-b"));
    for out in [&a, &b] {
        let m = model.to_str().unwrap();
        ok(&[
            "export",
            "--model",
            m,
            "--out",
            out.to_str().unwrap(),
            "--keys",
            "hf-folder",
        ]);
    }
    for file in ["config.json", "model.safetensors"] {
        let bytes = std::fs::read(a.join(file)).unwrap();
        assert!(
            bytes == std::fs::read(b.join(file)).unwrap(),
            "{file} differs"
        );
    }
    // transformers' Dinov2Config of the micro model (checked against `from_pretrained` and the
    // official model by tools/check-hf-export.py).
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
    let cfg = Preset::Micro.config(16, 4, 0);
    assert_eq!(config["model_type"], "dinov2");
    assert_eq!(config["architectures"][0], "Dinov2Model");
    assert_eq!(config["hidden_size"], D);
    assert_eq!(config["num_hidden_layers"], cfg.depth);
    assert_eq!(config["num_attention_heads"], cfg.num_heads);
    assert_eq!(config["patch_size"], 4);
    assert_eq!(config["image_size"], cfg.img_size);
    assert_eq!(
        config["mlp_ratio"], 4,
        "an integer: transformers 5 refuses 4.0"
    );
    assert_eq!(config["layerscale_value"], 1e-5);
    assert_eq!(config["use_swiglu_ffn"], false);
    assert!(config.get("num_register_tokens").is_none());
    let weights = TensorFile::read(&a.join("model.safetensors")).unwrap();
    assert_eq!(weights.metadata["format"], "pt", "transformers requires it");
    for key in [
        "embeddings.cls_token",
        "embeddings.patch_embeddings.projection.weight",
        "encoder.layer.0.attention.attention.query.weight",
        "encoder.layer.0.layer_scale1.lambda1",
        "layernorm.weight",
    ] {
        assert!(weights.tensors.contains_key(key), "{key} missing");
    }
}
