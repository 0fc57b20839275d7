//! Recipes: how the training knobs are chosen on top of a preset.
//!
//! `official` is the official configuration as given. `small` is for small datasets, small
//! images and budgets of minutes: at the demo scale the official recipe's DINO targets become
//! uniform within 20 steps (every image starts at nearly the same CLS token and the head's
//! output is centred away), so what the model learns comes from KoLeo alone, and it ends near
//! 60% k-NN where raw pixels give 81%. Each setting below was measured on the demo data;
//! `tools/recipe-experiments.sh` reruns the table in `docs/recipe-small.md`.
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
/// crops) with the knobs that move k-NN at that scale (measurements: `docs/recipe-small.md`).
const SMALL: &[RecipeSetting] = &[
    setting("student.arch", "vit_tiny", "a small ViT for small images"),
    setting("dinotrain.embed_dim", "192", "a small ViT for small images"),
    setting("dinotrain.depth", "6", "a small ViT for small images"),
    setting("dinotrain.num_heads", "3", "a small ViT for small images"),
    setting("crops.global_crops_size", "32", "small images"),
    setting("crops.local_crops_size", "16", "small images"),
    setting(
        "student.patch_size",
        "16",
        "2x2 tokens per 32-px global crop: k-NN 80-81% on the demo data after 300-600 steps, \
         against 70-72% with patch 8 (4x4 tokens), 74% with 48-px crops (3x3) and 58-60% with \
         patch 4, and the cheapest step",
    ),
    setting(
        "student.layerscale",
        "0.1",
        "with 1e-5 every image starts at nearly the same CLS token (k-NN 11% at \
         initialisation, DINO targets uniform within 20 steps); at 0.1 the random ViT starts at \
         72% and ends 2-3 points higher than at 1e-5 or 1.0",
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
    setting(
        "dinotrain.steps",
        "600",
        "about 3 minutes on 2 CPU cores at this size; on the demo data k-NN is flat from \
         step 400 (1200 steps: +0.2 points)",
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
        assert_eq!(config.student.patch_size, 16);
        assert_eq!(config.dinotrain.embed_dim, Some(192));
    }
}
