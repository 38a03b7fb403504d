//! The steps-versus-quality study's table and plot from `ddpm eval` reports.
#![allow(clippy::unwrap_used)]

use ddpm_eval::steps::{points, read_dir_reports, table, write_study};
use ddpm_eval::Report;

fn report(
    sampler: &str,
    spacing: &str,
    steps: usize,
    student: bool,
    rows: &[(f64, f64, f64)],
) -> Report {
    let metrics = |acc: f64, fid: f64| {
        serde_json::json!({"count": 1000, "accuracy": {"overall": acc, "per_class": vec![acc; 10],
            "counts": vec![100; 10], "mean_confidence": 0.99}, "fid_mnist": fid, "is_mnist": 9.8,
            "class_entropy": 2.3})
    };
    let mut model = serde_json::json!({"num_classes": 10});
    if student {
        model["guidance_embedding"] = true.into();
    }
    serde_json::from_value(serde_json::json!({
        "checkpoint": "c.safetensors", "card": {"model": model}, "n": 1000, "steps": steps,
        "sampler": sampler, "spacing": spacing, "seed": 1, "classifier": "clf",
        "classifier_test_accuracy": 0.99, "real_data_floor": metrics(0.99, 31.0),
        "rows": rows.iter().map(|&(w, acc, fid)| serde_json::json!({"w": w,
            "metrics": metrics(acc, fid), "sampling_seconds": 10.0})).collect::<Vec<_>>()
    }))
    .unwrap()
}

#[test]
fn the_study_counts_calls_and_marks_the_best_per_column() {
    let reports = vec![
        report(
            "dpm++",
            "logsnr",
            4,
            false,
            &[(0.0, 0.9, 80.0), (1.0, 0.99, 90.0)],
        ),
        report("unipc", "logsnr", 4, false, &[(1.0, 0.995, 70.0)]),
        report("dpm++", "logsnr", 8, false, &[(1.0, 0.999, 60.0)]),
        report("ddim", "trailing", 4, true, &[(1.0, 0.999, 65.0)]),
    ];
    let p = points(&reports);
    // Guided: two calls a step; w = 0 and a student (w is its input): one.
    let calls: Vec<(String, f64, usize)> =
        p.iter().map(|p| (p.method.clone(), p.w, p.calls)).collect();
    assert_eq!(calls[0], ("dpm++ logsnr".into(), 0.0, 4));
    assert_eq!(calls[1], ("dpm++ logsnr".into(), 1.0, 8));
    assert_eq!(calls[4], ("ddim trailing (student)".into(), 1.0, 4));
    let t = table(&p);
    assert!(t.contains("**w = 1**") && t.contains("**w = 0**"), "{t}");
    assert!(t.contains("| unipc logsnr | 70.0 (99.5 %) |"), "{t}");
    assert!(
        t.contains("| ddim trailing (student) | **65.0** (99.9 %) |"),
        "{t}"
    );
    assert!(
        t.contains("| dpm++ logsnr | 90.0 (99.0 %) | **60.0** (99.9 %) |"),
        "{t}"
    );
    // Written: the table and a plot per w; read back from a folder of reports.
    let dir = tempfile::tempdir().unwrap();
    for (i, r) in reports.iter().enumerate() {
        r.write(&dir.path().join(format!("r{i}"))).unwrap();
    }
    let back = read_dir_reports(dir.path()).unwrap();
    assert_eq!(back.len(), 4);
    let out = dir.path().join("study");
    let written = write_study(&points(&back), &out).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "steps_table.md",
            "fid_vs_calls_w0.png",
            "fid_vs_calls_w1.png"
        ]
    );
    assert!(image::open(&written[2]).unwrap().width() > 100);
    assert!(read_dir_reports(&out).is_err());
}
