//! U-Net tests: shapes, conditioning, capacity (overfitting one batch) and config checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use ddpm_core::testing::randn;
use ddpm_core::{Denoiser, NoiseSchedule, SeededNoise};
use ddpm_unet::{ConfigError, UNet, UNetConfig};

fn build(cfg: &UNetConfig) -> (VarMap, UNet) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet::new(cfg, vb).unwrap();
    (varmap, unet)
}

#[test]
fn output_shape_equals_input_shape() {
    let mut rng = SeededNoise::new(0);
    let uncond = UNetConfig {
        num_classes: 0,
        ..UNetConfig::tiny()
    };
    let three = UNetConfig {
        channel_mults: vec![1, 2, 2],
        attention_levels: vec![2],
        ..UNetConfig::tiny()
    };
    let rgb = UNetConfig {
        in_channels: 3,
        ..UNetConfig::tiny()
    };
    for (cfg, h, w) in [
        (UNetConfig::tiny(), 28, 28),
        (UNetConfig::tiny(), 32, 32),
        (UNetConfig::tiny(), 16, 12),
        (uncond, 28, 28),
        (three, 28, 28),
        (rgb, 8, 8),
    ] {
        let (_, unet) = build(&cfg);
        for b in [1usize, 3] {
            let x = randn(&mut rng, &[b, cfg.in_channels, h, w]);
            let t = Tensor::new(&vec![7u32; b][..], &Device::Cpu).unwrap();
            let y = (cfg.num_classes > 0)
                .then(|| Tensor::new(&vec![1u32; b][..], &Device::Cpu).unwrap());
            let out = unet.predict_noise(&x, &t, y.as_ref()).unwrap();
            assert_eq!(out.dims(), x.dims(), "{cfg:?} {h}x{w} b={b}");
        }
    }
}

#[test]
fn output_depends_on_t_and_class() {
    let (_, unet) = build(&UNetConfig::tiny());
    let mut rng = SeededNoise::new(1);
    let x = randn(&mut rng, &[2, 1, 28, 28]);
    let dev = Device::Cpu;
    let f = |t: [u32; 2], y: [u32; 2]| {
        unet.predict_noise(
            &x,
            &Tensor::new(&t, &dev).unwrap(),
            Some(&Tensor::new(&y, &dev).unwrap()),
        )
        .unwrap()
    };
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let base = f([10, 10], [3, 3]);
    assert!(
        diff(&base, &f([10, 10], [3, 3])) == 0.0,
        "deterministic in eval mode"
    );
    assert!(diff(&base, &f([500, 500], [3, 3])) > 1e-4, "ignores t");
    assert!(
        diff(&base, &f([10, 10], [4, 4])) > 1e-4,
        "ignores the class"
    );
    assert!(
        diff(&base, &f([10, 10], [10, 10])) > 1e-4,
        "ignores the null class"
    );
    // None = the null class.
    let none = unet
        .predict_noise(&x, &Tensor::new(&[10u32, 10], &dev).unwrap(), None)
        .unwrap();
    assert_eq!(diff(&none, &f([10, 10], [10, 10])), 0.0);
    assert_eq!(unet.null_class(), Some(10));
}

#[test]
fn tiny_model_overfits_one_batch_of_digits() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/mnist");
    let ds = ddpm_data::load_idx_dir(
        &dir,
        ddpm_data::Split::Test,
        (0..10).map(|d| d.to_string()).collect(),
    )
    .unwrap()
    .take(8);
    let (x0, y) = ds.to_tensors(&Device::Cpu).unwrap();
    // 14×14 digits keep the test quick on two CPU cores.
    let x0 = x0.avg_pool2d(2).unwrap();
    let schedule = ddpm_schedule::ScheduleConfig::default().build().unwrap();
    let mut rng = SeededNoise::new(2);
    let noise = randn(&mut rng, &[8, 1, 14, 14]);
    let t = Tensor::new(&[5u32, 50, 100, 200, 300, 400, 600, 900], &Device::Cpu).unwrap();
    let xt = schedule.add_noise(&x0, &noise, &t).unwrap();
    let (varmap, unet) = build(&UNetConfig::tiny());
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let loss_at = |unet: &UNet| {
        let eps = unet.forward_t(&xt, &t, Some(&y), true).unwrap();
        candle_nn::loss::mse(&eps, &noise).unwrap()
    };
    let first = loss_at(&unet).to_scalar::<f32>().unwrap();
    let mut last = first;
    for _ in 0..250 {
        let loss = loss_at(&unet);
        last = loss.to_scalar::<f32>().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    assert!(
        last * 10.0 <= first,
        "loss {first} -> {last}: less than 10x down"
    );
}

