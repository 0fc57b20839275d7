//! Build script: compiles every `kernels/*.cu` into a fatbin with nvcc and embeds it.
//!
//! - nvcc lookup order: `$NVCC` (when set, only that path is tried, so `NVCC=/nonexistent`
//!   simulates a machine without nvcc), `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`,
//!   `/usr/local/cuda/bin`, the repo's `.cuda-venv` (pinned PyPI wheels, see `.ci/run`).
//! - Found: one fatbin per `.cu` (sm_80 and sm_90 SASS plus compute_90 PTX), compiled in
//!   parallel threads, skipped when the source, the shared header, the flags and nvcc are
//!   unchanged. Register spills reported by `-Xptxas=-v` become `cargo:warning`s; a compile
//!   error fails the build.
//! - Not found: a warning; the sources stay embedded so the backend can compile them with NVRTC
//!   at run time. `DINOTRAIN_REQUIRE_NVCC=1` turns a missing nvcc into a build error (CI).
//!
//! Output: `$OUT_DIR/kernels.rs`, a table of `EmbeddedKernel`s included by
//! `src/backend/cuda/kernels.rs`.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Architectures: SASS for A100 (sm_80) and H100/H200 (sm_90), PTX for compute_90 so newer
/// parts can JIT.
const GENCODE: &[&str] = &[
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=[sm_90,compute_90]",
];
const NVCC_FLAGS: &[&str] = &["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v"];
const COMMON_HEADER: &str = "common.cuh";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it"));
    let kernel_dir = manifest_dir.join("kernels");

    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "DINOTRAIN_REQUIRE_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let sources = list_kernel_sources(&kernel_dir);
    let require_nvcc = env::var("DINOTRAIN_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let nvcc = find_nvcc(&manifest_dir);

    let fatbins: Vec<Option<PathBuf>> = match &nvcc {
        Some(nvcc) => compile_all(nvcc, &kernel_dir, &sources, &out_dir),
        None => {
            let msg = "nvcc not found ($NVCC, $CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda, \
                       .cuda-venv): CUDA kernels are embedded as sources for NVRTC";
            if require_nvcc {
                panic!("DINOTRAIN_REQUIRE_NVCC=1 but {msg}");
            }
            println!("cargo:warning={msg}");
            vec![None; sources.len()]
        }
    };

    write_kernel_table(&out_dir, &kernel_dir, &sources, &fatbins);
}

/// Every `kernels/*.cu`, sorted by name so the generated table is stable.
fn list_kernel_sources(kernel_dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = match fs::read_dir(kernel_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
            .collect(),
        Err(_) => Vec::new(),
    };
    sources.sort();
    sources
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    // An explicit $NVCC is authoritative: no silent fallback to another toolkit.
    if let Some(explicit) = env::var_os("NVCC") {
        let path = PathBuf::from(explicit);
        return is_executable(&path).then_some(path);
    }
    let mut candidates = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            candidates.push(PathBuf::from(root).join("bin").join("nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    if let Ok(entries) = fs::read_dir(manifest_dir.join(".cuda-venv").join("lib")) {
        let mut pythons: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        pythons.sort();
        for python in pythons {
            candidates.push(python.join("site-packages/nvidia/cu13/bin/nvcc"));
        }
    }
    candidates.into_iter().find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Compiles every source in its own thread; returns the fatbin path of each.
fn compile_all(
    nvcc: &Path,
    kernel_dir: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
) -> Vec<Option<PathBuf>> {
    let header = fs::read(kernel_dir.join(COMMON_HEADER)).unwrap_or_default();
    let results: Vec<Result<PathBuf, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| scope.spawn(|| compile_one(nvcc, kernel_dir, src, &header, out_dir)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("nvcc thread panicked".into()))
            })
            .collect()
    });
    let mut fatbins = Vec::new();
    let mut errors = String::new();
    for (src, result) in sources.iter().zip(results) {
        match result {
            Ok(path) => fatbins.push(Some(path)),
            Err(e) => {
                let _ = writeln!(errors, "{}:\n{e}", src.display());
                fatbins.push(None);
            }
        }
    }
    if !errors.is_empty() {
        panic!("nvcc failed to compile CUDA kernels:\n{errors}");
    }
    fatbins
}

