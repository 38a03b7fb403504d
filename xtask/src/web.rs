//! `cargo xtask web [--out DIR] [--model FILE] [--toolchain auto|rustup|debian] [--serve]
//! [--port N] [--test]`: the page of web/ with crates/ddpm-web compiled to WebAssembly
//! (docs/web.md).
//!
//! The wasm32 toolchain: rustup's `wasm32-unknown-unknown` target where it is installed; else
//! the Debian route, a Debian root made by web/debian-root.sh (`$DDPM_WASM_ROOT`, default
//! /opt/ddpm-wasm-root) whose rustc has the prebuilt wasm32 standard library, entered with
//! chroot (root only). The build says which it took. The wasm-bindgen CLI is the version
//! crates/ddpm-web pins, installed with `cargo install --locked` into target/tools.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, run};

const TARGET: &str = "wasm32-unknown-unknown";
/// The page's budgets (issue #28): the wasm and the whole page, model included.
const WASM_BUDGET: u64 = 4_000_000;
const PAGE_BUDGET: u64 = 12_000_000;
/// Which wasm32 toolchain builds the page.
#[derive(Clone, Copy, PartialEq)]
enum Toolchain {
    /// rustup's target where installed, else the Debian root.
    Auto,
    Rustup,
    Debian,
}

const PAGE_FILES: [&str; 4] = ["index.html", "style.css", "main.js", "worker.js"];

struct Options {
    out: PathBuf,
    toolchain: Toolchain,
    model: PathBuf,
    serve: bool,
    port: u16,
    test: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        out: PathBuf::from("target/web"),
        toolchain: Toolchain::Auto,
        model: PathBuf::from("assets/ddpm-small-student.safetensors"),
        serve: false,
        port: 8080,
        test: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "--out" => o.out = value("--out")?.into(),
            "--model" => o.model = value("--model")?.into(),
            "--port" => {
                o.port = value("--port")?
                    .parse()
                    .context("--port: a port number (1-65535)")?
            }
            "--toolchain" => {
                o.toolchain = match value("--toolchain")?.as_str() {
                    "auto" => Toolchain::Auto,
                    "rustup" => Toolchain::Rustup,
                    "debian" => Toolchain::Debian,
                    t => bail!("--toolchain {t}: auto, rustup or debian"),
                }
            }
            "--serve" => o.serve = true,
            "--test" => o.test = true,
            other => bail!(
                "unknown option {other}: cargo xtask web [--out DIR] [--model FILE] \
                 [--toolchain auto|rustup|debian] [--serve] [--port N] [--test]"
            ),
        }
    }
    Ok(o)
}

pub fn web(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let repo = std::env::current_dir().context("the current directory")?;
    if !o.model.is_file() {
        bail!(
            "--model {}: no such file (the page's model: a checkpoint or an f16 export)",
            o.model.display()
        );
    }
    let wasm = build_wasm(&repo, o.toolchain)?;
    let bindgen = wasm_bindgen_cli(&repo)?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let mut cmd = Command::new(&bindgen);
    cmd.args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(o.out.join("pkg"))
        .arg(&wasm);
    run(cmd)?;
    for f in PAGE_FILES {
        std::fs::copy(repo.join("web").join(f), o.out.join(f))
            .with_context(|| format!("copying web/{f} into {}", o.out.display()))?;
    }
    std::fs::copy(&o.model, o.out.join("model.safetensors"))
        .with_context(|| format!("copying --model {}", o.model.display()))?;
    let (wasm_bytes, page_bytes) = weigh(&o.out)?;
    eprintln!(
        "xtask web: {} — wasm {:.2} MB (budget 4), page {:.2} MB with the model (budget 12)",
        o.out.display(),
        wasm_bytes as f64 / 1e6,
        page_bytes as f64 / 1e6
    );
    if wasm_bytes > WASM_BUDGET || page_bytes > PAGE_BUDGET {
        eprintln!("xtask web: warning: over budget (docs/web.md)");
    }
    if o.test {
        return browser_test(&repo, &o);
    }
    if o.serve {
        let listener = TcpListener::bind(("127.0.0.1", o.port))
            .with_context(|| format!("--port {}: cannot listen on 127.0.0.1", o.port))?;
        eprintln!(
            "xtask web: serving {} at http://127.0.0.1:{}/ (Ctrl-C stops)",
            o.out.display(),
            o.port
        );
        serve(listener, &o.out);
    }
    Ok(())
}

/// The page's wasm and its total weight (everything it loads: the folder's files).
fn weigh(out: &Path) -> Result<(u64, u64)> {
    let wasm = std::fs::metadata(out.join("pkg/ddpm_web_bg.wasm"))
        .context("the built wasm")?
        .len();
    let mut total = 0;
    let mut stack = vec![out.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata()?.len();
            }
        }
    }
    Ok((wasm, total))
}

