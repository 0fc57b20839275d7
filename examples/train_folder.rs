//! Trains on a folder of images (searched recursively), or without one on the embedded
//! Fashion-MNIST demo images, printing each step, then the summary.
//!
//! ```text
//! cargo run --release --example train_folder                       # the demo images
//! cargo run --release --example train_folder -- my_images 20        # a folder, 20 steps
//! ```

use dinotrain::train::metrics::StepMetrics;
use dinotrain::train::{
    train, Control, OutdirMode, Preset, Recipe, TrainConfig, TrainObserver, TrainOptions,
};

/// Prints one line per step and the run's messages.
struct PrintSteps;

impl TrainObserver for PrintSteps {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        let (loss, lr) = (m.losses["total"], m.lr);
        println!("step {:>3}  loss {loss:.4}  lr {lr:.2e}", m.step + 1);
        Control::Continue
    }

    fn on_message(&mut self, text: &str) {
        println!("{text}");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let data = args.next();
    let steps = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let out = std::env::temp_dir().join("dinotrain-train-folder");

    // The no-argument run's configuration: a small ViT (D 192, depth 6, patch 16) on 32 px
    // crops with the small recipe, sized for a CPU. `Preset::Official` is the official ViT-L/16.
    let mut config = TrainConfig::preset(Preset::Demo)
        .recipe(Recipe::Small)?
        .steps(steps)
        .batch_size(8)
        .output_dir(&out)
        .knn(false);
    if let Some(dir) = data {
        config = config.data(dir);
    }
    let options = TrainOptions::new(config.resolve()?)
        .outdir(OutdirMode::Overwrite)
        .observer(PrintSteps);
    let summary = train(options)?;
    println!(
        "{} steps in {:.1} s ({:.1} images/s while training); teacher backbone: {}",
        summary.steps,
        summary.wall_seconds,
        summary.images_per_s,
        summary.export.display()
    );
    Ok(())
}
