//! The configuration tree against the official train configs and the schedules fixture.

use dinotrain::golden::Fixture;
use dinotrain::nn::Ffn;
use dinotrain::train::checkpoint::config_diffs;
use dinotrain::train::config::{
    Centering, ConfigBuilder, Method, Preset, ResolvedConfig, StartingPoint,
};
use std::path::Path;

fn resolve(file: &str, sets: &[&str]) -> ResolvedConfig {
    let mut b = ConfigBuilder::new(Preset::Official).unwrap();
    b.file(&Path::new("tests/data/configs").join(file)).unwrap();
    for s in sets {
        b.set(s).unwrap();
    }
    let (config, warnings) = b.build().unwrap();
    ResolvedConfig::resolve(config, warnings).unwrap()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn vitl16_short_resolves_to_the_official_recipe() {
    // 32 GPUs x 64 images: dinotrain runs one process, so the total batch is set directly.
    let r = resolve("vitl16_short.yaml", &["train.batch_size_per_gpu=2048"]);
    assert_eq!(r.total_batch, 2048);
    assert!(close(r.lr, 0.004 * 2f64.sqrt(), 1e-12), "{}", r.lr);
    assert!(close(r.lr, 5.657e-3, 1e-4), "{}", r.lr);
    assert_eq!(r.config.optim.lr, r.lr);
    assert_eq!(r.total_iters, 125_000);
    assert_eq!(r.method, Method::Dinov2);
    assert_eq!(
        (
            r.arch.vit.embed_dim,
            r.arch.vit.depth,
            r.arch.vit.num_heads,
            r.arch.vit.patch_size
        ),
        (1024, 24, 16, 16)
    );
    assert_eq!(
        (r.arch.vit.ffn, r.arch.vit.ffn.width()),
        (Ffn::Mlp { hidden: 4096 }, 4096)
    );
    assert_eq!(r.arch.vit.img_size, 224);
    assert_eq!(r.config.dino.head_n_prototypes, 65536);
    assert!(!r.config.ibot.separate_head);
    assert_eq!(r.config.train.centering, Centering::Softmax);
    assert_eq!(r.schedules.lr.warmup_iters, 12_500);
    assert_eq!(r.schedules.teacher_temp.total_iters, 37_500);
    assert_eq!(r.schedules.freeze_last_layer_iters, 1_250);
    assert_eq!(r.start, StartingPoint::Random);
    // block_chunks only changes FSDP wrapping: accepted with a warning that says so.
    let w: Vec<String> = r.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("student.block_chunks"), "{w:?}");
}

#[test]
fn vitl14_resolves_to_the_official_recipe() {
    let r = resolve("vitl14.yaml", &["train.batch_size_per_gpu=3072"]);
    assert!(close(r.lr, 2e-4 * 3f64.sqrt(), 1e-12), "{}", r.lr);
    assert!(close(r.lr, 3.464e-4, 1e-3), "{}", r.lr);
    assert_eq!(r.total_iters, 500 * 1250);
    assert_eq!(r.schedules.lr.warmup_iters, 80 * 1250);
    assert_eq!(r.schedules.wd.final_value, 0.2);
    assert_eq!(r.schedules.momentum.base, 0.994);
    assert_eq!(r.config.train.centering, Centering::SinkhornKnopp);
    assert_eq!(r.arch.vit.patch_size, 14);
    assert_eq!(r.arch.drop_path_rate, 0.4);
    assert_eq!(
        (r.arch.vit.ffn, r.arch.vit.ffn.width()),
        (Ffn::SwiGlu { hidden: 4096 }, 2736)
    );
    assert_eq!(r.config.dino.head_n_prototypes, 131_072);
    assert_eq!(r.config.dino.head_bottleneck_dim, 384);
    assert!(r.config.ibot.separate_head);
    assert_eq!(r.config.ibot.head_n_prototypes, 131_072);
    assert_eq!(r.config.ibot.head_bottleneck_dim, 256);
    assert_eq!(r.config.ibot.head_hidden_dim, 2048);
    assert_eq!(r.config.optim.layerwise_decay, 1.0);
    assert_eq!(r.config.crops.local_crops_size, 98);
    let w: Vec<String> = r.warnings.iter().map(|w| w.to_string()).collect();
    assert!(w.iter().any(|w| w.contains("train.dataset_path")), "{w:?}");
    assert!(
        w.iter().any(|w| w.contains("student.block_chunks")),
        "{w:?}"
    );
}

