//! Fault injection through the `ddpm` binary and its file readers: `kill -9` during training
//! (then resume and compare with an uninterrupted run), a full disk, two runs on one folder,
//! crafted and mutated dataset and checkpoint files, and the bad inputs of issue #16.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ddpm_train::{checkpoint, DataInfo, ModelCard, TrainConfig, Trainer};

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddpm"));
    c.args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove(ddpm_core::FAULT_FULL_DISK_ENV);
    c
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

fn ddpm(args: &[&str]) -> Output {
    cmd(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small deterministic generator for the property tests (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn tiny_card() -> ModelCard {
    ModelCard {
        model: ddpm_unet::UNetConfig::tiny(),
        schedule: ddpm_schedule::ScheduleConfig::new(ddpm_schedule::BetaSchedule::linear(), 100),
        data: DataInfo::mnist(),
        prediction: Default::default(),
        distilled: None,
    }
}

fn tiny_checkpoint(path: &Path) {
    Trainer::new(tiny_card(), TrainConfig::default(), &Device::Cpu)
        .unwrap()
        .save(path)
        .unwrap();
}

/// The flags of the short training run the kill and lock tests use.
fn run_flags(out: &Path, max_steps: &str) -> Vec<String> {
    [
        "train",
        "--model",
        "tiny",
        "-b",
        "8",
        "--limit",
        "24",
        "--held-out",
        "8",
        "--timesteps",
        "100",
        "--budget",
        "off",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "1",
        "--log-every",
        "2",
        "--seed",
        "3",
        "--max-steps",
        max_steps,
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn spawn(args: &[String]) -> Child {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cmd(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every tensor of a checkpoint, as host vectors.
fn tensors(path: &Path) -> HashMap<String, Vec<f32>> {
    checkpoint::read(path, &Device::Cpu)
        .unwrap()
        .file
        .tensors
        .into_iter()
        .map(|(k, t)| {
            let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            (k, v.to_vec1().unwrap())
        })
        .collect()
}

/// The lines of metrics.jsonl without their timing fields.
fn metrics(dir: &Path) -> Vec<(u64, u64, f64, Option<f64>, f64)> {
    ddpm_train::read_metrics(dir)
        .unwrap()
        .into_iter()
        .map(|r| (r.epoch, r.step, r.train_loss, r.held_out_loss, r.lr))
        .collect()
}

/// Waits until `path` has been replaced `writes` times (its modification time changed), or
/// until `child` has exited.
fn wait_for_writes(path: &Path, writes: u32, child: &mut std::process::Child) {
    let stamp = || std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut last = stamp();
    let mut seen = 0;
    while seen < writes && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_micros(500));
        let now = stamp();
        if now.is_some() && now != last {
            seen += 1;
            last = now;
        }
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for d in [dir.to_path_buf(), dir.join("samples")] {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") {
                    found.push(name);
                }
            }
        }
    }
    found
}

/// `kill -9` at random moments (most steps write a checkpoint, so many kills land in a
/// write), each time resumed: the final weights, EMA, optimizer state and metrics equal those
/// of the uninterrupted run, every checkpoint left by a kill is loadable, and no temp file is
/// left behind.
#[test]
fn kill_9_during_training_then_resume_equals_the_uninterrupted_run() {
    const STEPS: &str = "36";
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let started = Instant::now();
    let o = cmd(&run_flags(&a, STEPS)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let full = started.elapsed();

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let ckpt = b.join("checkpoint.safetensors");
    let mut kills = 0;
    let mut finished = false;
    for attempt in 0..40 {
        let args = if ckpt.exists() {
            vec![
                "train".to_string(),
                "--resume".into(),
                "--max-steps".into(),
                STEPS.into(),
                "--out".into(),
                b.to_str().unwrap().into(),
            ]
        } else {
            run_flags(&b, STEPS)
        };
        let mut child = spawn(&args);
        if attempt < 6 {
            // Kill after 1 to 4 more checkpoint writes (seen by their modification times, so
            // a loaded machine does not let the run finish first), then a random part of one
            // step's time later, so that many kills land in a write.
            let writes = 1 + rng.below(4) as u32;
            let step_ms = (full.as_millis() as u64 / 36).max(1);
            let ms = step_ms * rng.below(100) as u64 / 100;
            wait_for_writes(&ckpt, writes, &mut child);
            std::thread::sleep(Duration::from_millis(ms));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                if ckpt.exists() {
                    checkpoint::read(&ckpt, &Device::Cpu)
                        .unwrap_or_else(|e| panic!("kill {kills} left a bad checkpoint: {e}"));
                }
                continue;
            }
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        finished = true;
        break;
    }
    assert!(finished, "the run never finished");
    println!("{kills} kills landed");
    assert!(kills >= 4, "only {kills} kills landed");
    let (ta, tb) = (tensors(&a.join("checkpoint.safetensors")), tensors(&ckpt));
    assert_eq!(ta.len(), tb.len());
    for (name, va) in &ta {
        assert!(tb[name] == *va, "{name} differs after {kills} kills");
    }
    assert_eq!(
        metrics(&b),
        metrics(&a),
        "metrics.jsonl after {kills} kills"
    );
    assert_eq!(temp_files(&b), Vec::<String>::new());
}

/// A second run on a folder in use stops at once, naming the holder; once the holder is gone
/// (even by `kill -9`), the folder is free again.
#[test]
fn two_runs_on_one_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut first = spawn(&run_flags(&out, "100000"));
    let lock = out.join(ddpm_train::LOCK_FILE);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.contains("pid")) {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let second = ddpm(
        &run_flags(&out, "2")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let e = stderr(&second);
    assert!(!second.status.success());
    assert!(
        e.contains("in use by another run") && e.contains(&format!("pid {}", first.id())),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it must stop at once"
    );
    // A --resume on the busy folder is refused the same way (once a checkpoint exists).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.join("checkpoint.safetensors").exists() {
        assert!(Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let resumed = ddpm_with("train --resume", &[("--out", out.to_str().unwrap())]);
    assert!(
        stderr(&resumed).contains("in use by another run"),
        "{}",
        stderr(&resumed)
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let after = ddpm_with(
        "train --resume --max-steps 1",
        &[("--out", out.to_str().unwrap())],
    );
    assert!(after.status.success(), "{}", stderr(&after));
}

/// A full disk: every write fails with an error naming the file, exit status non-zero, and
/// the previous file is intact. Injected (`DDPM_FAULT_FULL_DISK`), and on a real 64 KiB tmpfs
/// where `mount` is permitted.
#[test]
fn a_full_disk_is_an_error_and_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("tiny.safetensors");
    tiny_checkpoint(&ckpt);
    let png = dir.path().join("grid.png");
    std::fs::write(&png, b"the previous picture").unwrap();
    let sample = |out: &Path, scale: &str| {
        vec![
            "sample".to_string(),
            "--checkpoint".into(),
            ckpt.to_str().unwrap().into(),
            "--n".into(),
            "4".into(),
            "--steps".into(),
            "1".into(),
            "--scale".into(),
            scale.into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let args = sample(&png, "1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cmd(&args)
        .env(ddpm_core::FAULT_FULL_DISK_ENV, "1")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "reported as written: {e}");
    assert!(e.contains("grid.png") && e.contains("no space left"), "{e}");
    assert_eq!(std::fs::read(&png).unwrap(), b"the previous picture");
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());

    // Training: the checkpoint of the last good write stays.
    let run = dir.path().join("run");
    let o = ddpm(
        &run_flags(&run, "2")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let good = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let metrics_before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let o = cmd(&[
        "train",
        "--resume",
        "--max-steps",
        "4",
        "--out",
        run.to_str().unwrap(),
    ])
    .env(ddpm_core::FAULT_FULL_DISK_ENV, "1")
    .output()
    .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("no space left") && e.contains(run.to_str().unwrap()),
        "{e}"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        good
    );
    let metrics_after = std::fs::read(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics_after.starts_with(&metrics_before),
        "earlier metrics lines are kept"
    );

    // A real full disk, where this machine lets us mount one.
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("skipping the real-tmpfs half: `mount -t tmpfs` is not permitted here");
        return;
    }
    let big = small.join("big.png");
    let args = sample(&big, "8");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ddpm(&args);
    let listing: Vec<String> = std::fs::read_dir(&small)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let _ = Command::new("umount").arg(&small).status();
    let e = stderr(&o);
    assert!(
        !o.status.success(),
        "a grid larger than the disk was reported as written"
    );
    assert!(e.contains("big.png"), "{e}");
    assert!(listing.is_empty(), "left behind: {listing:?}");
}

/// Random truncations and byte flips of real files: reading them gives Ok or a clear error,
/// never a panic (or an allocation that kills the process).
#[test]
fn mutated_dataset_and_checkpoint_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/mnist");
    let mut rng = Rng(42);
    let mutate = |rng: &mut Rng, bytes: &[u8]| -> Vec<u8> {
        let mut b = bytes.to_vec();
        match rng.below(3) {
            0 => b.truncate(rng.below(b.len())),
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
            _ => {
                // Flip bytes in the header, where the sizes live.
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len().min(64));
                    b[i] = rng.next() as u8;
                }
            }
        }
        b
    };
    let labels_gz = std::fs::read(assets.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let mut labels = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&labels_gz[..]),
        &mut labels,
    )
    .unwrap();
    let images_gz = std::fs::read(assets.join("t10k-images-idx3-ubyte.gz")).unwrap();
    let mut images = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&images_gz[..]),
        &mut images,
    )
    .unwrap();
    images.truncate(16 + 50 * 784); // 50 images keep the loop fast
    images[4..8].copy_from_slice(&50u32.to_be_bytes());
    let ckpt = dir.path().join("tiny.safetensors");
    tiny_checkpoint(&ckpt);
    let ckpt_bytes = std::fs::read(&ckpt).unwrap();
    let target = dir.path().join("mutated");
    let (mut ok, mut err) = (0, 0);
    for i in 0..300 {
        let (source, kind) = match i % 4 {
            0 => (&labels_gz, 0),
            1 => (&labels, 0),
            2 => (&images, 1),
            _ => (&ckpt_bytes, 2),
        };
        let bytes = mutate(&mut rng, source);
        std::fs::write(&target, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| match kind {
            0 => ddpm_data::read_idx_labels(&target, 10)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            1 => ddpm_data::read_idx_images(&target)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            _ => checkpoint::read(&target, &Device::Cpu)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    c.unet(ddpm_train::Weights::Ema, &Device::Cpu)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }),
        });
        match outcome {
            Ok(Ok(())) => ok += 1,
            Ok(Err(msg)) => {
                assert!(
                    msg.contains("mutated"),
                    "the error must name the file: {msg}"
                );
                err += 1;
            }
            Err(_) => panic!("mutation {i} of kind {kind} panicked"),
        }
    }
    assert!(
        err > 100,
        "most mutations must be caught ({ok} ok, {err} errors)"
    );
}

