//! `ddpm`: train, sample and inspect class-conditional DDPMs with classifier-free guidance.
//!
//! ```text
//! ddpm train --model small --epochs 5
//! ddpm sample --guidance 3 --class 7
//! ddpm noise --index 0 --t 0,50,100,200,400,999
//! ```

mod bench;
mod data;
mod distill;
mod eval;
mod export;
mod reconstruct;
mod sample;
mod train;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand, ValueEnum};

/// Class-conditional DDPMs with classifier-free guidance, on candle.
#[derive(Debug, Parser)]
#[command(name = "ddpm", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// On CUDA, run f32 matrix products on TF32 tensor cores (10-bit mantissa products, f32
    /// accumulation), as JAX does by default and PyTorch does for convolutions. `--tf32 false`
    /// for full f32 products. No effect on the CPU.
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set)]
    tf32: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (writes checkpoints, metrics, loss plots and sample grids to --out).
    Train(train::TrainArgs),
    /// Generate images from a checkpoint, with classifier-free guidance.
    Sample(sample::SampleArgs),
    /// Show the forward (noising) process on real digits.
    Noise(sample::NoiseArgs),
    /// Noise real test digits to each t and denoise them back (optionally as another class).
    Reconstruct(reconstruct::ReconstructArgs),
    /// Look at a dataset: `ddpm data preview` draws real images, one row per class.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Write a sampling-only copy of a checkpoint (EMA weights, f16 by default, with its card).
    Export(export::ExportArgs),
    /// Measure sample quality across guidance weights: class accuracy, fid_mnist, IS.
    Eval(eval::EvalArgs),
    /// Distil a guided model into a few-step student: w as an input (one call per step), then
    /// progressive halvings of its DDIM steps (each stage resumable, in its own folder).
    Distill(distill::DistillArgs),
    /// Train the MNIST classifier `eval` uses (writes assets/mnist-classifier.safetensors).
    TrainClassifier(eval::TrainClassifierArgs),
    /// Measure training and inference speed and memory (one figure per run, as JSON;
    /// `cargo xtask bench` runs the whole table).
    Bench(bench::BenchArgs),
}

/// The model a command loads: shared by `sample`, `eval` and `reconstruct`.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    #[command(flatten)]
    opts: ddpm_pipeline::ModelOptions,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

impl ModelArgs {
    /// Opens the device and loads the model: (model, its path, device).
    pub fn load(&self) -> Result<(ddpm_pipeline::Model, PathBuf, Device)> {
        let device = device(self.device)?;
        let path = checkpoint_or_default(self.opts.checkpoint.clone())?;
        let model = (self.opts.load(&path, &device))
            .with_context(|| format!("--checkpoint {}", path.display()))?;
        Ok((model, path, device))
    }
}

/// Where the computation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU (always available).
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Opens the device named by `--device`.
pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device cuda: this binary was built without CUDA support; rebuild with \
                     `cargo build --release --features cuda` (see docs/cuda.md) or use --device cpu"
                );
            }
            Device::new_cuda(0).context("--device cuda: cannot open GPU 0 (is a driver installed?)")
        }
    }
}

