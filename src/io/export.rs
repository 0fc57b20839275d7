//! Backbone weights in and out: export the teacher backbone as safetensors (official or Hugging
//! Face keys), read a backbone from `.pth` or `.safetensors` in either naming, and copy it into
//! a model's flat parameter buffer.

use crate::error::{Error, Result};
use crate::io::keys::{self, Tensors};
use crate::io::pretrained::WeightsFormat;
use crate::io::{TensorFile, Value};
use crate::nn::params::ParamTable;
use crate::nn::{Ffn, VitConfig};
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
    backbone_file(params, flat, naming, metadata, "dinotrain-backbone")?.write(path)
}

/// The backbone of `flat` with `naming`'s keys, `metadata` and the `format` and `naming` tags.
fn backbone_file(
    params: &ParamTable,
    flat: &[f32],
    naming: KeyNaming,
    metadata: &BTreeMap<String, String>,
    format: &str,
) -> Result<TensorFile> {
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
    file.metadata.insert("format".into(), format.into());
    file.metadata.insert("naming".into(), naming.tag().into());
    Ok(file)
}

/// The file names of a Hugging Face model folder.
pub const HF_CONFIG: &str = "config.json";
pub const HF_WEIGHTS: &str = "model.safetensors";

/// Writes the backbone of `flat` as a folder that Hugging Face transformers' `from_pretrained`
/// loads: `config.json` (`Dinov2Model`, or `Dinov2WithRegistersModel` with register tokens)
/// and `model.safetensors` with `Dinov2Model` keys and the `format: pt` metadata transformers
/// requires (dinotrain's own metadata beside it). transformers versions that renamed the
/// attention keys convert these names when loading through `from_pretrained`.
pub fn export_hf_folder(
    dir: &Path,
    params: &ParamTable,
    flat: &[f32],
    cfg: &VitConfig,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let config = hf_config(cfg)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file = backbone_file(params, flat, KeyNaming::HuggingFace, metadata, "pt")?;
    file.write(&dir.join(HF_WEIGHTS))?;
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Config(format!("config.json: {e}")))?;
    crate::io::write_atomic(&dir.join(HF_CONFIG), format!("{text}\n").as_bytes())
}

/// The transformers `Dinov2Config` of a backbone (keys sorted: the file is byte-reproducible).
pub fn hf_config(cfg: &VitConfig) -> Result<serde_json::Value> {
    if !(cfg.proj_bias && cfg.ffn_bias) {
        return Err(Error::Unsupported(
            "a Hugging Face Dinov2 model always has attention-projection and FFN biases; this \
             backbone has none (export it with official keys)"
                .into(),
        ));
    }
    let (hidden, swiglu) = match cfg.ffn {
        Ffn::Mlp { hidden } => (hidden, false),
        // transformers derives the SwiGLU width from mlp_ratio as the official code does.
        Ffn::SwiGlu { hidden } => (hidden, true),
    };
    if hidden % cfg.embed_dim != 0 {
        return Err(Error::Unsupported(format!(
            "a Hugging Face Dinov2 config holds the FFN width as an integer multiple of the \
             embedding (mlp_ratio); {hidden} is not a multiple of {} (export with official keys)",
            cfg.embed_dim
        )));
    }
    let registers = cfg.num_register_tokens > 0;
    let (model_type, architecture) = if registers {
        ("dinov2_with_registers", "Dinov2WithRegistersModel")
    } else {
        ("dinov2", "Dinov2Model")
    };
    let mut c = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": hidden / cfg.embed_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        // The trained LayerScale values are in the weights; without LayerScale, 1 leaves the
        // branches unscaled (transformers fills the missing lambdas with it).
        "layerscale_value": cfg.layerscale.map_or(1.0, shortest_f64),
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": swiglu,
        "torch_dtype": "float32",
    });
    if registers {
        c["num_register_tokens"] = cfg.num_register_tokens.into();
    }
    Ok(c)
}

/// An f32 as the f64 of its shortest decimal form (1e-5, not 9.999999747378752e-6).
fn shortest_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
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
