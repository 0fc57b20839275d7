//! Data pipeline throughput on real 500x375 JPEGs (tests/data/photos): decode alone, the full
//! official multi-crop (2 x 224 + 8 x 96) alone, both together (one thread: images/s per core),
//! and the parallel loader (all cores).
//!
//!     cargo bench --bench data -- --warm-up-time 1 --measurement-time 3
//!     cargo bench --bench data --features turbojpeg -- --warm-up-time 1 --measurement-time 3

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dinotrain::data::augment::{multi_crop_with, Scratch};
use dinotrain::data::decode::{decode, jpeg_decoder_name, DEFAULT_MAX_PIXELS};
use dinotrain::data::scan::ScanOptions;
use dinotrain::data::source::needed_short_side;
use dinotrain::data::{
    DecodeOptions, FolderSource, ImageFormat, Loader, LoaderConfig, MultiCropConfig, RgbImage,
};
use dinotrain::rng::{keyed, stream};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PHOTOS: [&str; 4] = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"];

fn photos_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/photos")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(photos_dir().join(name)).expect("tests/data/photos is part of the repository")
}

fn decode_zune(jpeg: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
        .expect("photo decodes")
        .into_rgb8()
}

fn crop_all(
    scratch: &mut Scratch,
    img: &RgbImage,
    cfg: &MultiCropConfig,
    g: &mut [f32],
    l: &mut [f32],
    key: u64,
) {
    let mut gs: Vec<&mut [f32]> = g.chunks_exact_mut(cfg.global_len()).collect();
    let mut ls: Vec<&mut [f32]> = l.chunks_exact_mut(cfg.local_len()).collect();
    let mut rng = keyed(0, &[stream::CROPS, 0, key]);
    multi_crop_with(scratch, img, cfg, &mut rng, &mut gs, &mut ls).expect("valid shapes");
}

/// This thread's CPU time (Linux: `/proc/thread-self/schedstat`, nanoseconds on a CPU), or
/// `None` elsewhere. On a shared machine, images per CPU-second is what "per core" means.
fn thread_cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Runs `f` `iters` times and returns the CPU time it took (wall time where unavailable).
fn cpu_timed(iters: u64, mut f: impl FnMut()) -> Duration {
    let wall = Instant::now();
    let cpu = thread_cpu_time();
    for _ in 0..iters {
        f();
    }
    match (cpu, thread_cpu_time()) {
        (Some(a), Some(b)) => b - a,
        _ => wall.elapsed(),
    }
}

