//! The training loop: epochs, checkpoints, metrics, plots and sample grids.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};
use ddpm_data::{Batcher, Loader, LoaderConfig, TensorBatcher};
use ddpm_pipeline::{Labels, Request, SamplerKind, SamplerSpec};
use serde::{Deserialize, Serialize};

use crate::budget::{
    self, Budget, BudgetPlan, BudgetState, Clock, EndCosts, Plan, RunShape, StepCosts, WallClock,
};
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
    /// A budgeted run re-planned (its step count changed) with the measured step time in
    /// seconds.
    fn on_replan(&mut self, _plan: &Plan, _step_s: f64) {}
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

/// [`fit`], with the clock the run is timed with (its steps and its budget) and the seconds of
/// the budget already spent before this call (process start, data loading).
///
/// The loop: take the next batch (an epoch end first when one is due), train a step, report
/// it, let the budget re-plan, then do what the step closes: the end of the run (step limit,
/// deadline or stop), a metrics line, a checkpoint.
pub fn fit_timed<N: Trainable>(
    trainer: &mut Trainer<N>,
    data: &FitData,
    out_dir: &Path,
    observer: &mut dyn TrainObserver,
    stop: &AtomicBool,
    clock: &dyn Clock,
    spent_s: f64,
) -> Result<FitOutcome> {
    let cfg = trainer.config().clone();
    let loader = Loader::new(
        data.train_len,
        LoaderConfig {
            batch_size: cfg.batch_size,
            shuffle: true,
            drop_last: data.train_len >= cfg.batch_size,
            seed: cfg.seed,
        },
    )?;
    let per_epoch = loader.batches_per_epoch() as u64;
    trainer.set_steps_per_epoch(per_epoch);
    std::fs::create_dir_all(out_dir).map_err(|source| TrainError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut budget = start_budget(trainer, data, &loader, out_dir, observer, clock, spent_s)?;
    let mut out = Outputs {
        dir: out_dir,
        data,
        clock,
        // The metrics line in progress continues from the checkpoint.
        period: trainer.period(),
    };
    observer.on_start(trainer.step(), trainer.plan().total_steps);
    tracing::info!(
        start_step = trainer.step(),
        total_steps = trainer.plan().total_steps,
        per_epoch,
        "training"
    );
    // Lines written after the checkpoint (by a run killed before its next one) are dropped:
    // they are written again.
    truncate_metrics(out_dir, trainer.step(), out.period.steps > 0)?;
    // A grid is drawn after its checkpoint: one the last run did not finish is drawn now.
    if trainer.step() > 0 && !draw_pending_grid(trainer, out_dir, observer, stop)? {
        return Ok(FitOutcome::Stopped);
    }
    if trainer.epoch() >= cfg.epochs || trainer.at_step_limit() {
        tracing::info!(
            step = trainer.step(),
            "the run is already complete: nothing to train (raise the step limit or the epochs \
             to train longer)"
        );
        return Ok(FitOutcome::Complete);
    }
    // The batches of the epoch in progress, from where the run stands in it.
    let mut batches = None;
    loop {
        let (e, batch_in_epoch) = trainer.position();
        if batch_in_epoch >= per_epoch {
            // The epoch's end: its metrics line, checkpoint and grid.
            trainer.close_epoch();
            let grid = (cfg.sample_every > 0 && trainer.epoch().is_multiple_of(cfg.sample_every))
                .then(|| grid_path(out_dir, trainer.epoch()));
            out.metrics_line(trainer, e, observer, grid.clone())?;
            out.checkpoint(trainer, budget.as_ref(), observer)?;
            // The grid comes after the checkpoint: a stop while it is drawn loses nothing.
            if !draw_grid(trainer, grid.as_deref(), observer, stop)? {
                return Ok(FitOutcome::Stopped);
            }
            if trainer.epoch() >= cfg.epochs {
                return Ok(FitOutcome::Finished);
            }
            continue;
        }
        let epoch = e;
        if batches.as_ref().is_none_or(|(be, _)| *be != epoch) {
            batches = Some((epoch, loader.epoch(epoch).skip(batch_in_epoch as usize)));
        }
        let Some(indices) = batches.as_mut().and_then(|(_, it)| it.next()) else {
            // The loader's epoch is shorter than it said: treat it as ended.
            trainer.advance_to_epoch_end(per_epoch);
            continue;
        };

        // The step.
        let started = clock.now_s();
        let lr = trainer.lr_at(trainer.step());
        let loss = trainer.train_step(&data.train.batch(&indices)?)?;
        let secs = (clock.now_s() - started).max(0.0);
        trainer.count_batch(secs);
        out.period.add(loss, indices.len() as u64, secs, lr);
        observer.on_step(&StepReport {
            step: trainer.step(),
            epoch,
            loss,
            lr,
            images_per_sec: indices.len() as f64 / secs.max(1e-9),
        });
        let step = trainer.step();

        // The budget: re-plan to the time left, and the deadline as the last guard.
        let mut late = false;
        if let Some(b) = budget.as_mut() {
            // The whole iteration (the batch, the step, its report) is what the next one costs.
            let now = clock.now_s();
            let took = now - started;
            let cap = cfg.epochs.checked_mul(per_epoch);
            if let Some(plan) = b.after_step(step, took, now, &trainer.plan(), cap) {
                tracing::debug!(
                    step,
                    total = plan.total_steps,
                    step_s = b.step_s(),
                    "budget re-planned"
                );
                trainer.set_plan(plan)?;
                observer.on_replan(&plan, b.step_s());
            }
            let next_closes_epoch = trainer.position().1 + 1 >= per_epoch;
            let next_logs = cfg.log_every > 0 && (step + 1).is_multiple_of(cfg.log_every);
            let extra = b.extra_for(next_closes_epoch, next_logs);
            late = !trainer.at_step_limit() && b.would_pass(now, took, extra);
        }

        // What the step closes.
        let log_due = cfg.log_every > 0 && step.is_multiple_of(cfg.log_every);
        if trainer.at_step_limit() || late {
            if late {
                tracing::warn!(
                    step,
                    planned = trainer.plan().total_steps,
                    "the budget's deadline came before the planned steps (this machine slowed \
                     down after the last re-plan): ending here"
                );
            }
            // A run that reaches its step limit or its deadline ends with a grid of the final
            // model.
            let grid = (cfg.sample_every > 0).then(|| final_grid_path(out_dir, step));
            out.metrics_line(trainer, epoch, observer, grid.clone())?;
            out.checkpoint(trainer, budget.as_ref(), observer)?;
            if !draw_grid(trainer, grid.as_deref(), observer, stop)? {
                return Ok(FitOutcome::Stopped);
            }
            return Ok(if late {
                FitOutcome::Deadline
            } else {
                FitOutcome::MaxSteps
            });
        }
        if stop.load(Ordering::SeqCst) {
            // The metrics line of this step, if one is due (the resumed run starts at the next
            // step); else the running averages go into the checkpoint, and the resumed run
            // writes the line this one would have written.
            if log_due {
                out.metrics_line(trainer, epoch, observer, None)?;
            }
            out.checkpoint(trainer, budget.as_ref(), observer)?;
            return Ok(FitOutcome::Stopped);
        }
        if log_due {
            out.metrics_line(trainer, epoch, observer, None)?;
        }
        if cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every) {
            out.checkpoint(trainer, budget.as_ref(), observer)?;
        }
    }
}

