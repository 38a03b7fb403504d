//! Sampler tests with analytic denoisers whose true ε is known in closed form.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Shape, Tensor};
use ddpm_core::{Denoiser, NoiseSchedule, NoiseSource, PosteriorVariance, SeededNoise};
use ddpm_sampler::{
    sample, spaced_timesteps, ClassifierFreeGuidance, Ddim, Ddpm, DpmSolverPp2M, Sampler,
    SamplerConfig, Spacing,
};
use ddpm_schedule::{BetaSchedule, Schedule, ScheduleConfig};

/// Data ~ N(mu, s²) per pixel (s = 0: one fixed image). The exact ε prediction is
/// E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ·mu) / (ᾱ s² + 1 − ᾱ).
struct Gaussian<'a> {
    schedule: &'a Schedule,
    mu: Tensor,
    s2: f64,
    seen_t: RefCell<Vec<u32>>,
}

impl Denoiser for Gaussian<'_> {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, _y: Option<&Tensor>) -> Result<Tensor> {
        let ts: Vec<u32> = t.to_vec1()?;
        self.seen_t.borrow_mut().extend(&ts);
        let ac = self.schedule.alphas_cumprod()[ts[0] as usize];
        let k = (1.0 - ac).sqrt() / (ac * self.s2 + 1.0 - ac);
        x.broadcast_sub(&(&self.mu * ac.sqrt())?)? * k
    }
    fn null_class(&self) -> Option<u32> {
        None
    }
}

fn schedule(t: usize) -> Schedule {
    ScheduleConfig::new(BetaSchedule::linear(), t)
        .build()
        .unwrap()
}

fn target_image() -> Tensor {
    let v: Vec<f32> = (0..64).map(|i| ((i as f32) / 32.0 - 1.0) * 0.9).collect();
    Tensor::from_vec(v, (1, 1, 8, 8), &Device::Cpu).unwrap()
}

fn run(
    d: &dyn Denoiser,
    s: &mut dyn Sampler,
    shape: (usize, usize, usize, usize),
    seed: u64,
) -> Tensor {
    let mut noise = SeededNoise::new(seed);
    let x = noise
        .randn(&Shape::from(shape), DType::F32, &Device::Cpu)
        .unwrap();
    sample(d, s, x, None, &mut noise, &mut |_| Ok(())).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.broadcast_sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn every_sampler_returns_the_single_data_image() {
    let sch = schedule(200);
    let d = Gaussian {
        schedule: &sch,
        mu: target_image(),
        s2: 0.0,
        seen_t: RefCell::default(),
    };
    let cfg = SamplerConfig::default();
    let mut samplers: Vec<(&str, Box<dyn Sampler>)> = vec![
        (
            "ddpm β̃",
            Box::new(Ddpm::new(&sch, PosteriorVariance::BetaTilde, cfg)),
        ),
        (
            "ddpm β",
            Box::new(Ddpm::new(&sch, PosteriorVariance::Beta, cfg)),
        ),
        (
            "ddim η=0",
            Box::new(Ddim::new(&sch, 20, 0.0, Spacing::Leading, cfg).unwrap()),
        ),
        (
            "ddim η=1 trailing",
            Box::new(Ddim::new(&sch, 25, 1.0, Spacing::Trailing, cfg).unwrap()),
        ),
        (
            "dpm++ 2m",
            Box::new(DpmSolverPp2M::new(&sch, 10, Spacing::Linspace, cfg).unwrap()),
        ),
    ];
    for (name, s) in samplers.iter_mut() {
        let out = run(&d, s.as_mut(), (3, 1, 8, 8), 1);
        let err = max_abs_diff(&out, &target_image());
        assert!(err < 1e-3, "{name}: max error {err}");
    }
}

#[test]
fn ddim_eta_zero_is_deterministic_in_the_noise_stream() {
    let sch = schedule(100);
    let d = Gaussian {
        schedule: &sch,
        mu: target_image(),
        s2: 0.3,
        seen_t: RefCell::default(),
    };
    let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8), &Device::Cpu).unwrap();
    let mut outs = vec![];
    for seed in [1, 2] {
        let mut s = Ddim::new(&sch, 10, 0.0, Spacing::Leading, SamplerConfig::default()).unwrap();
        let mut noise = SeededNoise::new(seed);
        outs.push(sample(&d, &mut s, x.clone(), None, &mut noise, &mut |_| Ok(())).unwrap());
    }
    assert_eq!(max_abs_diff(&outs[0], &outs[1]), 0.0);
    // η = 1 does use the noise stream.
    let mut outs = vec![];
    for seed in [1, 2] {
        let mut s = Ddim::new(&sch, 10, 1.0, Spacing::Leading, SamplerConfig::default()).unwrap();
        let mut noise = SeededNoise::new(seed);
        outs.push(sample(&d, &mut s, x.clone(), None, &mut noise, &mut |_| Ok(())).unwrap());
    }
    assert!(max_abs_diff(&outs[0], &outs[1]) > 1e-3);
}

