//! The training checkpoint: one safetensors file with everything a resume needs.
//!
//! Tensors (official keys from the [`ParamTable`], f32):
//! `student.<key>`, `teacher.<key>`, `exp_avg.<key>`, `exp_avg_sq.<key>` (AdamW moments),
//! `buffer.<name>` (centers and any other state), `optim.step` (I64, AdamW's step count).
//! Metadata: `format` = [`FORMAT_TAG`], `version` = [`FORMAT_VERSION`], `position` (JSON
//! [`RunPosition`]), `config` (JSON `key → value` of the settings that decide the computation),
//! `config_fingerprint`, `crc32` of every tensor's bytes in name order, and `extra` (JSON, free).
//!
//! Files are `step_<8 digits>.safetensors` in the checkpoint folder, written atomically (temp
//! file, fsync, rename), so a killed run leaves either the old or the new file, never half of
//! one. A file that does not parse, lacks the tag, fails its checksum or does not fit the model
//! is refused with a message naming it.

use crate::error::{Error, Result};
use crate::io::{TensorFile, Value};
use crate::nn::params::ParamTable;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `format` metadata value of every dinotrain checkpoint.
pub const FORMAT_TAG: &str = "dinotrain-checkpoint";
/// The layout version; a reader refuses newer versions.
pub const FORMAT_VERSION: u32 = 1;

const STUDENT: &str = "student.";
const TEACHER: &str = "teacher.";
const EXP_AVG: &str = "exp_avg.";
const EXP_AVG_SQ: &str = "exp_avg_sq.";
const BUFFER: &str = "buffer.";
const ADAM_STEP: &str = "optim.step";

/// Where the run stands: enough to draw exactly what the uninterrupted run would draw next
/// (every random stream is keyed by seed and step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPosition {
    /// Iterations completed (the next iteration to run).
    pub step: u64,
    /// Passes over the data completed.
    pub epoch: u64,
    /// The run seed.
    pub seed: u64,
    /// Images consumed within the current epoch (the data order position).
    pub images_in_epoch: u64,
}

/// Whether a configuration change refuses a resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigCheck {
    /// Any differing key is an error ([`Error::ConfigChanged`]).
    Strict,
    /// The user asked to continue with changed settings.
    AllowChanges,
}

/// The state to save, borrowed from the loop. Every flat buffer has the [`ParamTable`] layout.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointRef<'a> {
    pub params: &'a ParamTable,
    pub student: &'a [f32],
    pub teacher: &'a [f32],
    pub exp_avg: &'a [f32],
    pub exp_avg_sq: &'a [f32],
    /// AdamW's step count (it sets the bias corrections).
    pub adam_step: u64,
    /// Named state tensors: the DINO and iBOT centers, and anything else that must survive.
    pub buffers: &'a [(&'a str, &'a Tensor)],
    pub position: RunPosition,
    /// The settings that decide the computation (`ResolvedConfig::resume_identity`).
    pub config: &'a BTreeMap<String, String>,
    /// Free-form metadata (for example the dinotrain version).
    pub extra: &'a BTreeMap<String, String>,
}

/// A loaded checkpoint (flat buffers in the [`ParamTable`] layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub student: Vec<f32>,
    pub teacher: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub adam_step: u64,
    pub buffers: BTreeMap<String, Tensor>,
    pub position: RunPosition,
    pub config: BTreeMap<String, String>,
    pub extra: BTreeMap<String, String>,
}

/// The file name of the checkpoint after `step` iterations.
pub fn file_name(step: u64) -> String {
    format!("step_{step:08}.safetensors")
}