#[test]
fn invalid_configs_are_rejected() {
    let bad_groups = UNetConfig {
        groups: 3,
        ..UNetConfig::tiny()
    };
    assert!(matches!(bad_groups.validate(), Err(ConfigError::Invalid(m)) if m.contains("groups")));
    let bad_heads = UNetConfig {
        num_heads: 3,
        ..UNetConfig::tiny()
    };
    assert!(bad_heads.validate().is_err());
    let bad_level = UNetConfig {
        attention_levels: vec![5],
        ..UNetConfig::tiny()
    };
    assert!(bad_level.validate().is_err());
    assert!(UNetConfig {
        channel_mults: vec![],
        ..UNetConfig::tiny()
    }
    .validate()
    .is_err());
    assert!(UNetConfig {
        dropout: 1.0,
        ..UNetConfig::tiny()
    }
    .validate()
    .is_err());
    // Building fails too, with the reason.
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let e = UNet::new(&bad_groups, vb).unwrap_err().to_string();
    assert!(e.contains("groups = 3"), "{e}");
    // Sizes that cannot round-trip: 28 through 4 levels (28→14→7→4→8), odd sizes through 2.
    let four = UNetConfig {
        channel_mults: vec![1, 1, 1, 1],
        attention_levels: vec![],
        ..UNetConfig::tiny()
    };
    assert!(matches!(
        four.check_image_size(28, 28),
        Err(ConfigError::SizeMismatch { factor: 8, .. })
    ));
    assert!(four.check_image_size(32, 32).is_ok());
    assert!(UNetConfig::tiny().check_image_size(27, 28).is_err());
    assert!(UNetConfig::mnist().check_image_size(28, 28).is_ok());
    let (_, unet) = build(&UNetConfig::tiny());
    let x = Tensor::zeros((1, 1, 27, 27), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    assert!(unet.predict_noise(&x, &t, None).is_err());
}

#[test]
fn weight_names_are_stable() {
    let (varmap, _) = build(&UNetConfig::tiny());
    let data = varmap.data().lock().unwrap();
    for name in [
        "time_embed.0.weight",
        "time_embed.2.bias",
        "class_embed.weight",
        "conv_in.weight",
        "down.0.res.0.conv1.weight",
        "down.0.res.0.emb_proj.weight",
        "down.0.downsample.weight",
        "down.1.res.0.skip.weight",
        "down.1.attn.0.qkv.weight",
        "mid.res1.norm1.weight",
        "mid.attn.proj.bias",
        "mid.res2.conv2.weight",
        "up.1.res.1.conv1.weight",
        "up.1.upsample.weight",
        "up.0.res.1.skip.weight",
        "norm_out.weight",
        "conv_out.bias",
    ] {
        assert!(data.contains_key(name), "missing weight {name}");
    }
    assert_eq!(data["class_embed.weight"].dims(), &[11, 32]);
}

#[test]
fn presets_have_the_documented_sizes() {
    let n = |c: &UNetConfig| ddpm_unet::parameter_count(c).unwrap();
    let (tiny, small, mnist) = (
        n(&UNetConfig::tiny()),
        n(&UNetConfig::small()),
        n(&UNetConfig::mnist()),
    );
    assert!(tiny < small && small < mnist);
    assert!(tiny < 100_000, "tiny has {tiny}");
    // The shipped default model must stay under ~10 MB in f16.
    assert!(mnist * 2 < 10_000_000, "mnist has {mnist}");
    eprintln!("parameters: tiny {tiny}, small {small}, mnist {mnist}");
}

#[test]
fn forward_flops_of_a_one_level_net_by_hand() {
    // One level, one res block, base 8, groups 4, no attention at level 0 (the middle always
    // has one): conv_in, down res(8→8), mid res, attn, res, up res(16→8) ×2, conv_out, time MLP.
    let cfg = UNetConfig {
        channel_mults: vec![1],
        attention_levels: vec![],
        num_res_blocks: 1,
        ..UNetConfig::tiny()
    };
    let (h, w) = (6.0f64, 4.0f64);
    let hw = h * w;
    let c = 8.0;
    let emb = cfg.embed_dim() as f64;
    let conv3 = |cin: f64, cout: f64| 2.0 * cin * cout * 9.0 * hw;
    let res_same = conv3(c, c) * 2.0 + 2.0 * emb * c;
    let res_cat = conv3(2.0 * c, c) + conv3(c, c) + 2.0 * emb * c + 2.0 * 2.0 * c * c * hw;
    let attn = 2.0 * 3.0 * c * c * hw + 2.0 * c * c * hw + 4.0 * hw * hw * c;
    let want = 2.0 * (c * emb + emb * emb)
        + conv3(1.0, c)
        + res_same * 3.0
        + attn
        + res_cat * 2.0
        + conv3(c, 1.0);
    let got = ddpm_unet::forward_flops(&cfg, 6, 4);
    assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    // The presets at 28×28, for the record in docs/performance.md.
    let small = ddpm_unet::forward_flops(&UNetConfig::small(), 28, 28);
    assert!(small > 1e8 && small < 1e9, "{small}");
}

/// The cosine between two sets of weight gradients of `varmap`'s weights, over all of them;
/// each of `other`'s gradients must exist and be f32 (autocast keeps the weights f32).
fn gradient_cosine(
    varmap: &VarMap,
    f32_grads: &candle_core::backprop::GradStore,
    other: &candle_core::backprop::GradStore,
) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for v in varmap.all_vars() {
        let (a, b) = (
            f32_grads.get(&v).unwrap(),
            other.get(&v).expect("every weight gets a gradient"),
        );
        assert_eq!(b.dtype(), DType::F32);
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (a, b) in a.iter().zip(&b) {
            dot += (*a as f64) * (*b as f64);
            na += (*a as f64).powi(2);
            nb += (*b as f64).powi(2);
        }
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// Autocast in f16 on the CPU (the path bf16 takes on a GPU; candle's CPU matmul has no bf16):
/// output in f32, close to the f32 model's; weight gradients arrive in f32 on the f32 weights
/// and point the same way as the f32 model's.
#[test]
fn autocast_keeps_f32_weights_and_matches_f32() {
    let mut rng = SeededNoise::new(9);
    let x = randn(&mut rng, &[3, 1, 16, 16]);
    let t = Tensor::new(&[3u32, 400, 999], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 7, 10], &Device::Cpu).unwrap();
    let (varmap, unet) = build(&UNetConfig::tiny());
    let half = unet.clone().with_autocast(Some(DType::F16)).unwrap();
    assert_eq!(half.autocast(), Some(DType::F16));
    let run = |m: &UNet| {
        let out = m.forward_t(&x, &t, Some(&y), false).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (out, grads)
    };
    let (o32, g32) = run(&unet);
    let (o16, g16) = run(&half);
    assert_eq!(o16.dtype(), DType::F32);
    let rel = ddpm_core::testing::max_rel_diff(&o16, &o32);
    assert!(rel < 2e-2, "f16 output differs from f32 by {rel}");
    let cos = gradient_cosine(&varmap, &g32, &g16);
    assert!(cos > 0.999, "gradient direction cosine {cos}");
    let e = unet.with_autocast(Some(DType::U8)).unwrap_err().to_string();
    assert!(e.contains("bf16 or f16"), "{e}");
}

/// bf16 autocast on the CPU, the reference path: the output stays f32 and close to the f32
/// model's (within bf16's precision, and not equal: the rounding happens), the weight gradients
/// arrive in f32 and point the same way.
#[test]
fn bf16_reference_path_on_the_cpu_matches_f32_within_bf16_precision() {
    let mut rng = SeededNoise::new(10);
    let x = randn(&mut rng, &[3, 1, 16, 16]);
    let t = Tensor::new(&[3u32, 400, 999], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 7, 10], &Device::Cpu).unwrap();
    let (varmap, unet) = build(&UNetConfig::tiny());
    let bf16 = unet.clone().with_autocast(Some(DType::BF16)).unwrap();
    let run = |m: &UNet| {
        let out = m.forward_t(&x, &t, Some(&y), false).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (out, grads)
    };
    let (o32, g32) = run(&unet);
    let (ob, gb) = run(&bf16);
    assert_eq!(ob.dtype(), DType::F32);
    let rel = ddpm_core::testing::max_rel_diff(&ob, &o32);
    assert!(rel < 3e-2, "bf16 output differs from f32 by {rel}");
    assert!(rel > 1e-5, "no rounding happened ({rel})");
    let cos = gradient_cosine(&varmap, &g32, &gb);
    assert!(cos > 0.999, "gradient direction cosine {cos}");
}