/// Sizes from headers and cards are checked before anything is allocated from them.
#[test]
fn crafted_headers_and_cards_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // An IDX header whose n·rows·cols wraps around 64 bits.
    let idx = dir.path().join("wrap-idx3-ubyte");
    let mut bytes = 0x0803u32.to_be_bytes().to_vec();
    for _ in 0..3 {
        bytes.extend(u32::MAX.to_be_bytes());
    }
    bytes.extend([0u8; 64]);
    std::fs::write(&idx, &bytes).unwrap();
    let e = ddpm_data::read_idx_images(&idx).unwrap_err().to_string();
    assert!(
        e.contains("wrap-idx3-ubyte") && e.contains("corrupt"),
        "{e}"
    );
    // One that promises more images than it holds.
    bytes[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
    bytes[8..16].copy_from_slice(&[0, 0, 0, 28, 0, 0, 0, 28]);
    std::fs::write(&idx, &bytes).unwrap();
    let e = ddpm_data::read_idx_images(&idx).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    // Model cards that promise huge images, or disagree with themselves.
    let weights = |card: &ModelCard| {
        let t = Trainer::new(tiny_card(), TrainConfig::default(), &Device::Cpu).unwrap();
        let tensors: Vec<(String, Tensor)> = t
            .optimizer()
            .vars()
            .iter()
            .map(|(n, v)| (format!("ema.{n}"), v.as_tensor().clone()))
            .collect();
        let path = dir.path().join("card.safetensors");
        checkpoint::save(&path, card, None, tensors).unwrap();
        path
    };
    let mut huge = tiny_card();
    huge.data.height = 1 << 30;
    huge.data.width = 1 << 30;
    let mut channels = tiny_card();
    channels.model.in_channels = 3;
    let mut classes = tiny_card();
    classes.data.class_names.truncate(4);
    for (card, needle) in [
        (huge, "image size"),
        (channels, "channels"),
        (classes, "classes"),
    ] {
        let path = weights(&card);
        let e = checkpoint::read(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("card.safetensors") && e.contains(needle), "{e}");
        // And through the binary: one clear error naming the file.
        let o = ddpm_with(
            "sample",
            &[
                ("--checkpoint", path.to_str().unwrap()),
                ("--out", dir.path().join("x.png").to_str().unwrap()),
            ],
        );
        assert!(!o.status.success());
        assert!(stderr(&o).contains("card.safetensors"), "{}", stderr(&o));
    }
}

