//! `dinotrain embed`: CLS (and optionally mean patch-token) embeddings of every readable image
//! of a folder, in the scan's sorted order, written atomically as safetensors, `.npy` or CSV.

use anyhow::Context;
use clap::{Args, ValueEnum};
use dinotrain::backend::cuda::{resolve_device, ResolvedDevice};
use dinotrain::backend::Device;
use dinotrain::data::scan::ScanOptions;
use dinotrain::data::source::{DecodeOptions, FolderSource};
use dinotrain::data::{Exif, ImageSource};
use dinotrain::eval::backbone::{load_backbone, Embeddings, PatchMean};
use dinotrain::io::safetensors::write_atomic;
use dinotrain::io::TensorFile;
use dinotrain::tensor::Tensor;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// How many unreadable files are named one by one before the count alone is printed.
pub const WARN_CAP: usize = 20;

/// `path` made absolute with symbolic links resolved, as far as it exists (the rest appended).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            resolved(parent).join(name)
        }
        _ => path.to_path_buf(),
    }
}

/// Refuses an output path that is an input: inside the image folder `data` (it would replace
/// an image, or join the images), or the weights file `model` (a run folder's export).
pub fn refuse_input_as_output(
    out: &Path,
    data: Option<&Path>,
    model: Option<&Path>,
) -> anyhow::Result<()> {
    let o = resolved(out);
    if let Some(data) = data.filter(|d| o.starts_with(resolved(d))) {
        anyhow::bail!(
            "--out {} is inside the input folder --data {}: choose a path outside it",
            out.display(),
            data.display()
        );
    }
    if let Some(m) = model.filter(|m| m.exists()) {
        let m_file = if m.is_dir() {
            resolved(m).join(dinotrain::eval::backbone::RUN_BACKBONE_FILE)
        } else {
            resolved(m)
        };
        if m_file == o {
            anyhow::bail!(
                "--out {} is the input --model {}: choose another path",
                out.display(),
                m.display()
            );
        }
    }
    Ok(())
}

/// `--exif`: what a JPEG's EXIF orientation tag does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExifArg {
    /// Rotate / mirror as the tag says (as photo viewers show the image).
    Apply,
    /// Keep the stored pixels, as the official code's `Image.open(...).convert("RGB")` does.
    Ignore,
}

impl ExifArg {
    pub fn decode_options(self) -> DecodeOptions {
        DecodeOptions {
            exif: match self {
                ExifArg::Apply => Exif::Apply,
                ExifArg::Ignore => Exif::Ignore,
            },
            ..DecodeOptions::default()
        }
    }
}

/// Output file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `cls [N, D]` (and `patch_mean [N, D]`), file names in the metadata as a JSON list.
    Safetensors,
    /// One float32 array: `[N, D]`, or `[N, 2D]` (CLS then patch mean) with --patch-mean;
    /// the file names go to `<FILE>.files.txt`, one per line.
    Npy,
    /// A header row, then `file,cls_0..cls_{D-1}[,patch_mean_0..]` per image.
    Csv,
}

/// `dinotrain embed` flags.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// The backbone: a training run folder, a .safetensors or .pth file, or a released name
    /// (dinov2/vits14, ...).
    #[arg(long)]
    pub model: String,
    /// The image folder (searched recursively; images are embedded in sorted path order).
    #[arg(long)]
    pub data: PathBuf,
    /// The output file.
    #[arg(long)]
    pub out: PathBuf,
    /// Evaluation size in pixels (resize the shorter side to size·256/224, centre crop); a
    /// multiple of the model's patch size.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// Also write the mean of the final-norm patch tokens of each image.
    #[arg(long)]
    pub patch_mean: bool,
    /// Output format; by default from the extension of --out (.npy, .csv, else safetensors).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Images per forward pass (on a CUDA device, split into forwards of at most 128).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Where the backbone runs: auto (CUDA device 0 when usable, else the CPU), cpu, cuda or
    /// cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A JPEG's EXIF orientation: ignore (the official evaluation's pixels) or apply.
    #[arg(long, value_enum, default_value = "ignore")]
    pub exif: ExifArg,
}

/// Resolves a `--device` flag once (auto falls back to the CPU with one line saying why).
pub fn resolve_eval_device(flag: &str) -> anyhow::Result<ResolvedDevice> {
    let device = flag
        .parse::<Device>()
        .with_context(|| format!("--device {flag}"))?;
    Ok(resolve_device(device)?)
}

