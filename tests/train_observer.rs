//! Watching and stopping a library run: the observer sees every step in order and every
//! checkpoint; `Control::Stop` at step k stops after k + 1 steps with a checkpoint; a cancel
//! from another thread stops the run, and a resume finishes it with the uninterrupted run's
//! losses and teacher, bit for bit.

use dinotrain::train::metrics::{self, StepMetrics};
use dinotrain::train::{
    train, CancelHandle, Control, OutdirMode, Preset, RunStart, StopReason, TrainConfig,
    TrainObserver, TrainOptions,
};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// A small model on the demo images, every loss term on, no k-NN.
fn tiny(out: &Path, steps: u64) -> TrainConfig {
    let mut c = TrainConfig::preset(Preset::Demo)
        .output_dir(out)
        .steps(steps)
        .batch_size(8)
        .knn(false)
        .checkpoint_every(100);
    c.dinotrain.embed_dim = Some(32);
    c.dinotrain.depth = Some(2);
    c.dinotrain.num_heads = Some(2);
    c.dino.head_n_prototypes = 64;
    c.ibot.head_n_prototypes = 64;
    c.dino.head_hidden_dim = 32;
    c.dino.head_bottleneck_dim = 16;
    c.crops.local_crops_number = 2;
    c
}

/// What an observer saw.
#[derive(Debug, Default)]
struct Seen {
    starts: Vec<(u64, u64)>,
    steps: Vec<u64>,
    checkpoints: Vec<(PathBuf, u64)>,
    loop_ends: usize,
}

/// Records everything and stops at `stop_at`.
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    stop_at: Option<u64>,
}

impl TrainObserver for Recorder {
    fn on_start(&mut self, start: &RunStart) {
        let mut seen = self.seen.lock().unwrap();
        seen.starts.push((start.first_step, start.total_steps));
    }

    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.seen.lock().unwrap().steps.push(m.step);
        assert!(m.losses["total"].is_finite() && m.lr >= 0.0, "{m:?}");
        if self.stop_at == Some(m.step) {
            Control::Stop
        } else {
            Control::Continue
        }
    }

    fn on_checkpoint(&mut self, path: &Path, step: u64) {
        let mut seen = self.seen.lock().unwrap();
        seen.checkpoints.push((path.to_path_buf(), step));
    }

    fn on_loop_end(&mut self) {
        self.seen.lock().unwrap().loop_ends += 1;
    }
}

fn recorder(stop_at: Option<u64>) -> (Recorder, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let r = Recorder {
        seen: Arc::clone(&seen),
        stop_at,
    };
    (r, seen)
}

/// `(step, total loss bits)` of every record in a run's metrics.jsonl.
fn losses(dir: &Path) -> Vec<(u64, u64)> {
    let records = metrics::read(&dir.join("metrics.jsonl")).unwrap();
    records
        .iter()
        .map(|r| (r.step, r.losses["total"].to_bits()))
        .collect()
}

fn teacher(dir: &Path) -> std::collections::BTreeMap<String, dinotrain::io::Value> {
    dinotrain::io::TensorFile::read(&dir.join("teacher_backbone.safetensors"))
        .unwrap()
        .tensors
}

#[test]
fn the_observer_sees_every_step_in_order_and_every_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (observer, seen) = recorder(None);
    let config = tiny(tmp.path(), 4).checkpoint_every(2).resolve().unwrap();
    let summary = train(TrainOptions::new(config).observer(observer)).unwrap();
    assert_eq!((summary.steps, summary.stopped), (4, None));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.starts, [(0, 4)]);
    assert_eq!(seen.steps, [0, 1, 2, 3]);
    assert_eq!(seen.loop_ends, 1);
    let steps: Vec<u64> = seen.checkpoints.iter().map(|c| c.1).collect();
    assert_eq!(steps, [2, 4]);
    assert!(seen.checkpoints.iter().all(|(p, _)| p.exists()));
    assert_eq!(summary.checkpoint.as_ref(), Some(&seen.checkpoints[1].0));
    let written: Vec<u64> = losses(tmp.path()).iter().map(|l| l.0).collect();
    assert_eq!(written, seen.steps);
}

#[test]
fn stop_at_step_k_stops_after_k_plus_one_steps_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (observer, seen) = recorder(Some(2));
    let config = tiny(tmp.path(), 6).resolve().unwrap();
    let summary = train(TrainOptions::new(config).observer(observer)).unwrap();
    assert_eq!(summary.steps, 3);
    assert_eq!(summary.stopped, Some(StopReason::Observer));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.steps, [0, 1, 2]);
    assert_eq!(seen.loop_ends, 1);
    assert_eq!(seen.checkpoints.len(), 1);
    let (path, step) = &seen.checkpoints[0];
    assert_eq!(*step, 3);
    assert!(path.exists(), "{}", path.display());
    assert_eq!(summary.checkpoint.as_ref(), Some(path));
    assert!(summary.export.exists(), "a stopped run exports its teacher");
    assert_eq!(losses(tmp.path()).len(), 3);
}

/// Blocks the training thread at step 0 until another thread has cancelled the run.
struct WaitForCancel {
    at_step_0: mpsc::Sender<()>,
    cancelled: mpsc::Receiver<()>,
}

impl TrainObserver for WaitForCancel {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        if m.step == 0 {
            self.at_step_0.send(()).unwrap();
            self.cancelled.recv().unwrap();
        }
        Control::Continue
    }
}

#[test]
fn a_cancel_from_another_thread_stops_the_run_and_resume_finishes_it_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, parts) = (tmp.path().join("whole"), tmp.path().join("parts"));
    train(TrainOptions::new(tiny(&whole, 4).resolve().unwrap())).unwrap();

    let cancel = CancelHandle::new();
    let (at_step_0, step_0) = mpsc::channel();
    let (done, cancelled) = mpsc::channel();
    let remote = cancel.clone();
    let canceller = std::thread::spawn(move || {
        step_0.recv().unwrap();
        remote.cancel();
        done.send(()).unwrap();
    });
    let observer = WaitForCancel {
        at_step_0,
        cancelled,
    };
    let options = TrainOptions::new(tiny(&parts, 4).resolve().unwrap())
        .observer(observer)
        .cancel(cancel);
    let stopped = train(options).unwrap();
    canceller.join().unwrap();
    assert_eq!(stopped.steps, 1);
    assert_eq!(stopped.stopped, Some(StopReason::Cancelled));
    assert!(stopped.checkpoint.is_some_and(|c| c.exists()));

    let config = tiny(&parts, 4).resolve().unwrap();
    let resumed = train(TrainOptions::new(config).outdir(OutdirMode::Resume)).unwrap();
    assert_eq!((resumed.steps, resumed.steps_this_run), (4, 3));
    assert_eq!(resumed.stopped, None);
    assert_eq!(losses(&parts), losses(&whole));
    let (a, b) = (teacher(&whole), teacher(&parts));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(b[name] == *t, "exported {name} differs after the resume");
    }
}
