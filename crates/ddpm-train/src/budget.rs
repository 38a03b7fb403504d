//! Time budgets: turn "train for 30 minutes" into a step count, and keep it true.
//!
//! A budgeted run measures what its parts cost on this machine (a training step, a sample
//! grid, a held-out evaluation, a checkpoint) on a scratch copy of the model, and plans the
//! number of optimizer steps so that the whole run, grids and checkpoints included, ends
//! within the budget ([`plan_steps`]). A probe of a few seconds is not the run, though: a VM's
//! speed drifts, and the run's metrics lines and grids cost more than the probe saw. So the
//! [`Budget`] re-plans as the run goes: every 1 % of the plan it measures the step time so far
//! (a moving average over about 5 % of the plan) and fits the step count to the time left
//! ([`replan_steps`]). The learning rate's cosine and the EMA decay follow the new count, so a
//! run ends at its planned step, annealed (learning rate near 0), within its budget, on a
//! machine slower or faster than its probe. A deadline stays as the last guard.
//!
//! The plan is part of the run's state ([`Plan`], [`BudgetState`], saved in every checkpoint),
//! not of its configuration: `--resume` continues it against the time left, and the final
//! `--max-steps N` (with the warm-up and EMA decay the summary prints) reruns the schedule the
//! budget ended with on any machine.
//!
//! The arithmetic is pure functions of the measured [`StepCosts`], tested with made-up costs;
//! the measurement goes through the [`Clock`] trait, so tests drive it with a fake clock.
//!
//! ```
//! use ddpm_train::budget::{plan_steps, RunShape, StepCosts};
//!
//! let costs = StepCosts { train_step_s: 0.5, grid_s: 10.0, held_out_s: 2.0, checkpoint_s: 0.5 };
//! let shape = RunShape { steps_per_epoch: 1000, sample_every: 1, checkpoint_every: 0, log_every: 0 };
//! // 10 minutes, 20 s already spent loading data, 5 % kept in reserve.
//! let plan = plan_steps(600.0, 20.0, &costs, &shape, None).unwrap();
//! assert!(plan.steps > 1000 && plan.steps < 1100);
//! assert!(plan.predicted_s <= 0.95 * 600.0);
//! ```

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Share of the budget kept in reserve against a machine that slows down mid-run
/// (shared VMs drift by 10 % within minutes).
pub const RESERVE: f64 = 0.05;

/// The share of the budget at which the deadline ends a run that is still short of its plan
/// (a sudden slow-down after the last re-plan); the end's own costs are estimates too.
pub const DEADLINE: f64 = 0.98;

/// A run's plan: its step count and what is fitted to it. Part of the run's state (saved in
/// every checkpoint), not of its configuration; a budget re-plans it, an unbudgeted run's comes
/// from its options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Optimizer steps of the whole run: where the learning rate's cosine reaches 0.
    pub total_steps: u64,
    /// Linear warm-up steps (fixed once the run has started).
    pub warmup_steps: u64,
    /// EMA decay.
    pub ema_decay: f64,
}

/// Where a budgeted run stands against its budget: saved in every checkpoint, so a resumed
/// run continues against the time left, with the same re-planning.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetState {
    /// Seconds of the budget used when the state was saved (loading, probe, steps, grids,
    /// checkpoints: everything since the first start, over all the runs that continued it).
    pub used_s: f64,
    /// The probe's costs (the costs of grids, held-out passes and checkpoints are scaled by
    /// the measured step time over the probe's).
    pub costs: StepCosts,
    /// The moving average of the measured step time, in seconds.
    pub step_s: f64,
    /// Re-plan every this many steps (1 % of the first plan).
    pub replan_every: u64,
    /// Re-plans made so far.
    pub replans: u64,
}

/// What ending a run costs at the probe's speed (0 for what the run does not do: no grid
/// without `sample_every`, no held-out pass without held-out data).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EndCosts {
    /// The final sample grid.
    pub grid_s: f64,
    /// The final metrics line's held-out loss.
    pub held_out_s: f64,
    /// The final checkpoint.
    pub checkpoint_s: f64,
}

