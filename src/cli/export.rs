//! `dinotrain export`: a backbone (run folder, weights file or released name) to safetensors
//! with official or Hugging Face keys and the architecture in the metadata.

use clap::{Args, ValueEnum};
use dinotrain::eval::backbone::{arch_metadata, load_backbone};
use dinotrain::io::export::{export_backbone, export_hf_folder, KeyNaming, HF_WEIGHTS};
use std::path::{Path, PathBuf};

/// Key naming of the exported file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Keys {
    /// Official state-dict keys (`blocks.0.attn.qkv.weight`), loadable with strict=True.
    Official,
    /// Hugging Face `Dinov2Model` keys (`encoder.layer.0.attention.attention.query.weight`).
    Hf,
    /// A folder Hugging Face `from_pretrained` loads: config.json and model.safetensors
    /// (`Dinov2Model`, or `Dinov2WithRegistersModel` with registers); --out names the folder.
    HfFolder,
}

/// `dinotrain export` flags.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The backbone: a training run folder, a .safetensors or .pth file, or a released name
    /// (dinov2/vits14, ...).
    #[arg(long)]
    pub model: String,
    /// The safetensors file to write (atomically); with --keys hf-folder, the folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Key naming of the written tensors.
    #[arg(long, value_enum, default_value = "official")]
    pub keys: Keys,
}

/// Runs `export`.
pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    super::embed::refuse_input_as_output(&args.out, None, Some(Path::new(&args.model)))?;
    let b = load_backbone(&args.model)?;
    let mut meta = arch_metadata(&b.cfg);
    meta.insert("source".into(), b.path.display().to_string());
    let naming = match args.keys {
        Keys::Official => KeyNaming::Official,
        Keys::Hf => KeyNaming::HuggingFace,
        Keys::HfFolder => {
            let weights = args.out.join(HF_WEIGHTS);
            super::embed::refuse_input_as_output(&weights, None, Some(Path::new(&args.model)))?;
            export_hf_folder(&args.out, &b.table, &b.params, &b.cfg, &meta)?;
            println!(
                "exported {} (D {}, depth {}, {} parameters) as a Hugging Face folder -> {} \
                 (AutoModel.from_pretrained loads it)",
                b.path.display(),
                b.cfg.embed_dim,
                b.cfg.depth,
                b.params.len(),
                args.out.display()
            );
            return Ok(());
        }
    };
    export_backbone(&args.out, &b.table, &b.params, naming, &meta)?;
    println!(
        "exported {} (D {}, depth {}, {} parameters) with {naming:?} keys -> {}",
        b.path.display(),
        b.cfg.embed_dim,
        b.cfg.depth,
        b.params.len(),
        args.out.display()
    );
    Ok(())
}
