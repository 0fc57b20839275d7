//! The training state as one thing: both models' weights, AdamW's moments and step count, the
//! teacher-target state and the position, living on the trainer's backend ([`TrainState`]),
//! and its host form ([`HostState`]) that checkpoints hold. [`TrainState::snapshot`] reads the
//! state back; [`TrainState::restore`] replaces it (resume, a pretrained start). Nothing else
//! keeps a copy, so nothing can go stale.

use crate::backend::{Backend, WeightStore};
use crate::error::{Error, Result};
use crate::optim::{AdamHyper, AdamW, AdamWState, ParamGroups};
use crate::ssl::{SslModel, Targets, TeacherTargets};

/// The training state on the host: what a checkpoint saves and a resume restores.
#[derive(Clone, Debug, PartialEq)]
pub struct HostState {
    /// `[P]` student parameters (trained by AdamW).
    pub student: Vec<f32>,
    /// `[P]` teacher parameters (EMA of the student).
    pub teacher: Vec<f32>,
    pub optimizer: AdamWState,
    pub targets: TeacherTargets,
    /// The next iteration to run.
    pub step: u64,
}

impl HostState {
    /// A fresh state: the teacher starts as a copy of the student (as in the official code),
    /// zero moments, step 0.
    pub fn fresh(student: Vec<f32>, targets: TeacherTargets) -> Self {
        HostState {
            teacher: student.clone(),
            optimizer: AdamWState::zeros(student.len()),
            student,
            targets,
            step: 0,
        }
    }
}

/// The training state on a backend.
pub struct TrainState<B: Backend> {
    pub student: B::Weights,
    pub teacher: B::Weights,
    pub optimizer: AdamW<B>,
    pub targets: Targets<B>,
    /// The next iteration to run.
    pub step: u64,
}

impl<B: Backend> TrainState<B> {
    /// The state of `host` on `be`.
    pub fn new(
        be: &mut B,
        model: &SslModel,
        groups: &ParamGroups,
        hyper: AdamHyper,
        host: &HostState,
    ) -> Result<Self> {
        check(model, host)?;
        Ok(TrainState {
            student: be.weights(&host.student)?,
            teacher: be.weights(&host.teacher)?,
            optimizer: AdamW::new(be, &model.table, groups, hyper, &host.optimizer)?,
            targets: Targets::new(be, &host.targets)?,
            step: host.step,
        })
    }

    /// The whole state read back to the host.
    pub fn snapshot(&self, be: &mut B) -> Result<HostState> {
        Ok(HostState {
            student: be.download_f32(self.student.f32())?,
            teacher: be.download_f32(self.teacher.f32())?,
            optimizer: self.optimizer.state(be)?,
            targets: self.targets.to_host(be)?,
            step: self.step,
        })
    }

    /// Replaces the state with `host` (same model layout).
    pub fn restore(&mut self, be: &mut B, model: &SslModel, host: &HostState) -> Result<()> {
        check(model, host)?;
        for (w, values) in [
            (&mut self.student, &host.student),
            (&mut self.teacher, &host.teacher),
        ] {
            be.upload_f32(w.f32_mut(), values)?;
            be.refresh_weights(w)?;
        }
        self.optimizer.restore(be, &host.optimizer)?;
        self.targets.restore(be, &host.targets)?;
        self.step = host.step;
        Ok(())
    }
}

fn check(model: &SslModel, host: &HostState) -> Result<()> {
    let p = model.table.len();
    if host.student.len() != p || host.teacher.len() != p {
        return Err(Error::shape(
            "training state",
            format!(
                "student / teacher hold {} / {} values for a model of {p}",
                host.student.len(),
                host.teacher.len()
            ),
        ));
    }
    Ok(())
}
