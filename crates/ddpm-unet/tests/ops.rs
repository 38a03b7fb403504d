//! The fast kernels against candle's stock composition: forward values and gradients (through
//! candle's autograd on the slow path) on random shapes, odd sizes and batch 1; plus finite
//! differences for the fused GroupNorm, and the whole U-Net under both kernel sets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpm_core::testing::max_rel_diff;
use ddpm_core::SeededNoise;
use ddpm_unet::ops::{add_channel_bias, conv2d, group_norm, upsample_nearest2x, Kernels};
use ddpm_unet::{UNet, UNetConfig};

fn var(rng: &mut SeededNoise, dims: &[usize]) -> Var {
    let n: usize = dims.iter().product();
    Var::from_tensor(&Tensor::from_vec(rng.randn_vec(n), dims, &Device::Cpu).unwrap()).unwrap()
}

/// Runs `f` under both kernel sets with the loss Σ y·r (r fixed random) and compares the outputs
/// and the gradients of every input.
fn compare(
    rng: &mut SeededNoise,
    inputs: &[&Var],
    f: impl Fn(Kernels) -> candle_core::Result<Tensor>,
    what: &str,
) {
    let fast = f(Kernels::Fast).unwrap();
    let stock = f(Kernels::Stock).unwrap();
    assert!(
        max_rel_diff(&fast, &stock) < 1e-5,
        "{what}: forward differs"
    );
    let r = var(rng, fast.dims()).as_tensor().clone();
    let gf = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (&stock * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let a = gf.get(v).expect("fast gradient");
        let b = gs.get(v).expect("stock gradient");
        let d = max_rel_diff(a, b);
        assert!(d < 1e-4, "{what}: gradient of input {i} differs by {d}");
    }
}

#[test]
fn conv2d_matches_candle_forward_and_gradients() {
    let mut rng = SeededNoise::new(1);
    // (n, cin, h, w, cout, k, stride, pad): the U-Net's 3×3 s1, 3×3 s2 and 1×1 cases, at odd
    // sizes, batch 1 (inner-parallel path) and batch 5 (across-samples path).
    let cases = [
        (1, 3, 7, 5, 4, 3, 1, 1),
        (5, 4, 9, 9, 6, 3, 1, 1),
        (3, 6, 7, 7, 6, 3, 2, 1),
        (1, 2, 8, 6, 3, 3, 2, 1),
        (4, 5, 6, 5, 7, 1, 1, 0),
        (1, 8, 3, 3, 2, 1, 1, 0),
        (2, 3, 5, 6, 2, 3, 1, 0),
        (3, 2, 8, 6, 3, 1, 2, 0),
    ];
    for (n, cin, h, w, cout, k, stride, pad) in cases {
        let x = var(&mut rng, &[n, cin, h, w]);
        let wt = var(&mut rng, &[cout, cin, k, k]);
        let b = var(&mut rng, &[cout]);
        compare(
            &mut rng,
            &[&x, &wt, &b],
            |kern| conv2d(&x, &wt, Some(&b), stride, pad, kern),
            &format!("conv n{n} c{cin}->{cout} {h}x{w} k{k} s{stride} p{pad}"),
        );
    }
}

