//! AdamW and EMA over all parameters, with their state exposed for checkpoints.
//!
//! Both update their state in place through ddpm-kernels' fused ops: per parameter tensor,
//! AdamW is two passes (moments, then weights) and the EMA one, with no temporaries, where the
//! composition of candle ops took about fifteen ops, each allocating its result (one kernel
//! launch each on a GPU).

use candle_core::{backprop::GradStore, Tensor, Var};
use ddpm_kernels::{adam_moments, adamw_apply, ema_update, AdamWApply};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW (Loshchilov & Hutter) whose moments and step count are public state, so a
/// checkpoint can store them and a resumed run continues exactly.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// Per variable `[2, …shape]`: m then v, one buffer so one pass updates both.
    mv: Vec<Tensor>,
    step: u64,
    config: AdamWConfig,
}

/// Zeroed `[2, …shape]` moment buffers, each with its own storage (they are updated in place).
fn zero_moments(vars: &[(String, Var)]) -> candle_core::Result<Vec<Tensor>> {
    vars.iter()
        .map(|(_, v)| {
            let mut dims = vec![2];
            dims.extend_from_slice(v.dims());
            Tensor::zeros(dims, v.dtype(), v.device())
        })
        .collect()
}

impl AdamW {
    /// An optimizer over named variables, with zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mv = zero_moments(&vars)?;
        Ok(Self {
            vars,
            mv,
            step: 0,
            config,
        })
    }

    /// Number of updates applied.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The named variables.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// First and second moments, in the order of [`AdamW::vars`]: views of the optimizer's
    /// buffers, which the next [`AdamW::step`] overwrites in place (copy them to keep them).
    pub fn moments(&self) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let m = self
            .mv
            .iter()
            .map(|t| t.get(0))
            .collect::<candle_core::Result<_>>()?;
        let v = self
            .mv
            .iter()
            .map(|t| t.get(1))
            .collect::<candle_core::Result<_>>()?;
        Ok((m, v))
    }

    /// Restores moments and step count (from a checkpoint).
    pub fn set_state(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, step: u64) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(TrainError::Tensor(candle_core::Error::Msg(
                "optimizer state does not match the model".into(),
            )));
        }
        for ((name, var), (m, v)) in self.vars.iter().zip(m.iter().zip(&v)) {
            if m.shape() != var.shape() || v.shape() != var.shape() {
                return Err(TrainError::Tensor(candle_core::Error::Msg(format!(
                    "optimizer state of {name} has the wrong shape"
                ))));
            }
        }
        // Stacking copies: the buffers own their storage, as in-place updates need.
        self.mv = m
            .iter()
            .zip(&v)
            .map(|(m, v)| Tensor::stack(&[m, v], 0).map(|t| t.detach()))
            .collect::<candle_core::Result<_>>()?;
        self.step = step;
        Ok(())
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        Ok(self.grad_sq_norm(grads)?.to_scalar::<f64>()?.sqrt())
    }

    /// The squared global L2 norm of the gradients as an f64 scalar tensor on the device, for
    /// reading back together with other values (one GPU sync instead of one each).
    ///
    /// The per-tensor sums stay on the device: reading each one back would wait for the queue
    /// to drain once per parameter tensor.
    pub fn grad_sq_norm(&self, grads: &GradStore) -> Result<Tensor> {
        let mut sums = Vec::with_capacity(self.vars.len());
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sums.push(g.sqr()?.sum_all()?);
            }
        }
        if sums.is_empty() {
            let device = self
                .vars
                .first()
                .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
            return Ok(Tensor::new(0f64, &device)?);
        }
        Ok(Tensor::stack(&sums, 0)?
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?)
    }

    /// One update with learning rate `lr`, the gradients multiplied by `grad_scale`
    /// (gradient clipping). Weights and moments are updated in place.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let apply = AdamWApply {
            lr,
            bias_correction1: 1.0 - c.beta1.powi(self.step as i32),
            bias_correction2: 1.0 - c.beta2.powi(self.step as i32),
            eps: c.eps,
            weight_decay: c.weight_decay,
        };
        for ((_, var), mv) in self.vars.iter().zip(&self.mv) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            adam_moments(mv, g, c.beta1, c.beta2, grad_scale)?;
            adamw_apply(var.as_tensor(), mv, &apply)?;
        }
        Ok(())
    }
}

