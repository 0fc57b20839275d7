//! Trained backbones for evaluation: load one from a run folder, a weights file or a released
//! name (with its architecture), and embed the images of a source with it.
//!
//! The architecture comes, in order of preference, from the released model's table (names),
//! from the `dinotrain.arch` metadata that dinotrain writes into every export, or from the
//! tensor shapes of the file ([`infer_config`]).

use crate::backend::cuda::ResolvedDevice;
use crate::data::ImageSource;
use crate::error::{Error, Result};
use crate::eval::embed::eval_transform;
use crate::eval::features::FeatureExtractor;
pub use crate::eval::features::PatchMean;
use crate::io::export::{load_backbone_into, read_backbone_with_metadata, BACKBONE};
use crate::io::keys::Tensors;
use crate::io::pretrained::{WeightsFormat, WeightsSource};
use crate::nn::ffn::swiglu_width;
use crate::nn::params::ParamTable;
use crate::nn::{Ffn, Vit, VitConfig};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Metadata key holding the architecture as JSON (every [`VitConfig`] field).
pub const ARCH_KEY: &str = "dinotrain.arch";

/// The teacher backbone a training run leaves in its output folder.
pub const RUN_BACKBONE_FILE: &str = "teacher_backbone.safetensors";

/// Channels per attention head in every official DINOv2 model (S/B/L/g: 384/6, 768/12,
/// 1024/16, 1536/24): the head count of a file without metadata is `D / 64`.
pub const OFFICIAL_HEAD_DIM: usize = 64;

/// The architecture as safetensors metadata: `dinotrain.arch` = JSON of `cfg`.
pub fn arch_metadata(cfg: &VitConfig) -> BTreeMap<String, String> {
    // A struct of numbers, booleans and a plain enum always serialises.
    let json = serde_json::to_string(cfg).expect("VitConfig serialises to JSON");
    [(ARCH_KEY.to_string(), json)].into()
}

/// The architecture stored by [`arch_metadata`]; `None` when the key is absent. A present but
/// unreadable or invalid value is an error.
pub fn arch_from_metadata(meta: &BTreeMap<String, String>) -> Result<Option<VitConfig>> {
    // An export holds the key itself; a training checkpoint holds it in its `extra` entry.
    let in_extra = meta
        .get("extra")
        .and_then(|e| serde_json::from_str::<BTreeMap<String, String>>(e).ok())
        .and_then(|mut extra| extra.remove(ARCH_KEY));
    let Some(json) = meta.get(ARCH_KEY).cloned().or(in_extra) else {
        return Ok(None);
    };
    let json = &json;
    let cfg: VitConfig = serde_json::from_str(json)
        .map_err(|e| Error::Config(format!("metadata '{ARCH_KEY}' is not a ViT config: {e}")))?;
    cfg.validate()?;
    Ok(Some(cfg))
}

/// Settings that a weights file cannot tell, given by the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackboneOverrides {
    /// Attention heads, replacing the stored or inferred count (`D / 64` when inferred).
    pub num_heads: Option<usize>,
}

/// A backbone ready to run: its architecture, parameter views, table and values.
#[derive(Clone, Debug)]
pub struct LoadedBackbone {
    pub cfg: VitConfig,
    pub vit: Vit,
    /// Every entry is `backbone.<official key>`.
    pub table: ParamTable,
    pub params: Vec<f32>,
    /// The file the weights came from.
    pub path: PathBuf,
}

/// Loads a backbone from `spec`: a training run folder (its `teacher_backbone.safetensors`),
/// a `.safetensors` file (official or Hugging Face keys), a `.pth` file (official release or
/// checkpoint) or a released name (`dinov2/vits14`, ..., from the cache folder).
pub fn load_backbone(spec: &str) -> Result<LoadedBackbone> {
    load_backbone_with(spec, BackboneOverrides::default())
}

/// [`load_backbone`] with caller-given settings.
pub fn load_backbone_with(spec: &str, overrides: BackboneOverrides) -> Result<LoadedBackbone> {
    let dir = Path::new(spec);
    if dir.is_dir() {
        let file = dir.join(RUN_BACKBONE_FILE);
        if !file.is_file() {
            return Err(Error::Config(format!(
                "{} is a folder without {RUN_BACKBONE_FILE} (not a finished training run?)",
                dir.display()
            )));
        }
        return load_file(&file, WeightsFormat::Safetensors, None, overrides);
    }
    let source = WeightsSource::parse(spec)?;
    let (path, format) = source.locate()?;
    let released = match source {
        WeightsSource::Pretrained(m) => Some(m.architecture()),
        WeightsSource::File { .. } => None,
    };
    load_file(&path, format, released, overrides)
}

