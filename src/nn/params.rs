//! The parameter table: every trainable tensor of a model, in one flat f32 buffer.
//!
//! Layers do not own vectors; they hold [`ParamRef`]s (offset and length into the flat buffer)
//! and read `&params[r.range()]`. Gradients, AdamW moments and the EMA teacher are flat buffers
//! of the same length and layout, so clipping, AdamW, EMA and checkpointing are one pass each
//! (llm.c's layout). Names are the official DINOv2 state-dict keys, prefixed by the submodule
//! (`backbone.blocks.0.attn.qkv.weight`, `dino_head.last_layer.weight_g`); the optimizer's
//! parameter groups derive from these names.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rand::Rng as _;
use rand_distr::{Distribution, StandardNormal};
use std::collections::BTreeMap;
use std::ops::Range;

/// How a parameter is initialised (official init, spec section 1.8 and 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    /// Every element set to this value (LayerNorm weight 1, LayerScale 1e-5, weight_g 1).
    Const(f32),
    /// Normal(0, std) truncated at ±2 absolute (`torch.nn.init.trunc_normal_` defaults).
    TruncNormal {
        std: f32,
    },
    /// Normal(0, std).
    Normal {
        std: f32,
    },
    /// Uniform(−bound, bound) (PyTorch's default Conv2d / Linear init).
    Uniform {
        bound: f32,
    },
}

/// Where a parameter lives in the flat buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamRef {
    pub offset: usize,
    pub len: usize,
}

impl ParamRef {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// One parameter: its official key (with submodule prefix), shape, init and place.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub at: ParamRef,
}

impl ParamSpec {
    /// The submodule: the part of the name before the first dot (`backbone`, `dino_head`, ...).
    pub fn submodule(&self) -> &str {
        self.name.split('.').next().unwrap_or("")
    }
}

/// Every parameter of a model, in registration order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamTable {
    specs: Vec<ParamSpec>,
    index: BTreeMap<String, usize>,
    total: usize,
}

impl ParamTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a parameter and returns where it lives. Names must be unique.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> ParamRef {
        let name = name.into();
        let len = shape.iter().product();
        let at = ParamRef {
            offset: self.total,
            len,
        };
        assert!(
            !self.index.contains_key(&name),
            "parameter {name} registered twice"
        );
        self.index.insert(name.clone(), self.specs.len());
        self.specs.push(ParamSpec {
            name,
            shape: shape.to_vec(),
            init,
            at,
        });
        self.total += len;
        at
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// All parameters in registration order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.index.get(name).map(|&i| &self.specs[i])
    }

    /// A fresh flat buffer initialised per spec, drawing from `rng` in registration order.
    pub fn init(&self, rng: &mut crate::rng::Rng) -> Vec<f32> {
        let mut data = vec![0f32; self.total];
        for spec in &self.specs {
            let dst = &mut data[spec.at.range()];
            match spec.init {
                Init::Zeros => dst.fill(0.0),
                Init::Const(v) => dst.fill(v),
                Init::Normal { std } => {
                    for x in dst {
                        let z: f64 = StandardNormal.sample(rng);
                        *x = (z * std as f64) as f32;
                    }
                }
                Init::TruncNormal { std } => {
                    for x in dst {
                        *x = loop {
                            let z: f64 = StandardNormal.sample(rng);
                            let v = z * std as f64;
                            if (-2.0..=2.0).contains(&v) {
                                break v as f32;
                            }
                        };
                    }
                }
                Init::Uniform { bound } => {
                    for x in dst {
                        *x = rng.random_range(-bound..=bound);
                    }
                }
            }
        }
        data
    }

    /// Copies named tensors into `flat`. Every parameter must be present with its exact shape
    /// (a trailing/leading size-1 difference is an error too: checkpoints must match).
    /// `source` names the origin (a file) in errors.
    pub fn load(
        &self,
        flat: &mut [f32],
        tensors: &BTreeMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        for spec in &self.specs {
            let t = tensors.get(&spec.name).ok_or_else(|| {
                Error::Config(format!("{source}: parameter '{}' is missing", spec.name))
            })?;
            if t.shape != spec.shape {
                return Err(Error::Config(format!(
                    "{source}: parameter '{}' has shape {:?}, the model needs {:?}",
                    spec.name, t.shape, spec.shape
                )));
            }
            flat[spec.at.range()].copy_from_slice(&t.data);
        }
        Ok(())
    }

    /// Named tensors copied out of `flat`.
    pub fn export(&self, flat: &[f32]) -> BTreeMap<String, Tensor> {
        self.specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Tensor {
                        shape: s.shape.clone(),
                        data: flat[s.at.range()].to_vec(),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_contiguous_and_load_checks_names_and_shapes() {
        let mut t = ParamTable::new();
        let a = t.push("backbone.a", &[2, 3], Init::Const(1.0));
        let b = t.push("dino_head.b", &[4], Init::Zeros);
        assert_eq!(
            (a.offset, a.len, b.offset, b.len, t.len()),
            (0, 6, 6, 4, 10)
        );
        assert_eq!(t.get("dino_head.b").unwrap().submodule(), "dino_head");
        let mut flat = t.init(&mut crate::rng::keyed(0, &[]));
        assert_eq!(&flat[..6], &[1.0; 6]);
        let mut named = t.export(&flat);
        named.get_mut("dino_head.b").unwrap().data = vec![5.0; 4];
        t.load(&mut flat, &named, "test").unwrap();
        assert_eq!(&flat[6..], &[5.0; 4]);
        named.get_mut("backbone.a").unwrap().shape = vec![3, 2];
        let err = t.load(&mut flat, &named, "ckpt.safetensors").unwrap_err();
        assert!(err.to_string().contains("backbone.a"), "{err}");
        named.remove("backbone.a");
        assert!(t.load(&mut flat, &named, "x").is_err());
    }

    #[test]
    fn trunc_normal_stays_within_two_absolute() {
        let mut t = ParamTable::new();
        t.push("w", &[10_000], Init::TruncNormal { std: 1.5 });
        let flat = t.init(&mut crate::rng::keyed(1, &[]));
        assert!(flat.iter().all(|v| v.abs() <= 2.0));
        let var = flat.iter().map(|v| (v * v) as f64).sum::<f64>() / flat.len() as f64;
        assert!(var > 0.5 && var < 2.25, "{var}");
    }
}
