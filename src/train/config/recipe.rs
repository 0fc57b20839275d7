//! Recipes: how the training knobs are chosen on top of a preset.
//!
//! `official` is the official configuration as given. `small` is for small datasets, small
//! images and budgets of minutes: at the demo scale the official recipe's DINO targets become
//! uniform within 20 steps (every image starts at nearly the same CLS token and the head's
//! output is centred away), so what the model learns comes from KoLeo alone. Each setting below
//! was measured on the demo data; `tools/recipe-experiments.sh` reruns the table in
//! `docs/recipe-small.md`.
//!
//! A recipe is a layer of the configuration: it sets its keys after the preset and before
//! files and `--set`, so anything the user gives wins. The settings that stay in force are
//! reported (`train.log`, `--print-config`) with the reason for each.

use crate::error::{Error, Result};

/// How the training knobs are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// The configuration as given (official defaults unless a file or `--set` changes them).
    Official,
    /// For small datasets, small images and short runs; see the module documentation.
    Small,
}

/// One key a recipe sets: the key, its YAML value and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecipeSetting {
    pub key: &'static str,
    pub value: &'static str,
    pub why: &'static str,
}

const fn setting(key: &'static str, value: &'static str, why: &'static str) -> RecipeSetting {
    RecipeSetting { key, value, why }
}

/// The small recipe: the demo's model and crop sizes (a ViT with D 192, depth 6, 32/16-px
/// crops) with the knobs that move k-NN at that scale.
const SMALL: &[RecipeSetting] = &[
    setting("student.arch", "vit_tiny", "a small ViT for small images"),
    setting("dinotrain.embed_dim", "192", "a small ViT for small images"),
    setting("dinotrain.depth", "6", "a small ViT for small images"),
    setting("dinotrain.num_heads", "3", "a small ViT for small images"),
    setting("crops.global_crops_size", "32", "small images"),
    setting("crops.local_crops_size", "16", "small images"),
    setting(
        "student.patch_size",
        "8",
        "16 tokens per global crop; 12-15 k-NN points above patch 4 on the demo data, and a \
         2.4x cheaper step",
    ),
    setting(
        "student.layerscale",
        "0.1",
        "1e-5 starts every image at nearly the same CLS token (k-NN 12% at initialisation on \
         the demo data, DINO targets uniform by step 20); 0.1 starts at 60% and ends higher",
    ),
    setting("dino.head_n_prototypes", "4096", "sized to a small dataset"),
    setting("ibot.head_n_prototypes", "4096", "sized to a small dataset"),
    setting("dino.head_hidden_dim", "512", "sized to a small model"),
    setting("ibot.head_hidden_dim", "512", "sized to a small model"),
    setting("dino.head_bottleneck_dim", "128", "sized to a small model"),
    setting("ibot.head_bottleneck_dim", "128", "sized to a small model"),
    setting(
        "student.drop_path_rate",
        "0.0",
        "a small model on a short run",
    ),
    setting(
        "train.batch_size_per_gpu",
        "64",
        "a batch a CPU steps through quickly",
    ),
];

impl Recipe {
    pub const NAMES: [&'static str; 2] = ["official", "small"];

    /// Parses a recipe name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "official" => Ok(Recipe::Official),
            "small" => Ok(Recipe::Small),
            _ => Err(Error::Config(format!(
                "unknown recipe '{name}' (known: {})",
                Recipe::NAMES.join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Recipe::Official => "official",
            Recipe::Small => "small",
        }
    }

    /// The keys the recipe sets.
    pub fn settings(self) -> &'static [RecipeSetting] {
        match self {
            Recipe::Official => &[],
            Recipe::Small => SMALL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::{ConfigBuilder, Preset};

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known() {
        for name in Recipe::NAMES {
            assert_eq!(Recipe::from_name(name).unwrap().name(), name);
        }
        let err = Recipe::from_name("tiny").unwrap_err().to_string();
        assert!(err.contains("official, small"), "{err}");
    }

    #[test]
    fn every_small_setting_is_a_valid_key_and_value() {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        for s in Recipe::Small.settings() {
            b.set_value(s.key, s.value)
                .unwrap_or_else(|e| panic!("{}: {e}", s.key));
        }
        let (config, _) = b.build().unwrap();
        assert_eq!(config.student.patch_size, 8);
        assert_eq!(config.dinotrain.embed_dim, Some(192));
    }
}
