//! The decoded-image cache: every image of a folder decoded once, downscaled so that its shorter
//! side is at most `short_side` (chosen so that the smallest global crop keeps full resolution),
//! and stored in one file that later runs memory-map.
//!
//! The file name carries a hash of the folder's state (every path, size and modification time)
//! and of the settings, so a changed folder gets a new cache. A cache is written to a temporary
//! file and renamed into place: two runs building the same cache at once both succeed, and a run
//! reading a cache never sees a partial file.
//!
//! Layout (little endian): magic `DTCACHE1`, u64 count, then `count` records of
//! `{u64 offset, u32 width, u32 height, u32 status, u32 len}` and the data. Status 0: `len`
//! bytes of RGB pixels at `offset`; otherwise a decode error kind with its message at `offset`.

use crate::data::decode::{decode_file, DecodeError, RgbImage};
use crate::data::format::ImageFormat;
use crate::data::resize::{resize_bicubic, Rect};
use crate::data::scan::ImageEntry;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DTCACHE1";
const RECORD: usize = 24;
const HEADER: usize = 16;
/// Images decoded at once while building (bounds the memory of a build).
const BUILD_CHUNK: usize = 256;

/// A memory-mapped decoded-image cache.
pub struct DecodedCache {
    pub path: PathBuf,
    map: memmap2::Mmap,
    count: usize,
}

/// FNV-1a: a fixed hash (std's hasher may change between Rust releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
}

/// The hash naming the cache of these files with these settings.
pub fn cache_key(entries: &[ImageEntry], short_side: u32, max_pixels: u64) -> u64 {
    let mut h = Fnv::new();
    h.write(MAGIC);
    h.write(&short_side.to_le_bytes());
    h.write(&max_pixels.to_le_bytes());
    for e in entries {
        h.write(e.path.as_os_str().as_encoded_bytes());
        h.write(&[0]);
        let (len, mtime) = fs::metadata(&e.path).map_or((u64::MAX, 0), |m| {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            (m.len(), t)
        });
        h.write(&len.to_le_bytes());
        h.write(&mtime.to_le_bytes());
    }
    h.0
}