fn load_file(
    path: &Path,
    format: WeightsFormat,
    known: Option<VitConfig>,
    overrides: BackboneOverrides,
) -> Result<LoadedBackbone> {
    let (tensors, meta) = read_backbone_with_metadata(path, format)?;
    let in_file = |e: Error| match e {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        other => other,
    };
    let mut cfg = match known {
        Some(cfg) => cfg,
        None => match arch_from_metadata(&meta).map_err(in_file)? {
            Some(cfg) => cfg,
            None => {
                let cfg = infer_config(&tensors, overrides).map_err(in_file)?;
                if overrides.num_heads.is_none() {
                    log::warn!(
                        "{}: no architecture metadata; inferred from the tensor shapes with \
                         num_heads = {} (D / {OFFICIAL_HEAD_DIM}); if the model was trained with \
                         another head count, the features are wrong (dinotrain's exports and \
                         checkpoints carry it)",
                        path.display(),
                        cfg.num_heads
                    );
                }
                cfg
            }
        },
    };
    if let Some(h) = overrides.num_heads {
        cfg.num_heads = h;
    }
    cfg.validate().map_err(in_file)?;
    let mut table = ParamTable::new();
    let vit = Vit::new(&cfg, &mut table, BACKBONE);
    // Every entry is overwritten: the load is strict (all keys present, none left over).
    let mut params = vec![0f32; table.len()];
    load_backbone_into(&table, &mut params, &tensors, &path.display().to_string())?;
    Ok(LoadedBackbone {
        cfg,
        vit,
        table,
        params,
        path: path.to_path_buf(),
    })
}

/// The architecture of a backbone (official keys) from its tensor shapes:
/// * `D` from `cls_token [1, 1, D]`; depth from the `blocks.<i>.` indices;
/// * patch size and channels from `patch_embed.proj.weight [D, C, p, p]`, the construction
///   size from `pos_embed [1, 1 + M², D]` (`img_size = M·p`);
/// * registers from `register_tokens [1, r, D]`; LayerScale and the three bias flags from the
///   presence of `ls1.gamma` and the bias tensors of block 0;
/// * the FFN from `mlp.fc1.weight [hidden, D]` (MLP) or `mlp.w12.weight [2·w, D]` (SwiGLU);
/// * heads: `D / 64` as in every official model (override with [`BackboneOverrides`]);
/// * position-embedding interpolation, which weights cannot tell: as the releases, offset 0.1
///   without antialias, or offset 0 with antialias when the model has registers.
pub fn infer_config(t: &Tensors, overrides: BackboneOverrides) -> Result<VitConfig> {
    let shape = |key: &str| -> Result<&[usize]> {
        t.get(key).map(|x| x.shape.as_slice()).ok_or_else(|| {
            Error::Config(format!(
                "no '{key}': cannot infer the architecture (not a DINOv2 backbone?)"
            ))
        })
    };
    let bad = |key: &str, s: &[usize], want: &str| {
        Error::Config(format!("'{key}' has shape {s:?}, expected {want}"))
    };
    let embed_dim = match shape("cls_token")? {
        &[1, 1, d] if d > 0 => d,
        s => return Err(bad("cls_token", s, "[1, 1, D]")),
    };
    let (in_chans, patch_size) = match shape("patch_embed.proj.weight")? {
        &[d, c, p, q] if d == embed_dim && p == q && p > 0 => (c, p),
        s => return Err(bad("patch_embed.proj.weight", s, "[D, C, p, p]")),
    };
    let grid = match shape("pos_embed")? {
        &[1, n, d] if d == embed_dim && n >= 2 => square_root(n - 1)
            .ok_or_else(|| bad("pos_embed", &[1, n, d], "[1, 1 + M², D] (a square grid)"))?,
        s => return Err(bad("pos_embed", s, "[1, 1 + M², D]")),
    };
    let num_register_tokens = match t.get("register_tokens").map(|x| x.shape.as_slice()) {
        None => 0,
        Some(&[1, r, d]) if d == embed_dim => r,
        Some(s) => return Err(bad("register_tokens", s, "[1, r, D]")),
    };
    let depth = block_count(t)?;
    let has = |key: &str| t.contains_key(&format!("blocks.0.{key}"));
    let ffn = if let Some(x) = t.get("blocks.0.mlp.fc1.weight") {
        Ffn::Mlp { hidden: x.shape[0] }
    } else {
        let s = shape("blocks.0.mlp.w12.weight")?;
        swiglu_ffn(s, embed_dim).ok_or_else(|| bad("blocks.0.mlp.w12.weight", s, "[2·w, D]"))?
    };
    let num_heads = match overrides.num_heads {
        Some(h) => h,
        None if embed_dim % OFFICIAL_HEAD_DIM == 0 => embed_dim / OFFICIAL_HEAD_DIM,
        None => {
            return Err(Error::Config(format!(
                "embed dim {embed_dim} is not a multiple of {OFFICIAL_HEAD_DIM}: the head count \
                 cannot be inferred (give it explicitly)"
            )))
        }
    };
    let registers = num_register_tokens > 0;
    let cfg = VitConfig {
        img_size: grid * patch_size,
        patch_size,
        in_chans,
        embed_dim,
        depth,
        num_heads,
        ffn,
        num_register_tokens,
        layerscale: has("ls1.gamma").then_some(1.0),
        interpolate_offset: if registers { 0.0 } else { 0.1 },
        interpolate_antialias: registers,
        qkv_bias: has("attn.qkv.bias"),
        proj_bias: has("attn.proj.bias"),
        ffn_bias: has("mlp.fc1.bias") || has("mlp.w12.bias"),
    };
    cfg.validate()?;
    Ok(cfg)
}