/// The reference path's convolution is an f32 convolution of bf16-rounded inputs, forward and
/// backward: its output equals stock candle's convolution of the pre-rounded tensors, and its
/// input and weight gradients equal the f32 gradients taken with the upstream gradient rounded.
#[test]
fn bf16_reference_convolution_is_the_f32_product_of_rounded_inputs() {
    use candle_core::Var;
    use ddpm_unet::ops::precision::{bf16_grads, bf16_inputs};
    use ddpm_unet::ops::{conv2d, Kernels};
    let mut rng = SeededNoise::new(11);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 5, 9, 7])).unwrap();
    let w = Var::from_tensor(&randn(&mut rng, &[4, 5, 3, 3])).unwrap();
    let g = randn(&mut rng, &[2, 4, 9, 7]);
    for kernels in [Kernels::Fast, Kernels::Stock] {
        let y = bf16_grads(
            &conv2d(
                &bf16_inputs(x.as_tensor()).unwrap(),
                &bf16_inputs(w.as_tensor()).unwrap(),
                None,
                1,
                1,
                kernels,
            )
            .unwrap(),
        )
        .unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        // The same, by hand: round, then plain f32 ops.
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let (xr, wr) = (
            Var::from_tensor(&round(x.as_tensor())).unwrap(),
            Var::from_tensor(&round(w.as_tensor())).unwrap(),
        );
        let yr = xr.as_tensor().conv2d(wr.as_tensor(), 1, 1, 1, 1).unwrap();
        let diff = ddpm_core::testing::max_rel_diff(&y, &yr);
        assert!(diff < 1e-5, "{kernels:?}: forward differs by {diff}");
        let hand = (&yr * round(&g))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (ours, theirs, what) in [(&x, &xr, "input"), (&w, &wr, "weight")] {
            let d = ddpm_core::testing::max_rel_diff(
                grads.get(ours).unwrap(),
                hand.get(theirs).unwrap(),
            );
            assert!(d < 1e-4, "{kernels:?}: {what} gradient differs by {d}");
        }
    }
}

