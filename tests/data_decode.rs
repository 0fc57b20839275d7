//! Decoding and scanning real files of every kind (fixtures in tests/data, made by
//! tools/make-test-images.py; references are what Pillow decodes).

use dinotrain::data::decode::{
    decode, decode_exif, decode_file, jpeg_orientation, DecodeError, Exif, DEFAULT_MAX_PIXELS,
};
use dinotrain::data::scan::{scan_folder, Labels, ScanOptions, Symlinks};
use dinotrain::data::{ImageFormat, RgbImage};
use std::io::Read;
use std::path::{Path, PathBuf};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// A reference image: gzipped raw RGB plus its `W H` header.
fn reference(rel: &str) -> RgbImage {
    let base = data(&format!("reference/{rel}.rgb"));
    let header = std::fs::read_to_string(format!("{}.txt", base.display())).unwrap();
    let mut it = header.split_whitespace().map(|v| v.parse::<u32>().unwrap());
    let (width, height) = (it.next().unwrap(), it.next().unwrap());
    let gz = std::fs::read(format!("{}.gz", base.display())).unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    assert_eq!(raw.len(), (width * height * 3) as usize);
    RgbImage {
        width,
        height,
        data: raw,
    }
}

fn decode_kind(name: &str) -> RgbImage {
    let path = data(&format!("kinds/{name}"));
    let hint = ImageFormat::from_path(&path).unwrap();
    decode_file(&path, hint, DEFAULT_MAX_PIXELS, None).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// (mean, max) absolute difference per channel value.
fn diff(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let mut sum = 0u64;
    let mut max = 0u8;
    for (&x, &y) in a.data.iter().zip(&b.data) {
        let d = x.abs_diff(y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.data.len() as f64, max)
}

#[test]
fn lossless_formats_decode_exactly_like_pillow() {
    for name in [
        "rgb.png",
        "rgba.png",
        "gray-alpha.png",
        "palette.png",
        "image.bmp",
        "image.ppm",
        "image.pgm",
        "image.tiff",
        "image.webp",
        "png-named.jpg",
    ] {
        let got = decode_kind(name);
        let want = reference(&format!("kinds/{name}"));
        assert_eq!(diff(&got, &want), (0.0, 0), "{name}");
    }
}

#[test]
fn sixteen_bit_pngs_are_scaled_to_eight_bits() {
    for name in ["gray16.png", "rgb16.png"] {
        let got = decode_kind(name);
        let want = reference(&format!("kinds/{name}"));
        let (_, max) = diff(&got, &want);
        assert!(max <= 1, "{name}: max difference {max}");
    }
}

#[test]
fn jpegs_of_every_kind_match_pillow_within_decoder_rounding() {
    // Pillow uses libjpeg's islow IDCT and fancy upsampling; other decoders differ by a few
    // levels on some pixels. CMYK goes through an extra colour conversion.
    for (name, mean_tol, max_tol) in [
        ("baseline.jpg", 1.0, 12),
        ("progressive.jpg", 1.0, 12),
        ("gray.jpg", 1.0, 8),
        ("UPPER-CASE.JPEG", 1.0, 12),
        ("cmyk.jpg", 2.0, 16),
        ("exif-rotate90.jpg", 1.0, 12),
        ("exif-mirror.jpg", 1.0, 12),
    ] {
        let got = decode_kind(name);
        let want = reference(&format!("kinds/{name}"));
        let (mean, max) = diff(&got, &want);
        assert!(
            mean <= mean_tol && max <= max_tol,
            "{name}: mean {mean:.3} max {max}"
        );
    }
}

#[test]
fn exif_orientation_is_read_and_applied() {
    let bytes = std::fs::read(data("kinds/exif-rotate90.jpg")).unwrap();
    assert_eq!(
        jpeg_orientation(&bytes),
        Some(image::metadata::Orientation::Rotate90)
    );
    let plain = std::fs::read(data("kinds/baseline.jpg")).unwrap();
    assert_eq!(jpeg_orientation(&plain), None);
    // Stored 64 wide, 96 tall; displayed (and decoded) 96 wide, 64 tall.
    let img = decode_kind("exif-rotate90.jpg");
    assert_eq!((img.width, img.height), (96, 64));
    // The rotated image matches the unrotated original, the mirrored one its mirror.
    let base = decode_kind("baseline.jpg");
    assert!(diff(&img, &base).0 < 2.0);
    let mirrored = decode_kind("exif-mirror.jpg");
    let mut flipped = base.clone();
    dinotrain::data::augment::flip_horizontal(&mut flipped.data, base.width as usize);
    assert!(diff(&mirrored, &flipped).0 < 1.0);
    assert!(diff(&mirrored, &base).0 > 10.0);
}

#[test]
fn exif_orientation_can_be_ignored_as_the_official_loader_does() {
    let ignored = |name: &str| {
        let bytes = std::fs::read(data(&format!("kinds/{name}"))).unwrap();
        decode_exif(
            &bytes,
            ImageFormat::Jpeg,
            DEFAULT_MAX_PIXELS,
            None,
            Exif::Ignore,
        )
        .unwrap()
    };
    let base = decode_kind("baseline.jpg");
    // The stored pixels: the mirror-tagged file holds the unmirrored image ...
    let mirrored = ignored("exif-mirror.jpg");
    assert!(diff(&mirrored, &base).0 < 1.0);
    // ... and the rotate-tagged one stays 64 wide, 96 tall (Pillow's ROTATE_90 of the base).
    let rotated = ignored("exif-rotate90.jpg");
    assert_eq!((rotated.width, rotated.height), (64, 96));
    let mut turned = RgbImage {
        width: 64,
        height: 96,
        data: vec![0; 64 * 96 * 3],
    };
    for y in 0..96u32 {
        for x in 0..64u32 {
            // Counter-clockwise: stored (x, y) shows base (95 - y, x).
            let p = base.pixel(95 - y, x);
            let i = ((y * 64 + x) * 3) as usize;
            turned.data[i..i + 3].copy_from_slice(&p);
        }
    }
    assert!(diff(&rotated, &turned).0 < 2.0);
    // A file without the tag decodes the same either way.
    assert_eq!(ignored("baseline.jpg"), base);
    assert_eq!("ignore".parse::<Exif>(), Ok(Exif::Ignore));
    assert!("sideways".parse::<Exif>().is_err());
}

#[test]
fn bad_files_give_typed_errors() {
    let err = |name: &str| {
        let path = data(&format!("bad/{name}"));
        decode_file(
            &path,
            ImageFormat::from_path(&path).unwrap(),
            DEFAULT_MAX_PIXELS,
            None,
        )
        .unwrap_err()
    };
    assert!(matches!(err("empty.jpg"), DecodeError::Empty));
    assert!(matches!(err("text.jpg"), DecodeError::NotAnImage { .. }));
    assert!(matches!(
        err("truncated.jpg"),
        DecodeError::Corrupt {
            format: ImageFormat::Jpeg,
            ..
        }
    ));
    assert!(matches!(
        err("truncated.png"),
        DecodeError::Corrupt {
            format: ImageFormat::Png,
            ..
        }
    ));
    assert!(matches!(
        err("bomb.png"),
        DecodeError::TooLarge {
            width: 100_000,
            height: 100_000,
            ..
        }
    ));
    let missing = decode_file(
        &data("bad/missing.jpg"),
        ImageFormat::Jpeg,
        DEFAULT_MAX_PIXELS,
        None,
    );
    assert!(matches!(missing, Err(DecodeError::Io(_))));
}

#[test]
fn corrupt_jpeg_bytes_give_the_decoders_error_not_a_crash() {
    // The C decoders report errors through a callback that must not return; each must reach
    // the caller as a typed error with libjpeg's message, never abort the process or panic.
    let good = std::fs::read(data("photos/coffee.jpg")).unwrap();
    // The header and the end marker, nothing between: no image data.
    let mut no_scan = good[..200].to_vec();
    no_scan.extend_from_slice(&[0xFF, 0xD9]);
    let e = decode(&no_scan, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None).unwrap_err();
    let DecodeError::Corrupt { format, detail } = &e else {
        panic!("{e}")
    };
    assert_eq!(*format, ImageFormat::Jpeg);
    assert!(!detail.contains("panicked"), "{detail}");
    eprintln!("no scan: {detail}");
    // Bytes overwritten at 300 spread positions, one file each (a fixed LCG, so the test is
    // the same every run): each decodes to some image or fails with a typed error.
    let mut state = 12345u64;
    let mut errors = 0;
    for _ in 0..300 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = 2 + (state >> 33) as usize % (good.len() - 4);
        let mut bad = good.clone();
        bad[at] = (state >> 16) as u8;
        match decode(&bad, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None) {
            Ok(img) => assert_eq!(img.data.len(), img.width as usize * img.height as usize * 3),
            Err(DecodeError::Corrupt { detail, .. }) => {
                assert!(!detail.contains("panicked"), "byte {at}: {detail}");
                errors += 1;
            }
            Err(DecodeError::TooLarge { .. }) => errors += 1,
            Err(e) => panic!("byte {at}: {e}"),
        }
    }
    eprintln!("{errors} of 300 damaged files refused");
}

#[test]
fn pixel_limit_refuses_before_decoding() {
    let bytes = std::fs::read(data("photos/coffee.jpg")).unwrap();
    let e = decode(&bytes, ImageFormat::Jpeg, 500 * 375 - 1, None).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::TooLarge {
                width: 500,
                height: 375,
                ..
            }
        ),
        "{e}"
    );
    let img = decode(&bytes, ImageFormat::Jpeg, 500 * 375, None).unwrap();
    assert_eq!((img.width, img.height), (500, 375));
    let png = std::fs::read(data("kinds/rgb.png")).unwrap();
    assert!(matches!(
        decode(&png, ImageFormat::Png, 96 * 64 - 1, None),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn size_hint_downscales_in_the_dct_domain_in_every_build() {
    let bytes = std::fs::read(data("photos/astronaut.jpg")).unwrap();
    let full = decode(&bytes, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None).unwrap();
    assert_eq!((full.width, full.height), (500, 375));
    // 1/2 gives a 188-pixel shorter side, 1/4 would give 94 < 100; 1/8 rounds 375 up to 47.
    for (hint, size) in [
        (100, (250, 188)),
        (90, (125, 94)),
        (47, (63, 47)),
        (400, (500, 375)),
    ] {
        let hinted = decode(&bytes, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, Some(hint)).unwrap();
        assert_eq!((hinted.width, hinted.height), size, "hint {hint}");
    }
    // Not for PNG: only JPEG has a DCT domain.
    let png = std::fs::read(data("kinds/rgb.png")).unwrap();
    let hinted = decode(&png, ImageFormat::Png, DEFAULT_MAX_PIXELS, Some(8)).unwrap();
    assert_eq!((hinted.width, hinted.height), (96, 64));
}

#[test]
fn progressive_photo_decodes_like_its_baseline_twin() {
    let a = decode_file(
        &data("photos/coffee.jpg"),
        ImageFormat::Jpeg,
        DEFAULT_MAX_PIXELS,
        None,
    )
    .unwrap();
    let b = decode_file(
        &data("photos/coffee-progressive.jpg"),
        ImageFormat::Jpeg,
        DEFAULT_MAX_PIXELS,
        None,
    )
    .unwrap();
    // Same quantised coefficients, different scan order: the same pixels.
    assert_eq!(diff(&a, &b), (0.0, 0));
}

fn copy(from: &str, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(data(from), to).unwrap();
}

#[cfg(unix)]
#[test]
fn scan_is_sorted_case_insensitive_labelled_and_survives_symlink_loops() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy("kinds/baseline.jpg", &root.join("zebra/b.JPG"));
    copy("kinds/rgb.png", &root.join("zebra/a.Png"));
    copy("kinds/image.webp", &root.join("ant/deep/er/c.webp"));
    copy("kinds/image.bmp", &root.join("top.bmp"));
    std::fs::write(root.join("ant/notes.txt"), "x").unwrap();
    // A loop (ant/deep/back -> ant) and a second link to a folder already walked.
    std::os::unix::fs::symlink(root.join("ant"), root.join("ant/deep/back")).unwrap();
    std::os::unix::fs::symlink(root.join("zebra"), root.join("zebra-link")).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling.jpg")).unwrap();
    let opts = ScanOptions {
        symlinks: Symlinks::Follow,
        labels: Labels::Subfolder,
    };
    let r = scan_folder(root, &opts).unwrap();
    let rel: Vec<String> = r
        .entries
        .iter()
        .map(|e| e.path.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert_eq!(
        rel,
        [
            "ant/deep/er/c.webp",
            "top.bmp",
            "zebra/a.Png",
            "zebra/b.JPG"
        ]
    );
    assert_eq!(r.classes, ["ant", "zebra"]);
    let labels: Vec<Option<u32>> = r.entries.iter().map(|e| e.label).collect();
    assert_eq!(labels, [Some(0), None, Some(1), Some(1)]);
    let formats: Vec<ImageFormat> = r.entries.iter().map(|e| e.format).collect();
    assert_eq!(
        formats,
        [
            ImageFormat::Webp,
            ImageFormat::Bmp,
            ImageFormat::Png,
            ImageFormat::Jpeg
        ]
    );
    assert_eq!(r.repeated_dirs, 2);
    assert_eq!(r.other_files, 1);
    assert_eq!(r.unreadable.len(), 1);
    assert!(r.unreadable[0].reason.contains("broken symlink"));
    // Skipping links drops the loop, the twin and the dangling link alike.
    let skip = ScanOptions {
        symlinks: Symlinks::Skip,
        labels: Labels::None,
    };
    let r = scan_folder(root, &skip).unwrap();
    assert_eq!(r.entries.len(), 4);
    assert_eq!((r.repeated_dirs, r.unreadable.len()), (0, 0));
    assert!(r.entries.iter().all(|e| e.label.is_none()));
}

#[test]
fn scanning_a_missing_folder_or_a_file_is_an_error() {
    assert!(scan_folder(&data("no-such-folder"), &ScanOptions::default()).is_err());
    assert!(scan_folder(&data("kinds/rgb.png"), &ScanOptions::default()).is_err());
}

fn run_scan(dir: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dinotrain"))
        .arg("scan")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn scan_command_reports_mixed_good_and_bad_files_with_distinct_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    for name in ["baseline.jpg", "rgb.png", "image.tiff"] {
        copy(&format!("kinds/{name}"), &good.join(name));
    }
    let (code, out) = run_scan(&good);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all 3 images are readable"), "{out}");

    let mixed = tmp.path().join("mixed");
    copy("kinds/baseline.jpg", &mixed.join("ok.jpg"));
    for name in ["truncated.jpg", "empty.jpg", "text.jpg", "bomb.png"] {
        copy(&format!("bad/{name}"), &mixed.join(name));
    }
    let (code, out) = run_scan(&mixed);
    assert_eq!(code, 3, "{out}");
    for needle in [
        "unreadable images: 4",
        "truncated.jpg: corrupt or truncated jpeg",
        "empty.jpg: empty file",
        "text.jpg: not an image",
        "bomb.png: 100000x100000 image",
        "jpeg              4          1",
        "png               1          0",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }

    let bad = tmp.path().join("bad");
    copy("bad/empty.jpg", &bad.join("empty.jpg"));
    let (code, out) = run_scan(&bad);
    assert_eq!(code, 4, "{out}");
    let (code, _) = run_scan(&tmp.path().join("missing"));
    assert_eq!(code, 2);
}

#[test]
fn scan_command_survives_a_closed_output_pipe() {
    // Regression: `dinotrain scan DIR | head` used to panic on the broken pipe.
    let tmp = tempfile::tempdir().unwrap();
    copy("kinds/baseline.jpg", &tmp.path().join("ok.jpg"));
    copy("bad/text.jpg", &tmp.path().join("bad.jpg"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dinotrain"))
        .arg("scan")
        .arg(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
