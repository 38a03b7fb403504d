//! Progress for logs that go to a file: when stderr is not a terminal a progress bar is
//! hidden, so [`PlainLines`] says how far a run is in one plain line every few seconds.

use crate::StepReport;

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
