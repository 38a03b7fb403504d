//! Every `ddpm_*::…` path that docs/architecture.md (and the other docs) cite names something a
//! user of the crates can reach: a public module, item or re-export, read from the sources as
//! rustc would resolve it (`pub mod`, `pub use … [as …]`, `pub fn/struct/enum/trait/const/type`),
//! and for what follows an item (a method, a variant, a field), a name defined in the crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `ddpm_…::…` paths inside backticks of `text`, brace groups expanded
/// (`ddpm_unet::ops::{conv, simd}` → two paths).
fn cited_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, span) in text.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let mut rest = span;
        while let Some(start) = rest.find("ddpm_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || "_:{}, ".contains(c)))
                .unwrap_or(tail.len());
            let mut path = tail[..end].trim_end().to_string();
            // A brace group that the span cuts (or none): keep what is whole.
            if path.matches('{').count() != path.matches('}').count() {
                path.truncate(path.find('{').unwrap_or(path.len()));
            }
            let path = path.trim_end_matches([':', ' ', ',']).to_string();
            if let Some((head, _)) = path.split_once(' ') {
                if !head.contains('{') {
                    out.extend(expand(head.trim_end_matches(',')));
                    rest = &tail[head.len()..];
                    continue;
                }
            }
            if path.contains("::") {
                out.extend(expand(&path));
            }
            rest = &tail[end..];
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `a::{b, c::d}` → `a::b`, `a::c::d`.
fn expand(path: &str) -> Vec<String> {
    match path.find('{') {
        None => vec![path.replace(' ', "")],
        Some(open) => {
            let close = path.rfind('}').unwrap_or(path.len());
            let prefix = &path[..open];
            let inner = &path[open + 1..close];
            split_top(inner)
                .into_iter()
                .flat_map(|part| expand(&format!("{prefix}{}", part.trim())))
                .collect()
        }
    }
}

/// Splits at the commas not inside braces.
fn split_top(s: &str) -> Vec<String> {
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        parts.push(cur);
    }
    parts
}

/// A module's source: its file and the folder its `mod x;` files live in.
struct Module {
    file: PathBuf,
    dir: PathBuf,
    path: Vec<String>,
}

fn crate_root(name: &str) -> Option<Module> {
    let dir = root()
        .join("crates")
        .join(name.replace('_', "-"))
        .join("src");
    dir.join("lib.rs").exists().then(|| Module {
        file: dir.join("lib.rs"),
        dir,
        path: vec![name.to_string()],
    })
}

/// The leaves of every `pub use` in `text`: (name it is visible as, the path it points to).
fn pub_uses(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("pub use ") {
        let stmt = &rest[i + 8..];
        let end = stmt.find(';').unwrap_or(stmt.len());
        let tree: String = stmt[..end].split_whitespace().collect::<Vec<_>>().join(" ");
        for leaf in expand_use(&tree) {
            let (target, alias) = match leaf.split_once(" as ") {
                Some((t, a)) => (t.trim().to_string(), a.trim().to_string()),
                None => {
                    let t = leaf.trim().to_string();
                    let name = t.rsplit("::").next().unwrap_or("").to_string();
                    (t, name)
                }
            };
            out.push((alias, target));
        }
        rest = &stmt[end..];
    }
    out
}

/// Like [`expand`], keeping `as` aliases.
fn expand_use(tree: &str) -> Vec<String> {
    match tree.find('{') {
        None => vec![tree.to_string()],
        Some(open) => {
            let close = tree.rfind('}').unwrap_or(tree.len());
            let prefix = &tree[..open];
            split_top(&tree[open + 1..close])
                .into_iter()
                .flat_map(|part| expand_use(&format!("{prefix}{}", part.trim())))
                .collect()
        }
    }
}

fn defines_pub_item(text: &str, name: &str) -> bool {
    let kinds = [
        "fn",
        "struct",
        "enum",
        "trait",
        "const",
        "type",
        "static",
        "const fn",
        "unsafe fn",
    ];
    kinds.iter().any(|k| {
        let pat = format!("pub {k} {name}");
        text.match_indices(&pat).any(|(i, _)| {
            text[i + pat.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
        })
    })
}

/// Whether a name is defined anywhere in the crate of `m` (a method, variant or field).
fn defined_in_crate(krate: &str, name: &str) -> bool {
    let dir = root()
        .join("crates")
        .join(krate.replace('_', "-"))
        .join("src");
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let t = std::fs::read_to_string(&p).unwrap();
                let word = |pat: &str| {
                    t.match_indices(pat).any(|(i, _)| {
                        t[i + pat.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
                    })
                };
                if word(&format!("fn {name}"))
                    || word(&format!("pub {name}"))
                    || word(&format!("    {name}"))
                {
                    return true;
                }
            }
        }
    }
    false
}

