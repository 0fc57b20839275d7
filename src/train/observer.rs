//! Watching and steering a run from outside the loop: a [`TrainObserver`] sees every step,
//! checkpoint, k-NN result and progress message and may stop the run; a [`CancelHandle`] stops
//! it from another thread. Either way the loop finishes the step it is in, writes a checkpoint
//! and the teacher backbone, and returns its summary; `--resume` (or
//! [`OutdirMode::Resume`](super::outdir::OutdirMode::Resume)) continues it later.
//!
//! ```
//! use dinotrain::train::metrics::StepMetrics;
//! use dinotrain::train::{Control, TrainObserver};
//!
//! /// Stops once the total loss falls below a threshold.
//! struct StopBelow(f64);
//!
//! impl TrainObserver for StopBelow {
//!     fn on_step(&mut self, m: &StepMetrics) -> Control {
//!         println!("step {} loss {:.4}", m.step + 1, m.losses["total"]);
//!         if m.losses["total"] < self.0 {
//!             Control::Stop
//!         } else {
//!             Control::Continue
//!         }
//!     }
//! }
//! ```

use super::metrics::StepMetrics;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What the run does after a step, as an observer decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub enum Control {
    /// Go on with the next step.
    #[default]
    Continue,
    /// Stop after this step: write a checkpoint and the teacher backbone, then return.
    Stop,
}

/// Why a run returned before its last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A [`TrainObserver::on_step`] returned [`Control::Stop`].
    Observer,
    /// The run's [`CancelHandle`] was triggered.
    Cancelled,
    /// `dinotrain.stop_after` steps ran: the run stopped as if killed (no final checkpoint,
    /// no export), for time-limited jobs and resume tests.
    StopAfter,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Observer => "stopped by the observer",
            StopReason::Cancelled => "cancelled",
            StopReason::StopAfter => "dinotrain.stop_after",
        })
    }
}

/// The run an observer is about to see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunStart {
    /// The first step this call runs (past 0 when resuming).
    pub first_step: u64,
    /// The run's length in steps.
    pub total_steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Where the steps run (`cpu (2 threads, f32)`, or the CUDA device's name).
    pub device: String,
}

/// Hooks the training loop calls; every one has a default, so an observer implements only
/// what it needs. The loop calls them on its own thread, in this order: [`on_start`] once,
/// then per step [`on_step`] (and [`on_checkpoint`] / [`on_knn`] when those happen), then
/// [`on_loop_end`] once the steps are over, before the final export and evaluation.
///
/// [`on_start`]: TrainObserver::on_start
/// [`on_step`]: TrainObserver::on_step
/// [`on_checkpoint`]: TrainObserver::on_checkpoint
/// [`on_knn`]: TrainObserver::on_knn
/// [`on_loop_end`]: TrainObserver::on_loop_end
pub trait TrainObserver {
    /// The trainer is built (and resumed); no step has run in this call yet.
    fn on_start(&mut self, _start: &RunStart) {}

    /// A step finished: its losses, scheduled values, throughput and data-wait share (the
    /// record written to `metrics.jsonl`). [`Control::Stop`] ends the run after this step.
    fn on_step(&mut self, _metrics: &StepMetrics) -> Control {
        Control::Continue
    }

    /// A checkpoint was written after `step` steps.
    fn on_checkpoint(&mut self, _path: &Path, _step: u64) {}

    /// k-NN top-1 accuracy (%) at `k` of the weights after `step` steps (0: the model at
    /// initialisation).
    fn on_knn(&mut self, _step: u64, _k: usize, _top1: f64) {}

    /// A line for people (what the command line shows between progress lines: the device,
    /// k-NN results during training). By default it goes to [`log::info!`].
    fn on_message(&mut self, text: &str) {
        log::info!("{text}");
    }

    /// The steps are over (the last one ran, the run was stopped, or a step failed).
    fn on_loop_end(&mut self) {}
}

/// The observer of a run given none: messages go to the `log` crate, nothing else is seen.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogMessages;

impl TrainObserver for LogMessages {}

/// Stops a run from another thread (a UI's stop button, a signal handler, a time limit):
/// the loop finishes the step it is in, writes a checkpoint and returns. Cheap to clone; every
/// clone triggers the same run.
///
/// ```
/// use dinotrain::train::CancelHandle;
///
/// let cancel = CancelHandle::new();
/// let for_the_ui = cancel.clone();
/// std::thread::spawn(move || for_the_ui.cancel()).join().unwrap();
/// assert!(cancel.is_cancelled());
/// ```
#[derive(Clone, Debug, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// A handle not triggered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop after its current step.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// The flag behind the handle (set = cancelled), for code that can only store to an
    /// atomic, such as a signal handler.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }

    /// Whether [`CancelHandle::cancel`] was called on this handle or a clone of it.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_continue_and_a_cancel_reaches_every_clone() {
        let mut quiet = LogMessages;
        assert_eq!(quiet.on_step(&StepMetrics::default()), Control::Continue);
        let a = CancelHandle::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert!(b.is_cancelled());
    }
}
