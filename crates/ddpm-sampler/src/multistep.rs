//! Higher-order multistep solvers of the probability-flow ODE: DPM-Solver++(3M), UniPC and
//! iPNDM. Each step runs the network once; the solver keeps the last few data predictions.
//!
//! All three work on the data prediction D = x̂₀ (clipped when [`SamplerConfig::clip_x0`]
//! is on) at the half log-SNR λ = ½·log(ᾱ/(1 − ᾱ)), with α = √ᾱ and σ = √(1 − ᾱ):
//!
//! - **DPM-Solver++(3M)** (Lu et al. 2022): the exponential integrator
//!   x_t = (σ_t/σ_s)·x_s − α_t(e^(−h) − 1)·D₀ + α_t((e^(−h) − 1)/h + 1)·D₁
//!   − α_t((e^(−h) − 1 + h)/h² − ½)·D₂ with h = λ_t − λ_s and D₁, D₂ the divided differences
//!   of the last three predictions; orders 1 and 2 for the first two steps.
//! - **UniPC** (Zhao et al. 2023), variant B(h) = e^(−h) − 1 ("bh2"): the predictor UniP-p
//!   on the last p predictions, then the corrector UniC, which re-uses the network call made
//!   at the predicted point to correct it (no extra call). The coefficients solve the order
//!   conditions R·ρ = b exactly.
//! - **iPNDM** (Zhang & Chen 2023): Adams–Bashforth of order up to 4 on
//!   dx̃/dσ̃ = ε̂ with x̃ = x/α and σ̃ = σ/α = e^(−λ), warmed up with orders 1, 2, 3. The
//!   weights integrate the Lagrange polynomial through the last derivatives exactly, so the
//!   steps need not be equal (diff-sampler's `ipndm_v`); for equal steps they are the
//!   classical 55/24, −59/24, 37/24, −9/24. Its last step integrates to σ̃ = 0.
//!
//! The DPM-Solver++ and UniPC steps after the last timestep jump to clean data with the last
//! data prediction (first order). On grids of fewer than [`LOWER_ORDER_FINAL_BELOW`] steps the
//! order is also capped near the end, as diffusers' `lower_order_final` does: step i of N is
//! at most of order N − i (the step into the last timestep second order, and iPNDM's final
//! step to σ̃ = 0 first order, which is the data prediction).

use std::collections::VecDeque;

use candle_core::{bail, Result, Tensor};
use ddpm_core::{GuidancePair, NoiseSchedule, NoiseSource};
use ddpm_kernels::{reverse_step, Eps, StepRule};
use serde::{Deserialize, Serialize};

use crate::spacing::{check_timesteps, lambda, timesteps_from};
use crate::{guided, timestep, Sampler, SamplerConfig, Spacing, Step};

/// Grids shorter than this lower the order of their last steps.
pub const LOWER_ORDER_FINAL_BELOW: usize = 15;

/// Which multistep solver a [`Multistep`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Solver {
    /// DPM-Solver++(3M): third-order multistep in data prediction.
    DpmSolverPp3M,
    /// UniPC with predictor order `order` (1–3) and the UniC corrector (order `order` + 1).
    UniPc {
        /// The predictor's order, 1 to 3.
        order: usize,
    },
    /// iPNDM: variable-step Adams–Bashforth of order up to 4 in σ̃ = σ/α.
    Ipndm,
}

impl Solver {
    /// How many past network outputs the solver combines (its highest order).
    pub fn max_order(self) -> usize {
        match self {
            Solver::DpmSolverPp3M => 3,
            Solver::UniPc { order } => order,
            Solver::Ipndm => 4,
        }
    }

    fn check(self) -> Result<()> {
        if let Solver::UniPc { order } = self {
            if !(1..=3).contains(&order) {
                bail!("UniPC's order must be 1, 2 or 3, got {order}");
            }
        }
        Ok(())
    }
}

