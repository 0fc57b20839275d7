//! `dinotrain bench` through the binary: a tiny run writes the documented JSON with real
//! measurements; bad flags are refused with a message and exit code 2, never a panic.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_dinotrain");

/// A micro model at small crops with a small head: a step takes well under a second. Each
/// (flag, value) of `flags` replaces the default of that flag or is added.
fn tiny<'a>(flags: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    let mut pairs: Vec<(&str, &str)> = vec![
        ("--device", "cpu"),
        ("--model", "micro"),
        ("--steps", "2"),
        ("--warmup", "0"),
        ("--batch-size", "3"),
        ("--global-size", "56"),
        ("--local-size", "28"),
        ("--local-crops", "2"),
    ];
    for &(flag, value) in flags {
        match pairs
            .iter_mut()
            .find(|(f, _)| *f == flag && flag != "--set")
        {
            Some(pair) => pair.1 = value,
            None => pairs.push((flag, value)),
        }
    }
    let mut args = vec!["bench"];
    for (flag, value) in pairs {
        args.extend([flag, value]);
    }
    args.extend([
        "--set",
        "dino.head_n_prototypes=256",
        "--set",
        "dino.head_hidden_dim=64",
        "--set",
        "dino.head_bottleneck_dim=32",
    ]);
    args
}

fn dinotrain(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn number(json: &serde_json::Value, key: &str) -> f64 {
    json[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {json}"))
}

#[test]
fn tiny_cpu_bench_writes_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let out = dinotrain(&tiny(&[("--json", json_path.to_str().unwrap())]));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("images/s"), "{stdout}");
    assert!(stdout.contains("utilisation"), "{stdout}");
    assert_eq!(stderr.matches("(timed)").count(), 2, "{stderr}");

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(r["schema"], "dinotrain-bench/1");
    assert_eq!(r["device_kind"], "cpu");
    assert!(r["device"].as_str().unwrap().starts_with("cpu"), "{r}");
    assert_eq!(r["model"], "micro");
    assert_eq!(r["method"], "dinov2");
    for (key, want) in [
        ("embed_dim", 32),
        ("depth", 2),
        ("num_heads", 2),
        ("patch_size", 14),
        ("batch_size", 3),
        ("global_crops", 2),
        ("global_size", 56),
        ("local_crops", 2),
        ("local_size", 28),
        ("dino_prototypes", 256),
        ("warmup_steps", 0),
        ("timed_steps", 2),
    ] {
        assert_eq!(r[key].as_u64(), Some(want), "{key} in {r}");
    }

    let steps = &r["step_seconds"];
    let all: Vec<f64> = steps["all"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|&s| s > 0.0 && s.is_finite()), "{all:?}");
    let median = number(steps, "median");
    assert!((median - 0.5 * (all[0] + all[1])).abs() < 1e-12);
    assert_eq!(number(steps, "min"), all[0].min(all[1]));

    let cpu = r["cpu_seconds"]["all"].as_array().unwrap();
    assert_eq!(cpu.len(), 2, "{r}");
    assert!(cpu.iter().all(|v| v.as_f64().unwrap() >= 0.0), "{r}");

    let images_per_s = number(&r, "images_per_s");
    assert!(images_per_s > 0.0 && images_per_s.is_finite());
    assert!((images_per_s - 3.0 / median).abs() < 1e-9 * images_per_s);

    // FLOPs: the parts add up, and the backbone forward is the formula's value by hand.
    let flops = &r["flops"];
    let total = number(&r, "flops_per_image");
    let parts: f64 = [
        "student_backbone",
        "teacher_backbone",
        "student_heads",
        "teacher_heads",
    ]
    .iter()
    .map(|k| number(flops, k))
    .sum();
    assert!((total - parts).abs() < 1e-9 * total, "{total} vs {parts}");
    // 56 px, patch 14: 16 patches, 17 tokens, D 32, MLP 128, depth 2.
    let (t, d) = (17.0, 32.0);
    let forward = 2.0 * 16.0 * 588.0 * d + 2.0 * (24.0 * t * d * d + 4.0 * t * t * d);
    assert_eq!(number(flops, "forward_global_crop"), forward);
    // int(2·3·0.5) = 3 of 6 global crops masked, mean ratio 0.3 of 16 patches, per image.
    let masked = number(flops, "masked_patches_per_image");
    assert!((masked - 3.0 / 3.0 * 0.3 * 16.0).abs() < 1e-5, "{masked}");

    let achieved = number(&r, "achieved_tflops");
    assert!((achieved - total * images_per_s / 1e12).abs() < 1e-9 * achieved);
    let peak = number(&r, "peak_tflops");
    assert!(peak > 0.0 && peak.is_finite());
    assert!((number(&r, "utilisation") - achieved / peak).abs() < 1e-9);
    assert!(r["peak_source"].as_str().unwrap().contains("GEMM"), "{r}");
    assert!(number(&r, "peak_memory_bytes") > 1e6, "{r}");
    assert!(r["peak_memory_source"].as_str().unwrap().contains("VmHWM"));
    assert!(number(&r, "minor_faults_per_step") >= 0.0, "{r}");
    for key in ["loss_first", "loss_last"] {
        assert!(number(&r, key).is_finite() && number(&r, key) > 0.0, "{r}");
    }
}

