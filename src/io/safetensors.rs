//! Reading and writing safetensors files: golden fixtures, results, exports and checkpoints.
//!
//! Files are small enough to read whole; writes are atomic (temp file, fsync, rename) so a killed
//! process never leaves a torn file behind.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One stored tensor with its dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    F32(Tensor),
    I64 { shape: Vec<usize>, data: Vec<i64> },
    U8 { shape: Vec<usize>, data: Vec<u8> },
}

impl Value {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(t) => &t.shape,
            Value::I64 { shape, .. } | Value::U8 { shape, .. } => shape,
        }
    }

    /// The dtype's safetensors name, for messages.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Value::F32(_) => "F32",
            Value::I64 { .. } => "I64",
            Value::U8 { .. } => "U8",
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::F32(t)
    }
}

/// A safetensors file in memory: named tensors plus string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Value>,
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads a whole file. F32, F64 (narrowed), BF16/F16 (widened), I64, I32 (widened), U8 and
    /// BOOL are accepted; anything else is an error naming the file and the tensor.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses the bytes of a safetensors file; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |tensor: &str, detail: String| Error::Fixture {
            file: path.to_path_buf(),
            tensor: tensor.to_string(),
            detail,
        };
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad("(header)", format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad("(header)", format!("not a valid safetensors file: {e}")))?;
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let raw = view.data();
            let value = match view.dtype() {
                Dtype::F32 => Value::F32(Tensor {
                    shape,
                    data: raw
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                }),
                Dtype::F64 => Value::F32(Tensor {
                    shape,
                    data: raw
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                        .collect(),
                }),
                Dtype::BF16 => Value::F32(Tensor {
                    shape,
                    data: raw
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                }),
                Dtype::F16 => Value::F32(Tensor {
                    shape,
                    data: raw
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                }),
                Dtype::I64 => Value::I64 {
                    shape,
                    data: raw
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                },
                Dtype::I32 => Value::I64 {
                    shape,
                    data: raw
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                        .collect(),
                },
                Dtype::U8 | Dtype::BOOL => Value::U8 {
                    shape,
                    data: raw.to_vec(),
                },
                other => return Err(bad(&name, format!("unsupported dtype {other:?}"))),
            };
            tensors.insert(name, value);
        }
        Ok(TensorFile { tensors, metadata })
    }

    /// Serialises to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let raw: Vec<(&String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, v)| match v {
                Value::F32(t) => (
                    name,
                    Dtype::F32,
                    t.shape.clone(),
                    bytemuck::cast_slice(&t.data).to_vec(),
                ),
                Value::I64 { shape, data } => (
                    name,
                    Dtype::I64,
                    shape.clone(),
                    bytemuck::cast_slice(data).to_vec(),
                ),
                Value::U8 { shape, data } => (name, Dtype::U8, shape.clone(), data.clone()),
            })
            .collect();
        let mut views = Vec::with_capacity(raw.len());
        for (name, dtype, shape, bytes) in &raw {
            let view = TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| Error::shape("safetensors", format!("{name}: {e}")))?;
            views.push((name.as_str(), view));
        }
        let metadata: HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let metadata = (!metadata.is_empty()).then_some(metadata);
        let bytes = safetensors::serialize(views, metadata)
            .map_err(|e| Error::shape("safetensors", e.to_string()))?;
        sorted_header(bytes)
    }

    /// Writes atomically: a temp file beside `path`, fsync, rename.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// Adds an f32 tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), Value::F32(t));
    }
}

/// Writes `bytes` to `path` atomically: temp file in the same folder, fsync, rename, fsync of
/// the folder. A full disk surfaces as an error naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("not a file path: {}", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// The file with its JSON header's keys in sorted order: the safetensors crate writes the
/// metadata map in hash order, so two writes of the same tensors would differ in bytes. Data
/// offsets count from the end of the header, so the data stays as it is; the header keeps the
/// format's space padding to a multiple of 8 bytes.
fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |what: &str| Error::shape("safetensors", format!("serialised file: {what}"));
    let len = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| bad("no header"))?);
    let end = usize::try_from(len).ok().and_then(|l| l.checked_add(8));
    let end = end
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("header length"))?;
    // serde_json's map is ordered by key (no `preserve_order`): re-serialising sorts.
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..end]).map_err(|e| bad(&e.to_string()))?;
    let mut text = serde_json::to_vec(&header).map_err(|e| bad(&e.to_string()))?;
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_files_are_equal_bytes_whatever_the_metadata_order() {
        let file = || {
            let mut f = TensorFile::default();
            f.insert("w", Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap());
            f.tensors.insert(
                "i".into(),
                Value::I64 {
                    shape: vec![1],
                    data: vec![5],
                },
            );
            for k in 0..16 {
                f.metadata.insert(format!("key{k}"), format!("value {k}"));
            }
            f.to_bytes().unwrap()
        };
        let first = file();
        // Each write hashes its metadata map with a fresh random seed.
        for _ in 0..8 {
            assert!(file() == first);
        }
        let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        std::fs::write(&path, &first).unwrap();
        let back = TensorFile::read(&path).unwrap();
        assert_eq!(back.metadata["key7"], "value 7");
        assert!(matches!(&back.tensors["i"], Value::I64 { data, .. } if data == &[5]));
    }

    #[test]
    fn round_trips_every_dtype_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut f = TensorFile::default();
        f.insert(
            "a",
            Tensor::from_vec(&[2, 2], vec![1.0, -2.0, 3.5, 0.25]).unwrap(),
        );
        f.tensors.insert(
            "b".into(),
            Value::I64 {
                shape: vec![3],
                data: vec![-1, 0, 7],
            },
        );
        f.tensors.insert(
            "c".into(),
            Value::U8 {
                shape: vec![1, 2],
                data: vec![0, 1],
            },
        );
        f.metadata.insert("case".into(), "x".into());
        f.write(&path).unwrap();
        assert_eq!(TensorFile::read(&path).unwrap(), f);
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let err = TensorFile::from_bytes(b"not a file", Path::new("bad.safetensors")).unwrap_err();
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
    }
}
