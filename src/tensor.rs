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

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![value; shape.iter().product()],
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

    /// Same data, new shape (same element count).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.data.len() {
            return Err(Error::shape(
                "Tensor::reshape",
                format!("{:?} -> {shape:?}", self.shape),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Checks the shape, naming `what` in the error.
    pub fn expect_shape(&self, what: &'static str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::shape(
                what,
                format!("expected {shape:?}, got {:?}", self.shape),
            ));
        }
        Ok(())
    }

    /// Euclidean norm, accumulated in f64.
    pub fn norm(&self) -> f64 {
        self.data
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    }
}
