//! Released weights downloaded on first use, against a local HTTP server on 127.0.0.1: the whole
//! file, a transfer that breaks off and resumes with a Range request, a server that ignores the
//! range, a wrong checksum, a missing file, a server that is gone, and a cached file that
//! changed after its download.
#![cfg(feature = "download")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use dinotrain::io::download::{self, checksum_path, part_path, sha256_file};
use dinotrain::io::pretrained::PretrainedModel;

/// How the server answers each request, in order (the last one repeats).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    /// The file, honouring a Range request with 206.
    Serve,
    /// The whole file's Content-Length, but only the first `n` bytes, then the connection closes.
    BreakAfter(usize),
    /// The whole file with 200, whatever the request's Range.
    IgnoreRange,
    NotFound,
}

struct Server {
    base: String,
    /// The Range header of every request received (None: no Range).
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

fn serve(body: Vec<u8>, answers: Vec<Answer>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let log = ranges.clone();
    thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            let answer = answers[i.min(answers.len() - 1)];
            let range = answer_one(stream, &body, answer);
            log.lock().unwrap().push(range);
        }
    });
    Server { base, ranges }
}

/// Reads one request and answers it; returns its Range header.
fn answer_one(mut stream: TcpStream, body: &[u8], answer: Answer) -> Option<String> {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
            range = Some(v.trim().to_string());
        }
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let head = |status: &str, len: usize, extra: &str| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\n{extra}Connection: close\r\n\r\n")
    };
    let _ = match (answer, start) {
        (Answer::NotFound, _) => stream.write_all(head("404 Not Found", 0, "").as_bytes()),
        (Answer::Serve, Some(s)) if s < body.len() => {
            let range = format!(
                "Content-Range: bytes {s}-{}/{}\r\n",
                body.len() - 1,
                body.len()
            );
            let _ =
                stream.write_all(head("206 Partial Content", body.len() - s, &range).as_bytes());
            stream.write_all(&body[s..])
        }
        (Answer::BreakAfter(n), _) => {
            let _ = stream.write_all(head("200 OK", body.len(), "").as_bytes());
            stream.write_all(&body[..n])
        }
        _ => {
            let _ = stream.write_all(head("200 OK", body.len(), "").as_bytes());
            stream.write_all(body)
        }
    };
    let _ = stream.flush();
    range
}

/// Bytes that look like nothing in particular (a few hundred KiB, more than one buffer).
fn payload() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn vits14() -> PretrainedModel {
    PretrainedModel::from_name("dinov2/vits14").unwrap()
}

fn cached(dir: &Path) -> PathBuf {
    dir.join("dinov2_vits14_pretrain.pth")
}

#[test]
fn a_released_name_downloads_into_the_cache_once() {
    let body = payload();
    let server = serve(body.clone(), vec![Answer::Serve]);
    let dir = tempfile::tempdir().unwrap();
    let path = vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap();
    assert_eq!(path, cached(dir.path()));
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert!(!part_path(&path).exists());
    let recorded = std::fs::read_to_string(checksum_path(&path)).unwrap();
    assert_eq!(recorded.trim(), sha256_file(&path).unwrap());
    // Found in the cache the second time: no request.
    vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap();
    assert_eq!(server.ranges.lock().unwrap().len(), 1);
}

#[test]
fn a_broken_transfer_resumes_where_it_stopped() {
    let body = payload();
    let half = body.len() / 2;
    let server = serve(body.clone(), vec![Answer::BreakAfter(half), Answer::Serve]);
    let dir = tempfile::tempdir().unwrap();
    let err = vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap_err()
        .to_string();
    assert!(err.contains("resume"), "{err}");
    assert!(err.contains(&server.base), "{err}");
    let dest = cached(dir.path());
    assert!(!dest.exists(), "a broken download must not be installed");
    assert_eq!(
        std::fs::metadata(part_path(&dest)).unwrap().len(),
        half as u64
    );

    let path = vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges, [None, Some(format!("bytes={half}-"))]);
}

#[test]
fn a_server_that_ignores_the_range_restarts_the_part() {
    let body = payload();
    let server = serve(body.clone(), vec![Answer::IgnoreRange]);
    let dir = tempfile::tempdir().unwrap();
    let dest = cached(dir.path());
    std::fs::write(part_path(&dest), b"stale bytes of another attempt").unwrap();
    let path = vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
}

#[test]
fn a_wrong_checksum_deletes_the_download() {
    let body = payload();
    let server = serve(body.clone(), vec![Answer::Serve]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("w.pth");
    let url = format!("{}/w.pth", server.base);
    let wrong = "0".repeat(64);
    let err = download::download(&url, &dest, Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(err.contains("SHA-256") && err.contains(&wrong), "{err}");
    assert!(!dest.exists() && !part_path(&dest).exists());
    // The right one passes and is recorded.
    let right = {
        let f = dir.path().join("copy");
        std::fs::write(&f, &body).unwrap();
        sha256_file(&f).unwrap()
    };
    assert_eq!(
        download::download(&url, &dest, Some(&right)).unwrap(),
        right
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
}

#[test]
fn a_missing_file_and_a_gone_server_name_the_url_and_the_path() {
    let server = serve(Vec::new(), vec![Answer::NotFound]);
    let dir = tempfile::tempdir().unwrap();
    let err = vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 404"), "{err}");

    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }; // the listener is dropped: connections are refused
    let err = vits14()
        .locate_from(dir.path(), Some(&gone))
        .unwrap_err()
        .to_string();
    let url = format!("{gone}/dinov2_vits14/dinov2_vits14_pretrain.pth");
    for needle in [
        url.as_str(),
        cached(dir.path()).to_str().unwrap(),
        "curl -L -o",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_cached_file_that_changed_after_its_download_is_refused() {
    let server = serve(payload(), vec![Answer::Serve]);
    let dir = tempfile::tempdir().unwrap();
    let path = vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = vits14()
        .locate_from(dir.path(), Some(&server.base))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SHA-256") && err.contains("download it again"),
        "{err}"
    );
}

#[test]
fn progress_reaches_the_total() {
    let body = payload();
    let server = serve(body.clone(), vec![Answer::Serve]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("p.pth");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let watched = dest.clone();
    download::set_progress(Some(Box::new(move |file, done, total| {
        if file == watched {
            log.lock().unwrap().push((done, total));
        }
    })));
    download::download(&format!("{}/p.pth", server.base), &dest, None).unwrap();
    download::set_progress(None);
    let seen = seen.lock().unwrap();
    let n = body.len() as u64;
    assert_eq!(seen.first(), Some(&(0, Some(n))));
    assert_eq!(seen.last(), Some(&(n, Some(n))));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
}

#[test]
fn the_server_answers_whole_requests() {
    // The helper itself: a plain GET gets the whole body.
    let body = payload();
    let server = serve(body.clone(), vec![Answer::Serve]);
    let addr = server.base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(got.ends_with(&body));
}
