//! AdamW and EMA over all parameters, with their state exposed for checkpoints.

use candle_core::{backprop::GradStore, Tensor, Var};
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
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimizer over named variables, with zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            vars,
            m,
            v,
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

    /// First and second moments, in the order of [`AdamW::vars`].
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores moments and step count (from a checkpoint).
    pub fn set_state(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, step: u64) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(TrainError::Config(
                "optimizer state does not match the model".into(),
            ));
        }
        for ((name, var), (m, v)) in self.vars.iter().zip(m.iter().zip(&v)) {
            if m.shape() != var.shape() || v.shape() != var.shape() {
                return Err(TrainError::Config(format!(
                    "optimizer state of {name} has the wrong shape"
                )));
            }
        }
        self.m = m.into_iter().map(|t| t.detach()).collect();
        self.v = v.into_iter().map(|t| t.detach()).collect();
        self.step = step;
        Ok(())
    }

    /// Global L2 norm of the gradients.
    ///
    /// The per-tensor sums stay on the device and are read back once: on a GPU, reading each
    /// one back would wait for the queue to drain once per parameter tensor.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sums = Vec::with_capacity(self.vars.len());
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sums.push(g.sqr()?.sum_all()?);
            }
        }
        if sums.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&sums, 0)?
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`, the gradients multiplied by `grad_scale`
    /// (gradient clipping).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if grad_scale == 1.0 {
                g.clone()
            } else {
                (g * grad_scale)?
            };
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m * (1.0 / bc1))? / ((&v * (1.0 / bc2))?.sqrt()? + c.eps)?)?;
            let w = var.as_tensor().detach();
            let decayed = if c.weight_decay > 0.0 {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
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

    /// The averaged weights, in the order of the variables.
    pub fn weights(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Replaces the averaged weights (from a checkpoint).
    pub fn set_weights(&mut self, w: Vec<Tensor>) {
        self.shadow = w.into_iter().map(|t| t.detach()).collect();
    }

    /// The effective decay at optimizer step `step`.
    pub fn effective_decay(&self, step: u64) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// Folds the current weights into the average.
    pub fn update(&mut self, vars: &[(String, Var)], step: u64) -> Result<()> {
        let d = self.effective_decay(step);
        for (s, (_, v)) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
        }
        Ok(())
    }
}
