//! The U-Net's operations on CUDA against the CPU: forward values and gradients of every op
//! (including the rewritten convolution backward of `Kernels::Fast` on CUDA), then the whole
//! U-Net's output and weight gradients. Built with `--features cuda`; without that feature, or
//! without a GPU, every test prints why it skipped and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpm_core::testing::{max_rel_diff, randn};
use ddpm_core::SeededNoise;
use ddpm_unet::ops::{add_channel_bias, conv2d, group_norm, upsample_nearest2x, Kernels};
use ddpm_unet::{UNet, UNetConfig};

/// The first GPU, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<Device> {
    ddpm_core::testing::cuda_or_skip(test, cfg!(feature = "cuda"))
}

/// Runs `f` on the CPU (stock kernels: the reference) and on the GPU (`kernels`) with the loss
/// Σ y·r and compares outputs and the gradients of every input. cuBLAS and cuDNN may use TF32
/// on Hopper, hence the tolerance.
fn compare(
    gpu: &Device,
    rng: &mut SeededNoise,
    inputs: &[Tensor],
    kernels: Kernels,
    f: impl Fn(&[Tensor], Kernels) -> candle_core::Result<Tensor>,
    what: &str,
) {
    let run = |dev: &Device, k: Kernels| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts, k).unwrap();
        (vars, y)
    };
    let (cpu_vars, cpu_y) = run(&Device::Cpu, Kernels::Stock);
    let (gpu_vars, gpu_y) = run(gpu, kernels);
    let d = max_rel_diff(&gpu_y, &cpu_y);
    assert!(d < 2e-3, "{what}: forward differs by {d}");
    let r = randn(rng, cpu_y.dims());
    let gc = (&cpu_y * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let r = r.to_device(gpu).unwrap();
    let gg = (&gpu_y * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, (vc, vg)) in cpu_vars.iter().zip(&gpu_vars).enumerate() {
        let d = max_rel_diff(gg.get(vg).expect("gpu grad"), gc.get(vc).expect("cpu grad"));
        assert!(d < 2e-3, "{what}: gradient of input {i} differs by {d}");
    }
}

#[test]
fn conv2d_on_cuda_matches_cpu_with_both_kernel_sets() {
    let Some(dev) = gpu("conv2d_on_cuda_matches_cpu_with_both_kernel_sets") else {
        return;
    };
    let mut rng = SeededNoise::new(11);
    for (n, ci, co, h, w, k, s, p) in [
        (4, 3, 8, 28, 28, 3, 1, 1),
        (2, 8, 8, 28, 28, 3, 2, 1),
        (3, 16, 16, 7, 7, 3, 2, 1),
        (2, 5, 6, 16, 12, 3, 1, 1),
        (2, 6, 4, 9, 9, 1, 1, 0),
    ] {
        let x = randn(&mut rng, &[n, ci, h, w]);
        let wt = randn(&mut rng, &[co, ci, k, k]);
        let b = randn(&mut rng, &[co]);
        for kernels in [Kernels::Fast, Kernels::Stock, Kernels::CudaOps] {
            compare(
                &dev,
                &mut rng,
                &[x.clone(), wt.clone(), b.clone()],
                kernels,
                |t, k| conv2d(&t[0], &t[1], Some(&t[2]), s, p, k),
                &format!("conv2d {kernels:?} n{n} {ci}->{co} {h}x{w} k{k} s{s} p{p}"),
            );
        }
    }
}

#[test]
fn norm_bias_and_upsample_on_cuda_match_cpu() {
    let Some(dev) = gpu("norm_bias_and_upsample_on_cuda_match_cpu") else {
        return;
    };
    let mut rng = SeededNoise::new(12);
    let x = randn(&mut rng, &[3, 8, 7, 5]);
    let (g, b, s) = (
        randn(&mut rng, &[8]),
        randn(&mut rng, &[8]),
        randn(&mut rng, &[3, 8]),
    );
    // Fast: candle's composition on the GPU; CudaOps: our kernels (kernels/norm.cu, bias.cu, resample.cu). Odd sizes, and
    // a plane larger than one block so the kernels' strided loops wrap.
    let big = randn(&mut rng, &[2, 8, 40, 33]);
    let big_shift = randn(&mut rng, &[2, 8]);
    for kernels in [Kernels::Fast, Kernels::CudaOps] {
        for silu in [true, false] {
            compare(
                &dev,
                &mut rng,
                &[x.clone(), g.clone(), b.clone(), s.clone()],
                kernels,
                |t, k| group_norm(&t[0], &t[1], &t[2], Some(&t[3]), 4, 1e-5, silu, k),
                &format!("group_norm+shift silu={silu} {kernels:?}"),
            );
        }
        compare(
            &dev,
            &mut rng,
            &[big.clone(), g.clone(), b.clone(), big_shift.clone()],
            kernels,
            |t, k| group_norm(&t[0], &t[1], &t[2], Some(&t[3]), 2, 1e-5, true, k),
            &format!("group_norm 40x33 {kernels:?}"),
        );
        for bias in [s.clone(), b.clone()] {
            compare(
                &dev,
                &mut rng,
                &[x.clone(), bias],
                kernels,
                |t, k| add_channel_bias(&t[0], &t[1], k),
                &format!("add_channel_bias {kernels:?}"),
            );
        }
        compare(
            &dev,
            &mut rng,
            std::slice::from_ref(&x),
            kernels,
            |t, k| upsample_nearest2x(&t[0], k),
            &format!("upsample_nearest2x {kernels:?}"),
        );
    }
}