fn square_root(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r > 0 && r * r == n).then_some(r)
}

/// Blocks `0..depth`, all present.
fn block_count(t: &Tensors) -> Result<usize> {
    let mut seen = std::collections::BTreeSet::new();
    for k in t.keys() {
        if let Some(i) = k
            .strip_prefix("blocks.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            seen.insert(i);
        }
    }
    let depth = seen.len();
    if depth == 0 || seen.last() != Some(&(depth - 1)) {
        return Err(Error::Config(format!(
            "blocks {seen:?}: expected blocks 0..depth, each present"
        )));
    }
    Ok(depth)
}

/// A SwiGLU of actual width `w` (`w12.weight [2·w, D]`) as the nominal hidden size the
/// constructor takes: `4·D` when that gives `w` (the official ratio), else `3w/2`.
fn swiglu_ffn(s: &[usize], d: usize) -> Option<Ffn> {
    let &[two_w, dim] = s else { return None };
    if dim != d || two_w == 0 || two_w % 2 != 0 {
        return None;
    }
    let w = two_w / 2;
    [4 * d, 3 * w / 2]
        .into_iter()
        .find(|&h| swiglu_width(h) == w)
        .map(|hidden| Ffn::SwiGlu { hidden })
}

/// Embeddings of the readable images of a source.
#[derive(Clone, Debug, Default)]
pub struct Embeddings {
    pub dim: usize,
    /// `[n, D]` final-norm CLS tokens (`x_norm_clstoken`).
    pub cls: Vec<f32>,
    /// `[n, D]` mean of the final-norm patch tokens, when asked for.
    pub patch_mean: Option<Vec<f32>>,
    /// `[n]` the source index of each row (sorted).
    pub kept: Vec<usize>,
    /// Images that could not be decoded: source index and reason.
    pub skipped: Vec<(usize, String)>,
}

impl LoadedBackbone {
    /// This backbone on `device`: the CPU, or a CUDA device its weights are uploaded to (once,
    /// for as long as the extractor lives).
    pub fn extractor<'a>(&'a self, device: &'a mut ResolvedDevice) -> Result<FeatureExtractor<'a>> {
        FeatureExtractor::on(device, &self.vit, &self.params)
    }

