//! Checkpoints: bit-exact round trips, retention, and refusal of torn, foreign, damaged or
//! mismatched files; the run-folder policy.

use dinotrain::nn::params::{Init, ParamTable};
use dinotrain::train::checkpoint::{
    self, Checkpoint, CheckpointRef, ConfigCheck, RunPosition, FORMAT_TAG,
};
use dinotrain::train::outdir::{OutdirMode, RunDir};
use dinotrain::{Error, Tensor};
use rand::Rng as _;
use std::collections::BTreeMap;
use std::path::Path;

fn table() -> ParamTable {
    let mut t = ParamTable::new();
    t.push("backbone.cls_token", &[1, 1, 8], Init::Zeros);
    t.push("backbone.blocks.0.attn.qkv.weight", &[24, 8], Init::Zeros);
    t.push("dino_head.last_layer.weight_g", &[16, 1], Init::Zeros);
    t
}

struct State {
    student: Vec<f32>,
    teacher: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    center: Tensor,
    config: BTreeMap<String, String>,
    extra: BTreeMap<String, String>,
}

fn state(n: usize, seed: u64) -> State {
    let mut rng = dinotrain::rng::keyed(seed, &[]);
    let mut draw = || -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        // Values that a lossy path would change: signed zero, subnormal, extremes, a NaN payload.
        v[0] = -0.0;
        v[1] = f32::from_bits(1);
        v[2] = f32::MAX;
        v[3] = f32::from_bits(0x7fc0_1234);
        v
    };
    State {
        student: draw(),
        teacher: draw(),
        exp_avg: draw(),
        exp_avg_sq: draw(),
        center: Tensor::from_vec(&[1, 4], vec![0.5, -1.25, 3.0, 1e-30]).unwrap(),
        config: [("optim.base_lr", "0.004"), ("train.seed", "7")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        extra: [("version".to_string(), "0.1.0".to_string())].into(),
    }
}

fn save(dir: &Path, t: &ParamTable, s: &State, step: u64) -> std::path::PathBuf {
    let buffers = [("dino_center", &s.center)];
    checkpoint::save(
        dir,
        &CheckpointRef {
            params: t,
            student: &s.student,
            teacher: &s.teacher,
            exp_avg: &s.exp_avg,
            exp_avg_sq: &s.exp_avg_sq,
            adam_step: step + 3,
            buffers: &buffers,
            position: RunPosition {
                step,
                epoch: 2,
                seed: 7,
                images_in_epoch: 640,
            },
            config: &s.config,
            extra: &s.extra,
        },
    )
    .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn load(path: &Path, t: &ParamTable, s: &State) -> dinotrain::Result<Checkpoint> {
    checkpoint::load(path, t, &s.config, ConfigCheck::Strict)
}

#[test]
fn round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let t = table();
    let s = state(t.len(), 1);
    let path = save(dir.path(), &t, &s, 120);
    assert_eq!(path.file_name().unwrap(), "step_00000120.safetensors");
    let c = load(&path, &t, &s).unwrap();
    assert_eq!(bits(&c.student), bits(&s.student));
    assert_eq!(bits(&c.teacher), bits(&s.teacher));
    assert_eq!(bits(&c.exp_avg), bits(&s.exp_avg));
    assert_eq!(bits(&c.exp_avg_sq), bits(&s.exp_avg_sq));
    assert_eq!(c.adam_step, 123);
    assert_eq!(bits(&c.buffers["dino_center"].data), bits(&s.center.data));
    assert_eq!(c.buffers["dino_center"].shape, [1, 4]);
    assert_eq!(
        c.position,
        RunPosition {
            step: 120,
            epoch: 2,
            seed: 7,
            images_in_epoch: 640
        }
    );
    assert_eq!(c.config, s.config);
    assert_eq!(c.extra, s.extra);
    // Official keys inside: the file is readable as named tensors.
    let file = dinotrain::io::TensorFile::read(&path).unwrap();
    assert!(file
        .tensors
        .contains_key("teacher.backbone.blocks.0.attn.qkv.weight"));
    assert!(file
        .tensors
        .contains_key("exp_avg_sq.dino_head.last_layer.weight_g"));
    assert_eq!(file.metadata["format"], FORMAT_TAG);
}

