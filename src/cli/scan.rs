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
use dinotrain::data::scan::{scan_folder, ScanOptions, ScanResult};
use dinotrain::data::ImageFormat;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Exit code when some image files are unreadable.
pub const EXIT_SOME_UNREADABLE: u8 = 3;
/// Exit code when no image file is readable (or there is none).
pub const EXIT_NONE_READABLE: u8 = 4;

/// Upper bounds (exclusive) of the shorter-side buckets of the size histogram.
const SIDE_BUCKETS: [u32; 7] = [32, 64, 128, 224, 512, 1024, 2048];

/// What the scan found, ready to print.
struct Report<'a> {
    dir: &'a Path,
    listed_seconds: f64,
    found: &'a ScanResult,
    by_format: BTreeMap<ImageFormat, (usize, usize)>,
    sizes: Vec<(u32, u32)>,
    unreadable: Vec<(&'a Path, String, &'static str)>,
}

/// Scans `dir` and prints the report; see the module doc for the exit codes.
pub fn scan(dir: &Path, max_pixels: u64) -> anyhow::Result<ExitCode> {
    let start = std::time::Instant::now();
    let found = scan_folder(dir, &ScanOptions::default())?;
    let listed_seconds = start.elapsed().as_secs_f64();
    let results: Vec<Result<(u32, u32), DecodeError>> = found
        .entries
        .par_iter()
        .map(|e| {
            decode_file(&e.path, e.format, max_pixels, None).map(|img| (img.width, img.height))
        })
        .collect();
    let mut report = Report {
        dir,
        listed_seconds,
        found: &found,
        by_format: BTreeMap::new(),
        sizes: Vec::new(),
        unreadable: Vec::new(),
    };
    for (e, r) in found.entries.iter().zip(&results) {
        let slot = report.by_format.entry(e.format).or_default();
        slot.0 += 1;
        match r {
            Ok(wh) => {
                slot.1 += 1;
                report.sizes.push(*wh);
            }
            Err(err) => report
                .unreadable
                .push((e.path.as_path(), err.to_string(), err.kind())),
        }
    }
    let code = if report.sizes.is_empty() {
        EXIT_NONE_READABLE
    } else if !report.unreadable.is_empty() || !found.unreadable.is_empty() {
        EXIT_SOME_UNREADABLE
    } else {
        0
    };
    match print_report(&mut std::io::stdout().lock(), &mut report) {
        // A closed pipe (`dinotrain scan DIR | head`) is the reader's choice, not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(ExitCode::from(code))
}

fn print_report(out: &mut impl Write, r: &mut Report) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} image files listed in {:.2} s ({} other files, {} folders reached twice through links)",
        r.dir.display(),
        r.found.entries.len(),
        r.listed_seconds,
        r.found.other_files,
        r.found.repeated_dirs
    )?;
    writeln!(out, "{:<8} {:>10} {:>10}", "format", "files", "readable")?;
    for (f, (n, ok)) in &r.by_format {
        writeln!(out, "{:<8} {n:>10} {ok:>10}", f.to_string())?;
    }
    if !r.sizes.is_empty() {
        print_sizes(out, &mut r.sizes)?;
    }
    for s in &r.found.unreadable {
        writeln!(out, "unreadable entry {}: {}", s.path.display(), s.reason)?;
    }
    if !r.unreadable.is_empty() {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, _, k) in &r.unreadable {
            *kinds.entry(k).or_default() += 1;
        }
        let summary: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        writeln!(
            out,
            "unreadable images: {} ({})",
            r.unreadable.len(),
            summary.join(", ")
        )?;
        for (path, reason, _) in &r.unreadable {
            writeln!(out, "  {}: {reason}", path.display())?;
        }
    }
    let readable = r.sizes.len();
    if readable == 0 {
        writeln!(out, "no readable image: training would not start")
    } else if !r.unreadable.is_empty() || !r.found.unreadable.is_empty() {
        writeln!(
            out,
            "{readable} readable images; training skips the unreadable ones"
        )
    } else {
        writeln!(out, "all {readable} images are readable")
    }
}

fn print_sizes(out: &mut impl Write, sizes: &mut [(u32, u32)]) -> std::io::Result<()> {
    let stat = |v: &mut Vec<u32>| {
        v.sort_unstable();
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (w0, wm, w1) = stat(&mut sizes.iter().map(|s| s.0).collect());
    let (h0, hm, h1) = stat(&mut sizes.iter().map(|s| s.1).collect());
    writeln!(out, "width  min {w0} median {wm} max {w1}")?;
    writeln!(out, "height min {h0} median {hm} max {h1}")?;
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
    writeln!(out, "{}", line.trim_end_matches(';'))
}