/// Runs `embed`.
pub fn run(args: &EmbedArgs) -> anyhow::Result<()> {
    refuse_input_as_output(&args.out, Some(&args.data), Some(Path::new(&args.model)))?;
    let format = args.format.unwrap_or_else(|| format_of(&args.out));
    let backbone = load_backbone(&args.model)?;
    let source = FolderSource::open(
        &args.data,
        &ScanOptions::default(),
        args.exif.decode_options(),
    )?;
    let mode = if args.patch_mean {
        PatchMean::Compute
    } else {
        PatchMean::Skip
    };
    let mut device = resolve_eval_device(&args.device)?;
    let mut extractor = backbone.extractor(&mut device)?;
    eprintln!("embedding on {}", extractor.device_name());
    let start = std::time::Instant::now();
    let emb = backbone.embed(&mut extractor, &source, args.size, args.batch, mode)?;
    warn_skipped(&source, &emb);
    let names: Vec<String> = emb
        .kept
        .iter()
        .map(|&i| relative_name(&source, i))
        .collect();
    match format {
        Format::Safetensors => write_safetensors(&args.out, &emb, &names)?,
        Format::Npy => write_npy_with_names(&args.out, &emb, &names)?,
        Format::Csv => write_atomic(&args.out, csv(&emb, &names).as_bytes())?,
    }
    println!(
        "embedded {} images (dim {}) in {:.1} s -> {}",
        emb.kept.len(),
        emb.dim,
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// The format an output path's extension names.
fn format_of(out: &Path) -> Format {
    match out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .as_deref()
    {
        Some("npy") => Format::Npy,
        Some("csv") => Format::Csv,
        _ => Format::Safetensors,
    }
}

/// Prints one warning line per skipped image (at most [`WARN_CAP`]) and the count.
pub fn warn_skipped(source: &dyn ImageSource, emb: &Embeddings) {
    for (i, reason) in emb.skipped.iter().take(WARN_CAP) {
        eprintln!("warning: skipped {}: {reason}", source.name(*i));
    }
    if emb.skipped.len() > WARN_CAP {
        eprintln!(
            "warning: ... and {} more unreadable images",
            emb.skipped.len() - WARN_CAP
        );
    }
    if !emb.skipped.is_empty() {
        eprintln!(
            "warning: {} of {} images unreadable and skipped",
            emb.skipped.len(),
            source.len()
        );
    }
}

/// The path of image `i` relative to the folder.
fn relative_name(source: &FolderSource, i: usize) -> String {
    let p = &source.entries[i].path;
    p.strip_prefix(&source.root)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

fn write_safetensors(out: &Path, emb: &Embeddings, names: &[String]) -> anyhow::Result<()> {
    let n = emb.kept.len();
    let mut file = TensorFile::default();
    file.insert("cls", Tensor::from_vec(&[n, emb.dim], emb.cls.clone())?);
    if let Some(pm) = &emb.patch_mean {
        file.insert("patch_mean", Tensor::from_vec(&[n, emb.dim], pm.clone())?);
    }
    file.metadata
        .insert("files".into(), serde_json::to_string(names)?);
    file.write(out)?;
    Ok(())
}

fn write_npy_with_names(out: &Path, emb: &Embeddings, names: &[String]) -> anyhow::Result<()> {
    let (n, d) = (emb.kept.len(), emb.dim);
    let (cols, values) = match &emb.patch_mean {
        None => (d, emb.cls.clone()),
        Some(pm) => {
            let mut v = Vec::with_capacity(n * 2 * d);
            for (c, p) in emb.cls.chunks(d).zip(pm.chunks(d)) {
                v.extend_from_slice(c);
                v.extend_from_slice(p);
            }
            (2 * d, v)
        }
    };
    write_atomic(out, &npy_f32(&[n, cols], &values))?;
    let mut list = out.as_os_str().to_owned();
    list.push(".files.txt");
    let mut text = names.join("\n");
    text.push('\n');
    write_atomic(Path::new(&list), text.as_bytes())
        .with_context(|| "writing the file-name list")?;
    Ok(())
}

/// A little-endian float32 NPY (format 1.0) of `shape`: magic, header length, a Python dict
/// literal padded with spaces to a multiple of 64 bytes, then the C-order data.
pub fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = 10 + header.len() + 1; // magic 6 + version 2 + length 2, dict, newline
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    // The header is a few hundred bytes at most: it fits the u16 length field.
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// CSV text: header, then one row per image; names are quoted when they need it (RFC 4180).
fn csv(emb: &Embeddings, names: &[String]) -> String {
    let d = emb.dim;
    let mut s = String::from("file");
    for j in 0..d {
        let _ = write!(s, ",cls_{j}");
    }
    if emb.patch_mean.is_some() {
        for j in 0..d {
            let _ = write!(s, ",patch_mean_{j}");
        }
    }
    s.push('\n');
    for (r, name) in names.iter().enumerate() {
        s.push_str(&csv_field(name));
        for v in &emb.cls[r * d..(r + 1) * d] {
            let _ = write!(s, ",{v}");
        }
        if let Some(pm) = &emb.patch_mean {
            for v in &pm[r * d..(r + 1) * d] {
                let _ = write!(s, ",{v}");
            }
        }
        s.push('\n');
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_padded_to_64_and_describes_the_array() {
        let bytes = npy_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + hlen + 24);
        assert_eq!(&bytes[10 + hlen + 4..10 + hlen + 8], &2f32.to_le_bytes());
    }

    #[test]
    fn csv_quotes_names_that_need_it() {
        assert_eq!(csv_field("a/b.jpg"), "a/b.jpg");
        assert_eq!(csv_field("a,\"b\".jpg"), "\"a,\"\"b\"\".jpg\"");
    }

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(format_of(Path::new("x.NPY")), Format::Npy);
        assert_eq!(format_of(Path::new("x.csv")), Format::Csv);
        assert_eq!(format_of(Path::new("x.st")), Format::Safetensors);
    }
}