#[test]
fn latest_and_prune_keep_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let t = table();
    let s = state(t.len(), 2);
    assert_eq!(checkpoint::latest(dir.path()).unwrap(), None);
    for step in [5, 100, 20, 1000] {
        save(dir.path(), &t, &s, step);
    }
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let latest = checkpoint::latest(dir.path()).unwrap().unwrap();
    assert!(latest.ends_with("step_00001000.safetensors"));
    let removed = checkpoint::prune(dir.path(), 2).unwrap();
    assert_eq!(removed.len(), 2);
    let left: Vec<u64> = checkpoint::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left, [100, 1000]);
    assert!(dir.path().join("notes.txt").exists());
}

#[test]
fn torn_truncated_damaged_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = table();
    let s = state(t.len(), 3);
    let path = save(dir.path(), &t, &s, 10);
    let bytes = std::fs::read(&path).unwrap();

    let torn = dir.path().join("torn.safetensors");
    for cut in [0, 5, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&torn, &bytes[..cut]).unwrap();
        let err = load(&torn, &t, &s).unwrap_err();
        assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("torn or truncated") && msg.contains("torn.safetensors"),
            "{msg}"
        );
    }

    let damaged = dir.path().join("damaged.safetensors");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    std::fs::write(&damaged, &flipped).unwrap();
    let msg = load(&damaged, &t, &s).unwrap_err().to_string();
    assert!(msg.contains("checksum mismatch"), "{msg}");

    // A safetensors file from elsewhere (for example a model export) is not a checkpoint.
    let foreign = dir.path().join("export.safetensors");
    let mut f = dinotrain::io::TensorFile::default();
    f.insert("cls_token", Tensor::zeros(&[1, 1, 8]));
    f.write(&foreign).unwrap();
    let msg = load(&foreign, &t, &s).unwrap_err().to_string();
    assert!(msg.contains("not a dinotrain checkpoint"), "{msg}");
    std::fs::write(&foreign, b"PK\x03\x04 a zip file").unwrap();
    assert!(matches!(
        load(&foreign, &t, &s).unwrap_err(),
        Error::Checkpoint { .. }
    ));
}

#[test]
fn another_model_is_refused_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let t = table();
    let s = state(t.len(), 4);
    let path = save(dir.path(), &t, &s, 10);
    let mut bigger = ParamTable::new();
    bigger.push("backbone.cls_token", &[1, 1, 16], Init::Zeros);
    let msg = load(&path, &bigger, &s).unwrap_err().to_string();
    assert!(
        msg.contains("student.backbone.cls_token") && msg.contains("[1, 1, 16]"),
        "{msg}"
    );
    let mut smaller = ParamTable::new();
    smaller.push("backbone.cls_token", &[1, 1, 8], Init::Zeros);
    let msg = load(&path, &smaller, &s).unwrap_err().to_string();
    assert!(
        msg.contains("another model") && msg.contains("attn.qkv.weight"),
        "{msg}"
    );
    let mut other = table();
    other.push("ibot_head.mlp.0.weight", &[2, 2], Init::Zeros);
    let msg = load(&path, &other, &s).unwrap_err().to_string();
    assert!(
        msg.contains("ibot_head.mlp.0.weight") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn a_changed_config_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let t = table();
    let s = state(t.len(), 5);
    let path = save(dir.path(), &t, &s, 10);
    let mut now = s.config.clone();
    now.insert("optim.base_lr".into(), "0.001".into());
    now.insert("crops.local_crops_number".into(), "2".into());
    let err = checkpoint::load(&path, &t, &now, ConfigCheck::Strict).unwrap_err();
    match &err {
        Error::ConfigChanged { diffs, .. } => assert_eq!(
            diffs,
            &[
                "crops.local_crops_number: (absent) -> 2".to_string(),
                "optim.base_lr: 0.004 -> 0.001".to_string()
            ]
        ),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("optim.base_lr: 0.004 -> 0.001"));
    let c = checkpoint::load(&path, &t, &now, ConfigCheck::AllowChanges).unwrap();
    assert_eq!(c.config, s.config);
    assert_ne!(
        checkpoint::fingerprint(&now),
        checkpoint::fingerprint(&s.config)
    );
}

