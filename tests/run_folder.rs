//! The run folder against a hostile user (issue 17), through the built binary: two processes
//! racing on one folder; `--resume` with the run's own configuration, and a refused one that
//! leaves it alone; a NaN weight through `knn` / `embed` / `train`; a training checkpoint's
//! architecture through `export`; SIGTERM mid-run, then the resume; the failed start that a
//! retry can reuse.

mod run_support;

use run_support::SMALL;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dinotrain");

fn dinotrain(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "rc {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(args: &[&str]) -> Output {
    let out = dinotrain(args);
    assert!(out.status.success(), "dinotrain {args:?}: {}", text(&out));
    out
}

fn failed(args: &[&str]) -> String {
    let out = dinotrain(args);
    assert!(!out.status.success(), "dinotrain {args:?}: {}", text(&out));
    text(&out)
}

/// A long tiny run in `out` (stopped by the test), started in the background; `extra`
/// arguments come last.
fn spawn_long_run(out: &Path, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["train", "--out", out.to_str().unwrap(), "--steps", "100000"])
        .args(["--set", "dinotrain.checkpoint_every=100000"])
        .args(SMALL)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `out/metrics.jsonl` holds `n` records (the run is stepping).
fn wait_for_steps(out: &Path, n: usize, child: &mut Child) {
    let start = Instant::now();
    loop {
        let lines =
            std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
        if lines >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended early ({status})");
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no step after 300 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
}

#[test]
fn a_live_run_locks_its_folder_and_sigterm_stops_it_with_a_checkpoint_to_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let mut first = spawn_long_run(&out, &[]);
    wait_for_steps(&out, 2, &mut first);

    // A second process on the same folder: fresh, --resume and --overwrite all refused, the
    // message naming the holder; the live run's files are untouched.
    let host = dinotrain::train::lock::hostname();
    let holder = format!("pid {} on host {host}", first.id());
    for extra in [&[][..], &["--resume"][..], &["--overwrite"][..]] {
        let args = [&["train", "--out", out_s, "--steps", "3"][..], extra, SMALL].concat();
        let msg = failed(&args);
        assert!(msg.contains("in use by another dinotrain run"), "{msg}");
        assert!(msg.contains(&holder), "{msg}");
    }

    // SIGTERM: the step in flight finishes, a checkpoint is written, the way on is printed.
    signal(&first, libc::SIGTERM);
    let done = first.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done));
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(
        err.contains("stopped by a signal") && err.contains(&format!("--out {out_s} --resume")),
        "{err}"
    );
    let steps = run_support::losses(&out).len() as u64;
    let ckpt = out
        .join("checkpoints")
        .join(format!("step_{steps:08}.safetensors"));
    assert!(ckpt.is_file(), "no checkpoint at step {steps}: {err}");
    assert!(out.join("teacher_backbone.safetensors").is_file());

    // The folder is free again: the resume (with the run's own configuration) continues.
    ok(&[
        "train",
        "--out",
        out_s,
        "--resume",
        "--set",
        "dinotrain.stop_after=1",
    ]);
    let after = run_support::losses(&out);
    assert_eq!(after.len() as u64, steps + 1);
    assert_eq!(after.last().unwrap().0, steps);
}

#[test]
fn a_second_signal_stops_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Steps long enough (a wider model) that the second signal lands during the first stop.
    let wider = [
        "--set",
        "dinotrain.embed_dim=384",
        "--set",
        "dinotrain.depth=6",
    ];
    let mut child = spawn_long_run(&out, &wider);
    wait_for_steps(&out, 1, &mut child);
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(50));
    signal(&child, libc::SIGINT);
    let done = child.wait_with_output().unwrap();
    assert_eq!(
        done.status.code(),
        Some(128 + libc::SIGINT),
        "{}",
        text(&done)
    );
    assert!(!String::from_utf8_lossy(&done.stderr).contains("stopped by a signal"));
}

#[test]
fn resume_reads_the_runs_own_configuration_and_a_refused_one_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let first = [
        &["train", "--out", out_s, "--steps", "3"][..],
        &[
            "--set",
            "dinotrain.checkpoint_every=1",
            "--set",
            "dinotrain.stop_after=1",
        ],
        SMALL,
    ]
    .concat();
    ok(&first);
    let config = std::fs::read(out.join("config.yaml")).unwrap();

    // A resume that changes the configuration is refused and leaves config.yaml as it was.
    let msg = failed(&[
        "train",
        "--out",
        out_s,
        "--resume",
        "--set",
        "optim.base_lr=0.5",
    ]);
    assert!(msg.contains("different configuration"), "{msg}");
    assert_eq!(std::fs::read(out.join("config.yaml")).unwrap(), config);
    let log = std::fs::read_to_string(out.join("train.log")).unwrap();
    assert!(log.contains("error: checkpoint"), "{log}");

    // The README's line, as written: the run's own configuration, no flags repeated.
    ok(&["train", "--out", out_s, "--resume"]);
    assert_eq!(run_support::losses(&out).len(), 2);
}

