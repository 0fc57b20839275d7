//! A CPU training run with k-NN on labelled folders: the accuracies it logs and writes are those
//! `dinotrain knn` computes from its exported teacher. (The same check on the emulated CUDA
//! device is in `tests/emulated_cuda.rs`.)

mod knn_support;
mod run_support;

use std::process::Command;

#[test]
fn a_cpu_run_reports_the_knn_that_the_knn_command_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let log = knn_support::check_training_knn(tmp.path(), "cpu", run_support::SMALL, &|args| {
        Command::new(env!("CARGO_BIN_EXE_dinotrain"))
            .args(args)
            .output()
            .unwrap()
    });
    assert!(log.contains("device: cpu"), "{log}");
}