/// A budgeted run's clock and plan while it trains: made by [`Budget::new`] from the first
/// plan or from the saved [`BudgetState`] of a resumed run; [`Budget::after_step`] re-plans,
/// [`Budget::would_pass`] is the deadline.
#[derive(Debug, Clone)]
pub struct Budget {
    config: BudgetConfig,
    shape: RunShape,
    state: BudgetState,
    /// The clock's reading when this process's part of the run began, and the budget's
    /// seconds used before it.
    origin_s: f64,
    used_before_s: f64,
    /// What ending costs, at the probe's speed.
    end: EndCosts,
    /// The moving average's weight of a new step: 1 / (5 % of the first plan), at least 1/20.
    alpha: f64,
    /// Steps averaged so far in this process (the average starts from the saved one).
    seen: u64,
}

impl Budget {
    /// The budget of a run whose clock reads `now_s`, `state.used_s` seconds into its budget;
    /// `end`: what an end costs at the probe's speed; `planned_steps`: the run's first plan.
    pub fn new(
        config: BudgetConfig,
        shape: RunShape,
        state: BudgetState,
        now_s: f64,
        end: EndCosts,
        planned_steps: u64,
    ) -> Self {
        let horizon = (planned_steps as f64 * 0.05).max(20.0);
        Self {
            config,
            shape,
            origin_s: now_s,
            used_before_s: state.used_s,
            state,
            end,
            alpha: 1.0 / horizon,
            seen: 0,
        }
    }

    /// The state to save at clock reading `now_s`.
    pub fn state(&self, now_s: f64) -> BudgetState {
        BudgetState {
            used_s: self.used_s(now_s),
            ..self.state
        }
    }

    /// Seconds of the budget used at clock reading `now_s`.
    pub fn used_s(&self, now_s: f64) -> f64 {
        self.used_before_s + (now_s - self.origin_s).max(0.0)
    }

    /// The measured step time (the moving average).
    pub fn step_s(&self) -> f64 {
        self.state.step_s
    }

    /// Re-plans made so far.
    pub fn replans(&self) -> u64 {
        self.state.replans
    }

    /// Takes in the step just taken (`step` steps done, it took `secs`), and every
    /// `replan_every` steps returns the plan re-fitted to the time left at `now_s`
    /// ([`replan_steps`]; the EMA decay re-fitted too, the warm-up kept), capped at `cap`.
    /// `None` between re-plans, and when the count is unchanged.
    pub fn after_step(
        &mut self,
        step: u64,
        secs: f64,
        now_s: f64,
        plan: &Plan,
        cap: Option<u64>,
    ) -> Option<Plan> {
        // The first step of a process pays for page faults and the allocator's growth: not
        // averaged.
        self.seen += 1;
        if self.seen > 1 && secs.is_finite() && secs > 0.0 {
            self.state.step_s += self.alpha * (secs - self.state.step_s);
        }
        if !step.is_multiple_of(self.state.replan_every.max(1)) || step >= plan.total_steps {
            return None;
        }
        let left_s = self.config.seconds * (1.0 - RESERVE) - self.used_s(now_s);
        let costs = self.scaled_costs();
        let total = replan_steps(step, left_s, &costs, &self.shape, cap);
        self.state.replans += 1;
        if total == plan.total_steps {
            return None;
        }
        let ema_decay = self.config.ema_decay_for(total).unwrap_or(plan.ema_decay);
        Some(Plan {
            total_steps: total,
            ema_decay,
            ..*plan
        })
    }

    /// Whether one more step (as long as the slower of `last_step_s` and the average, plus
    /// `extra_s`, what comes with it) and the end would pass the deadline ([`DEADLINE`]).
    pub fn would_pass(&self, now_s: f64, last_step_s: f64, extra_s: f64) -> bool {
        self.used_s(now_s) + last_step_s.max(self.state.step_s) + extra_s + self.end_s()
            > self.config.seconds * DEADLINE
    }

    /// What comes with the next step besides itself, at the measured speed: an epoch end
    /// (grid, metrics line, checkpoint) when it closes one, a metrics line when one is due.
    pub fn extra_for(&self, closes_epoch: bool, logs: bool) -> f64 {
        if closes_epoch {
            self.end_s()
        } else if logs {
            self.end.held_out_s * self.slowness()
        } else {
            0.0
        }
    }

    /// What an end costs (its grid, metrics line and checkpoint), at the measured speed when it
    /// is slower than the probe's.
    fn end_s(&self) -> f64 {
        (self.end.grid_s + self.end.held_out_s + self.end.checkpoint_s) * self.slowness()
    }