    /// Embeds every image of `source` with the official evaluation transform at `size` pixels,
    /// `batch` images decoded per forward, with `extractor` (this backbone on either device,
    /// from [`LoadedBackbone::extractor`]). Unreadable images are skipped and listed; a source
    /// without any readable image is an error.
    pub fn embed(
        &self,
        extractor: &mut FeatureExtractor<'_>,
        source: &dyn ImageSource,
        size: usize,
        batch: usize,
        patch_mean: PatchMean,
    ) -> Result<Embeddings> {
        let p = self.cfg.patch_size;
        if size == 0 || size % p != 0 || batch == 0 {
            return Err(Error::Config(format!(
                "image size {size} must be a positive multiple of the patch size {p}, \
                 and the batch ({batch}) positive"
            )));
        }
        if extractor.vit().cfg != self.cfg {
            return Err(Error::Config(
                "embed: the feature extractor runs another backbone than this one".into(),
            ));
        }
        let d = self.cfg.embed_dim;
        let per = self.cfg.in_chans * size * size;
        if self.cfg.in_chans != 3 {
            return Err(Error::Unsupported(format!(
                "embedding RGB images with a {}-channel model",
                self.cfg.in_chans
            )));
        }
        let mut out = Embeddings {
            dim: d,
            patch_mean: (patch_mean == PatchMean::Compute).then(Vec::new),
            ..Embeddings::default()
        };
        let n = source.len();
        for start in (0..n).step_by(batch) {
            let m = batch.min(n - start);
            let mut images = vec![0f32; m * per]; // [m, 3, size, size]
            let errors: Vec<Option<String>> = images
                .par_chunks_mut(per)
                .enumerate()
                .map(|(j, img)| match source.load(start + j) {
                    Ok(rgb) => {
                        eval_transform(img, &rgb, size);
                        None
                    }
                    Err(e) => Some(e.to_string()),
                })
                .collect();
            let mut rows = 0;
            for (j, err) in errors.into_iter().enumerate() {
                match err {
                    Some(reason) => out.skipped.push((start + j, reason)),
                    None => {
                        images.copy_within(j * per..(j + 1) * per, rows * per);
                        out.kept.push(start + j);
                        rows += 1;
                    }
                }
            }
            if rows == 0 {
                continue;
            }
            images.truncate(rows * per);
            let f = extractor.features(&images, rows, size, patch_mean)?;
            let kept = &out.kept[out.kept.len() - rows..];
            crate::eval::knn::check_finite_features("embed", &f.cls, d, |r| source.name(kept[r]))?;
            out.cls.extend_from_slice(&f.cls);
            if let (Some(pm), Some(f_pm)) = (out.patch_mean.as_mut(), f.patch_mean) {
                pm.extend_from_slice(&f_pm);
            }
        }
        if out.kept.is_empty() {
            return Err(Error::Data(format!(
                "none of the {n} images is readable (first: {})",
                out.skipped
                    .first()
                    .map_or_else(String::new, |(i, r)| format!("{}: {r}", source.name(*i)))
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Preset;
    use crate::tensor::Tensor;

    #[test]
    fn arch_metadata_round_trips_every_field() {
        let mut cfg = Preset::Giant.released(true);
        cfg.layerscale = Some(1e-5);
        let back = arch_from_metadata(&arch_metadata(&cfg)).unwrap().unwrap();
        assert_eq!(back, cfg);
        cfg.layerscale = None;
        let back = arch_from_metadata(&arch_metadata(&cfg)).unwrap().unwrap();
        assert_eq!(back, cfg);
        assert!(arch_from_metadata(&BTreeMap::new()).unwrap().is_none());
        let broken = [(ARCH_KEY.to_string(), "{\"img_size\": 3}".to_string())].into();
        assert!(arch_from_metadata(&broken).is_err());
    }

    fn tensors_of(cfg: &VitConfig) -> Tensors {
        let mut table = ParamTable::new();
        Vit::new(cfg, &mut table, "");
        table
            .specs()
            .iter()
            .map(|s| {
                let len = s.shape.iter().product();
                (
                    s.name.clone(),
                    Tensor::from_vec(&s.shape, vec![0.0; len]).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn inference_recovers_released_architectures() {
        for (preset, registers) in [(Preset::Small, false), (Preset::Giant, true)] {
            let mut cfg = preset.released(registers);
            cfg.depth = 2; // the shapes of two blocks tell the same as forty
            let got = infer_config(&tensors_of(&cfg), BackboneOverrides::default()).unwrap();
            assert_eq!(got, cfg, "{preset:?}");
        }
    }

    #[test]
    fn inference_names_what_is_missing_and_needs_heads_below_64() {
        let cfg = Preset::Micro.config(16, 4, 2);
        let mut t = tensors_of(&cfg);
        let err = infer_config(&t, BackboneOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("head count"), "{err}");
        let heads = BackboneOverrides { num_heads: Some(2) };
        let mut want = cfg.clone();
        (
            want.layerscale,
            want.interpolate_offset,
            want.interpolate_antialias,
        ) = (Some(1.0), 0.0, true);
        assert_eq!(infer_config(&t, heads).unwrap(), want);
        t.remove("pos_embed");
        let err = infer_config(&t, heads).unwrap_err();
        assert!(err.to_string().contains("pos_embed"), "{err}");
    }
}
