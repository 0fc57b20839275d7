//! The CUDA code path on a machine without a GPU: `kernels/emulator/fake_cuda.cpp` is built into
//! a stand-in for libcuda / libcublas / libcublasLt, and `fake_nccl.cpp` for libnccl (device memory is host memory, every launch
//! runs the real kernel source through the SIMT emulation, the bf16 GEMM is a plain loop), and
//! the GPU programs run against it unchanged with that folder first on `LD_LIBRARY_PATH`:
//! `dinotrain verify --device cuda` on every golden fixture and the GPU test binaries.
//!
//! This checks the host orchestration (buffer sizes, offsets, launch arguments, the order of
//! passes, where bf16 rounding happens) and the kernels' index math end to end, in CI. It says
//! nothing about speed or races between blocks (blocks run one after another), which only a
//! real GPU shows (`tools/gpu-check.sh`).
//!
//! Skips, saying why, without g++ or when this build has no precompiled kernels (the emulation
//! serves kernels by name and cannot run NVRTC).

mod run_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `KERNEL(family namespace, name)` for every `extern "C"` kernel of the preprocessed
/// `all_kernels.hpp` (macros such as `LN_FORWARD(bf16, ...)` expanded).
fn kernel_registry(preprocessed: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for section in preprocessed.split("namespace fam_").skip(1) {
        let family: String = section
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        for after in section.split("extern \"C\"").skip(1) {
            let Some(rest) = after.trim_start().strip_prefix("void") else {
                continue;
            };
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                lines.push(format!("KERNEL(fam_{family}, {name})"));
            }
        }
    }
    lines
}

/// Runs a build step; a failure is a broken emulator source, so the test fails.
fn run_checked(what: &str, command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the emulated driver (once per test binary) into a folder holding libcuda.so,
/// libcublas.so and libcublasLt.so. `Err` carries the reason to skip.
fn build_driver() -> Result<PathBuf, String> {
    if !dinotrain::backend::cuda::all_precompiled() {
        return Err("this build has no precompiled kernels (nvcc was missing)".into());
    }
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    if Command::new(&compiler).arg("--version").output().is_err() {
        return Err(format!("no C++ compiler ({compiler})"));
    }
    let emulator = manifest().join("kernels/emulator");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulated-cuda");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let probe = dir.join("all_kernels.cpp");
    std::fs::write(&probe, "#include \"all_kernels.hpp\"\n").map_err(|e| e.to_string())?;
    let pre = run_checked(
        "the preprocessor",
        Command::new(&compiler)
            .args(["-std=c++20", "-E", "-w", "-I"])
            .arg(&emulator)
            .arg(&probe),
    );
    let registry = kernel_registry(&String::from_utf8_lossy(&pre.stdout));
    assert!(
        registry.len() >= 60,
        "only {} kernels found in the sources",
        registry.len()
    );
    std::fs::write(dir.join("registry.inc"), registry.join("\n") + "\n")
        .map_err(|e| e.to_string())?;
    let library = dir.join("libcuda.so");
    run_checked(
        "the emulated driver's build",
        Command::new(&compiler)
            .args(["-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", "-w"])
            .arg("-I")
            .arg(&dir)
            .arg(emulator.join("fake_cuda.cpp"))
            .arg("-o")
            .arg(&library),
    );
    for alias in ["libcublas.so", "libcublasLt.so"] {
        std::fs::copy(&library, dir.join(alias)).map_err(|e| e.to_string())?;
    }
    run_checked(
        "the NCCL double's build",
        Command::new(&compiler)
            .args(["-O2", "-std=c++20", "-shared", "-fPIC", "-w"])
            .arg(emulator.join("fake_nccl.cpp"))
            .arg("-o")
            .arg(dir.join("libnccl.so")),
    );
    Ok(dir)
}

/// The emulated driver's folder, or `None` after printing why the test is skipped.
fn driver() -> Option<&'static Path> {
    static DRIVER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DRIVER.get_or_init(build_driver) {
        Ok(dir) => Some(dir.as_path()),
        Err(reason) => {
            eprintln!("skipping: {reason}");
            None
        }
    }
}

