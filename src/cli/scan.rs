//! `dinotrain scan DIR`: what a training run would find in a folder.
//!
//! Lists the image files (recursively, following symlinks), decodes every one of them in
//! parallel, and prints counts by format, the distribution of image sizes and every unreadable
//! file with its reason.
//!
//! Exit codes: 0 every image file is readable; 3 some files are unreadable (training skips
//! them); 4 no readable image at all (training would refuse to start); 2 the scan itself failed
//! (missing folder, ...).

use dinotrain::data::decode::{decode_file, DecodeError};
use dinotrain::data::scan::{scan_folder, ScanOptions};
use dinotrain::data::ImageFormat;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

/// Exit code when some image files are unreadable.
pub const EXIT_SOME_UNREADABLE: u8 = 3;
/// Exit code when no image file is readable (or there is none).
pub const EXIT_NONE_READABLE: u8 = 4;

/// Upper bounds (exclusive) of the shorter-side buckets of the size histogram.
const SIDE_BUCKETS: [u32; 7] = [32, 64, 128, 224, 512, 1024, 2048];

/// Scans `dir` and prints the report; see the module doc for the exit codes.
pub fn scan(dir: &Path, max_pixels: u64) -> anyhow::Result<ExitCode> {
    let start = std::time::Instant::now();
    let found = scan_folder(dir, &ScanOptions::default())?;
    let listed = start.elapsed().as_secs_f64();
    let results: Vec<Result<(u32, u32), DecodeError>> = found
        .entries
        .par_iter()
        .map(|e| {
            decode_file(&e.path, e.format, max_pixels, None).map(|img| (img.width, img.height))
        })
        .collect();

    println!(
        "{}: {} image files listed in {listed:.2} s ({} other files, {} folders reached twice through links)",
        dir.display(),
        found.entries.len(),
        found.other_files,
        found.repeated_dirs
    );
    let mut by_format: BTreeMap<ImageFormat, (usize, usize)> = BTreeMap::new();
    let mut sizes = Vec::new();
    let mut unreadable = Vec::new();
    for (e, r) in found.entries.iter().zip(&results) {
        let slot = by_format.entry(e.format).or_default();
        slot.0 += 1;
        match r {
            Ok(wh) => {
                slot.1 += 1;
                sizes.push(*wh);
            }
            Err(err) => unreadable.push((e.path.as_path(), err.to_string(), err.kind())),
        }
    }
    println!("{:<8} {:>10} {:>10}", "format", "files", "readable");
    for (f, (n, ok)) in &by_format {
        println!("{:<8} {n:>10} {ok:>10}", f.to_string());
    }
    if !sizes.is_empty() {
        print_sizes(&mut sizes);
    }
    for s in &found.unreadable {
        println!("unreadable entry {}: {}", s.path.display(), s.reason);
    }
    if !unreadable.is_empty() {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, _, k) in &unreadable {
            *kinds.entry(k).or_default() += 1;
        }
        let summary: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        println!(
            "unreadable images: {} ({})",
            unreadable.len(),
            summary.join(", ")
        );
        for (path, reason, _) in &unreadable {
            println!("  {}: {reason}", path.display());
        }
    }
    let readable = sizes.len();
    Ok(if readable == 0 {
        println!("no readable image: training would not start");
        ExitCode::from(EXIT_NONE_READABLE)
    } else if !unreadable.is_empty() || !found.unreadable.is_empty() {
        println!("{readable} readable images; training skips the unreadable ones");
        ExitCode::from(EXIT_SOME_UNREADABLE)
    } else {
        println!("all {readable} images are readable");
        ExitCode::SUCCESS
    })
}

fn print_sizes(sizes: &mut [(u32, u32)]) {
    let stat = |v: &mut Vec<u32>| {
        v.sort_unstable();
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (w0, wm, w1) = stat(&mut sizes.iter().map(|s| s.0).collect());
    let (h0, hm, h1) = stat(&mut sizes.iter().map(|s| s.1).collect());
    println!("width  min {w0} median {wm} max {w1}");
    println!("height min {h0} median {hm} max {h1}");
    let mut counts = [0usize; SIDE_BUCKETS.len() + 1];
    for &(w, h) in sizes.iter() {
        let short = w.min(h);
        let i = SIDE_BUCKETS
            .iter()
            .position(|&b| short < b)
            .unwrap_or(SIDE_BUCKETS.len());
        counts[i] += 1;
    }
    let mut line = String::from("shorter side:");
    let mut lo = 0;
    for (i, &n) in counts.iter().enumerate() {
        let label = match SIDE_BUCKETS.get(i) {
            Some(&hi) => format!("{lo}-{}", hi - 1),
            None => format!(">={lo}"),
        };
        if n > 0 {
            line.push_str(&format!(" {label}: {n};"));
        }
        lo = SIDE_BUCKETS.get(i).copied().unwrap_or(lo);
    }
    println!("{}", line.trim_end_matches(';'));
}
