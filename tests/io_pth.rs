//! `.pth` reading and key mapping against the golden weights, plus hand-built archives for
//! views, dtypes and refusals.

use dinotrain::golden::Fixture;
use dinotrain::io::keys::{self, Tensors};
use dinotrain::io::pth::{read_pth, read_pth_bytes, read_pth_file};
use std::io::Write;
use std::path::Path;

fn fixture_params(case: &str) -> Tensors {
    let fx = Fixture::load(&Path::new("tests/golden").join(format!("{case}.safetensors"))).unwrap();
    fx.inputs_with_prefix("in.param.").unwrap()
}

fn bits(t: &Tensors) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    t.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.shape.clone(),
                v.data.iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn released_layout_equals_the_fixture_parameters() {
    for case in ["vit_forward-reg0-s0", "vit_forward-reg4-s1"] {
        let want = fixture_params(case);
        assert!(want.contains_key("blocks.0.attn.qkv.weight"), "{case}");
        let got = read_pth(&Path::new("tests/golden/weights").join(format!("{case}.pth"))).unwrap();
        assert_eq!(bits(&got), bits(&want), "{case}");
        assert_eq!(
            bits(&keys::import_backbone(got).unwrap()),
            bits(&want),
            "{case}"
        );
    }
    let reg4 = fixture_params("vit_forward-reg4-s1");
    assert_eq!(reg4["register_tokens"].shape[1], 4);
}

#[test]
fn teacher_checkpoint_layout_maps_to_the_same_backbone() {
    for case in ["vit_forward-reg0-s0", "vit_forward-reg4-s1"] {
        let want = fixture_params(case);
        let file = read_pth_file(
            &Path::new("tests/golden/weights").join(format!("{case}-teacher_chunked.pth")),
        )
        .unwrap();
        assert!(file.skipped.is_empty(), "{:?}", file.skipped);
        let raw = &file.tensors;
        assert!(
            raw.keys().all(|k| k.starts_with("teacher.")),
            "{:?}",
            raw.keys()
        );
        assert!(raw
            .keys()
            .any(|k| k.starts_with("teacher.backbone.blocks.1.")));
        assert!(raw.keys().any(|k| k.starts_with("teacher.dino_head.")));
        let normalized = keys::normalize_official(raw.clone()).unwrap();
        assert!(normalized.keys().any(|k| k.starts_with("dino_head.")));
        let backbone = keys::import_backbone(file.tensors).unwrap();
        assert_eq!(bits(&backbone), bits(&want), "{case}");
    }
}

#[test]
fn hugging_face_round_trip_on_the_fixture_weights() {
    for case in ["vit_forward-reg0-s0", "vit_forward-reg4-s1"] {
        let official = fixture_params(case);
        let d = official["cls_token"].shape[2];
        let hf = keys::official_to_hf(&official).unwrap();
        let qkv = &official["blocks.1.attn.qkv.bias"].data;
        assert_eq!(
            hf["encoder.layer.1.attention.attention.query.bias"].data,
            qkv[..d]
        );
        assert_eq!(
            hf["encoder.layer.1.attention.attention.key.bias"].data,
            qkv[d..2 * d]
        );
        assert_eq!(
            hf["encoder.layer.1.attention.attention.value.bias"].data,
            qkv[2 * d..]
        );
        assert_eq!(hf["embeddings.position_embeddings"], official["pos_embed"]);
        assert_eq!(hf["layernorm.weight"], official["norm.weight"]);
        assert_eq!(
            hf.contains_key("embeddings.register_tokens"),
            official.contains_key("register_tokens")
        );
        // qkv weight and bias become three tensors each.
        assert_eq!(hf.len(), official.len() + 4 * count_blocks(&official));
        assert_eq!(bits(&keys::hf_to_official(&hf).unwrap()), bits(&official));
        assert_eq!(bits(&keys::import_backbone(hf).unwrap()), bits(&official));
    }
}

fn count_blocks(t: &Tensors) -> usize {
    t.keys().filter(|k| k.ends_with(".attn.qkv.weight")).count()
}

// ---- hand-built archives ----

/// One tensor for the pickle writer.
struct Spec<'a> {
    name: &'a str,
    class: &'a str,
    key: &'a str,
    numel: usize,
    offset: usize,
    shape: &'a [usize],
    stride: &'a [usize],
}

