//! `metrics.jsonl`: one JSON object per logged step, appended and flushed as it happens.
//!
//! A record holds every loss term, the scheduled scalars, gradient norms per submodule and
//! throughput. On resume, records past the checkpoint's step are dropped first, so the file
//! reads as one uninterrupted run.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One step's record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The iteration this record describes (0-based).
    pub step: u64,
    pub epoch: u64,
    /// Every loss term by name (`dino_local_crops_loss`, `dino_global_crops_loss`, `ibot_loss`,
    /// `koleo_loss`) and `total`.
    #[serde(deserialize_with = "map_f64_or_nan")]
    pub losses: BTreeMap<String, f64>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub last_layer_lr: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub weight_decay: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub momentum: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub teacher_temp: f64,
    /// Gradient L2 norm per student submodule (`backbone`, `dino_head`, `ibot_head`) and `total`,
    /// before clipping.
    #[serde(deserialize_with = "map_f64_or_nan")]
    pub grad_norms: BTreeMap<String, f64>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub images_per_s: f64,
    /// Share of the step's wall time spent waiting for data (0..1).
    #[serde(deserialize_with = "f64_or_nan")]
    pub data_wait_share: f64,
    /// Seconds since the run (or the resumed run) started.
    #[serde(deserialize_with = "f64_or_nan")]
    pub elapsed_s: f64,
    /// Anything else worth plotting (teacher entropy, k-NN accuracy, ...).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "map_f64_or_nan"
    )]
    pub extra: BTreeMap<String, f64>,
    /// Health findings first reported at this step (collapse, no learning): see
    /// [`crate::train::health`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<HealthWarning>,
}

/// A health finding as `metrics.jsonl` records it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthWarning {
    /// `uniform_targets`, `collapsed_features` or `no_learning`.
    pub kind: String,
    /// What is wrong and what to change.
    pub message: String,
}

impl StepMetrics {
    /// The first non-finite loss term (name and value), if any: a run stops on it.
    pub fn non_finite_loss(&self) -> Option<(&str, f64)> {
        self.losses
            .iter()
            .find(|(_, v)| !v.is_finite())
            .map(|(k, v)| (k.as_str(), *v))
    }
}

/// Appends records to `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending. With `resume_step = Some(s)`, records with `step >= s` (written
    /// after the checkpoint the run resumes from) are removed first.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let Some(s) = resume_step {
            if path.exists() {
                // The records before the resumed step keep their bytes (no parse / serialise
                // round trip); later ones and a torn last line go.
                read(path)?; // the same checks as a reader's
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let mut kept = String::with_capacity(text.len());
                for l in text.split_inclusive('\n') {
                    let step = serde_json::from_str::<serde_json::Value>(l.trim())
                        .ok()
                        .and_then(|v| v.get("step").and_then(|x| x.as_u64()));
                    if l.ends_with('\n') && step.is_some_and(|step| step < s) {
                        kept.push_str(l);
                    }
                }
                if kept != text {
                    crate::io::write_atomic(path, kept.as_bytes())?;
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record and flushes it.
    pub fn write(&mut self, record: &StepMetrics) -> Result<()> {
        let text = line(record)?;
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn line(record: &StepMetrics) -> Result<String> {
    let mut s = serde_json::to_string(record)
        .map_err(|e| Error::Config(format!("cannot encode metrics: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// Reads every record of a `metrics.jsonl`. A torn last line (a killed run) is skipped; a bad
/// line elsewhere is an error naming its number. Non-finite values are stored as `null` by
/// JSON and read back as NaN.
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match parse_line(l) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(Error::Data(format!(
                    "{} line {}: {e}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(out)
}

fn parse_line(l: &str) -> std::result::Result<StepMetrics, serde_json::Error> {
    serde_json::from_str(l)
}

// JSON has no NaN: serde_json writes non-finite floats as null. These read null back as NaN.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn map_f64_or_nan<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    let raw = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            losses: [
                ("dino_local_crops_loss".into(), loss),
                ("total".into(), loss * 2.0),
            ]
            .into_iter()
            .collect(),
            lr: 1e-3,
            grad_norms: [("backbone".into(), 0.5)].into_iter().collect(),
            images_per_s: 100.0,
            data_wait_share: 0.1,
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip_and_resume_drops_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::open(&path, None).unwrap();
        for s in 0..5 {
            w.write(&record(s, 8.0 - s as f64)).unwrap();
        }
        drop(w);
        let all = read(&path).unwrap();
        assert_eq!(
            all,
            (0..5)
                .map(|s| record(s, 8.0 - s as f64))
                .collect::<Vec<_>>()
        );
        let mut w = MetricsWriter::open(&path, Some(3)).unwrap();
        w.write(&record(3, 1.0)).unwrap();
        let all = read(&path).unwrap();
        assert_eq!(all.iter().map(|r| r.step).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(all[3].losses["total"], 2.0);
    }

    #[test]
    fn resume_keeps_the_earlier_records_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        // A digit string serde would print differently, and spacing it would drop.
        let first = line(&record(0, 8.0))
            .unwrap()
            .replacen('{', "{ ", 1)
            .replace("100.0", "100.00000000000001");
        let second = line(&record(1, 7.0)).unwrap();
        let later = line(&record(2, 6.0)).unwrap();
        std::fs::write(&path, format!("{first}{second}{later}{{\"step\":3,")).unwrap();
        drop(MetricsWriter::open(&path, Some(2)).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{first}{second}")
        );
    }

    #[test]
    fn torn_last_line_is_skipped_and_nan_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut text = line(&record(0, 1.0)).unwrap();
        text.push_str(&line(&record(1, f64::NAN)).unwrap());
        text.push_str("{\"step\": 2, \"loss");
        std::fs::write(&path, &text).unwrap();
        let all = read(&path).unwrap();
        assert_eq!(all.len(), 2);
        let (name, v) = all[1].non_finite_loss().unwrap();
        assert_eq!(name, "dino_local_crops_loss");
        assert!(v.is_nan());
        assert!(all[0].non_finite_loss().is_none());
        std::fs::write(&path, format!("garbage\n{text}\n")).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
