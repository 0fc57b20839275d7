//! Typed errors for the library. Every variant carries enough context (file, tensor, op, shapes)
//! for a user to act on it; the CLI prints the message and exits non-zero.

use std::path::PathBuf;

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two tensors (or a tensor and a declared size) disagree.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },

    /// A golden fixture or checkpoint file is missing a tensor, has the wrong dtype, or cannot be parsed.
    #[error("{}: {tensor}: {detail}", file.display())]
    Fixture {
        file: PathBuf,
        tensor: String,
        detail: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Something the caller asked for is not supported (with the reason).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The CUDA backend cannot run (no driver, no device, missing kernels, a CUDA call failed).
    #[error("cuda: {0}")]
    Cuda(String),

    /// Input data is unusable (for example a folder without a readable image).
    #[error("data: {0}")]
    Data(String),

    /// A numeric kernel met input it cannot process faithfully (non-finite values, underflow).
    #[error("{op}: {detail}")]
    Numeric { op: &'static str, detail: String },

    /// A checkpoint file is torn, truncated, foreign, or does not fit the model.
    #[error("checkpoint {}: {detail}", file.display())]
    Checkpoint { file: PathBuf, detail: String },

    /// A checkpoint was written with a different configuration (each entry: `key: was -> now`).
    #[error(
        "checkpoint {} was written with a different configuration: {}; \
         resume with the original settings, or allow the change explicitly",
        file.display(),
        diffs.join("; ")
    )]
    ConfigChanged { file: PathBuf, diffs: Vec<String> },

    /// The disk is full (ENOSPC) while writing a file.
    #[error(
        "disk full while writing {}: free some space, then continue with --resume (from the \
         last complete checkpoint; a run that wrote none yet starts again)",
        path.display()
    )]
    DiskFull { path: PathBuf },

    /// Released weights could not be downloaded (network, server, checksum).
    #[error(
        "could not download {url} to {}: {detail}. Without a network, fetch the file elsewhere \
         and place it there (e.g. curl -L -o {} {url})",
        path.display(),
        path.display()
    )]
    Download {
        url: String,
        path: PathBuf,
        detail: String,
    },

    /// Training produced a non-finite value.
    #[error("non-finite {what} at step {step}")]
    NonFinite { what: String, step: u64 },

    /// A training step diverged: the step (counted from 1), what went non-finite, what to do.
    #[error("training diverged at step {step}: {cause}; {hint}")]
    Diverged {
        step: u64,
        cause: String,
        hint: String,
    },

    /// A weights file holds a non-finite value.
    #[error("{}: tensor '{tensor}' holds a non-finite value ({value}) at index {index}: the weights are corrupt or come from a diverged run", file.display())]
    NonFiniteWeights {
        file: PathBuf,
        tensor: String,
        index: usize,
        value: f32,
    },
}

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    /// An I/O error on `path`; a full disk or an exhausted quota is [`Error::DiskFull`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        // ENOSPC (28) and EDQUOT (122 on Linux) both mean no room to write.
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        if matches!(source.kind(), StorageFull | QuotaExceeded)
            || matches!(source.raw_os_error(), Some(28 | 122))
        {
            return Error::DiskFull { path: path.into() };
        }
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
