//! Folder scan: every image file under a root, recursively, in a stable sorted order.
//!
//! Only directory entries are read (no decode, no per-file `stat` except for symlinks), so
//! millions of files are listed in seconds. Symlinks are followed; a directory reached twice
//! (a symlink loop, or two links to one folder) is walked once, identified by (device, inode).

use crate::data::format::ImageFormat;
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// One image file found by the scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    pub path: PathBuf,
    /// The format named by the extension (the decoder trusts the magic bytes first).
    pub format: ImageFormat,
    /// Index of the top-level subfolder in [`ScanResult::classes`], when labels are asked for.
    pub label: Option<u32>,
}

/// Whether to follow symbolic links.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Symlinks {
    /// Follow links to files and folders; each folder is still walked once.
    #[default]
    Follow,
    /// Ignore symbolic links.
    Skip,
}

/// Whether images get a class label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Labels {
    #[default]
    None,
    /// The name of the top-level subfolder under the root is the class (ImageFolder layout);
    /// images directly in the root get no label.
    Subfolder,
}

/// What the scan does.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    pub symlinks: Symlinks,
    pub labels: Labels,
}

/// A path the scan could not use, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// The scan's findings.
#[derive(Clone, Debug, Default)]
pub struct ScanResult {
    /// Image files, sorted by path.
    pub entries: Vec<ImageEntry>,
    /// Class names (sorted) when [`Labels::Subfolder`] was asked for.
    pub classes: Vec<String>,
    /// Files without an image extension.
    pub other_files: u64,
    /// Folders reached a second time through a symlink (loops), not walked again.
    pub repeated_dirs: u64,
    /// Entries that could not be read (permission denied, dangling symlink, ...).
    pub unreadable: Vec<Skipped>,
}

/// Lists every image file under `root` (sorted by path).
///
/// A missing or unreadable root is an error; unreadable entries below it are reported in
/// [`ScanResult::unreadable`] and the scan goes on.
pub fn scan_folder(root: &Path, opts: &ScanOptions) -> Result<ScanResult> {
    let meta = fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::Data(format!("{} is not a folder", root.display())));
    }
    let mut result = ScanResult::default();
    let mut seen_dirs = HashSet::new();
    let mut found: Vec<(PathBuf, ImageFormat)> = Vec::new();
    // An explicit stack instead of recursion: deep trees cannot overflow the thread stack.
    let mut stack = vec![root.to_path_buf()];
    seen_dirs.insert(dir_id(&meta));
    while let Some(dir) = stack.pop() {
        let read = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) => {
                result.unreadable.push(Skipped {
                    path: dir,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        // Sorted per folder so that which of two links to one folder is kept is stable.
        let mut children: Vec<fs::DirEntry> = Vec::new();
        for entry in read {
            match entry {
                Ok(e) => children.push(e),
                Err(e) => result.unreadable.push(Skipped {
                    path: dir.clone(),
                    reason: e.to_string(),
                }),
            }
        }
        children.sort_unstable_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for entry in children {
            let path = entry.path();
            let mut file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) => {
                    result.unreadable.push(Skipped {
                        path,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let mut target_meta = None;
            if file_type.is_symlink() {
                if opts.symlinks == Symlinks::Skip {
                    continue;
                }
                match fs::metadata(&path) {
                    Ok(m) => {
                        file_type = m.file_type();
                        target_meta = Some(m);
                    }
                    Err(e) => {
                        result.unreadable.push(Skipped {
                            path,
                            reason: format!("broken symlink: {e}"),
                        });
                        continue;
                    }
                }
            }
            if file_type.is_dir() {
                let m = match target_meta {
                    Some(m) => m,
                    None => match fs::metadata(&path) {
                        Ok(m) => m,
                        Err(e) => {
                            result.unreadable.push(Skipped {
                                path,
                                reason: e.to_string(),
                            });
                            continue;
                        }
                    },
                };
                if seen_dirs.insert(dir_id(&m)) {
                    subdirs.push(path);
                } else {
                    result.repeated_dirs += 1;
                }
            } else if file_type.is_file() {
                match ImageFormat::from_path(&path) {
                    Some(format) => found.push((path, format)),
                    None => result.other_files += 1,
                }
            }
        }
        // Depth first, smallest name first.
        stack.extend(subdirs.into_iter().rev());
    }
    found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    result.unreadable.sort_by(|a, b| a.path.cmp(&b.path));

    let class_of = |path: &Path| -> Option<String> {
        let rel = path.strip_prefix(root).ok()?;
        let mut parts = rel.components();
        let first = parts.next()?;
        // Only files inside a subfolder have a class.
        parts.next()?;
        Some(first.as_os_str().to_string_lossy().into_owned())
    };
    if opts.labels == Labels::Subfolder {
        let names: std::collections::BTreeSet<String> =
            found.iter().filter_map(|(p, _)| class_of(p)).collect();
        result.classes = names.into_iter().collect();
    }
    result.entries = found
        .into_iter()
        .map(|(path, format)| {
            let label = match opts.labels {
                Labels::None => None,
                Labels::Subfolder => class_of(&path)
                    .and_then(|c| result.classes.binary_search(&c).ok().map(|i| i as u32)),
            };
            ImageEntry {
                path,
                format,
                label,
            }
        })
        .collect();
    Ok(result)
}

#[cfg(unix)]
fn dir_id(meta: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn dir_id(meta: &fs::Metadata) -> (u64, u64) {
    // Without inode numbers a loop cannot be told from a second link; the modification time
    // and length stand in (a loop is still cut, at worst a twin folder is walked once).
    let t = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    (t, meta.len())
}