fn compile_one(
    nvcc: &Path,
    kernel_dir: &Path,
    src: &Path,
    header: &[u8],
    out_dir: &Path,
) -> Result<PathBuf, String> {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or("bad file name")?;
    let fatbin = out_dir.join(format!("{stem}.fatbin"));
    let stamp = out_dir.join(format!("{stem}.fatbin.hash"));

    let source = fs::read(src).map_err(|e| e.to_string())?;
    let mut hasher = DefaultHasher::new();
    source.hash(&mut hasher);
    header.hash(&mut hasher);
    GENCODE.hash(&mut hasher);
    NVCC_FLAGS.hash(&mut hasher);
    nvcc.hash(&mut hasher);
    let key = format!("{:016x}", hasher.finish());
    if fatbin.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == key) {
        return Ok(fatbin);
    }

    let output = Command::new(nvcc)
        .arg("-fatbin")
        .args(GENCODE)
        .args(NVCC_FLAGS)
        .arg("-I")
        .arg(kernel_dir)
        .arg("-o")
        .arg(&fatbin)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "{stderr}{}",
            String::from_utf8_lossy(&output.stdout)
        ));
    }
    report_spills(stem, &stderr);
    fs::write(&stamp, key).map_err(|e| e.to_string())?;
    Ok(fatbin)
}

/// `ptxas info : Function properties for X` is followed by
/// `N bytes stack frame, S bytes spill stores, L bytes spill loads`.
fn report_spills(stem: &str, ptxas_log: &str) {
    let mut function = "";
    let mut arch = "";
    for line in ptxas_log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            function = rest.split('\'').next().unwrap_or("");
            arch = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or("");
        }
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            function = rest.trim();
        }
        if line.contains("spill stores") {
            let stores = number_before(line, "bytes spill stores");
            let loads = number_before(line, "bytes spill loads");
            if stores > 0 || loads > 0 {
                println!(
                    "cargo:warning=kernels/{stem}.cu: {function} ({arch}) spills {stores} B stores / {loads} B loads"
                );
            }
        }
    }
}

fn number_before(line: &str, marker: &str) -> u64 {
    line.split(marker)
        .next()
        .and_then(|head| {
            head.split(|c: char| !c.is_ascii_digit())
                .rfind(|s| !s.is_empty())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn write_kernel_table(
    out_dir: &Path,
    kernel_dir: &Path,
    sources: &[PathBuf],
    fatbins: &[Option<PathBuf>],
) {
    let mut table = String::from("// Generated by build.rs: one entry per kernels/*.cu.\n");
    let header_path = kernel_dir.join(COMMON_HEADER);
    if header_path.exists() {
        let _ = writeln!(
            table,
            "pub static COMMON_HEADER: &str = include_str!({:?});",
            header_path.display().to_string()
        );
    } else {
        table.push_str("pub static COMMON_HEADER: &str = \"\";\n");
    }
    table.push_str("pub static EMBEDDED_KERNELS: &[EmbeddedKernel] = &[\n");
    for (src, fatbin) in sources.iter().zip(fatbins) {
        let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let fatbin_expr = match fatbin {
            Some(p) => format!("Some(include_bytes!({:?}))", p.display().to_string()),
            None => "None".to_string(),
        };
        let _ = writeln!(
            table,
            "    EmbeddedKernel {{ family: {stem:?}, fatbin: {fatbin_expr}, source: include_str!({:?}) }},",
            src.display().to_string()
        );
    }
    table.push_str("];\n");
    fs::write(out_dir.join("kernels.rs"), table).expect("OUT_DIR is writable");
}
