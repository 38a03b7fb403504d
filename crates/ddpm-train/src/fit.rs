//! The training loop: epochs, checkpoints, metrics, plots and sample grids.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};
use ddpm_data::{Batcher, Loader, LoaderConfig, TensorBatcher};
use ddpm_pipeline::{Labels, Request, SamplerKind, SamplerSpec};
use serde::{Deserialize, Serialize};

use crate::budget::{self, BudgetPlan, Clock, RunShape, StepCosts, WallClock};
use crate::checkpoint::PeriodState;
use crate::error::{Result, TrainError};
use crate::viz;
use crate::{Trainable, Trainer};

/// The data [`fit`] trains on.
#[derive(Debug)]
pub struct FitData {
    /// Training examples, already on the device.
    pub train: TensorBatcher,
    /// Number of training examples.
    pub train_len: usize,
    /// Held-out images `[N,C,H,W]` and labels `[N]` for the held-out loss.
    pub held_out: Option<(Tensor, Tensor)>,
}

impl FitData {
    /// The training examples of `train` (moved to `device`) and, when given, the held-out
    /// images and labels of `held_out`.
    pub fn new<D: ddpm_data::Dataset + ?Sized>(
        train: &D,
        held_out: Option<&ddpm_data::ImageDataset>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(Self {
            train: TensorBatcher::new(train, device)?,
            train_len: train.len(),
            held_out: held_out.map(|h| h.to_tensors(device)).transpose()?,
        })
    }
}

/// Reported after every optimizer step.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps taken so far.
    pub step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// The step's loss.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Training throughput over the last step.
    pub images_per_sec: f64,
}

/// One line of `metrics.jsonl`, written at every epoch end (and when a run stops early).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// Epoch (0-based) this line closes.
    pub epoch: u64,
    /// Optimizer steps taken.
    pub step: u64,
    /// Mean training loss since the previous line.
    pub train_loss: f64,
    /// ε-MSE on the held-out examples (fixed t and noise).
    pub held_out_loss: Option<f64>,
    /// Learning rate at the last step.
    pub lr: f64,
    /// Mean training throughput since the previous line.
    pub images_per_sec: f64,
    /// Seconds trained in total.
    pub elapsed_s: f64,
    /// The sample grid written, if any.
    pub sample_grid: Option<PathBuf>,
}

/// Callbacks for progress display (the binaries' progress bars).
pub trait TrainObserver {
    /// Before the first step: the step to start from and the total planned.
    fn on_start(&mut self, _start_step: u64, _total_steps: u64) {}
    /// A budgeted run's plan, once it is fixed (before `on_start`; only on the run's first start).
    fn on_plan(&mut self, _plan: &BudgetPlan) {}
    /// After each step.
    fn on_step(&mut self, _report: &StepReport) {}
    /// After each metrics line.
    fn on_epoch(&mut self, _report: &EpochReport) {}
    /// After each checkpoint is written.
    fn on_checkpoint(&mut self, _path: &Path) {}
    /// While a sample grid is drawn (after the checkpoint it belongs to): `done` of `total`
    /// sampler steps.
    fn on_grid(&mut self, _done: usize, _total: usize) {}
}

impl TrainObserver for () {}

/// Why [`fit`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitOutcome {
    /// All epochs done.
    Finished,
    /// `max_steps` or the budget's step count reached.
    MaxSteps,
    /// The stop flag was raised (Ctrl-C, SIGTERM, SIGHUP); a checkpoint was written (a grid
    /// being drawn is left unfinished, and drawn when the run resumes).
    Stopped,
    /// The run had already reached its step limit or its epochs: nothing was trained and no
    /// file was changed (a missing final grid is drawn).
    Complete,
    /// A budgeted run reached its deadline before its planned steps (the machine ran slower
    /// than its probe measured): it ended there, with its final grid and checkpoint, within
    /// the budget.
    Deadline,
}

/// The checkpoint [`fit`] writes in `out_dir`.
pub fn checkpoint_path(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoint.safetensors")
}

