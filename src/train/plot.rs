//! `carp plot`: draws a run's `metrics.jsonl` as one PNG with two panels, the training losses
//! (loss, consistency, entropy) against the step and the k-NN top-1 (k = 20) against the step.
//!
//! The lines of `metrics.jsonl` this reads (other `type`s are skipped, so the file can grow new
//! record kinds without breaking the plot):
//! `{"type":"step","step":12,"epoch":0,"loss":4.1,"consistency":4.0,"entropy":0.1,...}` and
//! `{"type":"knn","step":100,"top1":[[10,0.71],[20,0.72],[100,0.70],[200,0.69]]}` ((k, accuracy)
//! pairs, accuracy a fraction). A missing or `null` metric (serde_json writes NaN as `null`) only
//! leaves a gap in its series.
//!
//! Drawing: plotters into an in-memory RGB buffer, encoded with the `png` crate. Text uses DejaVu
//! Sans, bundled in `assets/fonts` (licence beside it) and compiled into the binary, so the plot
//! needs no system fonts at run time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

use crate::error::{Error, Result};

/// Image size in pixels (width, height): two panels side by side.
pub const PLOT_SIZE: (u32, u32) = (1200, 500);
/// The k whose k-NN accuracy is plotted (SPEC.md reports k = 20).
pub const PLOT_KNN_K: u32 = 20;
/// File name used when `out` is a directory.
pub const PLOT_FILE: &str = "plot.png";

const FONT_BYTES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans.ttf"
));
const FONT: &str = "sans-serif";

/// One `"type":"step"` record: the losses of a training step (None where absent or null).
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: Option<f64>,
    pub consistency: Option<f64>,
    pub entropy: Option<f64>,
}

/// One `"type":"knn"` record: (k, top-1 accuracy) pairs measured at `step`.
#[derive(Clone, Debug, PartialEq)]
pub struct KnnRecord {
    pub step: u64,
    pub top1: Vec<(u32, f64)>,
}

/// The records of a `metrics.jsonl` that the plot uses, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    pub steps: Vec<StepRecord>,
    pub knn: Vec<KnnRecord>,
}

/// Reads `path` (a `metrics.jsonl`). Errors name the file and, for a bad line, its 1-based line
/// number; a file with neither step nor knn records is an error. Blank lines are skipped.
pub fn read_metrics(path: &Path) -> Result<RunMetrics> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut m = RunMetrics::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| Error::format(path, format!("line {}: {msg}", i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Some(kind) = v.get("type").and_then(Value::as_str) else {
            return Err(bad("no \"type\" string field".into()));
        };
        let step = || {
            v.get("step").and_then(Value::as_u64).ok_or_else(|| {
                bad(format!(
                    "{kind} record without a non-negative integer \"step\""
                ))
            })
        };
        match kind {
            "step" => {
                let num = |key: &str| v.get(key).and_then(Value::as_f64);
                m.steps.push(StepRecord {
                    step: step()?,
                    loss: num("loss"),
                    consistency: num("consistency"),
                    entropy: num("entropy"),
                });
            }
            "knn" => {
                let pairs = v
                    .get("top1")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("knn record without a \"top1\" array".into()))?;
                let mut top1 = Vec::with_capacity(pairs.len());
                for p in pairs {
                    let pair = p.as_array().filter(|a| a.len() == 2);
                    let k = pair
                        .and_then(|a| a[0].as_u64())
                        .and_then(|k| u32::try_from(k).ok());
                    let acc = pair.and_then(|a| a[1].as_f64());
                    match (k, acc) {
                        (Some(k), Some(acc)) => top1.push((k, acc)),
                        _ => {
                            return Err(bad(format!(
                                "knn \"top1\" entry {p} is not a [k, accuracy] pair"
                            )))
                        }
                    }
                }
                m.knn.push(KnnRecord {
                    step: step()?,
                    top1,
                });
            }
            _ => {} // other record kinds (config, epoch summaries, ...) are not plotted
        }
    }
    if m.steps.is_empty() && m.knn.is_empty() {
        return Err(Error::format(
            path,
            "no \"step\" or \"knn\" records to plot (is the run just starting?)",
        ));
    }
    Ok(m)
}