/// One past network output: the data prediction D (or, for iPNDM, the derivative ε̂ in
/// σ̃-time) and where it was taken.
#[derive(Debug, Clone)]
struct Point {
    value: Tensor,
    lam: f64,
}

/// What UniC needs to correct the point the last predictor step reached.
#[derive(Debug, Clone)]
struct Pending {
    /// The (corrected) x the predictor started from.
    x_s: Tensor,
    lam_s: f64,
    lam_t: f64,
    alpha_t: f64,
    sigma_ratio: f64,
    /// The predictions it used, newest first (D₀ first).
    used: Vec<Point>,
}

/// A multistep ODE solver ([`Solver`]) over a grid of timesteps; deterministic.
#[derive(Debug, Clone)]
pub struct Multistep {
    solver: Solver,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<usize>,
    config: SamplerConfig,
    /// Newest first.
    history: VecDeque<Point>,
    pending: Option<Pending>,
}

impl Multistep {
    /// `solver` with `steps` timesteps spaced by `spacing`. Fails if `steps` is 0 or above T,
    /// or UniPC's order is not 1–3.
    pub fn new(
        schedule: &dyn NoiseSchedule,
        solver: Solver,
        steps: usize,
        spacing: Spacing,
        config: SamplerConfig,
    ) -> Result<Self> {
        let ts = timesteps_from(schedule.alphas_cumprod(), steps, spacing)?;
        Self::with_timesteps(schedule, solver, ts, config)
    }

    /// `solver` over the timesteps `ts` (strictly descending, each below T).
    pub fn with_timesteps(
        schedule: &dyn NoiseSchedule,
        solver: Solver,
        ts: Vec<usize>,
        config: SamplerConfig,
    ) -> Result<Self> {
        solver.check()?;
        let alphas_cumprod = schedule.alphas_cumprod().to_vec();
        check_timesteps(&ts, alphas_cumprod.len())?;
        Ok(Self {
            solver,
            alphas_cumprod,
            timesteps: ts,
            config,
            history: VecDeque::new(),
            pending: None,
        })
    }

    /// The solver this sampler runs.
    pub fn solver(&self) -> Solver {
        self.solver
    }