/// Where [`fit_timed`]'s outputs go, and the metrics line in progress.
struct Outputs<'a> {
    dir: &'a Path,
    data: &'a FitData,
    clock: &'a dyn Clock,
    period: PeriodState,
}

impl Outputs<'_> {
    /// Closes the metrics line in progress (nothing when no step was trained since the last).
    fn metrics_line<N: Trainable>(
        &mut self,
        trainer: &Trainer<N>,
        epoch: u64,
        observer: &mut dyn TrainObserver,
        grid: Option<PathBuf>,
    ) -> Result<()> {
        end_period(
            trainer,
            epoch,
            self.data,
            self.dir,
            &mut self.period,
            observer,
            grid,
        )
    }

    /// Checks the state and writes the checkpoint, with the metrics line in progress and the
    /// budget's standing.
    fn checkpoint<N: Trainable>(
        &self,
        trainer: &mut Trainer<N>,
        budget: Option<&Budget>,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        if let Some(b) = budget {
            trainer.set_budget_state(b.state(self.clock.now_s()));
        }
        save(trainer, self.period, &checkpoint_path(self.dir), observer)
    }
}

/// A budgeted run's [`Budget`]: on its first start, the probe ([`measure_costs`]) and the first
/// plan ([`budget::plan_steps`]); on a resumed run, the saved standing, continued against the
/// time left. `None` for a run without a budget (or resumed from a checkpoint older than the
/// budget's state: its saved plan is kept as it is).
fn start_budget<N: Trainable>(
    trainer: &mut Trainer<N>,
    data: &FitData,
    loader: &Loader,
    out_dir: &Path,
    observer: &mut dyn TrainObserver,
    clock: &dyn Clock,
    spent_s: f64,
) -> Result<Option<Budget>> {
    let Some(b) = trainer.config().budget else {
        return Ok(None);
    };
    let c = trainer.config();
    let per_epoch = loader.batches_per_epoch() as u64;
    let shape = RunShape {
        steps_per_epoch: per_epoch,
        sample_every: c.sample_every,
        checkpoint_every: c.checkpoint_every,
        log_every: c.log_every,
    };
    let by_epochs = c.epochs.saturating_mul(per_epoch);
    let state = match (trainer.is_planned(), trainer.budget_state()) {
        (true, Some(state)) => BudgetState {
            used_s: state.used_s + spent_s,
            ..*state
        },
        (true, None) => return Ok(None),
        (false, _) => {
            let started = clock.now_s();
            let costs = measure_costs(trainer, data, loader, out_dir, clock)?;
            let spent = spent_s + (clock.now_s() - started);
            // Capped by the epochs only: `max_steps` stays a separate limit (the lower one
            // stops the run), so a resumed run may raise it up to the budget's own plan.
            let plan = budget::plan_steps(b.seconds, spent, &costs, &shape, Some(by_epochs))?;
            trainer.apply_budget_plan(&plan)?;
            let p = trainer.plan();
            tracing::info!(
                budget = %budget::format_duration(b.seconds),
                steps = plan.steps,
                step_s = costs.train_step_s,
                grid_s = costs.grid_s,
                predicted = %budget::format_duration(plan.predicted_s),
                warmup = p.warmup_steps,
                ema_decay = p.ema_decay,
                "budget planned"
            );
            observer.on_plan(&plan);
            BudgetState {
                used_s: spent,
                costs,
                step_s: costs.train_step_s,
                replan_every: (plan.steps / 100).max(1),
                replans: 0,
            }
        }
    };
    let c = trainer.config();
    let held_out_s = if data.held_out.is_some() {
        state.costs.held_out_s
    } else {
        0.0
    };
    let grid_s = if c.sample_every > 0 {
        state.costs.grid_s
    } else {
        0.0
    };
    let now = clock.now_s();
    let budget = Budget::new(
        b,
        shape,
        state,
        now,
        EndCosts {
            grid_s,
            held_out_s,
            checkpoint_s: state.costs.checkpoint_s,
        },
        trainer.plan().total_steps,
    );
    trainer.set_budget_state(budget.state(now));
    Ok(Some(budget))
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
    trainer.set_period(period);
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

/// Samples one row per class (8 per row, at most `MAX_GRID_CLASSES` = 100 rows; 64 samples for
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
    // A progressive student samples in the DDIM steps it learned (trailing spacing).
    let sampler = match card.distilled.as_ref().and_then(|d| d.steps) {
        Some(n) => SamplerSpec {
            spacing: ddpm_pipeline::Spacing::Trailing,
            ..SamplerSpec::new(SamplerKind::Ddim).with_steps(n)
        },
        None => SamplerSpec::new(SamplerKind::Ddim).with_steps(cfg.sample_steps),
    };
    let steps = sampler.steps.clamp(1, card.schedule.num_timesteps);
    let request = Request {
        batch: labels.len().min(GRID_BATCH),
        labels,
        guidance: w,
        seed: cfg.seed.wrapping_add(1),
        sampler: sampler.with_steps(steps),
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
