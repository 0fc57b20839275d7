//! Building a [`TrainConfig`] from layers: a preset, YAML files merged over it the way OmegaConf
//! merges (groups recursively, leaves replaced), then `--set key=value` overrides.
//!
//! Every value is type-checked against the default's YAML type before it is stored, so a bad
//! value is an error naming its key. An unknown key given with `--set` (or inside the
//! `dinotrain:` group) is an error listing the closest known keys; an unknown key elsewhere in a
//! file is a warning (an official config from a newer release still loads). Official keys that
//! dinotrain reads but does not act on draw a warning when they differ from the base.

use super::recipe::{Recipe, RecipeSetting};
use super::{Preset, TrainConfig};
use crate::error::{Error, Result};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Something in the user's configuration that dinotrain does not act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigWarning {
    /// A key that no dinotrain group has (in a file, outside `dinotrain:`); it is dropped.
    UnknownKey {
        key: String,
        source: String,
        close: Vec<String>,
    },
    /// An official key that dinotrain reads but ignores, set to a non-default value.
    IgnoredKey { key: String, why: &'static str },
    /// A value changed to one the run can use (with the reason).
    Adjusted {
        key: String,
        from: String,
        to: String,
        why: String,
    },
    /// A key a recipe set and nothing later overrode: a note, not a warning.
    Recipe {
        recipe: &'static str,
        setting: RecipeSetting,
    },
}

impl ConfigWarning {
    /// Whether this is something to warn about (recipe choices are only reported).
    pub fn is_warning(&self) -> bool {
        !matches!(self, ConfigWarning::Recipe { .. })
    }
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarning::UnknownKey { key, source, close } => {
                write!(f, "{source}: unknown key '{key}' ignored")?;
                if !close.is_empty() {
                    write!(f, " (did you mean {}?)", close.join(", "))?;
                }
                Ok(())
            }
            ConfigWarning::IgnoredKey { key, why } => {
                write!(f, "'{key}' is ignored by dinotrain: {why}")
            }
            ConfigWarning::Adjusted { key, from, to, why } => {
                write!(f, "{key} = {from} changed to {to}: {why}")
            }
            ConfigWarning::Recipe { recipe, setting } => write!(
                f,
                "recipe {recipe}: {} = {} ({})",
                setting.key, setting.value, setting.why
            ),
        }
    }
}

/// Official keys (or key prefixes ending in '.') that dinotrain accepts but does not act on.
const IGNORED: &[(&str, &str)] = &[
    (
        "MODEL.",
        "it names weights for the official evaluation scripts; use dinotrain.model",
    ),
    (
        "compute_precision.",
        "precision is chosen per device (f32 on CPU; bf16 compute with f32 master weights on CUDA)",
    ),
    (
        "train.dataset_path",
        "dinotrain reads an image folder given by dinotrain.data (--data)",
    ),
    (
        "train.saveckp_freq",
        "use dinotrain.checkpoint_every (in steps)",
    ),
    ("train.num_workers", "use dinotrain.workers"),
    (
        "train.cache_dataset",
        "the data pipeline decides what to cache",
    ),
    (
        "student.block_chunks",
        "it only changes FSDP wrapping; the parameters are the same",
    ),
    (
        "evaluation.eval_period_iterations",
        "use dinotrain.knn_every (in steps)",
    ),
];

/// Command-line flags of `dinotrain train` and the configuration key each one sets.
pub const FLAG_KEYS: [(&str, &str); 10] = [
    ("data", "dinotrain.data"),
    ("out", "train.output_dir"),
    ("model", "dinotrain.model"),
    ("method", "dinotrain.method"),
    ("epochs", "optim.epochs"),
    ("steps", "dinotrain.steps"),
    ("batch-size", "train.batch_size_per_gpu"),
    ("accumulate", "dinotrain.accumulate"),
    ("device", "dinotrain.device"),
    ("seed", "train.seed"),
];

/// Layers a configuration: `ConfigBuilder::new(preset).file(path)?.set("optim.base_lr=1e-3")?.build()`.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    tree: Value,
    base: BTreeMap<String, String>,
    warnings: Vec<ConfigWarning>,
    /// The recipe applied, with the flattened value of each key it changed, right after it.
    recipe: Option<(Recipe, BTreeMap<String, String>)>,
}

