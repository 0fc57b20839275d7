//! Optimisation, written once over the backend seam: parameter groups, AdamW with explicit
//! state, schedules, gradient clipping and the teacher EMA. All of it works on the flat buffers
//! of [`crate::nn::params::ParamTable`].

pub mod adamw;
pub mod clip;
pub mod ema;
pub mod param_groups;
pub mod schedules;

pub use adamw::{AdamHyper, AdamW, AdamWState};
pub use clip::{GradClipper, SubmoduleSpan};
pub use ema::ema_update;
pub use param_groups::{FusedGroup, GroupSettings, LayerDecay, ParamGroups};
pub use schedules::{CosineScheduler, ScheduleConfig, ScheduledValues, Schedules};
