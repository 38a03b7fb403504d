//! Progress of a run: [`Bar`], the terminal observer `ddpm train` shows (a progress bar with the
//! budget left, a line per epoch), and [`PlainLines`] for logs that go to a file: when stderr is
//! not a terminal a progress bar is hidden, so a plain line says how far a run is every few
//! seconds instead.

#[cfg(feature = "progress-bar")]
pub use bar::Bar;

use crate::StepReport;

#[cfg(feature = "progress-bar")]
mod bar {
    use std::time::Instant;

    use indicatif::{ProgressBar, ProgressStyle};

    use super::PlainLines;
    use crate::budget::format_duration;
    use crate::{BudgetPlan, EpochReport, StepReport, TrainObserver};

    /// A [`TrainObserver`] for a terminal (feature `progress-bar`): a progress bar (epoch, loss, images/s and the budget
    /// left), a line for the budget's plan and for every epoch, and [`PlainLines`] on stderr
    /// instead of the bar when stderr is not a terminal.
    pub struct Bar {
        bar: ProgressBar,
        /// The budget's deadline, in seconds since `started`.
        deadline_s: Option<f64>,
        started: Instant,
        plain: Option<PlainLines>,
    }

    impl Bar {
        /// A bar for a run that started at `started` (the process start: the budget counts from
        /// there) and must end `deadline_s` seconds after it, if it has a budget; with
        /// `plain_every_s > 0` and stderr not a terminal, a plain line that often instead.
        pub fn new(started: Instant, deadline_s: Option<f64>, plain_every_s: f64) -> Self {
            let bar = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            let plain = (!std::io::IsTerminal::is_terminal(&std::io::stderr())
                && plain_every_s > 0.0)
                .then(|| PlainLines::new(plain_every_s));
            Self {
                bar,
                deadline_s,
                started,
                plain,
            }
        }

        /// Removes the bar (call when the run has ended).
        pub fn finish(&self) {
            self.bar.finish_and_clear();
        }

        fn budget_left(&self) -> String {
            self.deadline_s.map_or(String::new(), |d| {
                let left = d - self.started.elapsed().as_secs_f64();
                if left >= 0.0 {
                    format!(", budget left {}", format_duration(left))
                } else {
                    format!(", {} over budget", format_duration(-left))
                }
            })
        }
    }

    impl TrainObserver for Bar {
        fn on_plan(&mut self, p: &BudgetPlan) {
            self.bar.println(format!(
                "budget {}: {} steps planned ({:.2} s a step, {:.0} s a sample grid), predicted {}",
                format_duration(p.budget_s),
                p.steps,
                p.costs.train_step_s,
                p.costs.grid_s,
                format_duration(p.predicted_s)
            ));
        }
        fn on_replan(&mut self, p: &crate::budget::Plan, _step_s: f64) {
            // The bar and the plain lines follow the re-planned step count.
            self.bar.set_length(p.total_steps);
            if let Some(l) = &mut self.plain {
                l.retarget(p.total_steps);
            }
        }
        fn on_start(&mut self, start: u64, total: u64) {
            self.bar.set_length(total);
            self.bar.set_position(start);
            if let Some(p) = &mut self.plain {
                p.start(total, self.started.elapsed().as_secs_f64());
            }
        }
        fn on_step(&mut self, r: &StepReport) {
            self.bar.set_position(r.step);
            let left = self.budget_left();
            if let Some(p) = &mut self.plain {
                if let Some(line) = p.line(r, self.started.elapsed().as_secs_f64(), &left) {
                    eprintln!("{line}");
                }
            }
            self.bar.set_message(format!(
                "epoch {} loss {:.4} {:.1} img/s{left}",
                r.epoch, r.loss, r.images_per_sec
            ));
        }
        fn on_grid(&mut self, done: usize, total: usize) {
            self.bar
                .set_message(format!("drawing the sample grid: step {done}/{total}"));
            if let Some(p) = &mut self.plain {
                if p.due(self.started.elapsed().as_secs_f64()) {
                    eprintln!("drawing the sample grid: step {done}/{total}");
                }
            }
        }
        fn on_epoch(&mut self, r: &EpochReport) {
            self.bar.println(format!(
                "epoch {} step {}: train loss {:.4}, held-out {}, {:.1} img/s{}",
                r.epoch,
                r.step,
                r.train_loss,
                r.held_out_loss.map_or("-".into(), |l| format!("{l:.4}")),
                r.images_per_sec,
                r.sample_grid
                    .as_ref()
                    .map_or(String::new(), |p| format!(", grid {}", p.display())),
            ));
        }
    }
}

/// A plain progress line (step, share done, epoch, loss, images/s, time left) at most every
/// `every_s` seconds, and at the last step.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainLines {
    every_s: f64,
    last_s: f64,
    /// Step and time of this process's first step, for the rate and the time left.
    first: Option<(u64, f64)>,
    total: u64,
}

impl PlainLines {
    /// Lines at most every `every_s` seconds.
    pub fn new(every_s: f64) -> Self {
        Self {
            every_s,
            last_s: 0.0,
            first: None,
            total: 0,
        }
    }

    /// The run starts (or resumes) towards `total` steps at `now_s` seconds.
    pub fn start(&mut self, total: u64, now_s: f64) {
        self.total = total;
        self.last_s = now_s;
    }

    /// The run's step count changed (a budget re-planned it).
    pub fn retarget(&mut self, total: u64) {
        self.total = total;
    }

    /// Whether a line is due at `now_s` seconds (and, if so, counts it as printed): for
    /// progress other than steps, such as a sample grid being drawn.
    pub fn due(&mut self, now_s: f64) -> bool {
        let due = self.every_s > 0.0 && now_s - self.last_s >= self.every_s;
        if due {
            self.last_s = now_s;
        }
        due
    }

    /// The line for step report `r` at `now_s` seconds, when one is due; `suffix` is appended
    /// (e.g. the budget left).
    pub fn line(&mut self, r: &StepReport, now_s: f64, suffix: &str) -> Option<String> {
        let (s0, t0) = *self.first.get_or_insert((r.step.saturating_sub(1), now_s));
        let due = now_s - self.last_s >= self.every_s || r.step == self.total;
        if !due {
            return None;
        }
        self.last_s = now_s;
        let done = r.step.saturating_sub(s0);
        let per_step = (now_s - t0) / done.max(1) as f64;
        let eta =
            crate::budget::format_duration(per_step * self.total.saturating_sub(r.step) as f64);
        Some(format!(
            "step {}/{} ({:.0} %), epoch {}, loss {:.4}, {:.1} img/s, eta {eta}{suffix}",
            r.step,
            self.total,
            100.0 * r.step as f64 / self.total.max(1) as f64,
            r.epoch,
            r.loss,
            r.images_per_sec
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: u64) -> StepReport {
        StepReport {
            step,
            epoch: 0,
            loss: 0.5,
            lr: 1e-3,
            images_per_sec: 10.0,
        }
    }

    #[test]
    fn a_line_when_due_and_at_the_last_step() {
        let mut p = PlainLines::new(30.0);
        p.start(100, 0.0);
        assert!(p.line(&report(1), 1.0, "").is_none());
        let l = p.line(&report(31), 31.0, ", budget left 1m").unwrap();
        assert!(l.starts_with("step 31/100 (31 %)"), "{l}");
        assert!(l.ends_with(", budget left 1m"), "{l}");
        assert!(p.line(&report(40), 40.0, "").is_none());
        assert!(p.line(&report(100), 41.0, "").is_some());
    }
}
