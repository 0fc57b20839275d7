//! Every golden fixture in `tests/golden`, one test per case, each checking every output tensor
//! against the official implementation's values within the fixture's tolerance.

use dinotrain::golden::{fixture_files, verify_file};
use std::path::Path;

fn check_case(case: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let files: Vec<_> = fixture_files(&dir)
        .unwrap()
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.strip_prefix(case)
                .is_some_and(|rest| rest.starts_with('-'))
        })
        .collect();
    assert!(!files.is_empty(), "no fixtures for case {case}");
    let mut failures = Vec::new();
    for path in &files {
        let v = verify_file(path);
        match v.outcome {
            Ok(report) if report.pass() => {}
            Ok(report) => failures.push(format!(
                "{}: {}",
                path.display(),
                report.failures().join("; ")
            )),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

macro_rules! golden_cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { check_case(stringify!($name)); })*
    };
}

golden_cases!(
    layernorm,
    attention,
    block,
    vit_forward,
    pos_interp,
    dino_head,
    dino_loss_centering,
    dino_loss_sinkhorn,
    ibot_loss,
    koleo,
    schedules,
    param_groups,
    adamw_freeze,
    clip_grad,
    ema,
    knn,
    ssl_step,
);

#[test]
fn verify_survives_a_closed_output_pipe() {
    // `dinotrain verify | head`: printing stops, the verdict still decides the exit status.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dinotrain"))
        .arg("verify")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
