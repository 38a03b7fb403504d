//! `ddpm distill`: the library is [`ddpm_train::distill`]; this adds the flags, the device,
//! the progress display and Ctrl-C.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_train::distill::{data_for, DistillPlan};
use ddpm_train::{budget, fit_timed, progress, FitOutcome, RunLock, TrainConfig};

use crate::DeviceArg;

/// Options of `ddpm distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    /// The guided teacher: a class-conditional ε-prediction checkpoint or export (e.g. what
    /// `cargo xtask train` wrote, runs/default/checkpoint.safetensors).
    #[arg(long)]
    teacher: PathBuf,
    /// Folder of the stages: guidance/, then steps-N/ for each halving (each a training run
    /// folder: checkpoint, metrics, grids).
    #[arg(long, default_value = "runs/distill")]
    out: PathBuf,
    /// Continue the distillation in --out where it stopped (finished stages are kept).
    #[arg(long)]
    resume: bool,
    /// The lowest guidance weight w the students learn (w is one of their inputs).
    #[arg(long, default_value_t = 0.0)]
    w_min: f64,
    /// The highest guidance weight w they learn.
    #[arg(long, default_value_t = 4.0)]
    w_max: f64,
    /// The DDIM steps of the guidance student that the first halving distils (its teacher
    /// runs this many; the student half).
    #[arg(long, default_value_t = 32)]
    from_steps: usize,
    /// The DDIM steps of the last student.
    #[arg(long, default_value_t = 4)]
    to_steps: usize,
    /// Optimizer steps of each stage.
    #[arg(long, default_value_t = 1000)]
    steps_per_stage: u64,
    /// Wall-clock budget of each stage (e.g. 10m, 1h): the stage plans its steps to end within
    /// it (and ends at --steps-per-stage if that comes first).
    #[arg(long, value_parser = budget::parse_duration)]
    stage_budget: Option<f64>,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak learning rate (after a 50-step warm-up, cosine decay to the end of each stage).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// EMA decay of the students' weights (the weights the next stage and sampling use).
    #[arg(long, default_value_t = 0.995)]
    ema_decay: f64,
    /// Guidance weight of the sample grids drawn after each stage.
    #[arg(long, default_value_t = 1.0)]
    sample_guidance: f64,
    /// Seed of every stage's draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder of the training images (default: the shipped MNIST).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Plain progress lines every this many seconds when stderr is not a terminal (0: never).
    #[arg(long, default_value_t = 30.0)]
    progress_every: f64,
}

impl DistillArgs {
    fn plan(&self) -> DistillPlan {
        DistillPlan {
            teacher: self.teacher.clone(),
            out: self.out.clone(),
            w_min: self.w_min,
            w_max: self.w_max,
            from_steps: self.from_steps,
            to_steps: self.to_steps,
            stage_config: TrainConfig {
                epochs: 1000,
                max_steps: Some(self.steps_per_stage),
                batch_size: self.batch,
                lr: self.lr,
                warmup_steps: 50,
                ema_decay: self.ema_decay,
                seed: self.seed,
                // Epochs outlast a stage: the one grid is the final one, drawn with the
                // guidance student's DDIM in --from-steps steps (a progressive student's in its
                // own).
                sample_every: 1,
                sample_steps: self.from_steps,
                sample_guidance: self.sample_guidance,
                checkpoint_every: 100,
                held_out_examples: 0,
                log_every: 50,
                budget: self.stage_budget.map(|s| ddpm_train::BudgetConfig {
                    seconds: s,
                    warmup_fraction: Some(0.05),
                    ema_horizon_fraction: None,
                }),
                ..TrainConfig::default()
            },
        }
    }
}

/// Runs `ddpm distill`.
pub fn run(a: DistillArgs) -> Result<()> {
    let device = crate::device(a.device)?;
    let plan = a.plan();
    let stages = plan.stages().context("--from-steps/--to-steps")?;
    if a.out.join("guidance").exists() && !a.resume {
        bail!(
            "--out {} already holds a distillation: pass --resume to continue it, or choose \
             another --out",
            a.out.display()
        );
    }
    if a.resume && !a.out.join("guidance").exists() {
        bail!(
            "--resume: {} holds no distillation yet; start one without --resume",
            a.out.display()
        );
    }
    let teacher_card = ddpm_unet::file::read(&a.teacher, &device)
        .with_context(|| format!("--teacher {}", a.teacher.display()))?
        .card;
    let kind: ddpm_data::DatasetKind = teacher_card
        .data
        .dataset
        .parse()
        .map_err(anyhow::Error::msg)?;
    let dir = crate::data_dir(&kind, a.data_dir.as_deref());
    let data = data_for(&teacher_card, dir.as_deref(), &device)
        .with_context(|| format!("the {kind} training images (--data-dir)"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        eprintln!("\nstopping: finishing this step and saving a checkpoint…");
        flag.store(true, Ordering::SeqCst);
    })
    .context("cannot install the signal handler (Ctrl-C, SIGTERM, SIGHUP)")?;
    for stage in &stages {
        let started = std::time::Instant::now();
        let _lock = RunLock::acquire(&stage.out)
            .with_context(|| format!("the stage folder {}", stage.out.display()))?;
        let (mut trainer, resumed) = plan
            .trainer(stage, &device)
            .map_err(ddpm_train::launch::with_flag_names)
            .with_context(|| {
                format!("stage {} (teacher {})", stage.name, stage.teacher.display())
            })?;
        if trainer.at_step_limit() {
            println!(
                "ddpm distill: stage {} is complete (step {})",
                stage.name,
                trainer.step()
            );
            continue;
        }
        println!(
            "ddpm distill: stage {} {} at step {} (teacher {})",
            stage.name,
            if resumed { "resumes" } else { "starts" },
            trainer.step(),
            stage.teacher.display()
        );
        let deadline = trainer.config().budget.map(|b| b.seconds);
        let mut bar = progress::Bar::new(started, deadline, a.progress_every);
        let outcome = fit_timed(
            &mut trainer,
            &data,
            &stage.out,
            &mut bar,
            &stop,
            &budget::WallClock::new(),
            started.elapsed().as_secs_f64(),
        )
        .with_context(|| {
            format!(
                "distilling stage {} into {}",
                stage.name,
                stage.out.display()
            )
        })?;
        bar.finish();
        if outcome == FitOutcome::Stopped {
            bail!(
                "stopped by a signal in stage {} at step {}; its checkpoint is saved: continue \
                 with the same command and --resume",
                stage.name,
                trainer.step()
            );
        }
        println!(
            "ddpm distill: stage {} done at step {} in {:.0} s: {}",
            stage.name,
            trainer.step(),
            started.elapsed().as_secs_f64(),
            ddpm_train::checkpoint_path(&stage.out).display()
        );
    }
    let last = stages.last().map(|s| ddpm_train::checkpoint_path(&s.out));
    if let Some(last) = last {
        println!(
            "ddpm distill: the {}-step student is {}; sample it with `ddpm sample --checkpoint {} \
             --guidance 1 --class 7`",
            a.to_steps,
            last.display(),
            last.display()
        );
    }
    Ok(())
}
