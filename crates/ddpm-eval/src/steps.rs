//! The steps-versus-quality study (docs/sampling.md): many `ddpm eval` reports of one model,
//! one per sampler, spacing and step count, as a table per guidance weight and a plot of
//! `fid_mnist` against network calls per digit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ddpm_viz as viz;

use crate::{EvalError, Report};

/// One (report, w) cell of the study.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyPoint {
    /// `sampler spacing` (e.g. `unipc logsnr`), with ` (student)` for a distilled model.
    pub method: String,
    /// Sampling steps.
    pub steps: usize,
    /// The guidance weight.
    pub w: f64,
    /// Network evaluations per digit: 2 per step with classifier-free guidance (w ≠ 0), 1 for
    /// w = 0 or a model that takes w as an input.
    pub calls: usize,
    /// Class accuracy (0–1), if measured.
    pub accuracy: Option<f64>,
    /// `fid_mnist`.
    pub fid: f64,
    /// Seconds spent sampling the report's n digits at this w.
    pub seconds: f64,
    /// Samples per w.
    pub n: usize,
}

/// Whether a report's model takes w as an input (its card's U-Net has a guidance embedding).
pub fn takes_guidance(report: &Report) -> bool {
    report.card["model"]["guidance_embedding"].as_bool() == Some(true)
}

/// The study's points of `reports`.
pub fn points(reports: &[Report]) -> Vec<StudyPoint> {
    let mut out = Vec::new();
    for r in reports {
        let student = takes_guidance(r);
        let method = format!(
            "{} {}{}",
            r.sampler,
            r.spacing,
            if student { " (student)" } else { "" }
        );
        for row in &r.rows {
            let per_step = if row.w != 0.0 && !student { 2 } else { 1 };
            out.push(StudyPoint {
                method: method.clone(),
                steps: r.steps,
                w: row.w,
                calls: per_step * r.steps,
                accuracy: row.metrics.accuracy.as_ref().map(|a| a.overall),
                fid: row.metrics.fid_mnist,
                seconds: row.sampling_seconds,
                n: r.n,
            });
        }
    }
    out
}

/// Reads every `report.json` one level under `dir` (`dir/*/report.json`), sorted by path.
pub fn read_dir_reports(dir: &Path) -> Result<Vec<Report>, EvalError> {
    let io = |source| EvalError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path().join("report.json")))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(EvalError::Report {
            path: dir.to_path_buf(),
            why: "holds no */report.json: give the folder the study's `ddpm eval --out` runs wrote into".into(),
        });
    }
    paths
        .iter()
        .map(|p| crate::merge_reports(std::slice::from_ref(p)))
        .collect()
}

fn ws(points: &[StudyPoint]) -> Vec<f64> {
    let mut ws: Vec<f64> = points.iter().map(|p| p.w).collect();
    ws.sort_by(f64::total_cmp);
    ws.dedup();
    ws
}

/// One markdown table per w: a row per method, a column per step count, each cell
/// `fid_mnist (accuracy %)`; the best fid of each column in bold.
pub fn table(points: &[StudyPoint]) -> String {
    let mut s = String::new();
    for w in ws(points) {
        let at: Vec<&StudyPoint> = points.iter().filter(|p| p.w == w).collect();
        let mut steps: Vec<usize> = at.iter().map(|p| p.steps).collect();
        steps.sort_unstable();
        steps.dedup();
        let mut rows: BTreeMap<&str, BTreeMap<usize, &StudyPoint>> = BTreeMap::new();
        for p in &at {
            rows.entry(&p.method).or_default().insert(p.steps, p);
        }
        let best: BTreeMap<usize, f64> = steps
            .iter()
            .map(|&n| {
                let b = at
                    .iter()
                    .filter(|p| p.steps == n)
                    .map(|p| p.fid)
                    .fold(f64::INFINITY, f64::min);
                (n, b)
            })
            .collect();
        let n = at.first().map_or(0, |p| p.n);
        s.push_str(&format!(
            "**w = {w}** (n = {n} per cell; `fid_mnist` (class accuracy); network calls per digit = \
             2 × steps with guidance, steps for a student)\n\n| sampler, spacing |"
        ));
        for n in &steps {
            s.push_str(&format!(" {n} steps |"));
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(steps.len()));
        s.push('\n');
        for (method, cells) in &rows {
            s.push_str(&format!("| {method} |"));
            for n in &steps {
                match cells.get(n) {
                    Some(p) => {
                        let acc = p
                            .accuracy
                            .map_or("–".into(), |a| format!("{:.1} %", 100.0 * a));
                        let fid = if best.get(n) == Some(&p.fid) {
                            format!("**{:.1}**", p.fid)
                        } else {
                            format!("{:.1}", p.fid)
                        };
                        s.push_str(&format!(" {fid} ({acc}) |"));
                    }
                    None => s.push_str(" |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

/// Line colours, one per method in order.
const COLORS: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// Plots `fid_mnist` against network calls per digit at guidance weight `w`, a line per
/// method, into `path` (PNG, log-scale fid).
pub fn plot(points: &[StudyPoint], w: f64, path: &Path) -> Result<(), EvalError> {
    let mut by: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.w == w) {
        by.entry(&p.method)
            .or_default()
            .push((p.calls as f64, p.fid));
    }
    let series: Vec<viz::Series> = by
        .into_iter()
        .enumerate()
        .map(|(i, (m, mut pts))| {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            viz::Series {
                label: m.to_string(),
                color: COLORS[i % COLORS.len()],
                points: pts,
            }
        })
        .collect();
    viz::plot_lines(
        &series,
        &format!("fid_mnist against network calls per digit, w = {w}"),
        "network calls per digit",
        true,
        path,
    )
    .map_err(|e| EvalError::Report {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Writes `steps_table.md` and one `fid_vs_calls_w{w}.png` per guidance weight into `out`;
/// returns the files written.
pub fn write_study(points: &[StudyPoint], out: &Path) -> Result<Vec<PathBuf>, EvalError> {
    std::fs::create_dir_all(out).map_err(|source| EvalError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let md = out.join("steps_table.md");
    ddpm_core::write_atomic(&md, table(points).as_bytes()).map_err(|source| EvalError::Io {
        path: md.clone(),
        source,
    })?;
    let mut written = vec![md];
    for w in ws(points) {
        let png = out.join(format!("fid_vs_calls_w{w}.png"));
        plot(points, w, &png)?;
        written.push(png);
    }
    Ok(written)
}
