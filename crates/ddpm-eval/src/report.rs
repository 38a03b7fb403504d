//! The evaluation protocol and its report: a sweep over guidance weights scored against one
//! reference, the JSON report, merging reports of separate runs, the markdown table and the two
//! plots (fid_mnist against IS, class accuracy against w).
//!
//! The sweep takes the samples from a closure, so this crate still generates nothing itself:
//! `ddpm eval` passes one that calls `ddpm_pipeline::generate`, a test passes real digits.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use ddpm_viz as viz;
use serde::{Deserialize, Serialize};

use crate::{Classifier, EvalError, Reference, SetMetrics};

/// One guidance weight's row of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The guidance weight w.
    pub w: f64,
    /// The metrics of its samples.
    pub metrics: SetMetrics,
    /// Seconds spent generating them.
    pub sampling_seconds: f64,
}

/// The JSON report of `ddpm eval` (`report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The checkpoint evaluated.
    pub checkpoint: String,
    /// Its model card, as JSON (for a ddpm-rs checkpoint, `serde_json::to_value` of its
    /// `ddpm_unet::ModelCard`): kept untyped, so the evaluator needs no model crate and reports of
    /// any generator carry their own description.
    pub card: serde_json::Value,
    /// Samples per guidance weight.
    pub n: usize,
    /// Sampling steps.
    pub steps: usize,
    /// The sampler's name (`ddim`, `ddpm`, `dpm++`, `dpm++3m`, `unipc`, `unipc3`, `ipndm`;
    /// older reports wrote `dpmpp`).
    pub sampler: String,
    /// The timestep spacing (`leading`, `trailing`, `linspace`, `logsnr`, `karras`); reports
    /// written before it was recorded read as `leading`, the only spacing `ddpm eval` used.
    #[serde(default = "leading")]
    pub spacing: String,
    /// The seed of the sampling noise (0 in reports written before it was recorded).
    #[serde(default)]
    pub seed: u64,
    /// The classifier file.
    pub classifier: String,
    /// Its accuracy on the MNIST test set.
    pub classifier_test_accuracy: f64,
    /// MNIST train images (as many as n, at most 10,000) against the test set.
    pub real_data_floor: SetMetrics,
    /// One row per guidance weight, sorted by w.
    pub rows: Vec<Row>,
}

/// Scores the samples `generate(w)` returns for each w (`[N, C, H, W]` in [−1, 1]; checked
/// finite, then clipped) against `reference`, with `targets` the classes they were asked for
/// (`None` for unconditional samples). `on_row` sees each row as it is done.
pub fn sweep(
    classifier: &Classifier,
    reference: &Reference,
    weights: &[f64],
    targets: Option<&[u32]>,
    generate: &mut dyn FnMut(f64) -> Result<Tensor, EvalError>,
    on_row: &mut dyn FnMut(&Row),
) -> Result<Vec<Row>, EvalError> {
    let mut rows = Vec::with_capacity(weights.len());
    for &w in weights {
        let started = Instant::now();
        let x0 = generate(w)?;
        let sampling_seconds = started.elapsed().as_secs_f64();
        ddpm_core::ensure_finite(&x0, &format!("the samples at w = {w}"))?;
        let metrics = reference.evaluate(classifier, &x0.clamp(-1f32, 1f32)?, targets)?;
        let row = Row {
            w,
            metrics,
            sampling_seconds,
        };
        on_row(&row);
        rows.push(row);
    }
    rows.sort_by(|a, b| a.w.total_cmp(&b.w));
    Ok(rows)
}

/// Whether two reports name one sampler (older reports wrote `dpmpp` for `dpm++`).
fn same_sampler(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> &str {
        if s == "dpmpp" {
            "dpm++"
        } else {
            s
        }
    }
    norm(a) == norm(b)
}

