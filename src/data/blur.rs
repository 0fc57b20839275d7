//! Gaussian blur as torchvision's `GaussianBlur(kernel_size, sigma)` computes it on a PIL image:
//! the image becomes a float32 tensor, is padded by reflection (`reflect`: the edge pixel is
//! not repeated), convolved with the normalised 1-D kernel in both directions, rounded to the
//! nearest integer and stored as 8-bit again.

/// The normalised 1-D Gaussian: taps at `-(k-1)/2 ..= (k-1)/2`, float32 like torchvision.
pub fn gaussian_kernel(kernel_size: usize, sigma: f32) -> Vec<f32> {
    let half = (kernel_size as f32 - 1.0) * 0.5;
    let pdf: Vec<f32> = (0..kernel_size)
        .map(|i| {
            let x = (i as f32 - half) / sigma;
            (-0.5 * x * x).exp()
        })
        .collect();
    let sum: f32 = pdf.iter().sum();
    pdf.iter().map(|p| p / sum).collect()
}

/// Index `i` in `0..n` after reflection padding (`-1 → 1`, `n → n-2`). Sizes smaller than the
/// padding (which torch refuses) keep reflecting until the index lands inside.
#[inline]
pub fn reflect(mut i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i;
        } else if i >= n {
            i = 2 * (n - 1) - i;
        } else {
            return i as usize;
        }
    }
}

/// `torch.round` (half to even) for 0 <= x < 2^23 without a libm call: adding 2^23 leaves no
/// fraction bits, so the FPU's default rounding (to nearest, ties to even) does the work.
#[inline]
fn round_half_even(x: f32) -> f32 {
    const SHIFT: f32 = 8_388_608.0;
    (x + SHIFT) - SHIFT
}

/// Blurs `pixels` (`[H, W, 3]`) in place; `tmp` is scratch space.
pub fn gaussian_blur(
    pixels: &mut [u8],
    tmp: &mut Vec<f32>,
    width: usize,
    height: usize,
    kernel_size: usize,
    sigma: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { blur_avx2(pixels, tmp, width, height, kernel_size, sigma) };
        return;
    }
    blur_passes(pixels, tmp, width, height, kernel_size, sigma);
}

/// The same code compiled with AVX2 (no FMA: products and sums round exactly as without it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn blur_avx2(
    pixels: &mut [u8],
    tmp: &mut Vec<f32>,
    width: usize,
    height: usize,
    kernel_size: usize,
    sigma: f32,
) {
    blur_passes(pixels, tmp, width, height, kernel_size, sigma);
}

#[inline(always)]
fn blur_passes(
    pixels: &mut [u8],
    tmp: &mut Vec<f32>,
    width: usize,
    height: usize,
    kernel_size: usize,
    sigma: f32,
) {
    let k = gaussian_kernel(kernel_size, sigma);
    let half = (kernel_size / 2) as isize;
    // Vertical pass into float: [H, W, 3].
    tmp.clear();
    tmp.resize(width * height * 3, 0.0);
    let row_len = width * 3;
    for y in 0..height {
        let out = &mut tmp[y * row_len..][..row_len];
        for (t, &kt) in k.iter().enumerate() {
            let sy = reflect(y as isize + t as isize - half, height);
            let row = &pixels[sy * row_len..][..row_len];
            for (o, &p) in out.iter_mut().zip(row) {
                *o += kt * p as f32;
            }
        }
    }
    // Horizontal pass back to 8-bit, over a reflect-padded copy of each row.
    let pad = half as usize;
    let mut padded = vec![0f32; (width + 2 * pad) * 3];
    for y in 0..height {
        let row = &tmp[y * row_len..][..row_len];
        for (px, dst) in padded.chunks_exact_mut(3).enumerate() {
            let sx = reflect(px as isize - half, width);
            dst.copy_from_slice(&row[sx * 3..sx * 3 + 3]);
        }
        let out = &mut pixels[y * row_len..][..row_len];
        for (x, o) in out.chunks_exact_mut(3).enumerate() {
            let window = &padded[x * 3..(x + kernel_size) * 3];
            let mut acc = [0f32; 3];
            for (&kt, p) in k.iter().zip(window.chunks_exact(3)) {
                acc[0] += kt * p[0];
                acc[1] += kt * p[1];
                acc[2] += kt * p[2];
            }
            for c in 0..3 {
                o[c] = round_half_even(acc[c]).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_does_not_repeat_the_edge() {
        assert_eq!(reflect(-1, 5), 1);
        assert_eq!(reflect(-4, 5), 4);
        assert_eq!(reflect(5, 5), 3);
        assert_eq!(reflect(8, 5), 0);
        assert_eq!(reflect(2, 5), 2);
        assert_eq!(reflect(-7, 3), 1);
        assert_eq!(reflect(3, 1), 0);
    }

    #[test]
    fn kernel_is_normalised_symmetric_and_peaked() {
        let k = gaussian_kernel(9, 1.3);
        assert_eq!(k.len(), 9);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for i in 0..4 {
            assert_eq!(k[i], k[8 - i]);
            assert!(k[i] < k[i + 1]);
        }
    }

    #[test]
    fn rounding_is_half_to_even() {
        for (x, r) in [
            (0.5f32, 0.0f32),
            (1.5, 2.0),
            (2.5, 2.0),
            (2.4999, 2.0),
            (254.5, 254.0),
            (3.7, 4.0),
        ] {
            assert_eq!(round_half_even(x), r, "{x}");
            assert_eq!(x.round_ties_even(), r);
        }
    }

    #[test]
    fn constant_image_is_unchanged() {
        let mut p = vec![93u8; 6 * 4 * 3];
        let mut tmp = Vec::new();
        gaussian_blur(&mut p, &mut tmp, 6, 4, 9, 2.0);
        assert!(p.iter().all(|&v| v == 93));
    }
}