/// The bad inputs of issue #16, each one clear error (or, for resume, the right data).
#[test]
fn bad_inputs_give_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = d.join("tiny.safetensors");
    tiny_checkpoint(&ckpt);
    let out = |name: &str| d.join(name).to_str().unwrap().to_string();
    let c = ckpt.to_str().unwrap();
    let folder = d.to_str().unwrap();
    let (e0, l0, i0, b, lr, none) = (
        out("e0"),
        out("l0"),
        out("i0"),
        out("b"),
        out("lr"),
        out("none"),
    );
    let (jpg, g, huge) = (out("grid.jpg"), out("g.png"), out("huge.png"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--epochs", "0", "--out", &e0], "--epochs 0"),
        (vec!["train", "--limit", "0", "--out", &l0], "--limit 0"),
        (
            vec!["train", "--image-size", "0", "--out", &i0],
            "--image-size 0",
        ),
        (
            vec!["train", "--batch-size", "10000000", "--out", &b],
            "GiB is",
        ),
        (vec!["train", "--lr", "1e30", "--out", &lr], "--lr"),
        (
            vec!["train", "--resume", "--out", &none],
            "without --resume",
        ),
        (
            vec!["sample", "--checkpoint", c, "--steps", "1", "--out", folder],
            "is a folder",
        ),
        (
            vec!["sample", "--checkpoint", c, "--steps", "1", "--out", &jpg],
            "must end in .png",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                c,
                "--steps",
                "1",
                "--guidance",
                "1e39",
                "--out",
                &g,
            ],
            "f32's range",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                c,
                "--class",
                "all",
                "--n",
                "100000000000",
                "--out",
                &huge,
            ],
            "GiB is available",
        ),
    ];
    for (args, needle) in cases {
        let o = ddpm(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?} exited 0");
        assert!(e.contains(needle), "{args:?}: {e}");
        if needle == "without --resume" {
            // `train` has no --checkpoint flag: the advice must not suggest one.
            assert!(!e.contains("--checkpoint"), "{e}");
        }
    }
    assert!(
        !d.join("none").exists(),
        "a refused --resume creates nothing"
    );
    assert!(!d.join("g.png").exists() && !d.join("grid.jpg").exists());

    // A model whose weights are NaN: an error, never a black picture.
    let nan = d.join("nan.safetensors");
    let t = Trainer::new(tiny_card(), TrainConfig::default(), &Device::Cpu).unwrap();
    for (_, v) in t.optimizer().vars() {
        v.set(&(v.as_tensor().ones_like().unwrap() * f64::NAN).unwrap())
            .unwrap();
    }
    t.save(&nan).unwrap();
    let o = ddpm_with(
        "sample --raw-weights --steps 1",
        &[
            ("--checkpoint", nan.to_str().unwrap()),
            ("--out", &out("nan.png")),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not finite"), "{}", stderr(&o));
    assert!(!d.join("nan.png").exists());
}

/// `--resume` trains on the same data as the run it continues (`--limit` is saved), can lower
/// the learning rate after a divergence, and logs are plain text when not on a terminal.
#[test]
fn resume_keeps_the_limit_and_accepts_a_new_learning_rate() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = ddpm(
        &run_flags(&run, "2")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cmd(&[
        "train",
        "--resume",
        "--max-steps",
        "3",
        "--lr",
        "1e-4",
        "--progress-every",
        "0.000001",
        "--out",
        run.to_str().unwrap(),
    ])
    .env("RUST_LOG", "info")
    .output()
    .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("examples=24"),
        "the resumed run must keep --limit 24: {e}"
    );
    assert!(e.contains("--lr 0.0001"), "{e}");
    assert!(
        !e.contains('\u{1b}'),
        "colour codes in a log that is not a terminal: {e}"
    );
    // Without a terminal the bar is hidden, and plain progress lines say how far it is.
    assert!(
        e.contains("step 3/3 (100 %)"),
        "no plain progress line: {e}"
    );
    let state = checkpoint::read(&run.join("checkpoint.safetensors"), &Device::Cpu)
        .unwrap()
        .train
        .unwrap();
    assert_eq!(state.config.train_limit, Some(24));
    assert_eq!(state.config.lr, 1e-4);
    assert_eq!(state.step, 3);
}

