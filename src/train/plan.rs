//! From a resolved configuration to what the trainer and the loader are built with: the
//! iteration plan ([`TrainPlan`]) and the multi-crop recipe.

use super::config::ResolvedConfig;
use super::trainer::TrainPlan;
use crate::data::MultiCropConfig;
use crate::error::Result;
use crate::optim::AdamHyper;
use crate::optim::LayerDecay;
use crate::ssl::dino_loss::STUDENT_TEMP;
use crate::ssl::step::{HeadConfig, LossConfig};

impl ResolvedConfig {
    /// The iteration plan this configuration describes ([`plan_from_config`]).
    pub fn plan(&self) -> Result<TrainPlan> {
        plan_from_config(self)
    }

    /// The multi-crop recipe of this configuration ([`crops_from_config`]).
    pub fn crops(&self) -> MultiCropConfig {
        crops_from_config(self)
    }
}

/// The iteration plan a resolved configuration describes.
pub fn plan_from_config(r: &ResolvedConfig) -> Result<TrainPlan> {
    let c = &r.config;
    let head = |hidden, bottleneck, k| HeadConfig {
        hidden_dim: hidden,
        bottleneck_dim: bottleneck,
        n_prototypes: k,
    };
    Ok(TrainPlan {
        dino_head: head(
            c.dino.head_hidden_dim,
            c.dino.head_bottleneck_dim,
            c.dino.head_n_prototypes,
        ),
        ibot_head: c.ibot.separate_head.then(|| {
            head(
                c.ibot.head_hidden_dim,
                c.ibot.head_bottleneck_dim,
                c.ibot.head_n_prototypes,
            )
        }),
        losses: LossConfig {
            method: r.method,
            dino_loss_weight: c.dino.loss_weight as f32,
            koleo_loss_weight: c.dino.koleo_loss_weight as f32,
            ibot_loss_weight: c.ibot.loss_weight as f32,
            student_temp: STUDENT_TEMP,
        },
        centering: c.train.centering,
        batch_size: c.train.batch_size_per_gpu,
        accumulate: c.dinotrain.accumulate,
        n_local_crops: c.crops.local_crops_number,
        global_crop_size: c.crops.global_crops_size,
        local_crop_size: c.crops.local_crops_size,
        mask_probability: c.ibot.mask_sample_probability as f32,
        mask_ratio_min_max: (
            c.ibot.mask_ratio_min_max[0] as f32,
            c.ibot.mask_ratio_min_max[1] as f32,
        ),
        drop_path_rate: r.arch.drop_path_rate as f32,
        schedules: r.schedules,
        layer_decay: LayerDecay {
            depth: r.arch.vit.depth,
            layerwise_decay: c.optim.layerwise_decay,
            patch_embed_lr_mult: c.optim.patch_embed_lr_mult,
        },
        adam: AdamHyper {
            beta1: c.optim.adamw_beta1,
            beta2: c.optim.adamw_beta2,
            ..AdamHyper::default()
        },
        clip_grad: c.optim.clip_grad as f32,
        seed: c.train.seed,
        precision: None,
        vit: r.arch.vit.clone(),
    })
}

/// The multi-crop recipe of the configuration (official probabilities and jitter).
pub fn crops_from_config(r: &ResolvedConfig) -> MultiCropConfig {
    let c = &r.config.crops;
    MultiCropConfig {
        global_size: c.global_crops_size as u32,
        local_size: c.local_crops_size as u32,
        n_global: 2,
        n_local: c.local_crops_number,
        global_scale: (c.global_crops_scale[0], c.global_crops_scale[1]),
        local_scale: (c.local_crops_scale[0], c.local_crops_scale[1]),
        ..MultiCropConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Ffn;
    use crate::train::config::{ConfigBuilder, Preset};

    #[test]
    fn the_demo_preset_resolves_to_a_valid_plan() {
        let (config, warnings) = ConfigBuilder::new(Preset::Demo).unwrap().build().unwrap();
        let r = ResolvedConfig::resolve(config, warnings).unwrap();
        let plan = plan_from_config(&r).unwrap();
        assert_eq!(plan.vit.patch_size, r.arch.vit.patch_size);
        assert_eq!(plan.global_crop_size % plan.vit.patch_size, 0);
        assert_eq!(plan.centering, r.config.train.centering);
        assert!(matches!(plan.vit.ffn, Ffn::Mlp { hidden } if hidden == 4 * plan.vit.embed_dim));
    }

    #[test]
    fn swiglu_configs_build_the_official_width() {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        b.set("student.ffn_layer=swiglufused").unwrap();
        b.set("student.arch=vit_small").unwrap();
        let (config, warnings) = b.build().unwrap();
        let r = ResolvedConfig::resolve(config, warnings).unwrap();
        let plan = plan_from_config(&r).unwrap();
        assert_eq!(plan.vit.ffn, Ffn::SwiGlu { hidden: 4 * 384 });
    }
}