impl ConfigBuilder {
    /// Starts from a preset.
    pub fn new(preset: Preset) -> Result<Self> {
        Self::from_config(&preset.config())
    }

    /// Starts from any configuration.
    pub fn from_config(config: &TrainConfig) -> Result<Self> {
        let tree = serde_yaml_ng::to_value(config)
            .map_err(|e| Error::Config(format!("cannot represent the configuration: {e}")))?;
        Ok(ConfigBuilder {
            base: config.flatten()?,
            tree,
            warnings: Vec::new(),
            recipe: None,
        })
    }

    /// Applies a recipe's settings (call it before files and overrides, which then win).
    pub fn recipe(&mut self, recipe: Recipe) -> Result<&mut Self> {
        let before = parse(&self.tree, "configuration")?.flatten()?;
        for s in recipe.settings() {
            self.set_value(s.key, s.value)
                .map_err(|e| Error::Config(format!("recipe {}: {e}", recipe.name())))?;
        }
        let flat = parse(&self.tree, "configuration")?.flatten()?;
        // Only the keys the recipe changed are reported.
        let values = (recipe.settings().iter())
            .filter(|s| before.get(s.key) != flat.get(s.key))
            .filter_map(|s| Some((s.key.to_string(), flat.get(s.key)?.clone())))
            .collect();
        self.recipe = Some((recipe, values));
        Ok(self)
    }

    /// Merges a YAML file (an official train config or a dinotrain `config.yaml`).
    pub fn file(&mut self, path: &Path) -> Result<&mut Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        self.yaml(&text, &path.display().to_string())
    }

    /// Merges YAML text; `source` names it in messages.
    pub fn yaml(&mut self, text: &str, source: &str) -> Result<&mut Self> {
        let user: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| Error::Config(format!("{source}: not valid YAML: {e}")))?;
        match user {
            Value::Null => return Ok(self),
            Value::Mapping(_) => {}
            _ => {
                return Err(Error::Config(format!(
                    "{source}: expected a mapping of groups (dino:, optim:, ...) at the top level"
                )))
            }
        }
        let leaves = self.leaf_keys();
        let mut tree = self.tree.clone();
        let mut warnings = Vec::new();
        merge(&mut tree, &user, "", source, &leaves, &mut warnings)?;
        parse(&tree, source)?;
        self.tree = tree;
        self.warnings.extend(warnings);
        Ok(self)
    }

    /// Applies one `key=value` override (the value is parsed as YAML: `8`, `1e-3`, `true`,
    /// `[0.1, 0.5]`, `sinkhorn_knopp`).
    pub fn set(&mut self, assignment: &str) -> Result<&mut Self> {
        let (key, value) = assignment.split_once('=').ok_or_else(|| {
            Error::Config(format!(
                "--set '{assignment}': expected key=value (e.g. optim.base_lr=0.001)"
            ))
        })?;
        self.set_value(key.trim(), value.trim())
    }

    /// Applies one override given as key and YAML value text.
    pub fn set_value(&mut self, key: &str, value: &str) -> Result<&mut Self> {
        let given = if value.is_empty() {
            Value::String(String::new())
        } else {
            serde_yaml_ng::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()))
        };
        self.set_parsed(key, given)
    }

    /// Applies one override with an already-typed value.
    pub fn set_parsed(&mut self, key: &str, given: Value) -> Result<&mut Self> {
        let context = format!("--set {key}");
        let leaves = self.leaf_keys();
        // Work on a copy so a refused override leaves the builder as it was.
        let mut tree = self.tree.clone();
        let mut node = &mut tree;
        for part in key.split('.') {
            node = match node {
                Value::Mapping(m) => match m.get_mut(part) {
                    Some(next) => next,
                    None => return Err(unknown_key_error(key, &leaves)),
                },
                _ => return Err(unknown_key_error(key, &leaves)),
            };
        }
        match (&*node, &given) {
            (Value::Mapping(_), Value::Mapping(_)) => {
                let mut warnings = Vec::new();
                merge(node, &given, key, &context, &leaves, &mut warnings)?;
                if let Some(w) = warnings.into_iter().next() {
                    return Err(Error::Config(w.to_string()));
                }
            }
            (Value::Mapping(_), _) => {
                return Err(Error::Config(format!(
                    "{context}: '{key}' is a group of keys; set one of them (e.g. {key}.<name>=...)"
                )))
            }
            _ => *node = coerce(node, given, key)?,
        }
        parse(&tree, &context)?;
        self.tree = tree;
        Ok(self)
    }

    /// Applies a command-line flag (`--batch-size 16` → `flag("batch-size", "16")`) through
    /// its configuration key ([`FLAG_KEYS`]).
    pub fn flag(&mut self, flag: &str, value: &str) -> Result<&mut Self> {
        let flag = flag.trim_start_matches('-');
        let key = FLAG_KEYS
            .iter()
            .find(|(f, _)| *f == flag)
            .map(|(_, k)| *k)
            .ok_or_else(|| Error::Config(format!("--{flag} is not a configuration flag")))?;
        // Paths and names are strings whatever they look like.
        let parsed = match key {
            "dinotrain.data" | "train.output_dir" | "dinotrain.model" => {
                Value::String(value.to_string())
            }
            _ => serde_yaml_ng::from_str(value).unwrap_or_else(|_| Value::String(value.into())),
        };
        self.set_parsed(key, parsed)
            .map_err(|e| Error::Config(format!("--{flag} {value} (sets {key}): {e}")))
    }

    /// The validated configuration and the warnings gathered on the way.
    pub fn build(&self) -> Result<(TrainConfig, Vec<ConfigWarning>)> {
        let config = parse(&self.tree, "configuration")?;
        let mut warnings = self.warnings.clone();
        let flat = config.flatten()?;
        if let Some((recipe, values)) = &self.recipe {
            // The recipe's settings still in force (a file or --set may have replaced some).
            for s in recipe.settings() {
                if values
                    .get(s.key)
                    .is_some_and(|v| flat.get(s.key) == Some(v))
                {
                    warnings.push(ConfigWarning::Recipe {
                        recipe: recipe.name(),
                        setting: *s,
                    });
                }
            }
        }
        for (key, value) in flat {
            if self.base.get(&key) == Some(&value) {
                continue;
            }
            if let Some((_, why)) = IGNORED.iter().find(|(pattern, _)| {
                key == *pattern || (pattern.ends_with('.') && key.starts_with(pattern))
            }) {
                warnings.push(ConfigWarning::IgnoredKey { key, why });
            }
        }
        Ok((config, warnings))
    }

    fn leaf_keys(&self) -> Vec<String> {
        let mut out = BTreeMap::new();
        flatten_into(&self.tree, "", &mut out);
        out.into_keys().collect()
    }
}

