//! Bicubic resampling of an 8-bit RGB region, as Pillow's `Image.resize(size, BICUBIC)` on a
//! cropped image computes it (the official pipeline works on PIL images): a separable filter
//! with a = -0.5, widened by the scale factor when shrinking (antialiasing), weights normalised
//! and rounded to 22-bit fixed point, the horizontal pass first, 8-bit rounding in between.

/// Pillow's fixed-point precision for 8-bit images: 32 bits minus 8 for the value, 2 for headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of the bicubic kernel at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// A rectangle inside an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The bicubic kernel with a = -0.5 (Pillow's choice; PyTorch tensors use -0.75).
pub fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for resampling `in_size` samples to `out_size`: for output `i`,
/// taps `weights[i * taps .. i * taps + count[i]]` apply to inputs `first[i] ..`.
pub struct Taps {
    pub first: Vec<u32>,
    pub count: Vec<u32>,
    /// Taps per output (the row stride of `weights`).
    pub taps: usize,
    pub weights: Vec<i32>,
}

impl Taps {
    pub fn bicubic(in_size: u32, out_size: u32) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = BICUBIC_SUPPORT * filter_scale;
        let taps = support.ceil() as usize * 2 + 1;
        let mut first = Vec::with_capacity(out_size as usize);
        let mut count = Vec::with_capacity(out_size as usize);
        let mut weights = vec![0i32; taps * out_size as usize];
        let mut k = vec![0f64; taps];
        for i in 0..out_size as usize {
            let center = (i as f64 + 0.5) * scale;
            // `as i64` truncates toward zero like Pillow's `(int)` cast.
            let lo = ((center - support + 0.5) as i64).max(0);
            let hi = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (hi - lo).max(0) as usize;
            let mut sum = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(n) {
                let w = bicubic_kernel((x as f64 + lo as f64 - center + 0.5) / filter_scale);
                *kx = w;
                sum += w;
            }
            let row = &mut weights[i * taps..i * taps + n];
            for (dst, &kx) in row.iter_mut().zip(&k[..n]) {
                let kx = if sum != 0.0 { kx / sum } else { kx };
                let scaled = kx * (1i64 << PRECISION_BITS) as f64;
                *dst = if kx < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            first.push(lo as u32);
            count.push(n as u32);
        }
        Taps {
            first,
            count,
            taps,
            weights,
        }
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples `region` of `src` (`[H, W, 3]`, `src_width` wide) to `dst` (`[out_h, out_w, 3]`).
/// `tmp` is scratch space, grown as needed.
pub fn resize_bicubic(
    dst: &mut [u8],
    tmp: &mut Vec<u8>,
    src: &[u8],
    src_width: u32,
    region: Rect,
    out_w: u32,
    out_h: u32,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { resize_avx2(dst, tmp, src, src_width, region, out_w, out_h) };
        return;
    }
    resize_passes(dst, tmp, src, src_width, region, out_w, out_h);
}

/// The same code compiled with AVX2 (8 lanes of 32-bit multiplies): integer arithmetic, so the
/// results are identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn resize_avx2(
    dst: &mut [u8],
    tmp: &mut Vec<u8>,
    src: &[u8],
    src_width: u32,
    region: Rect,
    out_w: u32,
    out_h: u32,
) {
    resize_passes(dst, tmp, src, src_width, region, out_w, out_h);
}

#[inline(always)]
fn resize_passes(
    dst: &mut [u8],
    tmp: &mut Vec<u8>,
    src: &[u8],
    src_width: u32,
    region: Rect,
    out_w: u32,
    out_h: u32,
) {
    let (rw, rh) = (region.width as usize, region.height as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let sw = src_width as usize;
    debug_assert_eq!(dst.len(), ow * oh * 3);
    let tx = Taps::bicubic(region.width, out_w);
    let ty = Taps::bicubic(region.height, out_h);
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass over the region's rows: [rh, ow, 3].
    tmp.clear();
    tmp.resize(rh * ow * 3, 0);
    for y in 0..rh {
        let row = &src[((region.y as usize + y) * sw + region.x as usize) * 3..][..rw * 3];
        let out = &mut tmp[y * ow * 3..][..ow * 3];
        for (x, o) in out.chunks_exact_mut(3).enumerate() {
            let lo = tx.first[x] as usize;
            let n = tx.count[x] as usize;
            let w = &tx.weights[x * tx.taps..][..n];
            let window = &row[lo * 3..(lo + n) * 3];
            let (mut r, mut g, mut b) = (half, half, half);
            for (p, &wk) in window.chunks_exact(3).zip(w) {
                r += p[0] as i32 * wk;
                g += p[1] as i32 * wk;
                b += p[2] as i32 * wk;
            }
            o[0] = clip8(r);
            o[1] = clip8(g);
            o[2] = clip8(b);
        }
    }
    // Vertical pass: [oh, ow, 3].
    let mut acc = vec![0i32; ow * 3];
    for (y, out) in dst.chunks_exact_mut(ow * 3).take(oh).enumerate() {
        let lo = ty.first[y] as usize;
        let n = ty.count[y] as usize;
        let w = &ty.weights[y * ty.taps..][..n];
        acc.fill(half);
        for (k, &wk) in w.iter().enumerate() {
            let row = &tmp[(lo + k) * ow * 3..][..ow * 3];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * wk;
            }
        }
        for (d, &a) in out.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_interpolating_and_sums_to_one_on_integer_shifts() {
        assert_eq!(bicubic_kernel(0.0), 1.0);
        assert_eq!(bicubic_kernel(1.0), 0.0);
        assert_eq!(bicubic_kernel(2.0), 0.0);
        for &t in &[0.1, 0.25, 0.5, 0.9] {
            let s: f64 = (-3..=3).map(|k| bicubic_kernel(t + k as f64)).sum();
            assert!((s - 1.0).abs() < 1e-12, "t={t} sum={s}");
        }
    }

    #[test]
    fn same_size_is_the_identity_and_constant_stays_constant() {
        let (w, h) = (7u32, 5u32);
        let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let mut tmp = Vec::new();
        let all = Rect {
            x: 0,
            y: 0,
            width: w,
            height: h,
        };
        resize_bicubic(&mut dst, &mut tmp, &src, w, all, w, h);
        assert_eq!(dst, src);
        let flat = vec![77u8; (w * h * 3) as usize];
        let mut out = vec![0u8; 3 * 11 * 3];
        resize_bicubic(&mut out, &mut tmp, &flat, w, all, 3, 11);
        assert!(out.iter().all(|&v| v == 77));
    }
}
