//! `cargo xtask bench`: training-step and forward throughput plus peak RSS for each preset,
//! with our kernels, candle's stock ones and (when `import torch` works) the PyTorch
//! reference of the identical architecture, side by side, with achieved GFLOP/s against the
//! machine's GEMM GFLOP/s. Each figure comes from its own process, so peak RSS is its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cargo;

const USAGE: &str =
    "usage: cargo xtask bench [--presets tiny,small,mnist] [--modes train,forward,sample]
                         [--iters N] [--warmup N] [--rounds N]
                         [--train-batch N] [--forward-batch N]
                         [--sample-batch N] [--steps N]
                         [--no-stock] [--no-torch] [--torch-compile] [--python PATH]
                         [--device cpu|cuda] [--precisions f32,bf16] [--ddpm PATH] [--out DIR]

Modes: train (full training steps), forward (inference forward passes), sample (guided DDIM,
w = 3, --steps steps, --sample-batch images; not in the default list because it is slow on a CPU).
--rounds N: run every implementation N times, taking turns (ours, stock, PyTorch, ours, ...),
and report each one's median images/s with its range: on a shared machine the speed drifts by
10-20 % within minutes, and alternating exposes both sides to the same drift.
Threads: candle uses RAYON_NUM_THREADS (default: physical cores); the PyTorch reference is
given the same number through torch.set_num_threads.
--ddpm PATH: use this ddpm binary instead of building one (e.g. a CUDA build copied to a GPU
machine without a Rust toolchain). With --device cuda, `fast` is candle's forward with our
GEMM-based convolution backward and `stock` candle's own, and peak GPU memory is read by
polling nvidia-smi (the whole process: context included), for every implementation alike.
--precisions f32,bf16 (the default): each implementation runs in each precision: f32, and
bf16 autocast with f32 weights (ours: `ddpm bench --autocast bf16`; PyTorch: torch.autocast,
the one line a PyTorch user adds for speed). --precisions f32 skips bf16; --autocast X is
--precisions X. On the CPU our bf16 runs the reference path (bf16-rounded product inputs, f32
accumulation), and on a CPU with avx512_bf16 also the vdpbf16ps kernel (two rows:
DDPM_BF16_KERNEL=reference and =vdpbf16ps). Stock candle runs in f32 only.
Each preset and mode ends with a line: our best ÷ PyTorch's best (over precisions and
torch.compile), the figure to compare.";

