//! `ddpm train`: the options are [`ddpm_train::launch::RunOptions`]; this adds the device, the
//! progress display and Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use ddpm_train::launch::{launch, summary, RunOptions};
use ddpm_train::{budget::WallClock, fit_timed, progress};

use crate::DeviceArg;

/// Options of `ddpm train`. Flags left out take their value from `--recipe`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    run: RunOptions,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// When stderr is not a terminal (a log file, CI), the progress bar is hidden; print a
    /// plain progress line (step, loss, images/s, time left) every this many seconds instead
    /// (0: never).
    #[arg(long, default_value_t = 30.0)]
    progress_every: f64,
}

/// Runs `ddpm train`; `explicit` names the flags given on the command line.
pub fn run(a: TrainArgs, explicit: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    let device = crate::device(a.device)?;
    let out = a.run.out.clone();
    let mut run = launch(&a.run, &device, explicit, |kind| {
        crate::data_dir(kind, None)
    })?;
    println!("{}", run.announcement);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Ctrl-C, SIGTERM (a job scheduler's stop) and SIGHUP (a closed terminal) alike: finish the
    // step, save, exit non-zero (ctrlc's `termination` feature).
    ctrlc::set_handler(move || {
        eprintln!("\nstopping: finishing this step and saving a checkpoint…");
        flag.store(true, Ordering::SeqCst);
    })
    .context("cannot install the signal handler (Ctrl-C, SIGTERM, SIGHUP)")?;
    // The budget counts from the process start on a first run; a resumed run continues it
    // with what its checkpoint says was used (the display only: the budget re-plans itself).
    let resumed_s = if run.resumed {
        run.trainer.budget_state().map_or(0.0, |b| b.used_s)
    } else {
        0.0
    };
    let deadline = run.trainer.config().budget.map(|b| b.seconds - resumed_s);
    let mut bar = progress::Bar::new(started, deadline, a.progress_every);
    let spent = started.elapsed().as_secs_f64();
    let outcome = fit_timed(
        &mut run.trainer,
        &run.data,
        &out,
        &mut bar,
        &stop,
        &WallClock::new(),
        spent,
    )
    .map_err(ddpm_train::launch::with_flag_names)
    .with_context(|| format!("training into {}", out.display()))?;
    bar.finish();
    let elapsed = started.elapsed().as_secs_f64();
    println!("{}", summary(outcome, &run.trainer, &out, elapsed));
    if outcome == ddpm_train::FitOutcome::Stopped {
        anyhow::bail!(
            "stopped by a signal at step {}; the checkpoint in {} is saved: continue with \
             `ddpm train --resume --out {}`",
            run.trainer.step(),
            out.display(),
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `ddpm train` alone.
    #[derive(Debug, Parser)]
    struct Train {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn run_options_default_is_what_the_command_line_gives() {
        let parsed = Train::try_parse_from(["train"]).map_err(|e| e.to_string());
        assert_eq!(parsed.map(|t| t.args.run), Ok(RunOptions::default()));
    }
}