/// Plots `run_dir/metrics.jsonl` to a PNG of [`PLOT_SIZE`] and returns the path written: `out`
/// itself, or `out/plot.png` when `out` is an existing directory (pass the run directory to get
/// `run_dir/plot.png`).
pub fn plot_run(run_dir: &Path, out: &Path) -> Result<PathBuf> {
    let metrics = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let out = if out.is_dir() {
        out.join(PLOT_FILE)
    } else {
        out.to_path_buf()
    };
    let (w, h) = PLOT_SIZE;
    let mut rgb = vec![0u8; w as usize * h as usize * 3]; // (H, W, 3)
    draw(&metrics, &mut rgb).map_err(|e| Error::Msg(format!("carp plot: drawing failed: {e}")))?;
    write_png(&out, &rgb, w, h)?;
    Ok(out)
}

/// Registers the bundled font with plotters once per process.
fn ensure_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the bundled font assets/fonts/DejaVuSans.ttf could not be parsed".into())
    }
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Draws both panels into `rgb` (H, W, 3).
fn draw(m: &RunMetrics, rgb: &mut [u8]) -> DrawResult {
    ensure_font()?;
    let root = BitMapBackend::with_buffer(rgb, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(PLOT_SIZE.0 / 2);
    draw_losses(m, &left)?;
    draw_knn(m, &right)?;
    root.present()?;
    Ok(())
}

/// A chart with f64 axes (step, value) on the bitmap backend.
type Chart<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// (lo, hi) of the values, widened so a single value or a flat series still gets a visible range.
fn padded_range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = hi - lo;
    if span > 1e-12 {
        (lo - 0.05 * span, hi + 0.05 * span)
    } else {
        let pad = (lo.abs() * 0.05).max(0.5);
        (lo - pad, hi + pad)
    }
}

/// Step range over the records, widened by 1 on each side when there is a single step.
fn step_range(steps: impl Iterator<Item = u64>) -> (f64, f64) {
    let (lo, hi) = steps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    if lo >= hi {
        (lo as f64 - 1.0, hi as f64 + 1.0)
    } else {
        (lo as f64, hi as f64)
    }
}

/// Steps are integers: integral ticks get an integer label, fractional ticks (a range of one
/// or two steps) none.
fn step_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{:.0}", x)
    } else {
        String::new()
    }
}

/// A panel with only a caption and a message (nothing to plot there yet).
fn empty_panel(area: &Area, caption: &str, msg: &str) -> DrawResult {
    let area = area.titled(caption, (FONT, 24))?;
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        msg.to_string(),
        (w as i32 / 2 - 150, h as i32 / 2),
        (FONT, 18).into_font().color(&BLACK),
    ))?;
    Ok(())
}

/// Draws one series: a line through its points, plus a marker on each point when there are few
/// (so a single point is visible).
fn draw_series<'a>(
    chart: &mut Chart<'a>,
    pts: Vec<(f64, f64)>,
    colour: RGBColor,
    label: &str,
) -> DrawResult {
    if pts.is_empty() {
        return Ok(());
    }
    let markers = pts.len() <= 50;
    chart
        .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))?
        .label(label.to_string())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    if markers {
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, colour.filled())))?;
    }
    Ok(())
}

/// Reads one metric of a step record.
type StepField = fn(&StepRecord) -> Option<f64>;

