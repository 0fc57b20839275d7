//! The run folder: what is in it, when it may be reused, and the `train.log` writer.
//!
//! Policy: a new run needs an absent or empty folder. `--resume` continues the run in the folder
//! (it must hold a checkpoint). `--overwrite` deletes dinotrain's own files and keeps the folder,
//! but refuses when it finds anything else, so a mistyped `--out` never deletes a user's data.

use super::checkpoint;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// How the user asked to treat an existing output folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutdirMode {
    /// The folder must be absent or empty.
    Fresh,
    /// Continue from the folder's latest checkpoint.
    Resume,
    /// Delete dinotrain's files in the folder and start again.
    Overwrite,
}

/// The resolved configuration, as YAML.
pub const CONFIG_FILE: &str = "config.yaml";
/// Human-readable log of the run.
pub const LOG_FILE: &str = "train.log";
/// One JSON record per logged step.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Loss curves.
pub const PLOT_FILE: &str = "loss_curves.png";
/// The teacher backbone at the end, official keys.
pub const EXPORT_FILE: &str = "teacher_backbone.safetensors";
/// k-NN results (written by the loop).
pub const KNN_FILE: &str = "knn.json";
/// Checkpoint folder.
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// Every name dinotrain writes at the top of a run folder (`--overwrite` removes only these).
pub const OWN_ENTRIES: &[&str] = &[
    CONFIG_FILE,
    LOG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    EXPORT_FILE,
    KNN_FILE,
    CHECKPOINT_DIR,
    super::tensorboard::TENSORBOARD_DIR,
];

/// A prepared run folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    /// Applies the folder policy and creates the folder (and `checkpoints/`).
    pub fn prepare(root: &Path, mode: OutdirMode) -> Result<Self> {
        if root.exists() && !root.is_dir() {
            return Err(Error::Config(format!(
                "output folder {} is a file",
                root.display()
            )));
        }
        let entries = entries(root)?;
        match mode {
            OutdirMode::Fresh if !entries.is_empty() => {
                return Err(Error::Config(format!(
                    "output folder {} is not empty: pass --resume to continue the run in it, \
                     or --overwrite to replace dinotrain's files in it (or choose another --out)",
                    root.display()
                )))
            }
            OutdirMode::Fresh => {}
            OutdirMode::Resume => {
                if checkpoint::latest(&root.join(CHECKPOINT_DIR))?.is_none() {
                    return Err(Error::Config(format!(
                        "--resume: no checkpoint in {} (nothing to resume; start without --resume)",
                        root.join(CHECKPOINT_DIR).display()
                    )));
                }
            }
            OutdirMode::Overwrite => {
                let foreign: Vec<&String> =
                    entries.iter().filter(|name| !is_own(root, name)).collect();
                if !foreign.is_empty() {
                    let shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
                    return Err(Error::Config(format!(
                        "--overwrite refused: {} holds files dinotrain did not write ({}{}); \
                         choose another --out or move them",
                        root.display(),
                        shown.join(", "),
                        if foreign.len() > 5 { ", ..." } else { "" }
                    )));
                }
                for name in &entries {
                    let path = root.join(name);
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(|e| Error::io(&path, e))?;
                }
            }
        }
        let dir = RunDir {
            root: root.to_path_buf(),
        };
        std::fs::create_dir_all(dir.checkpoints()).map_err(|e| Error::io(dir.checkpoints(), e))?;
        Ok(dir)
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join(LOG_FILE)
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }
    pub fn plot_path(&self) -> PathBuf {
        self.root.join(PLOT_FILE)
    }
    pub fn export_path(&self) -> PathBuf {
        self.root.join(EXPORT_FILE)
    }
    pub fn knn_path(&self) -> PathBuf {
        self.root.join(KNN_FILE)
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(CHECKPOINT_DIR)
    }
    /// The newest checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        checkpoint::latest(&self.checkpoints())
    }
}

/// Whether `name` (a top-level entry of `root`) is dinotrain's: a known name, or a temp file
/// left by an interrupted atomic write of one (`.<name>.tmp.<pid>`).
fn is_own(root: &Path, name: &str) -> bool {
    if OWN_ENTRIES.contains(&name) {
        // The checkpoint folder only counts as ours if everything in it is.
        if name == CHECKPOINT_DIR {
            return entries(&root.join(name)).is_ok_and(|inner| {
                inner.iter().all(|f| {
                    let tmp = f.strip_prefix('.').and_then(|f| f.split_once(".tmp."));
                    let base = tmp.map_or(f.as_str(), |(b, _)| b);
                    base.starts_with("step_") && base.ends_with(".safetensors")
                })
            });
        }
        return true;
    }
    name.strip_prefix('.')
        .and_then(|n| n.split_once(".tmp."))
        .is_some_and(|(base, _)| OWN_ENTRIES.contains(&base))
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut names = Vec::new();
            for e in rd {
                let e = e.map_err(|e| Error::io(dir, e))?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// `train.log`: timestamped lines, appended and flushed one by one (a killed run keeps its log).
#[derive(Debug)]
pub struct RunLog {
    path: PathBuf,
    file: File,
}

impl RunLog {
    /// Opens (appending) the log at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(RunLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `[UTC time] message` and flushes.
    pub fn line(&mut self, message: &str) -> Result<()> {
        let text = format!("[{}] {message}\n", utc_timestamp(SystemTime::now()));
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time (UTC, proleptic Gregorian).
pub fn utc_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661); // 2000-02-29 01:01:01
        assert_eq!(utc_timestamp(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // 2026-12-31 23:59:59
        assert_eq!(utc_timestamp(t), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn disk_full_is_named() {
        let e = Error::io("/x/ckpt", std::io::Error::from_raw_os_error(28));
        let msg = e.to_string();
        assert!(
            msg.contains("disk full") && msg.contains("/x/ckpt"),
            "{msg}"
        );
        let e = Error::io("/y", std::io::Error::from_raw_os_error(122));
        assert!(matches!(e, Error::DiskFull { .. }));
        let e = Error::io("/y", std::io::Error::from_raw_os_error(2));
        assert!(matches!(e, Error::Io { .. }));
    }

    #[test]
    fn log_lines_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        RunLog::open(&path).unwrap().line("first").unwrap();
        RunLog::open(&path).unwrap().line("second").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with("] first") && lines[1].ends_with("] second"));
        assert!(lines[0].starts_with("[20"), "{}", lines[0]);
    }
}
