//! Parameter key names: official checkpoints in their several layouts, and Hugging Face
//! `Dinov2Model` names (spec sections 10.1 to 10.3), for import and export.
//!
//! Backbone keys here are relative to the backbone (`blocks.3.attn.qkv.weight`); the model's
//! parameter table prefixes them with `backbone.`.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// Named tensors.
pub type Tensors = BTreeMap<String, Tensor>;

/// Wrapper name components that say nothing about the parameter (DDP, FSDP).
const NOISE: [&str; 2] = ["module", "_fsdp_wrapped_module"];

/// Official keys in any layout → `backbone.*`, `dino_head.*`, `ibot_head.*` or bare backbone
/// keys, as the official eval loader sees them:
/// * a training checkpoint's `model.` and `teacher.` wrappers are removed, taking the teacher
///   when the file holds both branches (`student.*` entries are dropped);
/// * `module.` and `_fsdp_wrapped_module.` are removed wherever they appear;
/// * the chunked layout `blocks.<chunk>.<i>.` becomes `blocks.<i>.`.
pub fn normalize_official(tensors: Tensors) -> Result<Tensors> {
    let mut cleaned = Tensors::new();
    for (key, t) in tensors {
        let k: Vec<&str> = key
            .split('.')
            .filter(|part| !NOISE.contains(part))
            .collect();
        insert_unique(&mut cleaned, unchunk(&k.join(".")), t, &key)?;
    }
    let cleaned = strip_common(cleaned, "model.");
    let has_teacher = cleaned.keys().any(|k| k.starts_with("teacher."));
    if !has_teacher {
        return Ok(cleaned);
    }
    Ok(cleaned
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix("teacher.").map(|rest| (rest.to_string(), t)))
        .collect())
}

/// Removes `prefix` when every key has it.
fn strip_common(tensors: Tensors, prefix: &str) -> Tensors {
    if tensors.is_empty() || !tensors.keys().all(|k| k.starts_with(prefix)) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, t)| (k[prefix.len()..].to_string(), t))
        .collect()
}

fn insert_unique(out: &mut Tensors, key: String, t: Tensor, original: &str) -> Result<()> {
    if out.contains_key(&key) {
        return Err(Error::Config(format!(
            "two checkpoint entries map to '{key}' (one is '{original}')"
        )));
    }
    out.insert(key, t);
    Ok(())
}

/// `…blocks.<chunk>.<i>.rest` → `…blocks.<i>.rest` (two integers in a row mean chunks).
fn unchunk(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        out.push(parts[i]);
        let chunked = parts[i] == "blocks"
            && i + 2 < parts.len()
            && parts[i + 1].parse::<usize>().is_ok()
            && parts[i + 2].parse::<usize>().is_ok();
        i += if chunked { 2 } else { 1 };
    }
    out.join(".")
}

/// The backbone of a checkpoint in official or Hugging Face naming, with official backbone
/// keys (`blocks.0.attn.qkv.weight`). Head entries (`dino_head.*`, `ibot_head.*`, a classifier)
/// are dropped: heads start fresh, as in the official code.
pub fn import_backbone(tensors: Tensors) -> Result<Tensors> {
    if is_hugging_face(&tensors) {
        return hf_to_official(&tensors);
    }
    let normalized = normalize_official(tensors)?;
    let has_backbone_prefix = normalized.keys().any(|k| k.starts_with("backbone."));
    Ok(normalized
        .into_iter()
        .filter_map(|(k, t)| {
            if has_backbone_prefix {
                k.strip_prefix("backbone.").map(|r| (r.to_string(), t))
            } else if k.starts_with("dino_head.")
                || k.starts_with("ibot_head.")
                || k.starts_with("head.")
            {
                None
            } else {
                Some((k, t))
            }
        })
        .collect())
}

/// Whether the keys are Hugging Face `Dinov2Model` names.
pub fn is_hugging_face(tensors: &Tensors) -> bool {
    tensors.keys().any(|k| {
        let k = strip_hf_prefix(k);
        k.starts_with("embeddings.") || k.starts_with("encoder.layer.")
    })
}

fn strip_hf_prefix(key: &str) -> &str {
    key.strip_prefix("dinov2_with_registers.")
        .or_else(|| key.strip_prefix("dinov2."))
        .unwrap_or(key)
}

/// Block-level renames (official suffix after `blocks.<i>.`, HF suffix after `encoder.layer.<i>.`);
/// `attn.qkv.*` is split into `attention.attention.{query,key,value}.*` separately.
const BLOCK_RENAMES: [(&str, &str); 9] = [
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("attn.proj.", "attention.output.dense."),
    ("ls1.gamma", "layer_scale1.lambda1"),
    ("ls2.gamma", "layer_scale2.lambda1"),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("mlp.w12.", "mlp.weights_in."),
    ("mlp.w3.", "mlp.weights_out."),
];