/// Trains until the configured epochs, `max_steps` or budget, or until `stop` is raised.
///
/// Writes into `out_dir`: `checkpoint.safetensors` (atomically, every
/// `checkpoint_every` steps, at each epoch end and on stop), `metrics.jsonl`,
/// `loss.png` and `samples/epoch_NNN.png`. On a NaN loss it returns the error and the
/// last good checkpoint stays as it was.
///
/// A run with a [`crate::TrainConfig::budget`] and no plan yet is planned first
/// ([`fit_timed`] with the wall clock and nothing spent before).
pub fn fit<N: Trainable>(
    trainer: &mut Trainer<N>,
    data: &FitData,
    out_dir: &Path,
    observer: &mut dyn TrainObserver,
    stop: &AtomicBool,
) -> Result<FitOutcome> {
    fit_timed(
        trainer,
        data,
        out_dir,
        observer,
        stop,
        &WallClock::new(),
        0.0,
    )
}

/// [`fit`], with the clock a budget is measured with and the seconds of the budget already
/// spent before this call (process start, data loading).
pub fn fit_timed<N: Trainable>(
    trainer: &mut Trainer<N>,
    data: &FitData,
    out_dir: &Path,
    observer: &mut dyn TrainObserver,
    stop: &AtomicBool,
    clock: &dyn Clock,
    spent_s: f64,
) -> Result<FitOutcome> {
    let planned_before = trainer.config().budget_steps.is_some();
    let (batch_size, seed) = (trainer.config().batch_size, trainer.config().seed);
    let loader = Loader::new(
        data.train_len,
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: data.train_len >= batch_size,
            seed,
        },
    )?;
    let per_epoch = loader.batches_per_epoch() as u64;
    trainer.set_steps_per_epoch(per_epoch);
    let ckpt = checkpoint_path(out_dir);
    std::fs::create_dir_all(out_dir).map_err(|source| TrainError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut deadline = None;
    if let (Some(b), false) = (trainer.config().budget, planned_before) {
        let started = clock.now_s();
        let costs = measure_costs(trainer, data, &loader, out_dir, clock)?;
        let spent = spent_s + (clock.now_s() - started);
        let c = trainer.config();
        let by_epochs = c.epochs.saturating_mul(per_epoch);
        // Capped by the epochs only: `max_steps` stays a separate limit (the lower one stops
        // the run), so a resumed run may raise it up to the budget's own plan.
        let cap = Some(by_epochs);
        let shape = RunShape {
            steps_per_epoch: per_epoch,
            sample_every: c.sample_every,
            checkpoint_every: c.checkpoint_every,
            log_every: c.log_every,
        };
        let plan = budget::plan_steps(b.seconds, spent, &costs, &shape, cap)?;
        trainer.apply_budget_plan(&plan)?;
        let c = trainer.config();
        tracing::info!(
            budget = %budget::format_duration(b.seconds),
            steps = plan.steps,
            step_s = costs.train_step_s,
            grid_s = costs.grid_s,
            predicted = %budget::format_duration(plan.predicted_s),
            warmup = c.warmup_steps,
            ema_decay = c.ema_decay,
            "budget planned"
        );
        observer.on_plan(&plan);
        // The run that planned also keeps to the budget's clock: a VM's speed drifts, and a
        // run slower than its probe ends early (final grid and checkpoint included) rather
        // than late.
        let c = trainer.config();
        let metrics_s = if data.held_out.is_some() {
            costs.held_out_s
        } else {
            0.0
        };
        let grid_s = if c.sample_every > 0 {
            costs.grid_s
        } else {
            0.0
        };
        // Ending costs the final grid, a metrics line and a checkpoint; so does an epoch end.
        let end_s = grid_s + metrics_s + costs.checkpoint_s;
        deadline = Some(Deadline {
            // 2 % kept back: the end's costs are estimates too.
            at_s: started - spent_s + b.seconds * 0.98,
            step_s: costs.train_step_s,
            end_s,
            metrics_s,
            epoch_end_s: end_s,
        });
    }
    let cfg = trainer.config().clone();
    let total = trainer.total_steps_hint();
    observer.on_start(trainer.step(), total);
    tracing::info!(
        start_step = trainer.step(),
        total_steps = total,
        per_epoch,
        "training"
    );
    // The metrics line in progress continues from the checkpoint, and lines written after the
    // checkpoint (by a run killed before its next one) are dropped: they are written again.
    let mut period = trainer.period;
    truncate_metrics(out_dir, trainer.step(), period.steps > 0)?;
    // A grid is drawn after its checkpoint: one the last run did not finish is drawn now.
    if trainer.step() > 0 && !draw_pending_grid(trainer, out_dir, observer, stop)? {
        return Ok(FitOutcome::Stopped);
    }
    let complete =
        trainer.epoch >= cfg.epochs || trainer.step_cap().is_some_and(|m| trainer.step() >= m);
    if complete {
        tracing::info!(
            step = trainer.step(),
            "the run is already complete: nothing to train (raise the step limit or the epochs \
             to train longer)"
        );
        return Ok(FitOutcome::Complete);
    }
    while trainer.epoch < cfg.epochs {
        let epoch = trainer.epoch;
        let skip = trainer.batch_in_epoch as usize;
        for indices in loader.epoch(epoch).skip(skip) {
            let started = Instant::now();
            let batch = data.train.batch(&indices)?;
            let lr = cfg.lr_at(trainer.step(), total);
            let loss = trainer.train_step(&batch)?;
            let secs = started.elapsed().as_secs_f64();
            trainer.batch_in_epoch += 1;
            trainer.elapsed_s += secs;
            period.loss_sum += loss as f64;
            period.steps += 1;
            period.images += indices.len() as u64;
            period.seconds += secs;
            period.lr = lr;
            let report = StepReport {
                step: trainer.step(),
                epoch,
                loss,
                lr,
                images_per_sec: indices.len() as f64 / secs.max(1e-9),
            };
            observer.on_step(&report);
            let at_max = trainer.step_cap().is_some_and(|m| trainer.step() >= m);
            let stopping = stop.load(Ordering::SeqCst);
            // What the next step brings besides itself: an epoch end (grid, metrics line,
            // checkpoint) or a metrics line.
            let next = trainer.step() + 1;
            let next_extra = deadline.map_or(0.0, |d| {
                if trainer.batch_in_epoch + 1 >= per_epoch {
                    d.epoch_end_s
                } else if cfg.log_every > 0 && next.is_multiple_of(cfg.log_every) {
                    d.metrics_s
                } else {
                    0.0
                }
            });
            let late =
                !at_max && deadline.is_some_and(|d| d.would_pass(clock.now_s(), secs, next_extra));
            if at_max || late {
                if late {
                    tracing::warn!(
                        step = trainer.step(),
                        planned = trainer.step_cap().unwrap_or(0),
                        "the budget's deadline came before the planned steps (this machine ran \
                         slower than its probe measured): ending here"
                    );
                }
                // A run that reaches its step limit or its deadline ends with a grid of the
                // final model.
                let final_grid =
                    (cfg.sample_every > 0).then(|| final_grid_path(out_dir, trainer.step()));
                end_period(
                    trainer,
                    epoch,
                    data,
                    out_dir,
                    &mut period,
                    observer,
                    final_grid.clone(),
                )?;
                save(trainer, period, &ckpt, observer)?;
                if !draw_grid(trainer, final_grid.as_deref(), observer, stop)? {
                    return Ok(FitOutcome::Stopped);
                }
                return Ok(if late {
                    FitOutcome::Deadline
                } else {
                    FitOutcome::MaxSteps
                });
            }
            if stopping {
                // The metrics line of this step, if one is due (the resumed run starts at the
                // next step); else the running averages go into the checkpoint, and the
                // resumed run writes the line this one would have written.
                if cfg.log_every > 0 && trainer.step().is_multiple_of(cfg.log_every) {
                    end_period(trainer, epoch, data, out_dir, &mut period, observer, None)?;
                }
                save(trainer, period, &ckpt, observer)?;
                return Ok(FitOutcome::Stopped);
            }
            if cfg.log_every > 0 && trainer.step().is_multiple_of(cfg.log_every) {
                end_period(trainer, epoch, data, out_dir, &mut period, observer, None)?;
            }
            if cfg.checkpoint_every > 0 && trainer.step().is_multiple_of(cfg.checkpoint_every) {
                save(trainer, period, &ckpt, observer)?;
            }
        }
        trainer.epoch += 1;
        trainer.batch_in_epoch = 0;
        let grid = cfg.sample_every > 0 && trainer.epoch.is_multiple_of(cfg.sample_every);
        let grid = grid.then(|| grid_path(out_dir, trainer.epoch));
        end_period(
            trainer,
            epoch,
            data,
            out_dir,
            &mut period,
            observer,
            grid.clone(),
        )?;
        save(trainer, period, &ckpt, observer)?;
        // The grid comes after the checkpoint: a stop while it is drawn loses nothing.
        if !draw_grid(trainer, grid.as_deref(), observer, stop)? {
            return Ok(FitOutcome::Stopped);
        }
    }
    Ok(FitOutcome::Finished)
}

