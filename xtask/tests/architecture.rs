//! The architecture invariants of docs/architecture.md, checked against `cargo metadata`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Command;

/// (crate, normal dependencies) for every workspace member.
fn normal_deps() -> HashMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null()) // normal dependencies only
                // An optional dependency behind a feature (`ddpm-pipeline`'s `clap`, for
                // `ValueEnum` on its enums) is named `name?`: not a hard dependency.
                .map(|d| {
                    let name = d["name"].as_str().unwrap().to_string();
                    if d["optional"].as_bool() == Some(true) {
                        format!("{name}?")
                    } else {
                        name
                    }
                })
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

fn layer(name: &str) -> Option<u32> {
    match name {
        "ddpm-core" | "ddpm-kernels" => Some(1),
        // The schedule sits below the U-Net: a model file's card records the schedule its
        // weights were trained with (docs/architecture.md). The data reads its files through
        // ddpm-core's guards (regular files, bounded reads, the memory check).
        "ddpm-schedule" | "ddpm-viz" | "ddpm-data" => Some(2),
        // The evaluator measures images: it sits beside the model, below the pipeline that
        // evaluates a model with it.
        "ddpm-unet" | "ddpm-sampler" | "ddpm-eval" => Some(3),
        "ddpm-pipeline" => Some(4),
        "ddpm-train" => Some(5),
        "ddpm-cli" => Some(6),
        _ => None,
    }
}

#[test]
fn crate_graph_invariants_hold() {
    let deps = normal_deps();
    assert!(deps.len() >= 8, "{deps:?}");
    let uses = |krate: &str, dep: &str| deps[krate].iter().any(|d| d == dep);
    for forbidden in ["ddpm-sampler", "ddpm-pipeline", "ddpm-train"] {
        assert!(
            !uses("ddpm-unet", forbidden),
            "ddpm-unet must not depend on {forbidden}"
        );
    }
    for forbidden in ["ddpm-unet", "ddpm-schedule", "ddpm-train"] {
        assert!(
            !uses("ddpm-sampler", forbidden),
            "ddpm-sampler must not depend on {forbidden}"
        );
    }
    // The evaluator measures images; it needs the kernels' convolution, not the model.
    for forbidden in ["ddpm-unet", "ddpm-sampler", "ddpm-pipeline"] {
        assert!(
            !uses("ddpm-eval", forbidden),
            "ddpm-eval must not depend on {forbidden}"
        );
    }
    assert!(
        !deps["ddpm-kernels"].iter().any(|d| d.starts_with("ddpm-")),
        "ddpm-kernels depends on a ddpm crate"
    );
    assert!(
        deps["ddpm-data"]
            .iter()
            .all(|d| !d.starts_with("ddpm-") || d == "ddpm-core"),
        "ddpm-data depends on a ddpm crate other than ddpm-core"
    );
    for (krate, ds) in &deps {
        let is_bin = krate == "ddpm-cli" || krate == "xtask";
        for bin_only in ["anyhow", "clap", "tracing-subscriber", "indicatif", "ctrlc"] {
            assert!(
                is_bin || !ds.iter().any(|d| d == bin_only),
                "{krate} (a library) depends on {bin_only}"
            );
        }
        if let Some(l) = layer(krate) {
            for d in ds.iter().filter(|d| d.starts_with("ddpm-")) {
                let dl = layer(d).unwrap_or_else(|| panic!("{d} has no layer in this test"));
                assert!(
                    dl < l,
                    "{krate} (layer {l}) depends on {d} (layer {dl}): arrows only point down"
                );
            }
        }
    }
}

/// The Rust sources under `dir` (relative to the workspace root), with their text.
fn sources(dir: &str) -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = Vec::new();
    let mut stack = vec![root.join(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((
                    p.display().to_string(),
                    std::fs::read_to_string(&p).unwrap(),
                ));
            }
        }
    }
    assert!(!out.is_empty(), "no sources under {dir}");
    out
}

/// One sampling loop: the CLI, the trainer and the evaluator call ddpm-pipeline's `generate`
/// and build no sampler, guidance wrapper or loop of their own.
#[test]
fn no_sampling_loop_outside_the_pipeline() {
    let loop_parts = [
        "ClassifierFreeGuidance",
        "Ddim::new",
        "DpmSolverPp2M::new",
        "Ddpm::new",
        "ddpm_sampler::sample",
        "sample(",
        "make_sampler",
    ];
    for dir in [
        "crates/ddpm-cli/src",
        "crates/ddpm-train/src",
        "crates/ddpm-eval/src",
    ] {
        for (path, text) in sources(dir) {
            for part in loop_parts {
                let hit = text.lines().any(|l| {
                    let code = l.split("//").next().unwrap_or("");
                    code.contains(part) && !code.contains("fn sample(")
                });
                assert!(
                    !hit,
                    "{path} uses `{part}`: sample through ddpm_pipeline::generate"
                );
            }
        }
    }
}

/// The library crates of the workspace.
const LIBRARIES: [&str; 10] = [
    "ddpm-core",
    "ddpm-kernels",
    "ddpm-schedule",
    "ddpm-data",
    "ddpm-viz",
    "ddpm-unet",
    "ddpm-sampler",
    "ddpm-pipeline",
    "ddpm-train",
    "ddpm-eval",
];

/// No library compiles a path of the build machine in: only the `ddpm` binary looks for its
/// own source tree (its default model and MNIST copy, documented in main.rs).
#[test]
fn no_library_compiles_a_source_path_in() {
    for krate in LIBRARIES {
        for (path, text) in sources(&format!("crates/{krate}/src")) {
            assert!(
                !text.contains(concat!("env!(\"CARGO_", "MANIFEST_DIR\")")),
                "{path} compiles the build machine's source path in"
            );
        }
    }
}

/// The libraries' option structs (`clap::Args` under their `clap` feature) stand alone: none
/// names an argument it does not hold (`conflicts_with`, `requires`), which a user's command
/// flattening it would lack. Such relations between a library's options and a command's own
/// flags are the command's to declare (e.g. `ddpm sample --gif` conflicts with `--sweep`).
#[test]
fn library_option_structs_name_no_outside_argument() {
    let mut structs = 0;
    for krate in LIBRARIES {
        for (path, text) in sources(&format!("crates/{krate}/src")) {
            structs += text.matches("derive(clap::Args)").count();
            for relation in [
                "conflicts_with",
                "requires",
                "required_unless",
                "overrides_with",
            ] {
                assert!(
                    !text.contains(relation),
                    "{path}: a library option names another argument ({relation})"
                );
            }
        }
    }
    assert!(structs >= 7, "found {structs} library option structs");
}

/// Every candle custom op (`CustomOp1/2/3`, `InplaceOp1/2/3`) is implemented in ddpm-kernels.
#[test]
fn every_custom_op_lives_in_ddpm_kernels() {
    let mut found = 0;
    for krate in LIBRARIES.into_iter().chain(["ddpm-cli"]) {
        for (path, text) in sources(&format!("crates/{krate}/src")) {
            for op in [
                "CustomOp1 for",
                "CustomOp2 for",
                "CustomOp3 for",
                "InplaceOp1 for",
                "InplaceOp2 for",
                "InplaceOp3 for",
            ] {
                let n = text.matches(op).count();
                assert!(
                    n == 0 || krate == "ddpm-kernels",
                    "{path} implements a custom op ({op}): custom ops live in ddpm-kernels"
                );
                found += n;
            }
        }
    }
    assert!(found >= 5, "found only {found} custom ops in ddpm-kernels");
}
