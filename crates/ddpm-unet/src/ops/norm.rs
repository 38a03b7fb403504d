//! GroupNorm with its affine transform and an optional SiLU fused into one pass, with a
//! hand-written backward (one pass per group, instead of candle's ten-op composition).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;

/// `y = act(γ · (x − μ_g)/σ_g + β)` over `x [n, c, *]`, with `γβ = [2, c]` (row 0 γ, row 1 β).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupNormOp {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

struct Geom {
    c: usize,
    cg: usize,
    s: usize,
}

impl GroupNormOp {
    fn geom(&self, x: &Layout, gb: &Layout) -> Result<Geom> {
        let dims = x.dims();
        if dims.len() < 2 {
            bail!("group_norm: input must be [n, c, ...], got {dims:?}")
        }
        let c = dims[1];
        if self.groups == 0 || c % self.groups != 0 {
            bail!(
                "group_norm: {c} channels not divisible into {} groups",
                self.groups
            )
        }
        if gb.dims() != [2, c] {
            bail!("group_norm: affine must be [2, {c}], got {:?}", gb.dims())
        }
        Ok(Geom {
            c,
            cg: c / self.groups,
            s: dims[2..].iter().product(),
        })
    }
}

/// Mean and 1/σ of one group's values (two-pass, f64 accumulation).
fn stats(v: &[f32], eps: f32) -> (f32, f32) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
    let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl CustomOp2 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ddpm-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = self.geom(l1, l2)?;
        let x = contiguous_f32(s1, l1, "group_norm input")?;
        let gb = contiguous_f32(s2, l2, "group_norm affine")?;
        let (gamma, beta) = gb.split_at(geo.c);
        let glen = geo.cg * geo.s;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(glen)
            .zip(x.par_chunks(glen))
            .enumerate()
            .for_each(|(i, (yg, xg))| {
                let (mean, rstd) = stats(xg, self.eps);
                let c0 = (i % self.groups) * geo.cg;
                for ci in 0..geo.cg {
                    let (ga, be) = (gamma[c0 + ci] * rstd, beta[c0 + ci]);
                    let r = ci * geo.s..(ci + 1) * geo.s;
                    for (o, &v) in yg[r.clone()].iter_mut().zip(&xg[r]) {
                        let z = (v - mean) * ga + be;
                        *o = if self.silu { z * sigmoid(z) } else { z };
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(gb, &grad.contiguous()?, &GroupNormBwd(*self))?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgb = packed.narrow(0, n, gb.elem_count())?.reshape(gb.shape())?;
        Ok((Some(dx), Some(dgb)))
    }
}

/// `(x, γβ, dy) → [dx (flattened) ‖ dγ ‖ dβ]`, one flat vector.
#[derive(Debug, Clone, Copy)]
struct GroupNormBwd(GroupNormOp);

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "ddpm-group-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let geo = op.geom(l1, l2)?;
        if l3.dims() != l1.dims() {
            bail!(
                "group_norm backward: gradient shape {:?} differs",
                l3.dims()
            )
        }
        let x = contiguous_f32(s1, l1, "group_norm input")?;
        let gb = contiguous_f32(s2, l2, "group_norm affine")?;
        let dy = contiguous_f32(s3, l3, "group_norm gradient")?;
        let (gamma, beta) = gb.split_at(geo.c);
        let glen = geo.cg * geo.s;
        let mut out = vec![0f32; x.len() + 2 * geo.c];
        let (dx, _) = out.split_at_mut(x.len());
        // Each group writes its dx and returns its channels' partial dγ, dβ.
        let partials: Vec<(usize, Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(glen)
            .zip(x.par_chunks(glen).zip(dy.par_chunks(glen)))
            .enumerate()
            .map(|(i, (dxg, (xg, dyg)))| {
                let (mean, rstd) = stats(xg, op.eps);
                let c0 = (i % op.groups) * geo.cg;
                let (mut dga, mut dbe) = (vec![0f32; geo.cg], vec![0f32; geo.cg]);
                let (mut sum_dxh, mut sum_dxh_xh) = (0f64, 0f64);
                for ci in 0..geo.cg {
                    let (ga, be) = (gamma[c0 + ci], beta[c0 + ci]);
                    let r = ci * geo.s..(ci + 1) * geo.s;
                    let (mut acc_g, mut acc_b) = (0f64, 0f64);
                    for ((d, &v), &gy) in dxg[r.clone()].iter_mut().zip(&xg[r.clone()]).zip(&dyg[r])
                    {
                        let xh = (v - mean) * rstd;
                        let dz = if op.silu {
                            let z = xh * ga + be;
                            let s = sigmoid(z);
                            gy * s * (1.0 + z * (1.0 - s))
                        } else {
                            gy
                        };
                        acc_g += (dz * xh) as f64;
                        acc_b += dz as f64;
                        let dxh = dz * ga;
                        sum_dxh += dxh as f64;
                        sum_dxh_xh += (dxh * xh) as f64;
                        *d = dxh;
                    }
                    dga[ci] = acc_g as f32;
                    dbe[ci] = acc_b as f32;
                }
                let m = glen.max(1) as f64;
                let (a, b) = ((sum_dxh / m) as f32, (sum_dxh_xh / m) as f32);
                for (d, &v) in dxg.iter_mut().zip(xg) {
                    let xh = (v - mean) * rstd;
                    *d = rstd * (*d - a - xh * b);
                }
                (c0, dga, dbe)
            })
            .collect();
        let (_, dgb) = out.split_at_mut(x.len());
        let (dgamma, dbeta) = dgb.split_at_mut(geo.c);
        for (c0, dga, dbe) in partials {
            for ci in 0..geo.cg {
                dgamma[c0 + ci] += dga[ci];
                dbeta[c0 + ci] += dbe[ci];
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
