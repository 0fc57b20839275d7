//! Official pretrained backbones: names (`dinov2/vits14`, `dinov2/vitl14_reg4`, ...) to file
//! name, official URL, architecture, and where the file is looked for.
//!
//! dinotrain never downloads at run time: a missing file is an error that names the file, the
//! folder to put it in and the URL it is published at. A path to a `.pth` or `.safetensors`
//! file works too ([`WeightsSource::parse`]).

use crate::error::{Error, Result};
use crate::io::download;
use crate::nn::{Preset, VitConfig};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the official checkpoints are published (spec section 10.1).
pub const OFFICIAL_BASE_URL: &str = "https://dl.fbaipublicfiles.com/dinov2";

/// Environment variable naming dinotrain's cache folder.
pub const HOME_ENV: &str = "DINOTRAIN_HOME";
/// Environment variable naming a mirror of the official download site (same layout).
pub const WEIGHTS_URL_ENV: &str = "DINOTRAIN_WEIGHTS_URL";
/// Environment variable that, when set, forbids downloads.
pub const OFFLINE_ENV: &str = "DINOTRAIN_OFFLINE";

/// One released backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PretrainedModel {
    /// Small, Base, Large or Giant.
    pub size: Preset,
    /// With 4 register tokens (the `_reg4` releases).
    pub registers: Registers,
}

/// Whether a release has register tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registers {
    None,
    Four,
}

impl PretrainedModel {
    /// Every released name.
    pub const NAMES: [&'static str; 8] = [
        "dinov2/vits14",
        "dinov2/vitb14",
        "dinov2/vitl14",
        "dinov2/vitg14",
        "dinov2/vits14_reg4",
        "dinov2/vitb14_reg4",
        "dinov2/vitl14_reg4",
        "dinov2/vitg14_reg4",
    ];

    /// Parses `dinov2/vit{s,b,l,g}14[_reg4]` (the `dinov2/` prefix is optional).
    pub fn from_name(name: &str) -> Option<Self> {
        let bare = name.strip_prefix("dinov2/").unwrap_or(name);
        let bare = bare.strip_prefix("dinov2_").unwrap_or(bare);
        let (size, registers) = match bare.strip_suffix("_reg4") {
            Some(s) => (s, Registers::Four),
            None => (bare, Registers::None),
        };
        let size = match size {
            "vits14" => Preset::Small,
            "vitb14" => Preset::Base,
            "vitl14" => Preset::Large,
            "vitg14" => Preset::Giant,
            _ => return None,
        };
        Some(PretrainedModel { size, registers })
    }