fn moments(x: &Tensor) -> (f64, f64) {
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len() as f64;
    let m = v.iter().map(|&a| a as f64).sum::<f64>() / n;
    (
        m,
        v.iter().map(|&a| (a as f64 - m).powi(2)).sum::<f64>() / n,
    )
}

#[test]
fn ddim_eta_one_over_all_steps_matches_ddpm_statistics() {
    // Cosine: ᾱ_{T−1} ≈ 0, so x_T ~ N(0, I) is the true marginal even with T = 100.
    let sch = ScheduleConfig::new(BetaSchedule::cosine(), 100)
        .build()
        .unwrap();
    let (mu, s2) = (0.3f32, 0.25f64);
    let d = Gaussian {
        schedule: &sch,
        mu: Tensor::new(&[mu], &Device::Cpu).unwrap(),
        s2,
        seen_t: RefCell::default(),
    };
    let no_clip = SamplerConfig { clip_x0: false };
    let shape = (1, 1, 100, 200);
    let ddpm = Ddpm::new(&sch, PosteriorVariance::BetaTilde, no_clip);
    let ddim = Ddim::new(&sch, 100, 1.0, Spacing::Leading, no_clip).unwrap();
    let ddim0 = Ddim::new(&sch, 100, 0.0, Spacing::Leading, no_clip).unwrap();
    let dpm = DpmSolverPp2M::new(&sch, 20, Spacing::Leading, no_clip).unwrap();
    let x_ddpm = run(&d, &mut ddpm.clone(), shape, 5);
    // Same noise stream: DDIM with η = 1 over all T steps IS the DDPM (β̃) chain.
    let x_ddim = run(&d, &mut ddim.clone(), shape, 5);
    assert!(
        max_abs_diff(&x_ddpm, &x_ddim) < 1e-3,
        "{}",
        max_abs_diff(&x_ddpm, &x_ddim)
    );
    // Independent noise: same statistics, all close to the data's N(mu, s²) (T = 100
    // leaves a discretisation bias of a few per cent in the variance).
    let n = 20_000f64;
    let mut stats = vec![];
    for (name, x) in [
        ("ddpm", x_ddpm),
        ("ddim η=1", run(&d, &mut ddim.clone(), shape, 6)),
        ("ddim η=0", run(&d, &mut ddim0.clone(), shape, 7)),
        ("dpm++", run(&d, &mut dpm.clone(), shape, 8)),
    ] {
        let (m, v) = moments(&x);
        assert!(
            (m - mu as f64).abs() < 5.0 * (s2 / n).sqrt() + 0.01,
            "{name}: mean {m}"
        );
        assert!((v - s2).abs() < 0.12 * s2, "{name}: var {v} vs {s2}");
        stats.push((m, v));
    }
    let ((m1, v1), (m2, v2)) = (stats[0], stats[1]);
    assert!(
        (m1 - m2).abs() < 0.015 && (v1 - v2).abs() < 0.015,
        "ddpm ({m1},{v1}) vs ddim ({m2},{v2})"
    );
}