// ---- Issue #24: the hostile-user probe, one test per class of defect. ----

/// A model file holding the tiny model's EMA weights under `card` (which is not validated on
/// the way out: a crafted file).
fn crafted_model(path: &Path, card: &ModelCard) {
    checkpoint::save(path, card, None, ema_tensors()).unwrap();
}

/// The tiny model's initial weights, named as EMA weights (what an export holds).
fn ema_tensors() -> Vec<(String, Tensor)> {
    let t = Trainer::new(tiny_card(), TrainConfig::default(), &Device::Cpu).unwrap();
    t.optimizer()
        .vars()
        .iter()
        .map(|(n, v)| (format!("ema.{n}"), v.as_tensor().clone()))
        .collect()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Class 1: Class names come from model files, which people download: a name that leads out of the
/// `--each` folder or carries terminal escapes is refused when the file is read, and nothing
/// is written anywhere.
#[test]
fn a_crafted_class_name_writes_nothing_outside_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("victim")).unwrap();
    std::fs::write(d.join("victim/evil.png"), b"precious").unwrap();
    for (i, evil) in [
        "/../../victim/evil",
        "../victim",
        "x\u{1b}]0;pwned\u{7}",
        "\u{1b}[2J",
    ]
    .iter()
    .enumerate()
    {
        let mut card = tiny_card();
        card.data.class_names[0] = evil.to_string();
        let model = d.join(format!("crafted{i}.safetensors"));
        crafted_model(&model, &card);
        let each = d.join("each");
        let before = listing(d);
        let o = ddpm_with(
            "sample --class all --n 1 --steps 1",
            &[
                ("--checkpoint", model.to_str().unwrap()),
                ("--each", each.to_str().unwrap()),
                ("--out", d.join("grid.png").to_str().unwrap()),
            ],
        );
        let e = stderr(&o);
        assert!(!o.status.success(), "{evil:?} was accepted");
        assert!(
            e.contains(&format!("crafted{i}.safetensors")) && e.contains("class name"),
            "{evil:?}: {e}"
        );
        assert!(
            !e.contains('\u{1b}'),
            "a raw escape reached the terminal: {e:?}"
        );
        assert_eq!(listing(d), before, "{evil:?} created files");
        assert_eq!(
            std::fs::read(d.join("victim/evil.png")).unwrap(),
            b"precious"
        );
    }
    // The library refuses the same names however it is called.
    let e = ddpm_train::viz::write_each(
        &Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap(),
        Some(&[0]),
        &["../x".to_string()],
        &d.join("each"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("class name"), "{e}");
    assert!(!d.join("x.png").exists() && !d.join("each").exists());
}

