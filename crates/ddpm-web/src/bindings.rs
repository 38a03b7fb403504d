//! The JavaScript face of [`Session`](crate::Session), through `wasm-bindgen`: settings and
//! answers as JSON strings, pixels as `Uint8Array`s. web/worker.js is its one caller.

use wasm_bindgen::prelude::*;

use crate::{Digits, Session, Settings, WebError};

/// A model loaded in the page's worker.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Generator {
    session: Session,
}

fn js(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

#[wasm_bindgen]
impl Generator {
    /// Loads a model file's bytes (what `fetch` returned).
    #[wasm_bindgen(constructor)]
    pub fn new(bytes: &[u8]) -> Result<Generator, JsError> {
        Ok(Self {
            session: Session::from_bytes(bytes).map_err(js)?,
        })
    }

    /// The model's [`ModelInfo`](crate::ModelInfo), as JSON.
    pub fn info(&self) -> Result<String, JsError> {
        serde_json::to_string(&self.session.info()).map_err(js)
    }

    /// Samples with `settings` (a [`Settings`] as JSON). Calls `on_frame(step, total, start,
    /// len, pixels)` after every step with the batch's predicted x₀ (a `Uint8Array`,
    /// `[len, C, H, W]`); an exception from it stops generation.
    pub fn generate(&self, settings: &str, on_frame: &js_sys::Function) -> Result<Drawn, JsError> {
        let settings: Settings = serde_json::from_str(settings)
            .map_err(|e| js(format!("settings: not valid settings JSON: {e}")))?;
        let digits = self
            .session
            .generate(&settings, &mut |f| {
                let args = js_sys::Array::of5(
                    &JsValue::from(f.step as u32),
                    &JsValue::from(f.total as u32),
                    &JsValue::from(f.start as u32),
                    &JsValue::from(f.len as u32),
                    &js_sys::Uint8Array::from(f.pixels).into(),
                );
                on_frame
                    .apply(&JsValue::NULL, &args)
                    .map(|_| ())
                    .map_err(|e| {
                        WebError::Tensor(candle_core::Error::Msg(format!(
                            "the page's frame callback failed: {e:?}"
                        )))
                    })
            })
            .map_err(js)?;
        Ok(Drawn(digits))
    }
}

/// What [`Generator::generate`] drew.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Drawn(Digits);

#[wasm_bindgen]
impl Drawn {
    /// The samples' pixels, `[N, C, H, W]` in `0..=255`.
    pub fn pixels(&self) -> Vec<u8> {
        self.0.pixels.clone()
    }

    /// The class of each sample.
    pub fn labels(&self) -> Vec<u32> {
        self.0.labels.clone()
    }

    /// Samples per row of the grid `ddpm sample` would write.
    pub fn per_row(&self) -> usize {
        self.0.per_row
    }
}