/// Top-level renames.
const TOP_RENAMES: [(&str, &str); 6] = [
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("register_tokens", "embeddings.register_tokens"),
    (
        "patch_embed.proj.",
        "embeddings.patch_embeddings.projection.",
    ),
    ("norm.", "layernorm."),
];

/// Official backbone keys → Hugging Face `Dinov2Model` keys (qkv split into query, key, value).
pub fn official_to_hf(tensors: &Tensors) -> Result<Tensors> {
    let mut out = Tensors::new();
    for (key, t) in tensors {
        if let Some((block, rest)) = split_block(key, "blocks.") {
            if let Some(param) = rest.strip_prefix("attn.qkv.") {
                let parts = split_rows(t, 3, key)?;
                for (name, part) in ["query", "key", "value"].into_iter().zip(parts) {
                    out.insert(
                        format!("encoder.layer.{block}.attention.attention.{name}.{param}"),
                        part,
                    );
                }
                continue;
            }
            let renamed = BLOCK_RENAMES
                .iter()
                .find_map(|(o, h)| rest.strip_prefix(o).map(|tail| format!("{h}{tail}")));
            match renamed {
                Some(r) => out.insert(format!("encoder.layer.{block}.{r}"), t.clone()),
                None => return Err(unknown(key, "official backbone")),
            };
            continue;
        }
        let renamed = TOP_RENAMES.iter().find_map(|(o, h)| {
            if o.ends_with('.') {
                key.strip_prefix(o).map(|tail| format!("{h}{tail}"))
            } else {
                (key == o).then(|| h.to_string())
            }
        });
        match renamed {
            Some(r) => out.insert(r, t.clone()),
            None => return Err(unknown(key, "official backbone")),
        };
    }
    Ok(out)
}

/// Hugging Face `Dinov2Model` keys → official backbone keys (query, key, value joined into qkv).
/// A `dinov2.` / `dinov2_with_registers.` prefix is removed and `classifier.*` is dropped.
pub fn hf_to_official(tensors: &Tensors) -> Result<Tensors> {
    let mut out = Tensors::new();
    // (block, weight|bias) → [query, key, value]
    let mut qkv: BTreeMap<(usize, String), [Option<&Tensor>; 3]> = BTreeMap::new();
    for (full, t) in tensors {
        let key = strip_hf_prefix(full);
        if key.starts_with("classifier.") {
            continue;
        }
        if let Some((block, rest)) = split_block(key, "encoder.layer.") {
            if let Some(tail) = rest.strip_prefix("attention.attention.") {
                let (which, param) = tail
                    .split_once('.')
                    .ok_or_else(|| unknown(full, "Hugging Face"))?;
                let slot = match which {
                    "query" => 0,
                    "key" => 1,
                    "value" => 2,
                    _ => return Err(unknown(full, "Hugging Face")),
                };
                qkv.entry((block, param.to_string())).or_default()[slot] = Some(t);
                continue;
            }
            let renamed = BLOCK_RENAMES
                .iter()
                .find_map(|(o, h)| rest.strip_prefix(h).map(|tail| format!("{o}{tail}")));
            match renamed {
                Some(r) => insert_unique(&mut out, format!("blocks.{block}.{r}"), t.clone(), full)?,
                None => return Err(unknown(full, "Hugging Face")),
            }
            continue;
        }
        let renamed = TOP_RENAMES.iter().find_map(|(o, h)| {
            if h.ends_with('.') {
                key.strip_prefix(h).map(|tail| format!("{o}{tail}"))
            } else {
                (key == *h).then(|| o.to_string())
            }
        });
        match renamed {
            Some(r) => insert_unique(&mut out, r, t.clone(), full)?,
            None => return Err(unknown(full, "Hugging Face")),
        }
    }
    for ((block, param), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(Error::Config(format!(
                "Hugging Face block {block}: attention {param} needs query, key and value"
            )));
        };
        let joined = join_rows(
            &[q, k, v],
            &format!("encoder.layer.{block}.attention {param}"),
        )?;
        out.insert(format!("blocks.{block}.attn.qkv.{param}"), joined);
    }
    Ok(out)
}

/// `prefix<i>.rest` → (i, rest).
fn split_block<'k>(key: &'k str, prefix: &str) -> Option<(usize, &'k str)> {
    let rest = key.strip_prefix(prefix)?;
    let (index, tail) = rest.split_once('.')?;
    Some((index.parse().ok()?, tail))
}

fn unknown(key: &str, naming: &str) -> Error {
    Error::Config(format!("'{key}' is not a known {naming} parameter name"))
}

/// Splits the first dimension into `parts` equal tensors.
fn split_rows(t: &Tensor, parts: usize, key: &str) -> Result<Vec<Tensor>> {
    let rows = *t.shape.first().unwrap_or(&0);
    if rows == 0 || rows % parts != 0 {
        return Err(Error::shape(
            "keys::split_rows",
            format!(
                "{key}: {:?} does not split into {parts} along dim 0",
                t.shape
            ),
        ));
    }
    let chunk = t.data.len() / parts;
    let mut shape = t.shape.clone();
    shape[0] = rows / parts;
    Ok(t.data
        .chunks_exact(chunk)
        .map(|c| Tensor {
            shape: shape.clone(),
            data: c.to_vec(),
        })
        .collect())
}

