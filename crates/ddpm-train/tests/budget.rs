//! The time budget end to end on a simulated machine: the plan, its re-plans as the measured
//! speed differs from the probe's, the deadline, resume, and the plan rerun with `--max-steps`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use ddpm_train::budget::{Clock, Plan};
use ddpm_train::{
    BudgetConfig, BudgetPlan, FitOutcome, StepReport, TrainConfig, TrainObserver, Trainer,
};

mod common;
use common::{card, config, data};

/// The clock of a simulated machine. During the budget's probe each reading advances it by
/// `tick` (every timed part of the probe then costs one tick: a step, a forward pass and a
/// checkpoint 1 s each, the held-out pass 0.1 s, as the plan's arithmetic below assumes);
/// once the plan is made, reading it is free and the run's work moves it ([`Machine`]).
struct WorkClock {
    now: Cell<f64>,
    tick: Cell<f64>,
}

impl WorkClock {
    fn new(tick: f64) -> Self {
        Self {
            now: Cell::new(0.0),
            tick: Cell::new(tick),
        }
    }
}

impl Clock for WorkClock {
    fn now_s(&self) -> f64 {
        let t = self.now.get();
        self.now.set(t + self.tick.get());
        t
    }
}

/// The run's work on the simulated machine: a step takes `step_s(step)`, a checkpoint 1 s, a
/// metrics line (its held-out pass) 0.1 s. Records what a test looks at, and stops the run (as
/// Ctrl-C would) after step `stop_at`.
struct Machine<'a> {
    clock: &'a WorkClock,
    step_s: &'a dyn Fn(u64) -> f64,
    stop_at: u64,
    stop: &'a AtomicBool,
    losses: Vec<(u64, f32)>,
    lrs: Vec<f64>,
    plan: Option<BudgetPlan>,
    replans: Vec<Plan>,
}

impl<'a> Machine<'a> {
    fn new(clock: &'a WorkClock, step_s: &'a dyn Fn(u64) -> f64, stop: &'a AtomicBool) -> Self {
        Self {
            clock,
            step_s,
            stop_at: u64::MAX,
            stop,
            losses: vec![],
            lrs: vec![],
            plan: None,
            replans: vec![],
        }
    }
    fn advance(&self, s: f64) {
        self.clock.now.set(self.clock.now.get() + s);
    }
}

