//! Trained backbones: export with the architecture metadata, reload (run folder, file, the
//! `export` command in both key namings) bit for bit, official `.pth` with an inferred
//! architecture against the golden forward, and errors that name what is missing.

use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::prelude::*;
use dinotrain::eval::backbone::{
    arch_metadata, load_backbone, load_backbone_with, BackboneOverrides, LoadedBackbone,
    RUN_BACKBONE_FILE,
};
use dinotrain::golden::{rel_err, Fixture};
use dinotrain::io::export::{export_backbone, KeyNaming};
use dinotrain::io::TensorFile;
use dinotrain::nn::params::ParamTable;
use dinotrain::nn::{Preset, Vit, VitConfig, VitOutput, VitWorkspaces};
use dinotrain::rng::{keyed, stream};
use rand::Rng as _;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dinotrain");

/// A micro model with random values everywhere (so every parameter shows in the output).
fn random_model(cfg: &VitConfig, seed: u64) -> (Vit, ParamTable, Vec<f32>) {
    let mut table = ParamTable::new();
    let vit = Vit::new(cfg, &mut table, "backbone.");
    let mut rng = keyed(seed, &[stream::TEST]);
    let params = (0..table.len())
        .map(|_| rng.random_range(-0.5f32..0.5))
        .collect();
    (vit, table, params)
}

fn images(cfg: &VitConfig, b: usize, seed: u64) -> Vec<f32> {
    let mut rng = keyed(seed, &[stream::TEST, 1]);
    (0..b * 3 * cfg.img_size * cfg.img_size)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect()
}

/// The backbone's forward on the CPU backend (f32): the inference forward, or with masks the
/// training forward (the inference forward takes none), without drop path.
fn forward_masked(
    vit: &Vit,
    params: &[f32],
    x: &[f32],
    (b, h, w): (usize, usize, usize),
    masks: Option<&[bool]>,
) -> VitOutput {
    let mut be = CpuBackend::default();
    let weights = be.weights(params).unwrap();
    let mut ws = VitWorkspaces::new(vit);
    let out = match masks {
        None => ws.forward_inference(&mut be, vit, &weights, x, (b, h, w)),
        Some(m) => ws.forward(&mut be, vit, &weights, x, (b, h, w), Some(m), None),
    };
    out.unwrap().to_host(&mut be).unwrap()
}

fn forward(vit: &Vit, params: &[f32], x: &[f32], b: usize, size: usize) -> VitOutput {
    forward_masked(vit, params, x, (b, size, size), None)
}

fn assert_same_model(got: &LoadedBackbone, cfg: &VitConfig, want: &VitOutput, x: &[f32]) {
    assert_eq!(&got.cfg, cfg);
    let o = forward(&got.vit, &got.params, x, 2, cfg.img_size);
    assert_eq!(o.cls, want.cls, "{}", got.path.display());
    assert_eq!(o.patch, want.patch, "{}", got.path.display());
    assert_eq!(o.reg, want.reg, "{}", got.path.display());
}

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dinotrain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn exported_micro_models_reload_bit_for_bit_from_a_run_a_file_and_both_key_namings() {
    for (seed, registers) in [(3u64, 0usize), (4, 2)] {
        let cfg = Preset::Micro.config(16, 4, registers);
        let (vit, table, params) = random_model(&cfg, seed);
        let x = images(&cfg, 2, seed);
        let want = forward(&vit, &params, &x, 2, 16);

        let run_dir = tempfile::tempdir().unwrap();
        let file = run_dir.path().join(RUN_BACKBONE_FILE);
        let meta = arch_metadata(&cfg);
        export_backbone(&file, &table, &params, KeyNaming::Official, &meta).unwrap();
        assert_eq!(
            TensorFile::read(&file).unwrap().metadata["dinotrain.arch"],
            meta["dinotrain.arch"]
        );
        assert_same_model(
            &load_backbone(run_dir.path().to_str().unwrap()).unwrap(),
            &cfg,
            &want,
            &x,
        );
        assert_same_model(
            &load_backbone(file.to_str().unwrap()).unwrap(),
            &cfg,
            &want,
            &x,
        );

        for keys in ["official", "hf"] {
            let out = run_dir.path().join(format!("export-{keys}.safetensors"));
            let out_s = out.to_str().unwrap();
            run(&[
                "export",
                "--model",
                file.to_str().unwrap(),
                "--out",
                out_s,
                "--keys",
                keys,
            ]);
            let written = TensorFile::read(&out).unwrap();
            let official = written.tensors.contains_key("blocks.0.attn.qkv.weight");
            assert_eq!(official, keys == "official", "{keys}");
            assert!(written.metadata.contains_key("dinotrain.arch"));
            assert_same_model(&load_backbone(out_s).unwrap(), &cfg, &want, &x);
        }
    }
}

