//! JPEG pixels against libjpeg-turbo 3 (what Pillow, and so the official pipeline, decodes):
//! 41x31 files of every kind in tests/data/jpeg-kinds with the pixels Pillow 13 gives
//! (`tools/make-jpeg-kinds.py`). Both builds' JPEG decoders (the default libjpeg C code through
//! mozjpeg-sys, and libjpeg-turbo through the `turbojpeg` feature) are bit-exact on the YCbCr
//! and grayscale kinds; CMYK takes the pure-Rust path in both.

use dinotrain::data::decode::{decode, jpeg_decoder_name, DEFAULT_MAX_PIXELS};
use dinotrain::data::ImageFormat;

const KINDS: [&str; 7] = [
    "420",
    "422",
    "444",
    "progressive",
    "gray",
    "cmyk",
    "restart",
];

/// (values that differ, largest difference, mean signed difference) against Pillow's pixels.
fn compare(kind: &str) -> (usize, u8, f64) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jpeg-kinds");
    let bytes = std::fs::read(format!("{dir}/{kind}.jpg")).unwrap();
    let want = std::fs::read(format!("{dir}/{kind}.rgb")).unwrap();
    let img = decode(&bytes, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None).unwrap();
    assert_eq!((img.width, img.height), (41, 31), "{kind}");
    assert_eq!(img.data.len(), want.len(), "{kind}");
    let differ = img.data.iter().zip(&want).filter(|(a, b)| a != b).count();
    let max = (img.data.iter().zip(&want))
        .map(|(&a, &b)| a.abs_diff(b))
        .max()
        .unwrap_or(0);
    let bias = (img.data.iter().zip(&want))
        .map(|(&a, &b)| a as f64 - b as f64)
        .sum::<f64>()
        / want.len() as f64;
    (differ, max, bias)
}

#[test]
fn jpeg_pixels_against_libjpeg_turbo() {
    let n = 41 * 31 * 3;
    let mut report = Vec::new();
    for kind in KINDS {
        let (differ, max, bias) = compare(kind);
        report.push(format!(
            "{kind}: {differ}/{n} values differ ({:.1}%), max {max}, bias {bias:+.3}",
            100.0 * differ as f64 / n as f64
        ));
        // The most each kind may differ (measured; see README "JPEG decoding").
        let (max_share, max_level) = match kind {
            // CMYK: libjpeg cannot give RGB, so every build uses the pure-Rust decoder and the
            // image crate's CMYK -> RGB (Pillow converts with its own formula).
            "cmyk" => (0.02, 1),
            // Both libjpeg builds are libjpeg-turbo's islow IDCT and fancy upsampling. (The
            // pure-Rust zune-jpeg, the default before, differed on 19.2% of the values for
            // 4:2:0, progressive and restart markers, 12.7% for 4:2:2, 0.7% / 0.6% for 4:4:4 /
            // gray.)
            _ => (0.0, 0),
        };
        assert!(
            differ as f64 <= max_share * n as f64 && max <= max_level,
            "{}: {}",
            jpeg_decoder_name(),
            report.last().unwrap()
        );
    }
    eprintln!("{}:\n{}", jpeg_decoder_name(), report.join("\n"));
}
