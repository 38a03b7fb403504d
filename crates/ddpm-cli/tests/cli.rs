//! The `ddpm` binary end to end: train → resume → sample, and every documented error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use ddpm_train::{DataInfo, ModelCard, TrainConfig, Trainer};

fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// `ddpm` with `flags` (split on spaces; they hold no paths), then each `(flag, value)` (the
/// values kept whole: paths).
fn ddpm_with(flags: &str, values: &[(&str, &str)]) -> Output {
    let mut a: Vec<&str> = flags.split_whitespace().collect();
    for (flag, value) in values {
        a.extend([*flag, *value]);
    }
    ddpm(&a)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes an untrained tiny checkpoint (T = 100) and returns its path.
fn tiny_checkpoint(dir: &Path, classes: usize) -> PathBuf {
    let card = ModelCard {
        model: ddpm_unet::UNetConfig {
            num_classes: classes,
            ..ddpm_unet::UNetConfig::tiny()
        },
        schedule: ddpm_schedule::ScheduleConfig::new(ddpm_schedule::BetaSchedule::linear(), 100),
        data: DataInfo::mnist(),
        prediction: Default::default(),
        distilled: None,
    };
    let path = dir.join(format!("tiny{classes}.safetensors"));
    Trainer::new(card, TrainConfig::default(), &Device::Cpu)
        .unwrap()
        .save(&path)
        .unwrap();
    path
}

#[test]
fn train_resume_then_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let common = [
        "--model",
        "tiny",
        "-b",
        "8",
        "--limit",
        "16",
        "--held-out",
        "8",
        "--timesteps",
        "100",
        "--out",
        out_s,
    ];
    let o = ddpm(
        &[
            &["train", "--max-steps", "2", "--sample-steps", "2"],
            &common[..],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("checkpoint.safetensors").exists() && out.join("metrics.jsonl").exists());
    // A second run into the same folder must not overwrite it by accident.
    let o = ddpm(&[&["train", "--max-steps", "2"], &common[..]].concat());
    assert!(
        !o.status.success() && stderr(&o).contains("--resume"),
        "{}",
        stderr(&o)
    );
    let o = ddpm(
        &[
            &[
                "train",
                "--resume",
                "--max-steps",
                "3",
                "--sample-steps",
                "2",
            ],
            &common[..],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("step 3"));
    // The flags a resumed run cannot honour are named (the common ones: --model, --timesteps…),
    // --max-steps is not.
    let e = stderr(&o);
    assert!(
        e.contains("--model") && e.contains("--timesteps") && e.contains("checkpoint"),
        "{e}"
    );
    assert!(!e.contains("--max-steps,"), "{e}");

    let png = dir.path().join("s.png");
    let ckpt = out.join("checkpoint.safetensors");
    let o = ddpm_with(
        "sample --class 7 --guidance 3 --n 2 --steps 2 --scale 1",
        &[
            ("--checkpoint", ckpt.to_str().unwrap()),
            ("--out", png.to_str().unwrap()),
            ("--gif", dir.path().join("a.gif").to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 29 + 1, 29 + 1));
    assert!(dir.path().join("a.gif").exists());

    // --gif-theme both: a light and a dark file, each other's inverse.
    let o = ddpm_with(
        "sample --n 2 --steps 2 --gif-theme both",
        &[
            ("--checkpoint", ckpt.to_str().unwrap()),
            ("--out", png.to_str().unwrap()),
            ("--gif", dir.path().join("r.gif").to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let first_frame = |name: &str| {
        let f = std::fs::File::open(dir.path().join(name)).unwrap();
        let dec = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(f)).unwrap();
        let frame = image::AnimationDecoder::into_frames(dec)
            .next()
            .unwrap()
            .unwrap();
        frame.into_buffer()
    };
    let (light, dark) = (first_frame("r-light.gif"), first_frame("r-dark.gif"));
    assert_eq!(light.dimensions(), dark.dimensions());
    // Each other's inverse, pixel by pixel, up to GIF's colour quantisation.
    let n = (light.width() * light.height()) as f64;
    let off = light
        .pixels()
        .zip(dark.pixels())
        .map(|(l, d)| (l[0] as f64 + d[0] as f64 - 255.0).abs())
        .sum::<f64>()
        / n;
    assert!(
        off < 10.0,
        "light and dark differ from inverses by {off} on average"
    );
    let same = light
        .pixels()
        .zip(dark.pixels())
        .map(|(l, d)| (l[0] as f64 - d[0] as f64).abs())
        .sum::<f64>()
        / n;
    assert!(same > 20.0, "the two themes look alike ({same})");
}

#[test]
fn sample_each_and_class_all() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let each = dir.path().join("each");
    let png = dir.path().join("grid.png");
    let npz = dir.path().join("samples.npz");
    let o = ddpm_with(
        "sample --class all --n 1 --steps 1 --sampler dpm++ --scale 1",
        &[
            ("--checkpoint", ckpt.to_str().unwrap()),
            ("--out", png.to_str().unwrap()),
            ("--each", each.to_str().unwrap()),
            ("--npz", npz.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut files: Vec<String> = std::fs::read_dir(&each)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files.len(), 10);
    assert_eq!(files[3], "00003_class-3.png");
    // Native size and grayscale, whatever --scale is.
    let digit = image::open(each.join(&files[3])).unwrap();
    assert_eq!((digit.width(), digit.height()), (28, 28));
    assert_eq!(digit.color(), image::ColorType::L8);
    // The .npz holds the same digits, channels last, and the labels.
    let entries = read_stored_zip(&std::fs::read(&npz).unwrap());
    let (header, pixels) = split_npy(&entries["arr_0.npy"]);
    assert!(
        header.contains("'descr': '|u1'") && header.contains("'shape': (10, 28, 28, 1)"),
        "{header}"
    );
    assert_eq!(pixels.len(), 10 * 28 * 28);
    assert_eq!(
        &pixels[3 * 784..4 * 784],
        digit.to_luma8().as_raw().as_slice()
    );
    let (header, labels) = split_npy(&entries["arr_1.npy"]);
    assert!(
        header.contains("'descr': '<i8'") && header.contains("'shape': (10,)"),
        "{header}"
    );
    let labels: Vec<i64> = labels
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(labels, (0..10).collect::<Vec<i64>>());
    // One row per class, one column.
    assert_eq!(image::open(&png).unwrap().height(), 10 * 29 + 1);
}

#[test]
fn sample_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cond = tiny_checkpoint(dir.path(), 10);
    let uncond = tiny_checkpoint(dir.path(), 0);
    let c = cond.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--checkpoint", "/nonexistent/x.safetensors"],
            "does not exist",
        ),
        (vec!["--checkpoint", c, "--class", "10"], "out of range"),
        (vec!["--checkpoint", c, "--class", "seven"], "not a class"),
        (
            vec!["--checkpoint", uncond.to_str().unwrap(), "--class", "3"],
            "unconditional",
        ),
        (vec!["--checkpoint", c, "--n", "0"], "--n 0"),
        (
            vec!["--checkpoint", c, "--steps", "101"],
            "above the model's T = 100",
        ),
        (vec!["--checkpoint", c, "--guidance", "nan"], "finite"),
        (vec!["--checkpoint", c, "--guidance", "inf"], "finite"),
        (vec!["--checkpoint", c, "--device", "cuda"], "cuda"),
    ];
    for (args, want) in cases {
        let o = ddpm(&[&["sample", "--steps", "1"][..], &args].concat());
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected `{want}` in: {err}");
    }
    let corrupt = dir.path().join("corrupt.safetensors");
    let bytes = std::fs::read(&cond).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() - 100]).unwrap();
    let o = ddpm(&["sample", "--checkpoint", corrupt.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("truncated or corrupt") && stderr(&o).contains("corrupt.safetensors"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_states_the_guidance_convention() {
    let o = ddpm(&["sample", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("(1+w)") && help.contains("guidance_scale is 1 + w"),
        "{help}"
    );
    assert!(help.contains("0 = no guidance"), "{help}");
}

#[test]
fn noise_shows_the_forward_process() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("noise.png");
    let o = ddpm_with(
        "noise --index 0 --rows 2 --t 0,50,999 --scale 1",
        &[("--out", png.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&png).unwrap().to_luma8();
    assert_eq!((img.width(), img.height()), (3 * 29 + 1, 2 * 29 + 1));
    // Column t = 0 is the clean digit: mostly black background.
    let dark = (1..29)
        .flat_map(|y| (1..29).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y)[0] == 0)
        .count();
    assert!(dark > 400, "{dark}");
    let o = ddpm_with("noise --t 1000", &[("--out", png.to_str().unwrap())]);
    assert!(!o.status.success() && stderr(&o).contains("outside 0..1000"));
}

#[test]
fn a_repeated_flag_overrides_the_earlier_one() {
    // `cargo xtask train ARGS` passes its defaults first and the user's flags after them.
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("n.png");
    let args = [
        "noise", "--t", "0", "--rows", "3", "--rows", "1", "--scale", "1", "--out",
    ];
    let o = ddpm(&[&args[..], &[png.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::open(&png).unwrap().height(), 29 + 1);
}

#[test]
fn sample_without_a_checkpoint_says_how_to_train_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shipped = [
        "assets/ddpm-mnist.safetensors",
        "runs/default/checkpoint.safetensors",
    ];
    if shipped.iter().any(|p| root.join(p).exists()) {
        eprintln!("skipped: a default checkpoint exists in this checkout");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["sample", "--guidance", "3", "--class", "7"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cargo xtask train"), "{}", stderr(&o));
}

#[test]
fn trains_and_samples_on_an_image_folder_of_another_size() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("letters");
    for (class, v) in [("beta", 40u8), ("alpha", 220)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::GrayImage::from_fn(40, 40, |x, y| {
                image::Luma([v.wrapping_add((x * y + i) as u8)])
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let out = dir.path().join("run");
    let dataset = format!("folder:{}", root.display());
    let o = ddpm_with(
        "train --image-size 32 --model tiny -b 4 --max-steps 1 --timesteps 50 --held-out 2",
        &[("--dataset", &dataset), ("--out", out.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = checkpoint_card(&out.join("checkpoint.safetensors"));
    assert_eq!(
        ck.data.class_names,
        vec!["alpha".to_string(), "beta".to_string()]
    );
    assert_eq!(
        (ck.data.height, ck.data.width, ck.model.num_classes),
        (32, 32, 2)
    );
    let png = dir.path().join("b.png");
    let o = ddpm_with(
        "sample --class beta --n 3 --steps 2 --scale 1",
        &[
            (
                "--checkpoint",
                out.join("checkpoint.safetensors").to_str().unwrap(),
            ),
            ("--out", png.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::open(&png).unwrap().width(), 3 * 33 + 1);
}

/// Colour images train and sample in colour: the card, the grid, `--each`, `.npz` and
/// `data preview` keep three channels, and the MNIST evaluator says it does not apply.
#[test]
fn trains_and_samples_on_an_rgb_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sprites");
    for (class, rgb) in [("red", [220u8, 30, 30]), ("blue", [20, 40, 230])] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let k = ((x + y + i) % 3) as u8 * 10;
                image::Rgb([rgb[0] - k, rgb[1] + k, rgb[2] - k])
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let out = dir.path().join("run");
    let dataset = format!("folder:{}", root.display());
    let o = ddpm_with(
        "train --image-size 16 --model tiny -b 4 --max-steps 2 --timesteps 50 --held-out 2 \
         --sample-steps 2",
        &[("--dataset", &dataset), ("--out", out.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = out.join("checkpoint.safetensors");
    let ck = checkpoint_card(&ckpt);
    assert_eq!((ck.data.channels, ck.model.in_channels), (3, 3));
    assert!(image::open(out.join("samples/step_000002.png")).is_ok());
    let (png, each, npz) = (
        dir.path().join("s.png"),
        dir.path().join("each"),
        dir.path().join("s.npz"),
    );
    let o = ddpm_with(
        "sample --class blue --n 2 --steps 2 --scale 1",
        &[
            ("--checkpoint", ckpt.to_str().unwrap()),
            ("--out", png.to_str().unwrap()),
            ("--each", each.to_str().unwrap()),
            ("--npz", npz.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::open(&png).unwrap().width(), 2 * 17 + 1);
    let files: Vec<_> = std::fs::read_dir(&each).unwrap().collect();
    assert_eq!(files.len(), 2);
    let one = image::open(files[0].as_ref().unwrap().path()).unwrap();
    assert!(one.color().has_color(), "{:?}", one.color());
    // The .npz holds uint8 [N, H, W, C]: 2·16·16·3 bytes of pixels.
    let npz_len = std::fs::metadata(&npz).unwrap().len();
    assert!(npz_len > 2 * 16 * 16 * 3, "{npz_len}");
    let preview = dir.path().join("p.png");
    let o = ddpm_with(
        "data preview --image-size 16 --per-class 2 --scale 1",
        &[
            ("--dataset", &dataset),
            ("--out", preview.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(image::open(&preview)
        .unwrap()
        .to_rgb8()
        .pixels()
        .any(|p| p[0] != p[2]));
    let o = ddpm_with(
        "eval --n 4 --steps 2",
        &[
            ("--checkpoint", ckpt.to_str().unwrap()),
            ("--out", dir.path().join("eval").to_str().unwrap()),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("MNIST-shaped"), "{}", stderr(&o));
}

fn checkpoint_card(path: &Path) -> ModelCard {
    ddpm_train::checkpoint::read(path, &Device::Cpu)
        .unwrap()
        .file
        .card
}

#[test]
fn eval_writes_a_report_and_plots_across_guidance_weights() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let out = dir.path().join("eval");
    let o = ddpm_with(
        "eval --n 20 --guidance 0,2 --steps 2 --batch 10",
        &[
            ("--checkpoint", ckpt.to_str().unwrap()),
            ("--out", out.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("| real (train vs test) |"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["w"], 2.0);
    assert_eq!(rows[0]["metrics"]["count"], 20);
    assert_eq!(
        rows[0]["metrics"]["accuracy"]["counts"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    // An untrained model's samples are far from digits; real train images are close to test.
    let floor = report["real_data_floor"]["fid_mnist"].as_f64().unwrap();
    let fid = rows[0]["metrics"]["fid_mnist"].as_f64().unwrap();
    assert!(fid > floor, "{fid} vs floor {floor}");
    assert!(report["classifier_test_accuracy"].as_f64().unwrap() > 0.99);
    for png in ["fid_vs_is.png", "accuracy_vs_w.png"] {
        assert!(image::open(out.join(png)).is_ok(), "{png}");
    }
    // --replot redraws from the report without sampling.
    let again = dir.path().join("again");
    let o = ddpm_with(
        "eval",
        &[
            ("--replot", out.join("report.json").to_str().unwrap()),
            ("--out", again.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| 2 |"));
    assert!(image::open(again.join("fid_vs_is.png")).is_ok());
    let o = ddpm(&["eval", "--replot", ckpt.to_str().unwrap()]);
    assert!(stderr(&o).contains("not a `ddpm eval` report") || stderr(&o).contains("--replot"));
}

#[test]
fn eval_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let c = ckpt.to_str().unwrap();
    let o = ddpm_with(
        "eval --classifier /nope/clf.safetensors",
        &[("--checkpoint", c)],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("/nope/clf.safetensors") && e.contains("train-classifier"),
        "{e}"
    );
    let o = ddpm_with("eval --n 1", &[("--checkpoint", c)]);
    assert!(stderr(&o).contains("--n 1"), "{}", stderr(&o));
    let o = ddpm_with("eval --guidance 1,nan", &[("--checkpoint", c)]);
    assert!(stderr(&o).contains("--guidance"), "{}", stderr(&o));
}

#[test]
fn bench_prints_one_json_line_per_measurement() {
    for mode in ["train", "forward"] {
        for kernels in ["fast", "stock"] {
            let o = ddpm_with(
                "bench --model tiny --batch 2 --iters 1 --warmup 0 --image-size 8",
                &[("--mode", mode), ("--kernels", kernels)],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            let v: serde_json::Value =
                serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
            assert_eq!(v["mode"], mode);
            assert_eq!(v["impl"], format!("candle-{kernels}"));
            assert_eq!(v["params"], 45_321);
            assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
            assert!(v["peak_rss_mib"].as_f64().unwrap() > 1.0);
        }
    }
    let o = ddpm_with("bench --mode config --model small", &[]);
    let cfg: ddpm_unet::UNetConfig =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(cfg, ddpm_unet::UNetConfig::small());
    let o = ddpm_with("bench --mode train --iters 0", &[]);
    assert!(stderr(&o).contains("--iters"), "{}", stderr(&o));
    let o = ddpm_with("bench --mode kernels --model tiny --batch 3 --iters 1", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    for what in ["adamw_ema_ms", "guided_step_ms", "add_noise_ms"] {
        for k in ["fused", "composed"] {
            assert!(v[what][k].as_f64().unwrap() > 0.0, "{what}.{k}: {v}");
        }
    }
}

#[test]
fn sample_sweep_puts_one_titled_grid_per_weight_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let c = ckpt.to_str().unwrap();
    let one = dir.path().join("one.png");
    let o = ddpm_with(
        "sample --class 3 --n 2 --steps 2 --scale 1",
        &[("--checkpoint", c), ("--out", one.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let sweep = dir.path().join("sweep.png");
    let o = ddpm_with(
        "sample --class 3 --n 2 --steps 2 --scale 1 --sweep 0,1,3",
        &[("--checkpoint", c), ("--out", sweep.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let single = image::open(&one).unwrap();
    let panels = image::open(&sweep).unwrap();
    // Three panels of the single grid's width plus gaps, and a title strip above them.
    assert!(
        panels.width() >= 3 * single.width(),
        "{} vs {}",
        panels.width(),
        single.width()
    );
    assert!(panels.height() > single.height());
    let o = ddpm_with("sample --sweep 0,nan", &[("--checkpoint", c)]);
    assert!(!o.status.success());
    let o = ddpm_with("sample --sweep 0,1 --gif x.gif", &[("--checkpoint", c)]);
    assert!(
        stderr(&o).contains("--gif") || stderr(&o).contains("cannot be used"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn export_writes_a_smaller_sampling_only_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let out = dir.path().join("shipped.safetensors");
    let o = ddpm_with(
        "export",
        &[
            ("--checkpoint", ckpt.to_str().unwrap()),
            ("--out", out.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (full, small) = (
        std::fs::metadata(&ckpt).unwrap().len(),
        std::fs::metadata(&out).unwrap().len(),
    );
    // The training checkpoint holds weights, EMA and two moments in f32; the export EMA in f16.
    assert!(small * 6 < full, "{small} vs {full}");
    assert_eq!(checkpoint_card(&out), checkpoint_card(&ckpt));
    let png = dir.path().join("s.png");
    let o = ddpm_with(
        "sample --class 7 --n 2 --steps 2",
        &[
            ("--checkpoint", out.to_str().unwrap()),
            ("--out", png.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // A missing source is named.
    let o = ddpm_with(
        "export --checkpoint /nope.safetensors",
        &[("--out", out.to_str().unwrap())],
    );
    assert!(stderr(&o).contains("/nope.safetensors"), "{}", stderr(&o));
}

#[test]
fn autocast_runs_on_the_cpu_and_says_what_bf16_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let ck = ckpt.to_str().unwrap();
    let out = dir.path().join("f16.png");
    let o = ddpm_with(
        "sample --autocast f16 --n 2 --class 3 --steps 3",
        &[("--checkpoint", ck), ("--out", out.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
    let bf16 = dir.path().join("bf16.png");
    let o = ddpm_with(
        "sample --autocast bf16 --n 2 --class 3 --steps 3",
        &[("--checkpoint", ck), ("--out", bf16.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(bf16.exists());
    assert!(
        // Which bf16 kernel runs depends on the CPU (precision::bf16_kernel): the note names it.
        stderr(&o).contains("reference path")
            && (stderr(&o).contains("slower than f32")
                || stderr(&o).contains("convolutions run the vdpbf16ps kernel")),
        "{}",
        stderr(&o)
    );
    // Training refuses f16 (no loss scaling) before it looks at any data.
    let o = ddpm_with(
        "train --autocast f16",
        &[("--out", dir.path().to_str().unwrap())],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bf16"), "{}", stderr(&o));
}

/// `--budget`: the run plans its steps on this machine, says so, saves the plan, and prints
/// the flags that rerun it anywhere; the first line names the recipe and how to change it.
#[test]
fn train_with_a_budget_plans_saves_and_prints_its_plan() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = ddpm_with("train --model tiny -b 8 --limit 32 --held-out 8 --timesteps 100 --sample-every 0 --budget 1m --max-steps 6", &[("--out", out.to_str().unwrap())]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}{text}", stderr(&o));
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains("recipe `quick`")
            && first.contains("1m")
            && first.contains("--budget")
            && first.contains("precision f32"),
        "{first}"
    );
    assert!(text.contains("--max-steps"), "{text}");
    let ckpt = out.join("checkpoint.safetensors");
    let state = ddpm_train::checkpoint::read(&ckpt, &Device::Cpu)
        .unwrap()
        .train
        .unwrap();
    // A minute holds far more than 6 tiny steps: the plan is saved, --max-steps stops the run.
    let planned = state.plan.expect("the plan is saved").total_steps;
    assert!(planned > 6, "{planned}");
    assert_eq!(state.step, 6);
    let o = ddpm_with(
        "train --budget 0m",
        &[("--out", dir.path().join("x").to_str().unwrap())],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("positive"),
        "{}",
        stderr(&o)
    );
}

/// `--batch` splits a request without changing it: the deterministic samplers draw the same
/// digits in one batch or several (the same pixels up to one grey level of rounding).
#[test]
fn sample_in_batches_draws_the_same_digits() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let mut outs = Vec::new();
    for batch in ["3", "1000"] {
        let out = dir.path().join(format!("b{batch}.png"));
        let o = ddpm_with(
            "sample --class all --n 2 --steps 5 --guidance 2",
            &[
                ("--checkpoint", ckpt.to_str().unwrap()),
                ("--batch", batch),
                ("--out", out.to_str().unwrap()),
                (
                    "--gif",
                    dir.path().join(format!("b{batch}.gif")).to_str().unwrap(),
                ),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(image::open(&out).unwrap().to_luma8().into_raw());
    }
    // Up to rounding: the network's f32 sums over a batch of 3 and one of 20 may round
    // differently in their last bits, and the default DPM-Solver++(3M) on this untrained model
    // carries that to one grey level on a few pixels (16 of 274,704 when this was written). A
    // changed noise order or a state leaking between batches moves whole digits.
    let diffs: Vec<u8> = outs[0]
        .iter()
        .zip(&outs[1])
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let off = diffs.iter().filter(|&&d| d > 0).count();
    assert!(
        outs[0].len() == outs[1].len() && max <= 1 && off * 1000 <= diffs.len(),
        "batched sampling changed the digits: max pixel difference {max}, {off} of {} pixels",
        diffs.len()
    );
    let o = ddpm_with(
        "sample --batch 0",
        &[("--checkpoint", ckpt.to_str().unwrap())],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("--batch"),
        "{}",
        stderr(&o)
    );
}

/// The entries of a stored (uncompressed) zip, read through its local headers, with each
/// entry's CRC-32 checked.
fn read_stored_zip(bytes: &[u8]) -> std::collections::HashMap<String, Vec<u8>> {
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let mut out = std::collections::HashMap::new();
    let mut at = 0;
    while u32_at(at) == 0x0403_4b50 {
        assert_eq!(u16_at(at + 8), 0, "stored");
        let (crc, size) = (u32_at(at + 14), u32_at(at + 18) as usize);
        let (name_len, extra) = (u16_at(at + 26), u16_at(at + 28));
        let name = String::from_utf8(bytes[at + 30..at + 30 + name_len].to_vec()).unwrap();
        let start = at + 30 + name_len + extra;
        let data = bytes[start..start + size].to_vec();
        let mut c = flate2::Crc::new();
        c.update(&data);
        assert_eq!(c.sum(), crc, "{name}: CRC");
        out.insert(name, data);
        at = start + size;
    }
    assert_eq!(
        u32_at(at),
        0x0201_4b50,
        "the central directory follows the entries"
    );
    out
}

/// An .npy file's header (checked to be format 1.0, 64-byte aligned) and its data.
fn split_npy(b: &[u8]) -> (String, &[u8]) {
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + len) % 64, 0);
    (
        String::from_utf8(b[10..10 + len].to_vec()).unwrap(),
        &b[10 + len..],
    )
}

#[test]
fn data_preview_draws_one_named_row_per_class() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("preview.png");
    let o = ddpm_with(
        "data preview --split test --per-class 3",
        &[("--out", out.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&out).unwrap().to_rgb8();
    // Ten rows of 28 px digits at scale 2 with their gutters, and a label column.
    assert_eq!(img.height(), 10 * (28 * 2 + 2 + 2) + 8);
    assert!(img.width() > 3 * (28 * 2 + 2));
    // The label column holds dark text on white.
    let dark = (0..img.height())
        .flat_map(|y| (0..20).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y)[0] < 100)
        .count();
    assert!(dark > 50, "no labels drawn");
    let o = ddpm_with("data preview --per-class 0", &[]);
    assert!(!o.status.success() && stderr(&o).contains("--per-class 0"));
}

/// `ddpm reconstruct`: the grid's shape (rows = digits, columns = original then each t), the
/// per-t table, and its errors.
#[test]
fn reconstruct_writes_the_grid_and_the_error_table() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), 10);
    let png = dir.path().join("rec.png");
    let c = ckpt.to_str().unwrap();
    let o = ddpm_with(
        "reconstruct --index 0,1,2 --t 5,50,99 --steps 5 --scale 1",
        &[("--checkpoint", c), ("--out", png.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("| t | √ᾱ_t | steps | mse | psnr dB |"),
        "{out}"
    );
    for t in ["| 5 |", "| 50 |", "| 99 |"] {
        assert!(out.contains(t), "{out}");
    }
    let img = image::open(&png).unwrap();
    // 3 rows (a one-row grid of 28-px cells with 1-px frames each, 30 px high) and an 8-px
    // margin; 4 cells (4·29 + 1 px) beside the row labels.
    assert_eq!(img.height(), 3 * 30 + 8);
    assert!(img.width() > 4 * 29 + 1);
    let guided = ddpm_with(
        "reconstruct --count 2 --t 50 --steps 5 --as-class 3 --guidance 2 --scale 1",
        &[("--checkpoint", c), ("--out", png.to_str().unwrap())],
    );
    assert!(guided.status.success(), "{}", stderr(&guided));
    assert!(String::from_utf8_lossy(&guided.stdout).contains("as class 3"));
    for (args, want) in [
        (vec!["--t", "100"], "outside 0..100"),
        (vec!["--t", "50", "--as-class", "10"], "out of range"),
        (vec!["--t", "50", "--index", "99999"], "past the"),
    ] {
        let mut all = vec![
            "reconstruct",
            "--checkpoint",
            c,
            "--out",
            png.to_str().unwrap(),
        ];
        all.extend(args);
        let o = ddpm(&all);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
    }
}

#[test]
fn distill_makes_a_student_that_samples_with_its_own_steps_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = tiny_checkpoint(dir.path(), 10);
    let out = dir.path().join("distill");
    let args = |extra: &str| {
        format!(
            "distill --steps-per-stage 2 --batch 4 --from-steps 8 --to-steps 4 --w-max 3 {extra}"
        )
    };
    let paths = [
        ("--teacher", teacher.to_str().unwrap()),
        ("--out", out.to_str().unwrap()),
    ];
    let o = ddpm_with(&args(""), &paths);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        said.contains("stage guidance starts") && said.contains("stage steps-4 starts"),
        "{said}"
    );
    let student = out.join("steps-4/checkpoint.safetensors");
    let card = checkpoint_card(&student);
    assert_eq!(card.distilled.as_ref().and_then(|d| d.steps), Some(4));
    assert!(card.model.guidance_embedding);
    // Again without --resume: refused, naming the flag; with it, every stage is complete.
    let o = ddpm_with(&args(""), &paths);
    assert!(
        !o.status.success() && stderr(&o).contains("--resume"),
        "{}",
        stderr(&o)
    );
    let o = ddpm_with(&args("--resume"), &paths);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("stage steps-4 is complete"));
    // The student samples with no sampler flag, in its own 4 steps (an export keeps its card),
    // and refuses a w outside what it learned.
    let export = dir.path().join("student.safetensors");
    let o = ddpm_with(
        "export",
        &[
            ("--checkpoint", student.to_str().unwrap()),
            ("--out", export.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(checkpoint_card(&export).distilled, card.distilled);
    let png = dir.path().join("s.png");
    let o = ddpm_with(
        "sample --class 7 --n 2 --guidance 2",
        &[
            ("--checkpoint", export.to_str().unwrap()),
            ("--out", png.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(png.exists());
    let o = ddpm_with(
        "sample --class 7 --n 2 --guidance 5",
        &[
            ("--checkpoint", export.to_str().unwrap()),
            ("--out", png.to_str().unwrap()),
        ],
    );
    assert!(
        stderr(&o).contains("[0, 3]") && stderr(&o).contains("--guidance"),
        "{}",
        stderr(&o)
    );
    // Bad plans are named by their flags before anything runs.
    let o = ddpm_with("distill --from-steps 12 --to-steps 4", &paths);
    assert!(stderr(&o).contains("--from-steps"), "{}", stderr(&o));
}