/// Checks `d/dv Σ f(v)·r` of the fast kernels against central differences at every `step`-th
/// element of `v` (independent of candle's autograd).
fn check_finite_differences(
    rng: &mut SeededNoise,
    v: &Var,
    f: impl Fn(&Tensor) -> Tensor,
    step: usize,
    what: &str,
) {
    let dims = v.dims().to_vec();
    let y = f(v.as_tensor());
    let r = var(rng, y.dims()).as_tensor().clone();
    let loss = |t: &Tensor| -> f64 {
        let y = f(t);
        (y * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dv: Vec<f32> = grads
        .get(v)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-2f32;
    for i in (0..base.len()).step_by(step) {
        let mut p = base.clone();
        p[i] += eps;
        let mut m = base.clone();
        m[i] -= eps;
        let tp = Tensor::from_vec(p, dims.as_slice(), &Device::Cpu).unwrap();
        let tm = Tensor::from_vec(m, dims.as_slice(), &Device::Cpu).unwrap();
        let fd = (loss(&tp) - loss(&tm)) / (2.0 * eps as f64);
        assert!(
            (fd - dv[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
            "{what}: element {i}: finite difference {fd} vs {}",
            dv[i]
        );
    }
}

#[test]
fn conv2d_gradients_match_finite_differences_where_candle_cannot() {
    // A stride-2 convolution of an odd-width input: candle 0.11's own backward returns a
    // gradient of the wrong width here (its conv_transpose2d has no output padding).
    let mut rng = SeededNoise::new(6);
    for (k, pad) in [(1, 0), (3, 1)] {
        let x = var(&mut rng, &[2, 2, 7, 6]);
        let w = var(&mut rng, &[3, 2, k, k]);
        let wt = w.as_tensor().clone();
        check_finite_differences(
            &mut rng,
            &x,
            |t| conv2d(t, &wt, None, 2, pad, Kernels::Fast).unwrap(),
            3,
            &format!("conv s2 k{k} dx"),
        );
        let xt = x.as_tensor().clone();
        check_finite_differences(
            &mut rng,
            &w,
            |t| conv2d(&xt, t, None, 2, pad, Kernels::Fast).unwrap(),
            1,
            &format!("conv s2 k{k} dw"),
        );
    }
}

#[test]
fn conv2d_rejects_mismatched_channels() {
    let x = Tensor::zeros((1, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let err = conv2d(&x, &w, None, 1, 1, Kernels::Fast).unwrap_err();
    assert!(err.to_string().contains("channels"), "{err}");
}

#[test]
fn group_norm_matches_candle_with_and_without_silu() {
    let mut rng = SeededNoise::new(2);
    for (n, c, h, w, groups) in [
        (1, 4, 3, 5, 2),
        (3, 6, 7, 7, 3),
        (2, 8, 4, 4, 8),
        (5, 4, 1, 1, 1),
    ] {
        for silu in [false, true] {
            let x = var(&mut rng, &[n, c, h, w]);
            // Shift and scale so the statistics matter.
            let x = Var::from_tensor(&((x.as_tensor() * 3.0).unwrap() + 1.5).unwrap()).unwrap();
            let g = var(&mut rng, &[c]);
            let b = var(&mut rng, &[c]);
            compare(
                &mut rng,
                &[&x, &g, &b],
                |k| group_norm(&x, &g, &b, None, groups, 1e-5, silu, k),
                &format!("group_norm n{n} c{c} {h}x{w} g{groups} silu={silu}"),
            );
        }
    }
}

#[test]
fn group_norm_gradient_matches_finite_differences() {
    let mut rng = SeededNoise::new(3);
    let x = var(&mut rng, &[2, 4, 3, 2]);
    let g = var(&mut rng, &[4]);
    let b = var(&mut rng, &[4]);
    let s = var(&mut rng, &[2, 4]);
    let (gt, bt, st) = (
        g.as_tensor().clone(),
        b.as_tensor().clone(),
        s.as_tensor().clone(),
    );
    check_finite_differences(
        &mut rng,
        &x,
        |t| group_norm(t, &gt, &bt, Some(&st), 2, 1e-5, true, Kernels::Fast).unwrap(),
        3,
        "group_norm dx",
    );
    let xt = x.as_tensor().clone();
    check_finite_differences(
        &mut rng,
        &g,
        |t| group_norm(&xt, t, &bt, Some(&st), 2, 1e-5, true, Kernels::Fast).unwrap(),
        1,
        "group_norm dgamma",
    );
    check_finite_differences(
        &mut rng,
        &s,
        |t| group_norm(&xt, &gt, &bt, Some(t), 2, 1e-5, true, Kernels::Fast).unwrap(),
        1,
        "group_norm dshift",
    );
}

#[test]
fn group_norm_with_shift_matches_candle() {
    let mut rng = SeededNoise::new(8);
    for (n, c, h, w, groups) in [(3, 6, 5, 4, 3), (1, 4, 2, 2, 4)] {
        let x = var(&mut rng, &[n, c, h, w]);
        let g = var(&mut rng, &[c]);
        let b = var(&mut rng, &[c]);
        let s = Var::from_tensor(&(var(&mut rng, &[n, c]).as_tensor() * 4.0).unwrap()).unwrap();
        compare(
            &mut rng,
            &[&x, &g, &b, &s],
            |k| group_norm(&x, &g, &b, Some(&s), groups, 1e-5, true, k),
            &format!("group_norm+shift n{n} c{c} g{groups}"),
        );
    }
}

#[test]
fn channel_bias_matches_candle_per_channel_and_per_sample() {
    let mut rng = SeededNoise::new(7);
    for (dims, per_sample) in [
        ([1, 3, 4, 5], false),
        ([4, 2, 3, 3], true),
        ([2, 5, 1, 1], true),
    ] {
        let x = var(&mut rng, &dims);
        let b = if per_sample {
            var(&mut rng, &dims[..2])
        } else {
            var(&mut rng, &dims[1..2])
        };
        compare(
            &mut rng,
            &[&x, &b],
            |k| add_channel_bias(&x, &b, k),
            &format!("bias {dims:?} per_sample={per_sample}"),
        );
    }
    let x = Tensor::zeros((2, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    assert!(add_channel_bias(&x, &bad, Kernels::Fast).is_err());
}

#[test]
fn upsample_matches_candle() {
    let mut rng = SeededNoise::new(4);
    for dims in [[1, 1, 1, 1], [2, 3, 4, 5], [3, 2, 7, 7]] {
        let x = var(&mut rng, &dims);
        compare(
            &mut rng,
            &[&x],
            |k| upsample_nearest2x(&x, k),
            &format!("upsample {dims:?}"),
        );
    }
}

#[test]
fn unet_fast_and_stock_kernels_agree_in_output_and_weight_gradients() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = UNetConfig::tiny();
    let unet = UNet::new(&cfg, vb).unwrap();
    assert_eq!(unet.kernels(), Kernels::Fast);
    let stock = unet.clone().with_kernels(Kernels::Stock);
    let mut rng = SeededNoise::new(5);
    let x = var(&mut rng, &[3, 1, 12, 12]).as_tensor().clone();
    let t = Tensor::new(&[3u32, 500, 999], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 10, 7], &Device::Cpu).unwrap();
    let a = unet.forward_t(&x, &t, Some(&y), true).unwrap();
    let b = stock.forward_t(&x, &t, Some(&y), true).unwrap();
    assert!(max_rel_diff(&a, &b) < 1e-4);
    let ga = a.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let gb = b.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    assert!(vars.len() > 20);
    for (name, v) in vars.iter() {
        let (ga, gb) = (ga.get(v).unwrap(), gb.get(v).unwrap());
        let d = max_rel_diff(ga, gb);
        assert!(d < 1e-3, "{name}: gradient differs by {d}");
    }
}

#[test]
fn fused_is_fast_on_the_cpu_and_every_kernel_set_has_a_name() {
    for k in [Kernels::Stock, Kernels::Fast, Kernels::CudaOps] {
        assert_eq!(Kernels::from_name(k.name()), Some(k));
    }
    assert_eq!(Kernels::from_name("cudnn"), None);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet::new(&UNetConfig::tiny(), vb).unwrap();
    let mut rng = SeededNoise::new(9);
    let x = var(&mut rng, &[2, 1, 12, 12]).as_tensor().clone();
    let t = Tensor::new(&[3u32, 700], &Device::Cpu).unwrap();
    let y = Tensor::new(&[4u32, 10], &Device::Cpu).unwrap();
    let fast = unet.forward_t(&x, &t, Some(&y), false).unwrap();
    let fused = unet
        .clone()
        .with_kernels(Kernels::CudaOps)
        .forward_t(&x, &t, Some(&y), false)
        .unwrap();
    assert_eq!(max_rel_diff(&fused, &fast), 0.0);
}

/// The safety net of the kernels' uninitialised output buffers runs in the tests: a kernel that
/// skips one element of its output (simulated by `fault::skip_one_write_of`, available with the
/// `check-uninit` feature this crate's tests turn on) is an error naming the op, for each op
/// that allocates without zeroing, forward and backward. Without the check, the skipped element
/// would be returned as whatever the allocator left there.
#[test]
fn a_kernel_that_skips_an_element_fails_the_tests() {
    use ddpm_unet::ops::fault::skip_one_write_of;
    let mut rng = SeededNoise::new(21);
    let x = var(&mut rng, &[2, 4, 6, 6]);
    let w = var(&mut rng, &[4, 4, 3, 3]);
    let gamma = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let beta = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let k = Kernels::Fast;
    type Op<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let backward = |y: candle_core::Result<Tensor>| -> candle_core::Result<Tensor> {
        y?.sum_all()?.backward()?;
        Tensor::zeros(1, DType::F32, &Device::Cpu)
    };
    let cases: Vec<(&'static str, Op<'_>)> = vec![
        ("conv2d", Box::new(|| conv2d(&x, &w, None, 1, 1, k))),
        (
            "conv2d backward",
            Box::new(|| backward(conv2d(&x, &w, None, 1, 1, k))),
        ),
        (
            "group_norm",
            Box::new(|| group_norm(&x, &gamma, &beta, None, 2, 1e-5, true, k)),
        ),
        ("upsample", Box::new(|| upsample_nearest2x(&x, k))),
        (
            "upsample backward",
            Box::new(|| backward(upsample_nearest2x(&x, k))),
        ),
    ];
    for (what, op) in cases {
        // Untouched, the op runs.
        op().unwrap_or_else(|e| panic!("{what}: {e}"));
        skip_one_write_of(what);
        let e = op().expect_err(what).to_string();
        assert!(e.contains(what) && e.contains("unwritten"), "{what}: {e}");
    }
}

/// The bf16 convolution on each bf16 kernel this CPU has (the fused op on the reference kernel
/// everywhere, on `vdpbf16ps` where the CPU has AVX512_BF16): forward and every gradient
/// against the reference composition (rounded inputs around the f32 convolution) within f32
/// summation-order error, and against f32 within bf16's precision; the outputs and gradients
/// stay f32.
#[test]
fn conv2d_bf16_kernels_match_the_reference_path_and_f32() {
    use ddpm_unet::ops::conv2d_bf16_on;
    use ddpm_unet::ops::precision::Bf16Kernel;
    let kernels = Bf16Kernel::available();
    if !kernels.contains(&Bf16Kernel::Avx512) {
        println!("this CPU has no AVX512_BF16: only the reference kernel runs here");
    }
    let mut rng = SeededNoise::new(7);
    // The U-Net's 3×3 s1, 3×3 s2 and 1×1 cases at odd sizes and channel counts (odd depths:
    // pairs padded), batch 1 and batch 5, and one deep enough for two k blocks.
    let cases = [
        (1, 3, 7, 5, 4, 3, 1, 1),
        (5, 13, 9, 9, 17, 3, 1, 1),
        (3, 6, 7, 7, 6, 3, 2, 1),
        (4, 5, 6, 5, 7, 1, 1, 0),
        (2, 3, 5, 6, 2, 3, 1, 0),
        (2, 48, 14, 14, 40, 3, 1, 1),
        (3, 2, 8, 6, 3, 1, 2, 0),
    ];
    for (n, cin, h, w, cout, k, stride, pad) in cases {
        let x = var(&mut rng, &[n, cin, h, w]);
        let wt = var(&mut rng, &[cout, cin, k, k]);
        let b = var(&mut rng, &[cout]);
        let what = format!("conv n{n} c{cin}->{cout} {h}x{w} k{k} s{stride} p{pad}");
        let r = var(
            &mut rng,
            &[
                n,
                cout,
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
            ],
        );
        // `None`: f32; `Some(None)`: the composition every kernel is held to (rounded inputs
        // around the f32 convolution, rounded output gradient); `Some(Some(k))`: kernel `k`.
        let run = |kernel: Option<Option<Bf16Kernel>>| {
            use ddpm_unet::ops::precision::{bf16_grads, bf16_inputs};
            let y = match kernel {
                Some(Some(kernel)) => {
                    conv2d_bf16_on(&x, &wt, Some(&b), stride, pad, Kernels::Fast, kernel).unwrap()
                }
                Some(None) => {
                    let round = |t: &Var| bf16_inputs(t.as_tensor()).unwrap();
                    let y = conv2d(
                        &round(&x),
                        &round(&wt),
                        Some(&round(&b)),
                        stride,
                        pad,
                        Kernels::Fast,
                    );
                    bf16_grads(&y.unwrap()).unwrap()
                }
                None => conv2d(&x, &wt, Some(&b), stride, pad, Kernels::Fast).unwrap(),
            };
            assert_eq!(y.dtype(), DType::F32);
            let g = (&y * r.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<Tensor> = [&x, &wt, &b]
                .iter()
                .map(|v| g.get(v).expect("gradient").clone())
                .collect();
            (y, grads)
        };
        let (reference, ref_grads) = run(Some(None));
        let (full, full_grads) = run(None);
        let d = max_rel_diff(&reference, &full);
        assert!(d > 0.0 && d < 2e-2, "{what}: reference vs f32 forward {d}");
        for kernel in &kernels {
            let (y, grads) = run(Some(Some(*kernel)));
            let d = max_rel_diff(&y, &reference);
            assert!(
                d < 1e-5,
                "{what} {kernel:?}: forward differs from the reference by {d}"
            );
            for (i, (g, (gr, gf))) in grads
                .iter()
                .zip(ref_grads.iter().zip(&full_grads))
                .enumerate()
            {
                assert_eq!(g.dtype(), DType::F32);
                let d = max_rel_diff(g, gr);
                assert!(
                    d < 1e-4,
                    "{what} {kernel:?}: gradient {i} vs the reference: {d}"
                );
                let d = max_rel_diff(g, gf);
                assert!(d < 3e-2, "{what} {kernel:?}: gradient {i} vs f32: {d}");
            }
        }
    }
}
