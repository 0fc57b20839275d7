//! Colour transforms on 8-bit RGB pixels (`[H, W, 3]`), as torchvision computes them on PIL
//! images in the official pipeline: `ImageEnhance` blends for brightness, contrast and
//! saturation, a shift of the 8-bit hue channel of Pillow's HSV for hue, Pillow's `L`
//! conversion for grayscale, `ImageOps.solarize`.

/// Pillow's `Image.blend(degenerate, img, factor)` on 8-bit values: truncation toward zero,
/// clipped to [0, 255] (Pillow only clips when extrapolating; inside [0, 1] it cannot overflow).
#[inline]
fn blend(degenerate: u8, value: u8, factor: f32) -> u8 {
    let v = degenerate as f32 + factor * (value as f32 - degenerate as f32);
    if v <= 0.0 {
        0
    } else if v >= 255.0 {
        255
    } else {
        v as u8
    }
}

/// Pillow's 8-bit luma: `L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Applies a per-value map, tabulated once (exact: the map only depends on the value).
fn apply_table(pixels: &mut [u8], f: impl Fn(u8) -> u8) {
    let mut table = [0u8; 256];
    for (v, t) in table.iter_mut().enumerate() {
        *t = f(v as u8);
    }
    for v in pixels.iter_mut() {
        *v = table[*v as usize];
    }
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: a blend with black.
pub fn adjust_brightness(pixels: &mut [u8], factor: f32) {
    apply_table(pixels, |v| blend(0, v, factor));
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: a blend with the rounded mean luma.
pub fn adjust_contrast(pixels: &mut [u8], factor: f32) {
    let n = pixels.len() / 3;
    if n == 0 {
        return;
    }
    let sum: u64 = pixels
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    let mean = (sum as f64 / n as f64 + 0.5) as u8;
    apply_table(pixels, |v| blend(mean, v, factor));
}

/// `ImageEnhance.Color(img).enhance(factor)`: a blend with the pixel's own luma.
pub fn adjust_saturation(pixels: &mut [u8], factor: f32) {
    for p in pixels.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        for v in p.iter_mut() {
            *v = blend(l, *v, factor);
        }
    }
}

/// `a as f32 / b as f32` for all bytes a, b (b > 0): the same correctly rounded quotients as
/// the divisions, looked up (256 KiB, built once).
fn quotients() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..65536usize)
            .map(|i| {
                let (a, b) = (i >> 8, i & 255);
                if b == 0 {
                    0.0
                } else {
                    a as f32 / b as f32
                }
            })
            .collect()
    })
}

/// Pillow's RGB → HSV (each channel 8-bit). Pillow mixes float and double arithmetic (its
/// constants are doubles); the casts below follow it step by step so results match exactly.
#[inline]
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let div = quotients();
    let q = |a: u8, b: u8| div[(a as usize) << 8 | b as usize];
    let cr = maxc - minc;
    let s = q(cr, maxc);
    let rc = q(maxc - r, cr);
    let gc = q(maxc - g, cr);
    let bc = q(maxc - b, cr);
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    // fmod(x, 1) for x in [5/6, 11/6): subtracting 1 is exact there (and avoids a libm call).
    let x = h as f64 / 6.0 + 1.0;
    let h = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
    let to8 = |x: f32| ((x as f64 * 255.0) as i32).clamp(0, 255) as u8;
    (to8(h), to8(s), maxc)
}

/// Per-hue sector and fraction, per-saturation fraction: the divisions of Pillow's HSV → RGB
/// that depend on one channel only, computed once.
struct HsvTables {
    sector: [u8; 256],
    frac: [f32; 256],
    sat: [f32; 256],
}

fn hsv_tables() -> &'static HsvTables {
    static TABLES: std::sync::OnceLock<HsvTables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = HsvTables {
            sector: [0; 256],
            frac: [0.0; 256],
            sat: [0.0; 256],
        };
        for x in 0..256usize {
            let h6 = x as f64 * 6.0 / 255.0;
            let i = h6 as i32; // floor: h6 >= 0
            t.sector[x] = (i % 6) as u8;
            t.frac[x] = (h6 - i as f64) as f32;
            t.sat[x] = (x as f64 / 255.0) as f32;
        }
        t
    })
}

