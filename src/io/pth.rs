//! Reading PyTorch `.pth` checkpoints natively (no Python): the zip archive that `torch.save`
//! writes (since PyTorch 1.6), its pickle (`data.pkl`), and the raw storages (`data/<key>`).
//!
//! Tensors are rebuilt from their storage, offset, size and stride, so views that are not
//! contiguous (transposes, slices, expanded dimensions) come out as the tensor PyTorch shows.
//! float32, float64 (narrowed), float16 and bfloat16 (widened) storages become f32 tensors;
//! integer and bool tensors, and any other value, are listed in [`PthFile::skipped`].
//! Nested dicts are flattened with `.` (`{"teacher": {"backbone.x": t}}` → `teacher.backbone.x`);
//! [`crate::io::keys`] maps those names to a model's keys.

mod pickle;

use self::pickle::{PVal, TensorRef};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The tensors of a `.pth` file and what was left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PthFile {
    /// Every floating-point tensor, by its flattened key.
    pub tensors: BTreeMap<String, Tensor>,
    /// `key: reason` for every entry that is not a floating-point tensor.
    pub skipped: Vec<String>,
}

/// Reads the floating-point tensors of a `.pth` file (see [`read_pth_file`] for the rest).
pub fn read_pth(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(read_pth_file(path)?.tensors)
}

/// Reads a `.pth` file, one storage at a time (the file is not held in memory whole).
pub fn read_pth_file(path: &Path) -> Result<PthFile> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    check_magic(&magic[..n], path)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    read_archive(std::io::BufReader::new(file), path)
}

fn bad(path: &Path, what: &str, detail: impl Into<String>) -> Error {
    Error::Fixture {
        file: path.to_path_buf(),
        tensor: what.to_string(),
        detail: detail.into(),
    }
}

/// Parses the bytes of a `.pth` file; `path` names it in errors.
pub fn read_pth_bytes(bytes: &[u8], path: &Path) -> Result<PthFile> {
    check_magic(bytes, path)?;
    read_archive(std::io::Cursor::new(bytes), path)
}

/// A zip archive starts with `PK`; the legacy format is a bare pickle (`0x80`).
fn check_magic(bytes: &[u8], path: &Path) -> Result<()> {
    if !bytes.starts_with(b"PK") {
        let detail = if bytes.first() == Some(&0x80) {
            "legacy PyTorch format (saved before PyTorch 1.6 or with \
             _use_new_zipfile_serialization=False) is not supported; re-save it with torch.save"
        } else {
            "not a PyTorch checkpoint (expected a zip archive)"
        };
        return Err(bad(path, "(file)", detail));
    }
    Ok(())
}

fn read_archive<R: Read + Seek>(reader: R, path: &Path) -> Result<PthFile> {
    let mut zip = zip::ZipArchive::new(reader)
        .map_err(|e| bad(path, "(zip)", format!("unreadable zip archive: {e}")))?;
    // Entries live under one folder named after the archive: `<name>/data.pkl`.
    let pkl = zip
        .file_names()
        .filter(|n| n.ends_with("data.pkl"))
        .min_by_key(|n| n.len())
        .map(str::to_string)
        .ok_or_else(|| bad(path, "(zip)", "no data.pkl: not a torch.save archive"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut entry = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| bad(path, name, format!("missing from the archive: {e}")))?;
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| bad(path, name, format!("unreadable (truncated file?): {e}")))?;
        Ok(buf)
    };
    if let Ok(order) = entry(&format!("{prefix}byteorder")) {
        if order != b"little" {
            return Err(bad(
                path,
                "byteorder",
                format!(
                    "storages are {}-endian; only little-endian files are supported",
                    String::from_utf8_lossy(&order)
                ),
            ));
        }
    }
    let program = entry(&pkl)?;
    let root = pickle::load(&program).map_err(|e| bad(path, "data.pkl", e))?;

    let mut leaves = Vec::new();
    flatten(&root, String::new(), &mut leaves);
    let mut out = PthFile::default();
    // Group the tensors by storage, so each storage is read once and dropped after use.
    let mut by_storage: BTreeMap<String, Vec<(String, TensorRef, StorageDtype)>> = BTreeMap::new();
    for (key, value) in leaves {
        let t = match value {
            PVal::Tensor(t) => t,
            other => {
                out.skipped.push(format!("{key}: {}", other.kind()));
                continue;
            }
        };
        let Some(dtype) = StorageDtype::from_class(&t.storage.class) else {
            out.skipped
                .push(format!("{key}: {} tensor", t.storage.class));
            continue;
        };
        by_storage
            .entry(t.storage.key.clone())
            .or_default()
            .push((key, t, dtype));
    }
    for (storage_key, views) in by_storage {
        let raw = entry(&format!("{prefix}data/{storage_key}"))?;
        for (key, t, dtype) in views {
            if raw.len() != t.storage.numel * dtype.size() {
                return Err(bad(
                    path,
                    &key,
                    format!(
                        "storage data/{storage_key} has {} bytes, expected {} ({} x {})",
                        raw.len(),
                        t.storage.numel * dtype.size(),
                        t.storage.numel,
                        t.storage.class
                    ),
                ));
            }
            let tensor = gather(&t, &raw, dtype).map_err(|e| bad(path, &key, e))?;
            if out.tensors.insert(key.clone(), tensor).is_some() {
                return Err(bad(path, &key, "two entries flatten to the same key"));
            }
        }
    }
    Ok(out)
}