fn pickle(specs: &[Spec]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    let s = |p: &mut Vec<u8>, text: &str| {
        p.push(b'X');
        p.extend_from_slice(&(text.len() as u32).to_le_bytes());
        p.extend_from_slice(text.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: usize| {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    };
    for spec in specs {
        s(&mut p, spec.name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        s(&mut p, "storage");
        p.extend_from_slice(format!("ctorch\n{}\n", spec.class).as_bytes());
        s(&mut p, spec.key);
        s(&mut p, "cpu");
        int(&mut p, spec.numel);
        p.extend_from_slice(b"tQ");
        int(&mut p, spec.offset);
        p.push(b'(');
        for &d in spec.shape {
            int(&mut p, d);
        }
        p.extend_from_slice(b"t(");
        for &d in spec.stride {
            int(&mut p, d);
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend_from_slice(b"u.");
    p
}

fn archive(pkl: &[u8], storages: &[(&str, Vec<u8>)], method: zip::CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pkl).unwrap();
    w.start_file("archive/byteorder", opts).unwrap();
    w.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        w.start_file(format!("archive/data/{key}"), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn spec<'a>(
    name: &'a str,
    class: &'a str,
    key: &'a str,
    numel: usize,
    offset: usize,
    shape: &'a [usize],
    stride: &'a [usize],
) -> Spec<'a> {
    Spec {
        name,
        class,
        key,
        numel,
        offset,
        shape,
        stride,
    }
}

#[test]
fn views_are_rebuilt_from_offset_and_strides() {
    let storage = f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let pkl = pickle(&[
        spec("transposed", "FloatStorage", "0", 6, 0, &[3, 2], &[1, 3]),
        spec("slice", "FloatStorage", "0", 6, 4, &[2], &[1]),
        spec("expanded", "FloatStorage", "0", 6, 0, &[2, 3], &[0, 1]),
        spec("strided", "FloatStorage", "0", 6, 1, &[3], &[2]),
        spec("scalar", "FloatStorage", "0", 6, 5, &[], &[]),
        spec("contiguous", "FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]),
    ]);
    for method in [
        zip::CompressionMethod::Stored,
        zip::CompressionMethod::Deflated,
    ] {
        let bytes = archive(&pkl, &[("0", storage.clone())], method);
        let t = read_pth_bytes(&bytes, Path::new("views.pth"))
            .unwrap()
            .tensors;
        assert_eq!(t["transposed"].shape, [3, 2]);
        assert_eq!(t["transposed"].data, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(t["slice"].data, [4.0, 5.0]);
        assert_eq!(t["expanded"].data, [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
        assert_eq!(t["strided"].data, [1.0, 3.0, 5.0]);
        assert_eq!((t["scalar"].shape.len(), t["scalar"].data[0]), (0, 5.0));
        assert_eq!(t["contiguous"].data, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}

#[test]
fn half_precision_storages_widen_and_integers_are_skipped() {
    let f16: Vec<u8> = [1.5f32, -2.0, 0.333]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = [1.5f32, -2.0, 0.333]
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let longs: Vec<u8> = [7i64, 8].iter().flat_map(|v| v.to_le_bytes()).collect();
    let pkl = pickle(&[
        spec("h", "HalfStorage", "0", 3, 0, &[3], &[1]),
        spec("b", "BFloat16Storage", "1", 3, 0, &[3], &[1]),
        spec("n", "LongStorage", "2", 2, 0, &[2], &[1]),
    ]);
    let bytes = archive(
        &pkl,
        &[("0", f16), ("1", bf16), ("2", longs)],
        zip::CompressionMethod::Stored,
    );
    let f = read_pth_bytes(&bytes, Path::new("half.pth")).unwrap();
    assert_eq!(
        f.tensors["h"].data,
        [1.5, -2.0, half::f16::from_f32(0.333).to_f32()]
    );
    assert_eq!(
        f.tensors["b"].data,
        [1.5, -2.0, half::bf16::from_f32(0.333).to_f32()]
    );
    assert_eq!(f.skipped, ["n: LongStorage tensor"]);
}

#[test]
fn bad_files_are_refused_with_the_reason() {
    let storage = f32_bytes(&[0.0; 6]);
    let past = pickle(&[spec("w", "FloatStorage", "0", 6, 0, &[4], &[2])]);
    let bytes = archive(
        &past,
        &[("0", storage.clone())],
        zip::CompressionMethod::Stored,
    );
    let msg = read_pth_bytes(&bytes, Path::new("x.pth"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("reaches past") && msg.contains("w"), "{msg}");

    let ok = pickle(&[spec("w", "FloatStorage", "0", 6, 0, &[6], &[1])]);
    let bytes = archive(
        &ok,
        &[("0", storage[..20].to_vec())],
        zip::CompressionMethod::Stored,
    );
    let msg = read_pth_bytes(&bytes, Path::new("x.pth"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("20 bytes"), "{msg}");

    let bytes = archive(&ok, &[], zip::CompressionMethod::Stored);
    let msg = read_pth_bytes(&bytes, Path::new("x.pth"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("data/0") && msg.contains("missing"), "{msg}");

    let msg = read_pth_bytes(&[0x80, 2, 0x8a, 0x0a], Path::new("old.pth"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("legacy"), "{msg}");
    let msg = read_pth_bytes(b"hello", Path::new("x.txt"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a PyTorch checkpoint"), "{msg}");

    // The same refusals when reading from a path (streamed from the file).
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.pth");
    std::fs::write(&old, [0x80, 2, 0x8a, 0x0a]).unwrap();
    assert!(read_pth(&old).unwrap_err().to_string().contains("legacy"));
    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, []).unwrap();
    assert!(read_pth(&empty).is_err());
    assert!(read_pth(&dir.path().join("absent.pth"))
        .unwrap_err()
        .to_string()
        .contains("absent.pth"));

    let real = std::fs::read("tests/golden/weights/vit_forward-reg0-s0.pth").unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    assert!(read_pth(&cut).unwrap_err().to_string().contains("cut.pth"));
    for cut in [100, real.len() / 2, real.len() - 10] {
        let err = read_pth_bytes(&real[..cut], Path::new("cut.pth"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cut.pth"), "{err}");
    }
}