/// Class 2: The run lock never follows a symbolic link nor truncates a file it did not make, and its
/// cleanup removes only the temp files of the run's own files, never through a link.
#[test]
fn the_run_lock_and_its_cleanup_touch_only_their_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = d.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let victim = d.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, run.join(ddpm_train::LOCK_FILE)).unwrap();
    let flags = run_flags(&run, "1");
    let o = ddpm(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let e = stderr(&o);
    assert!(!o.status.success(), "a symlinked lock was taken");
    assert!(e.contains("symbolic link") && e.contains(".lock"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // A .lock that is not ours (other content): refused, left as it is.
    std::fs::remove_file(run.join(ddpm_train::LOCK_FILE)).unwrap();
    std::fs::write(run.join(ddpm_train::LOCK_FILE), b"my own notes, not a pid").unwrap();
    let o = ddpm(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a lock file"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(run.join(ddpm_train::LOCK_FILE)).unwrap(),
        b"my own notes, not a pid"
    );
    std::fs::remove_file(run.join(ddpm_train::LOCK_FILE)).unwrap();

    // The cleanup: a user's own `.tmp` files stay, so do temp-like files reached through a
    // `samples` link; a dead writer's temp file of the checkpoint goes.
    let outside = d.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, run.join("samples")).unwrap();
    let keep = [
        run.join(".notes.tmp"),
        run.join(".draft.1.2.tmp"),
        outside.join(".epoch_001.png.999999999.0.tmp"),
    ];
    for k in &keep {
        std::fs::write(k, b"mine").unwrap();
    }
    let stale = run.join(".checkpoint.safetensors.999999999.3.tmp");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let o = ddpm(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    for k in &keep {
        assert_eq!(
            std::fs::read(k).unwrap(),
            b"mine",
            "{} was touched",
            k.display()
        );
    }
    assert!(
        !stale.exists(),
        "the stale temp file of the checkpoint stayed"
    );
}

/// Class 3: `export` never writes over the checkpoint it reads (by any path), and refuses weights
/// that are not finite; so do the other commands that read one file and write another.
#[test]
fn no_command_writes_over_its_input_and_export_refuses_non_finite_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = d.join("ckpt.safetensors");
    tiny_checkpoint(&ckpt);
    let before = std::fs::read(&ckpt).unwrap();
    let other_spelling = d.join(".").join("ckpt.safetensors");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    let via_link = d.join("sub/link.safetensors");
    std::os::unix::fs::symlink(&ckpt, &via_link).unwrap();
    for out in [&ckpt, &other_spelling, &via_link] {
        let o = ddpm_with(
            "export",
            &[
                ("--checkpoint", ckpt.to_str().unwrap()),
                ("--out", out.to_str().unwrap()),
            ],
        );
        assert!(
            !o.status.success(),
            "export onto its input ({})",
            out.display()
        );
        assert!(stderr(&o).contains("destroy the input"), "{}", stderr(&o));
        assert_eq!(std::fs::read(&ckpt).unwrap(), before);
    }
    // sample's and reconstruct's outputs, eval's report over a report it replots.
    let c = ckpt.to_str().unwrap();
    let o = ddpm_with(
        "sample --steps 1 --n 1",
        &[("--checkpoint", c), ("--npz", c)],
    );
    assert!(!o.status.success() && stderr(&o).contains("destroy the input"));
    let o = ddpm_with("reconstruct --t 5", &[("--checkpoint", c), ("--out", c)]);
    assert!(!o.status.success() && stderr(&o).contains("destroy the input"));
    let report_dir = d.join("eval");
    std::fs::create_dir_all(&report_dir).unwrap();
    let report = report_dir.join("report.json");
    std::fs::write(&report, b"{\"a report\": true}").unwrap();
    let o = ddpm_with(
        "eval",
        &[
            ("--replot", report.to_str().unwrap()),
            ("--out", report_dir.to_str().unwrap()),
        ],
    );
    assert!(!o.status.success() && stderr(&o).contains("destroy the input"));
    assert_eq!(std::fs::read(&report).unwrap(), b"{\"a report\": true}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before);

    // NaN EMA weights: no export at all.
    let nan = d.join("nan.safetensors");
    let tensors: Vec<(String, Tensor)> = ema_tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.ones_like().unwrap() * f64::NAN).unwrap()))
        .collect();
    checkpoint::save(&nan, &tiny_card(), None, tensors).unwrap();
    let out = d.join("export.safetensors");
    let o = ddpm_with(
        "export",
        &[
            ("--checkpoint", nan.to_str().unwrap()),
            ("--out", out.to_str().unwrap()),
        ],
    );
    assert!(!o.status.success(), "NaN weights exported");
    assert!(stderr(&o).contains("NaN or infinite"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// `ddpm args`, killed and failed if it runs past `secs` (a hang is a failure, not a stall).
fn ddpm_within(args: &[&str], secs: u64) -> Output {
    let mut child = cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{args:?} hung for {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

fn step_of(ckpt: &Path) -> u64 {
    checkpoint::read(ckpt, &Device::Cpu)
        .unwrap()
        .train
        .unwrap()
        .step
}

/// Waits until `path` holds a checkpoint (and returns its step).
fn wait_for_checkpoint(path: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(c) = checkpoint::read(path, &Device::Cpu) {
            return c.train.unwrap().step;
        }
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Classes 4 and 5: SIGTERM and SIGHUP stop a run as Ctrl-C does (finish the step, save, exit
/// non-zero); a plain `--resume` continues the saved plan to the same weights as an
/// uninterrupted run; resuming a finished run changes nothing.
#[test]
fn signals_save_and_plain_resume_continues_the_saved_plan() {
    const STEPS: &str = "150";
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let o = ddpm(
        &run_flags(&a, STEPS)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = b.join("checkpoint.safetensors");
    let plain_resume = vec![
        "train".to_string(),
        "--resume".into(),
        "--out".into(),
        b.to_str().unwrap().into(),
    ];
    let mut stopped_at = Vec::new();
    for (sig, args) in [
        ("-TERM", run_flags(&b, STEPS)),
        ("-HUP", plain_resume.clone()),
    ] {
        let child = spawn(&args);
        let before = if stopped_at.is_empty() {
            0
        } else {
            step_of(&ckpt)
        };
        // Wait for a checkpoint newer than the last stop, then signal.
        let deadline = Instant::now() + Duration::from_secs(120);
        while wait_for_checkpoint(&ckpt) <= before {
            assert!(Instant::now() < deadline, "the run made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sig}: exit 0 after a stop: {e}");
        assert!(e.contains("stopped by a signal"), "{sig}: {e}");
        let at = step_of(&ckpt);
        assert!(at > before && at < 150, "{sig}: stopped at step {at}");
        stopped_at.push(at);
    }
    // Plain --resume: the saved max steps, the same learning-rate schedule.
    let o = ddpm(&plain_resume.iter().map(String::as_str).collect::<Vec<_>>());
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert_eq!(step_of(&ckpt), 150, "stopped at {stopped_at:?}");
    let (ta, tb) = (tensors(&a.join("checkpoint.safetensors")), tensors(&ckpt));
    for (name, va) in &ta {
        assert!(tb[name] == *va, "{name} differs after a plain resume");
    }
    assert_eq!(metrics(&b), metrics(&a));
    // A finished run, resumed: complete, nothing changed.
    let (ck, mx) = (
        std::fs::read(&ckpt).unwrap(),
        std::fs::read(b.join("metrics.jsonl")).unwrap(),
    );
    let o = cmd(&plain_resume.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(said.contains("already complete"), "{said}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), ck);
    assert_eq!(std::fs::read(b.join("metrics.jsonl")).unwrap(), mx);
}

/// Class 5: The epoch-end grid is drawn after the epoch's checkpoint and a stop interrupts it: the
/// epoch is saved, and the resumed run draws the grid it did not finish.
#[test]
fn a_stop_during_the_epoch_grid_keeps_the_epoch_and_the_grid_comes_later() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut flags = run_flags(&run, "6");
    // One epoch is 3 steps; a grid of 10 rows at 40 guided steps takes far longer.
    for (flag, value) in [
        ("--sample-every", "1"),
        ("--sample-steps", "40"),
        ("--checkpoint-every", "0"),
    ] {
        let i = flags.iter().position(|f| f == flag).unwrap_or(flags.len());
        if i < flags.len() {
            flags[i + 1] = value.into();
        } else {
            flags.extend([flag.to_string(), value.to_string()]);
        }
    }
    let child = spawn(&flags);
    let ckpt = run.join("checkpoint.safetensors");
    assert_eq!(
        wait_for_checkpoint(&ckpt),
        3,
        "the epoch's checkpoint comes first"
    );
    let grid = run.join("samples/epoch_001.png");
    assert!(!grid.exists(), "the grid was drawn before the checkpoint");
    signal(&child, "-TERM");
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the grid was not interrupted"
    );
    assert_eq!(step_of(&ckpt), 3, "{e}");
    assert!(!grid.exists(), "an interrupted grid was written");
    let o = ddpm_with(
        "train --resume --max-steps 3",
        &[("--out", run.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        grid.exists(),
        "the resumed run did not draw the missing grid"
    );
    assert_eq!(step_of(&ckpt), 3);
}

/// Class 6: Sizes from flags, cards, headers and the process's limits are checked before anything
/// is allocated: one clear error, never an abort or a panic.
#[test]
fn sizes_are_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = d.join("tiny.safetensors");
    tiny_checkpoint(&ckpt);
    let c = ckpt.to_str().unwrap();
    let png = d.join("x.png");
    let p = png.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["train", "--timesteps", "100000000", "--out", p],
            "timesteps",
        ),
        (
            vec!["train", "--timesteps", "4294967296", "--out", p],
            "timesteps",
        ),
        (vec!["noise", "--scale", "4294967296", "--out", p], "scale"),
        (
            vec!["noise", "--index", "18446744073709551615", "--out", p],
            "--index",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                c,
                "--steps",
                "1",
                "--scale",
                "100000",
                "--out",
                p,
            ],
            "scale",
        ),
        (
            vec!["bench", "--mode", "forward", "--image-size", "1000000"],
            "image size",
        ),
        (
            vec!["bench", "--mode", "train", "--batch", "100000000"],
            "GiB",
        ),
        (
            vec!["train-classifier", "--batch-size", "100000000", "--out", p],
            "batch_size",
        ),
        (
            vec![
                "train-classifier",
                "--max-shift",
                "18446744073709551615",
                "--out",
                p,
            ],
            "max_shift",
        ),
    ];
    for (args, needle) in cases {
        let started = Instant::now();
        let o = ddpm_within(&args, 60);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?} exited 0");
        assert!(
            !e.contains("panicked") && !e.contains("memory allocation"),
            "{args:?}: {e}"
        );
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{args:?} was slow to refuse"
        );
    }
    assert!(!png.exists());
    // Under an address-space limit (ulimit -v) the memory check counts what is left there,
    // not the machine's MemAvailable: a request that fits the machine but not the limit is
    // refused with a message.
    let script = format!(
        "ulimit -v 3000000 && exec {} sample --checkpoint {c} --class all --n 100000 --batch 8 \
         --steps 1 --out {p}",
        env!("CARGO_BIN_EXE_ddpm")
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("address-space limit") || e.contains("cgroup"),
        "{e}"
    );
    assert!(!e.contains("memory allocation"), "{e}");
}

/// Class 7: Inputs must be regular files (no hang on a FIFO, no endless read of a device), weights
/// must be floating point, and a card's classes must be unique.
#[test]
fn special_files_and_odd_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("model.safetensors");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = d.join("x.png");
    for (input, needle) in [
        (fifo.as_path(), "FIFO"),
        (Path::new("/dev/zero"), "device"),
        (d, "folder"),
    ] {
        let started = Instant::now();
        let o = ddpm_within(
            &[
                "sample",
                "--steps",
                "1",
                "--checkpoint",
                input.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            30,
        );
        assert!(!o.status.success());
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    // A data folder whose IDX file is a FIFO.
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    assert!(Command::new("mkfifo")
        .arg(data.join("train-images-idx3-ubyte.gz"))
        .status()
        .unwrap()
        .success());
    let o = ddpm_with(
        "train --max-steps 1 --budget off",
        &[
            ("--data-dir", data.to_str().unwrap()),
            ("--out", d.join("run").to_str().unwrap()),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
    // A refused new run leaves no folder behind that it created.
    assert!(
        !d.join("run").exists(),
        "the refused run left its --out folder"
    );

    // A weight that is not a float.
    let mut tensors = ema_tensors();
    let (name, first) = tensors[0].clone();
    tensors[0] = (
        name,
        first.ones_like().unwrap().to_dtype(DType::U8).unwrap(),
    );
    let ints = d.join("ints.safetensors");
    checkpoint::save(&ints, &tiny_card(), None, tensors).unwrap();
    let o = ddpm_with(
        "sample --steps 1",
        &[
            ("--checkpoint", ints.to_str().unwrap()),
            ("--out", out.to_str().unwrap()),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("floating point"), "{}", stderr(&o));

    // Classes named twice.
    let mut card = tiny_card();
    card.data.class_names[1] = "0".into();
    let twice = d.join("twice.safetensors");
    crafted_model(&twice, &card);
    let o = ddpm_with(
        "sample --steps 1",
        &[
            ("--checkpoint", twice.to_str().unwrap()),
            ("--out", out.to_str().unwrap()),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("twice"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// Class 8: Messages name the real problem: a negative learning rate, an output folder that is a
/// file.
#[test]
fn messages_name_the_real_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = ddpm_with(
        "train --lr -1e-3",
        &[("--out", d.join("r").to_str().unwrap())],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("positive") && !e.contains("unexpected argument"),
        "{e}"
    );
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for args in [
        vec!["train", "--out", file.to_str().unwrap()],
        vec![
            "eval",
            "--replot",
            "none.json",
            "--out",
            file.to_str().unwrap(),
        ],
    ] {
        let o = ddpm(&args);
        let e = stderr(&o);
        assert!(!o.status.success());
        assert!(
            e.contains("is a file, not a folder") && !e.contains("File exists"),
            "{args:?}: {e}"
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}
