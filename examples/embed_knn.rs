//! Embeds labelled images with a backbone and classifies them by k-NN (the official weighted
//! k-NN on CLS features).
//!
//! ```text
//! cargo run --release --example embed_knn                        # trains a small model first
//! cargo run --release --example embed_knn -- out/run             # a run folder, a .safetensors
//!                                                                # or .pth file, dinov2/vits14
//! cargo run --release --example embed_knn -- out/run train val   # one subfolder per class
//! ```
//!
//! Without folders the images are the embedded Fashion-MNIST demo split (10,000 + 2,000).

use dinotrain::backend::cuda::resolve_device;
use dinotrain::backend::Device;
use dinotrain::data::scan::{Labels, ScanOptions};
use dinotrain::data::{demo_split, DecodeOptions, FolderSource, ImageSource, Split};
use dinotrain::eval::backbone::load_backbone;
use dinotrain::eval::{knn_classify, topk_accuracy, PatchMean};
use dinotrain::train::{train, OutdirMode, Preset, TrainConfig, TrainOptions};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = match args.first() {
        Some(model) => model.clone(),
        None => small_model()?,
    };
    let (train_set, val_set): (Box<dyn ImageSource>, Box<dyn ImageSource>) = match &args[..] {
        [_, train_dir, val_dir] => (labelled(train_dir)?, labelled(val_dir)?),
        _ => (
            Box::new(demo_split(Split::Train)?),
            Box::new(demo_split(Split::Test)?),
        ),
    };

    let backbone = load_backbone(&model)?;
    let size = backbone.cfg.img_size.min(224); // a multiple of the patch size
    let mut device = resolve_device(Device::Auto)?;
    let mut extractor = backbone.extractor(&mut device)?;
    println!("embedding at {size} px on {}", extractor.device_name());
    let train_emb = backbone.embed(&mut extractor, &*train_set, size, 64, PatchMean::Skip)?;
    let val_emb = backbone.embed(&mut extractor, &*val_set, size, 64, PatchMean::Skip)?;
    let train_labels = labels(&*train_set, &train_emb.kept)?;
    let val_labels = labels(&*val_set, &val_emb.kept)?;

    // The official neighbour counts, at most the number of training images.
    let mut ks: Vec<usize> = [10, 20].map(|k| k.min(train_labels.len())).into();
    ks.dedup();
    let dim = backbone.cfg.embed_dim;
    let knn = knn_classify(&train_emb.cls, &train_labels, &val_emb.cls, dim, &ks, 0.07)?;
    for per_k in &knn.per_k {
        let top1 = topk_accuracy(&per_k.probas, knn.num_classes, &val_labels, 1)?;
        println!(
            "k={:<3} top-1 {:.2}% ({} train / {} val images)",
            per_k.k,
            100.0 * top1,
            train_labels.len(),
            val_labels.len()
        );
    }
    Ok(())
}

/// Trains a small ViT for 2 steps on the demo images and returns its run folder: enough to
/// show the API, not to learn much.
fn small_model() -> Result<String, Error> {
    let out = std::env::temp_dir().join("dinotrain-embed-knn");
    let mut config = TrainConfig::preset(Preset::Demo)
        .steps(2)
        .batch_size(8)
        .output_dir(&out)
        .knn(false);
    config.dinotrain.embed_dim = Some(64);
    config.dinotrain.depth = Some(2);
    config.dinotrain.num_heads = Some(2);
    let options = TrainOptions::new(config.resolve()?).outdir(OutdirMode::Overwrite);
    let summary = train(options)?;
    println!("trained {} steps into {}", summary.steps, out.display());
    Ok(out.to_string_lossy().into_owned())
}

/// A folder with one subfolder per class (the same class names in both folders).
fn labelled(dir: &str) -> Result<Box<dyn ImageSource>, Error> {
    let scan = ScanOptions {
        labels: Labels::Subfolder,
        ..ScanOptions::default()
    };
    let source = FolderSource::open(std::path::Path::new(dir), &scan, DecodeOptions::default())?;
    Ok(Box::new(source))
}

/// The class of each embedded image (`kept`: the readable ones).
fn labels(source: &dyn ImageSource, kept: &[usize]) -> Result<Vec<usize>, Error> {
    kept.iter()
        .map(|&i| match source.label(i) {
            Some(label) => Ok(label as usize),
            None => Err(format!("{} has no class subfolder", source.name(i)).into()),
        })
        .collect()
}