struct Opts {
    presets: Vec<String>,
    modes: Vec<String>,
    iters: usize,
    warmup: usize,
    rounds: usize,
    train_batch: usize,
    forward_batch: usize,
    sample_batch: usize,
    steps: usize,
    ddpm: Option<PathBuf>,
    stock: bool,
    torch: bool,
    torch_compile: bool,
    python: String,
    device: String,
    precisions: Vec<String>,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        presets: vec!["tiny".into(), "small".into(), "mnist".into()],
        modes: vec!["train".into(), "forward".into()],
        iters: 3,
        warmup: 1,
        rounds: 1,
        train_batch: 128,
        forward_batch: 256,
        sample_batch: 1000,
        steps: 50,
        ddpm: None,
        stock: true,
        torch: true,
        torch_compile: false,
        python: std::env::var("DDPM_BENCH_PYTHON").unwrap_or_else(|_| "python3".into()),
        device: "cpu".into(),
        precisions: vec!["f32".into(), "bf16".into()],
        out: PathBuf::from("target/bench"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        let num = |v: String, name: &str| -> Result<usize> {
            v.parse()
                .with_context(|| format!("{name}: `{v}` is not a number"))
        };
        match a.as_str() {
            "--presets" => o.presets = val(a)?.split(',').map(str::to_string).collect(),
            "--modes" => o.modes = val(a)?.split(',').map(str::to_string).collect(),
            "--iters" => o.iters = num(val(a)?, a)?,
            "--warmup" => o.warmup = num(val(a)?, a)?,
            "--rounds" => o.rounds = num(val(a)?, a)?.max(1),
            "--train-batch" => o.train_batch = num(val(a)?, a)?,
            "--forward-batch" => o.forward_batch = num(val(a)?, a)?,
            "--sample-batch" => o.sample_batch = num(val(a)?, a)?,
            "--steps" => o.steps = num(val(a)?, a)?,
            "--ddpm" => o.ddpm = Some(PathBuf::from(val(a)?)),
            "--no-stock" => o.stock = false,
            "--no-torch" => o.torch = false,
            "--torch-compile" => o.torch_compile = true,
            "--python" => o.python = val(a)?,
            "--device" => o.device = val(a)?,
            "--precisions" | "--autocast" => {
                o.precisions = val(a)?.split(',').map(str::to_string).collect()
            }
            "--out" => o.out = PathBuf::from(val(a)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option `{other}`\n\n{USAGE}"),
        }
    }
    for m in &o.modes {
        if !["train", "forward", "sample"].contains(&m.as_str()) {
            bail!("--modes: `{m}` is not one of train, forward, sample");
        }
    }
    for p in &o.precisions {
        if !["f32", "bf16", "f16"].contains(&p.as_str()) {
            bail!("--precisions: `{p}` is not one of f32, bf16, f16");
        }
    }
    if o.device != "cpu" && o.device != "cuda" {
        bail!("--device: `{}` is neither cpu nor cuda", o.device);
    }
    Ok(o)
}

/// The CPU's model name and its bf16 flags (`avx512_bf16`, `amx_bf16`, or `none`), from
/// /proc/cpuinfo where there is one.
fn cpu_description() -> (String, String) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let flags = field("flags").unwrap_or_default();
    let bf16: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| *f == "avx512_bf16" || *f == "amx_bf16")
        .collect();
    let bf16 = if bf16.is_empty() {
        "none".to_string()
    } else {
        bf16.join(", ")
    };
    (model, bf16)
}

/// Polls `nvidia-smi` for the GPU's used memory while a measurement runs.
struct GpuMemWatch {
    child: std::process::Child,
}

impl GpuMemWatch {
    fn start() -> Option<Self> {
        Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "20",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()
            .map(|child| Self { child })
    }

    /// The largest reading, in MiB.
    fn stop(mut self) -> Option<f64> {
        let _ = self.child.kill();
        let out = self.child.wait_with_output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .reduce(f64::max)
    }
}

/// Runs a command that prints one JSON line on stdout; returns it parsed. With `gpu`, the
/// peak GPU memory seen by `nvidia-smi` while it ran is added as `peak_gpu_mib`.
fn json_of_on(cmd: &mut Command, gpu: bool) -> Result<Value> {
    let watch = if gpu { GpuMemWatch::start() } else { None };
    let result = json_of(cmd);
    // Stop the poller whether or not the measurement succeeded.
    let peak = watch.and_then(GpuMemWatch::stop);
    let mut v = result?;
    if let Some(peak) = peak {
        v["peak_gpu_mib"] = Value::from(peak);
    }
    Ok(v)
}

/// Runs a command that prints one JSON line on stdout; returns it parsed.
fn json_of(cmd: &mut Command) -> Result<Value> {
    eprintln!("xtask bench: {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{cmd:?} printed no JSON line:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing `{line}`"))
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// The run with the median images/s of one implementation's rounds, annotated with the number
/// of rounds, the range of images/s, and the largest peak memory of any round.
fn median_run(mut runs: Vec<Value>) -> Value {
    runs.sort_by(|a, b| f(a, "images_per_s").total_cmp(&f(b, "images_per_s")));
    let lo = runs.first().map_or(f64::NAN, |r| f(r, "images_per_s"));
    let hi = runs.last().map_or(f64::NAN, |r| f(r, "images_per_s"));
    let max_of = |key: &str| {
        runs.iter()
            .filter_map(|r| r.get(key).and_then(Value::as_f64))
            .reduce(f64::max)
    };
    let (rss, gpu) = (max_of("peak_rss_mib"), max_of("peak_gpu_mib"));
    let n = runs.len();
    let mut m = runs.swap_remove(n.saturating_sub(1) / 2);
    m["rounds"] = Value::from(n);
    m["images_per_s_min"] = Value::from(lo);
    m["images_per_s_max"] = Value::from(hi);
    if let Some(v) = rss {
        m["peak_rss_mib"] = Value::from(v);
    }
    if let Some(v) = gpu {
        m["peak_gpu_mib"] = Value::from(v);
    }
    m
}

