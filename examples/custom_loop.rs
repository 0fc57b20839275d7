//! A training loop written by hand over the crate's pieces: the configuration gives the plan
//! and the crop recipe, the loader cuts crops of the demo images, `Trainer::train_step` runs
//! one iteration (masks, forward, backward, clipping, AdamW, EMA), and the teacher backbone is
//! exported at the end. No run folder, no checkpoints: that is what `dinotrain::train::train`
//! adds.
//!
//! ```text
//! cargo run --release --example custom_loop
//! ```

use dinotrain::data::{demo_split, Loader, LoaderConfig, Split};
use dinotrain::eval::backbone::arch_metadata;
use dinotrain::io::export::{export_backbone, KeyNaming};
use dinotrain::train::{Preset, TrainConfig, Trainer};
use std::sync::Arc;

// `pub`: tests/examples.rs runs this example as a test.
pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The demo recipe (32 px global and 16 px local crops), with a smaller ViT.
    let mut config = TrainConfig::preset(Preset::Demo).steps(3).batch_size(8);
    config.dinotrain.embed_dim = Some(64);
    config.dinotrain.depth = Some(2);
    config.dinotrain.num_heads = Some(2);
    let config = config.resolve()?;
    let plan = config.plan()?;
    // The CPU; `Trainer::new_on(plan, device)` takes a resolved CUDA device.
    let mut trainer = Trainer::new(plan.clone())?;

    let images = Arc::new(demo_split(Split::Train)?);
    let loader_config = LoaderConfig {
        crops: config.crops(),
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(images, loader_config, plan.batch_size, plan.seed, 0)?;
    while trainer.step() < config.total_iters {
        let batch = loader.next_batch()?; // crop-major: [2B, 3, 32, 32] and [8B, 3, 16, 16]
        let record = trainer.train_step(&batch.global, &batch.local)?;
        loader.recycle(batch);
        let terms: Vec<String> = (record.losses.terms().iter())
            .map(|(name, value)| format!("{name} {value:.4}"))
            .collect();
        let lr = record.scheduled.lr;
        println!(
            "step {} (lr {lr:.2e}): {}",
            record.step + 1,
            terms.join(", ")
        );
    }

    // The whole state on the host: student, teacher, AdamW moments, centers, step.
    let state = trainer.snapshot()?;
    let out = std::env::temp_dir().join("dinotrain-custom-loop-teacher.safetensors");
    let meta = arch_metadata(&trainer.model.backbone.cfg);
    let table = &trainer.model.table;
    export_backbone(&out, table, &state.teacher, KeyNaming::Official, &meta)?;
    println!("teacher after {} steps: {}", state.step, out.display());
    Ok(())
}