/// Noise source that records whether its draws look Gaussian.
#[test]
fn reverse_step_adds_gaussian_noise() {
    let sch = schedule(50);
    let mut s = Ddpm::new(
        &sch,
        PosteriorVariance::Beta,
        SamplerConfig { clip_x0: false },
    );
    let x = Tensor::zeros((1, 1, 200, 200), DType::F32, &Device::Cpu).unwrap();
    let eps = x.zeros_like().unwrap();
    let mut noise = SeededNoise::new(3);
    // At index 0 (t = 49), x_t = 0 and ε = 0 give mean 0: what is left is σ·z.
    let step = s.step(0, &eps, &x, &mut noise).unwrap();
    let sigma = sch.betas()[49].sqrt();
    let z: Vec<f32> = (step.prev_sample / sigma)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let n = z.len() as f64;
    let var = z.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / n;
    let kurt = z.iter().map(|&a| (a as f64).powi(4)).sum::<f64>() / n / (var * var);
    assert!((var - 1.0).abs() < 0.03, "var {var}");
    // Gaussian kurtosis is 3; uniform noise would give 1.8.
    assert!((kurt - 3.0).abs() < 0.15, "kurtosis {kurt}");
}

#[test]
fn timesteps_stay_in_range() {
    for t_total in [50usize, 300, 1000] {
        let sch = schedule(t_total);
        for steps in [1usize, 7, 50, t_total] {
            for sp in Spacing::ALL {
                let ts = spaced_timesteps(&sch, steps, sp).unwrap();
                assert!(
                    ts.iter().all(|&t| t < t_total),
                    "{sp:?} {steps}/{t_total}: {ts:?}"
                );
                assert!(ts.windows(2).all(|w| w[0] > w[1]));
                assert!(!ts.is_empty() && ts.len() <= steps);
            }
        }
        for sp in Spacing::ALL {
            assert!(spaced_timesteps(&sch, t_total + 1, sp).is_err());
            assert!(spaced_timesteps(&sch, 0, sp).is_err());
        }
    }
    // The denoiser is only ever asked about t in 0..T, and DDPM visits every one.
    let sch = schedule(40);
    let d = Gaussian {
        schedule: &sch,
        mu: target_image(),
        s2: 0.0,
        seen_t: RefCell::default(),
    };
    run(
        &d,
        &mut Ddpm::new(&sch, PosteriorVariance::BetaTilde, SamplerConfig::default()),
        (1, 1, 8, 8),
        0,
    );
    let seen = d.seen_t.borrow().clone();
    assert_eq!(seen, (0..40u32).rev().collect::<Vec<_>>());
    assert_eq!(
        spaced_timesteps(&schedule(1000), 4, Spacing::Trailing).unwrap(),
        vec![999, 749, 499, 249]
    );
    assert_eq!(
        spaced_timesteps(&schedule(1000), 4, Spacing::Leading).unwrap(),
        vec![750, 500, 250, 0]
    );
}

/// Returns 2·label + 1 for a class, 0.5 for the null class; counts calls and batch sizes.
#[derive(Debug)]
struct Mock {
    calls: RefCell<Vec<usize>>,
}

impl Denoiser for Mock {
    fn predict_noise(&self, x: &Tensor, _t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        self.calls.borrow_mut().push(x.dim(0)?);
        let y: Vec<u32> = y.expect("labels").to_vec1()?;
        let vals: Vec<f32> = y
            .iter()
            .map(|&l| if l == 10 { 0.5 } else { 2.0 * l as f32 + 1.0 })
            .collect();
        let per = x.elem_count() / x.dim(0)?;
        let data: Vec<f32> = vals
            .iter()
            .flat_map(|&v| std::iter::repeat_n(v, per))
            .collect();
        Tensor::from_vec(data, x.shape(), x.device())
    }
    fn null_class(&self) -> Option<u32> {
        Some(10)
    }
}

#[test]
fn guidance_formula_and_one_batched_forward() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 1, 2, 2), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[5u32, 5, 5], &dev).unwrap();
    let y = Tensor::new(&[0u32, 3, 7], &dev).unwrap();
    for w in [0.0, 0.5, 3.0, -1.0] {
        let g = ClassifierFreeGuidance::new(
            Mock {
                calls: RefCell::default(),
            },
            w,
        )
        .unwrap();
        let out: Vec<Vec<f32>> = g
            .predict_noise(&x, &t, Some(&y))
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (row, l) in out.iter().zip([0u32, 3, 7]) {
            let (c, u) = (2.0 * l as f64 + 1.0, 0.5);
            let want = (1.0 + w) * c - w * u;
            assert!(
                row.iter().all(|&v| (v as f64 - want).abs() < 1e-5),
                "w={w} l={l}: {row:?} vs {want}"
            );
        }
        let calls = g.inner().calls.borrow().clone();
        if w == 0.0 {
            assert_eq!(calls, vec![3], "w = 0 skips the unconditional half");
        } else {
            assert_eq!(calls, vec![6], "one batched forward of cond + uncond");
        }
    }
    // w must be finite.
    for w in [f64::NAN, f64::INFINITY] {
        let e = ClassifierFreeGuidance::new(
            Mock {
                calls: RefCell::default(),
            },
            w,
        )
        .unwrap_err();
        assert!(e.to_string().contains("finite"), "{e}");
    }
}

