//! The shapes and modes backend operations take, shared by every backend (so the model is
//! written once against them).

use crate::error::{Error, Result};

/// Whether a GEMM operand is stored transposed relative to its role in the product (a
/// `Linear` weight `[out, in]` is the right operand of `x · Wᵀ`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    No,
    Yes,
}

/// What happens to the previous contents of an output (llm.c's gradient contract: parameter
/// gradients and the residual stream accumulate, other activation gradients are written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// `C = A·B`
    Overwrite,
    /// `C += A·B`
    Add,
}

/// `C [m, n] (=|+=) op(A) [m, k] · op(B) [k, n]`, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub ta: Transpose,
    pub tb: Transpose,
    pub acc: Accumulate,
}

impl Gemm {
    /// `C = A · B` with neither operand transposed.
    pub fn nn(m: usize, k: usize, n: usize) -> Self {
        Gemm {
            m,
            k,
            n,
            ta: Transpose::No,
            tb: Transpose::No,
            acc: Accumulate::Overwrite,
        }
    }

    /// The same product with transposes `ta`, `tb`.
    pub fn t(self, ta: Transpose, tb: Transpose) -> Self {
        Gemm { ta, tb, ..self }
    }

    /// The same product accumulating (`+=`) or not.
    pub fn acc(self, acc: Accumulate) -> Self {
        Gemm { acc, ..self }
    }
}

/// `batch` products of one shape with element strides between consecutive operands (0 = the
/// same operand for every product).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmBatch {
    pub gemm: Gemm,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl GemmBatch {
    /// One product.
    pub fn single(gemm: Gemm) -> Self {
        GemmBatch {
            gemm,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }
}

/// The sizes of one linear layer call: `rows` rows, `in_dim` → `out_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub rows: usize,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// Rows and channels of a LayerNorm call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    pub rows: usize,
    pub channels: usize,
}

/// One attention call: `batch` sequences of `tokens`, `heads` of `head_dim` (qkv is
/// `[batch, tokens, 3, heads, head_dim]`, the output `[batch, tokens, heads·head_dim]`, the
/// saved log-sum-exp `[batch, heads, tokens]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// `[B, T, 3, H, hd]`
    pub fn qkv_len(&self) -> usize {
        self.batch * self.tokens * 3 * self.heads * self.head_dim
    }

    /// `[B, T, H·hd]`
    pub fn out_len(&self) -> usize {
        self.batch * self.tokens * self.heads * self.head_dim
    }

    /// `[B, H, T]`
    pub fn stats_len(&self) -> usize {
        self.batch * self.heads * self.tokens
    }

    /// The softmax scale `hd^-0.5`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Token counts of one backbone input: `tokens = 1 + registers + patches` per image, in the
/// order `[cls, reg_0.., patch_0..]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenLayout {
    pub batch: usize,
    pub patches: usize,
    pub registers: usize,
    pub channels: usize,
}

impl TokenLayout {
    pub fn tokens(&self) -> usize {
        1 + self.registers + self.patches
    }
}

/// Where gathered rows live: `crops` crops of `tokens` token rows, row `p` of a crop's
/// selection at token row `token_offset + p`, `patches` selectable rows per crop. Flat indices
/// `crop · patches + p` pick rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchLayout {
    pub crops: usize,
    pub tokens: usize,
    pub patches: usize,
    pub token_offset: usize,
    pub channels: usize,
}

impl PatchLayout {
    /// Checks the layout and that `indices` are strictly increasing inside it.
    pub fn check(&self, op: &'static str, indices: &[i64]) -> Result<()> {
        if self.token_offset + self.patches > self.tokens {
            return Err(Error::shape(
                op,
                format!("{self:?}: patches do not fit the token rows"),
            ));
        }
        let limit = (self.crops * self.patches) as i64;
        let mut previous = -1i64;
        for &i in indices {
            if i <= previous || i >= limit {
                return Err(Error::shape(
                    op,
                    format!(
                        "row indices must be strictly increasing in [0, {limit}); got {i} after {previous}"
                    ),
                ));
            }
            previous = i;
        }
        Ok(())
    }

    /// The token row of flat selection index `i`.
    pub fn token_row(&self, i: usize) -> usize {
        (i / self.patches) * self.tokens + self.token_offset + i % self.patches
    }
}

/// Checks buffer lengths: each `(name, len, expected)`, the first mismatch an [`Error::Shape`].
pub fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<()> {
    match lens.iter().find(|(_, len, want)| len != want) {
        Some((name, len, want)) => Err(Error::shape(
            op,
            format!("{name} holds {len} elements, expected {want}"),
        )),
        None => Ok(()),
    }
}

/// [`check_lens`] of one buffer.
pub fn check_len(op: &'static str, name: &str, len: usize, want: usize) -> Result<()> {
    check_lens(op, &[(name, len, want)])
}

/// The eps added to a gradient norm before clipping (`clip_grad_norm_`'s 1e-6).
pub const CLIP_EPS: f64 = 1e-6;

/// The hyper-parameters of one AdamW step (counted from 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step: u64,
}

/// Numeric precision of a training run (DESIGN.md: one policy for both backends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere (the golden fixtures' precision).
    #[default]
    F32,
    /// bf16 GEMM operands and activations that only feed GEMMs, with f32 accumulation; f32
    /// master weights, optimizer state, LayerNorm statistics, softmax, losses, Sinkhorn-Knopp
    /// and KoLeo.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(Error::Config(format!(
                "unknown precision '{s}' (expected f32 or bf16)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_layout_maps_selection_indices_to_token_rows() {
        let l = PatchLayout {
            crops: 2,
            tokens: 7,
            patches: 4,
            token_offset: 3,
            channels: 1,
        };
        assert_eq!(l.token_row(0), 3);
        assert_eq!(l.token_row(5), 7 + 3 + 1);
        assert!(l.check("t", &[0, 2, 7]).is_ok());
        assert!(l.check("t", &[2, 2]).is_err());
        assert!(l.check("t", &[8]).is_err());
    }

    #[test]
    fn precision_parses_its_spellings() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("FP32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("fp8".parse::<Precision>().is_err());
    }
}