#[test]
fn the_official_pth_loads_with_an_inferred_architecture_and_matches_the_golden_forward() {
    let fx = Fixture::load(Path::new("tests/golden/vit_forward-reg0-s0.safetensors")).unwrap();
    let heads = fx.param_usize("num_heads").unwrap();
    let b = load_backbone_with(
        "tests/golden/weights/vit_forward-reg0-s0.pth",
        BackboneOverrides {
            num_heads: Some(heads),
        },
    )
    .unwrap();
    assert_eq!(b.cfg.embed_dim, fx.param_usize("embed_dim").unwrap());
    assert_eq!(b.cfg.depth, fx.param_usize("depth").unwrap());
    assert_eq!(b.cfg.img_size, fx.param_usize("img_size").unwrap());
    assert_eq!(b.cfg.patch_size, fx.param_usize("patch_size").unwrap());
    assert_eq!(b.cfg.num_register_tokens, 0);
    let images = fx.input("images").unwrap();
    let (bs, h, w) = (images.shape[0], images.shape[2], images.shape[3]);
    let masks: Vec<bool> = fx
        .input_u8("masks")
        .unwrap()
        .1
        .iter()
        .map(|&m| m != 0)
        .collect();
    let o = forward_masked(&b.vit, &b.params, &images.data, (bs, h, w), Some(&masks));
    for (name, got) in [
        ("out.x_norm_clstoken", &o.cls),
        ("out.x_norm_patchtokens", &o.patch),
    ] {
        let want = fx.f32(name).unwrap();
        assert_eq!(got.len(), want.data.len(), "{name}");
        let err = rel_err(got, &want.data);
        assert!(err <= fx.tol, "{name}: rel err {err:e} > tol {:e}", fx.tol);
    }
    // Without the override the head count is D/64 = 1: another model, another output.
    let inferred = load_backbone("tests/golden/weights/vit_forward-reg0-s0.pth").unwrap();
    assert_eq!(inferred.cfg.num_heads, 1);
}

#[test]
fn missing_and_incomplete_backbones_are_errors_that_name_the_file_and_the_part() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_backbone(dir.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains(RUN_BACKBONE_FILE), "{err}");

    let missing = dir.path().join("nope.safetensors");
    let err = load_backbone(missing.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.safetensors"), "{err}");

    let err = load_backbone("model.bin").unwrap_err().to_string();
    assert!(err.contains("model.bin"), "{err}");

    // A file without metadata and without `norm.weight`: inferred, then refused by name.
    let cfg = Preset::Micro.config(16, 4, 0);
    let (_, table, params) = random_model(&cfg, 9);
    let mut file = TensorFile::default();
    for spec in table.specs() {
        let key = spec.name.strip_prefix("backbone.").unwrap();
        if key != "norm.weight" {
            let data = params[spec.at.range()].to_vec();
            file.insert(
                key,
                dinotrain::tensor::Tensor::from_vec(&spec.shape, data).unwrap(),
            );
        }
    }
    let path = dir.path().join("partial.safetensors");
    file.write(&path).unwrap();
    let heads = BackboneOverrides { num_heads: Some(2) };
    let err = load_backbone_with(path.to_str().unwrap(), heads)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("partial.safetensors") && err.contains("norm.weight"),
        "{err}"
    );
}

#[test]
fn a_released_name_without_its_file_says_which_file_where_and_its_url() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("x.safetensors");
    let run = Command::new(BIN)
        .args(["export", "--model", "dinov2/vits14_reg4", "--out"])
        .arg(&out)
        .env("DINOTRAIN_HOME", home.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    for needle in [
        "dinov2_vits14_reg4_pretrain.pth",
        home.path().to_str().unwrap(),
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert!(!out.exists());
}

#[test]
fn a_hugging_face_file_without_metadata_loads_by_inference_bit_for_bit() {
    let cfg = Preset::Micro.config(16, 4, 0);
    let (vit, table, params) = random_model(&cfg, 21);
    let x = images(&cfg, 2, 21);
    let want = forward(&vit, &params, &x, 2, 16);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf.safetensors");
    export_backbone(
        &path,
        &table,
        &params,
        KeyNaming::HuggingFace,
        &Default::default(),
    )
    .unwrap();
    let mut file = TensorFile::read(&path).unwrap();
    file.metadata.clear();
    file.write(&path).unwrap();
    let heads = BackboneOverrides { num_heads: Some(2) };
    let got = load_backbone_with(path.to_str().unwrap(), heads).unwrap();
    // Everything but the LayerScale init value (the trained gammas are loaded) is recovered.
    let mut expected = cfg.clone();
    expected.layerscale = Some(1.0);
    assert_eq!(got.cfg, expected);
    let o = forward(&got.vit, &got.params, &x, 2, 16);
    assert_eq!((o.cls, o.patch), (want.cls, want.patch));
}