/// When a planned run must end, on the clock it was planned with.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    /// The budget's end.
    at_s: f64,
    /// The probe's step time.
    step_s: f64,
    /// What ending costs: the final grid, metrics line and checkpoint.
    end_s: f64,
    /// A metrics line (the held-out loss).
    metrics_s: f64,
    /// An epoch end: its grid, metrics line and checkpoint.
    epoch_end_s: f64,
}

impl Deadline {
    /// Whether one more step (as long as the slower of the last one and the probe's, plus
    /// `extra_s`, what comes with it) and the end would pass the deadline.
    fn would_pass(&self, now_s: f64, last_step_s: f64, extra_s: f64) -> bool {
        now_s + last_step_s.max(self.step_s) + extra_s + self.end_s > self.at_s
    }
}

/// What a step, a grid, a held-out evaluation and a checkpoint cost on this machine, timed on
/// a scratch copy of the model (so the run itself starts from its own first step, and a run
/// with the same `--max-steps` elsewhere is the same run).
fn measure_costs<N: Trainable>(
    trainer: &Trainer<N>,
    data: &FitData,
    loader: &Loader,
    out_dir: &Path,
    clock: &dyn Clock,
) -> Result<StepCosts> {
    let mut scratch = trainer.scratch()?;
    let batches: Vec<Vec<usize>> = loader.epoch(0).take(4).collect();
    let mut next = 0usize;
    // Untimed steps first: the first steps of a process pay for page faults and the
    // allocator's first growth (with 2 untimed and 3 timed, a 2-core Zen 3 read 1.23 s a step
    // against the run's 1.06 s average).
    // The fastest of the timed steps: the plan is the most steps this machine can take, and
    // the deadline (see `fit_timed`) ends a run that turns out slower. A median plans for a
    // typical step, but on a VM whose speed drifts by a third within minutes the median of a
    // few seconds misses either way (a 2-core Zen 3 read 0.49 s and the run then took 0.57 s;
    // minutes later 0.65 s, and the run took 0.58 s).
    let train_step_s = budget::time_fastest(clock, 4, 5, || {
        let batch = data.train.batch(&batches[next % batches.len().max(1)])?;
        next += 1;
        scratch.train_step(&batch).map(|_| ())
    })?;
    // A sample grid is `sample_steps` forward passes over the grid's batch (conditional and
    // unconditional halves when guided); time one such pass.
    let card = trainer.card();
    let c = trainer.config();
    let classes = N::num_classes(&card.model);
    let grid_n = if classes > 0 { 8 * classes } else { 64 };
    let guided = classes > 0 && c.sample_guidance != 0.0;
    let fwd_n = if guided { 2 * grid_n } else { grid_n };
    let model = scratch.model();
    let dev = trainer.device();
    let x = Tensor::zeros(
        (fwd_n, card.data.channels, card.data.height, card.data.width),
        DType::F32,
        dev,
    )?;
    let t = Tensor::full(0u32, fwd_n, dev)?;
    let y = (classes > 0)
        .then(|| Tensor::full(0u32, fwd_n, dev))
        .transpose()?;
    let forward_s = budget::time_median(clock, 1, 1, || {
        model.predict_noise(&x, &t, y.as_ref())?;
        Ok(())
    })?;
    let grid_s = if c.sample_every > 0 {
        forward_s * c.sample_steps.clamp(1, card.schedule.num_timesteps) as f64
    } else {
        0.0
    };
    let held_out_s = data.held_out.as_ref().map_or(0.0, |(hx, _)| {
        forward_s * hx.dim(0).unwrap_or(0) as f64 / fwd_n as f64
    });
    let probe = out_dir.join(".budget-probe.safetensors");
    let checkpoint_s = budget::time_median(clock, 0, 1, || scratch.save(&probe));
    let _ = std::fs::remove_file(&probe);
    Ok(StepCosts {
        train_step_s,
        grid_s,
        held_out_s,
        checkpoint_s: checkpoint_s?,
    })
}