    /// Measured step time over the probe's, at least 1.
    fn slowness(&self) -> f64 {
        (self.state.step_s / self.state.costs.train_step_s.max(1e-12)).max(1.0)
    }

    /// The probe's costs at the measured speed: the step time measured, the rest scaled by
    /// measured over probe.
    fn scaled_costs(&self) -> StepCosts {
        let c = self.state.costs;
        let k = self.state.step_s / c.train_step_s.max(1e-12);
        StepCosts {
            train_step_s: self.state.step_s,
            grid_s: c.grid_s * k,
            held_out_s: c.held_out_s * k,
            checkpoint_s: c.checkpoint_s * k,
        }
    }
}

/// The step count that fits a run at `step` steps done with `left_s` seconds of its budget
/// left (the reserve already taken off), called right after step `step` and before what it
/// closes ([`pending_seconds`]): `step` plus the most steps whose predicted cost from there
/// ([`predict_seconds_from`], the end included) fits in what is left, capped at `cap`; `step`
/// itself when not one more fits.
pub fn replan_steps(
    step: u64,
    left_s: f64,
    costs: &StepCosts,
    shape: &RunShape,
    cap: Option<u64>,
) -> u64 {
    let left_s = left_s - pending_seconds(step, costs, shape);
    let fits = |n: u64| predict_seconds_from(step, n, costs, shape) <= left_s;
    if !fits(1) {
        return step;
    }
    let room = cap.map(|c| c.saturating_sub(step));
    let lo = largest_fitting(fits, room);
    let n = room.map_or(lo, |r| lo.min(r));
    step.saturating_add(n)
}

/// A source of time in seconds; [`WallClock`] in real runs, a fake one in tests.
pub trait Clock {
    /// Seconds since an arbitrary origin.
    fn now_s(&self) -> f64;
}

/// The real clock.
#[derive(Debug, Clone, Copy)]
pub struct WallClock(Instant);

impl WallClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self(Instant::now())
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for WallClock {
    fn now_s(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// A run's time budget, as saved in [`crate::TrainConfig::budget`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetConfig {
    /// Wall-clock seconds for the whole run (data loading, grids and checkpoints included).
    pub seconds: f64,
    /// Fit the learning-rate warm-up to this share of the planned steps (`None`: keep
    /// `warmup_steps`).
    pub warmup_fraction: Option<f64>,
    /// Fit the EMA decay so that its horizon 1/(1 − decay) is this share of the planned steps
    /// (`None`: keep `ema_decay`).
    pub ema_horizon_fraction: Option<f64>,
}

impl BudgetConfig {
    /// A budget of `seconds` that fits the warm-up to 5 % of the steps and the EMA horizon
    /// to 25 % (decay 0.998 for 2,000 steps, the measured CPU recipe of docs/recipes.md).
    pub fn fitted(seconds: f64) -> Self {
        Self {
            seconds,
            warmup_fraction: Some(0.05),
            ema_horizon_fraction: Some(0.25),
        }
    }

    /// Checks the options.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.seconds.is_finite() && self.seconds > 0.0) {
            return Err(format!(
                "must be a positive duration, got {} s",
                self.seconds
            ));
        }
        for (name, f) in [
            ("warm-up fraction", self.warmup_fraction),
            ("EMA horizon fraction", self.ema_horizon_fraction),
        ] {
            if let Some(f) = f {
                if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
                    return Err(format!("the budget's {name} must lie in [0, 1], got {f}"));
                }
            }
        }
        Ok(())
    }

    /// The warm-up steps for a plan of `steps` (`None`: not fitted).
    pub fn warmup_for(&self, steps: u64) -> Option<u64> {
        self.warmup_fraction
            .map(|f| (f * steps as f64).round() as u64)
    }

    /// The EMA decay for a plan of `steps` (`None`: not fitted): 1 − 1/horizon with the
    /// horizon at least 10 steps, rounded to 4 decimals so that it prints exactly.
    pub fn ema_decay_for(&self, steps: u64) -> Option<f64> {
        self.ema_horizon_fraction.map(|f| {
            let horizon = (f * steps as f64).max(10.0);
            ((1.0 - 1.0 / horizon) * 1e4).floor() / 1e4
        })
    }
}

/// Measured costs of the parts of a run, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepCosts {
    /// One optimizer step (forward, backward, AdamW, EMA) at the run's batch size.
    pub train_step_s: f64,
    /// One sample grid (every `sample_every` epochs).
    pub grid_s: f64,
    /// One held-out loss evaluation (every metrics line).
    pub held_out_s: f64,
    /// Writing one checkpoint.
    pub checkpoint_s: f64,
}