#[test]
fn unet_on_cuda_matches_cpu_in_output_and_weight_gradients() {
    let Some(dev) = gpu("unet_on_cuda_matches_cpu_in_output_and_weight_gradients") else {
        return;
    };
    let cfg = UNetConfig::tiny();
    let (cpu_map, cpu) = cpu_model(&cfg);
    for kernels in [Kernels::Fast, Kernels::CudaOps] {
        unet_case(&dev, &cfg, &cpu, &cpu_map, kernels);
    }
}

/// A freshly initialised f32 model on the CPU: the reference.
fn cpu_model(cfg: &UNetConfig) -> (VarMap, UNet) {
    let map = VarMap::new();
    let unet = UNet::new(cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).unwrap();
    (map, unet)
}

/// A copy of the CPU model's weights on `dev`, with `kernels`.
fn gpu_copy(dev: &Device, cfg: &UNetConfig, cpu_map: &VarMap, kernels: Kernels) -> (VarMap, UNet) {
    let gpu_map = VarMap::new();
    let gpu = UNet::new(cfg, VarBuilder::from_varmap(&gpu_map, DType::F32, dev))
        .unwrap()
        .with_kernels(kernels);
    for (name, v) in cpu_map.data().lock().unwrap().iter() {
        let g = gpu_map
            .data()
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .expect(name);
        g.set(&v.as_tensor().to_device(dev).unwrap()).unwrap();
    }
    (gpu_map, gpu)
}

/// bf16 autocast on the GPU against the f32 model on the CPU: the output within bf16's
/// precision, and the f32 weight gradients pointing the same way.
#[test]
fn unet_bf16_autocast_on_cuda_tracks_f32() {
    let Some(dev) = gpu("unet_bf16_autocast_on_cuda_tracks_f32") else {
        return;
    };
    let cfg = UNetConfig::tiny();
    let (cpu_map, cpu) = cpu_model(&cfg);
    for kernels in [Kernels::Fast, Kernels::CudaOps] {
        let (gpu_map, gpu) = gpu_copy(&dev, &cfg, &cpu_map, kernels);
        let gpu = gpu.with_autocast(Some(DType::BF16)).unwrap();
        let mut rng = SeededNoise::new(14);
        let x = randn(&mut rng, &[4, 1, 28, 28]);
        let t = Tensor::new(&[3u32, 500, 999, 42], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1u32, 10, 7, 0], &Device::Cpu).unwrap();
        let on = |d: &Device| {
            (
                x.to_device(d).unwrap(),
                t.to_device(d).unwrap(),
                y.to_device(d).unwrap(),
            )
        };
        let (xc, tc, yc) = on(&Device::Cpu);
        let (xg, tg, yg) = on(&dev);
        let out_cpu = cpu.forward_t(&xc, &tc, Some(&yc), false).unwrap();
        let out_gpu = gpu.forward_t(&xg, &tg, Some(&yg), false).unwrap();
        assert_eq!(out_gpu.dtype(), DType::F32);
        let d = max_rel_diff(&out_gpu, &out_cpu);
        assert!(d < 5e-2, "bf16 ({kernels:?}) output differs by {d}");
        let grads = |out: &Tensor| out.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        let (gc, gg) = (grads(&out_cpu), grads(&out_gpu));
        let gpu_vars = gpu_map.data().lock().unwrap();
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for (name, v) in cpu_map.data().lock().unwrap().iter() {
            let a = gc.get(v).expect(name);
            let b = gg.get(&gpu_vars[name]).expect(name);
            assert_eq!(b.dtype(), DType::F32, "{name}");
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in a.iter().zip(&b) {
                dot += (*a as f64) * (*b as f64);
                na += (*a as f64).powi(2);
                nb += (*b as f64).powi(2);
            }
        }
        let cos = dot / (na.sqrt() * nb.sqrt());
        assert!(cos > 0.99, "bf16 ({kernels:?}) gradient cosine {cos}");
    }
}

fn unet_case(dev: &Device, cfg: &UNetConfig, cpu: &UNet, cpu_map: &VarMap, kernels: Kernels) {
    let dev = dev.clone();
    let (gpu_map, gpu) = gpu_copy(&dev, cfg, cpu_map, kernels);
    let mut rng = SeededNoise::new(13);
    let x = randn(&mut rng, &[4, 1, 28, 28]);
    let t = Tensor::new(&[3u32, 500, 999, 42], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 10, 7, 0], &Device::Cpu).unwrap();
    let out_cpu = cpu.forward_t(&x, &t, Some(&y), true).unwrap();
    let out_gpu = gpu
        .forward_t(
            &x.to_device(&dev).unwrap(),
            &t.to_device(&dev).unwrap(),
            Some(&y.to_device(&dev).unwrap()),
            true,
        )
        .unwrap();
    let d = max_rel_diff(&out_gpu, &out_cpu);
    assert!(d < 2e-3, "U-Net ({kernels:?}) output differs by {d}");
    let grads = |out: &Tensor| out.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let (gc, gg) = (grads(&out_cpu), grads(&out_gpu));
    let gpu_vars = gpu_map.data().lock().unwrap();
    let mut checked = 0;
    for (name, v) in cpu_map.data().lock().unwrap().iter() {
        let (Some(a), Some(b)) = (gc.get(v), gg.get(&gpu_vars[name])) else {
            continue;
        };
        let d = max_rel_diff(b, a);
        assert!(d < 5e-3, "{kernels:?}: gradient of {name} differs by {d}");
        checked += 1;
    }
    assert!(checked > 20, "only {checked} weight gradients compared");
}