#[test]
fn a_failed_start_leaves_a_folder_the_retry_can_use() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let garbage = tmp.path().join("garbage.safetensors");
    std::fs::write(&garbage, "not a safetensors file").unwrap();
    let bad = [
        &["train", "--out", out_s, "--steps", "1"][..],
        &["--model", garbage.to_str().unwrap()],
        SMALL,
    ]
    .concat();
    let msg = failed(&bad);
    let log = std::fs::read_to_string(out.join("train.log")).unwrap();
    assert!(log.contains("error:"), "{msg}\n{log}");
    // Stale temp files of killed writes go at the next start.
    let stale = out
        .join("checkpoints")
        .join(".step_00000001.safetensors.tmp.999999");
    std::fs::write(&stale, "partial").unwrap();
    ok(&[&["train", "--out", out_s, "--steps", "1"][..], SMALL].concat());
    assert!(!stale.exists());
    assert_eq!(run_support::losses(&out).len(), 1);
}

#[test]
fn non_finite_weights_and_checkpoint_architectures() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    ok(&[&["train", "--out", out_s, "--steps", "1"][..], SMALL].concat());

    // A training checkpoint carries the architecture (2 heads; D / 64 would say 0).
    let ckpt = out.join("checkpoints").join("step_00000001.safetensors");
    let exported = tmp.path().join("from-ckpt.safetensors");
    ok(&[
        "export",
        "--model",
        ckpt.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    let file = dinotrain::io::TensorFile::read(&exported).unwrap();
    let arch = dinotrain::eval::backbone::arch_from_metadata(&file.metadata)
        .unwrap()
        .unwrap();
    assert_eq!((arch.embed_dim, arch.num_heads), (32, 2));

    // One NaN weight: knn, embed and train --model refuse it, naming the file and the tensor.
    let mut teacher =
        dinotrain::io::TensorFile::read(&out.join("teacher_backbone.safetensors")).unwrap();
    match teacher.tensors.get_mut("blocks.1.mlp.fc1.weight") {
        Some(dinotrain::io::Value::F32(t)) => t.data[5] = f32::NAN,
        other => panic!("unexpected tensor {other:?}"),
    }
    let nan = tmp.path().join("nan.safetensors");
    teacher.write(&nan).unwrap();
    let nan_s = nan.to_str().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let img = image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([x as u8 * 6, y as u8 * 6, 9]));
    img.save(images.join("a.png")).unwrap();
    let emb = tmp.path().join("emb.npy");
    let r2 = tmp.path().join("r2");
    let runs: [Vec<&str>; 3] = [
        vec!["knn", "--model", nan_s, "--demo", "--device", "cpu"],
        vec![
            "embed",
            "--model",
            nan_s,
            "--data",
            images.to_str().unwrap(),
            "--out",
            emb.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        [
            &["train", "--out", r2.to_str().unwrap()][..],
            &["--steps", "1", "--model", nan_s],
            SMALL,
        ]
        .concat(),
    ];
    for args in &runs {
        let msg = failed(args);
        assert!(
            msg.contains("nan.safetensors")
                && msg.contains("blocks.1.mlp.fc1.weight")
                && msg.contains("non-finite"),
            "{args:?}: {msg}"
        );
        assert!(!msg.contains("100.00"), "{msg}");
    }
    assert!(!emb.exists());
}

#[test]
fn resource_requests_and_outputs_that_are_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let small = &SMALL[..SMALL.len() - 2]; // without its --batch-size
    assert_eq!(SMALL[SMALL.len() - 2], "--batch-size");
    let msg = failed(
        &[
            &["train", "--out", out_s, "--steps", "1"][..],
            &["--batch-size", "99999999999"],
            small,
        ]
        .concat(),
    );
    assert!(
        msg.contains("rc Some(2)") && msg.contains("lower --batch-size"),
        "{msg}"
    );
    let msg = failed(
        &[
            &["train", "--out", out_s, "--steps", "1"][..],
            &["--set", "dinotrain.workers=100000"],
            SMALL,
        ]
        .concat(),
    );
    assert!(msg.contains("rc Some(2)") && msg.contains("cores"), "{msg}");
    // The failed starts left a folder a good run can use.
    ok(&[&["train", "--out", out_s, "--steps", "1"][..], SMALL].concat());

    // embed / export never write over an input.
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let img = image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let first = images.join("img_000.png");
    img.save(&first).unwrap();
    let before = std::fs::read(&first).unwrap();
    let msg = failed(&[
        "embed",
        "--model",
        out_s,
        "--data",
        images.to_str().unwrap(),
        "--out",
        first.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(msg.contains("inside the input folder"), "{msg}");
    assert_eq!(std::fs::read(&first).unwrap(), before);
    let teacher = out.join("teacher_backbone.safetensors");
    let before = std::fs::read(&teacher).unwrap();
    let msg = failed(&[
        "export",
        "--model",
        out_s,
        "--out",
        teacher.to_str().unwrap(),
    ]);
    assert!(msg.contains("is the input --model"), "{msg}");
    assert_eq!(std::fs::read(&teacher).unwrap(), before);
}

#[test]
fn knn_checks_its_flags_before_any_feature() {
    // A model that does not exist: the flag error comes first.
    for (flag, value) in [("--k", "0"), ("--temperature", "-1")] {
        let arg = format!("{flag}={value}");
        let msg = failed(&["knn", "--model", "/nonexistent.safetensors", "--demo", &arg]);
        assert!(msg.contains(flag) && !msg.contains("nonexistent"), "{msg}");
    }
}

#[test]
fn print_config_shows_the_warnings_of_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = tmp.path().join("c.yaml");
    std::fs::write(&yaml, "optim:\n  base_lr: 0.001\n  no_such_key: 3\n").unwrap();
    let out = ok(&[
        "train",
        "--config",
        yaml.to_str().unwrap(),
        "--print-config",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("no_such_key"),
        "{}",
        text(&out)
    );
}

#[test]
fn unreadable_entries_are_counted_and_os_errors_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let kinds = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kinds");
    for name in ["baseline.jpg", "rgb.png"] {
        std::fs::copy(kinds.join(name), data.join(name)).unwrap();
    }
    std::os::unix::fs::symlink(tmp.path().join("gone.jpg"), data.join("dangling.jpg")).unwrap();
    let out = tmp.path().join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let run = ok(&[
        &["train", "--data", d, "--out", o, "--steps", "1"][..],
        SMALL,
    ]
    .concat());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("1 entries could not be read and are left out")
            && stderr.contains("dangling.jpg: broken symlink"),
        "{stderr}"
    );
    let missing = tmp.path().join("missing");
    let text = failed(&[
        "train",
        "--data",
        missing.to_str().unwrap(),
        "--out",
        o,
        "--overwrite",
    ]);
    assert_eq!(
        text.matches("No such file or directory").count(),
        1,
        "{text}"
    );
}