#[test]
fn save_checks_buffer_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let t = table();
    let s = state(t.len(), 6);
    let short = vec![0f32; t.len() - 1];
    let err = checkpoint::save(
        dir.path(),
        &CheckpointRef {
            params: &t,
            student: &s.student,
            teacher: &short,
            exp_avg: &s.exp_avg,
            exp_avg_sq: &s.exp_avg_sq,
            adam_step: 0,
            buffers: &[],
            position: RunPosition::default(),
            config: &s.config,
            extra: &s.extra,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("teacher"), "{err}");
}

#[test]
fn run_folder_policy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("run");
    // Absent: created. The folder stays locked while the RunDir lives.
    let run = RunDir::prepare(&root, OutdirMode::Fresh).unwrap();
    assert!(run.checkpoints().is_dir());
    let (log, metrics, ckpts) = (run.log_path(), run.metrics_path(), run.checkpoints());
    let msg = RunDir::prepare(&root, OutdirMode::Resume)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("in use by another dinotrain run"), "{msg}");
    drop(run);
    // Non-empty without a flag: the error names both flags.
    let line = "[2026-12-04T12:00:00Z] device: cpu\n";
    std::fs::write(&log, line).unwrap();
    std::fs::write(&metrics, "{\"step\":0,\"losses\":{}}\n").unwrap();
    let msg = RunDir::prepare(&root, OutdirMode::Fresh)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("--resume") && msg.contains("--overwrite"),
        "{msg}"
    );
    // Resume needs a checkpoint.
    let msg = RunDir::prepare(&root, OutdirMode::Resume)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no checkpoint"), "{msg}");
    let t = table();
    let s = state(t.len(), 7);
    save(&ckpts, &t, &s, 3);
    let resumed = RunDir::prepare(&root, OutdirMode::Resume).unwrap();
    assert!(resumed.latest_checkpoint().unwrap().is_some());
    drop(resumed);
    // Overwrite clears dinotrain's files (and temp files of interrupted writes) only.
    std::fs::write(root.join(".loss_curves.png.tmp.123"), "x").unwrap();
    let run = RunDir::prepare(&root, OutdirMode::Overwrite).unwrap();
    assert!(!log.exists() && !metrics.exists());
    assert!(run.latest_checkpoint().unwrap().is_none());
    assert!(!root.join(".loss_curves.png.tmp.123").exists());
    drop(run);
    // ... and refuses a folder holding anything else, deleting nothing.
    std::fs::write(&log, line).unwrap();
    std::fs::write(root.join("my_photos.txt"), "precious").unwrap();
    let msg = RunDir::prepare(&root, OutdirMode::Overwrite)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("my_photos.txt"), "{msg}");
    assert!(log.exists() && root.join("my_photos.txt").exists());
    std::fs::remove_file(root.join("my_photos.txt")).unwrap();
    // dinotrain's names with the user's content are the user's files.
    for (name, content) in [
        ("config.yaml", "optim:\n  base_lr: 0.001\n"),
        ("metrics.jsonl", "my own notes\n"),
    ] {
        std::fs::write(root.join(name), content).unwrap();
        let msg = RunDir::prepare(&root, OutdirMode::Overwrite)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(name), "{msg}");
        assert_eq!(std::fs::read_to_string(root.join(name)).unwrap(), content);
        std::fs::remove_file(root.join(name)).unwrap();
    }
    std::fs::write(ckpts.join("precious.bin"), "x").unwrap();
    let msg = RunDir::prepare(&root, OutdirMode::Overwrite)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("checkpoints"), "{msg}");
    // A file where the folder should be.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(RunDir::prepare(&file, OutdirMode::Fresh).is_err());
}