fn draw_losses(m: &RunMetrics, area: &Area) -> DrawResult {
    let caption = "Training loss";
    let series: [(&str, RGBColor, StepField); 3] = [
        ("loss", RGBColor(31, 119, 180), |r| r.loss),
        ("consistency", RGBColor(255, 127, 14), |r| r.consistency),
        ("entropy", RGBColor(44, 160, 44), |r| r.entropy),
    ];
    let pts: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, _, get)| {
            m.steps
                .iter()
                .filter_map(|r| get(r).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
                .collect()
        })
        .collect();
    if pts.iter().all(Vec::is_empty) {
        return empty_panel(area, caption, "no training steps logged yet");
    }
    let (x0, x1) = step_range(pts.iter().flatten().map(|p| p.0 as u64));
    let (y0, y1) = padded_range(pts.iter().flatten().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&step_label)
        .y_desc("loss")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    for ((label, colour, _), p) in series.iter().zip(pts) {
        draw_series(&mut chart, p, *colour, label)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The k to plot: [`PLOT_KNN_K`] when any record has it, else the smallest k logged.
fn knn_k(m: &RunMetrics) -> Option<u32> {
    let all = || m.knn.iter().flat_map(|r| r.top1.iter().map(|p| p.0));
    if all().any(|k| k == PLOT_KNN_K) {
        Some(PLOT_KNN_K)
    } else {
        all().min()
    }
}

fn draw_knn(m: &RunMetrics, area: &Area) -> DrawResult {
    let Some(k) = knn_k(m) else {
        return empty_panel(area, "k-NN top-1", "no k-NN evaluations logged yet");
    };
    let caption = format!("k-NN top-1 (k={k})");
    let mut pts: Vec<(f64, f64)> = m
        .knn
        .iter()
        .filter_map(|r| {
            r.top1
                .iter()
                .find(|p| p.0 == k && p.1.is_finite())
                .map(|p| (r.step as f64, p.1))
        })
        .collect();
    if pts.is_empty() {
        return empty_panel(area, &caption, "no finite k-NN accuracies logged");
    }
    // Accuracies are fractions: shown in percent when they look like fractions.
    let percent = pts.iter().all(|p| (0.0..=1.0).contains(&p.1));
    if percent {
        for p in &mut pts {
            p.1 *= 100.0;
        }
    }
    let (x0, x1) = step_range(pts.iter().map(|p| p.0 as u64));
    let (y0, y1) = padded_range(pts.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(&caption, (FONT, 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&step_label)
        .y_desc(if percent {
            "top-1 accuracy (%)"
        } else {
            "top-1 accuracy"
        })
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    draw_series(&mut chart, pts, RGBColor(214, 39, 40), &format!("k={k}"))?;
    Ok(())
}

/// Writes rgb (H, W, 3) as an 8-bit RGB PNG at `path`.
fn write_png(path: &Path, rgb: &[u8], w: u32, h: u32) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| Error::format(path, format!("PNG encoding failed: {e}"));
    let mut writer = enc.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    fn write_metrics(dir: &Path, text: &str) {
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    }

    /// A run of 60 steps (losses decaying) with three k-NN evaluations and an unrelated record.
    fn synthetic_run() -> String {
        let mut s = String::from("{\"type\":\"config\",\"batch\":256}\n");
        for step in 0..60u64 {
            let t = step as f64;
            let (cons, ent) = (4.0 * (-t / 30.0).exp() + 1.0, 0.1 + 0.01 * (t / 7.0).sin());
            writeln!(
                s,
                "{{\"type\":\"step\",\"step\":{step},\"epoch\":{},\"loss\":{},\"consistency\":{cons},\
                 \"entropy\":{ent},\"lr\":0.5,\"teacher_momentum\":0.99,\"images_per_s\":120.0}}",
                step / 20,
                cons + ent
            )
            .unwrap();
            if step % 20 == 19 {
                let a = 0.3 + 0.1 * (step / 20) as f64;
                writeln!(
                    s,
                    "{{\"type\":\"knn\",\"step\":{step},\"top1\":[[10,{a}],[20,{}],[100,{a}],[200,{a}]]}}",
                    a + 0.01
                )
                .unwrap();
            }
        }
        s
    }

    /// Decodes a PNG: (width, height, rgb bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// Pixels in columns [x0, x1) that are coloured (not grey): drawn series, not text or axes.
    fn coloured_pixels(rgb: &[u8], w: u32, x0: u32, x1: u32) -> usize {
        rgb.chunks_exact(3)
            .enumerate()
            .filter(|(i, p)| {
                let x = (*i as u32) % w;
                x >= x0 && x < x1 && (p[0].abs_diff(p[1]) > 40 || p[1].abs_diff(p[2]) > 40)
            })
            .count()
    }

    /// Dark pixels in rows [0, rows): the panel captions (rendered text).
    fn dark_pixels_on_top(rgb: &[u8], w: u32, rows: u32) -> usize {
        rgb[..(w * rows * 3) as usize]
            .chunks_exact(3)
            .filter(|p| p.iter().all(|&c| c < 100))
            .count()
    }

    #[test]
    fn reads_step_and_knn_records() {
        let dir = tempfile::tempdir().unwrap();
        write_metrics(
            dir.path(),
            "{\"type\":\"step\",\"step\":12,\"epoch\":0,\"loss\":4.1,\"consistency\":4.0,\"entropy\":null}\n\
             \n\
             {\"type\":\"knn\",\"step\":100,\"top1\":[[10,0.71],[20,0.72]]}\n\
             {\"type\":\"epoch\",\"epoch\":0}\n",
        );
        let m = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(
            m.steps,
            vec![StepRecord {
                step: 12,
                loss: Some(4.1),
                consistency: Some(4.0),
                entropy: None
            }]
        );
        assert_eq!(
            m.knn,
            vec![KnnRecord {
                step: 100,
                top1: vec![(10, 0.71), (20, 0.72)]
            }]
        );
        assert_eq!(knn_k(&m), Some(20));
        let m2 = RunMetrics {
            steps: vec![],
            knn: vec![KnnRecord {
                step: 1,
                top1: vec![(200, 0.5), (10, 0.4)],
            }],
        };
        assert_eq!(knn_k(&m2), Some(10), "no k=20: the smallest k");
    }

    #[test]
    fn plots_a_run_to_a_png_of_the_right_size() {
        let dir = tempfile::tempdir().unwrap();
        write_metrics(dir.path(), &synthetic_run());
        // `out` a directory: the plot goes to out/plot.png.
        let out = plot_run(dir.path(), dir.path()).unwrap();
        assert_eq!(out, dir.path().join("plot.png"));
        let (w, h, rgb) = decode(&out);
        assert_eq!((w, h), PLOT_SIZE);
        assert_eq!(rgb.len(), (w * h * 3) as usize);
        // Not one flat colour, and each panel has its coloured series drawn.
        assert!(rgb.chunks_exact(3).any(|p| p != &rgb[..3]), "flat image");
        assert!(
            coloured_pixels(&rgb, w, 0, w / 2) > 500,
            "loss panel has no series"
        );
        assert!(
            coloured_pixels(&rgb, w, w / 2, w) > 100,
            "k-NN panel has no series"
        );
        // The captions were rendered with the bundled font.
        assert!(dark_pixels_on_top(&rgb, w, 40) > 50, "no caption text");
    }

    #[test]
    fn single_points_and_an_explicit_file_name() {
        let dir = tempfile::tempdir().unwrap();
        write_metrics(
            dir.path(),
            "{\"type\":\"step\",\"step\":5,\"loss\":4.1,\"consistency\":4.0,\"entropy\":0.1}\n\
             {\"type\":\"knn\",\"step\":5,\"top1\":[[20,0.72]]}\n",
        );
        let target = dir.path().join("custom.png");
        let out = plot_run(dir.path(), &target).unwrap();
        assert_eq!(out, target);
        let (w, h, rgb) = decode(&out);
        assert_eq!((w, h), PLOT_SIZE);
        // One point per series is drawn as a marker.
        assert!(coloured_pixels(&rgb, w, 0, w / 2) > 20);
        assert!(coloured_pixels(&rgb, w, w / 2, w) > 10);
    }

    #[test]
    fn steps_only_still_plots() {
        let dir = tempfile::tempdir().unwrap();
        write_metrics(
            dir.path(),
            "{\"type\":\"step\",\"step\":1,\"loss\":4.1}\n{\"type\":\"step\",\"step\":2,\"loss\":3.9}\n",
        );
        let out = plot_run(dir.path(), dir.path()).unwrap();
        let (w, _, rgb) = decode(&out);
        assert!(coloured_pixels(&rgb, w, 0, w / 2) > 20);
        assert_eq!(
            coloured_pixels(&rgb, w, w / 2, w),
            0,
            "no k-NN series to draw"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        // Missing file.
        let e = plot_run(dir.path(), dir.path()).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("metrics.jsonl"), "{e}");
        // Empty file, and a file with only unplotted records.
        write_metrics(dir.path(), "");
        let e = plot_run(dir.path(), dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("no \"step\" or \"knn\" records"),
            "{e}"
        );
        write_metrics(dir.path(), "{\"type\":\"config\"}\n\n");
        assert!(plot_run(dir.path(), dir.path()).is_err());
        // Bad JSON on line 3 (blank lines count).
        write_metrics(
            dir.path(),
            "{\"type\":\"step\",\"step\":1,\"loss\":4.1}\n\n{\"type\":\"step\",\"step\":2,\n",
        );
        let e = plot_run(dir.path(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("line 3: not valid JSON"), "{e}");
        // Structurally wrong records.
        for (text, want) in [
            ("{\"step\":1}\n", "line 1: no \"type\""),
            (
                "{\"type\":\"step\",\"loss\":1}\n",
                "line 1: step record without",
            ),
            (
                "{\"type\":\"knn\",\"step\":1}\n",
                "line 1: knn record without a \"top1\"",
            ),
            (
                "{\"type\":\"step\",\"step\":1}\n{\"type\":\"knn\",\"step\":1,\"top1\":[[20]]}\n",
                "line 2: knn \"top1\" entry [20]",
            ),
        ] {
            write_metrics(dir.path(), text);
            let e = plot_run(dir.path(), dir.path()).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
        // An output directory that does not exist.
        write_metrics(dir.path(), "{\"type\":\"step\",\"step\":1,\"loss\":4.1}\n");
        let e = plot_run(dir.path(), &dir.path().join("no/such/dir/p.png")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }
}