    fn size_letter(self) -> &'static str {
        match self.size {
            Preset::Small => "s",
            Preset::Base => "b",
            Preset::Large => "l",
            // The test sizes have no release; from_name never builds them.
            Preset::Giant | Preset::Micro | Preset::Tiny => "g",
        }
    }

    /// `dinov2/vits14_reg4`.
    pub fn name(self) -> String {
        format!("dinov2/{}", self.stem())
    }

    fn stem(self) -> String {
        let reg = match self.registers {
            Registers::None => "",
            Registers::Four => "_reg4",
        };
        format!("vit{}14{reg}", self.size_letter())
    }

    /// `dinov2_vits14_reg4_pretrain.pth`.
    pub fn file_name(self) -> String {
        format!("dinov2_{}_pretrain.pth", self.stem())
    }

    /// The official download URL.
    pub fn url(self) -> String {
        self.url_at(OFFICIAL_BASE_URL)
    }

    /// The URL under another base (a mirror: `$DINOTRAIN_WEIGHTS_URL`).
    pub fn url_at(self, base: &str) -> String {
        format!(
            "{}/dinov2_vit{}14/{}",
            base.trim_end_matches('/'),
            self.size_letter(),
            self.file_name()
        )
    }

    /// The architecture the weights belong to, as the hub builds it (`hub/backbones.py`).
    pub fn architecture(self) -> VitConfig {
        self.size.released(self.registers == Registers::Four)
    }

    /// The file in the cache folder, downloaded on first use.
    pub fn locate(self) -> Result<PathBuf> {
        self.locate_in(&cache_dir()?)
    }

    /// The file in `dir`: checked against the SHA-256 recorded when it was downloaded, or
    /// downloaded now from `$DINOTRAIN_WEIGHTS_URL` if set, else the official site, unless
    /// `$DINOTRAIN_OFFLINE` is set.
    pub fn locate_in(self, dir: &Path) -> Result<PathBuf> {
        let offline = std::env::var_os(OFFLINE_ENV).is_some_and(|v| !v.is_empty());
        let base = std::env::var(WEIGHTS_URL_ENV).unwrap_or_else(|_| OFFICIAL_BASE_URL.into());
        self.locate_from(dir, (!offline).then_some(base.as_str()))
    }

    /// [`PretrainedModel::locate_in`] with the download base given (`None`: no download).
    pub fn locate_from(self, dir: &Path, base: Option<&str>) -> Result<PathBuf> {
        let path = dir.join(self.file_name());
        if path.is_file() {
            download::verify_recorded(&path)?;
            return Ok(path);
        }
        let url = self.url_at(base.unwrap_or(OFFICIAL_BASE_URL));
        if base.is_none() || !cfg!(feature = "download") {
            let why = if base.is_none() {
                format!("{OFFLINE_ENV} is set")
            } else {
                "this build has no download feature".into()
            };
            return Err(Error::Config(format!(
                "pretrained model {} needs the file {} in {} (set {HOME_ENV} to use another \
                 folder) and {why}: fetch it from {url} once (e.g. curl -L -o {} {url})",
                self.name(),
                self.file_name(),
                dir.display(),
                path.display()
            )));
        }
        #[cfg(feature = "download")]
        {
            log::info!(
                "downloading {} ({url}) into {}",
                self.name(),
                path.display()
            );
            download::download(&url, &path, None)?;
        }
        Ok(path)
    }
}

impl fmt::Display for PretrainedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// dinotrain's cache folder: `$DINOTRAIN_HOME`, else `$HOME/.cache/dinotrain`.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(
        std::env::var_os(HOME_ENV).map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn cache_dir_from(dinotrain_home: Option<PathBuf>, home: Option<PathBuf>) -> Result<PathBuf> {
    match (dinotrain_home, home) {
        (Some(d), _) if !d.as_os_str().is_empty() => Ok(d),
        (_, Some(h)) if !h.as_os_str().is_empty() => Ok(h.join(".cache").join("dinotrain")),
        _ => Err(Error::Config(format!(
            "no cache folder: set {HOME_ENV} (or HOME) to a folder for pretrained weights"
        ))),
    }
}

/// The file format of a weights file, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsFormat {
    /// PyTorch zip checkpoint (`.pth`, `.pt`): official releases and teacher checkpoints.
    Pth,
    /// safetensors: dinotrain exports (official keys) or Hugging Face `Dinov2Model`.
    Safetensors,
}

/// Where starting weights come from (`--model NAME|PATH`).
#[derive(Clone, Debug, PartialEq)]
pub enum WeightsSource {
    Pretrained(PretrainedModel),
    File {
        path: PathBuf,
        format: WeightsFormat,
    },
}