/// How often a run does each of its periodic jobs (the fields of [`crate::TrainConfig`]
/// of the same names, and the batches per epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShape {
    /// Batches per epoch.
    pub steps_per_epoch: u64,
    /// A sample grid every this many epochs (0: never).
    pub sample_every: u64,
    /// A checkpoint every this many steps, besides epoch ends and the end (0: never).
    pub checkpoint_every: u64,
    /// A metrics line every this many steps, besides epoch ends and the end (0: never).
    pub log_every: u64,
}

/// The outcome of [`plan_steps`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetPlan {
    /// The budget, in seconds.
    pub budget_s: f64,
    /// Optimizer steps that fit.
    pub steps: u64,
    /// Predicted wall-clock of the whole run at these costs (including what was spent before).
    pub predicted_s: f64,
    /// The costs the plan was made from.
    pub costs: StepCosts,
}

/// The cost of the periodic jobs step `step` closes (its epoch end's grid, metrics line and
/// checkpoint; a metrics line or checkpoint due at it), still to come right after the step.
pub fn pending_seconds(step: u64, costs: &StepCosts, shape: &RunShape) -> f64 {
    if step == 0 {
        return 0.0;
    }
    let due = |n: u64| n > 0 && step.is_multiple_of(n);
    let per_epoch = shape.steps_per_epoch.max(1);
    let epoch_end = due(per_epoch);
    let grid = epoch_end && due(per_epoch.saturating_mul(shape.sample_every));
    let metrics = epoch_end || due(shape.log_every);
    let checkpoint = epoch_end || due(shape.checkpoint_every);
    [
        (grid, costs.grid_s),
        (metrics, costs.held_out_s),
        (checkpoint, costs.checkpoint_s),
    ]
    .iter()
    .filter(|(d, _)| *d)
    .map(|(_, c)| c)
    .sum()
}

/// Predicted seconds of a run of `steps` steps, not counting what was spent before it.
pub fn predict_seconds(steps: u64, costs: &StepCosts, shape: &RunShape) -> f64 {
    predict_seconds_from(0, steps, costs, shape)
}

/// Predicted seconds of `steps` more steps after `done` steps, the end (final grid, metrics
/// line, checkpoint) included: the periodic jobs counted where they fall in that stretch.
pub fn predict_seconds_from(done: u64, steps: u64, costs: &StepCosts, shape: &RunShape) -> f64 {
    let end = done.saturating_add(steps);
    // Multiples of `n` in (done, end].
    let between = |n: u64| match (end.checked_div(n), done.checked_div(n)) {
        (Some(a), Some(b)) => a - b,
        _ => 0,
    };
    let per_epoch = shape.steps_per_epoch.max(1);
    let epoch_ends = between(per_epoch);
    // A grid every sample_every epochs, and one of the final model at the end.
    let grids = if shape.sample_every == 0 {
        0
    } else {
        between(per_epoch.saturating_mul(shape.sample_every)) + 1
    };
    // A metrics line (held-out loss) at each epoch end, every log_every steps and at the end;
    // a checkpoint at each epoch end, every checkpoint_every steps and at the end.
    let metrics = epoch_ends + between(shape.log_every) + 1;
    let checkpoints = epoch_ends + between(shape.checkpoint_every) + 1;
    steps as f64 * costs.train_step_s
        + grids as f64 * costs.grid_s
        + metrics as f64 * costs.held_out_s
        + checkpoints as f64 * costs.checkpoint_s
}