#[test]
fn a_guidance_embedding_takes_w_and_starts_inert() {
    let cfg = UNetConfig {
        guidance_embedding: true,
        ..UNetConfig::tiny()
    };
    let (varmap, unet) = build(&cfg);
    let mut vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(vars.iter().any(|(n, _)| n.starts_with("guidance_embed.2")));
    UNet::initialise(&vars, 3).unwrap();
    let x = randn(&mut SeededNoise::new(1), &[2, 1, 28, 28]);
    let t = Tensor::new(&[10u32, 500], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 10], &Device::Cpu).unwrap();
    let at = |w: f64| unet.predict_noise_at(&x, &t, Some(&y), w).unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // Initialised, the last layer is zero: w changes nothing, and w = 0 is the plain forward.
    assert!(unet.takes_guidance());
    assert_eq!(diff(&at(0.0), &at(3.0)), 0.0);
    assert_eq!(
        diff(&at(0.0), &unet.predict_noise(&x, &t, Some(&y)).unwrap()),
        0.0
    );
    // Once trained away from zero, w is an input.
    let (_, last) = vars
        .iter()
        .find(|(n, _)| n == "guidance_embed.2.weight")
        .unwrap();
    last.set(&last.ones_like().unwrap()).unwrap();
    assert!(diff(&at(0.0), &at(3.0)) > 1e-3);
    // A network without the embedding refuses w.
    let (_, plain) = build(&UNetConfig::tiny());
    assert!(!plain.takes_guidance());
    let e = plain
        .predict_noise_at(&x, &t, Some(&y), 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no guidance embedding"), "{e}");
}

#[test]
fn a_distilled_card_is_checked_like_the_rest() {
    let card = |d: ddpm_unet::Distillation| ddpm_unet::ModelCard {
        model: UNetConfig {
            guidance_embedding: true,
            ..UNetConfig::tiny()
        },
        schedule: ddpm_schedule::ScheduleConfig::default(),
        data: ddpm_unet::DataInfo::mnist(),
        prediction: Default::default(),
        distilled: Some(d),
    };
    let ok = ddpm_unet::Distillation {
        stage: ddpm_unet::DistillStage::Progressive,
        steps: Some(4),
        w_min: 0.0,
        w_max: 4.0,
        teacher: "checkpoint.safetensors".into(),
        teacher_sha256: "ab".into(),
    };
    assert!(card(ok.clone()).validate().is_ok());
    assert!(ok.check_w(4.0).is_ok() && ok.check_w(4.5).unwrap_err().contains("[0, 4]"));
    for (bad, says) in [
        (
            ddpm_unet::Distillation {
                w_max: f64::NAN,
                ..ok.clone()
            },
            "distilled.w_min/w_max",
        ),
        (
            ddpm_unet::Distillation {
                w_min: 5.0,
                ..ok.clone()
            },
            "distilled.w_min/w_max",
        ),
        (
            ddpm_unet::Distillation {
                steps: Some(0),
                ..ok.clone()
            },
            "distilled.steps",
        ),
        (
            ddpm_unet::Distillation {
                steps: Some(1001),
                ..ok.clone()
            },
            "distilled.steps",
        ),
        (
            ddpm_unet::Distillation {
                teacher: "a\u{1b}[2J".into(),
                ..ok.clone()
            },
            "distilled.teacher",
        ),
    ] {
        let e = card(bad).validate().unwrap_err();
        assert!(e.contains(says), "{e}");
    }
    // A card without the field reads as trained on data, and writes none.
    let json = serde_json::to_value(ddpm_unet::ModelCard {
        distilled: None,
        ..card(ok)
    })
    .unwrap();
    assert!(json.get("distilled").is_none());
}