/// Exponential moving average of the weights:
/// ema ← d·ema + (1 − d)·w with d = min(decay, (1 + step)/(10 + step)).
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(TrainError::Config(format!(
                "EMA decay must lie in [0, 1), got {decay}"
            )));
        }
        let shadow = vars
            .iter()
            // `copy` of a Var records a backprop op: detach, or everything computed from the
            // average (sampling before the first update) would keep its autograd graph.
            .map(|(_, v)| v.as_tensor().copy().map(|t| t.detach()))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// The averaged weights, in the order of the variables. [`Ema::update`] overwrites them
    /// in place: copy them to keep a snapshot.
    pub fn weights(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Replaces the averaged weights (from a checkpoint) with copies of `w`: the average owns
    /// its storage, since updates write to it in place.
    pub fn set_weights(&mut self, w: Vec<Tensor>) -> Result<()> {
        self.shadow = w
            .iter()
            .map(|t| t.copy().map(|t| t.detach()))
            .collect::<candle_core::Result<_>>()?;
        Ok(())
    }

    /// The configured decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Changes the decay (a budgeted run fits it to its planned length before its first step).
    pub fn set_decay(&mut self, decay: f64) -> Result<()> {
        if !(0.0..1.0).contains(&decay) {
            return Err(TrainError::Config(format!(
                "EMA decay must lie in [0, 1), got {decay}"
            )));
        }
        self.decay = decay;
        Ok(())
    }

    /// The effective decay at optimizer step `step`.
    pub fn effective_decay(&self, step: u64) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// Folds the current weights into the average, in place.
    pub fn update(&mut self, vars: &[(String, Var)], step: u64) -> Result<()> {
        let d = self.effective_decay(step);
        for (s, (_, v)) in self.shadow.iter().zip(vars) {
            ema_update(s, v.as_tensor(), d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::Optimizer;

    fn var(v: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
    }

    /// Our in-place AdamW against candle-nn's AdamW (same update rule, composed) over a few
    /// steps of a quadratic loss, with weight decay, and the EMA against its formula.
    #[test]
    fn adamw_matches_candle_nn_and_ema_its_formula() {
        let init = [0.5f32, -1.5, 2.0, 0.25, -0.75];
        let (ours, theirs) = (var(&init), var(&init));
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), ours.clone())], config).unwrap();
        let mut reference = candle_nn::AdamW::new(
            vec![theirs.clone()],
            candle_nn::ParamsAdamW {
                lr: 0.05,
                beta1: config.beta1,
                beta2: config.beta2,
                eps: config.eps,
                weight_decay: config.weight_decay,
            },
        )
        .unwrap();
        let mut ema = Ema::new(opt.vars(), 0.9).unwrap();
        let mut avg: Vec<f64> = init.iter().map(|&v| v as f64).collect();
        let target = Tensor::new(&[1f32, 2.0, -3.0, 0.0, 0.5], &Device::Cpu).unwrap();
        for step in 1..=4u64 {
            let loss = |w: &Var| {
                (w.as_tensor() - &target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            opt.step(&loss(&ours).backward().unwrap(), 0.05, 1.0)
                .unwrap();
            reference.backward_step(&loss(&theirs)).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                ours.as_tensor().to_vec1().unwrap(),
                theirs.as_tensor().to_vec1().unwrap(),
            );
            for (x, y) in a.iter().zip(&b) {
                // f32 rounding differs (reciprocal bias corrections): 1e-5 of a 0.05 step.
                assert!((x - y).abs() < 1e-5, "step {step}: {a:?} vs {b:?}");
            }
            ema.update(opt.vars(), step).unwrap();
            let d = ema.effective_decay(step);
            for (s, &w) in avg.iter_mut().zip(&a) {
                *s = d * *s + (1.0 - d) * w as f64;
            }
            let got: Vec<f32> = ema.weights()[0].to_vec1().unwrap();
            for (g, w) in got.iter().zip(&avg) {
                assert!((*g as f64 - w).abs() < 1e-6, "EMA step {step}");
            }
        }
        assert_eq!(opt.step_count(), 4);
        let (m, v) = opt.moments().unwrap();
        assert_eq!(m[0].dims(), &[5]);
        assert!(v[0].to_vec1::<f32>().unwrap().iter().all(|&x| x > 0.0));
    }
}
