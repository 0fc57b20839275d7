//! Shared helpers of the backend kernel tests (`tests/kernels.rs`, `tests/ssl_kernels.rs`):
//! the backends a check runs on, host ↔ backend buffers, the bound of an assertion on each
//! backend, and (in [`reference`]) the f64 references the checks compare with.
//!
//! A check is a generic `fn check_xxx<B: Backend>(be: &mut B, tol: Tol)`: it runs the operation
//! through the trait on backend buffers, downloads, and compares with the reference. Each test
//! runs it on the CPU (f32, bounds capped by [`Tol::f32`]) and on CUDA when a device opens
//! ([`gpu`] says why not otherwise), with each assertion's CUDA bound as written.

#![allow(dead_code)] // each test binary uses a different subset

#[path = "../cuda_support/mod.rs"]
mod cuda_support;
pub mod reference;

#[allow(unused_imports)] // each test binary uses a different subset
pub use cuda_support::{assert_close, gpu, randn, rel_err, round_bf16, to_f64, uniform};
use dinotrain::backend::cpu::CpuBackend;
use dinotrain::backend::{Buffers, Precision};

/// The CPU backend in f32 (the reference precision).
pub fn cpu() -> CpuBackend {
    CpuBackend::new(Precision::F32)
}

/// The bound of an assertion on a backend. Checks state each assertion's CUDA bound (bf16
/// operands, where the bf16 rounding of an output dominates) through [`Tol::at`]; a backend
/// that computes in f32 is held to the smaller of that and its cap.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    cap: f64,
}

impl Tol {
    /// Every assertion at its CUDA bound.
    pub const CUDA: Tol = Tol { cap: f64::INFINITY };

    /// An f32 backend: no assertion looser than `cap`.
    pub fn f32(cap: f64) -> Tol {
        Tol { cap }
    }

    /// The bound of an assertion whose CUDA bound is `cuda`.
    pub fn at(self, cuda: f64) -> f64 {
        cuda.min(self.cap)
    }
}

/// An f32 buffer holding `v`.
pub fn up<B: Buffers>(be: &mut B, v: &[f32]) -> B::BufF32 {
    let mut buf = be.alloc_f32(v.len()).unwrap();
    be.upload_f32(&mut buf, v).unwrap();
    buf
}

/// An operand buffer holding `v` (rounded to the backend's operand precision).
pub fn up_half<B: Buffers>(be: &mut B, v: &[f32]) -> B::BufHalf {
    let mut buf = be.alloc_half(v.len()).unwrap();
    be.upload_half(&mut buf, v).unwrap();
    buf
}

pub fn up_i64<B: Buffers>(be: &mut B, v: &[i64]) -> B::BufI64 {
    let mut buf = be.alloc_i64(v.len()).unwrap();
    be.upload_i64(&mut buf, v).unwrap();
    buf
}

pub fn up_u8<B: Buffers>(be: &mut B, v: &[u8]) -> B::BufU8 {
    let mut buf = be.alloc_u8(v.len()).unwrap();
    be.upload_u8(&mut buf, v).unwrap();
    buf
}

/// An f32 buffer of `n` values, every one NaN (an output that must be overwritten).
pub fn nans<B: Buffers>(be: &mut B, n: usize) -> B::BufF32 {
    up(be, &vec![f32::NAN; n])
}

/// An operand buffer of `n` NaNs.
pub fn nans_half<B: Buffers>(be: &mut B, n: usize) -> B::BufHalf {
    up_half(be, &vec![f32::NAN; n])
}

pub fn down<B: Buffers>(be: &mut B, buf: &B::F32) -> Vec<f32> {
    be.download_f32(buf).unwrap()
}

pub fn down_half<B: Buffers>(be: &mut B, buf: &B::Half) -> Vec<f32> {
    be.download_half(buf).unwrap()
}

/// Whether the backend rounds what it writes into operand buffers to bf16.
pub fn rounds_operands<B: Buffers>(be: &B) -> bool {
    be.precision() == Precision::Bf16
}

/// `reference` as an operand output of `be` holds it: rounded once to bf16 under bf16
/// precision, unchanged in f32.
pub fn as_operand<B: Buffers>(be: &B, reference: &[f64]) -> Vec<f64> {
    if rounds_operands(be) {
        reference::rounded_bf16(reference)
    } else {
        reference.to_vec()
    }
}

/// `v` as an operand buffer of `be` holds it (f32 values).
pub fn operand_values<B: Buffers>(be: &B, v: &[f32]) -> Vec<f32> {
    if rounds_operands(be) {
        round_bf16(v)
    } else {
        v.to_vec()
    }
}

/// Asserts `|out − ref| <= abs + rel · |ref|` for every element.
pub fn assert_each_close(name: &str, out: &[f32], reference: &[f64], abs: f64, rel: f64) {
    assert_eq!(out.len(), reference.len(), "{name}: length mismatch");
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        assert!(
            (o as f64 - r).abs() <= abs + rel * r.abs(),
            "{name}[{i}]: {o} vs {r} (bound {abs:e} + {rel:e}·|ref|)"
        );
    }
}

/// The bits of `v`, for bit-for-bit comparisons.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
