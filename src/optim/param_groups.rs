//! Parameter groups from the official names (spec 9.2, 9.3): layer-wise lr decay over the
//! backbone, patch-embed lr multiplier, name-based weight-decay exclusion, and the last-layer flag.
//!
//! Names are `<submodule>.<state-dict key>` as in [`crate::nn::params::ParamTable`]; submodule
//! `backbone` gets the ViT rules, `dino_head` / `ibot_head` an lr multiplier of 1.

use crate::error::{Error, Result};
use crate::nn::params::ParamTable;

/// The optimizer settings of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupSettings {
    /// Multiplies the scheduled lr (or the last-layer lr).
    pub lr_multiplier: f64,
    /// Multiplies the scheduled weight decay (0 or 1).
    pub wd_multiplier: f64,
    /// Follows the last-layer lr schedule (zero during the freeze).
    pub is_last_layer: bool,
}

/// The layer-wise decay configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerDecay {
    /// Number of backbone blocks.
    pub depth: usize,
    /// `optim.layerwise_decay` (official 0.9).
    pub layerwise_decay: f64,
    /// `optim.patch_embed_lr_mult` (official 0.2).
    pub patch_embed_lr_mult: f64,
}

impl LayerDecay {
    /// The official multipliers (0.9 and 0.2) for a backbone of `depth` blocks.
    pub fn official(depth: usize) -> Self {
        LayerDecay {
            depth,
            layerwise_decay: 0.9,
            patch_embed_lr_mult: 0.2,
        }
    }
}

/// Backbone parameters at layer 0 (before the first block).
const EMBEDDING_KEYS: [&str; 5] = [
    "pos_embed",
    "patch_embed",
    "mask_token",
    "cls_token",
    "register_tokens",
];

/// The block index of a backbone key: `blocks.<i>.` or, with FSDP block chunks,
/// `blocks.<chunk>.<i>.` (the second number is the global block index).
fn block_index(key: &str) -> Option<Result<usize>> {
    let at = key.find("blocks.")?;
    let mut parts = key[at..].split('.').skip(1);
    let first = parts.next()?;
    let second = parts.next();
    let index = match second.map(str::parse::<usize>) {
        Some(Ok(i)) if first.parse::<usize>().is_ok() => Ok(i),
        _ => first
            .parse::<usize>()
            .map_err(|_| Error::Config(format!("parameter '{key}': no block index"))),
    };
    Some(index)
}

/// The settings of one parameter from its full name.
pub fn param_settings(name: &str, decay: &LayerDecay) -> Result<GroupSettings> {
    let name = name.replace("_fsdp_wrapped_module.", "");
    let (submodule, key) = name
        .split_once('.')
        .ok_or_else(|| Error::Config(format!("parameter '{name}' has no submodule prefix")))?;
    let mut lr_multiplier = match submodule {
        "backbone" => {
            let depth = decay.depth;
            let layer_id = if EMBEDDING_KEYS.iter().any(|k| key.contains(k)) {
                0
            } else if let Some(i) = block_index(key) {
                let i = i?;
                if i >= depth {
                    return Err(Error::Config(format!(
                        "parameter '{name}': block {i} but the backbone has depth {depth}"
                    )));
                }
                i + 1
            } else {
                depth + 1
            };
            decay.layerwise_decay.powi((depth + 1 - layer_id) as i32)
        }
        "dino_head" | "ibot_head" => 1.0,
        other => {
            return Err(Error::Config(format!(
                "parameter '{name}': unknown submodule '{other}' (expected backbone, dino_head or ibot_head)"
            )))
        }
    };
    let wd_multiplier = if key.ends_with(".bias") || key.contains("norm") || key.contains("gamma") {
        0.0
    } else {
        1.0
    };
    if key.contains("patch_embed") {
        lr_multiplier *= decay.patch_embed_lr_mult;
    }
    Ok(GroupSettings {
        lr_multiplier,
        wd_multiplier,
        is_last_layer: key.contains("last_layer"),
    })
}

/// An optimizer group: the parameters of one submodule that share identical settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedGroup {
    pub submodule: String,
    pub settings: GroupSettings,
    /// Full names, in registration order.
    pub params: Vec<String>,
}

/// Per-parameter settings (registration order) and the fused groups (per submodule, in order of
/// first appearance).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroups {
    pub per_param: Vec<GroupSettings>,
    pub groups: Vec<FusedGroup>,
}

impl ParamGroups {
    /// Groups for parameters given by name.
    pub fn from_names<S: AsRef<str>>(names: &[S], decay: &LayerDecay) -> Result<Self> {
        let mut per_param = Vec::with_capacity(names.len());
        let mut groups: Vec<FusedGroup> = Vec::new();
        for name in names {
            let name = name.as_ref();
            let s = param_settings(name, decay)?;
            per_param.push(s);
            let submodule = name.split('.').next().unwrap_or_default();
            match groups
                .iter_mut()
                .find(|g| g.submodule == submodule && g.settings == s)
            {
                Some(g) => g.params.push(name.to_string()),
                None => groups.push(FusedGroup {
                    submodule: submodule.to_string(),
                    settings: s,
                    params: vec![name.to_string()],
                }),
            }
        }
        // Official order: all groups of the backbone, then of each head (submodules are built
        // and fused one after the other).
        let mut order: Vec<&str> = Vec::new();
        for g in &groups {
            if !order.contains(&g.submodule.as_str()) {
                order.push(&g.submodule);
            }
        }
        let order: Vec<String> = order.into_iter().map(String::from).collect();
        groups.sort_by_key(|g| order.iter().position(|s| *s == g.submodule));
        Ok(ParamGroups { per_param, groups })
    }

    /// Groups for every parameter of a table.
    pub fn from_table(table: &ParamTable, decay: &LayerDecay) -> Result<Self> {
        let names: Vec<&str> = table.specs().iter().map(|s| s.name.as_str()).collect();
        Self::from_names(&names, decay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_rules_for_vit_l() {
        let d = LayerDecay::official(24);
        let s = |n: &str| param_settings(n, &d).unwrap();
        assert!(
            (s("backbone.patch_embed.proj.weight").lr_multiplier - 0.9f64.powi(25) * 0.2).abs()
                < 1e-15
        );
        assert!((s("backbone.cls_token").lr_multiplier - 0.9f64.powi(25)).abs() < 1e-15);
        assert!((s("backbone.blocks.23.mlp.fc1.weight").lr_multiplier - 0.9).abs() < 1e-15);
        // Chunked FSDP layout: blocks.<chunk>.<i>.
        assert_eq!(
            s("backbone.blocks.1.7.attn.qkv.weight"),
            s("backbone.blocks.7.attn.qkv.weight")
        );
        assert_eq!(s("backbone.norm.weight").lr_multiplier, 1.0);
        assert_eq!(s("backbone.norm.weight").wd_multiplier, 0.0);
        assert_eq!(s("backbone.blocks.0.ls1.gamma").wd_multiplier, 0.0);
        assert_eq!(s("backbone.pos_embed").wd_multiplier, 1.0);
        let g = s("dino_head.last_layer.weight_g");
        assert_eq!(
            (g.lr_multiplier, g.wd_multiplier, g.is_last_layer),
            (1.0, 1.0, true)
        );
        assert!(param_settings("backbone.blocks.24.norm1.weight", &d).is_err());
        assert!(param_settings("head.weight", &d).is_err());
        assert!(param_settings("nosubmodule", &d).is_err());
    }
}
