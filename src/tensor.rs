//! A minimal dense, row-major, CPU-resident f32 tensor.
//!
//! The engine is not a tensor library: layers work on flat slices with explicit dimensions
//! (llm.c style). `Tensor` only carries a shape next to its data where a shape must travel
//! (fixtures, parameters, checkpoints).

use crate::error::{Error, Result};

/// Dense row-major f32 tensor.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Wraps `data`, checking that it holds exactly `shape.product()` values.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("shape {shape:?} needs {n} values, got {}", data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A scalar stored with shape `[1]` (the fixtures' convention).
    pub fn scalar(value: f32) -> Self {
        Tensor {
            shape: vec![1],
            data: vec![value],
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}