    fn fused_step(
        &mut self,
        index: usize,
        eps: Eps<'_>,
        x_t: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Step> {
        let t = timestep(index, &self.timesteps)?;
        if index == 0 {
            self.reset();
        }
        let ac_s = self.alphas_cumprod[t];
        let rule = StepRule {
            alpha_bar: ac_s,
            clip_x0: self.config.clip_x0,
            c_x0: 1.0,
            c_eps: 0.0,
            c_x: 0.0,
            c_extra: 0.0,
        };
        let (_, d) = reverse_step(x_t, eps, None, &rule)?;
        let lam_s = lambda(ac_s);
        let (alpha_s, sigma_s) = (ac_s.sqrt(), (1.0 - ac_s).sqrt());
        let next = self
            .timesteps
            .get(index + 1)
            .map(|&p| self.alphas_cumprod[p]);
        let max = self.solver.max_order();
        // Below 15 steps the last steps lower their order (diffusers' `lower_order_final`):
        // the step into the last timestep is at most second order, the jump after it first
        // order; extrapolating over the long last steps of a short grid is unstable.
        let n = self.timesteps.len();
        let order = if n < LOWER_ORDER_FINAL_BELOW {
            max.min(n - index)
        } else {
            max
        };
        let prev_sample = match self.solver {
            Solver::Ipndm => {
                // ε̂ consistent with the (clipped) data prediction; x̃ = x/α, σ̃ = σ/α.
                let e = ((x_t - (&d * alpha_s)?)? * (1.0 / sigma_s))?;
                self.history.push_front(Point {
                    value: e,
                    lam: lam_s,
                });
                self.history.truncate(max);
                let (alpha_t, sig_t) = match next {
                    Some(ac) => (ac.sqrt(), (1.0 - ac).sqrt() / ac.sqrt()),
                    None => (1.0, 0.0),
                };
                let nodes: Vec<f64> = self
                    .history
                    .iter()
                    .take(order)
                    .map(|p| (-p.lam).exp())
                    .collect();
                let w = adams_bashforth_weights(&nodes, sig_t)?;
                let mut terms: Vec<(f64, &Tensor)> = vec![(alpha_t / alpha_s, x_t)];
                for (wj, p) in w.iter().zip(&self.history) {
                    terms.push((alpha_t * wj, &p.value));
                }
                lincomb(&terms)?
            }
            Solver::DpmSolverPp3M | Solver::UniPc { .. } => {
                let x = match (self.solver, self.pending.take()) {
                    (Solver::UniPc { .. }, Some(p)) if next.is_some() => unipc_update(
                        &p.x_s,
                        p.lam_s,
                        p.lam_t,
                        p.alpha_t,
                        p.sigma_ratio,
                        &p.used,
                        Some(&d),
                    )?,
                    _ => x_t.clone(),
                };
                self.history.push_front(Point {
                    value: d.clone(),
                    lam: lam_s,
                });
                self.history.truncate(max);
                match next {
                    None => d.clone(),
                    Some(ac_t) => {
                        let lam_t = lambda(ac_t);
                        let alpha_t = ac_t.sqrt();
                        let sigma_ratio = (1.0 - ac_t).sqrt() / sigma_s;
                        let used: Vec<Point> = self.history.iter().take(order).cloned().collect();
                        if let Solver::UniPc { .. } = self.solver {
                            let out =
                                unipc_update(&x, lam_s, lam_t, alpha_t, sigma_ratio, &used, None)?;
                            self.pending = Some(Pending {
                                x_s: x,
                                lam_s,
                                lam_t,
                                alpha_t,
                                sigma_ratio,
                                used,
                            });
                            out
                        } else {
                            dpmpp_update(&x, lam_s, lam_t, alpha_t, sigma_ratio, &used)?
                        }
                    }
                }
            }
        };
        Ok(Step {
            prev_sample,
            pred_x0: d,
        })
    }
}

/// Σ cᵢ·tᵢ.
fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let Some(((c0, t0), rest)) = terms.split_first() else {
        bail!("lincomb: no terms");
    };
    let mut acc = (*t0 * *c0)?;
    for (c, t) in rest {
        if *c != 0.0 {
            acc = (acc + (*t * *c)?)?;
        }
    }
    Ok(acc)
}

/// DPM-Solver++ of order `used.len()` (1–3) from λ_s to λ_t; `used` newest first.
fn dpmpp_update(
    x: &Tensor,
    lam_s: f64,
    lam_t: f64,
    alpha_t: f64,
    sigma_ratio: f64,
    used: &[Point],
) -> Result<Tensor> {
    let [c0, c1, c2] = dpmpp_coefficients(
        lam_s,
        lam_t,
        &used.iter().map(|p| p.lam).collect::<Vec<_>>(),
    )?;
    let mut terms = vec![(sigma_ratio, x)];
    for (c, p) in [c0, c1, c2].iter().zip(used) {
        terms.push((alpha_t * c, &p.value));
    }
    lincomb(&terms)
}

