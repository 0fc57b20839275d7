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
use crate::nn::params::ParamTable;
use crate::tensor::Tensor;
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
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

/// One tensor of a checkpoint as it goes to disk: a view of the caller's buffers, no copy.
struct Entry<'a> {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

/// CRC-32 over every tensor's name and bytes, in name order.
fn checksum<'a>(entries: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = crc32fast::Hasher::new();
    for (name, bytes) in entries {
        hasher.update(name.as_bytes());
        hasher.update(bytes);
    }
    format!("{:08x}", hasher.finalize())
}

/// Writes the checkpoint of `state` into `dir` (atomically) and returns its path.
///
/// The file is streamed from the caller's buffers (no copy of the model in memory): a
/// safetensors header, then each tensor's bytes, into a temp file that is fsynced and renamed.
pub fn save(dir: &Path, state: &CheckpointRef<'_>) -> Result<PathBuf> {
    if cfg!(target_endian = "big") {
        return Err(Error::Unsupported(
            "checkpoints are written on little-endian machines only".into(),
        ));
    }
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
    let adam_step = (state.adam_step as i64).to_le_bytes();
    let mut entries = Vec::with_capacity(4 * table.specs().len() + state.buffers.len() + 1);
    for spec in table.specs() {
        for (prefix, buf) in [
            (STUDENT, state.student),
            (TEACHER, state.teacher),
            (EXP_AVG, state.exp_avg),
            (EXP_AVG_SQ, state.exp_avg_sq),
        ] {
            entries.push(Entry {
                name: format!("{prefix}{}", spec.name),
                dtype: "F32",
                shape: spec.shape.clone(),
                bytes: bytemuck::cast_slice(&buf[spec.at.range()]),
            });
        }
    }
    for (name, t) in state.buffers {
        entries.push(Entry {
            name: format!("{BUFFER}{name}"),
            dtype: "F32",
            shape: t.shape.clone(),
            bytes: bytemuck::cast_slice(&t.data),
        });
    }
    entries.push(Entry {
        name: ADAM_STEP.into(),
        dtype: "I64",
        shape: vec![1],
        bytes: &adam_step,
    });
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = entries.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(Error::Config(format!(
            "checkpoint: two tensors are named '{}'",
            w[0].name
        )));
    }

    let mut meta = serde_json::Map::new();
    let mut put = |k: &str, v: String| meta.insert(k.into(), serde_json::Value::String(v));
    put("format", FORMAT_TAG.into());
    put("version", FORMAT_VERSION.to_string());
    put("position", to_json(&state.position)?);
    put("config", to_json(state.config)?);
    put("config_fingerprint", fingerprint(state.config));
    put("extra", to_json(state.extra)?);
    put(
        "crc32",
        checksum(entries.iter().map(|e| (e.name.as_str(), e.bytes))),
    );
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0usize;
    for e in &entries {
        let end = offset + e.bytes.len();
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = to_json(&header)?.into_bytes();
    // safetensors pads the header with spaces so the data starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_streamed(&path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for e in &entries {
            w.write_all(e.bytes)?;
        }
        Ok(())
    })?;
    Ok(path)
}

/// Atomic write from a producer: temp file beside `path`, fsync, rename, fsync of the folder.
fn write_streamed(
    path: &Path,
    produce: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        produce(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            // Best effort: not every filesystem can sync a directory.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Reads and checks a checkpoint against the model's parameter table and the current settings.
pub fn load(
    path: &Path,
    params: &ParamTable,
    config: &BTreeMap<String, String>,
    check: ConfigCheck,
) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = CheckedFile::open(path, &bytes)?;
    let position: RunPosition = file.json("position")?;
    let saved_config: BTreeMap<String, String> = file.json("config")?;
    let extra: BTreeMap<String, String> = file.json("extra")?;
    let diffs = config_diffs(&saved_config, config);
    if check == ConfigCheck::Strict && !diffs.is_empty() {
        return Err(Error::ConfigChanged {
            file: path.to_path_buf(),
            diffs,
        });
    }
    let adam_step = match file.st.tensor(ADAM_STEP) {
        Ok(v) if v.dtype() == Dtype::I64 && v.data().len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(v.data());
            u64::try_from(i64::from_le_bytes(b))
                .map_err(|_| file.refuse(format!("'{ADAM_STEP}' is negative")))?
        }
        _ => return Err(file.refuse(format!("'{ADAM_STEP}' is missing or malformed"))),
    };
    Ok(Checkpoint {
        path: path.to_path_buf(),
        student: file.flat(params, STUDENT)?,
        teacher: file.flat(params, TEACHER)?,
        exp_avg: file.flat(params, EXP_AVG)?,
        exp_avg_sq: file.flat(params, EXP_AVG_SQ)?,
        adam_step,
        buffers: file.buffers(params)?,
        position,
        config: saved_config,
        extra,
    })
}

/// A checkpoint file whose format tag, version and checksum have been checked.
struct CheckedFile<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
    metadata: BTreeMap<String, String>,
}