fn save<N: Trainable>(
    trainer: &mut Trainer<N>,
    period: PeriodState,
    path: &Path,
    observer: &mut dyn TrainObserver,
) -> Result<()> {
    trainer.check_state()?;
    trainer.period = period;
    trainer.save(path)?;
    tracing::debug!(path = %path.display(), step = trainer.step(), "checkpoint written");
    observer.on_checkpoint(path);
    Ok(())
}

fn end_period<N: Trainable>(
    trainer: &Trainer<N>,
    epoch: u64,
    data: &FitData,
    out_dir: &Path,
    period: &mut PeriodState,
    observer: &mut dyn TrainObserver,
    grid: Option<PathBuf>,
) -> Result<()> {
    if period.steps == 0 {
        // Nothing trained since the last line (a run resumed exactly at an epoch end): no
        // metrics to write. Its grid, if it was not drawn, is drawn by `draw_pending_grid`.
        return Ok(());
    }
    let held_out_loss = match &data.held_out {
        Some((x, y)) => Some(trainer.held_out_loss(x, y)? as f64),
        None => None,
    };
    // The grid is named here and drawn after the checkpoint (`draw_grid`).
    let sample_grid = grid;
    let report = EpochReport {
        epoch,
        step: trainer.step(),
        train_loss: period.loss_sum / period.steps as f64,
        held_out_loss,
        lr: period.lr,
        images_per_sec: period.images as f64 / period.seconds.max(1e-9),
        elapsed_s: trainer.elapsed_s,
        sample_grid,
    };
    append_metrics(out_dir, &report)?;
    plot_metrics(out_dir)?;
    tracing::info!(epoch = report.epoch, step = report.step, train_loss = report.train_loss, held_out = ?report.held_out_loss, images_per_sec = report.images_per_sec, "metrics");
    observer.on_epoch(&report);
    *period = PeriodState::default();
    Ok(())
}