#[test]
fn guidance_needs_a_conditional_model() {
    let sch = schedule(10);
    let d = Gaussian {
        schedule: &sch,
        mu: target_image(),
        s2: 0.0,
        seen_t: RefCell::default(),
    };
    assert!(ClassifierFreeGuidance::new(&d, 2.0).is_err());
    assert!(ClassifierFreeGuidance::new(&d, 0.0).is_ok());
}

#[test]
fn callback_sees_every_step_and_can_stop() {
    let sch = schedule(100);
    let d = Gaussian {
        schedule: &sch,
        mu: target_image(),
        s2: 0.0,
        seen_t: RefCell::default(),
    };
    let mut s = Ddim::new(&sch, 10, 0.0, Spacing::Leading, SamplerConfig::default()).unwrap();
    let mut seen = vec![];
    let mut noise = SeededNoise::new(0);
    let x = noise
        .randn(&Shape::from((1, 1, 8, 8)), DType::F32, &Device::Cpu)
        .unwrap();
    sample(&d, &mut s, x.clone(), None, &mut noise, &mut |i| {
        seen.push((i.index, i.t, i.total));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.len(), 10);
    assert_eq!(seen[0], (0, 90, 10));
    let r = sample(&d, &mut s, x, None, &mut noise, &mut |_| {
        Err(candle_core::Error::Msg("stop".into()))
    });
    assert!(r.is_err());
}

fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect()
}

fn close(got: &Tensor, want: &[f64], what: &str) {
    let got = host(got);
    assert_eq!(got.len(), want.len());
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d < 2e-5, "{what}: max error {d}");
}

/// x̂₀ and the ε consistent with it, clipped if asked, in f64 (the textbook formula).
fn x0_eps(x: &[f64], e: &[f64], ac: f64, clip: bool) -> (Vec<f64>, Vec<f64>) {
    let x0: Vec<f64> = x
        .iter()
        .zip(e)
        .map(|(x, e)| (x - (1.0 - ac).sqrt() * e) / ac.sqrt())
        .map(|v| if clip { v.clamp(-1.0, 1.0) } else { v })
        .collect();
    let e = x
        .iter()
        .zip(&x0)
        .map(|(x, x0)| (x - ac.sqrt() * x0) / (1.0 - ac).sqrt())
        .collect();
    (x0, e)
}

