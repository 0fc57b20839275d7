//! AdamW over the flat parameter buffer with explicit, checkpointable state.
//!
//! One global step counter: every parameter receives a gradient every step (frozen parameters get
//! lr 0, never a dropped gradient), so per-parameter counters would all be equal. Group lr and
//! weight decay are written every step from the schedules, as the official loop does:
//! `lr_g = (last_layer_lr if is_last_layer else lr) · lr_multiplier`, `wd_g = wd · wd_multiplier`.

use super::param_groups::{GroupSettings, ParamGroups};
use crate::backend::cpu::optimizer::{adamw_step_segments, AdamHyper, AdamwSegment};
use crate::error::{Error, Result};
use crate::nn::params::{ParamRef, ParamTable};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// The optimizer state a checkpoint saves: both moments (`[P]`, the flat layout) and the number
/// of steps taken.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamWState {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub step: u64,
}

impl AdamWState {
    /// Zero moments for `n` parameters, step 0.
    pub fn zeros(n: usize) -> Self {
        AdamWState {
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            step: 0,
        }
    }

    /// Named tensors for a checkpoint: `exp_avg.<name>`, `exp_avg_sq.<name>` per parameter and
    /// `step` (`[1]`, as f32: exact up to 2^24 steps).
    pub fn export(&self, table: &ParamTable) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in table.specs() {
            for (prefix, buf) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
                out.insert(
                    format!("{prefix}.{}", s.name),
                    Tensor {
                        shape: s.shape.clone(),
                        data: buf[s.at.range()].to_vec(),
                    },
                );
            }
        }
        out.insert("step".into(), Tensor::scalar(self.step as f32));
        out
    }

    /// The inverse of [`AdamWState::export`]; every tensor must be present with its shape.
    pub fn import(
        table: &ParamTable,
        tensors: &BTreeMap<String, Tensor>,
        source: &str,
    ) -> Result<Self> {
        let mut state = AdamWState::zeros(table.len());
        for s in table.specs() {
            for (prefix, buf) in [
                ("exp_avg", &mut state.exp_avg),
                ("exp_avg_sq", &mut state.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", s.name);
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Config(format!("{source}: optimizer state '{key}' is missing"))
                })?;
                if t.shape != s.shape {
                    return Err(Error::Config(format!(
                        "{source}: optimizer state '{key}' has shape {:?}, expected {:?}",
                        t.shape, s.shape
                    )));
                }
                buf[s.at.range()].copy_from_slice(&t.data);
            }
        }
        let step = tensors
            .get("step")
            .and_then(|t| t.data.first().copied())
            .ok_or_else(|| Error::Config(format!("{source}: optimizer 'step' is missing")))?;
        if !(step >= 0.0 && step.fract() == 0.0) {
            return Err(Error::Config(format!(
                "{source}: optimizer step {step} is not a count"
            )));
        }
        state.step = step as u64;
        Ok(state)
    }
}

/// AdamW over a flat buffer, each parameter with its group settings.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub hyper: AdamHyper,
    pub state: AdamWState,
    /// Where each parameter lives and its settings.
    params: Vec<(ParamRef, GroupSettings)>,
    len: usize,
}

impl AdamW {
    /// An optimizer for every parameter of `table` with the settings of `groups` (built from the
    /// same table) and fresh state.
    pub fn new(table: &ParamTable, groups: &ParamGroups, hyper: AdamHyper) -> Result<Self> {
        if groups.per_param.len() != table.specs().len() {
            return Err(Error::shape(
                "AdamW::new",
                format!(
                    "{} group settings for {} parameters",
                    groups.per_param.len(),
                    table.specs().len()
                ),
            ));
        }
        let params = table
            .specs()
            .iter()
            .zip(&groups.per_param)
            .map(|(s, &g)| (s.at, g))
            .collect();
        Self::from_parts(params, table.len(), hyper)
    }

    /// An optimizer over `len` flat values with explicit per-range settings.
    pub fn from_parts(
        params: Vec<(ParamRef, GroupSettings)>,
        len: usize,
        hyper: AdamHyper,
    ) -> Result<Self> {
        if let Some((r, _)) = params.iter().find(|(r, _)| r.offset + r.len > len) {
            return Err(Error::shape(
                "AdamW::from_parts",
                format!("parameter {}..{} exceeds {len}", r.offset, r.offset + r.len),
            ));
        }
        Ok(AdamW {
            hyper,
            state: AdamWState::zeros(len),
            params,
            len,
        })
    }

    /// One step with this iteration's scheduled values. Advances the step count, then updates
    /// every parameter (weights, moments), including those whose lr is 0.
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        last_layer_lr: f64,
        wd: f64,
    ) -> Result<()> {
        if params.len() != self.len || self.state.exp_avg.len() != self.len {
            return Err(Error::shape(
                "AdamW::step",
                format!(
                    "{} parameters, optimizer built for {}",
                    params.len(),
                    self.len
                ),
            ));
        }
        let segments: Vec<AdamwSegment> = self
            .params
            .iter()
            .map(|(r, g)| AdamwSegment {
                offset: r.offset,
                len: r.len,
                lr: ((if g.is_last_layer { last_layer_lr } else { lr }) * g.lr_multiplier) as f32,
                weight_decay: (wd * g.wd_multiplier) as f32,
            })
            .collect();
        self.state.step += 1;
        adamw_step_segments(
            params,
            grads,
            &mut self.state.exp_avg,
            &mut self.state.exp_avg_sq,
            &segments,
            &self.hyper,
            self.state.step,
        )
    }
}
