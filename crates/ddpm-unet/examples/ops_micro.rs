//! Micro-benchmark of each fast op against candle's stock one, forward and forward+backward, at
//! U-Net-sized shapes: `cargo run --release -p ddpm-unet --example ops_micro`.

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use ddpm_unet::ops::{conv2d, group_norm, upsample_nearest2x, Kernels};

fn time(label: &str, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    println!(
        "{label:<48} {:8.1} ms",
        t.elapsed().as_secs_f64() * 1e3 / iters as f64
    );
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (n, c, h, w) = (128, 64, 28, 28);
    let x = Var::randn(0f32, 1., (n, c, h, w), &dev)?;
    let wt = Var::randn(0f32, 0.05, (c, c, 3, 3), &dev)?;
    let b = Var::zeros(c, candle_core::DType::F32, &dev)?;
    let g = Var::ones(c, candle_core::DType::F32, &dev)?;
    let r = Tensor::randn(0f32, 1., (n, c, h, w), &dev)?;
    for k in [Kernels::Fast, Kernels::Stock] {
        let name = k.name();
        time(
            &format!("conv3x3 {c}->{c} {h}x{w} b{n} fwd [{name}]"),
            3,
            || conv2d(&x, &wt, Some(&b), 1, 1, k).map(|_| ()),
        )?;
        time(
            &format!("conv3x3 {c}->{c} {h}x{w} b{n} fwd+bwd [{name}]"),
            2,
            || {
                let y = conv2d(&x, &wt, Some(&b), 1, 1, k)?;
                (y * &r)?.sum_all()?.backward().map(|_| ())
            },
        )?;
        time(
            &format!("group_norm+silu {c}ch b{n} fwd [{name}]"),
            5,
            || group_norm(&x, &g, &b, None, 16, 1e-5, true, k).map(|_| ()),
        )?;
        time(
            &format!("group_norm+silu {c}ch b{n} fwd+bwd [{name}]"),
            3,
            || {
                let y = group_norm(&x, &g, &b, None, 16, 1e-5, true, k)?;
                (y * &r)?.sum_all()?.backward().map(|_| ())
            },
        )?;
        let small = Var::randn(0f32, 1., (n, c, h / 2, w / 2), &dev)?;
        time(
            &format!("upsample2x {c}ch b{n} fwd+bwd [{name}]"),
            3,
            || {
                let y = upsample_nearest2x(&small, k)?;
                (y * &r)?.sum_all()?.backward().map(|_| ())
            },
        )?;
    }
    Ok(())
}