/// Concatenates along the first dimension (same trailing shape).
fn join_rows(parts: &[&Tensor], what: &str) -> Result<Tensor> {
    let first = parts[0];
    if first.shape.is_empty() || parts.iter().any(|p| p.shape != first.shape) {
        return Err(Error::shape(
            "keys::join_rows",
            format!(
                "{what}: query/key/value shapes differ: {:?}",
                parts.iter().map(|p| p.shape.clone()).collect::<Vec<_>>()
            ),
        ));
    }
    let mut shape = first.shape.clone();
    shape[0] *= parts.len();
    let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
    Ok(Tensor { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: f32) -> Tensor {
        Tensor::scalar(v)
    }

    #[test]
    fn unchunks_and_strips_wrappers() {
        assert_eq!(
            unchunk("backbone.blocks.1.7.attn.qkv.weight"),
            "backbone.blocks.7.attn.qkv.weight"
        );
        assert_eq!(
            unchunk("blocks.7.attn.qkv.weight"),
            "blocks.7.attn.qkv.weight"
        );
        assert_eq!(unchunk("blocks.0.0.ls1.gamma"), "blocks.0.ls1.gamma");
        let raw: Tensors = [
            ("teacher.backbone.blocks.1.4.norm1.weight", 1.0),
            (
                "teacher.module._fsdp_wrapped_module.backbone.cls_token",
                2.0,
            ),
            ("teacher.dino_head.mlp.0.weight", 3.0),
            ("student.backbone.cls_token", 4.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), t(v)))
        .collect();
        let n = normalize_official(raw.clone()).unwrap();
        assert_eq!(
            n.keys().collect::<Vec<_>>(),
            [
                "backbone.blocks.4.norm1.weight",
                "backbone.cls_token",
                "dino_head.mlp.0.weight"
            ]
        );
        assert_eq!(n["backbone.cls_token"], t(2.0));
        let b = import_backbone(raw).unwrap();
        assert_eq!(
            b.keys().collect::<Vec<_>>(),
            ["blocks.4.norm1.weight", "cls_token"]
        );
        let dup: Tensors = [("module.cls_token", 1.0), ("cls_token", 2.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), t(v)))
            .collect();
        assert!(normalize_official(dup).is_err());
    }

    #[test]
    fn hugging_face_names_follow_the_conversion_table() {
        let d = 2;
        let qkv = Tensor::from_vec(&[3 * d, d], (0..12).map(|v| v as f32).collect()).unwrap();
        let official: Tensors = [
            ("cls_token".to_string(), Tensor::zeros(&[1, 1, d])),
            ("pos_embed".to_string(), Tensor::zeros(&[1, 5, d])),
            (
                "patch_embed.proj.weight".to_string(),
                Tensor::zeros(&[d, 3, 2, 2]),
            ),
            ("blocks.0.attn.qkv.weight".to_string(), qkv),
            ("blocks.0.ls2.gamma".to_string(), Tensor::zeros(&[d])),
            ("blocks.0.mlp.w12.bias".to_string(), Tensor::zeros(&[8])),
            ("norm.bias".to_string(), Tensor::zeros(&[d])),
        ]
        .into_iter()
        .collect();
        let hf = official_to_hf(&official).unwrap();
        let names: Vec<&str> = hf.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "embeddings.cls_token",
                "embeddings.patch_embeddings.projection.weight",
                "embeddings.position_embeddings",
                "encoder.layer.0.attention.attention.key.weight",
                "encoder.layer.0.attention.attention.query.weight",
                "encoder.layer.0.attention.attention.value.weight",
                "encoder.layer.0.layer_scale2.lambda1",
                "encoder.layer.0.mlp.weights_in.bias",
                "layernorm.bias",
            ]
        );
        assert_eq!(
            hf["encoder.layer.0.attention.attention.key.weight"].data,
            [4.0, 5.0, 6.0, 7.0]
        );
        assert_eq!(hf_to_official(&hf).unwrap(), official);
        let mut prefixed: Tensors = hf
            .iter()
            .map(|(k, v)| (format!("dinov2.{k}"), v.clone()))
            .collect();
        prefixed.insert("classifier.weight".into(), Tensor::zeros(&[3, 4]));
        assert!(is_hugging_face(&prefixed));
        assert_eq!(import_backbone(prefixed).unwrap(), official);
        let mut missing = hf.clone();
        missing.remove("encoder.layer.0.attention.attention.value.weight");
        assert!(hf_to_official(&missing)
            .unwrap_err()
            .to_string()
            .contains("query, key and value"));
        let mut odd = official.clone();
        odd.insert("blocks.0.attn.rope".into(), t(0.0));
        assert!(official_to_hf(&odd)
            .unwrap_err()
            .to_string()
            .contains("blocks.0.attn.rope"));
    }
}