/// Depth-first leaves of nested dicts, keys joined with '.'.
fn flatten(v: &PVal, prefix: String, out: &mut Vec<(String, PVal)>) {
    match v {
        PVal::Dict(d) => {
            for (k, child) in d.borrow().iter() {
                let name = match k {
                    PVal::Str(s) => s.clone(),
                    PVal::Int(i) => i.to_string(),
                    other => other.kind(),
                };
                let key = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(child, key, out);
            }
        }
        leaf => out.push((
            if prefix.is_empty() {
                "(root)".into()
            } else {
                prefix
            },
            leaf.clone(),
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageDtype {
    F32,
    F64,
    F16,
    BF16,
}

impl StorageDtype {
    fn from_class(class: &str) -> Option<Self> {
        match class {
            "FloatStorage" => Some(StorageDtype::F32),
            "DoubleStorage" => Some(StorageDtype::F64),
            "HalfStorage" => Some(StorageDtype::F16),
            "BFloat16Storage" => Some(StorageDtype::BF16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F64 => 8,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
        }
    }

    fn read(self, raw: &[u8], i: usize) -> f32 {
        let at = i * self.size();
        match self {
            StorageDtype::F32 => {
                f32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]])
            }
            StorageDtype::F64 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&raw[at..at + 8]);
                f64::from_le_bytes(b) as f32
            }
            StorageDtype::F16 => half::f16::from_le_bytes([raw[at], raw[at + 1]]).to_f32(),
            StorageDtype::BF16 => half::bf16::from_le_bytes([raw[at], raw[at + 1]]).to_f32(),
        }
    }
}

/// Copies the view `t` out of its storage in row-major order.
fn gather(t: &TensorRef, raw: &[u8], dtype: StorageDtype) -> std::result::Result<Tensor, String> {
    let numel: usize = t.shape.iter().product();
    let storage_len = t.storage.numel;
    if numel > 0 {
        // The farthest element the view touches must lie inside the storage.
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&n, &s)| {
                (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d))
            });
        match last {
            Some(last) if last < storage_len => {}
            _ => {
                return Err(format!(
                    "view (offset {}, size {:?}, stride {:?}) reaches past its storage of {} \
                     elements",
                    t.offset, t.shape, t.stride, storage_len
                ))
            }
        }
    }
    let mut data = Vec::with_capacity(numel);
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (&n, &s) in t.shape.iter().zip(&t.stride).rev() {
            if n != 1 && s != expect {
                ok = false;
            }
            expect *= n;
        }
        ok
    };
    if contiguous {
        data.extend((t.offset..t.offset + numel).map(|i| dtype.read(raw, i)));
    } else {
        let rank = t.shape.len();
        let mut index = vec![0usize; rank];
        for _ in 0..numel {
            let at = t.offset
                + index
                    .iter()
                    .zip(&t.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            data.push(dtype.read(raw, at));
            for d in (0..rank).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }
    Ok(Tensor {
        shape: t.shape.clone(),
        data,
    })
}
