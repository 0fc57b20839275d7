//! The run folder: what is in it, when it may be reused, and the `train.log` writer.
//!
//! Policy: one process at a time (an advisory lock, [`super::lock`]). A new run needs an absent
//! or empty folder (or one a run left that failed before its first checkpoint). `--resume`
//! continues the run in the folder (it must hold a checkpoint). `--overwrite` deletes
//! dinotrain's own files, recognised by their content, and keeps the folder, but refuses when it
//! finds anything else, so a mistyped `--out` never deletes a user's data.

use super::checkpoint;
use super::lock::{RunLock, LOCK_FILE};
use super::tensorboard::TENSORBOARD_DIR;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    TENSORBOARD_DIR,
];

/// A prepared run folder, locked for this process while any clone of it lives.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub root: PathBuf,
    lock: Arc<RunLock>,
    /// How the run starts: the mode asked for, except a `Resume` of a run that wrote no
    /// checkpoint, which starts again (`Fresh`).
    pub mode: OutdirMode,
}

impl PartialEq for RunDir {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root
    }
}
impl Eq for RunDir {}

impl RunDir {
    /// Takes the folder's lock (see [`super::lock`]), removes temp files that killed writes
    /// left, applies the folder policy and creates the folder (and `checkpoints/`).
    pub fn prepare(root: &Path, mut mode: OutdirMode) -> Result<Self> {
        if root.exists() && !root.is_dir() {
            return Err(Error::Config(format!(
                "output folder {} is a file",
                root.display()
            )));
        }
        // The lock comes first: two processes never both pass the checks below.
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let lock = Arc::new(RunLock::acquire(root)?);
        remove_stale_temp_files(root)?;
        let entries: Vec<String> = entries(root)?
            .into_iter()
            .filter(|n| n != LOCK_FILE)
            .collect();
        match mode {
            OutdirMode::Fresh if !entries.is_empty() && !is_failed_start(root, &entries) => {
                return Err(Error::Config(format!(
                    "output folder {} is not empty: pass --resume to continue the run in it, \
                     or --overwrite to replace dinotrain's files in it (or choose another --out)",
                    root.display()
                )))
            }
            OutdirMode::Fresh => {}
            OutdirMode::Resume => {
                if checkpoint::latest(&root.join(CHECKPOINT_DIR))?.is_none() {
                    // A run stopped (killed, failed) before its first checkpoint: nothing of
                    // it to continue, so it starts again, as its --resume line promised. A
                    // folder without a run's config.yaml (a mistyped path) is refused.
                    let started = entries.iter().any(|name| name == CONFIG_FILE);
                    if !started || !entries.iter().all(|name| is_own(root, name)) {
                        return Err(Error::Config(format!(
                            "--resume: no checkpoint in {} (nothing to resume; start without \
                             --resume)",
                            root.join(CHECKPOINT_DIR).display()
                        )));
                    }
                    log::warn!(
                        "{}: no checkpoint yet (the run stopped before its first one); \
                         starting it again from step 0",
                        root.display()
                    );
                    remove_own_files(root, &entries)?;
                    mode = OutdirMode::Fresh;
                }
            }
            OutdirMode::Overwrite => remove_own_files(root, &entries)?,
        }
        let dir = RunDir {
            root: root.to_path_buf(),
            lock,
            mode,
        };
        std::fs::create_dir_all(dir.checkpoints()).map_err(|e| Error::io(dir.checkpoints(), e))?;
        Ok(dir)
    }