fn parse(tree: &Value, source: &str) -> Result<TrainConfig> {
    serde_yaml_ng::from_value(tree.clone()).map_err(|e| Error::Config(format!("{source}: {e}")))
}

/// Merges `src` into `dst` (both mappings): groups recursively, leaves replaced after a type check.
fn merge(
    dst: &mut Value,
    src: &Value,
    prefix: &str,
    source: &str,
    leaves: &[String],
    warnings: &mut Vec<ConfigWarning>,
) -> Result<()> {
    let (Value::Mapping(dst), Value::Mapping(src)) = (dst, src) else {
        return Ok(());
    };
    for (k, v) in src {
        let name = match k {
            Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match dst.get_mut(name.as_str()) {
            Some(slot @ Value::Mapping(_)) => match v {
                Value::Mapping(_) => merge(slot, v, &key, source, leaves, warnings)?,
                // `group:` with nothing under it: OmegaConf keeps the defaults.
                Value::Null => {}
                _ => {
                    return Err(Error::Config(format!(
                        "{source}: '{key}' is a group of keys, not a single value"
                    )))
                }
            },
            Some(slot) => *slot = coerce(slot, v.clone(), &key)?,
            None if key.starts_with("dinotrain.") || key == "dinotrain" => {
                return Err(Error::Config(format!(
                    "{source}: {}",
                    unknown_key_error(&key, leaves)
                )))
            }
            None => warnings.push(ConfigWarning::UnknownKey {
                close: close_matches(&key, leaves),
                key,
                source: source.to_string(),
            }),
        }
    }
    Ok(())
}

/// Checks `given` against the type of the current value and converts where YAML is loose.
fn coerce(current: &Value, given: Value, key: &str) -> Result<Value> {
    if given.is_null() && nullable(key) {
        return Ok(given);
    }
    let bad = |expected: &str, given: &Value| {
        Error::Config(format!("'{key}' expects {expected}, got {}", render(given)))
    };
    Ok(match (current, given) {
        // Optional keys (null by default): the struct's deserializer checks the type.
        (Value::Null, g) => g,
        (Value::Bool(_), g @ Value::Bool(_)) => g,
        (Value::Bool(_), g) => return Err(bad("true or false", &g)),
        (Value::Number(n), Value::Number(g)) => {
            if n.is_f64() || g.is_i64() || g.is_u64() {
                Value::Number(g)
            } else {
                // An integer key given as a float: accept 4.0, refuse 4.5.
                match g.as_f64() {
                    Some(f) if f.fract() == 0.0 && f >= 0.0 => Value::Number((f as u64).into()),
                    _ => return Err(bad("a whole number", &Value::Number(g))),
                }
            }
        }
        (Value::Number(n), g) => {
            return Err(bad(
                if n.is_f64() {
                    "a number"
                } else {
                    "a whole number"
                },
                &g,
            ))
        }
        (Value::String(_), Value::Null) => Value::String(String::new()),
        (Value::String(_), g @ Value::String(_)) => g,
        (Value::String(_), g @ (Value::Number(_) | Value::Bool(_))) => Value::String(render(&g)),
        (Value::String(_), g) => return Err(bad("a single value", &g)),
        (Value::Sequence(cur), Value::Sequence(g)) => {
            if !cur.is_empty() && cur.len() != g.len() {
                return Err(Error::Config(format!(
                    "'{key}' expects a list of {} values, got {}",
                    cur.len(),
                    g.len()
                )));
            }
            let mut out = Vec::with_capacity(g.len());
            for (i, item) in g.into_iter().enumerate() {
                out.push(match cur.get(i) {
                    Some(c) => coerce(c, item, key)?,
                    None => item,
                });
            }
            Value::Sequence(out)
        }
        (Value::Sequence(cur), g) => {
            return Err(bad(
                &format!("a list of {} values like [a, b]", cur.len()),
                &g,
            ))
        }
        (_, g) => g,
    })
}

/// Whether `key` is optional: the official defaults leave exactly the optional keys null.
fn nullable(key: &str) -> bool {
    static NULLABLE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    NULLABLE
        .get_or_init(|| {
            let tree = serde_yaml_ng::to_value(TrainConfig::default()).unwrap_or(Value::Null);
            let mut flat = BTreeMap::new();
            flatten_into(&tree, "", &mut flat);
            flat.into_iter()
                .filter(|(_, v)| v == "null")
                .map(|(k, _)| k)
                .collect()
        })
        .iter()
        .any(|k| k == key)
}

fn unknown_key_error(key: &str, leaves: &[String]) -> Error {
    let close = close_matches(key, leaves);
    let hint = if close.is_empty() {
        "see `config.yaml` in a run folder for every key".to_string()
    } else {
        format!("did you mean {}?", close.join(", "))
    };
    Error::Config(format!("unknown key '{key}': {hint}"))
}

/// Up to five known keys that look like `key` (best first).
pub(crate) fn close_matches(key: &str, leaves: &[String]) -> Vec<String> {
    let last = key.rsplit('.').next().unwrap_or(key);
    let mut scored: Vec<(f64, &String)> = leaves
        .iter()
        .map(|cand| {
            let cand_last = cand.rsplit('.').next().unwrap_or(cand);
            let whole = strsim::jaro_winkler(key, cand);
            let tail = strsim::jaro_winkler(last, cand_last);
            (whole.max(tail - 0.02), cand)
        })
        .filter(|(score, _)| *score >= 0.85)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    scored.into_iter().take(5).map(|(_, k)| k.clone()).collect()
}

/// A leaf value in YAML flow form (`0.004`, `true`, `[0.1, 0.5]`, `null`, plain strings as is).
fn render(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(items) => {
            let inner: Vec<String> = items.iter().map(render).collect();
            format!("[{}]", inner.join(", "))
        }
        other => serde_yaml_ng::to_string(other)
            .unwrap_or_default()
            .trim()
            .replace('\n', " "),
    }
}

