//! Which timesteps a few-step sampler visits.

use candle_core::{bail, Result};
use ddpm_core::NoiseSchedule;
use serde::{Deserialize, Serialize};

/// Which timesteps a few-step sampler visits: the N timesteps where it runs the network.
/// After the last one every sampler steps to clean data (ᾱ = 1).
///
/// `Leading`, `Trailing` and `Linspace` are the diffusers names and are spaced in t.
/// `LogSnr` and `Karras` are spaced in the noise level: they are the first N points of an
/// (N + 1)-point grid from t = T − 1 to t = 0 in λ = ½·log(ᾱ / (1 − ᾱ)) (uniform) or in
/// σ = e^(−λ) with EDM's ρ = 7 (Karras et al. 2022), each rounded to the nearest timestep in
/// λ; t = 0 itself is left out (a network call there barely changes the sample), so the
/// last call is as far from clean data as the grid allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Spacing {
    /// `i · T/steps` for i in 0..steps (DDIM paper; includes t = 0).
    #[default]
    Leading,
    /// `T − 1 − i · T/steps`: always starts at the noisiest step T − 1.
    Trailing,
    /// `round(linspace(0, T − 1, steps))`.
    Linspace,
    /// Uniform in the log signal-to-noise ratio λ, from T − 1 towards 0 (DPM-Solver's
    /// `logSNR` spacing).
    #[serde(rename = "logsnr")]
    #[cfg_attr(feature = "clap", value(name = "logsnr"))]
    LogSnr,
    /// EDM's σ_i = (σ_max^(1/ρ) + i/N·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ with ρ = 7, σ = e^(−λ).
    Karras,
}

/// EDM's ρ for [`Spacing::Karras`].
pub const KARRAS_RHO: f64 = 7.0;

impl Spacing {
    /// Every spacing, in the order the command line lists them.
    pub const ALL: [Spacing; 5] = [
        Spacing::Leading,
        Spacing::Trailing,
        Spacing::Linspace,
        Spacing::LogSnr,
        Spacing::Karras,
    ];

    /// The name the command line and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
            Spacing::LogSnr => "logsnr",
            Spacing::Karras => "karras",
        }
    }

    /// Parses a name of [`Spacing::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|sp| sp.name() == s)
    }
}

/// λ = ½·log(ᾱ / (1 − ᾱ)), the half log signal-to-noise ratio.
pub fn lambda(alpha_bar: f64) -> f64 {
    0.5 * (alpha_bar / (1.0 - alpha_bar)).ln()
}

/// `steps` strictly descending timesteps in `0..T` of `schedule`, spaced by `spacing`.
/// Fails if `steps` is 0 or above T.
///
/// ```
/// use ddpm_sampler::{spaced_timesteps, Spacing};
/// use ddpm_schedule::ScheduleConfig;
///
/// let schedule = ScheduleConfig::default().build().unwrap(); // linear, T = 1000
/// assert_eq!(spaced_timesteps(&schedule, 4, Spacing::Trailing)?, [999, 749, 499, 249]);
/// let ts = spaced_timesteps(&schedule, 4, Spacing::LogSnr)?;
/// assert_eq!((ts.len(), ts[0]), (4, 999));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn spaced_timesteps(
    schedule: &dyn NoiseSchedule,
    steps: usize,
    spacing: Spacing,
) -> Result<Vec<usize>> {
    timesteps_from(schedule.alphas_cumprod(), steps, spacing)
}

/// [`spaced_timesteps`] from the schedule's ᾱ table.
pub(crate) fn timesteps_from(
    alphas_cumprod: &[f64],
    steps: usize,
    spacing: Spacing,
) -> Result<Vec<usize>> {
    let t_total = alphas_cumprod.len();
    if steps == 0 || steps > t_total {
        bail!("the number of sampling steps must lie in 1..={t_total} (the schedule's T), got {steps}");
    }
    let ratio = t_total as f64 / steps as f64;
    let mut ts: Vec<usize> = match spacing {
        Spacing::Leading => (0..steps)
            .map(|i| (i as f64 * ratio).floor() as usize)
            .collect(),
        Spacing::Trailing => (0..steps)
            .map(|i| ((t_total as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
            .collect(),
        Spacing::Linspace => (0..steps)
            .map(|i| {
                if steps == 1 {
                    t_total - 1
                } else {
                    (i as f64 * (t_total - 1) as f64 / (steps - 1) as f64).round() as usize
                }
            })
            .collect(),
        Spacing::LogSnr | Spacing::Karras => {
            return noise_level_grid(alphas_cumprod, steps, spacing);
        }
    };
    ts.sort_unstable_by(|a, b| b.cmp(a));
    ts.dedup();
    Ok(ts)
}

/// The [`Spacing::LogSnr`] and [`Spacing::Karras`] grids: targets in λ, each rounded to the
/// nearest timestep in λ, then pushed apart so that exactly `steps` distinct timesteps remain.
fn noise_level_grid(ac: &[f64], steps: usize, spacing: Spacing) -> Result<Vec<usize>> {
    let t_total = ac.len();
    let lams: Vec<f64> = ac.iter().map(|&a| lambda(a)).collect();
    if lams.iter().any(|l| !l.is_finite()) || lams.windows(2).any(|w| w[1] >= w[0]) {
        bail!(
            "spacing {}: the schedule's ᾱ must lie in (0, 1) and fall with t",
            spacing.name()
        );
    }
    let (lam_min, lam_max) = (lams[t_total - 1], lams[0]);
    let frac = |i: usize| i as f64 / steps as f64;
    let targets: Vec<f64> = (0..steps)
        .map(|i| match spacing {
            Spacing::Karras => {
                let inv = 1.0 / KARRAS_RHO;
                let (hi, lo) = ((-lam_min).exp().powf(inv), (-lam_max).exp().powf(inv));
                -(hi + frac(i) * (lo - hi)).powf(KARRAS_RHO).ln()
            }
            _ => lam_min + frac(i) * (lam_max - lam_min),
        })
        .collect();
    // λ rises as t falls: the nearest timestep by λ, found by bisection.
    let nearest = |target: f64| -> usize {
        let idx = lams.partition_point(|&l| l > target); // first t with λ_t <= target
        match idx {
            0 => 0,
            i if i >= t_total => t_total - 1,
            i if (lams[i - 1] - target) < (target - lams[i]) => i - 1,
            i => i,
        }
    };
    let mut ts: Vec<usize> = targets.into_iter().map(nearest).collect();
    // Strictly descending with exactly `steps` entries: each at least one above the next
    // (from the end), then each at most one below the previous (from the start).
    for i in (0..steps).rev() {
        let floor = if i + 1 < steps { ts[i + 1] + 1 } else { 0 };
        ts[i] = ts[i].max(floor);
    }
    for i in 0..steps {
        let ceil = if i == 0 { t_total - 1 } else { ts[i - 1] - 1 };
        ts[i] = ts[i].min(ceil);
    }
    Ok(ts)
}

/// Checks that `ts` is a usable timestep list for a schedule of `t_total` steps: non-empty,
/// strictly descending, each below `t_total`.
pub fn check_timesteps(ts: &[usize], t_total: usize) -> Result<()> {
    if ts.is_empty() {
        bail!("sampler: an empty list of timesteps");
    }
    if let Some(&bad) = ts.iter().find(|&&t| t >= t_total) {
        bail!("sampler: timestep {bad} is outside 0..{t_total} (the schedule's T)");
    }
    if ts.windows(2).any(|w| w[1] >= w[0]) {
        bail!("sampler: timesteps must strictly descend, got {ts:?}");
    }
    Ok(())
}
