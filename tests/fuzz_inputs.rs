//! A seeded mutation loop over the entry points that read a user's files (issue 17): safetensors
//! and `.pth` weights, YAML configurations, images of every format. Each mutated input must
//! give a value or an error, never a panic (nor an abort, which would end this test binary).
//! Bounded for CI: 4,000 inputs per entry point (`DINOTRAIN_FUZZ_ITERATIONS`) or 4 seconds
//! of mutation each (`DINOTRAIN_FUZZ_SECONDS`), whichever ends first; a failing input is
//! written to `target/tmp/fuzz-failures/` and named in the failure. A longer hunt:
//! `DINOTRAIN_FUZZ_ITERATIONS=1000000 DINOTRAIN_FUZZ_SECONDS=600 cargo test --release --test
//! fuzz_inputs`.

use dinotrain::data::decode::{decode, DEFAULT_MAX_PIXELS};
use dinotrain::data::ImageFormat;
use dinotrain::io::pth::read_pth_bytes;
use dinotrain::io::TensorFile;
use dinotrain::tensor::Tensor;
use dinotrain::train::config::{ConfigBuilder, Preset};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Inputs per entry point even past the time budget.
const MIN_INPUTS: usize = 500;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One to four random edits: bit flips, bytes set to random or boundary values, a large
/// little-endian length written over 8 bytes, truncation, insertion, deletion, duplication.
/// Half the positions fall in the first 512 or the last 1024 bytes, where the headers of the
/// formats here live (a zip's central directory is at its end).
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let n = b.len();
        let at = match rng.random_range(0..4) {
            0 => rng.random_range(0..n.min(512)),
            1 => n - 1 - rng.random_range(0..n.min(1024)),
            _ => rng.random_range(0..n),
        };
        match rng.random_range(0..8) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b[at] = rng.random(),
            2 => b[at] = [0x00, 0xff, 0x7f, 0x80, b'0', b'-'][rng.random_range(0..6)],
            3 => {
                let big = [u64::MAX, 1 << 40, u32::MAX as u64 + 1, 0][rng.random_range(0..4)];
                for (i, byte) in big.to_le_bytes().iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = *byte;
                    }
                }
            }
            4 => b.truncate(at),
            5 => {
                let extra: Vec<u8> = (0..rng.random_range(1..32)).map(|_| rng.random()).collect();
                b.splice(at..at, extra);
            }
            6 => {
                let end = (at + rng.random_range(1..64)).min(n);
                b.drain(at..end);
            }
            _ => {
                let end = (at + rng.random_range(1..64)).min(n);
                let copy = b[at..end].to_vec();
                let to = rng.random_range(0..=b.len());
                b.splice(to..to, copy);
            }
        }
    }
    b
}

/// Mutates `seeds` and feeds each input to `read` (whose result is ignored: an error is
/// fine); panics with the saved input's path when `read` panics.
fn fuzz(name: &str, seeds: &[Vec<u8>], read: &dyn Fn(&[u8])) {
    assert!(!seeds.is_empty(), "{name}: no seed input");
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let iterations: usize = env_or("DINOTRAIN_FUZZ_ITERATIONS", 4000);
    let budget = Duration::from_secs_f64(env_or("DINOTRAIN_FUZZ_SECONDS", 4.0));
    let start = Instant::now();
    let mut done = 0;
    // At least MIN_INPUTS whatever the clock says, so a slow machine still fuzzes.
    while done < iterations && (done < MIN_INPUTS || start.elapsed() < budget) {
        let input = mutate(&mut rng, &seeds[done % seeds.len()]);
        if catch_unwind(AssertUnwindSafe(|| read(&input))).is_err() {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{name}-{done}.bin"));
            std::fs::write(&path, &input).unwrap();
            panic!("{name}: input {done} panicked; saved as {}", path.display());
        }
        done += 1;
    }
    println!(
        "{name}: {done} mutated inputs in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

fn files(dir: &str, keep: impl Fn(&Path) -> bool) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| keep(p))
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn mutated_safetensors_files_are_errors_not_panics() {
    let mut f = TensorFile::default();
    f.insert("a.weight", Tensor::from_vec(&[2, 3], vec![1.0; 6]).unwrap());
    f.insert("b", Tensor::from_vec(&[4], vec![0.5; 4]).unwrap());
    f.metadata.insert("format".into(), "x".into());
    let seeds = [f.to_bytes().unwrap()];
    fuzz("safetensors", &seeds, &|bytes| {
        let _ = TensorFile::from_bytes(bytes, Path::new("fuzz.safetensors"));
    });
}

#[test]
fn mutated_pth_files_are_errors_not_panics() {
    let seeds = files("tests/golden/weights", |p| {
        p.file_name()
            .is_some_and(|n| n == "vit_forward-reg0-s0.pth")
    });
    fuzz("pth", &seeds, &|bytes| {
        let _ = read_pth_bytes(bytes, Path::new("fuzz.pth"));
    });
}

#[test]
fn mutated_yaml_configs_are_errors_not_panics() {
    let seeds = files("tests/data/configs", |p| {
        p.extension().is_some_and(|e| e == "yaml")
    });
    fuzz("yaml", &seeds, &|bytes| {
        let text = String::from_utf8_lossy(bytes);
        let mut b = ConfigBuilder::new(Preset::Demo).unwrap();
        if b.yaml(&text, "fuzz.yaml").is_ok() {
            if let Ok((config, warnings)) = b.build() {
                let _ = dinotrain::train::config::ResolvedConfig::resolve(config, warnings);
            }
        }
    });
}

#[test]
fn mutated_images_are_errors_not_panics() {
    let seeds = files("tests/data/kinds", |p| {
        p.is_file() && p.extension().is_some_and(|e| e != "md")
    });
    fuzz("image", &seeds, &|bytes| {
        let _ = decode(bytes, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None);
    });
}
