//! Runs the kernels' index and reduction logic on the CPU: `kernels/emulator/*_check.cpp`
//! compile the real `.cu` files against a host SIMT emulation of the CUDA features they use
//! (threads, barriers, shuffles, mma.sync and ldmatrix fragment layouts, cp.async) and compare
//! with double-precision references. Catches layout, tiling and masking bugs on machines
//! without a GPU; skips with a message when no C++20 compiler (g++) is found.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run_check(name: &str) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = manifest
        .join("kernels/emulator")
        .join(format!("{name}.cpp"));
    if !source.exists() {
        eprintln!(
            "skipping: {} not found (a binary copied away from its sources)",
            source.display()
        );
        return;
    }
    let binary: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    let compiled = match Command::new(&compiler)
        .args(["-O2", "-std=c++20", "-pthread", "-w"])
        .arg(&source)
        .arg("-o")
        .arg(&binary)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            eprintln!("skipping: cannot run {compiler}: {e}");
            return;
        }
    };
    assert!(
        compiled.status.success(),
        "{compiler} failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&binary)
        .output()
        .expect("run the compiled check");
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}");
    assert!(run.status.success(), "{name} found mismatches:\n{report}");
}

#[test]
fn attention_kernels_match_f64_in_the_simt_emulator() {
    run_check("attention_check");
}

#[test]
fn reduction_kernels_match_f64_in_the_simt_emulator() {
    run_check("reductions_check");
}