/// The IDX folder to load `kind` from: `--data-dir` if given; else, for MNIST when neither
/// `$DDPM_DATA_DIR` is set nor a checkout's `assets/mnist` lies around the current directory,
/// the copy in the source tree this binary was built from; else `None` (ddpm-data then looks
/// for itself, see [`ddpm_data::resolve_idx_dir`]).
pub fn data_dir(
    kind: &ddpm_data::DatasetKind,
    explicit: Option<&std::path::Path>,
) -> Option<PathBuf> {
    if let Some(d) = explicit {
        return Some(d.to_path_buf());
    }
    let env_set = std::env::var_os(ddpm_data::DATA_DIR_ENV).is_some_and(|v| !v.is_empty());
    if *kind != ddpm_data::DatasetKind::Mnist || env_set || ddpm_data::shipped_mnist_dir().is_some()
    {
        return None;
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/mnist");
    built
        .join("train-images-idx3-ubyte.gz")
        .exists()
        .then_some(built)
}

/// Loads `split` of `kind` from `explicit` or [`data_dir`]'s choice, naming what failed.
pub fn load(
    kind: &ddpm_data::DatasetKind,
    explicit: Option<&std::path::Path>,
    split: ddpm_data::Split,
    size: (u32, u32),
) -> Result<ddpm_data::ImageDataset> {
    ddpm_data::load_dataset(kind, data_dir(kind, explicit).as_deref(), split, size)
        .with_context(|| format!("loading the {} split of --dataset {kind}", split.name()))
}

/// Refuses to write `output` (given as `out_flag`) when it is one of the files the command reads
/// (`inputs`: each with its flag): the same file through any path, link or `..`
/// ([`ddpm_core::files::same_file`]). Called by every command before it reads or writes
/// anything large, so that no command replaces its own input.
pub fn refuse_overwrite(
    out_flag: &str,
    output: &std::path::Path,
    inputs: &[(&str, &std::path::Path)],
) -> Result<()> {
    for (flag, input) in inputs {
        if ddpm_core::files::same_file(output, input) {
            bail!(
                "{out_flag} {} is the file {flag} {} reads: writing it would destroy the input. \
                 Give another {out_flag}",
                output.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Refuses an output folder (`flag`) that exists as something other than a folder.
pub fn out_folder(flag: &str, dir: &std::path::Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => bail!(
            "{flag} {} is a file, not a folder: give a folder (it is created if missing)",
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// `--checkpoint`, or the default model ([`default_checkpoint`]), or an error saying how to
/// get one.
pub fn checkpoint_or_default(arg: Option<PathBuf>) -> Result<PathBuf> {
    match arg.or_else(default_checkpoint) {
        Some(p) => Ok(p),
        None => bail!(
            "no --checkpoint given and no trained model found (assets/ddpm-mnist.safetensors or \
             runs/default/checkpoint.safetensors). Train one with `cargo xtask train` \
             (or `cargo run --release -p ddpm-cli -- train --model small`), then run this again."
        ),
    }
}

/// The model `sample`, `eval` and `reconstruct` use when no `--checkpoint` is given, the first
/// that exists of: the shipped model in the source tree this binary was built from
/// (`<workspace>/assets/ddpm-mnist.safetensors`, so `cargo run` works from any directory),
/// `assets/ddpm-mnist.safetensors` under the current directory, then the default training
/// run's checkpoint in those two places (`runs/default/checkpoint.safetensors`). Only the
/// binary looks there; the libraries take paths (docs/architecture.md).
pub fn default_checkpoint() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        root.join("assets/ddpm-mnist.safetensors"),
        PathBuf::from("assets/ddpm-mnist.safetensors"),
        root.join("runs/default/checkpoint.safetensors"),
        PathBuf::from("runs/default/checkpoint.safetensors"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Keeps freed tensor buffers in the heap for reuse. By default glibc hands every buffer above
/// its (dynamic) mmap threshold back to the kernel, which zeroes fresh pages on the next
/// allocation: a third of a CPU forward pass went to page faults (docs/performance.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; it is called once, at start-up,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs piped to a file or CI stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tune_allocator();
    let matches = negative_numbers(<Cli as clap::CommandFactory>::command()).get_matches();
    let cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Flags the user typed (not defaults), for `train --resume` to report what it ignores.
    let explicit: Vec<String> = matches
        .subcommand_matches("train")
        .map(|m| {
            m.ids()
                .filter(|id| {
                    m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| id.as_str().to_string())
                .collect()
        })
        .unwrap_or_default();
    candle_core::cuda::set_gemm_reduced_precision_f32(cli.tf32);
    let run = move || match cli.command {
        Command::Train(a) => train::run(a, &explicit),
        Command::Sample(a) => sample::run(a),
        Command::Noise(a) => sample::noise(a),
        Command::Reconstruct(a) => reconstruct::run(a),
        Command::Data(c) => data::run(c),
        Command::Bench(a) => bench::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Distill(a) => distill::run(a),
        Command::Export(a) => export::run(a),
        Command::TrainClassifier(a) => eval::train_classifier(a),
    };
    in_thread_pool(run)
}

/// Lets every option that takes a value take a negative number, in every subcommand, so that
/// `--lr -1e-3` is refused for its value by the option's own check instead of being misread as
/// an unknown flag `-1`. Floating-point options take any value that starts with `-` (clap's
/// own test of a negative number has no negative exponent); a flag given there instead of a
/// number is then reported as an invalid number.
fn negative_numbers(cmd: clap::Command) -> clap::Command {
    use std::any::TypeId;
    let cmd = cmd.mut_args(|a| {
        if !a.get_action().takes_values() {
            return a;
        }
        let ty = a.get_value_parser().type_id();
        let float = ty == TypeId::of::<f64>() || ty == TypeId::of::<f32>();
        a.allow_negative_numbers(true).allow_hyphen_values(float)
    });
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    names
        .iter()
        .fold(cmd, |cmd, name| cmd.mut_subcommand(name, negative_numbers))
}

/// Runs `work` on a thread of rayon's global pool instead of the main thread.
///
/// Every tensor op that runs in parallel (candle's, the `gemm` crate's, ours) calls into rayon.
/// Called from the main thread, each such call is injected into the pool and the main thread
/// sleeps until a worker has finished it: a wake-up and a sleep per op, and one thread more than
/// there are cores, whose serial work competes with spinning workers. Called from a worker,
/// the caller takes part in the work itself (docs/performance.md: on 2 cores of a Zen 3, about
/// 10 % more training steps a second for `small`).
fn in_thread_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    // A larger stack than rayon's default (2 MiB), as on the main thread (8 MiB): autograd
    // walks the graph recursively. This is the first use of rayon, so the global pool is
    // built here; should it already exist, its workers are used as they are.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(16 << 20)
        .build_global();
    // `scope` called from outside the pool runs its body on a worker and blocks until it ends.
    rayon::scope(|_| work())
}