/// Each built-in sampler's fused step against its paper's formula, computed in f64 on the
/// host, with the guidance combination done by hand, so the coefficients handed to the fused
/// op are checked, not only the op.
#[test]
fn fused_steps_match_the_textbook_formulas() {
    let s = schedule(100);
    let (ac, betas) = (s.alphas_cumprod().to_vec(), s.betas().to_vec());
    let mut rng = SeededNoise::new(11);
    let dev = Device::Cpu;
    let x = (rng
        .randn(&Shape::from((2, 1, 3, 3)), DType::F32, &dev)
        .unwrap()
        * 1.7)
        .unwrap();
    let pair = rng
        .randn(&Shape::from((4, 1, 3, 3)), DType::F32, &dev)
        .unwrap();
    let w = 2.5;
    let g = ddpm_core::GuidancePair {
        pair: pair.clone(),
        w,
    };
    let (xh, ph) = (host(&x), host(&pair));
    let eps: Vec<f64> = (0..18)
        .map(|i| (1.0 + w) * ph[i] - w * ph[18 + i])
        .collect();
    let z_of = |seed: u64| {
        host(
            &SeededNoise::new(seed)
                .randn(x.shape(), DType::F32, &dev)
                .unwrap(),
        )
    };

    // DDPM at t = 57, β̃ variance.
    let mut ddpm = Ddpm::new(&s, PosteriorVariance::BetaTilde, SamplerConfig::default());
    let idx = ddpm.timesteps().iter().position(|&t| t == 57).unwrap();
    let step = ddpm
        .step_guided(idx, &g, &x, &mut SeededNoise::new(3))
        .unwrap();
    let (a, ap, b) = (ac[57], ac[56], betas[57]);
    let (x0, _) = x0_eps(&xh, &eps, a, true);
    let var = b * (1.0 - ap) / (1.0 - a);
    let z = z_of(3);
    let want: Vec<f64> = (0..18)
        .map(|i| {
            b * ap.sqrt() / (1.0 - a) * x0[i]
                + (1.0 - ap) * (1.0 - b).sqrt() / (1.0 - a) * xh[i]
                + var.sqrt() * z[i]
        })
        .collect();
    close(&step.prev_sample, &want, "ddpm");
    close(&step.pred_x0, &x0, "ddpm x0");

    // DDIM, 10 steps, η = 0.7, step 3.
    let mut ddim = Ddim::new(&s, 10, 0.7, Spacing::Leading, SamplerConfig::default()).unwrap();
    let (t, tp) = (ddim.timesteps()[3], ddim.timesteps()[4]);
    let step = ddim
        .step_guided(3, &g, &x, &mut SeededNoise::new(4))
        .unwrap();
    let (a, ap) = (ac[t], ac[tp]);
    let (x0, e) = x0_eps(&xh, &eps, a, true);
    let s2 = 0.49 * (1.0 - ap) / (1.0 - a) * (1.0 - a / ap);
    let z = z_of(4);
    let want: Vec<f64> = (0..18)
        .map(|i| ap.sqrt() * x0[i] + (1.0 - ap - s2).sqrt() * e[i] + s2.sqrt() * z[i])
        .collect();
    close(&step.prev_sample, &want, "ddim");

    // DPM-Solver++(2M): two steps (the second is second order), guided, unclipped (at high
    // noise levels clipping would make both x̂₀ ±1 and hide the second-order term).
    let unclipped = SamplerConfig { clip_x0: false };
    let mut dpm = DpmSolverPp2M::new(&s, 5, Spacing::Leading, unclipped).unwrap();
    let ts = dpm.timesteps().to_vec();
    let mut n = SeededNoise::new(0);
    let first = dpm.step_guided(0, &g, &x, &mut n).unwrap();
    // A different prediction at the second step (with a constant ε, x̂₀ would not change).
    let pair2 = rng
        .randn(&Shape::from((4, 1, 3, 3)), DType::F32, &dev)
        .unwrap();
    let g2 = ddpm_core::GuidancePair {
        pair: pair2.clone(),
        w,
    };
    let p2 = host(&pair2);
    let eps2: Vec<f64> = (0..18)
        .map(|i| (1.0 + w) * p2[i] - w * p2[18 + i])
        .collect();
    let second = dpm.step_guided(1, &g2, &first.prev_sample, &mut n).unwrap();
    let lam = |a: f64| 0.5 * (a / (1.0 - a)).ln();
    let (x0a, _) = x0_eps(&xh, &eps, ac[ts[0]], false);
    let x1 = host(&first.prev_sample);
    let (x0b, _) = x0_eps(&x1, &eps2, ac[ts[1]], false);
    let (a_s, a_t) = (ac[ts[1]], ac[ts[2]]);
    let h = lam(a_t) - lam(a_s);
    let r = (lam(a_s) - lam(ac[ts[0]])) / h;
    let want: Vec<f64> = (0..18)
        .map(|i| {
            let d = x0b[i] + 0.5 / r * (x0b[i] - x0a[i]);
            ((1.0 - a_t) / (1.0 - a_s)).sqrt() * x1[i] - a_t.sqrt() * ((-h).exp() - 1.0) * d
        })
        .collect();
    close(&second.prev_sample, &want, "dpm++ second order");
    assert!(
        x0a.iter().zip(&x0b).any(|(a, b)| (a - b).abs() > 0.1),
        "the second-order term must matter in this test"
    );
}

/// A guided denoiser that hides its halves: `sample` must then combine before the step.
struct Opaque<D>(D);

impl<D: Denoiser> Denoiser for Opaque<D> {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        self.0.predict_noise(x, t, y)
    }
    fn null_class(&self) -> Option<u32> {
        self.0.null_class()
    }
}