/// The largest step count whose predicted run, after `spent_s` seconds already gone, ends
/// within `budget_s` less the [`RESERVE`]; capped at `cap` (the run's other limits).
///
/// An error when not even one step fits, naming what a step costs.
pub fn plan_steps(
    budget_s: f64,
    spent_s: f64,
    costs: &StepCosts,
    shape: &RunShape,
    cap: Option<u64>,
) -> Result<BudgetPlan> {
    if !(budget_s.is_finite() && budget_s > 0.0) {
        return Err(TrainError::Option {
            field: "budget",
            reason: format!("must be a positive duration, got {budget_s} s"),
        });
    }
    let usable = budget_s * (1.0 - RESERVE) - spent_s;
    let fits = |n: u64| predict_seconds(n, costs, shape) <= usable;
    if !fits(1) {
        return Err(TrainError::Option {
            field: "budget",
            reason: format!(
                "{}: not even one step fits (a step costs {:.2} s, a checkpoint {:.2} s, {:.1} s \
                 were spent loading); give a longer budget or a smaller batch size or model",
                format_duration(budget_s),
                costs.train_step_s,
                costs.checkpoint_s,
                spent_s
            ),
        });
    }
    let lo = largest_fitting(fits, cap);
    let steps = cap.map_or(lo, |c| lo.min(c.max(1)));
    Ok(BudgetPlan {
        budget_s,
        steps,
        predicted_s: spent_s + predict_seconds(steps, costs, shape),
        costs: *costs,
    })
}

/// The largest n for which `fits(n)` holds, given that `fits(1)` does and that `fits` is
/// monotone (predicted seconds grow with the step count): doubling until it fails or passes
/// `limit` (or 2^40), then bisection. The caller caps the result at `limit`.
fn largest_fitting(fits: impl Fn(u64) -> bool, limit: Option<u64>) -> u64 {
    let mut hi = 2u64;
    while fits(hi) && limit.is_none_or(|c| hi < c) && hi < (1 << 40) {
        hi *= 2;
    }
    let mut lo = 1u64;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Runs `f` `warmup` times untimed, then `runs` times (at least once) timed with `clock`;
/// returns the timed durations, sorted.
fn time_runs(
    clock: &dyn Clock,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = clock.now_s();
        f()?;
        times.push((clock.now_s() - start).max(0.0));
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Times `f` with `clock`: runs it `warmup` times untimed, then `runs` times, and returns the
/// median duration of the timed runs.
pub fn time_median(
    clock: &dyn Clock,
    warmup: usize,
    runs: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let times = time_runs(clock, warmup, runs, f)?;
    Ok(times[times.len() / 2])
}

/// Times `f` as [`time_median`] does, and returns the fastest of the timed runs: the step time
/// of this machine when nothing else interferes.
pub fn time_fastest(
    clock: &dyn Clock,
    warmup: usize,
    runs: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    Ok(time_runs(clock, warmup, runs, f)?[0])
}

/// Parses a duration: `90s`, `15m`, `1h30m`, `2h`, or a bare number of minutes.
pub fn parse_duration(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an empty duration: use e.g. 15m, 30m, 1h30m or 90s".into());
    }
    if let Ok(minutes) = t.parse::<f64>() {
        return check_duration(s, minutes * 60.0);
    }
    let (mut total, mut num, mut any) = (0.0f64, String::new(), false);
    for c in t.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => {
                return Err(format!(
                    "`{s}`: unknown unit `{c}` (use h, m or s, e.g. 30m)"
                ))
            }
        };
        let v: f64 = num
            .parse()
            .map_err(|_| format!("`{s}`: expected a number before `{c}` (e.g. 30m)"))?;
        total += v * unit;
        num.clear();
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(format!(
            "`{s}`: a number needs a unit (h, m or s), e.g. 30m"
        ));
    }
    check_duration(s, total)
}

fn check_duration(s: &str, seconds: f64) -> std::result::Result<f64, String> {
    if seconds.is_finite() && seconds > 0.0 {
        Ok(seconds)
    } else {
        Err(format!("`{s}`: the duration must be positive"))
    }
}