/// Flattens a tree into `dotted.key → rendered value`.
pub(crate) fn flatten_into(v: &Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                let name = render(k);
                let key = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}.{name}")
                };
                flatten_into(child, &key, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), render(leaf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::{Centering, Method};

    #[test]
    fn set_parses_typed_values() {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        b.set("optim.base_lr=1e-3")
            .unwrap()
            .set("crops.local_crops_number=2")
            .unwrap()
            .set("train.centering=sinkhorn_knopp")
            .unwrap()
            .set("ibot.mask_ratio_min_max=[0.2, 0.4]")
            .unwrap()
            .set("dinotrain.method=ibot")
            .unwrap()
            .set("dinotrain.steps=50")
            .unwrap()
            .set("teacher.final_momentum_teacher=1")
            .unwrap()
            .set("train.dataset_path=123")
            .unwrap()
            .set("dinotrain.steps=null")
            .unwrap();
        let (c, _) = b.build().unwrap();
        assert_eq!(c.dinotrain.steps, None);
        b.set("dinotrain.steps=50").unwrap();
        let (c, _) = b.build().unwrap();
        assert_eq!(c.optim.base_lr, 1e-3);
        assert_eq!(c.crops.local_crops_number, 2);
        assert_eq!(c.train.centering, Centering::SinkhornKnopp);
        assert_eq!(c.ibot.mask_ratio_min_max, [0.2, 0.4]);
        assert_eq!(c.dinotrain.method, Method::Ibot);
        assert_eq!(c.dinotrain.steps, Some(50));
        assert_eq!(c.train.dataset_path, "123");
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        for (assignment, needle) in [
            ("optim.base_lr=fast", "optim.base_lr"),
            ("crops.local_crops_number=2.5", "whole number"),
            ("ibot.separate_head=maybe", "true or false"),
            ("ibot.mask_ratio_min_max=[0.1]", "list of 2"),
            ("dinotrain.method=simclr", "unknown variant"),
            ("dinotrain.steps=-4", "--set dinotrain.steps"),
            ("optim", "key=value"),
            ("optim=3", "group"),
            ("optim.epochs=null", "expects a number"),
        ] {
            let before = b.build().unwrap().0;
            let err = b.set(assignment).unwrap_err().to_string();
            assert!(err.contains(needle), "{assignment}: {err}");
            assert_eq!(
                b.build().unwrap().0,
                before,
                "{assignment} changed the builder"
            );
        }
    }

    #[test]
    fn unknown_key_lists_close_matches() {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        let err = b.set("optim.base_lrr=0.1").unwrap_err().to_string();
        assert!(err.contains("did you mean optim.base_lr"), "{err}");
        let err = b.set("local_crops_number=2").unwrap_err().to_string();
        assert!(err.contains("crops.local_crops_number"), "{err}");
        let err = b.set("dinotrain.stepz=2").unwrap_err().to_string();
        assert!(err.contains("dinotrain.steps"), "{err}");
    }

    #[test]
    fn file_unknown_official_keys_warn_and_dinotrain_typos_fail() {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        b.yaml(
            "optim:\n  base_lr: 0.002\n  new_knob: 3\nfuture_group:\n  x: 1\nstudent:\n  block_chunks: 4\n",
            "user.yaml",
        )
        .unwrap();
        let (c, warnings) = b.build().unwrap();
        assert_eq!(c.optim.base_lr, 0.002);
        let text: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
        assert!(
            text.iter().any(|w| w.contains("optim.new_knob")),
            "{text:?}"
        );
        assert!(text.iter().any(|w| w.contains("future_group")), "{text:?}");
        assert!(
            text.iter().any(|w| w.contains("student.block_chunks")),
            "{text:?}"
        );
        assert_eq!(warnings.len(), 3, "{text:?}");
        let err = b
            .yaml("dinotrain:\n  knn_evry: 5\n", "user.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dinotrain.knn_every"), "{err}");
    }

    #[test]
    fn defaults_draw_no_warnings_and_empty_groups_keep_defaults() {
        let mut b = ConfigBuilder::new(Preset::Demo).unwrap();
        b.yaml("MODEL:\ndino:\n", "x.yaml").unwrap();
        let (c, warnings) = b.build().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c, Preset::Demo.config());
    }
}
