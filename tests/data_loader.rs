//! The loader (order, layout, resume, bad files), the folder source, the decoded-image cache
//! and the embedded demo dataset.

use dinotrain::data::augment::multi_crop;
use dinotrain::data::cache::DecodedCache;
use dinotrain::data::decode::{DecodeError, DEFAULT_MAX_PIXELS};
use dinotrain::data::demo::{demo_split, Split, CLASS_NAMES};
use dinotrain::data::scan::{scan_folder, ImageEntry, ScanOptions};
use dinotrain::data::{
    Batch, DecodeOptions, FolderSource, ImageFormat, ImageSource, Loader, LoaderConfig,
    MultiCropConfig, RgbImage,
};
use dinotrain::rng::{keyed, stream};
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Synthetic images; the indices in `bad` fail to load.
struct Synthetic {
    n: usize,
    bad: HashSet<usize>,
}

impl ImageSource for Synthetic {
    fn len(&self) -> usize {
        self.n
    }
    fn load(&self, index: usize) -> Result<RgbImage, DecodeError> {
        if self.bad.contains(&index) {
            return Err(DecodeError::Empty);
        }
        let (w, h) = (20 + index as u32 % 7, 18 + index as u32 % 5);
        let data = (0..w * h * 3)
            .map(|i| (i as usize * 31 + index * 57) as u8)
            .collect();
        Ok(RgbImage {
            width: w,
            height: h,
            data,
        })
    }
    fn name(&self, index: usize) -> String {
        format!("synthetic-{index}")
    }
    fn label(&self, index: usize) -> Option<u32> {
        Some(index as u32 % 3)
    }
}

fn crops() -> MultiCropConfig {
    MultiCropConfig {
        global_size: 16,
        local_size: 8,
        n_local: 3,
        ..MultiCropConfig::default()
    }
}

fn config(workers: usize) -> LoaderConfig {
    LoaderConfig {
        crops: crops(),
        workers,
        prefetch: 2,
        max_warnings: 5,
    }
}

fn batches(
    source: Arc<dyn ImageSource>,
    workers: usize,
    b: usize,
    seed: u64,
    start: u64,
    count: usize,
) -> Vec<Batch> {
    let mut loader = Loader::new(source, config(workers), b, seed, start).unwrap();
    (0..count).map(|_| loader.next_batch().unwrap()).collect()
}

#[test]
fn batches_are_crop_major_and_match_multi_crop_of_each_image() {
    let source = Arc::new(Synthetic {
        n: 10,
        bad: HashSet::new(),
    });
    let b = 4;
    let cfg = crops();
    for batch in batches(source.clone(), 2, b, 5, 0, 4) {
        assert_eq!(batch.global.len(), 2 * b * cfg.global_len());
        assert_eq!(batch.local.len(), 3 * b * cfg.local_len());
        assert_eq!(batch.indices.len(), b);
        assert_eq!(batch.epoch, batch.step * b as u64 / 10);
        for (i, &index) in batch.indices.iter().enumerate() {
            let epoch = (batch.step * b as u64 + i as u64) / 10;
            let mut g = vec![0f32; 2 * cfg.global_len()];
            let mut l = vec![0f32; 3 * cfg.local_len()];
            let mut gs: Vec<&mut [f32]> = g.chunks_exact_mut(cfg.global_len()).collect();
            let mut ls: Vec<&mut [f32]> = l.chunks_exact_mut(cfg.local_len()).collect();
            let mut rng = keyed(5, &[stream::CROPS, epoch, index as u64]);
            multi_crop(
                &source.load(index).unwrap(),
                &cfg,
                &mut rng,
                &mut gs,
                &mut ls,
            )
            .unwrap();
            for c in 0..2 {
                let row = &batch.global[(c * b + i) * cfg.global_len()..][..cfg.global_len()];
                assert_eq!(row, &g[c * cfg.global_len()..][..cfg.global_len()]);
            }
            for c in 0..3 {
                let row = &batch.local[(c * b + i) * cfg.local_len()..][..cfg.local_len()];
                assert_eq!(row, &l[c * cfg.local_len()..][..cfg.local_len()]);
            }
        }
    }
}

#[test]
fn each_epoch_is_a_shuffled_permutation_and_epochs_differ() {
    let source = Arc::new(Synthetic {
        n: 12,
        bad: HashSet::new(),
    });
    let all = batches(source, 3, 4, 9, 0, 6);
    let epoch = |e: usize| -> Vec<usize> {
        all[e * 3..e * 3 + 3]
            .iter()
            .flat_map(|b| b.indices.clone())
            .collect()
    };
    for e in 0..2 {
        let mut sorted = epoch(e);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>());
        assert_eq!(all[e * 3].epoch, e as u64);
    }
    assert_ne!(epoch(0), epoch(1));
    assert_ne!(epoch(0), (0..12).collect::<Vec<_>>());
}

