//! Convergence order of every deterministic solver on Gaussian data, where the exact
//! probability-flow solution is known: for x₀ ~ N(μ, s²) the flow keeps the standardised
//! value z = (x_t − α_t·μ)/√(α_t²·s² + σ_t²) fixed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Result, Tensor};
use ddpm_core::{Denoiser, NoiseSchedule, NoiseSource};
use ddpm_sampler::{
    adams_bashforth_weights, dpmpp_coefficients, lambda, sample, spaced_timesteps,
    unipc_coefficients, Ddim, DpmSolverPp2M, Multistep, Sampler, SamplerConfig, Solver, Spacing,
};
use ddpm_schedule::{BetaSchedule, Schedule, ScheduleConfig};

const MU: f64 = 0.3;
const S2: f64 = 0.25;

/// The exact ε prediction for data N(MU, S2), in f64.
struct Gaussian<'a>(&'a Schedule);

impl Denoiser for Gaussian<'_> {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, _y: Option<&Tensor>) -> Result<Tensor> {
        let ts: Vec<u32> = t.to_vec1()?;
        let ac = self.0.alphas_cumprod()[ts[0] as usize];
        let k = (1.0 - ac).sqrt() / (ac * S2 + 1.0 - ac);
        (x - MU * ac.sqrt())? * k
    }
    fn null_class(&self) -> Option<u32> {
        None
    }
}

struct Never;
impl NoiseSource for Never {
    fn randn(&mut self, _s: &candle_core::Shape, _d: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("a deterministic solver drew noise")
    }
}

fn schedule() -> Schedule {
    ScheduleConfig::new(BetaSchedule::linear(), 1000)
        .build()
        .unwrap()
}

fn exact(sch: &Schedule, x_start: &Tensor, t_start: usize, t: usize) -> Tensor {
    let ac = sch.alphas_cumprod();
    let std = |a: f64| (a * S2 + 1.0 - a).sqrt();
    let z = ((x_start - MU * ac[t_start].sqrt()).unwrap() / std(ac[t_start])).unwrap();
    ((z * std(ac[t])).unwrap() + MU * ac[t].sqrt()).unwrap()
}

/// `n + 1` timesteps uniform in λ from t = 999 to t = 100 (each rounded to the nearest
/// timestep; t ≥ 100 keeps the rounding well below the step).
fn grid(sch: &Schedule, n: usize) -> Vec<usize> {
    let lam: Vec<f64> = sch.alphas_cumprod().iter().map(|&a| lambda(a)).collect();
    let (lo, hi) = (lam[999], lam[100]);
    (0..=n)
        .map(|i| {
            let target = lo + (hi - lo) * i as f64 / n as f64;
            (100..1000)
                .min_by(|&a, &b| (lam[a] - target).abs().total_cmp(&(lam[b] - target).abs()))
                .unwrap()
        })
        .collect()
}

