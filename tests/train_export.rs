//! Export a backbone and read it back (official and Hugging Face keys), and load official
//! checkpoints into a model's flat buffer.

use dinotrain::golden::Fixture;
use dinotrain::io::export::{self, KeyNaming};
use dinotrain::io::keys::Tensors;
use dinotrain::io::pretrained::{WeightsFormat, WeightsSource};
use dinotrain::nn::params::{Init, ParamTable};
use std::collections::BTreeMap;
use std::path::Path;

fn fixture_params() -> Tensors {
    Fixture::load(Path::new("tests/golden/vit_forward-reg4-s1.safetensors"))
        .unwrap()
        .inputs_with_prefix("in.param.")
        .unwrap()
}

/// A table with the fixture's backbone plus a small head, and a buffer holding the fixture values.
fn model(params: &Tensors) -> (ParamTable, Vec<f32>) {
    let mut table = ParamTable::new();
    for (k, t) in params {
        table.push(format!("backbone.{k}"), &t.shape, Init::Zeros);
    }
    table.push("dino_head.mlp.0.weight", &[4, 3], Init::Const(0.5));
    let mut flat = table.init(&mut dinotrain::rng::keyed(0, &[]));
    for (k, t) in params {
        let spec = table.get(&format!("backbone.{k}")).unwrap();
        flat[spec.at.range()].copy_from_slice(&t.data);
    }
    (table, flat)
}

#[test]
fn export_then_reload_in_both_namings() {
    let params = fixture_params();
    let (table, flat) = model(&params);
    let dir = tempfile::tempdir().unwrap();
    let meta: BTreeMap<String, String> = [("step".to_string(), "12".to_string())].into();
    for naming in [KeyNaming::Official, KeyNaming::HuggingFace] {
        let path = dir.path().join(format!("{naming:?}.safetensors"));
        export::export_backbone(&path, &table, &flat, naming, &meta).unwrap();
        let file = dinotrain::io::TensorFile::read(&path).unwrap();
        assert_eq!(file.metadata["step"], "12");
        let has_official = file.tensors.contains_key("blocks.0.attn.qkv.weight");
        assert_eq!(has_official, naming == KeyNaming::Official);
        assert!(!file.tensors.keys().any(|k| k.contains("dino_head")));
        let back = export::read_backbone(&path, WeightsFormat::Safetensors).unwrap();
        assert_eq!(back, params, "{naming:?}");
        let mut fresh = vec![0f32; table.len()];
        export::load_backbone_into(&table, &mut fresh, &back, "export").unwrap();
        let head = table.get("dino_head.mlp.0.weight").unwrap().at.range();
        assert_eq!(fresh[..head.start], flat[..head.start]);
        assert!(
            fresh[head].iter().all(|&v| v == 0.0),
            "heads stay as they were"
        );
    }
}

#[test]
fn official_pth_files_load_into_the_model() {
    let params = fixture_params();
    let (table, flat) = model(&params);
    for file in [
        "vit_forward-reg4-s1.pth",
        "vit_forward-reg4-s1-teacher_chunked.pth",
    ] {
        let path = Path::new("tests/golden/weights").join(file);
        let source = WeightsSource::parse(path.to_str().unwrap()).unwrap();
        let (found, format) = source.locate().unwrap();
        let backbone = export::read_backbone(&found, format).unwrap();
        let mut fresh = vec![0f32; table.len()];
        export::load_backbone_into(&table, &mut fresh, &backbone, file).unwrap();
        let head = table.get("dino_head.mlp.0.weight").unwrap().at.range();
        assert_eq!(fresh[..head.start], flat[..head.start], "{file}");
    }
}

#[test]
fn another_architecture_is_refused() {
    let params = fixture_params();
    let (table, _) = model(&params);
    let mut fresh = vec![0f32; table.len()];
    let mut wrong = params.clone();
    wrong.get_mut("pos_embed").unwrap().shape.insert(0, 1);
    let msg = export::load_backbone_into(&table, &mut fresh, &wrong, "w.pth")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("pos_embed") && msg.contains("w.pth"), "{msg}");
    let mut missing = params.clone();
    missing.remove("norm.bias");
    let msg = export::load_backbone_into(&table, &mut fresh, &missing, "w.pth")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("norm.bias") && msg.contains("missing"),
        "{msg}"
    );
    let mut extra = params.clone();
    extra.insert("blocks.9.ls1.gamma".into(), dinotrain::Tensor::zeros(&[2]));
    let msg = export::load_backbone_into(&table, &mut fresh, &extra, "w.pth")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("blocks.9.ls1.gamma"), "{msg}");
}