/// Scales `img` so that its shorter side is `short_side` (bicubic with antialiasing); smaller
/// images are returned unchanged.
pub fn downscale_to_short_side(img: RgbImage, short_side: u32) -> RgbImage {
    let short = img.width.min(img.height);
    if short <= short_side {
        return img;
    }
    let f = short_side as f64 / short as f64;
    let w = ((img.width as f64 * f).round() as u32).max(1);
    let h = ((img.height as f64 * f).round() as u32).max(1);
    let mut data = vec![0u8; w as usize * h as usize * 3];
    let all = Rect {
        x: 0,
        y: 0,
        width: img.width,
        height: img.height,
    };
    resize_bicubic(&mut data, &mut Vec::new(), &img.data, img.width, all, w, h);
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn status_of(e: &DecodeError) -> u32 {
    match e {
        DecodeError::Io(_) => 1,
        DecodeError::Empty => 2,
        DecodeError::NotAnImage { .. } => 3,
        DecodeError::Unsupported { .. } => 4,
        DecodeError::TooLarge { .. } => 5,
        DecodeError::Corrupt { .. } => 6,
    }
}

impl DecodedCache {
    /// Opens the cache of `entries` in `dir`, building it first when it does not exist.
    pub fn open_or_build(
        dir: &Path,
        entries: &[ImageEntry],
        short_side: u32,
        max_pixels: u64,
    ) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let key = cache_key(entries, short_side, max_pixels);
        let path = dir.join(format!("decoded-{key:016x}.bin"));
        if !path.exists() {
            build(&path, entries, short_side, max_pixels)?;
        }
        let cache = Self::open(&path)?;
        if cache.count != entries.len() {
            return Err(Error::Data(format!(
                "{}: holds {} images, the folder {}",
                path.display(),
                cache.count,
                entries.len()
            )));
        }
        Ok(cache)
    }

    /// Maps an existing cache file and checks its table.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // Safety: the file is never modified after the rename that publishes it (writers
        // always write a new file), so the mapping cannot change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad =
            |d: &str| Error::Data(format!("{}: not a valid image cache: {d}", path.display()));
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let count = u64::from_le_bytes(map[8..16].try_into().map_err(|_| bad("header"))?) as usize;
        let table_end = count
            .checked_mul(RECORD)
            .and_then(|t| t.checked_add(HEADER))
            .ok_or_else(|| bad("count"))?;
        if map.len() < table_end {
            return Err(bad("short table"));
        }
        let cache = DecodedCache {
            path: path.to_path_buf(),
            map,
            count,
        };
        for i in 0..count {
            let r = cache.record(i);
            if r.offset
                .checked_add(r.len as u64)
                .is_none_or(|end| end > cache.map.len() as u64)
            {
                return Err(bad(&format!("record {i} points outside the file")));
            }
        }
        Ok(cache)
    }

    fn record(&self, i: usize) -> Record {
        let r = &self.map[HEADER + i * RECORD..HEADER + (i + 1) * RECORD];
        let u32_at = |o: usize| u32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&r[..8]);
        Record {
            offset: u64::from_le_bytes(off),
            width: u32_at(8),
            height: u32_at(12),
            status: u32_at(16),
            len: u32_at(20),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when the cache holds no image.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Image `i`, or the decode error recorded when the cache was built.
    pub fn load(&self, i: usize) -> Result<RgbImage, DecodeError> {
        if i >= self.count {
            return Err(DecodeError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("cached image {i} of {}", self.count),
            )));
        }
        let r = self.record(i);
        let bytes = &self.map[r.offset as usize..r.offset as usize + r.len as usize];
        if r.status == 0 {
            if bytes.len() != r.width as usize * r.height as usize * 3 {
                return Err(DecodeError::Corrupt {
                    format: ImageFormat::Jpeg,
                    detail: format!("cache record {i} has a wrong pixel count"),
                });
            }
            return Ok(RgbImage {
                width: r.width,
                height: r.height,
                data: bytes.to_vec(),
            });
        }
        Err(DecodeError::Io(std::io::Error::other(format!(
            "(cached) {}",
            String::from_utf8_lossy(bytes)
        ))))
    }
}

struct Record {
    offset: u64,
    width: u32,
    height: u32,
    status: u32,
    len: u32,
}

fn build(path: &Path, entries: &[ImageEntry], short_side: u32, max_pixels: u64) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:x}",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let io = |e| Error::io(&tmp, e);
    let file = File::create(&tmp).map_err(io)?;
    let mut out = BufWriter::new(file);
    // Header and a zeroed table, filled in once all offsets are known.
    let table_len = entries.len() * RECORD;
    out.write_all(MAGIC).map_err(io)?;
    out.write_all(&(entries.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&vec![0u8; table_len]).map_err(io)?;
    let mut table = Vec::with_capacity(table_len);
    let mut offset = (HEADER + table_len) as u64;
    for chunk in entries.chunks(BUILD_CHUNK) {
        let decoded: Vec<Result<RgbImage, DecodeError>> = chunk
            .par_iter()
            .map(|e| {
                decode_file(&e.path, e.format, max_pixels, Some(short_side))
                    .map(|img| downscale_to_short_side(img, short_side))
            })
            .collect();
        for d in decoded {
            let (w, h, status, bytes) = match &d {
                Ok(img) => (img.width, img.height, 0, img.data.as_slice()),
                Err(e) => (0, 0, status_of(e), &[][..]),
            };
            let message;
            let bytes = if status == 0 {
                bytes
            } else {
                message = d.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                message.as_bytes()
            };
            let len = u32::try_from(bytes.len()).map_err(|_| {
                Error::Data(format!("image of {} bytes too large to cache", bytes.len()))
            })?;
            table.extend_from_slice(&offset.to_le_bytes());
            table.extend_from_slice(&w.to_le_bytes());
            table.extend_from_slice(&h.to_le_bytes());
            table.extend_from_slice(&status.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            out.write_all(bytes).map_err(io)?;
            offset += bytes.len() as u64;
        }
    }
    let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(HEADER as u64)).map_err(io)?;
    file.write_all(&table).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}
