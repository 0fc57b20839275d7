//! Backbone weights in and out: export the teacher backbone as safetensors (official or Hugging
//! Face keys), read a backbone from `.pth` or `.safetensors` in either naming, and copy it into
//! a model's flat parameter buffer.

use crate::error::{Error, Result};
use crate::io::keys::{self, Tensors};
use crate::io::pretrained::WeightsFormat;
use crate::io::{TensorFile, Value};
use crate::nn::params::ParamTable;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// The submodule prefix of backbone parameters in a [`ParamTable`].
pub const BACKBONE: &str = "backbone.";

/// Key names of an exported backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyNaming {
    /// The official state-dict keys (`blocks.0.attn.qkv.weight`): loads into the official
    /// `DinoVisionTransformer` with `strict=True`.
    Official,
    /// Hugging Face `Dinov2Model` keys (`encoder.layer.0.attention.attention.query.weight`).
    HuggingFace,
}

impl KeyNaming {
    fn tag(self) -> &'static str {
        match self {
            KeyNaming::Official => "official",
            KeyNaming::HuggingFace => "huggingface",
        }
    }
}

/// The backbone entries of `flat` (laid out by `params`), keyed relative to the backbone.
pub fn backbone_tensors(params: &ParamTable, flat: &[f32]) -> Result<Tensors> {
    if flat.len() != params.len() {
        return Err(Error::shape(
            "export::backbone_tensors",
            format!("buffer of {} values, table of {}", flat.len(), params.len()),
        ));
    }
    Ok(params
        .specs()
        .iter()
        .filter_map(|s| {
            s.name.strip_prefix(BACKBONE).map(|rest| {
                (
                    rest.to_string(),
                    Tensor {
                        shape: s.shape.clone(),
                        data: flat[s.at.range()].to_vec(),
                    },
                )
            })
        })
        .collect())
}

/// Writes the backbone of `flat` to `path` (safetensors, atomically). `metadata` is stored
/// alongside `format = dinotrain-backbone` and `naming`.
pub fn export_backbone(
    path: &Path,
    params: &ParamTable,
    flat: &[f32],
    naming: KeyNaming,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let official = backbone_tensors(params, flat)?;
    if official.is_empty() {
        return Err(Error::Config(
            "nothing to export: the parameter table has no backbone.* entries".into(),
        ));
    }
    let named = match naming {
        KeyNaming::Official => official,
        KeyNaming::HuggingFace => keys::official_to_hf(&official)?,
    };
    let mut file = TensorFile {
        metadata: metadata.clone(),
        ..TensorFile::default()
    };
    for (k, t) in named {
        file.insert(k, t);
    }
    file.metadata
        .insert("format".into(), "dinotrain-backbone".into());
    file.metadata.insert("naming".into(), naming.tag().into());
    file.write(path)
}

/// Reads a backbone from a `.pth` (official release, teacher checkpoint) or `.safetensors`
/// (dinotrain export, Hugging Face) file, returning official backbone keys.
pub fn read_backbone(path: &Path, format: WeightsFormat) -> Result<Tensors> {
    Ok(read_backbone_with_metadata(path, format)?.0)
}

/// [`read_backbone`], also returning the file's metadata (safetensors header metadata; empty
/// for `.pth`).
pub fn read_backbone_with_metadata(
    path: &Path,
    format: WeightsFormat,
) -> Result<(Tensors, BTreeMap<String, String>)> {
    let (tensors, metadata) = match format {
        WeightsFormat::Pth => (crate::io::pth::read_pth(path)?, BTreeMap::new()),
        WeightsFormat::Safetensors => {
            let file = TensorFile::read(path)?;
            let mut out = Tensors::new();
            for (k, v) in file.tensors {
                if let Value::F32(t) = v {
                    out.insert(k, t);
                }
            }
            (out, file.metadata)
        }
    };
    // A NaN or infinite weight would give confident wrong answers downstream: refuse it here,
    // naming the tensor (every loader of weights goes through this function).
    for (name, t) in &tensors {
        if let Some((index, &value)) = t.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFiniteWeights {
                file: path.to_path_buf(),
                tensor: name.clone(),
                index,
                value,
            });
        }
    }
    let backbone = keys::import_backbone(tensors)?;
    if backbone.is_empty() {
        return Err(Error::Config(format!(
            "{} holds no backbone parameters",
            path.display()
        )));
    }
    Ok((backbone, metadata))
}

/// Copies a backbone (official keys, relative) into the `backbone.*` entries of `flat`, as
/// `load_state_dict(strict=True)`: every backbone parameter must be present with its exact
/// shape, and no unknown key may be left over. Heads are untouched (they start fresh).
pub fn load_backbone_into(
    params: &ParamTable,
    flat: &mut [f32],
    backbone: &Tensors,
    source: &str,
) -> Result<()> {
    if flat.len() != params.len() {
        return Err(Error::shape(
            "export::load_backbone_into",
            format!("buffer of {} values, table of {}", flat.len(), params.len()),
        ));
    }
    let mut used = 0;
    for spec in params.specs() {
        let Some(rest) = spec.name.strip_prefix(BACKBONE) else {
            continue;
        };
        let t = backbone.get(rest).ok_or_else(|| {
            Error::Config(format!("{source}: backbone parameter '{rest}' is missing"))
        })?;
        if t.shape != spec.shape {
            return Err(Error::Config(format!(
                "{source}: '{rest}' has shape {:?}, the model needs {:?} (another architecture?)",
                t.shape, spec.shape
            )));
        }
        flat[spec.at.range()].copy_from_slice(&t.data);
        used += 1;
    }
    if used != backbone.len() {
        let extra: Vec<&String> = backbone
            .keys()
            .filter(|k| params.get(&format!("{BACKBONE}{k}")).is_none())
            .take(5)
            .collect();
        return Err(Error::Config(format!(
            "{source}: keys the model does not have: {extra:?} (another architecture?)"
        )));
    }
    Ok(())
}
