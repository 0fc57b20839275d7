//! `kill -9` at random moments, again and again (issue 17): a tiny run killed 20 times — while
//! starting, stepping, writing checkpoints, metrics or the plot — and resumed each time ends with
//! the uninterrupted run's losses, final checkpoint and exported teacher, byte for byte. The
//! first kill comes before any checkpoint: `--resume` then starts the run again.

mod run_support;

use rand::{Rng, SeedableRng};
use run_support::{losses, SMALL};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dinotrain");
const STEPS: usize = 80;
const KILLS: usize = 20;

/// The run in `out`: a checkpoint every step (so most moments are near a write), the plot every
/// 5 steps.
fn command(out: &Path, resume: bool) -> Command {
    let mut c = Command::new(BIN);
    c.args(["train", "--out", out.to_str().unwrap()])
        .args(["--steps", &STEPS.to_string()])
        .args(["--set", "dinotrain.checkpoint_every=1"])
        .args(["--set", "dinotrain.keep_checkpoints=2"])
        .args(["--set", "dinotrain.plot_every=5"])
        .args(SMALL)
        .args(if resume { &["--resume"][..] } else { &[][..] })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn metrics_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// Waits until the run has written `lines` metrics records (or has ended).
fn wait_for_lines(out: &Path, lines: usize, child: &mut Child) {
    let start = Instant::now();
    while metrics_lines(out) < lines && child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn finish(mut c: Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn twenty_kills_at_random_moments_end_with_the_uninterrupted_run_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, parts) = (tmp.path().join("whole"), tmp.path().join("parts"));
    let start = Instant::now();
    finish(command(&whole, false));
    // One step's share of the run, for the kill moments inside a step.
    let step_time = start.elapsed() / STEPS as u32;

    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut moments = Vec::new();
    for kill in 0..KILLS {
        // As a user would: `--resume` after every kill, also one before the first checkpoint
        // (the run then starts again).
        let resume = kill > 0;
        let before = metrics_lines(&parts);
        let mut child = command(&parts, resume).spawn().unwrap();
        // A random moment: after 0-2 more steps, then up to one step's time (while the
        // checkpoint, the metrics record or the plot is being written, or the next step runs).
        if kill == 0 {
            // The first kill comes as soon as the run has written its configuration, before
            // its first checkpoint.
            let start = Instant::now();
            while !parts.join("config.yaml").exists() {
                assert!(start.elapsed() < Duration::from_secs(120), "no config.yaml");
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            let more = rng.random_range(0..3);
            wait_for_lines(&parts, before + more, &mut child);
            std::thread::sleep(step_time.mul_f64(rng.random_range(0.0..1.2)));
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            panic!("attempt {kill} ended before its kill ({status}): {stderr}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        moments.push(metrics_lines(&parts));
    }
    println!("metrics records after each kill: {moments:?}");
    assert_eq!(moments[0], 0, "the first kill came after a step");
    assert!(
        metrics_lines(&parts) < STEPS,
        "the kills left nothing to resume"
    );
    finish(command(&parts, true));

    assert_eq!(losses(&parts), losses(&whole));
    for file in [
        format!("checkpoints/step_{STEPS:08}.safetensors"),
        "teacher_backbone.safetensors".into(),
    ] {
        let (a, b) = (whole.join(&file), parts.join(&file));
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{file} differs from the uninterrupted run's"
        );
    }
}