/// The folder of the pinned NVRTC (`libnvrtc.so.13`) beside nvcc: `$NVCC/../lib`, or the
/// repository's `.cuda-venv` (both put there by `.ci/run`).
fn nvrtc_dir() -> Option<PathBuf> {
    let has_nvrtc = |dir: &Path| dir.join("libnvrtc.so.13").exists();
    if let Some(nvcc) = std::env::var_os("NVCC") {
        let lib = Path::new(&nvcc).parent()?.parent()?.join("lib");
        if has_nvrtc(&lib) {
            return Some(lib);
        }
    }
    let venv_lib = manifest().join(".cuda-venv/lib");
    for python in std::fs::read_dir(venv_lib).ok()?.filter_map(|e| e.ok()) {
        let lib = python.path().join("site-packages/nvidia/cu13/lib");
        if has_nvrtc(&lib) {
            return Some(lib);
        }
    }
    None
}

/// `program` with the emulated driver first on the library path (and NVRTC after it, so the
/// NVRTC fallback compiles every kernel source too).
fn emulated(program: &Path, driver: &Path) -> Command {
    let mut command = Command::new(program);
    let mut dirs = vec![driver.display().to_string()];
    dirs.extend(nvrtc_dir().map(|d| d.display().to_string()));
    dirs.extend(
        std::env::var("LD_LIBRARY_PATH")
            .ok()
            .filter(|p| !p.is_empty()),
    );
    let path = dirs.join(":");
    command.env("LD_LIBRARY_PATH", path).current_dir(manifest());
    command
}

