//! The IDX format of (Fashion-)MNIST, optionally gzipped: a big-endian header
//! (`0x00 0x00 dtype ndim`, then one u32 per dimension) followed by the data.
//! Only unsigned bytes (dtype 0x08) are read: images `[N, rows, cols]` and labels `[N]`.

use flate2::read::GzDecoder;
use std::io::Read;

/// Why an IDX file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("gzip: {0}")]
    Gzip(std::io::Error),
    #[error("bad magic {magic:#010x} (expected 0x0000080{ndim} for {ndim}-d unsigned bytes)")]
    BadMagic { magic: u32, ndim: u8 },
    #[error("file too short: {got} bytes, header says {want}")]
    Short { got: usize, want: usize },
}

/// A decoded IDX array of bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Unpacks gzip data when it starts with the gzip magic; otherwise returns the bytes as they are.
pub fn gunzip_if_needed(bytes: &[u8]) -> Result<Vec<u8>, IdxError> {
    if bytes.starts_with(&[0x1F, 0x8B]) {
        let mut out = Vec::new();
        GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(IdxError::Gzip)?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an IDX file of unsigned bytes with `ndim` dimensions (gzipped or not).
pub fn read_idx(bytes: &[u8], ndim: u8) -> Result<IdxArray, IdxError> {
    let raw = gunzip_if_needed(bytes)?;
    let header = 4 + 4 * ndim as usize;
    if raw.len() < 4 {
        return Err(IdxError::Short {
            got: raw.len(),
            want: header,
        });
    }
    let magic = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    if magic != 0x0800 | ndim as u32 {
        return Err(IdxError::BadMagic { magic, ndim });
    }
    if raw.len() < header {
        return Err(IdxError::Short {
            got: raw.len(),
            want: header,
        });
    }
    let dims: Vec<usize> = raw[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(usize::MAX);
    let want = header.saturating_add(n);
    if raw.len() < want {
        return Err(IdxError::Short {
            got: raw.len(),
            want,
        });
    }
    Ok(IdxArray {
        dims,
        data: raw[header..want].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_plain_and_gzipped_arrays() {
        let raw = idx(0x803, &[2, 1, 3], &[1, 2, 3, 4, 5, 6]);
        let a = read_idx(&raw, 3).unwrap();
        assert_eq!(a.dims, vec![2, 1, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let b = read_idx(&gz.finish().unwrap(), 3).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_magic_short_files_and_bad_gzip_are_typed_errors() {
        let labels = idx(0x801, &[3], &[1, 2, 3]);
        assert!(matches!(
            read_idx(&labels, 3),
            Err(IdxError::BadMagic { magic: 0x801, .. })
        ));
        let short = idx(0x803, &[2, 2, 2], &[1, 2, 3]);
        assert!(matches!(
            read_idx(&short, 3),
            Err(IdxError::Short { got: 19, want: 24 })
        ));
        assert!(matches!(read_idx(&[0, 0], 1), Err(IdxError::Short { .. })));
        let header_cut = &idx(0x803, &[2, 2, 2], &[])[..10];
        assert!(matches!(
            read_idx(header_cut, 3),
            Err(IdxError::Short { got: 10, want: 16 })
        ));
        assert!(matches!(
            read_idx(&[0x1F, 0x8B, 8, 0, 1], 1),
            Err(IdxError::Gzip(_))
        ));
    }
}