fn step_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("step_")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Checkpoints in `dir`, oldest first (an absent folder has none).
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if let Some(step) = step_of(&path) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// Removes all but the newest `keep` checkpoints; returns the removed paths.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list(dir)?;
    let excess = all.len().saturating_sub(keep.max(1));
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// A stable fingerprint of a configuration map (FNV-1a 64 over `key=value\n` lines).
pub fn fingerprint(config: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in config {
        for b in k.bytes().chain([b'=']).chain(v.bytes()).chain([b'\n']) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn checksum(tensors: &BTreeMap<String, Value>) -> String {
    let mut hasher = crc32fast::Hasher::new();
    for (name, value) in tensors {
        hasher.update(name.as_bytes());
        match value {
            Value::F32(t) => hasher.update(bytemuck::cast_slice(&t.data)),
            Value::I64 { data, .. } => hasher.update(bytemuck::cast_slice(data)),
            Value::U8 { data, .. } => hasher.update(data),
        }
    }
    format!("{:08x}", hasher.finalize())
}

/// Writes the checkpoint of `state` into `dir` (atomically) and returns its path.
pub fn save(dir: &Path, state: &CheckpointRef<'_>) -> Result<PathBuf> {
    let path = dir.join(file_name(state.position.step));
    let table = state.params;
    for (what, buf) in [
        ("student", state.student),
        ("teacher", state.teacher),
        ("exp_avg", state.exp_avg),
        ("exp_avg_sq", state.exp_avg_sq),
    ] {
        if buf.len() != table.len() {
            return Err(Error::shape(
                "checkpoint::save",
                format!(
                    "{what} has {} values, the parameter table {}",
                    buf.len(),
                    table.len()
                ),
            ));
        }
    }
    let mut file = TensorFile::default();
    for spec in table.specs() {
        for (prefix, buf) in [
            (STUDENT, state.student),
            (TEACHER, state.teacher),
            (EXP_AVG, state.exp_avg),
            (EXP_AVG_SQ, state.exp_avg_sq),
        ] {
            file.insert(
                format!("{prefix}{}", spec.name),
                Tensor {
                    shape: spec.shape.clone(),
                    data: buf[spec.at.range()].to_vec(),
                },
            );
        }
    }
    for (name, t) in state.buffers {
        file.insert(format!("{BUFFER}{name}"), (*t).clone());
    }
    file.tensors.insert(
        ADAM_STEP.into(),
        Value::I64 {
            shape: vec![1],
            data: vec![state.adam_step as i64],
        },
    );
    let meta = &mut file.metadata;
    meta.insert("format".into(), FORMAT_TAG.into());
    meta.insert("version".into(), FORMAT_VERSION.to_string());
    meta.insert("position".into(), to_json(&state.position)?);
    meta.insert("config".into(), to_json(state.config)?);
    meta.insert("config_fingerprint".into(), fingerprint(state.config));
    meta.insert("extra".into(), to_json(state.extra)?);
    meta.insert("crc32".into(), checksum(&file.tensors));
    std::fs::create_dir_all(dir).map_err(|e| super::outdir::io_error(dir, e))?;
    file.write(&path).map_err(super::outdir::disk_full)?;
    Ok(path)
}

/// Reads and checks a checkpoint against the model's parameter table and the current settings.
pub fn load(
    path: &Path,
    params: &ParamTable,
    config: &BTreeMap<String, String>,
    check: ConfigCheck,
) -> Result<Checkpoint> {
    let refuse = |detail: String| Error::Checkpoint {
        file: path.to_path_buf(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut file = TensorFile::from_bytes(&bytes, path).map_err(|e| {
        refuse(format!(
            "torn or truncated file, or not a safetensors file ({e}); delete it to resume \
             from the previous checkpoint"
        ))
    })?;
    let meta = |key: &str| -> Result<&String> {
        file.metadata
            .get(key)
            .ok_or_else(|| refuse(format!("metadata '{key}' is missing")))
    };
    match file.metadata.get("format") {
        Some(tag) if tag == FORMAT_TAG => {}
        Some(tag) => {
            return Err(refuse(format!(
                "not a dinotrain checkpoint (format '{tag}', expected '{FORMAT_TAG}')"
            )))
        }
        None => {
            return Err(refuse(format!(
                "not a dinotrain checkpoint (no format tag; expected '{FORMAT_TAG}')"
            )))
        }
    }
    let version: u32 = meta("version")?
        .parse()
        .map_err(|_| refuse("unreadable version".into()))?;
    if version != FORMAT_VERSION {
        return Err(refuse(format!(
            "format version {version}; this dinotrain reads version {FORMAT_VERSION}"
        )));
    }
    if &checksum(&file.tensors) != meta("crc32")? {
        return Err(refuse(
            "checksum mismatch: the file is damaged; delete it to resume from the previous \
             checkpoint"
                .into(),
        ));
    }
    let parse = |key: &str| -> Result<serde_json::Value> {
        serde_json::from_str(meta(key)?).map_err(|e| refuse(format!("metadata '{key}': {e}")))
    };
    let position: RunPosition = serde_json::from_value(parse("position")?)
        .map_err(|e| refuse(format!("metadata 'position': {e}")))?;
    let saved_config: BTreeMap<String, String> = serde_json::from_value(parse("config")?)
        .map_err(|e| refuse(format!("metadata 'config': {e}")))?;
    let extra: BTreeMap<String, String> = serde_json::from_value(parse("extra")?)
        .map_err(|e| refuse(format!("metadata 'extra': {e}")))?;

    let diffs = config_diffs(&saved_config, config);
    if check == ConfigCheck::Strict && !diffs.is_empty() {
        return Err(Error::ConfigChanged {
            file: path.to_path_buf(),
            diffs,
        });
    }

    let adam_step = match file.tensors.remove(ADAM_STEP) {
        Some(Value::I64 { data, .. }) if data.len() == 1 && data[0] >= 0 => data[0] as u64,
        _ => return Err(refuse(format!("'{ADAM_STEP}' is missing or malformed"))),
    };
    let mut flat = |prefix: &str| -> Result<Vec<f32>> {
        let mut out = vec![0f32; params.len()];
        for spec in params.specs() {
            let name = format!("{prefix}{}", spec.name);
            match file.tensors.remove(&name) {
                Some(Value::F32(t)) if t.shape == spec.shape => {
                    out[spec.at.range()].copy_from_slice(&t.data)
                }
                Some(Value::F32(t)) => {
                    return Err(refuse(format!(
                        "'{name}' has shape {:?}, the model needs {:?}",
                        t.shape, spec.shape
                    )))
                }
                Some(v) => {
                    return Err(refuse(format!(
                        "'{name}' is {}, expected F32",
                        v.dtype_name()
                    )))
                }
                None => {
                    return Err(refuse(format!(
                        "'{name}' is missing: the checkpoint belongs to another model"
                    )))
                }
            }
        }
        Ok(out)
    };
    let student = flat(STUDENT)?;
    let teacher = flat(TEACHER)?;
    let exp_avg = flat(EXP_AVG)?;
    let exp_avg_sq = flat(EXP_AVG_SQ)?;
    let mut buffers = BTreeMap::new();
    let mut unknown = Vec::new();
    for (name, value) in std::mem::take(&mut file.tensors) {
        match (name.strip_prefix(BUFFER), value) {
            (Some(b), Value::F32(t)) => {
                buffers.insert(b.to_string(), t);
            }
            _ => unknown.push(name),
        }
    }
    if !unknown.is_empty() {
        unknown.truncate(5);
        return Err(refuse(format!(
            "it holds tensors the model does not have ({}): it belongs to another model",
            unknown.join(", ")
        )));
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        student,
        teacher,
        exp_avg,
        exp_avg_sq,
        adam_step,
        buffers,
        position,
        config: saved_config,
        extra,
    })
}

/// `key: was -> now` for every key that differs (absent keys shown as `(absent)`).
pub fn config_diffs(
    saved: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Vec<String> {
    let absent = "(absent)".to_string();
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (
                saved.get(k).unwrap_or(&absent),
                now.get(k).unwrap_or(&absent),
            );
            (a != b).then(|| format!("{k}: {a} -> {b}"))
        })
        .collect()
}

/// JSON text for a metadata entry.
fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::Config(format!("cannot encode checkpoint metadata: {e}")))
}
