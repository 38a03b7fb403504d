//! Project automation: `cargo xtask <task>`.
//!
//! * `ci`: fmt check, clippy (warnings are errors), tests, docs, and a check of the
//!   optional `hub` feature of ddpm-data;
//! * `train [ARGS]`: a release build of `ddpm train` with the default recipe (on a CPU the
//!   `quick` recipe, which ends within 30 minutes; `full` on `--device cuda`); ARGS are passed
//!   through (e.g. `cargo xtask train --budget 15m`, `cargo xtask train --recipe full`);
//! * `bench [OPTIONS]`: speed and memory of each preset, ours against candle's stock kernels
//!   and the PyTorch reference (`bench/torch_reference.py`), as a table;
//! * `gallery [OPTIONS]`: the README's pictures from one checkpoint, with the commands that
//!   made them (`docs/img/gallery/README.md`);
//! * `build-cuda [OPTIONS]`: the CUDA build of the CLI, with a CUDA toolkit or from PyPI wheels,
//!   optionally packed for a GPU machine without a Rust toolchain (docs/cuda.md);
//! * `vendor-check`: `vendor/candle-core` is the pristine crates.io release plus
//!   `vendor/candle-core.patch`, nothing else (vendor/README.md);
//! * `web [--out DIR] [--model FILE] [--serve] [--port N] [--test]`: the browser page (web/,
//!   crates/ddpm-web compiled to WebAssembly), optionally served on localhost or put through
//!   the headless-Chromium test (docs/web.md).

mod bench;
mod cuda;
mod gallery;
mod vendor;
mod web;

use std::process::Command;

use anyhow::{bail, Context, Result};

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub(crate) fn run(mut cmd: Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn ci() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)?;
    let mut test = cargo();
    test.args(["test", "--workspace"]);
    run(test)?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run(doc)?;
    let mut hub = cargo();
    hub.args(["check", "-p", "ddpm-data", "--features", "hub"]);
    run(hub)?;
    vendor::vendor_check(&[])
}

/// Whether `args` ask for `--device cuda`.
fn wants_cuda(args: &[String]) -> bool {
    args.iter().any(|a| a == "--device=cuda")
        || args
            .windows(2)
            .any(|w| w[0] == "--device" && w[1] == "cuda")
}

/// Spawns a release build of the CLI: `ddpm <sub> <args>`. With `--device cuda` in `args`, the
/// build has the `cuda` feature, in target/cuda (so CPU builds stay valid).
fn ddpm(sub: &str, args: &[String], defaults: &[&str]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["run", "--release", "-p", "ddpm-cli"]);
    if wants_cuda(args) {
        cmd.args(["--features", "cuda", "--target-dir", "target/cuda"]);
    }
    cmd.args(["--", sub]);
    // Defaults first: a flag the user repeats overrides them (clap keeps the last one).
    cmd.args(defaults).args(args);
    run(cmd)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "ci" => ci(),
        "train" => ddpm("train", &rest, &["--out", "runs/default"]),
        "bench" => bench::bench(&rest),
        "gallery" => gallery::gallery(&rest),
        "build-cuda" => cuda::build_cuda(&rest),
        "vendor-check" => vendor::vendor_check(&rest),
        "web" => web::web(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 ci            fmt, clippy, test, doc, hub-feature check\n  \
                 train [ARGS]  release `ddpm train` with the default recipe (ARGS pass through)\n  \
                 bench [OPTS]  speed/memory table: ours, candle stock, PyTorch (--help)\n  \
                 gallery [OPTS] README pictures from a checkpoint, with their commands (--help)\n  \
                 build-cuda [OPTS] CUDA build of the CLI, packable for a GPU machine (--help)\n  \
                 vendor-check  vendor/candle-core = candle-core from crates.io + its .patch\n  \
                 web [OPTS]    the browser page in WebAssembly; --serve, --test (docs/web.md)"
            );
            if task.is_empty() || task == "help" || task == "--help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}