fn report(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn registry_reads_kernel_names_through_macros_and_launch_bounds() {
    let text = "namespace fam_a {\nextern \"C\" void k1(int x) {}\nextern \"C\" void\n  k2 (float* p) {}\n}\nnamespace fam_b {\nextern \"C\" int helper();\nextern \"C\" void k3() {}\n}";
    assert_eq!(
        kernel_registry(text),
        [
            "KERNEL(fam_a, k1)",
            "KERNEL(fam_a, k2)",
            "KERNEL(fam_b, k3)"
        ]
    );
}

#[test]
fn verify_passes_every_golden_fixture_on_the_emulated_device() {
    let Some(driver) = driver() else { return };
    let output = emulated(Path::new(env!("CARGO_BIN_EXE_dinotrain")), driver)
        .args(["verify", "--device", "cuda", "tests/golden"])
        .output()
        .unwrap();
    let text = report(&output);
    eprintln!("{text}");
    assert!(output.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("emulated CUDA device"),
        "the fixtures did not run on the emulated device:\n{stdout}"
    );
}

/// The newest build of test binary `name` beside this one (cargo builds every test target
/// before it runs any). A bench target may share the name: cargo's dependency file beside each
/// binary names its source, which must be `tests/<name>.rs`.
fn sibling_test_binary(name: &str) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let deps = me.parent()?;
    let source = format!("tests/{name}.rs");
    std::fs::read_dir(deps)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let file = p.file_name().map(|f| f.to_string_lossy().into_owned());
            file.is_some_and(|f| {
                f.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|hash| hash.chars().all(|c| c.is_ascii_hexdigit()))
            })
        })
        .filter(|p| {
            std::fs::read_to_string(p.with_extension("d"))
                .is_ok_and(|deps| deps.lines().next().is_some_and(|l| l.contains(&source)))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

fn run_gpu_tests(name: &str) {
    run_gpu_tests_with(name, &[]);
}

/// [`run_gpu_tests`] with extra environment variables.
fn run_gpu_tests_with(name: &str, env: &[(&str, &str)]) {
    let Some(driver) = driver() else { return };
    let Some(binary) = sibling_test_binary(name) else {
        eprintln!("skipping: no {name} test binary beside this one (run the whole `cargo test`)");
        return;
    };
    if nvrtc_dir().is_none() {
        eprintln!("skipping: no NVRTC (libnvrtc.so.13) beside nvcc for the NVRTC fallback test");
        return;
    }
    // --nocapture: a test that skips says so on stderr, which must stay empty of skips here.
    let output = emulated(&binary, driver)
        .envs(env.iter().copied())
        .args(["--test-threads", "2", "--nocapture"])
        .output()
        .unwrap();
    let text = report(&output);
    eprintln!("{text}");
    assert!(
        output.status.success(),
        "{name} on the emulated device:\n{text}"
    );
    let combined = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !combined.contains("skipping:"),
        "{name} skipped tests on the emulated device:\n{text}"
    );
}

#[test]
fn backbone_tests_pass_on_the_emulated_device() {
    run_gpu_tests("cuda_model");
}

#[test]
fn training_step_tests_pass_on_the_emulated_device() {
    run_gpu_tests("cuda_step");
}

#[test]
fn data_parallel_ranks_pass_on_the_emulated_device_and_its_nccl_double() {
    run_gpu_tests("cuda_ranks");
}

/// A device too small for the run: a typed error that says what to change, not a panic.
#[test]
fn running_out_of_device_memory_says_what_to_change() {
    let Some(driver) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let output = emulated(Path::new(env!("CARGO_BIN_EXE_dinotrain")), driver)
        .env("FAKE_CUDA_MEMORY_MB", "36")
        .args(["train", "--device", "cuda", "--steps", "1", "--out"])
        .arg(tmp.path().join("run"))
        .args(run_support::SMALL)
        // The official recipe's patch 4 (64 tokens per crop), which 36 MB cannot hold.
        .args(["--recipe", "official", "--set", "dinotrain.knn=false"])
        .output()
        .unwrap();
    let text = report(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("out of device memory"), "{text}");
    assert!(text.contains("--batch-size"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// The cuBLAS fallback (what a GPU takes where its cuBLASLt has no algorithm): the whole step
/// with every GEMM on `cublasGemmStridedBatchedEx` and the bias passes as separate kernels.
#[test]
fn training_step_tests_pass_without_cublaslt_on_the_emulated_device() {
    run_gpu_tests_with("cuda_step", &[("DINOTRAIN_GEMM", "cublas")]);
}

/// A cuBLASLt that gives algorithms its matmul then declines (the emulator's
/// `FAKE_CUBLASLT_REFUSE`): every GEMM must still run, on cuBLAS, after one warning each.
#[test]
fn training_step_tests_pass_when_cublaslt_refuses_every_matmul() {
    run_gpu_tests_with("cuda_step", &[("FAKE_CUBLASLT_REFUSE", "1")]);
}

#[test]
fn kernel_tests_pass_on_the_emulated_device() {
    run_gpu_tests("kernels");
}

#[test]
fn kernel_tests_of_the_method_pass_on_the_emulated_device() {
    run_gpu_tests("ssl_kernels");
}

#[test]
fn training_on_the_emulated_device_resumes_bit_for_bit() {
    let Some(driver) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    run_support::check_resume_reproduces_the_run(tmp.path(), &|args| {
        let output = emulated(Path::new(env!("CARGO_BIN_EXE_dinotrain")), driver)
            .args(args)
            .args(run_support::SMALL)
            .args(["--device", "cuda"])
            .output()
            .unwrap();
        let text = report(&output);
        assert!(output.status.success(), "dinotrain {args:?}:\n{text}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("emulated CUDA device")
                || String::from_utf8_lossy(&output.stdout).contains("emulated CUDA device"),
            "the run did not say it trains on the emulated device:\n{text}"
        );
        // Every GEMM on cuBLASLt, each linear layer's bias in its epilogue.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let gemms = stdout.lines().find(|l| l.starts_with("CUDA GEMMs: "));
        assert!(
            gemms.is_some_and(|l| l.contains(" 0 cuBLAS, 0 epilogues as separate")),
            "{text}"
        );
    });
}

#[test]
fn bench_times_the_step_on_the_emulated_device() {
    let Some(driver) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let output = emulated(Path::new(env!("CARGO_BIN_EXE_dinotrain")), driver)
        .args([
            "bench", "--device", "cuda", "--model", "micro", "--steps", "1", "--warmup", "1",
        ])
        .args([
            "--batch-size",
            "4",
            "--global-size",
            "28",
            "--local-size",
            "14",
        ])
        .args([
            "--set",
            "dino.head_n_prototypes=64",
            "--set",
            "ibot.head_n_prototypes=64",
        ])
        .args([
            "--set",
            "dino.head_hidden_dim=32",
            "--set",
            "dino.head_bottleneck_dim=16",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let text = report(&output);
    assert!(output.status.success(), "{text}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(result["device_kind"], "cuda", "{result}");
    assert!(
        result["images_per_s"].as_f64().is_some_and(|v| v > 0.0),
        "{result}"
    );
    assert!(
        result["peak_memory_bytes"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{result}"
    );
    // The emulated cuBLASLt has an algorithm for every problem: every linear layer's bias
    // (forward) and bias gradient (backward) rides in its GEMM, none takes a separate pass.
    let gemms = &result["gemms_per_step"];
    assert!(
        gemms["fused_epilogues"].as_u64().is_some_and(|v| v > 0),
        "{gemms}"
    );
    assert_eq!(gemms["separate_epilogues"], 0, "{gemms}");
    assert_eq!(gemms["cublas"], 0, "{gemms}");
    assert!(
        result["kernel_launches_per_step"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{result}"
    );
}

#[test]
fn eval_feature_tests_pass_on_the_emulated_device() {
    run_gpu_tests("cuda_eval");
}

mod knn_support;

/// A micro backbone (D 32, patch 4, one register) with random weights, exported with its
/// architecture to `dir/model.safetensors`.
fn random_micro_backbone(dir: &Path) -> PathBuf {
    use dinotrain::eval::backbone::arch_metadata;
    use dinotrain::io::export::{export_backbone, KeyNaming};
    use dinotrain::nn::{params::ParamTable, Preset, Vit};
    let cfg = Preset::Micro.config(16, 4, 1);
    let mut table = ParamTable::new();
    Vit::new(&cfg, &mut table, "backbone.");
    let mut params = table.init(&mut dinotrain::rng::keyed(
        5,
        &[dinotrain::rng::stream::INIT],
    ));
    let noise = dinotrain::rng::uniform_vec(6, params.len(), 0.1);
    params.iter_mut().zip(noise).for_each(|(p, n)| *p += n);
    let path = dir.join("model.safetensors");
    export_backbone(
        &path,
        &table,
        &params,
        KeyNaming::Official,
        &arch_metadata(&cfg),
    )
    .unwrap();
    path
}

#[test]
fn embed_on_the_emulated_device_matches_embed_on_the_cpu() {
    let Some(driver) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = random_micro_backbone(tmp.path());
    let data = tmp.path().join("images");
    knn_support::small_images(
        &data,
        &[
            ("rgb.png", "a.png"),
            ("baseline.jpg", "b.jpg"),
            ("palette.png", "c/c.png"),
            ("gray.jpg", "d.jpg"),
        ],
    );
    let embed = |device: &str| {
        let out = tmp.path().join(format!("{device}.safetensors"));
        let output = emulated(Path::new(env!("CARGO_BIN_EXE_dinotrain")), driver)
            .args(["embed", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args([
                "--size",
                "16",
                "--patch-mean",
                "--batch",
                "3",
                "--device",
                device,
            ])
            .output()
            .unwrap();
        let text = report(&output);
        assert!(output.status.success(), "embed --device {device}:\n{text}");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (dinotrain::io::TensorFile::read(&out).unwrap(), stderr)
    };
    let (gpu, gpu_log) = embed("cuda");
    let (cpu, cpu_log) = embed("cpu");
    assert!(
        gpu_log.contains("embedding on cuda") && gpu_log.contains("emulated CUDA device"),
        "{gpu_log}"
    );
    assert!(cpu_log.contains("embedding on cpu"), "{cpu_log}");
    assert_eq!(gpu.metadata["files"], cpu.metadata["files"]);
    for name in ["cls", "patch_mean"] {
        let (g, c) = match (&gpu.tensors[name], &cpu.tensors[name]) {
            (dinotrain::io::Value::F32(g), dinotrain::io::Value::F32(c)) => (g, c),
            _ => panic!("{name}: not f32"),
        };
        assert_eq!(g.shape, vec![4, 32], "{name}");
        assert_eq!(g.shape, c.shape, "{name}");
        // bf16 GEMM operands and attention, a few roundings per layer on O(1) final-norm
        // values: the bound of the backbone's forward tests.
        let diff: f64 = g
            .data
            .iter()
            .zip(&c.data)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let norm: f64 = c.data.iter().map(|b| (*b as f64).powi(2)).sum();
        let err = (diff / norm).sqrt();
        assert!(
            err <= 1e-2,
            "{name}: relative error {err:.3e} between cuda and cpu"
        );
    }
}

#[test]
fn training_on_the_emulated_device_reports_the_knn_that_the_knn_command_computes() {
    let Some(driver) = driver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // k-NN at initialisation (host weights uploaded), after step 1 and at the end (the device
    // teacher read in place), then `knn --device cuda` on the exported teacher.
    let log = knn_support::check_training_knn(tmp.path(), "cuda", run_support::SMALL, &|args| {
        emulated(Path::new(env!("CARGO_BIN_EXE_dinotrain")), driver)
            .args(args)
            .output()
            .unwrap()
    });
    assert!(
        log.contains("emulated CUDA device"),
        "not trained on the device:\n{log}"
    );
}
