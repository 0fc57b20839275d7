//! The evaluation transform against torchvision: `Resize(round(size·256/224), BICUBIC)`,
//! `CenterCrop(size)`, `ToTensor`, `Normalize`, on synthetic images whose long side minus the
//! crop takes every residue mod 4. Reference values: `tests/data/reference/eval/transform.json`,
//! made by `tools/make-eval-transform-ref.py` with Pillow 13 and torchvision 0.29.

use dinotrain::data::RgbImage;
use dinotrain::eval::embed::{
    center_crop_offset, eval_crop, eval_resize_short, eval_transform, resized_size,
};
use serde_json::Value;

/// The generator's formula: value(x, y, c) = (3x² + 7y + xy + 85c) mod 256.
fn pattern(w: u32, h: u32) -> RgbImage {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h as u64 {
        for x in 0..w as u64 {
            for c in 0..3u64 {
                data.push(((3 * x * x + 7 * y + x * y + 85 * c) % 256) as u8);
            }
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn reference() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/reference/eval/transform.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u(v: &Value) -> u32 {
    v.as_u64().unwrap() as u32
}

#[test]
fn eval_transform_matches_torchvision_for_every_residue() {
    let r = reference();
    let cases = r["cases"].as_array().unwrap();
    let mut residues = std::collections::BTreeSet::new();
    for c in cases {
        let (w, h, size) = (u(&c["width"]), u(&c["height"]), u(&c["size"]) as usize);
        let label = format!("{w}x{h} at {size}");
        assert_eq!(eval_resize_short(size), u(&c["resize"]), "{label}");
        let (rw, rh) = resized_size(w, h, eval_resize_short(size));
        assert_eq!(
            (rw, rh),
            (u(&c["resized"][0]), u(&c["resized"][1])),
            "{label}"
        );
        let (left, top) = (u(&c["offset"][0]), u(&c["offset"][1]));
        assert_eq!(center_crop_offset(rw, size as u32), left, "{label} left");
        assert_eq!(center_crop_offset(rh, size as u32), top, "{label} top");
        residues.insert((size, (rw.max(rh) - size as u32) % 4));

        let img = pattern(w, h);
        // The 8-bit crop, byte for byte.
        let crop = eval_crop(&img, size);
        let ps = u(&c["pixel_stride"]) as usize;
        let hex = c["pixels_hex"].as_str().unwrap();
        let want: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mut got = Vec::new();
        for y in (0..size).step_by(ps) {
            for x in (0..size).step_by(ps) {
                let i = (y * size + x) * 3;
                got.extend_from_slice(&crop.data[i..i + 3]);
            }
        }
        assert_eq!(got.len(), want.len(), "{label}");
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{label}: {differ} crop bytes differ from torchvision's"
        );

        // The normalised float32 tensor.
        let mut out = vec![0f32; 3 * size * size];
        eval_transform(&mut out, &img, size);
        let s = u(&c["stride"]) as usize;
        let want: Vec<f32> = c["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().parse().unwrap())
            .collect();
        let mut k = 0;
        for ch in 0..3 {
            for y in (0..size).step_by(s) {
                for x in (0..size).step_by(s) {
                    let g = out[(ch * size + y) * size + x];
                    assert!(
                        (g - want[k]).abs() <= 1e-6,
                        "{label} c{ch} ({x},{y}): {g} vs torchvision {}",
                        want[k]
                    );
                    k += 1;
                }
            }
        }
        assert_eq!(k, want.len(), "{label}");
    }
    for size in [32, 224] {
        for m in 0..4 {
            assert!(
                residues.contains(&(size, m)),
                "no case with L - {size} = {m} mod 4"
            );
        }
    }
}

#[test]
fn center_crop_offsets_of_common_photo_shapes() {
    // torchvision: int(round((L - 224) / 2)) after Resize(256); checked by hand against the
    // formula (round half to even) and against transform.json.
    for (w, h, want) in [
        (1920, 1080, (116, 16)), // long side 455: 231 / 2 = 115.5 -> 116 (floor gave 115)
        (1024, 683, (80, 16)),   // 383: 79.5 -> 80
        (256, 343, (16, 60)),    // 343: 59.5 -> 60
        (500, 375, (58, 16)),    // 341: 58.5 -> 58
        (302, 256, (39, 16)),    // 302: 39
    ] {
        let (rw, rh) = resized_size(w, h, 256);
        assert_eq!(
            (center_crop_offset(rw, 224), center_crop_offset(rh, 224)),
            want,
            "{w}x{h}"
        );
    }
}