#[test]
fn steps_stretch_or_truncate_the_schedules() {
    let r = resolve("vitl16_short.yaml", &["dinotrain.steps=1000"]);
    assert_eq!(r.total_iters, 1000);
    assert_eq!(r.schedules.lr.total_iters, 1000);
    assert_eq!(r.schedules.lr.warmup_iters, 100);
    assert_eq!(r.schedules.teacher_temp.total_iters, 300);
    assert_eq!(r.schedules.freeze_last_layer_iters, 10);
    let r = resolve(
        "vitl16_short.yaml",
        &["dinotrain.steps=1000", "dinotrain.steps_schedule=truncate"],
    );
    assert_eq!(r.total_iters, 1000);
    assert_eq!(r.schedules.lr.total_iters, 125_000);
    assert_eq!(r.schedules.lr.warmup_iters, 12_500);
}

#[test]
fn resolved_yaml_reads_back_to_the_same_plan() {
    let r = resolve("vitl14.yaml", &["dinotrain.steps=77", "train.seed=5"]);
    let dir = tempfile::tempdir().unwrap();
    let path = r.write_yaml(dir.path()).unwrap();
    let mut b = ConfigBuilder::new(Preset::Demo).unwrap();
    b.file(&path).unwrap();
    let (config, warnings) = b.build().unwrap();
    let again = ResolvedConfig::resolve(config, warnings).unwrap();
    // Only what the original run warned about (block_chunks, dataset_path), nothing new.
    assert_eq!(again.warnings, r.warnings);
    // The written file names every dimension; reading it back is a fixed point.
    assert_eq!(again.config, r.recorded_config());
    assert_eq!(again.recorded_config(), r.recorded_config());
    assert_eq!(again.arch, r.arch);
    assert_eq!(again.schedules, r.schedules);
    // A resume with the written file matches the checkpoint of the original run.
    let diffs = config_diffs(
        &r.resume_identity().unwrap(),
        &again.resume_identity().unwrap(),
    );
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[test]
fn config_yaml_records_the_architecture_that_trains() {
    // A small model on top of the official defaults (student.arch: vit_large, drop path 0.3).
    let r = resolve(
        "vitl16_short.yaml",
        &[
            "dinotrain.embed_dim=96",
            "dinotrain.depth=3",
            "dinotrain.num_heads=3",
            "student.drop_path_rate=0.1",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(r.write_yaml(dir.path()).unwrap()).unwrap();
    assert!(
        text.contains(
            "# Architecture: no factory size: embed dim 96, depth 3, 3 heads, patch 16, \
             0 register tokens, MLP hidden 384, LayerScale 1e-5, drop path 0.1, \
             position embedding for 224 px."
        ),
        "{text}"
    );
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let d = &yaml["dinotrain"];
    assert_eq!(
        (d["embed_dim"].as_u64(), d["depth"].as_u64()),
        (Some(96), Some(3))
    );
    assert_eq!(d["num_heads"].as_u64(), Some(3));
    assert_eq!(yaml["student"]["drop_path_rate"].as_f64(), Some(0.1));

    // Dimensions that are a factory's are recorded under its name.
    let r = resolve(
        "vitl16_short.yaml",
        &[
            "dinotrain.embed_dim=384",
            "dinotrain.depth=12",
            "dinotrain.num_heads=6",
        ],
    );
    let text = std::fs::read_to_string(r.write_yaml(dir.path()).unwrap()).unwrap();
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(
        yaml["student"]["arch"].as_str(),
        Some("vit_small"),
        "{text}"
    );
    assert!(text.contains("# Architecture: vit_small: embed dim 384, depth 12, 6 heads"));
    // ... and the config as given (vit_large with three overrides) resumes from it.
    let r2 = resolve("vitl16_short.yaml", &["student.arch=vit_small"]);
    let diffs = config_diffs(
        &r.resume_identity().unwrap(),
        &r2.resume_identity().unwrap(),
    );
    assert!(diffs.is_empty(), "{diffs:?}");
    let r3 = resolve("vitl16_short.yaml", &["student.arch=vit_base"]);
    let diffs = config_diffs(
        &r.resume_identity().unwrap(),
        &r3.resume_identity().unwrap(),
    );
    assert_eq!(diffs.len(), 2, "{diffs:?}"); // embed dim and heads; both have depth 12
}

#[test]
fn a_given_lr_is_replaced_with_a_warning() {
    let r = resolve("vitl16_short.yaml", &["optim.lr=0.5"]);
    assert!((r.lr - 0.004 * (64f64 / 1024.0).sqrt()).abs() < 1e-15);
    let w: Vec<String> = r.warnings.iter().map(|w| w.to_string()).collect();
    assert!(w.iter().any(|w| w.contains("optim.lr")), "{w:?}");
}

#[test]
fn resume_identity_ignores_logging_but_not_the_recipe() {
    let a = resolve("vitl16_short.yaml", &[]);
    let b = resolve(
        "vitl16_short.yaml",
        &[
            "dinotrain.log_every=1",
            "dinotrain.device=cpu",
            "train.output_dir=/x",
        ],
    );
    assert_eq!(a.resume_identity().unwrap(), b.resume_identity().unwrap());
    let c = resolve("vitl16_short.yaml", &["optim.base_lr=0.001"]);
    let (ia, ic) = (a.resume_identity().unwrap(), c.resume_identity().unwrap());
    assert_ne!(ia["optim.base_lr"], ic["optim.base_lr"]);
}

#[test]
fn invalid_plans_are_refused_with_the_key() {
    for (set, needle) in [
        ("crops.local_crops_size=97", "crops.local_crops_size"),
        ("dinotrain.num_heads=5", "multiple of the head count"),
        (
            "ibot.mask_ratio_min_max=[0.6, 0.2]",
            "ibot.mask_ratio_min_max",
        ),
        ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu"),
        ("dinotrain.device=tpu", "unknown device"),
        ("dinotrain.model=weights.bin", "weights.bin"),
        ("optim.warmup_epochs=200", "optim.warmup_epochs"),
    ] {
        let mut b = ConfigBuilder::new(Preset::Official).unwrap();
        b.set(set).unwrap();
        let (config, warnings) = b.build().unwrap();
        let err = ResolvedConfig::resolve(config, warnings)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{set}: {err}");
    }
}

#[test]
fn pretrained_name_sets_the_architecture() {
    let mut b = ConfigBuilder::new(Preset::Official).unwrap();
    b.set("dinotrain.model=dinov2/vitb14_reg4").unwrap();
    b.set("crops.local_crops_size=98").unwrap();
    let (config, warnings) = b.build().unwrap();
    let r = ResolvedConfig::resolve(config, warnings).unwrap();
    assert_eq!(
        (
            r.arch.vit.embed_dim,
            r.arch.vit.depth,
            r.arch.vit.patch_size
        ),
        (768, 12, 14)
    );
    assert_eq!(
        (r.arch.vit.img_size, r.arch.vit.num_register_tokens),
        (518, 4)
    );
    assert!(r.arch.vit.interpolate_antialias);
    assert!(matches!(r.start, StartingPoint::Weights(_)));
}

#[test]
fn demo_preset_resolves_small() {
    let (config, warnings) = ConfigBuilder::new(Preset::Demo).unwrap().build().unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let r = ResolvedConfig::resolve(config, warnings).unwrap();
    assert_eq!(
        (r.arch.vit.embed_dim, r.arch.vit.depth, r.arch.vit.num_heads),
        (192, 6, 3)
    );
    assert_eq!((r.arch.vit.patch_size, r.arch.vit.img_size), (4, 32));
    assert_eq!(r.config.crops.local_crops_size, 16);
    assert_eq!(r.total_batch, 64);
    assert!(close(r.lr, 0.004 * 0.25, 1e-12));
}

#[test]
fn schedules_match_the_golden_fixture() {
    let fx = Fixture::load(Path::new("tests/golden/schedules-s0.safetensors")).unwrap();
    let p = &fx.params;
    let mut b = ConfigBuilder::new(Preset::Official).unwrap();
    for (key, name) in [
        ("train.OFFICIAL_EPOCH_LENGTH", "OFFICIAL_EPOCH_LENGTH"),
        ("optim.base_lr", "base_lr"),
        ("train.batch_size_per_gpu", "batch_size_per_gpu"),
        ("optim.epochs", "epochs"),
        ("teacher.final_momentum_teacher", "final_momentum_teacher"),
        ("optim.freeze_last_layer_epochs", "freeze_last_layer_epochs"),
        ("optim.min_lr", "min_lr"),
        ("teacher.momentum_teacher", "momentum_teacher"),
        ("teacher.teacher_temp", "teacher_temp"),
        ("optim.warmup_epochs", "warmup_epochs"),
        ("teacher.warmup_teacher_temp", "warmup_teacher_temp"),
        (
            "teacher.warmup_teacher_temp_epochs",
            "warmup_teacher_temp_epochs",
        ),
        ("optim.weight_decay", "weight_decay"),
        ("optim.weight_decay_end", "weight_decay_end"),
        ("optim.scaling_rule", "scaling_rule"),
    ] {
        let v = p[name].to_string();
        b.set_value(key, v.trim_matches('"')).unwrap();
    }
    assert_eq!(p["world_size"], 1);
    let (config, warnings) = b.build().unwrap();
    let r = ResolvedConfig::resolve(config, warnings).unwrap();
    assert_eq!(r.total_iters, p["total_iters"].as_u64().unwrap());
    let n_out = p["n_out"].as_u64().unwrap();
    let peak = fx.f32("out.lr_peak").unwrap().data[0] as f64;
    assert!(close(r.lr, peak, 1e-6), "{} vs {peak}", r.lr);
    let values: Vec<_> = (0..n_out).map(|it| r.schedules.at(it)).collect();
    type Field = fn(&dinotrain::optim::ScheduledValues) -> f64;
    let pick: [(&str, Field); 5] = [
        ("lr", |v| v.lr),
        ("wd", |v| v.wd),
        ("momentum", |v| v.momentum),
        ("teacher_temp", |v| v.teacher_temp),
        ("last_layer_lr", |v| v.last_layer_lr),
    ];
    for (name, field) in pick {
        let want = fx.f32(&format!("out.{name}")).unwrap();
        let got: Vec<f64> = values.iter().map(field).collect();
        let (mut num, mut den) = (0f64, 0f64);
        for (g, w) in got.iter().zip(&want.data) {
            num += (g - *w as f64).powi(2);
            den += (*w as f64).powi(2);
        }
        let rel = (num / den.max(1e-30)).sqrt();
        assert!(
            rel <= fx.tol,
            "{name}: relative error {rel}: {got:?} vs {:?}",
            want.data
        );
    }
}

#[test]
fn official_default_file_equals_the_built_in_defaults() {
    // Every key of ssl_default_config.yaml exists here with the same default: merging the
    // file over the defaults changes nothing and warns about nothing.
    let mut b = ConfigBuilder::new(Preset::Official).unwrap();
    b.file(Path::new("tests/data/configs/ssl_default_config.yaml"))
        .unwrap();
    let (config, warnings) = b.build().unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config, dinotrain::train::Config::default());
    // And the file names every official key we have (dinotrain's own section aside).
    let text = std::fs::read_to_string("tests/data/configs/ssl_default_config.yaml").unwrap();
    let official_leaves = config
        .flatten()
        .unwrap()
        .into_keys()
        .filter(|k| !k.starts_with("dinotrain."))
        .count();
    let file_leaves = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| {
            let t = l.trim();
            (t.contains(": ") && !t.ends_with(':')) || t.starts_with("- ")
        })
        .count();
    // mask_ratio_min_max and the two crop scales are lists of two lines each.
    assert_eq!(file_leaves - 3, official_leaves, "{text}");
}

#[test]
fn eval_config_of_a_register_model_resolves() {
    let r = resolve("vitg14_reg4_pretrain.yaml", &[]);
    assert_eq!(
        (r.arch.vit.embed_dim, r.arch.vit.depth, r.arch.vit.num_heads),
        (1536, 40, 24)
    );
    assert_eq!(
        (r.arch.vit.ffn, r.arch.vit.ffn.width()),
        (Ffn::SwiGlu { hidden: 6144 }, 4096)
    );
    assert_eq!(r.arch.vit.num_register_tokens, 4);
    assert!(r.arch.vit.interpolate_antialias);
    assert_eq!(r.arch.vit.interpolate_offset, 0.0);
    assert_eq!(r.arch.vit.img_size, 518);
}

#[test]
fn every_cli_flag_maps_to_a_key() {
    use dinotrain::train::config::FLAG_KEYS;
    let mut b = ConfigBuilder::new(Preset::Demo).unwrap();
    for (flag, value) in [
        ("data", "/images"),
        ("out", "/runs/a"),
        ("model", "dinov2/vits14"),
        ("method", "ibot"),
        ("epochs", "3"),
        ("steps", "40"),
        ("batch-size", "16"),
        ("accumulate", "4"),
        ("device", "cpu"),
        ("seed", "9"),
    ] {
        b.flag(flag, value).unwrap();
    }
    assert_eq!(FLAG_KEYS.len(), 10);
    let (c, _) = b.build().unwrap();
    assert_eq!(c.dinotrain.data.as_deref(), Some(Path::new("/images")));
    assert_eq!(c.train.output_dir, Path::new("/runs/a"));
    assert_eq!(c.dinotrain.model.as_deref(), Some("dinov2/vits14"));
    assert_eq!(c.dinotrain.method, Method::Ibot);
    assert_eq!(c.optim.epochs, 3.0);
    assert_eq!(c.dinotrain.steps, Some(40));
    assert_eq!(c.train.batch_size_per_gpu, 16);
    assert_eq!(c.dinotrain.accumulate, 4);
    assert_eq!(c.train.seed, 9);
    let err = b.flag("batch-size", "many").unwrap_err().to_string();
    assert!(
        err.contains("--batch-size") && err.contains("train.batch_size_per_gpu"),
        "{err}"
    );
    assert!(b.flag("colour", "red").is_err());
}

#[test]
fn a_released_patch_14_model_fits_the_default_crop_sizes() {
    let mut b = ConfigBuilder::new(Preset::Official).unwrap();
    b.set("dinotrain.model=dinov2/vits14").unwrap();
    let (config, warnings) = b.build().unwrap();
    let r = ResolvedConfig::resolve(config, warnings).unwrap();
    assert_eq!(
        (
            r.config.crops.global_crops_size,
            r.config.crops.local_crops_size
        ),
        (224, 98)
    );
    let said: Vec<String> = r.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        said.iter()
            .any(|w| w.contains("crops.local_crops_size = 96 changed to 98")),
        "{said:?}"
    );
    // A patch size the user chose is not second-guessed.
    let mut b = ConfigBuilder::new(Preset::Official).unwrap();
    b.set("student.patch_size=14").unwrap();
    let (config, warnings) = b.build().unwrap();
    let err = ResolvedConfig::resolve(config, warnings)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of the patch size 14"), "{err}");
}
