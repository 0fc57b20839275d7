//! `dinotrain knn`: k-NN classification accuracy of a backbone's CLS features (the official
//! weighted k-NN), on labelled train and val folders or on the embedded demo split.

use clap::Args;
use dinotrain::data::scan::{Labels, ScanOptions};
use dinotrain::data::source::FolderSource;
use dinotrain::data::{demo_split, ImageSource, Split};
use dinotrain::eval::backbone::{load_backbone, Embeddings, LoadedBackbone, PatchMean};
use dinotrain::eval::probe::{linear_probe, ProbeOptions};
use dinotrain::eval::{knn_classify, topk_accuracy, FeatureExtractor};
use std::path::PathBuf;

/// Images per forward pass.
const BATCH: usize = 64;

/// The evaluation size used when --size is not given: the model's construction size, at most
/// the official 224.
const MAX_DEFAULT_SIZE: usize = 224;

/// `dinotrain knn` flags.
#[derive(Args, Debug)]
pub struct KnnArgs {
    /// The backbone: a training run folder, a .safetensors or .pth file, or a released name
    /// (dinov2/vits14, ...).
    #[arg(long)]
    pub model: String,
    /// Labelled training images: one subfolder per class.
    #[arg(long, requires = "val", conflicts_with = "demo")]
    pub train: Option<PathBuf>,
    /// Labelled validation images: one subfolder per class, named as in --train.
    #[arg(long, requires = "train", conflicts_with = "demo")]
    pub val: Option<PathBuf>,
    /// Use the embedded demo data (Fashion-MNIST: 10,000 train, 2,000 test images).
    #[arg(long, required_unless_present = "train")]
    pub demo: bool,
    /// Neighbour counts, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10,20")]
    pub k: Vec<usize>,
    /// Evaluation size in pixels (a multiple of the patch size); default: the model's
    /// construction size, at most 224.
    #[arg(long)]
    pub size: Option<usize>,
    /// Softmax temperature of the neighbour weights (official: 0.07).
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f32,
    /// Where the backbone runs: auto (CUDA device 0 when usable, else the CPU), cpu, cuda or
    /// cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A JPEG's EXIF orientation: ignore (the official evaluation's pixels) or apply.
    #[arg(long, value_enum, default_value = "ignore")]
    pub exif: super::embed::ExifArg,
    /// Also train a linear probe (logistic regression) on the same frozen features and print
    /// its top-1.
    #[arg(long)]
    pub probe: bool,
}

/// Features and labels of one split.
struct Labelled {
    features: Vec<f32>,
    labels: Vec<usize>,
}

/// Runs `knn`.
pub fn run(args: &KnnArgs) -> anyhow::Result<()> {
    // The cheap checks first, before minutes of features.
    if args.k.is_empty() || args.k.contains(&0) {
        anyhow::bail!("--k {:?}: every k must be positive", args.k);
    }
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        anyhow::bail!("--temperature {}: must be positive", args.temperature);
    }
    let backbone = load_backbone(&args.model)?;
    let size = args
        .size
        .unwrap_or_else(|| backbone.cfg.img_size.min(MAX_DEFAULT_SIZE));
    let mut device = super::embed::resolve_eval_device(&args.device)?;
    let mut extractor = backbone.extractor(&mut device)?;
    eprintln!("embedding on {}", extractor.device_name());
    let fx = &mut extractor;
    let start = std::time::Instant::now();
    let (train, val, num_classes) = match (&args.train, &args.val) {
        (Some(train), Some(val)) => folders(&backbone, fx, train, val, size, args.exif)?,
        _ => {
            let train = demo_split(Split::Train)?;
            let test = demo_split(Split::Test)?;
            let classes = train.class_names.len();
            (
                features(&backbone, fx, &train, size, None)?,
                features(&backbone, fx, &test, size, None)?,
                classes,
            )
        }
    };
    println!(
        "{} train and {} val images, {num_classes} classes, size {size}: features in {:.1} s",
        train.labels.len(),
        val.labels.len(),
        start.elapsed().as_secs_f64()
    );
    let result = knn_classify(
        &train.features,
        &train.labels,
        &val.features,
        backbone.cfg.embed_dim,
        &args.k,
        args.temperature,
    )?;
    for pk in &result.per_k {
        let top1 = topk_accuracy(&pk.probas, result.num_classes, &val.labels, 1)?;
        let mut line = format!("k={:<4} top-1 {:6.2} %", pk.k, 100.0 * top1);
        if result.num_classes >= 5 {
            let top5 = topk_accuracy(&pk.probas, result.num_classes, &val.labels, 5)?;
            line.push_str(&format!("  top-5 {:6.2} %", 100.0 * top5));
        }
        println!("{line}");
    }
    if args.probe {
        let r = linear_probe(
            &train.features,
            &train.labels,
            &val.features,
            &val.labels,
            backbone.cfg.embed_dim,
            ProbeOptions::default(),
        )?;
        println!(
            "linear probe top-1 {:6.2} %  (training images {:.2} %)",
            r.test_top1, r.train_top1
        );
    }
    Ok(())
}

/// Both labelled folders, with the val classes mapped onto the train classes by name.
fn folders(
    backbone: &LoadedBackbone,
    fx: &mut FeatureExtractor<'_>,
    train: &std::path::Path,
    val: &std::path::Path,
    size: usize,
    exif: super::embed::ExifArg,
) -> anyhow::Result<(Labelled, Labelled, usize)> {
    let scan = ScanOptions {
        labels: Labels::Subfolder,
        ..ScanOptions::default()
    };
    let train_src = FolderSource::open(train, &scan, exif.decode_options())?;
    let val_src = FolderSource::open(val, &scan, exif.decode_options())?;
    let mut to_train = Vec::with_capacity(val_src.classes.len());
    for name in &val_src.classes {
        match train_src.classes.iter().position(|c| c == name) {
            Some(i) => to_train.push(i),
            None => anyhow::bail!(
                "{}: class '{name}' has no training images in {}",
                val.display(),
                train.display()
            ),
        }
    }
    let classes = train_src.classes.len();
    Ok((
        features(backbone, fx, &train_src, size, None)?,
        features(backbone, fx, &val_src, size, Some(&to_train))?,
        classes,
    ))
}

/// CLS features and labels of the readable images of `source` (labels remapped through
/// `remap` when given); an unlabelled image is an error.
fn features(
    backbone: &LoadedBackbone,
    fx: &mut FeatureExtractor<'_>,
    source: &dyn ImageSource,
    size: usize,
    remap: Option<&[usize]>,
) -> anyhow::Result<Labelled> {
    let emb: Embeddings = backbone.embed(fx, source, size, BATCH, PatchMean::Skip)?;
    super::embed::warn_skipped(source, &emb);
    let labels = emb
        .kept
        .iter()
        .map(|&i| {
            let l = source.label(i).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} has no class (put every image in a class subfolder)",
                    source.name(i)
                )
            })? as usize;
            Ok(remap.map_or(l, |m| m[l]))
        })
        .collect::<anyhow::Result<Vec<usize>>>()?;
    Ok(Labelled {
        features: emb.cls,
        labels,
    })
}
