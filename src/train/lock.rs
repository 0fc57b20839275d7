//! The advisory lock of a run folder: one process at a time trains, resumes or overwrites in
//! it. The lock is an OS file lock (`flock`) on `.dinotrain.lock` inside the folder, held for
//! the life of the run and released by the OS when the process ends, however it ends. The file
//! names the holder (pid, host, start time) for the message a second process prints.
//!
//! Where the filesystem has no file locks, the file's content decides instead: a lock naming a
//! live process (or another host, which cannot be checked) refuses; one naming a dead process
//! on this host is stale and replaced.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".dinotrain.lock";
/// The first line of a lock file (identifies it as dinotrain's).
const LOCK_HEADER: &str = "dinotrain run lock";

/// A held run-folder lock; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    _file: File,
}

/// Who holds (or held) a lock, as its file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    pub started: String,
}

impl LockHolder {
    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != LOCK_HEADER {
            return None;
        }
        let mut pid = None;
        let (mut host, mut started) = (String::new(), String::new());
        for line in lines {
            match line.split_once(": ") {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("host", v)) => host = v.trim().to_string(),
                Some(("started", v)) => started = v.trim().to_string(),
                _ => {}
            }
        }
        Some(LockHolder {
            pid: pid?,
            host,
            started,
        })
    }

    fn describe(&self) -> String {
        format!(
            "pid {} on host {}{}",
            self.pid,
            self.host,
            if self.started.is_empty() {
                String::new()
            } else {
                format!(", started {}", self.started)
            }
        )
    }
}

/// Whether `text` is the content of a dinotrain lock file.
pub fn is_lock_content(text: &str) -> bool {
    text.starts_with(LOCK_HEADER)
}

impl RunLock {
    /// Takes the lock of the run folder `dir` (which must exist), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let held = |file: &mut File| -> Error {
            let holder = read_holder(file);
            Error::Config(format!(
                "output folder {} is in use by another dinotrain run ({}); wait for it to end, \
                 stop it, or choose another --out",
                dir.display(),
                holder.map_or_else(|| "holder unknown".into(), |h| h.describe())
            ))
        };
        match try_lock(&file) {
            Ok(true) => {}
            Ok(false) => return Err(held(&mut file)),
            Err(e) if is_unsupported(&e) => {
                // No file locks here: decide by content.
                if let Some(h) = read_holder(&mut file) {
                    let alive = h.host != hostname() || process_alive(h.pid);
                    if alive && h.pid != std::process::id() {
                        return Err(held(&mut file));
                    }
                    log::warn!(
                        "{}: replacing the stale lock of {} (no longer running)",
                        path.display(),
                        h.describe()
                    );
                }
            }
            Err(e) => return Err(Error::io(&path, e)),
        }
        if let Some(h) = read_holder(&mut file) {
            if h.host == hostname() && !process_alive(h.pid) && h.pid != std::process::id() {
                log::info!(
                    "{}: the previous run ({}) ended without releasing its folder; taking it over",
                    dir.display(),
                    h.describe()
                );
            }
        }
        let text = format!(
            "{LOCK_HEADER}\npid: {}\nhost: {}\nstarted: {}\n",
            std::process::id(),
            hostname(),
            super::outdir::utc_timestamp(SystemTime::now())
        );
        let written = (|| {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(text.as_bytes())?;
            file.flush()
        })();
        written.map_err(|e| Error::io(&path, e))?;
        Ok(RunLock { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An exclusive, non-blocking `flock` on `file`: `Ok(false)` when another open file holds it.
/// (std's `File::try_lock` needs Rust 1.89; the crate's minimum is older.)
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor this `File` owns for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Whether a lock error means that the filesystem has no locks.
fn is_unsupported(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) {
        return true;
    }
    e.kind() == std::io::ErrorKind::Unsupported
}

fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(4096).read_to_string(&mut text).ok()?;
    LockHolder::parse(&text)
}

/// This machine's host name (`unknown` when it cannot be read).
pub fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
        // (the last byte is kept 0 for the truncated case).
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
        if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
    }
    "unknown".into()
}

/// Whether a process with `pid` runs on this machine.
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        if pid <= 0 {
            return false;
        }
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_released_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let msg = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains(&hostname()),
            "{msg}"
        );
        drop(first);
        let again = RunLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert!(is_lock_content(&text), "{text}");
    }

    #[test]
    fn holders_parse_and_liveness_is_checked() {
        let h = LockHolder::parse("dinotrain run lock\npid: 42\nhost: h\nstarted: t\n").unwrap();
        assert_eq!((h.pid, h.host.as_str()), (42, "h"));
        assert!(LockHolder::parse("something else").is_none());
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
