//! Loss curves as a PNG, drawn with plotters into an in-memory RGB buffer and written
//! atomically (temp file, rename), so a viewer never sees a half-written image.
//!
//! Text is rendered with a shipped font (`fonts/DejaVuSans-ascii.ttf`, see its README), so no
//! system font library is needed.

use super::metrics::StepMetrics;
use crate::error::{Error, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::collections::BTreeMap;
use std::path::Path;

const FONT: &[u8] = include_bytes!("fonts/DejaVuSans-ascii.ttf");
const FAMILY: &str = "sans-serif";
/// Image size in pixels.
pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 720;

fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "the shipped plot font could not be read".into(),
        ))
    }
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("drawing the loss curves failed: {e}"))
}

/// A named series of (step, value) points; non-finite values are left out.
type Series = Vec<(String, Vec<(f64, f64)>)>;

fn collect(records: &[StepMetrics], pick: impl Fn(&StepMetrics) -> Vec<(String, f64)>) -> Series {
    let mut by_name: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        for (name, v) in pick(r) {
            let points = by_name.entry(name).or_default();
            if v.is_finite() {
                points.push((r.step as f64, v));
            }
        }
    }
    by_name.into_iter().collect()
}

fn range(series: &Series, pick: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (_, points) in series {
        for p in points {
            lo = lo.min(pick(p));
            hi = hi.max(pick(p));
        }
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let pad = lo.abs().max(1e-3) * 0.05;
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    series: &Series,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (x0, x1) = range(series, |p| p.0);
    let (y0, y1) = range(series, |p| p.1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(plot_error)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_error)?;
    }
    Ok(())
}

/// A tick label: plain for ordinary magnitudes, scientific for tiny or huge ones.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-2..1e4).contains(&a) {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

/// Renders the loss curves (every loss term, top) and the learning rate (bottom) as PNG bytes.
pub fn render_png(records: &[StepMetrics], title: &str) -> Result<Vec<u8>> {
    register_font()?;
    let losses = collect(records, |r| {
        r.losses.iter().map(|(k, v)| (k.clone(), *v)).collect()
    });
    let lr = collect(records, |r| {
        vec![
            ("lr".into(), r.lr),
            ("last_layer_lr".into(), r.last_layer_lr),
        ]
    });
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (top, bottom) = root.split_vertically(HEIGHT * 2 / 3);
        draw_panel(&top, title, "loss", &losses)?;
        draw_panel(&bottom, "learning rate", "lr", &lr)?;
        root.present().map_err(plot_error)?;
    }
    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb)
        .ok_or_else(|| plot_error("the pixel buffer has the wrong size"))?;
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(plot_error)?;
    Ok(png)
}

/// Draws the curves and replaces `path` atomically.
pub fn write_png(records: &[StepMetrics], title: &str, path: &Path) -> Result<()> {
    let png = render_png(records, title)?;
    crate::io::write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_with_curves_and_text() {
        let records: Vec<StepMetrics> = (0..50)
            .map(|s| StepMetrics {
                step: s,
                losses: [
                    ("dino".to_string(), 8.0 - 0.1 * s as f64),
                    ("koleo".to_string(), if s == 7 { f64::NAN } else { -0.5 }),
                ]
                .into_iter()
                .collect(),
                lr: 1e-3 * s as f64 / 50.0,
                ..Default::default()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss_curves.png");
        write_png(&records, "demo run", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // Lines and labels put many non-white pixels in the top panel.
        let dark = img
            .enumerate_pixels()
            .filter(|(_, y, p)| *y < HEIGHT * 2 / 3 && p.0.iter().any(|&c| c < 128))
            .count();
        assert!(dark > 2000, "{dark}");
        // The caption's glyphs: dark pixels in the title band.
        let title = img
            .enumerate_pixels()
            .filter(|(_, y, p)| *y < 34 && p.0.iter().all(|&c| c < 100))
            .count();
        assert!(title > 20, "{title}");
        // No records still gives an image.
        assert!(!render_png(&[], "empty").unwrap().is_empty());
    }
}