/// `1h05m`, `30m`, `45s`: a duration for messages.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m, sec) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A clock that advances by `tick` seconds every time it is read.
    struct FakeClock {
        now: Cell<f64>,
        tick: f64,
    }

    impl Clock for FakeClock {
        fn now_s(&self) -> f64 {
            let t = self.now.get();
            self.now.set(t + self.tick);
            t
        }
    }

    fn shape() -> RunShape {
        RunShape {
            steps_per_epoch: 100,
            sample_every: 1,
            checkpoint_every: 50,
            log_every: 0,
        }
    }

    #[test]
    fn predicted_seconds_count_every_periodic_job() {
        let c = StepCosts {
            train_step_s: 1.0,
            grid_s: 10.0,
            held_out_s: 3.0,
            checkpoint_s: 0.5,
        };
        // 250 steps: 2 epoch ends and the end (3 grids), metrics at 2 epoch ends + the end = 3,
        // checkpoints at 2 epoch ends + 5 (every 50) + the end = 8.
        let want = 250.0 + 3.0 * 10.0 + 3.0 * 3.0 + 8.0 * 0.5;
        assert_eq!(predict_seconds(250, &c, &shape()), want);
    }

    #[test]
    fn plan_is_the_largest_count_that_fits_by_hand() {
        let c = StepCosts {
            train_step_s: 1.0,
            grid_s: 10.0,
            held_out_s: 3.0,
            checkpoint_s: 0.5,
        };
        // Budget 400 s, 20 s spent: 400·0.95 − 20 = 360 s usable.
        let p = plan_steps(400.0, 20.0, &c, &shape(), None).unwrap();
        // By hand: n = 303 costs 303 + 4 grids·10 (3 epoch ends, the end) + 4 metrics·3
        // + (3 + 6 + 1) checkpoints·0.5 = 360; n = 304 costs 361.
        assert_eq!(predict_seconds(303, &c, &shape()), 360.0);
        assert_eq!(predict_seconds(304, &c, &shape()), 361.0);
        assert_eq!(p.steps, 303);
        assert_eq!(p.predicted_s, 380.0);
        assert!(p.predicted_s <= 400.0 * (1.0 - RESERVE));
    }

    #[test]
    fn the_cap_wins_when_it_is_lower_and_tiny_budgets_are_refused() {
        let c = StepCosts {
            train_step_s: 0.1,
            grid_s: 0.0,
            held_out_s: 0.0,
            checkpoint_s: 0.0,
        };
        let p = plan_steps(3600.0, 0.0, &c, &shape(), Some(500)).unwrap();
        assert_eq!(p.steps, 500);
        let e = plan_steps(1.0, 0.99, &c, &shape(), None).unwrap_err();
        assert!(e.to_string().contains("not even one step"), "{e}");
        assert!(plan_steps(f64::NAN, 0.0, &c, &shape(), None).is_err());
    }

    /// A re-plan from where a plan stands, with the time the plan predicted for the rest,
    /// gives the plan back; the jobs the current step still closes are counted; less time
    /// gives fewer steps, and no time ends the run where it is.
    #[test]
    fn replans_by_hand() {
        let c = StepCosts {
            train_step_s: 1.0,
            grid_s: 10.0,
            held_out_s: 3.0,
            checkpoint_s: 0.5,
        };
        let sh = shape();
        // Step 100 closes an epoch: its grid, metrics line and checkpoint are still to come.
        assert_eq!(pending_seconds(100, &c, &sh), 13.5);
        // Step 150: a checkpoint (every 50).
        assert_eq!(pending_seconds(150, &c, &sh), 0.5);
        assert_eq!(pending_seconds(0, &c, &sh), 0.0);
        // The plan of 303 steps (see above), at step 100: what its rest costs, with the jobs
        // of step 100 itself, is left. The stretches add up to the whole (less the end the
        // first one counts at step 100, which is the epoch end there instead).
        let left = predict_seconds_from(100, 203, &c, &sh) + pending_seconds(100, &c, &sh);
        assert_eq!(
            predict_seconds_from(0, 100, &c, &sh) + predict_seconds_from(100, 203, &c, &sh),
            predict_seconds(303, &c, &sh) + 13.5
        );
        assert_eq!(replan_steps(100, left, &c, &sh, None), 303);
        assert_eq!(replan_steps(100, left - 1.0, &c, &sh, None), 302);
        assert_eq!(replan_steps(100, left, &c, &sh, Some(250)), 250);
        assert_eq!(replan_steps(100, 5.0, &c, &sh, None), 100);
    }

    #[test]
    fn median_timing_reads_the_clock_around_each_run() {
        let clock = FakeClock {
            now: Cell::new(0.0),
            tick: 0.25,
        };
        let mut calls = 0;
        let t = time_median(&clock, 1, 3, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 4);
        assert_eq!(t, 0.25);
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("15m").unwrap(), 900.0);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400.0);
        assert_eq!(parse_duration("90s").unwrap(), 90.0);
        assert_eq!(parse_duration("2h").unwrap(), 7200.0);
        assert_eq!(parse_duration("30").unwrap(), 1800.0);
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("15x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("15m3").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(1800.0), "30m");
        assert_eq!(format_duration(3900.0), "1h05m");
        assert_eq!(format_duration(45.0), "45s");
        assert_eq!(format_duration(95.0), "1m35s");
    }
}