/// Draws the grid at `path` (if any) with the stop flag and progress of [`write_grid`]; false
/// when a stop interrupted it.
fn draw_grid<N: Trainable>(
    trainer: &Trainer<N>,
    path: Option<&Path>,
    observer: &mut dyn TrainObserver,
    stop: &AtomicBool,
) -> Result<bool> {
    match path {
        Some(p) => write_grid(trainer, p, observer, Some(stop)),
        None => Ok(true),
    }
}

/// Draws the grid the last metrics line names for the checkpoint's step when it is missing
/// (the run that wrote the line stopped while drawing it); false when a stop interrupted it.
fn draw_pending_grid<N: Trainable>(
    trainer: &Trainer<N>,
    out_dir: &Path,
    observer: &mut dyn TrainObserver,
    stop: &AtomicBool,
) -> Result<bool> {
    let Ok(lines) = read_metrics(out_dir) else {
        return Ok(true);
    };
    let pending = lines
        .last()
        .filter(|r| r.step == trainer.step())
        .and_then(|r| r.sample_grid.clone())
        .filter(|p| !p.exists());
    match pending {
        Some(p) => {
            tracing::info!(grid = %p.display(), "drawing the sample grid the last run did not finish");
            write_grid(trainer, &p, observer, Some(stop))
        }
        None => Ok(true),
    }
}

/// The sample grid written after `epochs_done` epochs.
pub fn grid_path(out_dir: &Path, epochs_done: u64) -> PathBuf {
    out_dir
        .join("samples")
        .join(format!("epoch_{epochs_done:03}.png"))
}

/// The grid of the final model of a run that ends at its step limit (`--max-steps` or a
/// budget), usually mid-epoch.
pub fn final_grid_path(out_dir: &Path, step: u64) -> PathBuf {
    out_dir.join("samples").join(format!("step_{step:06}.png"))
}

/// The metrics file of a run.
pub fn metrics_path(out_dir: &Path) -> PathBuf {
    out_dir.join("metrics.jsonl")
}

fn append_metrics(out_dir: &Path, report: &EpochReport) -> Result<()> {
    let path = metrics_path(out_dir);
    let io = |source| TrainError::Io {
        path: path.clone(),
        source,
    };
    let mut line = serde_json::to_string(report).map_err(|e| TrainError::Config(e.to_string()))?;
    line.push('\n');
    ddpm_core::append_durable(&path, line.as_bytes()).map_err(io)
}

