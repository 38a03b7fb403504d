//! `cargo xtask vendor-check`: `vendor/candle-core` is the pristine candle-core release plus
//! `vendor/candle-core.patch`, and nothing else (vendor/README.md).
//!
//! The pristine crate comes from cargo's registry cache, fetched from crates.io into it when it
//! is not there yet; it is copied into a temporary folder (without the files cargo adds when it
//! unpacks a crate), the patch is applied with `git apply`, and every file is compared with the
//! vendored tree.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Files cargo writes when it unpacks a crate, not part of the published source we vendor.
const UNPACK_FILES: [&str; 3] = [".cargo-ok", ".cargo_vcs_info.json", "Cargo.lock"];

pub fn vendor_check(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("vendor-check takes no arguments, got `{a}`");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let vendored = root.join("vendor/candle-core");
    let patch = root.join("vendor/candle-core.patch");
    let version = crate_version(&vendored.join("Cargo.toml"))?;
    let pristine = match registry_copy(&version) {
        Some(p) => p,
        None => {
            fetch(&version)?;
            registry_copy(&version).with_context(|| {
                format!(
                    "cargo fetched candle-core {version}, but its source is not in the registry"
                )
            })?
        }
    };
    let work = std::env::temp_dir().join(format!("ddpm-vendor-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    copy_tree(&pristine, &work)?;
    let mut apply = std::process::Command::new("git");
    apply
        .args(["apply", "--whitespace=nowarn"])
        .arg(&patch)
        .current_dir(&work);
    let applied = crate::run(apply).with_context(|| {
        format!(
            "{} does not apply to candle-core {version} as published",
            patch.display()
        )
    });
    let differences = applied.and_then(|()| compare_trees(&work, &vendored));
    let _ = std::fs::remove_dir_all(&work);
    let differences = differences?;
    if !differences.is_empty() {
        bail!(
            "vendor/candle-core is not candle-core {version} + vendor/candle-core.patch; these \
             files differ:\n  {}\nPut the change into the patch (vendor/README.md says how) or \
             undo it",
            differences.join("\n  ")
        );
    }
    eprintln!(
        "xtask: vendor/candle-core = candle-core {version} from crates.io + {} ({} files compared)",
        patch.display(),
        files(&vendored)?.len()
    );
    Ok(())
}

/// `version = "X.Y.Z"` of a crate's manifest.
fn crate_version(manifest: &Path) -> Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("version = \"")?;
            Some(v.trim_end_matches('"').to_string())
        })
        .with_context(|| format!("{} names no version", manifest.display()))
}

/// `$CARGO_HOME/registry/src/*/candle-core-VERSION`, if cargo has unpacked it.
fn registry_copy(version: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    std::fs::read_dir(home.join("registry/src"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(format!("candle-core-{version}")))
        .find(|p| p.join("Cargo.toml").exists())
}

/// Has cargo download and unpack candle-core `version` from crates.io (a throw-away manifest
/// that depends on it, `cargo fetch`).
fn fetch(version: &str) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ddpm-vendor-fetch-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"pristine\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             [workspace]\n[dependencies]\ncandle-core = \"={version}\"\n"
        ),
    )?;
    std::fs::write(dir.join("src/lib.rs"), "")?;
    let mut cmd = crate::cargo();
    cmd.arg("fetch").current_dir(&dir);
    let fetched = crate::run(cmd).with_context(|| {
        format!("cannot fetch candle-core {version} from crates.io (is it reachable?)")
    });
    let _ = std::fs::remove_dir_all(&dir);
    fetched
}

/// Relative paths of the files under `root`, sorted, without cargo's unpack files.
fn files(root: &Path) -> Result<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root)?.to_path_buf();
                if !(rel.parent() == Some(Path::new(""))
                    && UNPACK_FILES.iter().any(|f| rel == Path::new(f)))
                {
                    out.insert(rel);
                }
            }
        }
    }
    Ok(out)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for rel in files(from)? {
        let dst = to.join(&rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from.join(&rel), &dst)
            .with_context(|| format!("copying {}", from.join(&rel).display()))?;
    }
    Ok(())
}

/// The files that are in one tree only or whose bytes differ.
fn compare_trees(a: &Path, b: &Path) -> Result<Vec<String>> {
    let (fa, fb) = (files(a)?, files(b)?);
    let mut out = Vec::new();
    for rel in fa.union(&fb) {
        let shown = rel.display();
        match (fa.contains(rel), fb.contains(rel)) {
            (true, false) => out.push(format!("{shown} (missing from vendor/candle-core)")),
            (false, true) => out.push(format!("{shown} (only in vendor/candle-core)")),
            _ => {
                if std::fs::read(a.join(rel))? != std::fs::read(b.join(rel))? {
                    out.push(format!("{shown} (contents differ)"));
                }
            }
        }
    }
    Ok(out)
}
