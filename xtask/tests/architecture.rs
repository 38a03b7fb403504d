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
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

fn layer(name: &str) -> Option<u32> {
    match name {
        "ddpm-core" | "ddpm-data" | "ddpm-kernels" => Some(1),
        "ddpm-schedule" | "ddpm-unet" | "ddpm-sampler" => Some(2),
        "ddpm-train" | "ddpm-eval" => Some(3),
        "ddpm-cli" => Some(4),
        _ => None,
    }
}

#[test]
fn crate_graph_invariants_hold() {
    let deps = normal_deps();
    assert!(deps.len() >= 8, "{deps:?}");
    let uses = |krate: &str, dep: &str| deps[krate].iter().any(|d| d == dep);
    for forbidden in ["ddpm-schedule", "ddpm-sampler", "ddpm-train"] {
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
    for leaf in ["ddpm-data", "ddpm-kernels"] {
        assert!(
            !deps[leaf].iter().any(|d| d.starts_with("ddpm-")),
            "{leaf} depends on a ddpm crate"
        );
    }
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
