//! Progress of `dinotrain train` on stderr: an indicatif bar when stderr is a terminal, plain
//! lines otherwise (CI logs, `nohup`, pipes), both showing step, epoch, loss, images/s,
//! data-wait share and ETA. It is the run's [`TrainObserver`]; the library only reports.

use dinotrain::train::metrics::StepMetrics;
use dinotrain::train::{Control, RunStart, TrainObserver};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The bar's layout; a constant, so it parses (the unit test below checks).
const TEMPLATE: &str = "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}";

/// The bar on screen, if any: log lines are printed above it instead of through it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Prints a line on stderr, above the progress bar when one is drawn.
pub fn eprint_line(text: &str) {
    let bar = BAR.lock().unwrap_or_else(PoisonError::into_inner).clone();
    match bar {
        Some(bar) => bar.suspend(|| eprintln!("{text}")),
        None => eprintln!("{text}"),
    }
}

/// How progress is shown. (A library run without an observer shows nothing.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A redrawn bar on stderr.
    Bar,
    /// One line on stderr every `every` steps (and after the last).
    Lines { every: u64 },
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
    /// A display that starts when the run does ([`TrainObserver::on_start`]).
    pub fn new(mode: ProgressMode) -> Self {
        Progress {
            mode,
            bar: None,
            total_steps: 0,
            first_step: 0,
            started: Instant::now(),
        }
    }

    /// The plain line for a finished step.
    pub fn line(&self, m: &StepMetrics) -> String {
        let done = m.step + 1;
        let eta = eta(
            self.started.elapsed(),
            done - self.first_step.min(done),
            self.total_steps.saturating_sub(done),
        );
        format!(
            "step {done}/{} {} | ETA {}",
            self.total_steps,
            summary(m),
            format_duration(eta)
        )
    }
}

impl TrainObserver for Progress {
    /// Steps `first_step..total_steps` are ahead (a resumed run starts past 0).
    fn on_start(&mut self, start: &RunStart) {
        self.total_steps = start.total_steps;
        self.first_step = start.first_step;
        self.started = Instant::now();
        if self.mode == ProgressMode::Bar {
            let bar = ProgressBar::with_draw_target(
                Some(start.total_steps),
                ProgressDrawTarget::stderr_with_hz(4),
            );
            let style = ProgressStyle::with_template(TEMPLATE)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_position(start.first_step);
            bar.reset_eta();
            *BAR.lock().unwrap_or_else(PoisonError::into_inner) = Some(bar.clone());
            self.bar = Some(bar);
        }
    }

    fn on_step(&mut self, m: &StepMetrics) -> Control {
        match (self.mode, &self.bar) {
            (ProgressMode::Bar, Some(bar)) => {
                bar.set_position(m.step + 1);
                bar.set_message(summary(m));
            }
            (ProgressMode::Lines { every }, _) => {
                let done = m.step + 1;
                if done % every == 0 || done == self.total_steps {
                    eprintln!("{}", self.line(m));
                }
            }
            (ProgressMode::Bar, None) => {}
        }
        Control::Continue
    }

    /// Prints a message without breaking the bar.
    fn on_message(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Leaves the bar's last state on screen.
    fn on_loop_end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
            BAR.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
    }
}

fn summary(m: &StepMetrics) -> String {
    format!(
        "epoch {} | loss {:.4} | {:.1} img/s | data wait {:.0}%",
        m.epoch,
        m.losses.get("total").copied().unwrap_or(f64::NAN),
        m.images_per_s,
        100.0 * m.data_wait_share
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

/// The download bar's layout (bytes, rate, ETA).
const DOWNLOAD_TEMPLATE: &str =
    "{msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}";

/// Draws each download of released weights as a bar on stderr (a line per 64 MiB when stderr
/// is not a terminal).
pub fn install_download_progress() {
    let current: Mutex<Option<(std::path::PathBuf, ProgressBar)>> = Mutex::new(None);
    let terminal = std::io::stderr().is_terminal();
    let hook = move |file: &std::path::Path, done: u64, total: Option<u64>| {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        if !terminal {
            if done % (64 << 20) < (1 << 20) || total == Some(done) {
                let of = total.map_or(String::new(), |t| format!(" of {} MiB", t >> 20));
                eprint_line(&format!("downloading {name}: {} MiB{of}", done >> 20));
            }
            return;
        }
        let mut slot = current.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_none_or(|(f, _)| f != file) {
            let bar = ProgressBar::new(total.unwrap_or(0));
            if let Ok(style) = ProgressStyle::with_template(DOWNLOAD_TEMPLATE) {
                bar.set_style(style);
            }
            bar.set_message(format!("downloading {name}"));
            *slot = Some((file.to_path_buf(), bar));
        }
        if let Some((_, bar)) = slot.as_ref() {
            bar.set_position(done);
            if total == Some(done) {
                bar.finish();
            }
        }
    };
    dinotrain::io::download::set_progress(Some(Box::new(hook)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 2,
            losses: [("total".to_string(), 8.123456)].into(),
            images_per_s: 123.45,
            data_wait_share: 0.125,
            ..StepMetrics::default()
        }
    }

    fn start(first_step: u64, total_steps: u64) -> RunStart {
        let mut start = RunStart::default();
        start.first_step = first_step;
        start.total_steps = total_steps;
        start
    }

    #[test]
    fn lines_show_every_field() {
        let mut p = Progress::new(ProgressMode::Lines { every: 1000 });
        p.on_start(&start(10, 100));
        let line = p.line(&metrics(19));
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
    fn bar_template_parses_and_the_bar_runs() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(DOWNLOAD_TEMPLATE).is_ok());
        let mut p = Progress::new(ProgressMode::Bar);
        p.on_start(&start(0, 3));
        assert_eq!(p.on_step(&metrics(0)), Control::Continue);
        eprint_line("a line above the bar");
        p.on_loop_end();
        assert!(BAR.lock().unwrap().is_none());
    }
}