#[test]
fn guidance_fused_into_the_step_samples_as_combining_first() {
    let mock = || Mock {
        calls: RefCell::default(),
    };
    let s = schedule(50);
    let labels = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
    let go = |d: &dyn Denoiser, sampler: &mut dyn Sampler| {
        let mut noise = SeededNoise::new(8);
        let x = noise
            .randn(&Shape::from((2, 1, 4, 4)), DType::F32, &Device::Cpu)
            .unwrap();
        sample(d, sampler, x, Some(&labels), &mut noise, &mut |_| Ok(())).unwrap()
    };
    let samplers = || -> Vec<Box<dyn Sampler>> {
        vec![
            Box::new(Ddpm::new(
                &s,
                PosteriorVariance::Beta,
                SamplerConfig::default(),
            )),
            Box::new(Ddim::new(&s, 10, 0.5, Spacing::Trailing, SamplerConfig::default()).unwrap()),
            Box::new(
                DpmSolverPp2M::new(&s, 8, Spacing::Leading, SamplerConfig::default()).unwrap(),
            ),
        ]
    };
    for (mut a, mut b) in samplers().into_iter().zip(samplers()) {
        let fused = ClassifierFreeGuidance::new(mock(), 0.3).unwrap();
        let combined = Opaque(ClassifierFreeGuidance::new(mock(), 0.3).unwrap());
        let (x1, x2) = (go(&fused, a.as_mut()), go(&combined, b.as_mut()));
        let d = max_abs_diff(&x1, &x2);
        assert!(d < 1e-4, "{d}");
        // Still one batched forward of 2B per step.
        assert!(fused.inner().calls.borrow().iter().all(|&n| n == 4));
    }
}

/// A network that returns a fixed output whatever it is asked (repeated for a guided batch).
struct Fixed(Tensor);
impl Denoiser for Fixed {
    fn predict_noise(&self, x: &Tensor, _t: &Tensor, _y: Option<&Tensor>) -> Result<Tensor> {
        let k = x.dim(0)? / self.0.dim(0)?;
        Tensor::cat(&vec![&self.0; k], 0)
    }
    fn null_class(&self) -> Option<u32> {
        Some(10)
    }
}

/// v-prediction: ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t per sample, computed by hand; ε passes through.
#[test]
fn parameterized_turns_v_into_epsilon_per_sample() {
    use ddpm_sampler::{Parameterized, Prediction};
    let s = schedule(1000);
    let mut rng = SeededNoise::new(9);
    let shape = Shape::from((3, 1, 2, 2));
    let v = rng.randn(&shape, DType::F32, &Device::Cpu).unwrap();
    let x = rng.randn(&shape, DType::F32, &Device::Cpu).unwrap();
    let ts = [0u32, 499, 999];
    let t = Tensor::new(&ts, &Device::Cpu).unwrap();
    let eps = Parameterized::new(Fixed(v.clone()), Prediction::V, &s)
        .predict_noise(&x, &t, None)
        .unwrap();
    let (vv, xv, ev): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        v.flatten_all().unwrap().to_vec1().unwrap(),
        x.flatten_all().unwrap().to_vec1().unwrap(),
        eps.flatten_all().unwrap().to_vec1().unwrap(),
    );
    for k in 0..12 {
        let ac = s.alphas_cumprod()[ts[k / 4] as usize];
        let want = ac.sqrt() * vv[k] as f64 + (1.0 - ac).sqrt() * xv[k] as f64;
        assert!(
            (ev[k] as f64 - want).abs() < 1e-5,
            "{k}: {} vs {want}",
            ev[k]
        );
    }
    let same = Parameterized::new(Fixed(v.clone()), Prediction::Epsilon, &s)
        .predict_noise(&x, &t, None)
        .unwrap();
    assert_eq!(
        same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vv,
        "ε-prediction must pass through"
    );
    // Under guidance the wrapper sits inside: the combined ε is the converted combination.
    let g =
        ClassifierFreeGuidance::new(Parameterized::new(Fixed(v), Prediction::V, &s), 2.0).unwrap();
    let y = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    let ge: Vec<f32> = g
        .predict_noise(&x, &t, Some(&y))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for k in 0..12 {
        // Both halves predict the same v, so (1 + w)·ε − w·ε = ε.
        assert!((ge[k] - ev[k]).abs() < 1e-5);
    }
}