#[test]
fn a_resumed_loader_yields_exactly_the_uninterrupted_batches() {
    // 10 images, batch 4: batches straddle epochs, which is where resume bugs live.
    let source = Arc::new(Synthetic {
        n: 10,
        bad: HashSet::new(),
    });
    let full = batches(source.clone(), 2, 4, 3, 0, 8);
    let resumed = batches(source.clone(), 1, 4, 3, 5, 3);
    for (a, b) in full[5..].iter().zip(&resumed) {
        assert_eq!((a.step, a.epoch, &a.indices), (b.step, b.epoch, &b.indices));
        assert_eq!(a.global, b.global);
        assert_eq!(a.local, b.local);
    }
    // Another seed: another order.
    let other = batches(source, 2, 4, 4, 0, 1);
    assert_ne!(other[0].indices, full[0].indices);
}

#[test]
fn unreadable_images_are_replaced_and_counted() {
    let bad: HashSet<usize> = [0, 3, 7].into_iter().collect();
    let source = Arc::new(Synthetic {
        n: 9,
        bad: bad.clone(),
    });
    let mut loader = Loader::new(source, config(2), 3, 1, 0).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..6 {
        let batch = loader.next_batch().unwrap();
        assert_eq!(batch.indices.len(), 3);
        assert!(batch.global.iter().all(|v| v.is_finite()));
        for i in &batch.indices {
            assert!(!bad.contains(i));
            seen.insert(*i);
        }
        loader.recycle(batch);
    }
    // Two epochs of 9 samples, 3 bad each time (workers running ahead may have met more).
    assert_eq!((loader.bad_in_epoch(0), loader.bad_in_epoch(1)), (3, 3));
    assert!(loader.bad_images() >= 6);
    assert!(seen.len() >= 5);
    assert!(loader.wait_seconds() >= 0.0);
}

#[test]
fn a_source_without_a_readable_image_is_an_error_before_training() {
    let source = Arc::new(Synthetic {
        n: 4,
        bad: (0..4).collect(),
    });
    let err = Loader::new(source, config(1), 2, 0, 0).err().unwrap();
    assert!(err.to_string().contains("none of the 4 images"), "{err}");
    let empty = Arc::new(Synthetic {
        n: 0,
        bad: HashSet::new(),
    });
    assert!(Loader::new(empty, config(1), 2, 0, 0).is_err());
    let ok = Arc::new(Synthetic {
        n: 4,
        bad: HashSet::new(),
    });
    assert!(Loader::new(ok.clone(), config(1), 0, 0, 0).is_err());
    let mut bad_crops = config(1);
    bad_crops.crops.n_global = 0;
    assert!(Loader::new(ok, bad_crops, 2, 0, 0).is_err());
}

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

#[test]
fn folder_source_trains_through_a_folder_of_good_and_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("kinds/baseline.jpg", "a.jpg"),
        ("kinds/gray16.png", "b.png"),
        ("kinds/cmyk.jpg", "c.jpg"),
        ("bad/truncated.jpg", "d.jpg"),
        ("bad/text.jpg", "e.jpg"),
        ("bad/bomb.png", "f.png"),
    ] {
        std::fs::copy(data(from), tmp.path().join(to)).unwrap();
    }
    let source = FolderSource::open(
        tmp.path(),
        &ScanOptions::default(),
        DecodeOptions::default(),
    )
    .unwrap();
    assert_eq!(source.len(), 6);
    assert!(source.name(3).ends_with("d.jpg"));
    let mut loader = Loader::new(Arc::new(source), config(2), 4, 0, 0).unwrap();
    for _ in 0..4 {
        let batch = loader.next_batch().unwrap();
        assert!(batch.indices.iter().all(|&i| i < 3), "{:?}", batch.indices);
    }
    // 16 samples: epochs 0 and 1 complete, each with the 3 bad files.
    assert_eq!((loader.bad_in_epoch(0), loader.bad_in_epoch(1)), (3, 3));

    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("notes.txt"), "x").unwrap();
    assert!(FolderSource::open(
        empty.path(),
        &ScanOptions::default(),
        DecodeOptions::default()
    )
    .is_err());
}