/// Drops the lines of `metrics.jsonl` written after the checkpoint the run continues from
/// (rewriting it atomically, and `loss.png` with it), so that the resumed run continues the
/// file where that checkpoint left it. A fresh run (`step` 0) starts the file anew.
///
/// Lines past `step` came later; so did a line *at* `step` when the checkpoint holds an open
/// line (`open`: steps summed since the last line), since writing a line closes it. (A step
/// can be checkpointed before its line: the last step of an epoch, with `checkpoint_every`.)
fn truncate_metrics(out_dir: &Path, step: u64, open: bool) -> Result<()> {
    let path = metrics_path(out_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(TrainError::Io { path, source }),
    };
    let mut kept = String::new();
    let mut dropped = 0usize;
    for line in text.lines() {
        match serde_json::from_str::<EpochReport>(line) {
            Ok(r) if r.step < step || (r.step == step && !open) => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped == 0 {
        return Ok(());
    }
    tracing::info!(
        dropped,
        step,
        "metrics.jsonl: dropped the lines written after the checkpoint"
    );
    crate::checkpoint::write_atomic(&path, kept.as_bytes())?;
    if kept.is_empty() {
        let _ = std::fs::remove_file(out_dir.join("loss.png"));
        Ok(())
    } else {
        plot_metrics(out_dir)
    }
}

/// Reads `metrics.jsonl` back (lines that do not parse are skipped).
pub fn read_metrics(out_dir: &Path) -> Result<Vec<EpochReport>> {
    let path = metrics_path(out_dir);
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path, source })?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Redraws `loss.png` (train and held-out loss against steps) from `metrics.jsonl`.
pub fn plot_metrics(out_dir: &Path) -> Result<()> {
    let m = read_metrics(out_dir)?;
    let train = viz::Series {
        label: "train".into(),
        color: [31, 119, 180],
        points: m.iter().map(|r| (r.step as f64, r.train_loss)).collect(),
    };
    let held = viz::Series {
        label: "held-out".into(),
        color: [255, 127, 14],
        points: m
            .iter()
            .filter_map(|r| r.held_out_loss.map(|l| (r.step as f64, l)))
            .collect(),
    };
    Ok(viz::plot_lines(
        &[train, held],
        "loss (eps mse)",
        "step",
        true,
        &out_dir.join("loss.png"),
    )?)
}

/// The most classes a sample grid shows (one row each); a model with more shows its first.
pub const MAX_GRID_CLASSES: usize = 100;

/// The most images a grid denoises at once (memory stays bounded whatever the class count).
const GRID_BATCH: usize = 128;

/// Samples one row per class (8 per row, at most [`MAX_GRID_CLASSES`] rows; 64 samples for
/// unconditional models) with the EMA weights, DDIM and the configured guidance, from a fixed
/// seed, and saves the grid.
pub fn write_sample_grid<N: Trainable>(trainer: &Trainer<N>, path: &Path) -> Result<()> {
    write_grid(trainer, path, &mut (), None).map(|_| ())
}

/// [`write_sample_grid`], reporting progress to `observer` and ending early, with `Ok(false)`
/// and nothing written, once `stop` is raised.
fn write_grid<N: Trainable>(
    trainer: &Trainer<N>,
    path: &Path,
    observer: &mut dyn TrainObserver,
    stop: Option<&AtomicBool>,
) -> Result<bool> {
    let cfg = trainer.config();
    let card = trainer.card();
    let model = trainer.ema_model()?;
    let (per_row, classes) = (8usize, N::num_classes(&card.model));
    let (labels, w) = if classes > 0 {
        let rows = classes.min(MAX_GRID_CLASSES);
        (Labels::rows(rows, per_row), cfg.sample_guidance)
    } else {
        (Labels::Unconditional(64), 0.0)
    };
    let steps = cfg.sample_steps.clamp(1, card.schedule.num_timesteps);
    let request = Request {
        batch: labels.len().min(GRID_BATCH),
        labels,
        guidance: w,
        seed: cfg.seed.wrapping_add(1),
        sampler: SamplerSpec::new(SamplerKind::Ddim).with_steps(steps),
    };
    let d = &card.data;
    let n = request.labels.len();
    viz::grid_size(n, per_row, d.height, d.width, 2)?;
    let total = steps * n.div_ceil(request.batch);
    let schedule = trainer.schedule();
    let mut done = 0;
    let mut interrupted = false;
    let x0 = ddpm_pipeline::generate(
        &ddpm_pipeline::denoiser(&model, card, schedule),
        schedule,
        (d.channels, d.height, d.width),
        trainer.device(),
        &request,
        &mut |_| {
            if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                interrupted = true;
                candle_core::bail!("stopped while drawing the sample grid");
            }
            done += 1;
            observer.on_grid(done, total);
            Ok(())
        },
    );
    if interrupted {
        tracing::info!(grid = %path.display(), "stopped while drawing the grid: it is drawn when the run resumes");
        return Ok(false);
    }
    viz::save_grid(&x0?, per_row, 2, path)?;
    Ok(true)
}