/// Pillow's HSV → RGB (each channel 8-bit), with Pillow's float/double mix.
#[inline]
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let tables = hsv_tables();
    let f = tables.frac[h as usize];
    let fs = tables.sat[s as usize];
    let vf = v as f64;
    // C's round() (half away from zero) for x in [0, 255], without a libm call: x - trunc(x)
    // is exact.
    let to8 = |x: f64| {
        let t = x as i32;
        (if x - t as f64 >= 0.5 { t + 1 } else { t }).clamp(0, 255) as u8
    };
    let p = to8(vf * (1.0 - fs as f64));
    let q = to8(vf * (1.0 - (fs * f) as f64));
    let t = to8(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
    match tables.sector[h as usize] {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// torchvision's `adjust_hue` on a PIL image: the 8-bit hue channel shifted (wrapping) by
/// `hue_factor · 255` truncated to an integer, `hue_factor` in [-0.5, 0.5].
pub fn adjust_hue(pixels: &mut [u8], hue_factor: f32) {
    let shift = (hue_factor * 255.0) as i32 as u8; // wraps like numpy's uint8 cast
    if shift == 0 {
        return;
    }
    for p in pixels.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let (r, g, b) = hsv_to_rgb(h.wrapping_add(shift), s, v);
        p[0] = r;
        p[1] = g;
        p[2] = b;
    }
}

/// `rgb_to_grayscale(img, num_output_channels=3)`: Pillow's luma in all three channels.
pub fn grayscale(pixels: &mut [u8]) {
    for p in pixels.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        p.fill(l);
    }
}

/// `ImageOps.solarize(img, threshold)`: values at or above the threshold are inverted.
pub fn solarize(pixels: &mut [u8], threshold: u8) {
    apply_table(pixels, |v| if v >= threshold { 255 - v } else { v });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trip_is_close_for_every_colour_sample() {
        let mut worst = 0i32;
        for r in (0..=255u32).step_by(5) {
            for g in (0..=255u32).step_by(7) {
                for b in (0..=255u32).step_by(11) {
                    let (h, s, v) = rgb_to_hsv(r as u8, g as u8, b as u8);
                    let (r2, g2, b2) = hsv_to_rgb(h, s, v);
                    for (x, y) in [(r, r2), (g, g2), (b, b2)] {
                        worst = worst.max((x as i32 - y as i32).abs());
                    }
                }
            }
        }
        // 8-bit hue and saturation lose up to a few levels; Pillow behaves the same.
        assert!(worst <= 8, "worst round-trip error {worst}");
    }

    #[test]
    fn primaries_have_the_expected_hues() {
        assert_eq!(rgb_to_hsv(255, 0, 0), (0, 255, 255));
        assert_eq!(rgb_to_hsv(0, 255, 0), (85, 255, 255));
        assert_eq!(rgb_to_hsv(0, 0, 255), (170, 255, 255));
        assert_eq!(rgb_to_hsv(10, 10, 10), (0, 0, 10));
    }

    #[test]
    fn blends_match_pillow_arithmetic() {
        let mut p = vec![100u8, 200, 50];
        adjust_brightness(&mut p, 1.3);
        assert_eq!(p, vec![130, 255, 65]);
        let mut p = vec![100u8, 200, 50];
        adjust_brightness(&mut p, 0.7);
        // 0.7 · 100 = 70.00000x in f32 → 70; 0.7 · 50 = 35.
        assert_eq!(p, vec![70, 140, 35]);
        let mut p = vec![10u8, 20, 30, 200, 210, 220];
        grayscale(&mut p);
        assert_eq!(p[0], luma(10, 20, 30));
        assert_eq!(p[3..], [luma(200, 210, 220); 3]);
        let mut p = vec![0u8, 127, 128, 255];
        solarize(&mut p, 128);
        assert_eq!(p, vec![0, 127, 127, 0]);
    }
}
