//! The golden fixtures on the CUDA backend (`dinotrain verify --device cuda`), each judged by
//! the tolerance `golden::tolerance_on` states for the GPU. Skips without a GPU; on a machine
//! without a driver, the CLI must say so in one line and exit non-zero.

mod cuda_support;

use dinotrain::backend::cuda::{CudaBackend, ResolvedDevice};
use dinotrain::golden::{fixture_files, verify_file_on};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixtures: `$DINOTRAIN_GOLDEN_DIR`, else the repository's `tests/golden`, else `golden/`
/// beside the working directory (the GPU bundle's layout, where the build machine's paths do
/// not exist).
fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DINOTRAIN_GOLDEN_DIR") {
        return PathBuf::from(dir);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    if repo.is_dir() {
        repo
    } else {
        PathBuf::from("golden")
    }
}

#[test]
fn every_fixture_passes_on_cuda() {
    let Some(gpu) = cuda_support::gpu() else {
        return;
    };
    let mut device = ResolvedDevice::Cuda(Box::new(gpu));
    let files = fixture_files(&fixtures_dir()).unwrap();
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    for path in &files {
        let v = verify_file_on(path, &mut device);
        match v.outcome {
            Ok(report) if report.pass() => {}
            Ok(report) => failures.push(format!(
                "{} (tol {:.0e}): {}",
                path.display(),
                report.tol,
                report.failures().join("; ")
            )),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn verify_on_cuda_without_a_driver_fails_with_one_clear_line() {
    if CudaBackend::new(0).is_ok() {
        // Not a skip: on a GPU machine the no-driver path does not exist (gpu-check counts
        // "skipping:" lines as failures).
        eprintln!("a CUDA device is present: the no-driver message cannot arise here");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dinotrain"))
        .args(["verify", "--device", "cuda"])
        .arg(fixtures_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("use --device cpu"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing runs before the device is open"
    );
}
