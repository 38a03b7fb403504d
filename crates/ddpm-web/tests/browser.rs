//! The Rust half of the browser test: `cargo xtask web --test` builds and serves the page, drives
//! headless Chromium with web/test/browser.mjs, and runs this test on what the page drew
//! (`DDPM_WEB_RESULT`, its result.json): the project's MNIST classifier must read the row as
//! the class clicked, the digits must be the CPU's for the same seed and settings, the page
//! must stay within its weight budget, and nothing may have gone to the console. Without
//! `DDPM_WEB_RESULT` (a plain `cargo test`) it says so and checks nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ddpm_eval::Classifier;
use ddpm_web::{Session, Settings};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_page_draws_the_class_clicked_and_the_cpus_digits() {
    let Ok(result) = std::env::var("DDPM_WEB_RESULT") else {
        eprintln!(
            "skipped: no DDPM_WEB_RESULT; `cargo xtask web --test` runs the page in headless \
             Chromium and then this test"
        );
        return;
    };
    let r: Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    for key in ["consoleErrors", "pageErrors", "failedRequests"] {
        assert_eq!(r[key].as_array().unwrap().len(), 0, "{key}: {}", r[key]);
    }

    // The weights are fetched once: the first visit fetches them, a reload takes them from
    // the Cache API.
    assert_eq!(
        r["modelCached"],
        Value::Bool(false),
        "a fresh profile had the model cached"
    );
    assert_eq!(
        r["modelCachedOnReload"],
        Value::Bool(true),
        "a reload fetched the model again instead of taking it from the cache"
    );

    // The digits read back from the page's native-size canvas: ten 28×28 cells in a row.
    let (w, h) = (
        r["width"].as_u64().unwrap() as usize,
        r["height"].as_u64().unwrap() as usize,
    );
    assert_eq!((w, h), (280, 28));
    let grid: Vec<u8> = r["pixels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(grid.len(), w * h);
    let mut page = Vec::with_capacity(w * h);
    for k in 0..10 {
        for y in 0..28 {
            page.extend_from_slice(&grid[y * w + k * 28..y * w + k * 28 + 28]);
        }
    }

    // The classifier reads at least 9 of the 10 as the class clicked.
    let class: u32 = r["class"].as_str().unwrap().parse().unwrap();
    let x = Tensor::from_vec(
        page.iter()
            .map(|&p| p as f32 / 127.5 - 1.0)
            .collect::<Vec<_>>(),
        (10, 1, 28, 28),
        &Device::Cpu,
    )
    .unwrap();
    let (clf, _) =
        Classifier::load(&root().join(ddpm_eval::SHIPPED_CLASSIFIER), &Device::Cpu).unwrap();
    let pred = clf.predict(&x, 10).unwrap();
    let right = pred.predicted.iter().filter(|&&p| p == class).count();
    eprintln!(
        "classifier: {right}/10 read as {class} ({:?})",
        pred.predicted
    );
    assert!(
        right >= 9,
        "only {right}/10 read as {class}: {:?}",
        pred.predicted
    );

    // Same seed, same settings: the CPU's digits, within the pinned-grid tolerance of
    // crates/ddpm-cli/tests/shipped.rs (wasm has no FMA and other GEMM kernels).
    let model = PathBuf::from(std::env::var("DDPM_WEB_MODEL").unwrap());
    let settings: Settings = serde_json::from_value(r["settings"].clone()).unwrap();
    let session = Session::from_bytes(&std::fs::read(&model).unwrap()).unwrap();
    let cpu = session.generate(&settings, &mut |_| Ok(())).unwrap();
    assert_eq!(cpu.pixels.len(), page.len());
    let diffs: Vec<u8> = cpu
        .pixels
        .iter()
        .zip(&page)
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let off = diffs.iter().filter(|&&d| d > 1).count();
    eprintln!(
        "against the CPU: max pixel difference {max}, {off} of {} off by more than 1",
        diffs.len()
    );
    assert!(
        max <= 12 && off * 200 <= diffs.len(),
        "the page's digits are not the CPU's (max difference {max}, {off} pixels off by more than 1)"
    );

    // The weights: the wasm and the whole page as the browser fetched it.
    let dir = PathBuf::from(std::env::var("DDPM_WEB_DIR").unwrap());
    let wasm = std::fs::metadata(dir.join("pkg/ddpm_web_bg.wasm"))
        .unwrap()
        .len();
    let page_bytes = r["pageBytes"].as_u64().unwrap();
    eprintln!(
        "weights: wasm {wasm} bytes, page {page_bytes} bytes ({})",
        r["bytesByFile"]
    );
    assert!(wasm <= 4_000_000, "the wasm is {wasm} bytes, over 4 MB");
    assert!(
        page_bytes <= 12_000_000,
        "the page is {page_bytes} bytes, over 12 MB"
    );
    eprintln!(
        "timings (reported, not asserted): model loaded {} ms, first digit {} ms, row of ten {} ms",
        r["modelLoadMs"], r["firstDigitMs"], r["rowMs"]
    );
}