/// The schedule's variance table and the DDPM sampler agree at every t, both variance
/// choices, t = 0 included: the last step adds no noise (Ho et al. 2020, Algorithm 2), so
/// its result does not depend on the noise stream.
#[test]
fn ddpm_variance_agrees_with_the_schedule_at_t_zero() {
    let s = schedule(50);
    for choice in [PosteriorVariance::Beta, PosteriorVariance::BetaTilde] {
        assert_eq!(s.variance(0, choice), 0.0, "{choice:?}");
        assert!(s.variance(1, choice) > 0.0, "{choice:?}");
        let x = target_image();
        let eps = (x.ones_like().unwrap() * 0.1).unwrap();
        let last = |seed: u64| {
            let mut d = Ddpm::new(&s, choice, SamplerConfig::default());
            let index = d.timesteps().len() - 1;
            assert_eq!(d.timesteps()[index], 0);
            d.step(index, &eps, &x, &mut SeededNoise::new(seed))
                .unwrap()
                .prev_sample
        };
        assert_eq!(max_abs_diff(&last(1), &last(2)), 0.0, "{choice:?}");
        // One step earlier the noise is there, with the schedule's σ.
        let at1 = |seed: u64| {
            let mut d = Ddpm::new(&s, choice, SamplerConfig::default());
            let index = d.timesteps().len() - 2;
            d.step(index, &eps, &x, &mut SeededNoise::new(seed))
                .unwrap()
                .prev_sample
        };
        let (a, b) = (at1(1), at1(2));
        let spread = max_abs_diff(&a, &b) as f64;
        let sigma = s.variance(1, choice).sqrt();
        assert!(
            spread > sigma && spread < 12.0 * sigma,
            "{choice:?}: {spread} vs σ {sigma}"
        );
    }
}

/// A sampler over a caller's timesteps (the reconstruction path) checks them, and DDPM refuses
/// gaps.
#[test]
fn samplers_over_given_timesteps_check_them() {
    let s = schedule(100);
    let cfg = SamplerConfig::default();
    assert!(Ddim::with_timesteps(&s, vec![40, 20, 0], 0.0, cfg).is_ok());
    assert!(DpmSolverPp2M::with_timesteps(&s, vec![40, 20, 0], cfg).is_ok());
    assert!(
        Ddpm::with_timesteps(&s, (0..=40).rev().collect(), PosteriorVariance::Beta, cfg).is_ok()
    );
    let gap = Ddpm::with_timesteps(&s, vec![40, 20, 0], PosteriorVariance::Beta, cfg);
    assert!(gap.unwrap_err().to_string().contains("gap"));
    for bad in [vec![], vec![100, 0], vec![10, 20], vec![10, 10]] {
        assert!(
            Ddim::with_timesteps(&s, bad.clone(), 0.0, cfg).is_err(),
            "{bad:?}"
        );
    }
}

/// A network with w as an input: records (batch, w) of every call.
struct TakesW {
    calls: RefCell<Vec<(usize, f64)>>,
}

impl Denoiser for TakesW {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        self.predict_noise_at(x, t, y, 0.0)
    }
    fn null_class(&self) -> Option<u32> {
        Some(10)
    }
    fn takes_guidance(&self) -> bool {
        true
    }
    fn predict_noise_at(
        &self,
        x: &Tensor,
        _t: &Tensor,
        _y: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        self.calls.borrow_mut().push((x.dim(0)?, w));
        (x * 0.1)? + w
    }
}

#[test]
fn a_network_that_takes_w_is_guided_in_one_call_per_step() {
    let sch = schedule(50);
    let net = TakesW {
        calls: RefCell::default(),
    };
    let guided = ClassifierFreeGuidance::new(&net, 2.5).unwrap();
    let mut s = Ddim::new(&sch, 5, 0.0, Spacing::Trailing, SamplerConfig::default()).unwrap();
    let mut noise = SeededNoise::new(0);
    let x = noise
        .randn(&Shape::from((3, 1, 4, 4)), DType::F32, &Device::Cpu)
        .unwrap();
    let labels = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    sample(&guided, &mut s, x, Some(&labels), &mut noise, &mut |_| {
        Ok(())
    })
    .unwrap();
    // Five steps, each one call on the batch of 3 (not a doubled batch of 6) at w = 2.5.
    assert_eq!(*net.calls.borrow(), vec![(3, 2.5); 5]);
}
