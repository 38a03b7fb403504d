//! The page's library on the host: the settings it refuses (each naming its field), the frames
//! it hands out, and the digits: the same whatever the batch, and `ddpm sample`'s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use ddpm_pipeline::{Model, SampleOptions, Weights};
use ddpm_web::{Session, Settings, WebError};

fn student() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/ddpm-small-student.safetensors")
}

fn session() -> Session {
    Session::from_bytes(&std::fs::read(student()).unwrap()).unwrap()
}

fn err(s: &Session, settings: Settings) -> String {
    s.generate(&settings, &mut |_| Ok(()))
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_bytes_and_bad_settings_name_what_is_wrong() {
    let e = Session::from_bytes(b"not a model").unwrap_err().to_string();
    assert!(e.contains(ddpm_web::MODEL_NAME), "{e}");
    let mut bytes = std::fs::read(student()).unwrap();
    bytes.truncate(bytes.len() / 2);
    let e = Session::from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    let s = session();
    let base = Settings::default();
    let cases = [
        (
            Settings {
                sampler: Some("euler".into()),
                ..base.clone()
            },
            "settings.sampler",
        ),
        (
            Settings {
                sampler: Some("ddpm".into()),
                ..base.clone()
            },
            "deterministic",
        ),
        (
            Settings {
                spacing: Some("cosine".into()),
                ..base.clone()
            },
            "settings.spacing",
        ),
        (
            Settings {
                batch: Some(0),
                ..base.clone()
            },
            "settings.batch",
        ),
        (
            Settings {
                class: "10".into(),
                ..base.clone()
            },
            "class",
        ),
        (
            Settings {
                guidance: 9.0,
                ..base.clone()
            },
            "[0, 4]",
        ),
        (Settings { n: 0, ..base }, "at least one"),
    ];
    for (settings, want) in cases {
        let e = err(&s, settings.clone());
        assert!(e.contains(want), "{settings:?}: {e}");
    }
    // Unknown JSON fields are refused too (a misspelt setting must not be ignored).
    assert!(serde_json::from_str::<Settings>(r#"{"clas": "7"}"#).is_err());
}

#[test]
fn frames_cover_every_step_of_every_batch_and_the_digits_do_not_depend_on_the_batch() {
    let s = session();
    let info = s.info();
    assert_eq!(info.calls_per_digit, 4);
    assert_eq!(info.w_range, Some((0.0, 4.0)));
    let settings = Settings {
        class: "3".into(),
        n: 3,
        guidance: 2.0,
        seed: 11,
        batch: Some(1),
        ..Settings::default()
    };
    let mut seen = Vec::new();
    let one_at_a_time = s
        .generate(&settings, &mut |f| {
            assert_eq!(f.pixels.len(), f.len * 28 * 28);
            seen.push((f.start, f.step, f.total));
            Ok(())
        })
        .unwrap();
    let want: Vec<_> = (0..3)
        .flat_map(|start| (0..4).map(move |step| (start, step, 4)))
        .collect();
    assert_eq!(seen, want);
    let together = s
        .generate(
            &Settings {
                batch: None,
                ..settings.clone()
            },
            &mut |_| Ok(()),
        )
        .unwrap();
    assert_eq!(together.labels, vec![3, 3, 3]);
    assert_eq!(one_at_a_time.pixels, together.pixels);

    // `ddpm sample --class 3 --n 3 --guidance 2 --seed 11` on the same file: the same pixels.
    let model = Model::load(&student(), Weights::Ema, &Device::Cpu).unwrap();
    let plan = SampleOptions {
        class: "3".into(),
        guidance: 2.0,
        sweep: Vec::new(),
        n: 3,
        batch: None,
        steps: None,
        sampler: None,
        spacing: None,
        eta: 0.0,
        seed: 11,
        no_clip: false,
    }
    .resolve(&model, 1, false)
    .unwrap();
    let x0 = ddpm_pipeline::generate_with(&model, &plan.request, &mut |_| Ok(())).unwrap();
    assert_eq!(ddpm_core::to_u8(&x0).unwrap(), together.pixels);
}

#[test]
fn an_error_from_the_frame_callback_stops_generation_and_comes_back() {
    let s = session();
    let mut calls = 0;
    let e = s
        .generate(&Settings::default(), &mut |_| {
            calls += 1;
            Err(WebError::Settings {
                field: "class",
                reason: "stopped by the page".into(),
            })
        })
        .unwrap_err();
    assert_eq!(calls, 1);
    assert!(e.to_string().contains("stopped by the page"), "{e}");
}
