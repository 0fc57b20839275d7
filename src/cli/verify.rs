//! `dinotrain golden` and `dinotrain verify`.

use anyhow::{Context, Result};
use dinotrain::backend::cuda::{resolve_device, ResolvedDevice};
use dinotrain::backend::Device;
use dinotrain::golden;
use std::io::Write;
use std::path::Path;

/// Table lines on stdout; a closed pipe (`dinotrain verify | head`) is the reader's choice:
/// printing stops, the verification goes on and decides the exit status.
struct Lines {
    out: std::io::StdoutLock<'static>,
    closed: bool,
}

impl Lines {
    fn stdout() -> Self {
        Lines {
            out: std::io::stdout().lock(),
            closed: false,
        }
    }

    fn line(&mut self, text: std::fmt::Arguments<'_>) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        match writeln!(self.out, "{text}") {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => self.closed = true,
            other => other?,
        }
        Ok(())
    }
}

/// The backend the fixtures run on (`--device`).
fn open_device(device: &str) -> Result<ResolvedDevice> {
    let device: Device = device.parse()?;
    Ok(resolve_device(device)?)
}

/// `dinotrain golden FIXTURE RESULT [--device D]`
pub fn golden(fixture: &Path, result: &Path, device: &str) -> Result<()> {
    let mut device = open_device(device)?;
    golden::write_result(fixture, result, &mut device)
        .with_context(|| format!("computing {}", fixture.display()))?;
    Ok(())
}

/// `dinotrain verify [DIR] [--device D]`: prints a table and returns whether every fixture
/// passed.
pub fn verify(dir: &Path, device: &str) -> Result<bool> {
    let files = golden::fixture_files(dir)?;
    if files.is_empty() {
        anyhow::bail!("no *.safetensors fixtures in {}", dir.display());
    }
    let mut device = open_device(device)?;
    let mut out = Lines::stdout();
    out.line(format_args!("device: {}", device.describe()))?;
    out.line(format_args!(
        "{:<34} {:>12} {:>10}  {:<6} worst output",
        "fixture", "max rel err", "tol", "result"
    ))?;
    let mut failed = 0;
    for path in &files {
        let v = golden::verify_file_on(path, &mut device);
        let name = format!("{}-{}", v.case, v.variant);
        match &v.outcome {
            Ok(report) => {
                let worst = report
                    .checks
                    .iter()
                    .max_by(|a, b| a.err.total_cmp(&b.err))
                    .map(|c| c.name.as_str())
                    .unwrap_or("-");
                let ok = report.pass();
                out.line(format_args!(
                    "{:<34} {:>12.3e} {:>10.1e}  {:<6} {}",
                    name,
                    report.max_err(),
                    report.tol,
                    if ok { "pass" } else { "FAIL" },
                    worst
                ))?;
                if !ok {
                    failed += 1;
                    for line in report.failures() {
                        out.line(format_args!("    {line}"))?;
                    }
                }
            }
            Err(e) => {
                failed += 1;
                out.line(format_args!(
                    "{:<34} {:>12} {:>10}  {:<6} {}",
                    name, "-", "-", "FAIL", e
                ))?;
            }
        }
    }
    out.line(format_args!(
        "{} passed, {} failed ({} fixtures in {})",
        files.len() - failed,
        failed,
        files.len(),
        dir.display()
    ))?;
    Ok(failed == 0)
}
