//! Progress display: an indicatif bar when stderr is a terminal, plain log lines otherwise
//! (CI logs, `nohup`, pipes), both showing step, epoch, loss, images/s, data-wait share and ETA.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A redrawn bar on stderr.
    Bar,
    /// One line on stderr every `every` steps.
    Lines { every: u64 },
    /// Nothing (library use, tests).
    Silent,
}

impl ProgressMode {
    /// A bar when stderr is a terminal, else lines every `every` steps.
    pub fn auto(every: u64) -> Self {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines {
                every: every.max(1),
            }
        }
    }
}

/// What one finished step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The step just finished (0-based).
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub images_per_s: f64,
    pub data_wait_share: f64,
}

/// The progress display of one run.
#[derive(Debug)]
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    total_steps: u64,
    first_step: u64,
    started: Instant,
}

impl Progress {
    /// A display for steps `first_step..total_steps` (a resumed run starts past 0).
    pub fn new(mode: ProgressMode, first_step: u64, total_steps: u64) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(total_steps),
                ProgressDrawTarget::stderr_with_hz(4),
            );
            // The template is a constant: it parses, or the unit test below fails.
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_position(first_step);
            bar.reset_eta();
            bar
        });
        Progress {
            mode,
            bar,
            total_steps,
            first_step,
            started: Instant::now(),
        }
    }

    /// Shows a finished step.
    pub fn step(&mut self, r: &StepReport) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(r.step + 1);
                    bar.set_message(summary(r));
                }
            }
            ProgressMode::Lines { every } => {
                let done = r.step + 1;
                if done % every == 0 || done == self.total_steps {
                    eprintln!("{}", self.line(r));
                }
            }
            ProgressMode::Silent => {}
        }
    }

    /// The plain line for a finished step.
    pub fn line(&self, r: &StepReport) -> String {
        let eta = eta(
            self.started.elapsed(),
            r.step + 1 - self.first_step.min(r.step + 1),
            self.total_steps.saturating_sub(r.step + 1),
        );
        format!(
            "step {}/{} {} | ETA {}",
            r.step + 1,
            self.total_steps,
            summary(r),
            format_duration(eta)
        )
    }

    /// Prints a message without breaking the bar.
    pub fn message(&self, text: &str) {
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.println(text),
            (None, ProgressMode::Silent) => {}
            (None, _) => eprintln!("{text}"),
        }
    }

    /// Removes the bar (leaving the last state on screen).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn summary(r: &StepReport) -> String {
    format!(
        "epoch {} | loss {:.4} | {:.1} img/s | data wait {:.0}%",
        r.epoch,
        r.loss,
        r.images_per_s,
        100.0 * r.data_wait_share
    )
}

/// Remaining time at the average pace so far.
fn eta(elapsed: Duration, steps_done: u64, steps_left: u64) -> Option<Duration> {
    (steps_done > 0).then(|| elapsed.mul_f64(steps_left as f64 / steps_done as f64))
}

/// `1h02m03s`, `4m05s`, `7s`, or `?` when unknown.
pub fn format_duration(d: Option<Duration>) -> String {
    let Some(d) = d else {
        return "?".into();
    };
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_every_field() {
        let p = Progress::new(ProgressMode::Silent, 10, 100);
        let line = p.line(&StepReport {
            step: 19,
            epoch: 2,
            loss: 8.123456,
            images_per_s: 123.45,
            data_wait_share: 0.125,
        });
        assert!(
            line.starts_with("step 20/100 epoch 2 | loss 8.1235 | 123.5 img/s | data wait 12%"),
            "{line}"
        );
        assert!(line.contains("ETA "), "{line}");
    }

    #[test]
    fn eta_and_durations() {
        assert_eq!(eta(Duration::from_secs(10), 0, 5), None);
        assert_eq!(
            eta(Duration::from_secs(10), 5, 20),
            Some(Duration::from_secs(40))
        );
        assert_eq!(format_duration(None), "?");
        assert_eq!(format_duration(Some(Duration::from_secs(7))), "7s");
        assert_eq!(format_duration(Some(Duration::from_secs(245))), "4m05s");
        assert_eq!(format_duration(Some(Duration::from_secs(3723))), "1h02m03s");
    }

    #[test]
    fn bar_template_parses() {
        assert!(ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}"
        )
        .is_ok());
        let mut p = Progress::new(ProgressMode::Bar, 0, 3);
        p.step(&StepReport {
            step: 0,
            epoch: 0,
            loss: 1.0,
            images_per_s: 1.0,
            data_wait_share: 0.0,
        });
        p.finish();
    }
}