/// Resolves `segs` from module `m`; the reason when it fails.
fn resolve(m: Module, segs: &[String], depth: usize) -> Result<(), String> {
    if depth > 16 {
        return Err("re-exports loop".into());
    }
    let Some((seg, rest)) = segs.split_first() else {
        return Ok(());
    };
    let text =
        std::fs::read_to_string(&m.file).map_err(|e| format!("{}: {e}", m.file.display()))?;
    let here = m.path.join("::");
    if text.contains(&format!("pub mod {seg};")) || text.contains(&format!("pub mod {seg} {{")) {
        for file in [
            m.dir.join(format!("{seg}.rs")),
            m.dir.join(seg).join("mod.rs"),
        ] {
            if file.exists() {
                let mut path = m.path.clone();
                path.push(seg.clone());
                let sub = Module {
                    file,
                    dir: m.dir.join(seg),
                    path,
                };
                return resolve(sub, rest, depth + 1);
            }
        }
        return Ok(()); // an inline module: its items are not checked further
    }
    for (alias, target) in pub_uses(&text) {
        if alias != *seg {
            continue;
        }
        let mut t: Vec<String> = target.split("::").map(str::to_string).collect();
        let krate = m.path[0].clone();
        let start = match t[0].as_str() {
            "crate" => {
                t.remove(0);
                crate_root(&krate)
            }
            "self" => {
                t.remove(0);
                Some(Module { ..m })
            }
            s if s.starts_with("ddpm_") => {
                let name = t.remove(0);
                crate_root(&name)
            }
            s if crate_root(s).is_none()
                && !m.dir.join(format!("{s}.rs")).exists()
                && !m.dir.join(s).join("mod.rs").exists() =>
            {
                return Ok(()); // re-exported from an outside crate (candle, image, …)
            }
            _ => Some(m),
        };
        let Some(start) = start else {
            return Err(format!(
                "`{here}::{seg}` re-exports `{target}`, which is not found"
            ));
        };
        // A `pub use` of a private module's item resolves through that module.
        let start_text = std::fs::read_to_string(&start.file).unwrap_or_default();
        if let Some(first) = t.first() {
            if start_text.contains(&format!("mod {first};"))
                && !start_text.contains(&format!("pub mod {first};"))
            {
                let dir = start.dir.clone();
                let file = [
                    dir.join(format!("{first}.rs")),
                    dir.join(first).join("mod.rs"),
                ]
                .into_iter()
                .find(|f| f.exists());
                if let Some(file) = file {
                    let mut path = start.path.clone();
                    path.push(first.clone());
                    let sub = Module {
                        file,
                        dir: dir.join(first),
                        path,
                    };
                    let mut all: Vec<String> = t[1..].to_vec();
                    all.extend(rest.iter().cloned());
                    return resolve(sub, &all, depth + 1);
                }
            }
        }
        t.extend(rest.iter().cloned());
        return resolve(start, &t, depth + 1);
    }
    if defines_pub_item(&text, seg) || text.contains(&format!("macro_rules! {seg}")) {
        // What follows an item: a method, variant or field defined in the crate.
        return match rest.iter().find(|r| !defined_in_crate(&m.path[0], r)) {
            None => Ok(()),
            Some(r) => Err(format!("`{here}::{seg}` has no `{r}`")),
        };
    }
    if text.contains(&format!("mod {seg};")) || text.contains(&format!("mod {seg} {{")) {
        return Err(format!("`{here}::{seg}` is a private module"));
    }
    Err(format!("`{here}` has no public `{seg}`"))
}

#[test]
fn the_module_paths_the_docs_cite_exist() {
    let mut bad = Vec::new();
    let mut checked = 0;
    for doc in [
        "docs/architecture.md",
        "docs/cuda.md",
        "vendor/README.md",
        "README.md",
    ] {
        let Ok(text) = std::fs::read_to_string(root().join(doc)) else {
            continue;
        };
        for path in cited_paths(&text) {
            let segs: Vec<String> = path
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let Some(m) = crate_root(&segs[0]) else {
                bad.push(format!("{doc}: `{path}`: no crate {}", segs[0]));
                continue;
            };
            checked += 1;
            if let Err(e) = resolve(m, &segs[1..], 0) {
                bad.push(format!("{doc}: `{path}`: {e}"));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} paths found: is the extraction broken?"
    );
    assert!(
        bad.is_empty(),
        "paths in the docs that do not exist:\n{}",
        bad.join("\n")
    );
}

/// The checker itself: a real path passes, a private module and a missing item fail.
#[test]
fn the_path_checker_tells_real_paths_from_wrong_ones() {
    let check = |p: &str| {
        let segs: Vec<String> = p.split("::").map(str::to_string).collect();
        resolve(crate_root(&segs[0]).unwrap(), &segs[1..], 0)
    };
    assert_eq!(check("ddpm_unet::ops::precision"), Ok(()));
    assert_eq!(check("ddpm_train::budget::Budget::after_step"), Ok(()));
    assert_eq!(check("ddpm_train::Trainable"), Ok(()));
    assert!(check("ddpm_unet::ops::uninit").is_err(), "a private module");
    assert!(check("ddpm_train::budget::NoSuchThing").is_err());
    assert_eq!(
        cited_paths("see `ddpm_unet::ops::{conv, simd}` and `ddpm_core::files`"),
        vec![
            "ddpm_core::files",
            "ddpm_unet::ops::conv",
            "ddpm_unet::ops::simd"
        ]
    );
}