impl<'a> CheckedFile<'a> {
    fn open(path: &'a Path, bytes: &'a [u8]) -> Result<Self> {
        let refuse = |detail: String| Error::Checkpoint {
            file: path.to_path_buf(),
            detail,
        };
        let torn = |e: safetensors::SafeTensorError| {
            refuse(format!(
                "torn or truncated file, or not a safetensors file ({e}); delete it to resume \
                 from the previous checkpoint"
            ))
        };
        let st = SafeTensors::deserialize(bytes).map_err(torn)?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(torn)?;
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let file = CheckedFile { path, st, metadata };
        match file.metadata.get("format") {
            Some(tag) if tag == FORMAT_TAG => {}
            tag => {
                let found = tag.map_or("no format tag".to_string(), |t| format!("format '{t}'"));
                return Err(refuse(format!(
                    "not a dinotrain checkpoint ({found}, expected '{FORMAT_TAG}')"
                )));
            }
        }
        let version: u32 = file
            .meta("version")?
            .parse()
            .map_err(|_| refuse("unreadable version".into()))?;
        if version != FORMAT_VERSION {
            return Err(refuse(format!(
                "format version {version}; this dinotrain reads version {FORMAT_VERSION}"
            )));
        }
        let mut views = file.st.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        if &checksum(views.iter().map(|(n, v)| (n.as_str(), v.data()))) != file.meta("crc32")? {
            return Err(refuse(
                "checksum mismatch: the file is damaged; delete it to resume from the previous \
                 checkpoint"
                    .into(),
            ));
        }
        Ok(file)
    }

    fn refuse(&self, detail: String) -> Error {
        Error::Checkpoint {
            file: self.path.to_path_buf(),
            detail,
        }
    }

    fn meta(&self, key: &str) -> Result<&String> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.refuse(format!("metadata '{key}' is missing")))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        serde_json::from_str(self.meta(key)?)
            .map_err(|e| self.refuse(format!("metadata '{key}': {e}")))
    }

    /// Every parameter of `params` under `prefix`, as one flat buffer in table order.
    fn flat(&self, params: &ParamTable, prefix: &str) -> Result<Vec<f32>> {
        let mut out = vec![0f32; params.len()];
        for spec in params.specs() {
            let name = format!("{prefix}{}", spec.name);
            let view = self.st.tensor(&name).map_err(|_| {
                self.refuse(format!(
                    "'{name}' is missing: the checkpoint belongs to another model"
                ))
            })?;
            if view.dtype() != Dtype::F32 {
                let dtype = view.dtype();
                return Err(self.refuse(format!("'{name}' is {dtype:?}, expected F32")));
            }
            if view.shape() != spec.shape.as_slice() {
                return Err(self.refuse(format!(
                    "'{name}' has shape {:?}, the model needs {:?}",
                    view.shape(),
                    spec.shape
                )));
            }
            for (d, s) in out[spec.at.range()]
                .iter_mut()
                .zip(view.data().chunks_exact(4))
            {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        Ok(out)
    }

    /// The f32 buffers (centers and such); any tensor that is neither a parameter, the step
    /// nor a buffer means the file belongs to another model.
    fn buffers(&self, params: &ParamTable) -> Result<BTreeMap<String, Tensor>> {
        let mut buffers = BTreeMap::new();
        let mut unknown = Vec::new();
        for (name, view) in self.st.tensors() {
            let known_param = [STUDENT, TEACHER, EXP_AVG, EXP_AVG_SQ].iter().any(|p| {
                name.strip_prefix(p)
                    .is_some_and(|k| params.get(k).is_some())
            });
            if known_param || name == ADAM_STEP {
                continue;
            }
            match name.strip_prefix(BUFFER) {
                Some(b) if view.dtype() == Dtype::F32 => {
                    let data = view
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let shape = view.shape().to_vec();
                    buffers.insert(b.to_string(), Tensor { shape, data });
                }
                _ => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            unknown.truncate(5);
            return Err(self.refuse(format!(
                "it holds tensors the model does not have ({}): it belongs to another model",
                unknown.join(", ")
            )));
        }
        Ok(buffers)
    }
}

/// `key: was -> now` for every key that differs (absent keys shown as `(absent)`).
pub fn config_diffs(
    saved: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Vec<String> {
    let (saved, now) = (&arch_explicit(saved), &arch_explicit(now));
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

/// The architecture keys compared by what they build: `student.arch` only supplies the
/// dimensions that `dinotrain.embed_dim` / `depth` / `num_heads` leave unset, so a run resumed
/// with the `config.yaml` it wrote (which names every dimension) matches its checkpoint.
fn arch_explicit(flat: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut flat = flat.clone();
    let Some(arch) = flat.get("student.arch") else {
        return flat;
    };
    let Ok(arch) = serde_yaml_ng::from_str::<crate::train::config::Arch>(arch) else {
        return flat;
    };
    let (embed_dim, depth, num_heads) = arch.dims();
    for (key, dim) in [
        ("dinotrain.embed_dim", embed_dim),
        ("dinotrain.depth", depth),
        ("dinotrain.num_heads", num_heads),
    ] {
        let value = flat.entry(key.to_string()).or_insert_with(|| "null".into());
        if value == "null" || value == "~" {
            *value = dim.to_string();
        }
    }
    flat.remove("student.arch");
    flat
}

/// JSON text for a metadata entry.
fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::Config(format!("cannot encode checkpoint metadata: {e}")))
}