fn bench(c: &mut Criterion) {
    let jpegs: Vec<Vec<u8>> = PHOTOS.iter().map(|n| read(n)).collect();
    let progressive = read("coffee-progressive.jpg");
    let cfg = MultiCropConfig::default();
    let hint = needed_short_side(cfg.global_size, cfg.global_scale.0);
    let decoder = jpeg_decoder_name();

    let mut g = c.benchmark_group(format!("decode-500x375-{decoder}"));
    g.throughput(Throughput::Elements(jpegs.len() as u64));
    g.bench_function("baseline", |b| {
        b.iter(|| {
            for j in &jpegs {
                black_box(
                    decode(j, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None).expect("photo decodes"),
                );
            }
        })
    });
    g.bench_function(format!("baseline-hint-{hint}"), |b| {
        b.iter(|| {
            for j in &jpegs {
                black_box(
                    decode(j, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, Some(hint))
                        .expect("photo decodes"),
                );
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("progressive", |b| {
        b.iter(|| {
            black_box(
                decode(&progressive, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None)
                    .expect("photo decodes"),
            )
        })
    });
    g.finish();

    let images: Vec<RgbImage> = jpegs
        .iter()
        .map(|j| decode(j, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None).expect("photo decodes"))
        .collect();
    let mut scratch = Scratch::default();
    let mut gbuf = vec![0f32; cfg.n_global * cfg.global_len()];
    let mut lbuf = vec![0f32; cfg.n_local * cfg.local_len()];
    let mut g = c.benchmark_group(format!("multicrop-2x224-8x96-{decoder}"));
    g.throughput(Throughput::Elements(images.len() as u64));
    let mut key = 0u64;
    g.bench_function("augment-only", |b| {
        b.iter(|| {
            for img in &images {
                key += 1;
                crop_all(&mut scratch, img, &cfg, &mut gbuf, &mut lbuf, key);
            }
        })
    });
    g.bench_function("decode+augment", |b| {
        b.iter(|| {
            for j in &jpegs {
                key += 1;
                let img =
                    decode(j, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None).expect("photo decodes");
                crop_all(&mut scratch, &img, &cfg, &mut gbuf, &mut lbuf, key);
            }
        })
    });
    g.bench_function(format!("decode-hint-{hint}+augment"), |b| {
        b.iter(|| {
            for j in &jpegs {
                key += 1;
                let img = decode(j, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, Some(hint))
                    .expect("photo decodes");
                crop_all(&mut scratch, &img, &cfg, &mut gbuf, &mut lbuf, key);
            }
        })
    });
    // The same in CPU time of this thread: images per CPU-second, robust to a busy machine.
    g.bench_function("decode+augment-cpu-time", |b| {
        b.iter_custom(|iters| {
            cpu_timed(iters, || {
                for j in &jpegs {
                    key += 1;
                    let img = decode(j, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None)
                        .expect("photo decodes");
                    crop_all(&mut scratch, &img, &cfg, &mut gbuf, &mut lbuf, key);
                }
            })
        })
    });
    g.bench_function("augment-only-cpu-time", |b| {
        b.iter_custom(|iters| {
            cpu_timed(iters, || {
                for img in &images {
                    key += 1;
                    crop_all(&mut scratch, img, &cfg, &mut gbuf, &mut lbuf, key);
                }
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("decode-500x375-{decoder}"));
    g.throughput(Throughput::Elements(jpegs.len() as u64));
    g.bench_function("baseline-cpu-time", |b| {
        b.iter_custom(|iters| {
            cpu_timed(iters, || {
                for j in &jpegs {
                    black_box(
                        decode(j, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None)
                            .expect("photo decodes"),
                    );
                }
            })
        })
    });
    // zune-jpeg through the `image` crate (the default build's JPEG decoder before the libjpeg
    // code, still the CMYK path): the same files, so each build measures it alongside its own.
    g.bench_function("baseline-zune-jpeg-cpu-time", |b| {
        b.iter_custom(|iters| {
            cpu_timed(iters, || {
                for j in &jpegs {
                    black_box(decode_zune(j));
                }
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("progressive-cpu-time", |b| {
        b.iter_custom(|iters| {
            cpu_timed(iters, || {
                black_box(
                    decode(&progressive, ImageFormat::Jpeg, DEFAULT_MAX_PIXELS, None)
                        .expect("photo decodes"),
                );
            })
        })
    });
    g.bench_function("progressive-zune-jpeg-cpu-time", |b| {
        b.iter_custom(|iters| {
            cpu_timed(iters, || {
                black_box(decode_zune(&progressive));
            })
        })
    });
    g.finish();

    // The loader on all cores, batch 32, from the photo folder.
    let batch = 32;
    let mut g = c.benchmark_group(format!("loader-{decoder}"));
    g.throughput(Throughput::Elements(batch as u64));
    g.sample_size(10);
    g.bench_function(
        format!("batch{batch}-{}threads", LoaderConfig::default().workers),
        |b| {
            // Built here so that its threads only run while this benchmark is selected.
            let source = FolderSource::open(
                &photos_dir(),
                &ScanOptions::default(),
                DecodeOptions::default(),
            )
            .expect("photo folder");
            let mut loader = Loader::new(Arc::new(source), LoaderConfig::default(), batch, 0, 0)
                .expect("loader starts");
            b.iter(|| {
                let batch = loader.next_batch().expect("batch");
                loader.recycle(black_box(batch));
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