/// Builds crates/ddpm-web for wasm32 in target/wasm and returns the .wasm's path.
fn build_wasm(repo: &Path, toolchain: Toolchain) -> Result<PathBuf> {
    let target_dir = repo.join("target/wasm");
    let wasm = target_dir.join(TARGET).join("web/ddpm_web.wasm");
    let args = [
        "build",
        "--profile",
        "web",
        "--locked",
        "--target",
        TARGET,
        "-p",
        "ddpm-web",
    ];
    let rustup = rustup_has_wasm32();
    if toolchain == Toolchain::Rustup && !rustup {
        bail!("--toolchain rustup: rustup has no {TARGET} target (rustup target add {TARGET})");
    }
    if rustup && toolchain != Toolchain::Debian {
        eprintln!("xtask web: toolchain: rustup's {TARGET} target");
        let mut cmd = cargo();
        cmd.args(args).env("CARGO_TARGET_DIR", &target_dir);
        run(cmd)?;
        return Ok(wasm);
    }
    let root = PathBuf::from(
        std::env::var("DDPM_WASM_ROOT").unwrap_or_else(|_| "/opt/ddpm-wasm-root".into()),
    );
    if !(root.join("usr/bin/cargo").exists() && root.join("usr/lib/rustlib").join(TARGET).is_dir())
    {
        bail!(
            "no wasm32 toolchain: rustup has no {TARGET} target (`rustup target add {TARGET}` \
             where rustup can download), and {} is not a Debian root with one (make it with \
             `sudo bash web/debian-root.sh`, or point DDPM_WASM_ROOT at one); docs/web.md",
            root.display()
        );
    }
    let version = Command::new("chroot")
        .arg(&root)
        .args(["rustc", "-V"])
        .output()
        .context("chroot into the Debian root (needs root)")?;
    if !version.status.success() {
        bail!(
            "chroot {} rustc -V failed ({}): the Debian route needs root",
            root.display(),
            String::from_utf8_lossy(&version.stderr).trim()
        );
    }
    eprintln!(
        "xtask web: toolchain: the Debian route, {} in {}",
        String::from_utf8_lossy(&version.stdout).trim(),
        root.display()
    );
    let _mounts = DebianRoot::enter(&root, repo)?;
    let mut cmd = Command::new("chroot");
    cmd.arg(&root).env_clear();
    for var in [
        "HOME",
        "TERM",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CARGO_TARGET_DIR", &target_dir)
        // Debian's rustc links wasm with wasm-ld (rustup's ships rust-lld).
        .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", "wasm-ld")
        .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
        .args(["sh", "-c"])
        .arg(format!(
            "cd '{}' && cargo {}",
            repo.display(),
            args.join(" ")
        ));
    run(cmd)?;
    Ok(wasm)
}

fn rustup_has_wasm32() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == TARGET)
        })
        .unwrap_or(false)
}

/// The bind mounts a chroot build needs (the repository at its own path, cargo's registry,
/// /proc) and the host's CA certificates; unmounted when dropped.
struct DebianRoot {
    mounted: Vec<PathBuf>,
}

impl DebianRoot {
    fn enter(root: &Path, repo: &Path) -> Result<Self> {
        let mut me = Self {
            mounted: Vec::new(),
        };
        // The host's trust store, so that cargo inside trusts what the host's does (a
        // proxy's CA, say).
        let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if certs.is_file() {
            std::fs::copy(certs, root.join("etc/ssl/certs/ca-certificates.crt"))
                .context("copying the host's CA certificates into the Debian root")?;
        }
        let home = std::env::var("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")));
        let mut binds = vec![(repo.to_path_buf(), repo.to_path_buf())];
        if let Ok(home) = home {
            let registry = home.join("registry");
            std::fs::create_dir_all(&registry).ok();
            binds.push((registry, PathBuf::from("/root/.cargo/registry")));
        }
        for (src, dst) in binds {
            let at = root.join(dst.strip_prefix("/").unwrap_or(&dst));
            std::fs::create_dir_all(&at).with_context(|| format!("creating {}", at.display()))?;
            me.mount(Command::new("mount").arg("--bind").arg(&src).arg(&at), at)?;
        }
        let proc_at = root.join("proc");
        me.mount(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(&proc_at),
            proc_at,
        )?;
        Ok(me)
    }

    fn mount(&mut self, cmd: &mut Command, at: PathBuf) -> Result<()> {
        // Already mounted (an earlier build that was killed): use it, and leave it.
        let already = Command::new("mountpoint")
            .arg("-q")
            .arg(&at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if already {
            return Ok(());
        }
        let status = cmd
            .status()
            .with_context(|| format!("mounting {}", at.display()))?;
        if !status.success() {
            bail!(
                "mounting {} failed: the Debian route needs root",
                at.display()
            );
        }
        self.mounted.push(at);
        Ok(())
    }
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        for at in self.mounted.iter().rev() {
            let _ = Command::new("umount").arg(at).status();
        }
    }
}

