//! AdamW over the flat parameter buffer with explicit, checkpointable state, on a backend.
//!
//! One global step counter: every parameter receives a gradient every step (frozen parameters get
//! lr 0, never a dropped gradient), so per-parameter counters would all be equal. Group lr and
//! weight decay are written every step from the schedules, as the official loop does:
//! `lr_g = (last_layer_lr if is_last_layer else lr) · lr_multiplier`, `wd_g = wd · wd_multiplier`.

use super::param_groups::{GroupSettings, ParamGroups};
use crate::backend::{AdamWBuffers, AdamWStep, Backend, Storage};
use crate::error::{Error, Result};
use crate::nn::params::{ParamRef, ParamTable};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// AdamW constants shared by every parameter, in f64 like PyTorch's Python floats (the
/// backends form `1 − β` and the bias corrections in f64 and only then round).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamHyper {
    /// The official values: betas (0.9, 0.999), eps 1e-8.
    fn default() -> Self {
        AdamHyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

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

/// The groups of a model in the form the backend's update takes: the distinct settings (first
/// appearance order) and one segment per run of consecutive parameters sharing a group (empty
/// tensors skipped). `params` must tile the flat buffer in order.
fn segments_of(
    params: &[(ParamRef, GroupSettings)],
) -> Result<(Vec<usize>, Vec<usize>, Vec<GroupSettings>)> {
    let mut distinct: Vec<GroupSettings> = Vec::new();
    let (mut starts, mut seg_groups) = (Vec::new(), Vec::new());
    let mut expected_start = 0;
    for (at, settings) in params {
        if at.offset != expected_start {
            return Err(Error::shape(
                "AdamW",
                format!(
                    "parameter at {}..{} does not follow the previous one (ends at {expected_start})",
                    at.offset,
                    at.offset + at.len
                ),
            ));
        }
        expected_start = at.offset + at.len;
        if at.len == 0 {
            continue;
        }
        let g = match distinct.iter().position(|s| s == settings) {
            Some(g) => g,
            None => {
                distinct.push(*settings);
                distinct.len() - 1
            }
        };
        if seg_groups.last() != Some(&g) {
            starts.push(at.offset);
            seg_groups.push(g);
        }
    }
    Ok((starts, seg_groups, distinct))
}

/// AdamW over a flat buffer on a backend, each parameter with its group settings; the moments
/// live on the backend beside the parameters.
pub struct AdamW<B: Backend> {
    pub hyper: AdamHyper,
    segments: B::Segments,
    /// The distinct settings, one per backend group.
    groups: Vec<GroupSettings>,
    group_lr: B::BufF32,   // [G]
    group_wd: B::BufF32,   // [G]
    exp_avg: B::BufF32,    // [P]
    exp_avg_sq: B::BufF32, // [P]
    /// Steps taken (sets the bias corrections).
    step: u64,
    len: usize,
}

impl<B: Backend> AdamW<B> {
    /// An optimizer for every parameter of `table` with the settings of `groups` (built from the
    /// same table), starting from `state`.
    pub fn new(
        be: &mut B,
        table: &ParamTable,
        groups: &ParamGroups,
        hyper: AdamHyper,
        state: &AdamWState,
    ) -> Result<Self> {
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
        let params: Vec<(ParamRef, GroupSettings)> = table
            .specs()
            .iter()
            .zip(&groups.per_param)
            .map(|(s, &g)| (s.at, g))
            .collect();
        Self::from_parts(be, &params, table.len(), hyper, state)
    }

    /// An optimizer over `len` flat values with explicit `(range, settings)` pairs tiling it.
    pub fn from_parts(
        be: &mut B,
        params: &[(ParamRef, GroupSettings)],
        len: usize,
        hyper: AdamHyper,
        state: &AdamWState,
    ) -> Result<Self> {
        if state.exp_avg.len() != len || state.exp_avg_sq.len() != len {
            return Err(Error::shape(
                "AdamW",
                format!(
                    "moments hold {} and {} values for {len} parameters",
                    state.exp_avg.len(),
                    state.exp_avg_sq.len()
                ),
            ));
        }
        if params.last().is_some_and(|(r, _)| r.offset + r.len != len) {
            return Err(Error::shape(
                "AdamW",
                format!("the parameters do not tile {len} values"),
            ));
        }
        let (starts, seg_groups, distinct) = segments_of(params)?;
        let segments = be.segments(&starts, &seg_groups, distinct.len(), len)?;
        let mut upload = |host: &[f32]| -> Result<B::BufF32> {
            let mut buf = be.alloc_f32(host.len())?;
            be.upload_f32(&mut buf, host)?;
            Ok(buf)
        };
        Ok(AdamW {
            hyper,
            segments,
            exp_avg: upload(&state.exp_avg)?,
            exp_avg_sq: upload(&state.exp_avg_sq)?,
            group_lr: be.alloc_f32(distinct.len())?,
            group_wd: be.alloc_f32(distinct.len())?,
            groups: distinct,
            step: state.step,
            len,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One step with this iteration's scheduled values: group lr = (`last_layer_lr` for the
    /// last layer, else `lr`) × multiplier, wd × multiplier. Advances the step count, then
    /// updates every parameter (weights, moments), including those whose lr is 0.
    pub fn step(
        &mut self,
        be: &mut B,
        params: &mut B::F32,
        grads: &B::F32,
        (lr, last_layer_lr, wd): (f64, f64, f64),
    ) -> Result<()> {
        if params.len() != self.len || grads.len() != self.len {
            return Err(Error::shape(
                "AdamW::step",
                format!(
                    "{} parameters / {} gradients, optimizer built for {}",
                    params.len(),
                    grads.len(),
                    self.len
                ),
            ));
        }
        let lrs: Vec<f32> = self
            .groups
            .iter()
            .map(|g| ((if g.is_last_layer { last_layer_lr } else { lr }) * g.lr_multiplier) as f32)
            .collect();
        let wds: Vec<f32> = self
            .groups
            .iter()
            .map(|g| (wd * g.wd_multiplier) as f32)
            .collect();
        be.upload_f32(&mut self.group_lr, &lrs)?;
        be.upload_f32(&mut self.group_wd, &wds)?;
        self.step += 1;
        let bufs = AdamWBuffers {
            params,
            exp_avg: &mut *self.exp_avg,
            exp_avg_sq: &mut *self.exp_avg_sq,
            grads,
        };
        let hp = AdamWStep {
            beta1: self.hyper.beta1,
            beta2: self.hyper.beta2,
            eps: self.hyper.eps,
            step: self.step,
        };
        be.adamw_update(bufs, &self.segments, &self.group_lr, &self.group_wd, hp)
    }

    /// The state on the host (checkpoints).
    pub fn state(&self, be: &mut B) -> Result<AdamWState> {
        Ok(AdamWState {
            exp_avg: be.download_f32(&self.exp_avg)?,
            exp_avg_sq: be.download_f32(&self.exp_avg_sq)?,
            step: self.step,
        })
    }

    /// Replaces the state with `state` (resume).
    pub fn restore(&mut self, be: &mut B, state: &AdamWState) -> Result<()> {
        if state.exp_avg.len() != self.len || state.exp_avg_sq.len() != self.len {
            return Err(Error::shape(
                "AdamW::restore",
                format!(
                    "moments of {} / {} values for {}",
                    state.exp_avg.len(),
                    state.exp_avg_sq.len(),
                    self.len
                ),
            ));
        }
        be.upload_f32(&mut self.exp_avg, &state.exp_avg)?;
        be.upload_f32(&mut self.exp_avg_sq, &state.exp_avg_sq)?;
        self.step = state.step;
        Ok(())
    }
}