#[test]
fn decoded_cache_is_built_once_downscaled_and_rebuilt_when_the_folder_changes() {
    let folder = tempfile::tempdir().unwrap();
    for name in ["astronaut.jpg", "rocket.jpg"] {
        std::fs::copy(data(&format!("photos/{name}")), folder.path().join(name)).unwrap();
    }
    std::fs::copy(data("bad/empty.jpg"), folder.path().join("zzz.jpg")).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let entries = || -> Vec<ImageEntry> {
        scan_folder(folder.path(), &ScanOptions::default())
            .unwrap()
            .entries
    };
    // Two runs building the same cache at once both succeed and agree.
    let (a, b) = std::thread::scope(|s| {
        let t1 = s.spawn(|| {
            DecodedCache::open_or_build(cache_dir.path(), &entries(), 200, DEFAULT_MAX_PIXELS)
                .unwrap()
        });
        let t2 = s.spawn(|| {
            DecodedCache::open_or_build(cache_dir.path(), &entries(), 200, DEFAULT_MAX_PIXELS)
                .unwrap()
        });
        (t1.join().unwrap(), t2.join().unwrap())
    });
    assert_eq!(a.path, b.path);
    assert_eq!(a.len(), 3);
    let astronaut = a.load(0).unwrap();
    assert_eq!((astronaut.width, astronaut.height), (267, 200));
    let rocket = a.load(1).unwrap();
    assert_eq!((rocket.width, rocket.height), (267, 200));
    assert_eq!(b.load(1).unwrap(), rocket);
    assert!(a.load(2).unwrap_err().to_string().contains("empty file"));
    assert!(a.load(3).is_err());
    // The cached image is the full decode, downscaled.
    let full = dinotrain::data::decode_file(
        &entries()[0].path,
        ImageFormat::Jpeg,
        DEFAULT_MAX_PIXELS,
        None,
    )
    .unwrap();
    let small = dinotrain::data::cache::downscale_to_short_side(full, 200);
    let mean_diff = small
        .data
        .iter()
        .zip(&astronaut.data)
        .map(|(&x, &y)| x.abs_diff(y) as f64)
        .sum::<f64>()
        / small.data.len() as f64;
    // Both builds decode DCT-scaled first (to 250x188 here), then downscale.
    assert!(mean_diff < 3.0, "{mean_diff}");
    // Same folder: same file, not rebuilt.
    let modified = std::fs::metadata(&a.path).unwrap().modified().unwrap();
    let again =
        DecodedCache::open_or_build(cache_dir.path(), &entries(), 200, DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!(again.path, a.path);
    assert_eq!(
        std::fs::metadata(&again.path).unwrap().modified().unwrap(),
        modified
    );
    // A changed folder gets a new cache.
    std::fs::copy(
        data("photos/chelsea.jpg"),
        folder.path().join("chelsea.jpg"),
    )
    .unwrap();
    let changed =
        DecodedCache::open_or_build(cache_dir.path(), &entries(), 200, DEFAULT_MAX_PIXELS).unwrap();
    assert_ne!(changed.path, a.path);
    assert_eq!(changed.len(), 4);
    // A damaged cache file is refused with an error, not a crash.
    let broken = cache_dir.path().join("broken.bin");
    std::fs::write(&broken, b"DTCACHE1\xff\xff\xff\xff\xff\xff\xff\x0f").unwrap();
    assert!(DecodedCache::open(&broken).is_err());

    // Through the folder source.
    let source = FolderSource::open(
        folder.path(),
        &ScanOptions::default(),
        DecodeOptions::default(),
    )
    .unwrap()
    .with_cache(cache_dir.path(), 200)
    .unwrap();
    assert_eq!(
        source
            .load(1)
            .unwrap()
            .height
            .min(source.load(1).unwrap().width),
        200
    );
}

/// Label counts read straight from the embedded gzipped IDX file, independently of the reader.
fn histogram_from_file(name: &str) -> [usize; 10] {
    let gz = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/data/demo")
            .join(name),
    )
    .unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    let mut h = [0usize; 10];
    for &l in &raw[8..] {
        h[l as usize] += 1;
    }
    h
}

#[test]
fn demo_data_has_the_documented_sizes_and_label_histograms() {
    for (split, n, labels) in [
        (Split::Train, 10_000, "train-labels-idx1-ubyte.gz"),
        (Split::Test, 2_000, "test-labels-idx1-ubyte.gz"),
    ] {
        let d = demo_split(split).unwrap();
        assert_eq!(d.len(), n);
        assert_eq!((d.rows, d.cols), (28, 28));
        assert_eq!(d.pixels.len(), n * 784);
        assert_eq!(d.class_names.len(), 10);
        assert_eq!(d.class_names[9], CLASS_NAMES[9]);
        let mut h = [0usize; 10];
        for i in 0..n {
            h[d.label(i).unwrap() as usize] += 1;
        }
        assert_eq!(h, histogram_from_file(labels));
        // Fashion-MNIST: every class present, none dominant.
        assert!(h.iter().all(|&c| c > n / 20 && c < n / 5), "{h:?}");
        let img = d.load(n - 1).unwrap();
        assert_eq!((img.width, img.height), (28, 28));
        let gray = d.gray(n - 1);
        for (i, p) in img.data.chunks_exact(3).enumerate() {
            assert_eq!(p, [gray[i]; 3]);
        }
        assert!(gray.iter().any(|&v| v > 0));
        assert!(d.load(n).is_err());
    }
}

#[test]
fn the_demo_source_feeds_the_loader() {
    let d = Arc::new(demo_split(Split::Test).unwrap());
    let cfg = LoaderConfig {
        crops: MultiCropConfig {
            global_size: 32,
            local_size: 16,
            n_local: 8,
            ..MultiCropConfig::default()
        },
        workers: 2,
        prefetch: 2,
        max_warnings: 5,
    };
    let mut loader = Loader::new(d, cfg, 64, 0, 0).unwrap();
    let batch = loader.next_batch().unwrap();
    assert_eq!(batch.global.len(), 2 * 64 * 3 * 32 * 32);
    assert_eq!(batch.local.len(), 8 * 64 * 3 * 16 * 16);
    assert_eq!(loader.bad_images(), 0);
}
