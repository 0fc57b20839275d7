//! Downloads of released weights into the cache folder: resumable, checked, atomic.
//!
//! The bytes go to `<file>.part` beside the destination; an interrupted download resumes from
//! the bytes already there with an HTTP `Range` request (a server that ignores it sends the
//! whole file again, and the part is restarted). When the body is complete, its SHA-256 is
//! compared with the expected one if there is one (a mismatch deletes the part), written to
//! `<file>.sha256`, and the part is renamed onto the destination: a destination file is always
//! whole. Meta publishes no checksums for the DINOv2 files, so for them the first download's
//! hash is recorded and every later `verify_recorded` compares against it.
//!
//! The library prints nothing; [`set_progress`] installs a hook (the command line draws a
//! progress bar with it).

#[cfg(feature = "download")]
use std::fs::OpenOptions;
use std::fs::{self, File};
use std::io::Read;
#[cfg(feature = "download")]
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
#[cfg(feature = "download")]
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
#[cfg(feature = "download")]
use crate::io::write_atomic;

/// What a progress hook is told: the file, the bytes on disk, the total when known.
pub type ProgressHook = Box<dyn Fn(&Path, u64, Option<u64>) + Send + Sync>;

fn hook() -> &'static Mutex<Option<ProgressHook>> {
    static HOOK: OnceLock<Mutex<Option<ProgressHook>>> = OnceLock::new();
    HOOK.get_or_init(|| Mutex::new(None))
}

/// Installs the progress hook every download reports to (`None` removes it).
pub fn set_progress(progress: Option<ProgressHook>) {
    *hook().lock().unwrap_or_else(|e| e.into_inner()) = progress;
}

#[cfg(feature = "download")]
fn report(dest: &Path, done: u64, total: Option<u64>) {
    if let Some(h) = hook().lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        h(dest, done, total);
    }
}

/// The file holding the bytes received so far.
pub fn part_path(dest: &Path) -> PathBuf {
    sidecar(dest, "part")
}

/// The file recording the SHA-256 of a completed download.
pub fn checksum_path(dest: &Path) -> PathBuf {
    sidecar(dest, "sha256")
}

fn sidecar(dest: &Path, ext: &str) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(ext);
    dest.with_file_name(name)
}

#[cfg(feature = "download")]
/// The error for a download that did not complete: what failed, and what to do by hand.
fn failed(url: &str, dest: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Download {
        url: url.to_string(),
        path: dest.to_path_buf(),
        detail: detail.to_string(),
    }
}

#[cfg(feature = "download")]
/// Downloads `url` to `dest` (see the module doc), resuming a previous part; `sha256` (hex) is
/// the expected checksum when one is published. Returns the SHA-256 of the file.
pub fn download(url: &str, dest: &Path, sha256: Option<&str>) -> Result<String> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let part = part_path(dest);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(None)
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let response = request.call().map_err(|e| failed(url, dest, e))?;
    let status = response.status().as_u16();
    let (mut file, start) = match status {
        206 => {
            let file = OpenOptions::new()
                .append(true)
                .open(&part)
                .map_err(|e| Error::io(&part, e))?;
            (file, have)
        }
        200 => (File::create(&part).map_err(|e| Error::io(&part, e))?, 0),
        // The part is already whole (or the server knows the file no longer): start again.
        416 => {
            fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
            return download(url, dest, sha256);
        }
        _ => {
            return Err(failed(
                url,
                dest,
                format!("the server answered HTTP {status}"),
            ))
        }
    };
    let body = response.into_body();
    let total = body.content_length().map(|n| n + start);
    let mut reader = body.into_reader();
    let mut done = start;
    let mut buf = vec![0u8; 1 << 16];
    let mut last_report = 0u64;
    report(dest, done, total);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(failed(
                    url,
                    dest,
                    format!(
                    "the transfer broke off after {done} bytes ({e}); run again to resume from {}",
                    part.display()
                ),
                ))
            }
        };
        file.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
        done += n as u64;
        if done - last_report >= 1 << 20 {
            report(dest, done, total);
            last_report = done;
        }
    }
    file.sync_all().map_err(|e| Error::io(&part, e))?;
    drop(file);
    report(dest, done, total);
    if let Some(total) = total.filter(|&t| t != done) {
        return Err(failed(
            url,
            dest,
            format!("received {done} of {total} bytes; run again to resume"),
        ));
    }
    let got = sha256_file(&part)?;
    if let Some(want) = sha256 {
        if !got.eq_ignore_ascii_case(want) {
            fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
            return Err(failed(
                url,
                dest,
                format!("SHA-256 {got} is not the published {want}; the download was deleted"),
            ));
        }
    }
    write_atomic(&checksum_path(dest), format!("{got}\n").as_bytes())?;
    fs::rename(&part, dest).map_err(|e| Error::io(dest, e))?;
    Ok(got)
}

/// Checks `file` against the SHA-256 its first download recorded (nothing to check when no
/// download recorded one: a file placed by hand).
pub fn verify_recorded(file: &Path) -> Result<()> {
    let record = checksum_path(file);
    let Ok(text) = fs::read_to_string(&record) else {
        return Ok(());
    };
    let want = text.trim();
    let got = sha256_file(file)?;
    if got != want {
        return Err(Error::Checkpoint {
            file: file.to_path_buf(),
            detail: format!(
                "SHA-256 {got} differs from {want} recorded at its download ({}): the file \
                 changed or is damaged; delete both files to download it again",
                record.display()
            ),
        });
    }
    Ok(())
}

/// The SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_sit_beside_the_file() {
        let f = Path::new("/c/dinov2_vits14_pretrain.pth");
        assert_eq!(
            part_path(f),
            PathBuf::from("/c/dinov2_vits14_pretrain.pth.part")
        );
        assert_eq!(
            checksum_path(f),
            PathBuf::from("/c/dinov2_vits14_pretrain.pth.sha256")
        );
    }

    #[test]
    fn sha256_of_a_known_text() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("abc");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