#[test]
fn bench_with_data_times_the_loader_and_gives_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let photos = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/photos");
    let out = dinotrain(&tiny(&[
        ("--json", json_path.to_str().unwrap()),
        ("--data", photos),
        ("--workers", "1"),
    ]));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("loader") && stdout.contains("verdict"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let loader = &r["loader"];
    // 2 timed steps: at least 10 batches of 3 images, one worker.
    assert_eq!(number(loader, "images"), 30.0, "{r}");
    assert_eq!(number(loader, "workers"), 1.0, "{r}");
    let ips = number(loader, "images_per_s");
    assert!(ips > 0.0 && (ips - 30.0 / number(loader, "seconds")).abs() < 1e-6 * ips);
    let ratio = ips / number(&r, "images_per_s");
    let want = if ratio < 1.0 {
        "data_bound"
    } else if ratio < 1.5 {
        "balanced"
    } else {
        "compute_bound"
    };
    assert_eq!(r["verdict"], want, "{r}");

    // Without --data both are null.
    let plain = dinotrain(&tiny(&[
        ("--steps", "1"),
        ("--json", json_path.to_str().unwrap()),
    ]));
    assert!(plain.status.success());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert!(r["loader"].is_null() && r["verdict"].is_null(), "{r}");
}

#[test]
fn peak_override_is_used() {
    let out = dinotrain(&tiny(&[("--steps", "1"), ("--peak-tflops", "2.5")]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("2.500 TFLOP/s: given with --peak-tflops"),
        "{stdout}"
    );
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    for (flags, needle) in [
        (("--model", "vitz14"), "vits14"),
        (("--device", "tpu"), "unknown device"),
        (("--method", "simclr"), "dino, ibot or dinov2"),
        (("--steps", "0"), "--steps must be at least 1"),
        (("--local-size", "30"), "multiple of the patch size"),
        (("--batch-size", "0"), "batch_size_per_gpu"),
        (
            ("--peak-tflops", "0"),
            "--peak-tflops must be a positive number",
        ),
        (
            ("--set", "dino.head_n_protoypes=8"),
            "dino.head_n_prototypes",
        ),
        (("--steps", "many"), "invalid value"),
    ] {
        let out = dinotrain(&tiny(&[flags]));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
    }
}

#[test]
fn cuda_without_a_usable_gpu_step_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("cuda.json");
    let out = dinotrain(&tiny(&[
        ("--device", "cuda"),
        ("--json", json_path.to_str().unwrap()),
    ]));
    let stderr = text(&out.stderr);
    if out.status.success() {
        // A machine with a GPU and a build with the CUDA step: it must really have run there.
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
        assert_eq!(r["device_kind"], "cuda", "{r}");
        assert!(number(&r, "images_per_s") > 0.0);
    } else {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!json_path.exists());
        // Without a GPU the message says what to do instead (a GPU machine may refuse this
        // tiny model for its own reasons, e.g. a head size the kernels do not take).
        if !std::path::Path::new("/dev/nvidiactl").exists() {
            assert!(stderr.contains("--device cpu"), "{stderr}");
        }
    }
}