/// The pinned version of wasm-bindgen (crates/ddpm-web/Cargo.toml's `=X.Y.Z`).
fn pinned_bindgen(repo: &Path) -> Result<String> {
    let toml = std::fs::read_to_string(repo.join("crates/ddpm-web/Cargo.toml"))
        .context("reading crates/ddpm-web/Cargo.toml")?;
    toml.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("wasm-bindgen = \"=")?;
            Some(rest.split('"').next()?.to_string())
        })
        .context(
            "crates/ddpm-web/Cargo.toml must pin wasm-bindgen exactly (wasm-bindgen = \"=X.Y.Z\")",
        )
}

/// The wasm-bindgen CLI of the pinned version, installed into target/tools if missing.
fn wasm_bindgen_cli(repo: &Path) -> Result<PathBuf> {
    let version = pinned_bindgen(repo)?;
    let tools = repo.join("target/tools");
    let bin = tools.join("bin/wasm-bindgen");
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&version))
        .unwrap_or(false);
    if !have {
        eprintln!("xtask web: installing wasm-bindgen-cli {version} into target/tools");
        let mut cmd = cargo();
        cmd.args(["install", "--locked", "wasm-bindgen-cli", "--version"])
            .arg(&version)
            .arg("--root")
            .arg(&tools);
        run(cmd)?;
    }
    Ok(bin)
}

/// Serves `dir` over HTTP/1.1 on `listener` forever (one thread per connection): GET and
/// HEAD of the files under it, with the content types a page needs (application/wasm for
/// streaming compilation). No special headers: the page works from any static server.
fn serve(listener: TcpListener, dir: &Path) {
    for stream in listener.incoming().flatten() {
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            if let Err(e) = answer(stream, &dir) {
                eprintln!("xtask web: {e:#}");
            }
        });
    }
}

fn answer(stream: TcpStream, dir: &Path) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // The headers: read and ignored.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let rel = if path.ends_with('/') {
        format!("{path}index.html")
    } else {
        path.to_string()
    };
    let mut out = stream;
    let safe = rel.split('/').all(|seg| seg != ".." && !seg.contains('\\'));
    let file = dir.join(rel.trim_start_matches('/'));
    let body = match (method, safe) {
        ("GET" | "HEAD", true) => std::fs::read(&file).ok(),
        _ => None,
    };
    match body {
        Some(body) => {
            let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
            let kind = match ext {
                "html" => "text/html; charset=utf-8",
                "css" => "text/css; charset=utf-8",
                "js" | "mjs" => "text/javascript; charset=utf-8",
                "wasm" => "application/wasm",
                "png" => "image/png",
                "json" => "application/json",
                _ => "application/octet-stream",
            };
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                 Cache-Control: no-cache\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if method == "GET" {
                out.write_all(&body)?;
            }
        }
        None => {
            let msg = b"not found";
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                msg.len()
            )?;
            out.write_all(msg)?;
        }
    }
    Ok(())
}

/// The browser test: serves the page on a free port, drives headless Chromium through
/// web/test/browser.mjs (playwright-core, `npm ci` in web/test), then checks what it read
/// back with crates/ddpm-web/tests/browser.rs (the classifier, the CPU's digits, the weights).
fn browser_test(repo: &Path, o: &Options) -> Result<()> {
    let node_modules = repo.join("web/test/node_modules/playwright-core");
    if !node_modules.is_dir() {
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(repo.join("web/test"));
        run(npm).context("installing playwright-core (npm ci in web/test)")?;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        bail!(
            "no Chromium at {chromium}: install Debian's chromium (apt-get install chromium) or \
             set CHROMIUM to a Chromium binary"
        );
    }
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("listening on 127.0.0.1")?;
    let url = format!("http://127.0.0.1:{}/", listener.local_addr()?.port());
    let dir = o.out.clone();
    std::thread::spawn(move || serve(listener, &dir));
    let results = repo.join("target/web-test");
    std::fs::create_dir_all(&results)?;
    let mut node = Command::new("node");
    node.arg(repo.join("web/test/browser.mjs"))
        .arg(&url)
        .arg(&results)
        .arg("7")
        .env("CHROMIUM", &chromium);
    run(node)?;
    let mut check = cargo();
    check
        .args([
            "test",
            "-p",
            "ddpm-web",
            "--test",
            "browser",
            "--",
            "--nocapture",
        ])
        .env("DDPM_WEB_RESULT", results.join("result.json"))
        .env("DDPM_WEB_MODEL", o.model.canonicalize()?)
        .env("DDPM_WEB_DIR", o.out.canonicalize()?);
    run(check)?;
    eprintln!(
        "xtask web: browser test passed; screenshot {}",
        results.join("page.png").display()
    );
    Ok(())
}