impl TrainObserver for Machine<'_> {
    fn on_plan(&mut self, p: &BudgetPlan) {
        self.plan = Some(*p);
        self.clock.tick.set(0.0);
    }
    fn on_replan(&mut self, p: &Plan, _step_s: f64) {
        self.replans.push(*p);
    }
    fn on_step(&mut self, r: &StepReport) {
        self.advance((self.step_s)(r.step));
        self.losses.push((r.step, r.loss));
        self.lrs.push(r.lr);
        if r.step == self.stop_at {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn on_epoch(&mut self, _r: &ddpm_train::EpochReport) {
        self.advance(0.1);
    }
    fn on_checkpoint(&mut self, _path: &Path) {
        self.advance(1.0);
    }
}

fn budgeted(seconds: f64, epochs: u64) -> TrainConfig {
    TrainConfig {
        budget: Some(BudgetConfig::fitted(seconds)),
        epochs,
        ..config()
    }
}

fn run(t: &mut Trainer, dir: &Path, m: &mut Machine<'_>) -> FitOutcome {
    let (clock, stop) = (m.clock, m.stop);
    ddpm_train::fit_timed(t, &data(), dir, m, stop, clock, 0.0).unwrap()
}

/// On a machine exactly as fast as its probe, the plan holds through every re-plan; a run
/// stopped and resumed continues the same budget; and the plan rerun with plain
/// `--max-steps` is the same run.
#[test]
fn a_plan_that_holds_resumes_exactly_and_reruns_with_max_steps() {
    // The probe reads the clock 16 times (5 timed steps, 1 forward, 1 checkpoint, once before
    // and after): 15 s spent. The costs: a step 1 s, the grid nothing (sample_every = 0), the
    // held-out pass 16 of the 160 images of a guided grid's forward: 0.1 s, a checkpoint 1 s.
    // Usable: 29·0.95 − 15 = 12.55 s. 4 steps an epoch; n steps cost
    // n + 0.1·(n/4 + 1) + 1·(n/4 + 1): 9 → 12.3 fits, 10 → 13.3 does not.
    let stop = AtomicBool::new(false);
    let steady = |_| 1.0;
    let dir_a = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(card(), budgeted(29.0, 3), &candle_core::Device::Cpu).unwrap();
    let clock = WorkClock::new(1.0);
    let mut ma = Machine::new(&clock, &steady, &stop);
    assert_eq!(run(&mut a, dir_a.path(), &mut ma), FitOutcome::MaxSteps);
    let plan = ma.plan.expect("a budgeted run reports its plan");
    assert_eq!(
        plan.costs,
        ddpm_train::budget::StepCosts {
            train_step_s: 1.0,
            grid_s: 0.0,
            held_out_s: 0.1,
            checkpoint_s: 1.0
        }
    );
    assert_eq!(plan.steps, 9);
    assert!((plan.predicted_s - (15.0 + 12.3)).abs() < 1e-9);
    assert_eq!(a.step(), 9);
    assert!(ma.replans.is_empty(), "re-planned: {:?}", ma.replans);
    assert!(a.budget_state().unwrap().replans >= 8, "it did re-plan");
    // Fitted to 9 steps: warm-up 5 % → 0, EMA horizon 25 % → at least 10 steps → 0.9.
    let p = a.plan();
    assert_eq!((p.total_steps, p.warmup_steps, p.ema_decay), (9, 0, 0.9));
    assert_eq!(a.ema().decay(), 0.9);
    // The simulated run took what the plan predicted: the clock read 16 s when the probe
    // ended (its last reading advanced it once more), then 12.3 s of steps, metrics lines
    // and checkpoints.
    assert!(
        (clock.now.get() - (16.0 + 12.3)).abs() < 1e-9,
        "{}",
        clock.now.get()
    );

    // Stopped after 4 steps, then resumed: the plan and the budget's standing come from the
    // checkpoint, and the run is the same.
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = Trainer::new(card(), budgeted(29.0, 3), &candle_core::Device::Cpu).unwrap();
    let clock_b = WorkClock::new(1.0);
    let mut mb = Machine::new(&clock_b, &steady, &stop);
    mb.stop_at = 4;
    assert_eq!(run(&mut b, dir_b.path(), &mut mb), FitOutcome::Stopped);
    drop(b);
    stop.store(false, Ordering::SeqCst);
    let ckpt = dir_b.path().join("checkpoint.safetensors");
    let mut b2 = Trainer::resume(&ckpt, &candle_core::Device::Cpu, |_| {}).unwrap();
    assert_eq!(b2.plan().total_steps, 9);
    let saved = *b2.budget_state().expect("the budget's standing is saved");
    assert!((saved.used_s - (15.0 + 4.0)).abs() < 1e-9, "{saved:?}");
    let clock_b2 = WorkClock::new(0.0);
    let mut mb2 = Machine::new(&clock_b2, &steady, &stop);
    assert_eq!(run(&mut b2, dir_b.path(), &mut mb2), FitOutcome::MaxSteps);
    assert!(mb2.plan.is_none(), "a resumed run keeps its plan");
    mb.losses.extend(mb2.losses);
    assert_eq!(ma.losses, mb.losses, "resumed budgeted run differs");

    // The printed plan, rerun without a budget.
    let dir_c = tempfile::tempdir().unwrap();
    let mut c = Trainer::new(
        card(),
        TrainConfig {
            max_steps: Some(9),
            warmup_steps: 0,
            ema_decay: 0.9,
            ..config()
        },
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let clock_c = WorkClock::new(0.0);
    let mut mc = Machine::new(&clock_c, &steady, &stop);
    assert_eq!(run(&mut c, dir_c.path(), &mut mc), FitOutcome::MaxSteps);
    assert_eq!(ma.losses, mc.losses, "--max-steps rerun differs");
    assert_eq!(ma.lrs, mc.lrs);
}

/// On a machine 30 % slower or faster than its probe, the re-plans fit the step count to the
/// measured speed: the run ends at its (re-planned) last step, within the budget, with the
/// learning rate at most 1 % of its peak.
#[test]
fn runs_slower_or_faster_than_the_probe_end_annealed_within_the_budget() {
    let budget = 90.0;
    let mut planned = None;
    for speed in [1.3, 0.7] {
        let stop = AtomicBool::new(false);
        let step_s = move |_| speed;
        let dir = tempfile::tempdir().unwrap();
        let mut t =
            Trainer::new(card(), budgeted(budget, 1000), &candle_core::Device::Cpu).unwrap();
        let clock = WorkClock::new(1.0);
        let mut m = Machine::new(&clock, &step_s, &stop);
        let out = run(&mut t, dir.path(), &mut m);
        let first = m.plan.unwrap().steps;
        planned.get_or_insert(first);
        let end = clock.now.get();
        let (peak, last_lr) = (t.config().lr, *m.lrs.last().unwrap());
        assert_eq!(out, FitOutcome::MaxSteps, "×{speed}: ended by {out:?}");
        assert_eq!(t.step(), t.plan().total_steps);
        assert!(end <= budget, "×{speed}: ended at {end} s of {budget}");
        assert!(
            end >= 0.85 * budget,
            "×{speed}: used only {end} s of {budget}"
        );
        assert!(
            last_lr <= 0.01 * peak,
            "×{speed}: the last step's lr {last_lr} is above 1 % of {peak}"
        );
        // The step count moved the way the machine did.
        if speed > 1.0 {
            assert!(t.step() < first, "×{speed}: {} of {first}", t.step());
        } else {
            assert!(t.step() > first, "×{speed}: {} of {first}", t.step());
        }
        assert!(!m.replans.is_empty());
    }
    assert!(
        planned.unwrap() >= 40,
        "{planned:?}: too few steps to test annealing"
    );
}

/// A machine that slows down tenfold near the end, after the re-plans had settled, ends at the
/// budget's deadline, with its final checkpoint, instead of running over.
#[test]
fn a_sudden_slow_down_ends_at_the_deadline_within_the_budget() {
    let budget = 90.0;
    let stop = AtomicBool::new(false);
    let step_s = |step: u64| if step >= 45 { 10.0 } else { 1.0 };
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(card(), budgeted(budget, 1000), &candle_core::Device::Cpu).unwrap();
    let clock = WorkClock::new(1.0);
    let mut m = Machine::new(&clock, &step_s, &stop);
    let out = run(&mut t, dir.path(), &mut m);
    assert_eq!(out, FitOutcome::Deadline);
    assert!(t.step() < m.plan.unwrap().steps);
    assert!(clock.now.get() <= budget, "ended at {} s", clock.now.get());
    let back = Trainer::resume(
        &dir.path().join("checkpoint.safetensors"),
        &candle_core::Device::Cpu,
        |_| {},
    )
    .unwrap();
    assert_eq!(back.step(), t.step());
}