#[test]
fn dump_batches_writes_each_steps_crops_and_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, dump) = (tmp.path().join("run"), tmp.path().join("dump"));
    std::fs::create_dir(&dump).unwrap();
    let args = [
        &["train", "--out", out.to_str().unwrap(), "--steps", "2"][..],
        &["--set", "dinotrain.knn=false"],
        SMALL,
    ]
    .concat();
    let output = Command::new(BIN)
        .args(&args)
        .env(dinotrain::train::trainer::DUMP_BATCHES_ENV, &dump)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let mut names: Vec<String> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["step_000000.bin", "step_000001.bin"]);
    let files: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(dump.join(n)).unwrap())
        .collect();
    assert_eq!(files[0].len(), files[1].len());
    assert_ne!(files[0], files[1], "each step has its own crops");
    // SMALL: batch 8, 2 local crops; 32 px global / 16 px local crops of 3 channels; masks of
    // (32 / patch)^2 patches after a u64 upper bound.
    let floats = 2 * 8 * 3 * 32 * 32 + 2 * 8 * 3 * 16 * 16;
    let rest = files[0].len() - 4 * floats;
    assert!(
        rest > 8 && (rest - 8) % 16 == 0,
        "{rest} bytes after the crops"
    );
    let crops = &files[0][..4 * floats];
    assert!(crops
        .chunks_exact(4)
        .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()));
    assert!(files[0][4 * floats + 8..].iter().all(|&b| b <= 1));
}
