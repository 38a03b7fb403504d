//! `cargo xtask gallery`: regenerates the README's pictures from one checkpoint with the
//! project's own commands, and writes `docs/gallery.md` listing each picture with the command
//! that made it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask gallery [--checkpoint PATH] [--run DIR] [--out DIR]
                           [--eval-n N] [--eval-steps S] [--no-eval] [--eval-report PATH]
                           [--device cpu|cuda] [--ddpm PATH]

--checkpoint  default: assets/ddpm-mnist.safetensors, else runs/default/checkpoint.safetensors
--run         the training run whose loss.png to show (default: the checkpoint's folder)
--out         where the pictures go (default: docs/img/gallery)
--eval-n      samples per guidance weight for the trade-off plot (default 1000 with
              --device cuda; on a CPU the plot needs --eval-n or --eval-report, since
              evaluating the mnist preset there takes hours per guidance weight)
--eval-report redraw the trade-off plot from these `ddpm eval` report.json files (comma-
              separated, merged by `ddpm eval --replot`) instead of sampling again: e.g. a
              10,000-sample evaluation made on a GPU
--device      where sample and eval compute (cuda needs a CUDA build; see --ddpm)
--ddpm        use this ddpm binary instead of building one (a CUDA build on a GPU machine)";

struct Opts {
    checkpoint: Option<PathBuf>,
    run: Option<PathBuf>,
    out: PathBuf,
    eval_n: Option<usize>,
    eval_steps: usize,
    eval: bool,
    eval_report: Option<PathBuf>,
    device: String,
    ddpm: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        checkpoint: None,
        run: None,
        out: PathBuf::from("docs/img/gallery"),
        eval_n: None,
        eval_steps: 50,
        eval: true,
        eval_report: None,
        device: "cpu".into(),
        ddpm: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{a} needs a value\n\n{USAGE}"))
        };
        match a.as_str() {
            "--checkpoint" => o.checkpoint = Some(PathBuf::from(val()?)),
            "--run" => o.run = Some(PathBuf::from(val()?)),
            "--out" => o.out = PathBuf::from(val()?),
            "--eval-n" => o.eval_n = Some(val()?.parse().context("--eval-n")?),
            "--eval-steps" => o.eval_steps = val()?.parse().context("--eval-steps")?,
            "--no-eval" => o.eval = false,
            "--eval-report" => o.eval_report = Some(PathBuf::from(val()?)),
            "--device" => o.device = val()?,
            "--ddpm" => o.ddpm = Some(PathBuf::from(val()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option `{other}`\n\n{USAGE}"),
        }
    }
    Ok(o)
}

/// Regenerates the gallery.
pub fn gallery(cli: &[String]) -> Result<()> {
    let o = parse(cli)?;
    let ckpt = match o.checkpoint.clone().or_else(|| {
        [
            "assets/ddpm-mnist.safetensors",
            "runs/default/checkpoint.safetensors",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    }) {
        Some(p) => p,
        None => bail!(
            "no checkpoint: pass --checkpoint, or train one with `cargo xtask train` \
             (assets/ddpm-mnist.safetensors and runs/default/checkpoint.safetensors are missing)"
        ),
    };
    if !ckpt.exists() {
        bail!("--checkpoint {}: no such file", ckpt.display());
    }
    if o.device != "cpu" && o.device != "cuda" {
        bail!("--device: `{}` is neither cpu nor cuda", o.device);
    }
    let ddpm = match &o.ddpm {
        Some(p) => p.clone(),
        None => {
            let mut build = crate::cargo();
            build.args(["build", "--release", "-p", "ddpm-cli"]);
            let mut target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
            if o.device == "cuda" {
                build.args(["--features", "cuda", "--target-dir", "target/cuda"]);
                target = "target/cuda".into();
            }
            crate::run(build)?;
            Path::new(&target).join("release/ddpm")
        }
    };
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let out = |name: &str| o.out.join(name).display().to_string();
    let c = ckpt.display().to_string();
    // (picture shown, `ddpm CMD [--checkpoint C] FLAGS --out OUT/FILE`, caption): FILE is the
    // picture shown; FLAGS are split on spaces (they hold no paths; `{gif}` stands for
    // OUT/reverse.gif, and the GIF steps show the GIF instead of their --out grid).
    let step = |file: &str, cmd: &str, flags: &str, caption: &str| {
        let mut a: Vec<String> = cmd.split_whitespace().map(String::from).collect();
        if matches!(cmd, "sample" | "reconstruct") {
            a.extend(["--checkpoint".to_string(), c.clone()]);
        }
        a.extend(flags.split_whitespace().map(|f| match f {
            "{gif}" => out("reverse.gif"),
            f => f.to_string(),
        }));
        a.extend(["--out".to_string(), out(file)]);
        (file.to_string(), a, caption.to_string())
    };
    let showing =
        |gif: &str, (_, a, caption): (String, Vec<String>, String)| (gif.to_string(), a, caption);
    // The sampling pictures name `--sampler dpm++` (DPM-Solver++(2M) in its 20 leading steps,
    // the default that drew them): the default is now DPM-Solver++(3M) in 8 log-SNR steps
    // (docs/sampling.md), and 20 steps also make a smoother animation than 8.
    let mut steps: Vec<(String, Vec<String>, String)> = vec![
        step(
            "noise.png",
            "noise",
            "--index 0 --rows 4",
            "The forward process q(x_t | x_0) on four test digits, t = 0 … 999",
        ),
        step(
            "samples-w3.png",
            "sample",
            "--class all --n 8 --guidance 3 --sampler dpm++",
            "One row per class at the default guidance w = 3 (DPM-Solver++(2M), 20 steps)",
        ),
        step(
            "sweep.png",
            "sample",
            "--class all --n 4 --sweep 0,1,3,5 --scale 2 --sampler dpm++",
            "The same noise at w = 0, 1, 3, 5",
        ),
        showing(
            "reverse.gif",
            step(
                "reverse-final.png",
                "sample",
                "--class all --n 1 --gif {gif} --sampler dpm++",
                "Reverse diffusion, one digit per class",
            ),
        ),
        showing(
            "reverse-light.gif",
            step(
                "reverse-final.png",
                "sample",
                "--class all --n 1 --gif {gif} --gif-theme both --sampler dpm++",
                "The same animation for light and dark pages (reverse-light.gif and \
                 reverse-dark.gif, for a README's <picture> with prefers-color-scheme)",
            ),
        ),
        step(
            "preview.png",
            "data preview",
            "--dataset mnist --per-class 10",
            "The training data: ten real digits per class",
        ),
        step(
            "reconstruct.png",
            "reconstruct",
            "--t 50,200,400,600,800,999",
            "Reconstruction: one test digit per class (first column) noised to t = 50 … 999 and \
             denoised back with DDIM; small t keeps the digit, t near T draws a fresh one",
        ),
        step(
            "reconstruct-as-3.png",
            "reconstruct",
            "--t 200,400,600,800 --as-class 3 --guidance 2",
            "Guided editing (SDEdit): the same digits noised to t and denoised as a 3 at w = 2",
        ),
    ];
    let eval_dir = o.out.join("eval");
    if let Some(report) = &o.eval_report {
        for part in report.to_string_lossy().split(',') {
            if !Path::new(part).exists() {
                bail!("--eval-report {part}: no such file");
            }
        }
        steps.push((
            "eval/fid_vs_is.png".into(),
            args(&[
                "eval",
                "--replot",
                &report.display().to_string(),
                "--out",
                &eval_dir.display().to_string(),
            ]),
            "fid_mnist against IS across guidance weights, redrawn from an earlier `ddpm eval` \
             report (also eval/accuracy_vs_w.png and eval/report.json)"
                .into(),
        ));
    } else if o.eval && o.device == "cpu" && o.eval_n.is_none() {
        eprintln!(
            "xtask gallery: no trade-off plot: on a CPU pass --eval-report REPORT.json (e.g. \
             docs/eval/*.json) or --eval-n N (hours per guidance weight for the mnist preset)"
        );
    } else if o.eval {
        steps.push((
            "eval/fid_vs_is.png".into(),
            args(&[
                "eval", "--checkpoint", &c, "--n", &o.eval_n.unwrap_or(1000).to_string(), "--steps",
                &o.eval_steps.to_string(), "--out", &eval_dir.display().to_string(),
            ]),
            "fid_mnist against IS across w = 0, 0.5, 1, 2, 3, 5 (also eval/accuracy_vs_w.png and eval/report.json)".into(),
        ));
    }
    let mut md = String::from(
        "# Gallery\n\nMade by `cargo xtask gallery` from one checkpoint; each picture with the \
         command that made it.\n\n",
    );
    md.push_str(&format!("Checkpoint: `{c}`\n\n"));
    for (file, a, caption) in &steps {
        let mut cmd = Command::new(&ddpm);
        cmd.args(a).env("RUST_LOG", "warn");
        let mut shown = a.join(" ");
        if o.device == "cuda" && (a[0] == "sample" || (a[0] == "eval" && a[1] != "--replot")) {
            cmd.args(["--device", "cuda"]);
            shown.push_str(" --device cuda");
        }
        crate::run(cmd)?;
        md.push_str(&format!(
            "## {caption}\n\n```bash\nddpm {shown}\n```\n\n![{caption}]({file})\n\n"
        ));
    }
    let run_dir = o
        .run
        .clone()
        .or_else(|| ckpt.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let loss = run_dir.join("loss.png");
    if loss.exists() {
        std::fs::copy(&loss, o.out.join("loss.png"))
            .with_context(|| format!("copying {}", loss.display()))?;
        md.push_str(&format!(
            "## Loss curves of the training run\n\nWritten by `ddpm train` as `{}`.\n\n![loss](loss.png)\n\n",
            loss.display()
        ));
    } else {
        eprintln!(
            "xtask gallery: no loss.png in {} (pass --run DIR): the gallery has no loss curves",
            run_dir.display()
        );
    }
    let md_path = o.out.join("README.md");
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    eprintln!(
        "xtask gallery: wrote {} and its pictures",
        md_path.display()
    );
    Ok(())
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}