/// The coefficients of D₀, D₋₁, D₋₂ (before the factor α_t) in DPM-Solver++'s update from
/// λ_s = `lams[0]` to `lam_t`, of order `lams.len()` (1–3). Public for the tests that
/// hold them to hand-computed values.
pub fn dpmpp_coefficients(lam_s: f64, lam_t: f64, lams: &[f64]) -> Result<[f64; 3]> {
    let h = lam_t - lam_s;
    if !(h > 0.0 && h.is_finite()) || lams.first() != Some(&lam_s) {
        bail!("DPM-Solver++: λ must rise from step to step (λ_s = {lam_s}, λ_t = {lam_t})");
    }
    let phi = (-h).exp_m1(); // e^{−h} − 1
    Ok(match lams.len() {
        1 => [-phi, 0.0, 0.0],
        2 => {
            // D₁ = (D₀ − D₋₁)/r₀; x += −φ·D₀ − ½φ·D₁.
            let r0 = (lam_s - lams[1]) / h;
            let k = -0.5 * phi / r0;
            [-phi + k, -k, 0.0]
        }
        3 => {
            let (r0, r1) = ((lam_s - lams[1]) / h, (lams[1] - lams[2]) / h);
            // D1_0 = (D₀ − D₋₁)/r₀, D1_1 = (D₋₁ − D₋₂)/r₁,
            // D₁ = D1_0 + r₀/(r₀ + r₁)·(D1_0 − D1_1), D₂ = (D1_0 − D1_1)/(r₀ + r₁).
            let a = phi / h + 1.0; // coefficient of D₁
            let b = -((phi + h) / (h * h) - 0.5); // coefficient of D₂
            let d10 = [1.0 / r0, -1.0 / r0, 0.0];
            let d11 = [0.0, 1.0 / r1, -1.0 / r1];
            let mut c = [-phi, 0.0, 0.0];
            for k in 0..3 {
                let diff = d10[k] - d11[k];
                let d1 = d10[k] + r0 / (r0 + r1) * diff;
                let d2 = diff / (r0 + r1);
                c[k] += a * d1 + b * d2;
            }
            c
        }
        n => bail!("DPM-Solver++: order {n} is not 1, 2 or 3"),
    })
}

/// UniPC's coefficients for predictor order p = `lams.len()` (newest first, `lams[0]` = λ_s):
/// `(ρ_p, ρ_c, B(h), φ₁)`, where the predictor adds −α_t·B(h)·Σ ρ_p\[k\]·(D₋ₖ₋₁ − D₀)/r_k and
/// the corrector −α_t·B(h)·(Σ ρ_c\[k\]·(D₋ₖ₋₁ − D₀)/r_k + ρ_c\[p−1\]·(D_t − D₀)).
pub fn unipc_coefficients(lam_s: f64, lam_t: f64, lams: &[f64]) -> Result<UniPcCoefficients> {
    let h = lam_t - lam_s;
    let p = lams.len();
    if !(h > 0.0 && h.is_finite()) || lams.first() != Some(&lam_s) || !(1..=3).contains(&p) {
        bail!("UniPC: λ must rise from step to step and 1-3 points be given (λ_s = {lam_s}, λ_t = {lam_t}, {p} points)");
    }
    let hh = -h;
    let phi1 = hh.exp_m1();
    let b_h = phi1; // bh2: B(h) = e^{−h} − 1
    let mut rks: Vec<f64> = lams[1..].iter().map(|l| (l - lam_s) / h).collect();
    rks.push(1.0);
    let mut b = Vec::with_capacity(p);
    let (mut h_phi_k, mut fact) = (phi1 / hh - 1.0, 1.0);
    for i in 1..=p {
        b.push(h_phi_k * fact / b_h);
        fact *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / fact;
    }
    let r = |n: usize| -> Vec<Vec<f64>> {
        (0..n)
            .map(|i| (0..n).map(|j| rks[j].powi(i as i32)).collect())
            .collect()
    };
    let rho_p = if p >= 2 {
        solve(r(p - 1), b[..p - 1].to_vec())?
    } else {
        Vec::new()
    };
    let rho_c = solve(r(p), b.clone())?;
    Ok(UniPcCoefficients {
        rks: rks[..p - 1].to_vec(),
        rho_p,
        rho_c,
        b_h,
        phi1,
    })
}