    /// The lock file this run holds.
    pub fn lock_path(&self) -> &Path {
        self.lock.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
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

/// The name a temp file of an interrupted atomic write of `base` has (`.<base>.tmp.<pid>`).
fn temp_base(name: &str) -> Option<&str> {
    let (base, pid) = name.strip_prefix('.')?.split_once(".tmp.")?;
    pid.parse::<u32>().is_ok().then_some(base)
}

fn is_checkpoint_name(name: &str) -> bool {
    name.starts_with("step_") && name.ends_with(".safetensors")
}

/// Removes the temp files that killed writes of dinotrain's files left in the run folder and
/// its checkpoint folder (the caller holds the lock: no live write owns them).
fn remove_stale_temp_files(root: &Path) -> Result<()> {
    let ckpts = root.join(CHECKPOINT_DIR);
    for (dir, own) in [
        (
            root,
            &(|b: &str| OWN_ENTRIES.contains(&b)) as &dyn Fn(&str) -> bool,
        ),
        (ckpts.as_path(), &is_checkpoint_name),
    ] {
        if !dir.is_dir() {
            continue;
        }
        for name in entries(dir)? {
            if temp_base(&name).is_some_and(own) {
                let path = dir.join(&name);
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                log::info!("removed {} (left by an interrupted write)", path.display());
            }
        }
    }
    Ok(())
}

/// Deletes `entries` of `root` (`--overwrite`, or a resume with nothing to resume), refusing
/// when any is not dinotrain's.
fn remove_own_files(root: &Path, entries: &[String]) -> Result<()> {
    let foreign: Vec<&String> = entries.iter().filter(|name| !is_own(root, name)).collect();
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
    for name in entries {
        let path = root.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Whether the folder holds only what a run that failed before its first step leaves: its
/// `config.yaml`, `train.log`, the TensorBoard file it opened and an empty `checkpoints/` (a
/// new run may start there).
fn is_failed_start(root: &Path, entries: &[String]) -> bool {
    entries.iter().all(|name| match name.as_str() {
        CONFIG_FILE | LOG_FILE | TENSORBOARD_DIR => is_own(root, name),
        CHECKPOINT_DIR => self::entries(&root.join(name)).is_ok_and(|e| e.is_empty()),
        _ => false,
    })
}

/// The first `n` bytes of a file (fewer when it is shorter; empty when unreadable).
fn head(path: &Path, n: u64) -> Vec<u8> {
    use std::io::Read;
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(n).read_to_end(&mut buf);
    }
    buf
}

/// The `__metadata__` of a safetensors file, when it is one.
fn safetensors_metadata(path: &Path) -> Option<serde_json::Map<String, serde_json::Value>> {
    let first = head(path, 8);
    let n = u64::from_le_bytes(first.get(..8)?.try_into().ok()?);
    if n > 100 << 20 {
        return None;
    }
    let bytes = head(path, 8 + n);
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..)?).ok()?;
    header.get("__metadata__")?.as_object().cloned()
}

/// Whether the file at `path` (named `name`) is one dinotrain wrote, by its content.
fn is_own_file(path: &Path, name: &str) -> bool {
    let text = || String::from_utf8_lossy(&head(path, 4096)).into_owned();
    let first_json = || -> Option<serde_json::Value> {
        serde_json::from_str(text().lines().next().unwrap_or("")).ok()
    };
    match name {
        CONFIG_FILE => text().starts_with("# dinotrain resolved configuration"),
        LOG_FILE => {
            let t = text();
            t.is_empty() || (t.starts_with("[") && t.get(21..23) == Some("] "))
        }
        METRICS_FILE => {
            text().is_empty()
                || first_json()
                    .is_some_and(|v| v.get("step").is_some() && v.get("losses").is_some())
        }
        KNN_FILE => first_json().is_some_and(|v| v.get("trained_top1").is_some()),
        PLOT_FILE => head(path, 8) == b"\x89PNG\r\n\x1a\n",
        EXPORT_FILE => safetensors_metadata(path)
            .is_some_and(|m| m.keys().any(|k| k.starts_with("dinotrain."))),
        LOCK_FILE => super::lock::is_lock_content(&text()),
        _ => {
            is_checkpoint_name(name)
                && safetensors_metadata(path).is_some_and(|m| {
                    m.get("format").and_then(|v| v.as_str()) == Some(checkpoint::FORMAT_TAG)
                })
        }
    }
}

/// Whether `name` (a top-level entry of `root`) is dinotrain's: one of its files with content
/// it writes, or a temp file left by an interrupted atomic write of one (`.<name>.tmp.<pid>`).
fn is_own(root: &Path, name: &str) -> bool {
    let path = root.join(name);
    if name == TENSORBOARD_DIR {
        // Ours if it holds only event files whose first record is a TensorBoard version event.
        return path.is_dir()
            && entries(&path).is_ok_and(|inner| {
                inner.iter().all(|f| {
                    f.starts_with("events.out.tfevents.")
                        && head(&path.join(f), 64)
                            .windows(13)
                            .any(|w| w == b"brain.Event:2")
                })
            });
    }
    if name == CHECKPOINT_DIR {
        // The checkpoint folder only counts as ours if everything in it is.
        return path.is_dir()
            && entries(&path).is_ok_and(|inner| {
                inner.iter().all(|f| {
                    temp_base(f).is_some_and(is_checkpoint_name) || is_own_file(&path.join(f), f)
                })
            });
    }
    if OWN_ENTRIES.contains(&name) || name == LOCK_FILE {
        return path.is_file() && is_own_file(&path, name);
    }
    temp_base(name).is_some_and(|base| OWN_ENTRIES.contains(&base))
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