fn report_err(path: &Path, why: impl Into<String>) -> EvalError {
    EvalError::Report {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn leading() -> String {
    "leading".into()
}

/// Reads the reports at `paths` and merges their rows (the first report's floor and header):
/// all must come from one checkpoint, n, steps and sampler, and no w may appear twice.
pub fn merge_reports(paths: &[PathBuf]) -> Result<Report, EvalError> {
    let mut merged: Option<Report> = None;
    for path in paths {
        // A report is a few KiB; 64 MiB bounds any file read as one.
        let bytes = ddpm_core::files::read_regular(path, 64 << 20)
            .map_err(|e| report_err(path, format!("cannot read it: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| report_err(path, "is not UTF-8 text: not a `ddpm eval` report"))?;
        let r: Report = serde_json::from_str(&text)
            .map_err(|e| report_err(path, format!("not a `ddpm eval` report: {e}")))?;
        match &mut merged {
            None => merged = Some(r),
            Some(m) => {
                let same = m.checkpoint == r.checkpoint
                    && m.n == r.n
                    && m.steps == r.steps
                    && same_sampler(&m.sampler, &r.sampler)
                    && m.spacing == r.spacing
                    && m.seed == r.seed
                    && m.card == r.card;
                if !same {
                    return Err(report_err(
                        path,
                        format!(
                            "made from another checkpoint or with other --n, --steps, \
                             --sampler, --spacing or --seed than {}; only reports of one evaluation setting can be \
                             merged",
                            paths[0].display()
                        ),
                    ));
                }
                for row in r.rows {
                    if m.rows.iter().any(|x| x.w == row.w) {
                        return Err(report_err(path, format!("w = {} appears twice", row.w)));
                    }
                    m.rows.push(row);
                }
            }
        }
    }
    let mut m = merged.ok_or_else(|| report_err(Path::new(""), "no report given"))?;
    m.rows.sort_by(|a, b| a.w.total_cmp(&b.w));
    Ok(m)
}

impl Report {
    /// The report as a markdown table with a header line: the real-data floor, then one row
    /// per w.
    pub fn table(&self) -> String {
        let acc = |m: &SetMetrics| {
            m.accuracy.as_ref().map_or(("–".into(), "–".into()), |a| {
                (
                    format!("{:.2} %", 100.0 * a.overall),
                    format!("{:.3}", a.mean_confidence),
                )
            })
        };
        let mut s = format!(
            "{} samples per w, {} {} steps ({} spacing, seed {}); classifier {} (test accuracy \
             {:.2} %)\n\n",
            self.n,
            self.sampler,
            self.steps,
            self.spacing,
            self.seed,
            self.classifier,
            100.0 * self.classifier_test_accuracy
        );
        s.push_str("| w | accuracy | confidence | fid_mnist | IS | class entropy | sampling s |\n");
        s.push_str("|---|---|---|---|---|---|---|\n");
        let f = &self.real_data_floor;
        let (fa, fc): (String, String) = acc(f);
        s.push_str(&format!(
            "| real (train vs test) | {fa} | {fc} | {:.3} | {:.3} | {:.3} | – |\n",
            f.fid_mnist, f.is_mnist, f.class_entropy
        ));
        for row in &self.rows {
            let m = &row.metrics;
            let (ra, rc): (String, String) = acc(m);
            s.push_str(&format!(
                "| {} | {ra} | {rc} | {:.3} | {:.3} | {:.3} | {:.1} |\n",
                row.w, m.fid_mnist, m.is_mnist, m.class_entropy, row.sampling_seconds
            ));
        }
        s
    }

    /// Writes `report.json`, `fid_vs_is.png` and (for conditional models) `accuracy_vs_w.png`
    /// into `out` (created if missing); returns the files written.
    pub fn write(&self, out: &Path) -> Result<Vec<PathBuf>, EvalError> {
        std::fs::create_dir_all(out).map_err(|source| EvalError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        let json = out.join("report.json");
        let text =
            serde_json::to_string_pretty(self).map_err(|e| report_err(&json, e.to_string()))?;
        ddpm_core::write_atomic(&json, text.as_bytes()).map_err(|source| EvalError::Io {
            path: json.clone(),
            source,
        })?;
        let mut written = vec![json];
        let f = &self.real_data_floor;
        let ws: Vec<String> = self.rows.iter().map(|x| x.w.to_string()).collect();
        let curve = viz::Series {
            label: format!("w = {}", ws.join(", ")),
            color: [200, 40, 40],
            points: self
                .rows
                .iter()
                .map(|x| (x.metrics.is_mnist, x.metrics.fid_mnist))
                .collect(),
        };
        // The floor as a horizontal line across the plotted IS range.
        let (lo, hi) = self
            .rows
            .iter()
            .map(|x| x.metrics.is_mnist)
            .chain(std::iter::once(f.is_mnist))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        let floor = viz::Series {
            label: "real data".into(),
            color: [40, 120, 40],
            points: vec![(lo, f.fid_mnist), (hi, f.fid_mnist)],
        };
        let png = out.join("fid_vs_is.png");
        viz::plot_lines(
            &[curve, floor],
            "fid_mnist against IS across guidance weights",
            "IS (classifier)",
            false,
            &png,
        )?;
        written.push(png);
        let accs: Vec<(f64, f64)> = self
            .rows
            .iter()
            .filter_map(|x| {
                x.metrics
                    .accuracy
                    .as_ref()
                    .map(|a| (x.w, 100.0 * a.overall))
            })
            .collect();
        if !accs.is_empty() {
            let png = out.join("accuracy_vs_w.png");
            let s = viz::Series {
                label: "class accuracy (%)".into(),
                color: [40, 40, 200],
                points: accs,
            };
            viz::plot_lines(
                &[s],
                "class accuracy against guidance weight w",
                "w",
                false,
                &png,
            )?;
            written.push(png);
        }
        Ok(written)
    }
}