impl WeightsSource {
    /// A released name, or a path ending in `.pth`, `.pt` or `.safetensors`.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(m) = PretrainedModel::from_name(spec) {
            return Ok(WeightsSource::Pretrained(m));
        }
        let path = Path::new(spec);
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let format = match ext.as_deref() {
            Some("pth" | "pt") => WeightsFormat::Pth,
            Some("safetensors") => WeightsFormat::Safetensors,
            _ => {
                return Err(Error::Config(format!(
                    "model '{spec}' is neither a released name ({}) nor a .pth/.safetensors file",
                    PretrainedModel::NAMES.join(", ")
                )))
            }
        };
        Ok(WeightsSource::File {
            path: path.to_path_buf(),
            format,
        })
    }

    /// The file to read: the cache file for a name (must exist), the path itself otherwise
    /// (must exist).
    pub fn locate(&self) -> Result<(PathBuf, WeightsFormat)> {
        match self {
            WeightsSource::Pretrained(m) => Ok((m.locate()?, WeightsFormat::Pth)),
            WeightsSource::File { path, format } => {
                if path.is_file() {
                    Ok((path.clone(), *format))
                } else {
                    Err(Error::Config(format!(
                        "weights file {} does not exist",
                        path.display()
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_official_files_urls_and_architectures() {
        let s = PretrainedModel::from_name("dinov2/vits14").unwrap();
        assert_eq!(s.file_name(), "dinov2_vits14_pretrain.pth");
        assert_eq!(
            s.url(),
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
        );
        let a = s.architecture();
        assert_eq!((a.embed_dim, a.depth, a.num_heads), (384, 12, 6));
        assert_eq!(a.ffn, crate::nn::Ffn::Mlp { hidden: 1536 });
        assert_eq!(
            (a.patch_size, a.img_size, a.num_register_tokens),
            (14, 518, 0)
        );
        assert_eq!(
            (a.interpolate_offset, a.interpolate_antialias),
            (0.1, false)
        );

        let g = PretrainedModel::from_name("dinov2/vitg14_reg4").unwrap();
        assert_eq!(
            g.url(),
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
        );
        let a = g.architecture();
        assert_eq!(
            (a.embed_dim, a.depth, a.ffn),
            (1536, 40, crate::nn::Ffn::SwiGlu { hidden: 6144 })
        );
        assert_eq!((a.num_register_tokens, a.interpolate_offset), (4, 0.0));
        assert!(a.interpolate_antialias);

        for name in PretrainedModel::NAMES {
            assert_eq!(PretrainedModel::from_name(name).unwrap().name(), name);
        }
        assert!(PretrainedModel::from_name("dinov2/vitt14").is_none());
    }

    #[test]
    fn cache_dir_prefers_dinotrain_home() {
        let d = cache_dir_from(Some("/x".into()), Some("/home/u".into())).unwrap();
        assert_eq!(d, PathBuf::from("/x"));
        let d = cache_dir_from(None, Some("/home/u".into())).unwrap();
        assert_eq!(d, PathBuf::from("/home/u/.cache/dinotrain"));
        assert!(cache_dir_from(None, None).is_err());
    }

    #[test]
    fn sources_parse_names_and_paths_and_missing_files_say_where() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            WeightsSource::parse("dinov2/vitb14_reg4").unwrap(),
            WeightsSource::Pretrained(_)
        ));
        let p = dir.path().join("w.safetensors");
        let src = WeightsSource::parse(p.to_str().unwrap()).unwrap();
        let err = src.locate().unwrap_err().to_string();
        assert!(err.contains("w.safetensors"), "{err}");
        std::fs::write(&p, b"x").unwrap();
        assert_eq!(src.locate().unwrap().1, WeightsFormat::Safetensors);
        assert!(WeightsSource::parse("model.bin").is_err());

        // The message names the file, the folder and the URL.
        let m = PretrainedModel::from_name("vitl14").unwrap();
        let err = m.locate_from(dir.path(), None).unwrap_err().to_string();
        for needle in [
            "dinov2_vitl14_pretrain.pth",
            dir.path().to_str().unwrap(),
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
            "DINOTRAIN_HOME",
            "DINOTRAIN_OFFLINE",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        std::fs::write(dir.path().join(m.file_name()), b"x").unwrap();
        assert!(m.locate_from(dir.path(), None).is_ok());
    }
}