/// Runs the benchmark grid and prints the table.
pub fn bench(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let gpu = o.device == "cuda";
    let ddpm = match &o.ddpm {
        Some(p) => p.clone(),
        None => {
            let mut build = cargo();
            build.args(["build", "--release", "-p", "ddpm-cli"]);
            if gpu {
                build.args(["--features", "cuda"]);
            }
            crate::run(build)?;
            let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
            Path::new(&target).join("release/ddpm")
        }
    };
    let ddpm_cmd = || {
        let mut c = Command::new(&ddpm);
        c.env("RUST_LOG", "warn");
        c
    };
    let torch_ok = o.torch
        && Command::new(&o.python)
            .args(["-c", "import torch"])
            .output()
            .map(|r| r.status.success())
            .unwrap_or(false);
    if o.torch && !torch_ok {
        eprintln!(
            "xtask bench: `{} -c 'import torch'` failed: no PyTorch column \
             (set DDPM_BENCH_PYTHON or --python to a Python with torch)",
            o.python
        );
    }

    let mut gemm = ddpm_cmd();
    gemm.args(["bench", "--mode", "gemm", "--device", &o.device]);
    let gemm = json_of(&mut gemm)?;
    let peak = f(&gemm, "gflops");
    let has_avx512_bf16 = cpu_description().1.contains("avx512_bf16");
    let nthreads = gemm
        .get("threads")
        .and_then(Value::as_u64)
        .unwrap_or(threads() as u64);

    let mut rows: Vec<Value> = Vec::new();
    let mut summaries: Vec<String> = Vec::new();
    for preset in &o.presets {
        let mut cfg = ddpm_cmd();
        cfg.args(["bench", "--mode", "config", "--model", preset]);
        let out = cfg.output().context("ddpm bench --mode config")?;
        if !out.status.success() {
            bail!(
                "--presets: `{preset}`: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let config = String::from_utf8_lossy(&out.stdout).trim().to_string();
        for mode in &o.modes {
            let batch = match mode.as_str() {
                "train" => o.train_batch,
                "sample" => o.sample_batch,
                _ => o.forward_batch,
            };
            // (kernels, precision) of ours; (compile, precision) of PyTorch.
            let autocast = |p: &String| (p != "f32").then(|| p.clone());
            // (kernels, autocast, DDPM_BF16_KERNEL) of ours: bf16 on a CPU with avx512_bf16
            // runs on both bf16 kernels.
            let bf16_kernels: &[Option<&str>] = if o.device == "cpu" && has_avx512_bf16 {
                &[Some("reference"), Some("vdpbf16ps")]
            } else {
                &[None]
            };
            let mut impls: Vec<(&str, Option<String>, Option<&str>)> = Vec::new();
            for p in &o.precisions {
                match autocast(p) {
                    Some(a) if a == "bf16" => {
                        for k in bf16_kernels {
                            impls.push(("fast", Some(a.clone()), *k));
                        }
                    }
                    a => impls.push(("fast", a, None)),
                }
            }
            if o.stock {
                impls.push(("stock", None, None));
            }
            let mut torch_variants = Vec::new();
            if torch_ok {
                for compile in [false, true] {
                    if compile && !o.torch_compile {
                        continue;
                    }
                    for p in &o.precisions {
                        torch_variants.push((compile, autocast(p)));
                    }
                }
            }
            let ours = |k: &str, autocast: &Option<String>, bf16_kernel: Option<&str>| {
                let mut c = ddpm_cmd();
                if let Some(kernel) = bf16_kernel {
                    c.env("DDPM_BF16_KERNEL", kernel);
                }
                c.args(["bench", "--mode", mode, "--model", preset, "--kernels", k]);
                c.args(["--batch", &batch.to_string(), "--device", &o.device]);
                c.args(["--iters", &o.iters.to_string()]);
                c.args(["--warmup", &o.warmup.to_string()]);
                c.args(["--steps", &o.steps.to_string()]);
                if let Some(a) = autocast {
                    c.args(["--autocast", a]);
                }
                c
            };
            let torch = |compile: bool, autocast: &Option<String>| {
                let mut c = Command::new(&o.python);
                c.arg("bench/torch_reference.py");
                c.args(["--config", &config, "--mode", mode]);
                c.args(["--batch", &batch.to_string()]);
                c.args(["--threads", &nthreads.to_string()]);
                c.args(["--iters", &o.iters.to_string()]);
                c.args(["--warmup", &o.warmup.to_string()]);
                c.args(["--device", &o.device]);
                c.args(["--steps", &o.steps.to_string()]);
                if compile {
                    c.arg("--compile");
                }
                if let Some(a) = autocast {
                    c.args(["--autocast", a]);
                }
                c
            };
            // runs[i]: every round's result of implementation i, in the order ours, stock,
            // PyTorch (eager, compiled).
            let n_impl = impls.len() + torch_variants.len();
            let mut runs: Vec<Vec<Value>> = vec![Vec::new(); n_impl];
            for _ in 0..o.rounds {
                for (i, (k, a, bk)) in impls.iter().enumerate() {
                    runs[i].push(json_of_on(&mut ours(k, a, *bk), gpu)?);
                }
                for (j, (compile, a)) in torch_variants.iter().enumerate() {
                    runs[impls.len() + j].push(json_of_on(&mut torch(*compile, a), gpu)?);
                }
            }
            let group: Vec<Value> = runs.into_iter().map(median_run).collect();
            let ours_params = group
                .first()
                .and_then(|r| r.get("params"))
                .and_then(Value::as_u64);
            for r in &group[impls.len()..] {
                let tp = r.get("params").and_then(Value::as_u64);
                if tp != ours_params {
                    bail!(
                        "the PyTorch reference of `{preset}` has {tp:?} parameters, ours \
                         {ours_params:?}: the architectures differ"
                    );
                }
            }
            // Eager PyTorch in f32 is the 1.00× reference of the × PyTorch column; the summary
            // line compares the best of each side.
            let torch_ips = group
                .iter()
                .find(|r| r.get("impl").and_then(Value::as_str) == Some("pytorch"))
                .map(|r| f(r, "images_per_s"));
            let best = |torch: bool| {
                group
                    .iter()
                    .filter(|r| {
                        let name = r.get("impl").and_then(Value::as_str).unwrap_or("");
                        name.starts_with("pytorch") == torch && !name.contains("stock")
                    })
                    .max_by(|a, b| f(a, "images_per_s").total_cmp(&f(b, "images_per_s")))
                    .map(|r| {
                        let name = r.get("impl").and_then(Value::as_str).unwrap_or("?");
                        (name.to_string(), f(r, "images_per_s"))
                    })
            };
            if let (Some((ours_name, ours_ips)), Some((torch_name, torch_best))) =
                (best(false), best(true))
            {
                summaries.push(format!(
                    "{preset} {mode} (batch {batch}): ours best {ours_name} {ours_ips:.1} images/s \
                     ÷ PyTorch best {torch_name} {torch_best:.1} = {:.2}×",
                    ours_ips / torch_best
                ));
            }
            let fwd_flops = group
                .iter()
                .find_map(|r| {
                    let g = f(r, "gflops");
                    let ips = f(r, "images_per_s");
                    (g.is_finite() && ips > 0.0).then(|| g / ips)
                })
                .unwrap_or(f64::NAN);
            for mut r in group {
                let ips = f(&r, "images_per_s");
                let gflops = ips * fwd_flops;
                r["model"] = Value::from(preset.as_str());
                r["gflops"] = Value::from(gflops);
                r["pct_of_gemm"] = Value::from(100.0 * gflops / peak);
                if let Some(t) = torch_ips {
                    r["vs_torch"] = Value::from(ips / t);
                }
                rows.push(r);
            }
        }
    }

    let mut table = String::new();
    let n = gemm.get("n").and_then(Value::as_u64).unwrap_or(0);
    let (cpu, flags) = cpu_description();
    table.push_str(&format!(
        "CPU: {cpu}; bf16 instructions: {flags}\nMachine GEMM ({n}³ f32, {nthreads} threads, {}): \
         {peak:.1} GFLOP/s\n\n",
        o.device
    ));
    table.push_str(
        "| preset | mode | batch | implementation | images/s | range (rounds) | × PyTorch | GFLOP/s | % of GEMM | peak RSS (MiB) | peak GPU (MiB) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let vs = r
            .get("vs_torch")
            .and_then(Value::as_f64)
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "–".into());
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.1}–{:.1} ({}) | {} | {:.1} | {:.0} % | {:.0} | {} |\n",
            s("model"),
            s("mode"),
            r.get("batch").and_then(Value::as_u64).unwrap_or(0),
            s("impl"),
            f(r, "images_per_s"),
            f(r, "images_per_s_min"),
            f(r, "images_per_s_max"),
            r.get("rounds").and_then(Value::as_u64).unwrap_or(1),
            vs,
            f(r, "gflops"),
            f(r, "pct_of_gemm"),
            f(r, "peak_rss_mib"),
            r.get("peak_gpu_mib")
                .and_then(Value::as_f64)
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "–".into()),
        ));
    }
    if !summaries.is_empty() {
        table.push_str("\nOurs-best ÷ PyTorch-best:\n\n");
        for line in &summaries {
            table.push_str(&format!("- {line}\n"));
        }
    }
    println!("{table}");
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let md = o.out.join("bench.md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    let jl = o.out.join("bench.jsonl");
    let lines: Vec<String> = std::iter::once(&gemm)
        .chain(rows.iter())
        .map(Value::to_string)
        .collect();
    std::fs::write(&jl, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", jl.display()))?;
    eprintln!("xtask bench: wrote {} and {}", md.display(), jl.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_run_keeps_the_middle_round_and_the_extremes() {
        let runs = [150.0, 120.0, 140.0]
            .iter()
            .zip([900.0, 950.0, 910.0])
            .map(|(ips, rss)| serde_json::json!({"images_per_s": ips, "peak_rss_mib": rss}))
            .collect();
        let m = median_run(runs);
        assert_eq!(f(&m, "images_per_s"), 140.0);
        assert_eq!(f(&m, "images_per_s_min"), 120.0);
        assert_eq!(f(&m, "images_per_s_max"), 150.0);
        assert_eq!(f(&m, "peak_rss_mib"), 950.0);
        assert_eq!(m["rounds"], 3);
        // an even count takes the lower middle; a single run is its own median
        let two = vec![
            serde_json::json!({"images_per_s": 2.0}),
            serde_json::json!({"images_per_s": 1.0}),
        ];
        assert_eq!(f(&median_run(two), "images_per_s"), 1.0);
        let one = vec![serde_json::json!({"images_per_s": 7.0})];
        assert_eq!(f(&median_run(one), "images_per_s"), 7.0);
    }
}