/// The largest error at t = 100 after `n` steps from t = 999, against the exact flow. The
/// first `prime` steps start from the exact solution (a multistep method's order is that of
/// its error with exact starting values; the lower-order warm-up steps are measured apart).
fn error(sch: &Schedule, s: &mut dyn Sampler, prime: usize) -> f64 {
    let ts = s.timesteps().to_vec();
    let x_start = start();
    let d = Gaussian(sch);
    let mut x = x_start.clone();
    s.reset();
    for (index, &t) in ts[..ts.len() - 1].iter().enumerate() {
        if index < prime {
            x = exact(sch, &x_start, ts[0], t);
        }
        let tt = Tensor::full(t as u32, 1, &Device::Cpu).unwrap();
        let eps = d.predict_noise(&x, &tt, None).unwrap();
        x = s.step(index, &eps, &x, &mut Never).unwrap().prev_sample;
    }
    let want = exact(sch, &x_start, ts[0], *ts.last().unwrap());
    (x - want)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The starting state: 64 values evenly spread over [-2, 2).
fn start() -> Tensor {
    let x: Vec<f64> = (0..64).map(|i| (i as f64 / 16.0) - 2.0).collect();
    Tensor::from_vec(x, 64, &Device::Cpu).unwrap()
}

fn no_clip() -> SamplerConfig {
    SamplerConfig { clip_x0: false }
}

type Build = fn(&Schedule, Vec<usize>) -> Box<dyn Sampler>;

/// Name, expected order, exact starting values, builder.
fn solvers() -> Vec<(&'static str, f64, usize, Build)> {
    fn ms(s: &Schedule, solver: Solver, ts: Vec<usize>) -> Box<dyn Sampler> {
        Box::new(Multistep::with_timesteps(s, solver, ts, no_clip()).unwrap())
    }
    vec![
        ("ddim", 1.0, 0, |s, ts| {
            Box::new(Ddim::with_timesteps(s, ts, 0.0, no_clip()).unwrap())
        }),
        ("dpm++2m", 2.0, 1, |s, ts| {
            Box::new(DpmSolverPp2M::with_timesteps(s, ts, no_clip()).unwrap())
        }),
        ("dpm++3m", 3.0, 2, |s, ts| ms(s, Solver::DpmSolverPp3M, ts)),
        ("unipc-2", 3.0, 1, |s, ts| {
            ms(s, Solver::UniPc { order: 2 }, ts)
        }),
        ("unipc-3", 4.0, 2, |s, ts| {
            ms(s, Solver::UniPc { order: 3 }, ts)
        }),
        ("ipndm", 4.0, 3, |s, ts| ms(s, Solver::Ipndm, ts)),
    ]
}

#[test]
fn each_solver_converges_at_its_order() {
    let sch = schedule();
    for (name, order, prime, build) in solvers() {
        let errs: Vec<f64> = [10usize, 20, 40, 80, 160]
            .iter()
            .map(|&n| error(&sch, build(&sch, grid(&sch, n)).as_mut(), prime))
            .collect();
        let rates: Vec<f64> = errs.windows(2).map(|w| (w[0] / w[1]).log2()).collect();
        println!(
            "{name}: errors {:?} rates {rates:.2?}",
            errs.iter().map(|e| format!("{e:.2e}")).collect::<Vec<_>>()
        );
        assert!(
            errs.windows(2).skip(1).all(|w| w[1] < w[0]),
            "{name}: the error must fall as the steps double: {errs:?}"
        );
        let rate = (rates[2] + rates[3]) / 2.0;
        assert!(
            rate >= order - 0.35 && rate <= order + 0.8,
            "{name}: observed order {rate:.2}, expected {order}"
        );
    }
}

#[test]
fn solvers_run_on_every_spacing_and_stay_deterministic() {
    let sch = schedule();
    let x = start();
    for sp in Spacing::ALL {
        for solver in [
            Solver::DpmSolverPp3M,
            Solver::UniPc { order: 2 },
            Solver::UniPc { order: 3 },
            Solver::Ipndm,
        ] {
            let mut s = Multistep::new(&sch, solver, 6, sp, no_clip()).unwrap();
            assert_eq!(s.timesteps().len(), 6, "{sp:?}");
            let mut run = || {
                sample(
                    &Gaussian(&sch),
                    &mut s,
                    x.clone(),
                    None,
                    &mut Never,
                    &mut |_| Ok(()),
                )
                .unwrap()
            };
            let (a, b) = (run(), run());
            assert_eq!(
                a.to_vec1::<f64>().unwrap(),
                b.to_vec1::<f64>().unwrap(),
                "{solver:?} {sp:?}: reset between runs"
            );
            assert!(a.to_vec1::<f64>().unwrap().iter().all(|v| v.is_finite()));
        }
    }
    assert!(Multistep::new(
        &sch,
        Solver::UniPc { order: 4 },
        6,
        Spacing::LogSnr,
        SamplerConfig::default()
    )
    .is_err());
    assert!(Multistep::new(
        &sch,
        Solver::Ipndm,
        0,
        Spacing::LogSnr,
        SamplerConfig::default()
    )
    .is_err());
}

#[test]
fn noise_level_spacings_are_uniform_in_lambda_and_exact_in_count() {
    let sch = schedule();
    let lam = |t: usize| lambda(sch.alphas_cumprod()[t]);
    for steps in [1usize, 4, 10, 50, 200, 1000] {
        for sp in [Spacing::LogSnr, Spacing::Karras] {
            let ts = spaced_timesteps(&sch, steps, sp).unwrap();
            assert_eq!(ts.len(), steps, "{sp:?} {steps}");
            assert_eq!(ts[0], 999);
            assert!(ts.windows(2).all(|w| w[0] > w[1]));
        }
    }
    // logSNR: equal steps in λ from λ(999) to λ(0), the last (t = 0) left out.
    let ts = spaced_timesteps(&sch, 8, Spacing::LogSnr).unwrap();
    let h = (lam(0) - lam(999)) / 8.0;
    for (i, &t) in ts.iter().enumerate() {
        let want = lam(999) + h * i as f64;
        // Within half a timestep's λ of the target.
        let tol = (lam(t.saturating_sub(1)) - lam((t + 1).min(999))).abs() / 2.0;
        assert!(
            (lam(t) - want).abs() <= tol,
            "t {t}: λ {} vs {want}",
            lam(t)
        );
    }
    // Karras: ρ = 7 makes the steps in σ = e^(−λ) shrink towards σ_min, but in λ they grow:
    // more of the grid lies at high noise than logSNR's, and its last step is the longest.
    let k = spaced_timesteps(&sch, 8, Spacing::Karras).unwrap();
    assert!((1..8).all(|i| k[i] > ts[i]), "{k:?} vs {ts:?}");
    let dl: Vec<f64> = k.windows(2).map(|w| lam(w[1]) - lam(w[0])).collect();
    assert!(dl.windows(2).all(|w| w[1] > w[0]), "{dl:?}");
}

#[test]
fn coefficients_match_hand_computed_values() {
    // Adams–Bashforth on equal steps: the classical 55/24, −59/24, 37/24, −9/24 (and the
    // lower orders 1; 3/2, −1/2; 23/12, −16/12, 5/12).
    let w = adams_bashforth_weights(&[0.0, -1.0, -2.0, -3.0], 1.0).unwrap();
    for (got, want) in w.iter().zip([55.0, -59.0, 37.0, -9.0]) {
        assert!((got - want / 24.0).abs() < 1e-12, "{w:?}");
    }
    let w = adams_bashforth_weights(&[0.0, -1.0, -2.0], 1.0).unwrap();
    for (got, want) in w.iter().zip([23.0, -16.0, 5.0]) {
        assert!((got - want / 12.0).abs() < 1e-12, "{w:?}");
    }
    let w = adams_bashforth_weights(&[0.0, -1.0], 1.0).unwrap();
    assert!((w[0] - 1.5).abs() < 1e-12 && (w[1] + 0.5).abs() < 1e-12);
    // DPM-Solver++(3M) with h = 1 and equal steps: by hand from the update
    // −φ·D₀ + (φ/h + 1)·D₁ − ((φ + h)/h² − ½)·D₂ with φ = e^(−1) − 1,
    // D₁ = 1.5·D₀ − 2·D₋₁ + 0.5·D₋₂, D₂ = 0.5·D₀ − D₋₁ + 0.5·D₋₂.
    let phi = (-1.0f64).exp() - 1.0;
    let (a, b) = (phi + 1.0, -((phi + 1.0) - 0.5));
    let want = [-phi + 1.5 * a + 0.5 * b, -2.0 * a - b, 0.5 * a + 0.5 * b];
    let got = dpmpp_coefficients(0.0, 1.0, &[0.0, -1.0, -2.0]).unwrap();
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }
    // A constant prediction passes through every order: the weights sum to 1 − e^(−h).
    for lams in [&[0.0][..], &[0.0, -0.7], &[0.0, -0.4, -1.1]] {
        let c = dpmpp_coefficients(0.0, 0.5, lams).unwrap();
        assert!((c.iter().sum::<f64>() - (1.0 - (-0.5f64).exp())).abs() < 1e-12);
    }
    // UniPC: the order-1 corrector weight b₁ = (φ₁/(−h) − 1)/φ₁, and the order-2 predictor's
    // ρ tends to the paper's ½ as h → 0.
    let c = unipc_coefficients(0.0, 0.3, &[0.0]).unwrap();
    let p1 = (-0.3f64).exp_m1();
    assert!((c.rho_c[0] - (p1 / -0.3 - 1.0) / p1).abs() < 1e-12);
    let c = unipc_coefficients(0.0, 1e-4, &[0.0, -1e-4]).unwrap();
    assert!((c.rho_p[0] - 0.5).abs() < 1e-3, "{c:?}");
    assert_eq!(c.rks.len(), 1);
    assert!((c.rks[0] + 1.0).abs() < 1e-9);
}