/// What [`unipc_coefficients`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct UniPcCoefficients {
    /// r_k = (λ₋ₖ − λ_s)/h of the older points (negative).
    pub rks: Vec<f64>,
    /// The predictor's weights of the older points' differences.
    pub rho_p: Vec<f64>,
    /// The corrector's weights: the older points', then the new point's.
    pub rho_c: Vec<f64>,
    /// B(h) = e^(−h) − 1.
    pub b_h: f64,
    /// φ₁ = e^(−h) − 1.
    pub phi1: f64,
}

/// UniPC's predictor (`d_t = None`) or corrector (`d_t` = the data prediction at the
/// predicted point) from λ_s to λ_t; `used` newest first.
fn unipc_update(
    x: &Tensor,
    lam_s: f64,
    lam_t: f64,
    alpha_t: f64,
    sigma_ratio: f64,
    used: &[Point],
    d_t: Option<&Tensor>,
) -> Result<Tensor> {
    let lams: Vec<f64> = used.iter().map(|p| p.lam).collect();
    let c = unipc_coefficients(lam_s, lam_t, &lams)?;
    let d0 = &used[0].value;
    // x_t_ = (σ_t/σ_s)·x − α_t·φ₁·D₀, then the corrections as coefficients of each D.
    let mut coef_d0 = -alpha_t * c.phi1;
    let mut terms: Vec<(f64, &Tensor)> = vec![(sigma_ratio, x)];
    let rho = if d_t.is_some() { &c.rho_c } else { &c.rho_p };
    let mut older = Vec::new();
    for (k, p) in used[1..].iter().enumerate() {
        let (Some(&rk), Some(&rh)) = (c.rks.get(k), rho.get(k)) else {
            break;
        };
        let w = -alpha_t * c.b_h * rh / rk;
        older.push((w, &p.value));
        coef_d0 -= w;
    }
    if let Some(dt) = d_t {
        let w = -alpha_t * c.b_h * c.rho_c[c.rho_c.len() - 1];
        older.push((w, dt));
        coef_d0 -= w;
    }
    terms.push((coef_d0, d0));
    terms.extend(older);
    lincomb(&terms)
}

/// Solves the small system `a·x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        if a[piv][col].abs() < 1e-300 || !a[piv][col].is_finite() {
            bail!("solver: singular order conditions (two timesteps at one noise level?)");
        }
        a.swap(col, piv);
        b.swap(col, piv);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| a[i][k] * x[k]).sum();
        x[i] = (b[i] - s) / a[i][i];
    }
    Ok(x)
}

/// The weights w_j with ∫ from `nodes[0]` to `to` of the polynomial through
/// (nodes\[j\], f_j) = Σ w_j·f_j: variable-step Adams–Bashforth. Exact (3-point
/// Gauss–Legendre) for up to 4 nodes.
pub fn adams_bashforth_weights(nodes: &[f64], to: f64) -> Result<Vec<f64>> {
    let n = nodes.len();
    if n == 0 || n > 4 {
        bail!("Adams–Bashforth: 1 to 4 nodes, got {n}");
    }
    let (a, b) = (nodes[0], to);
    const G: [(f64, f64); 3] = [
        (-0.774_596_669_241_483_4, 5.0 / 9.0),
        (0.0, 8.0 / 9.0),
        (0.774_596_669_241_483_4, 5.0 / 9.0),
    ];
    let mut w = vec![0.0; n];
    for (j, wj) in w.iter_mut().enumerate() {
        for (xg, wg) in G {
            let s = 0.5 * (a + b) + 0.5 * (b - a) * xg;
            let mut l = 1.0;
            for (m, &nm) in nodes.iter().enumerate() {
                if m != j {
                    let den = nodes[j] - nm;
                    if den == 0.0 {
                        bail!("Adams–Bashforth: two steps at one noise level ({nm})");
                    }
                    l *= (s - nm) / den;
                }
            }
            *wj += 0.5 * (b - a) * wg * l;
        }
    }
    Ok(w)
}

impl Sampler for Multistep {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }
    fn reset(&mut self) {
        self.history.clear();
        self.pending = None;
    }
    fused_steps!();
}
