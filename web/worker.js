// The page's model runs here, off the main thread: ddpm-web compiled to WebAssembly
// (pkg/, made by `cargo xtask web`). Messages in: {type: "generate", id, settings}.
// Messages out: {type: "ready", info, bytes, cached} once the model is loaded, then per run
// {type: "frame", id, step, total, start, len, pixels} after every step and
// {type: "done", id, pixels, labels, perRow, ms}, or {type: "error", id, message}.
import init, { Generator } from "./pkg/ddpm_web.js";

const MODEL_URL = new URL("model.safetensors", self.location.href).href;
// Bump with the model file: a new name makes the cache fetch it again.
const CACHE = "ddpm-rs-model-v1";

// The model's bytes: from the Cache API when an earlier visit stored them, else fetched once
// and stored. Where the Cache API is missing (it needs a secure context; localhost is one),
// the browser's HTTP cache is all there is.
async function modelBytes() {
  let cache = null;
  try {
    cache = self.caches ? await self.caches.open(CACHE) : null;
  } catch (_) {
    cache = null;
  }
  let cached = false;
  let response = cache ? await cache.match(MODEL_URL) : undefined;
  if (response) {
    cached = true;
  } else {
    response = await fetch(MODEL_URL);
    if (!response.ok) {
      throw new Error(`fetching ${MODEL_URL}: HTTP ${response.status}; rebuild the page with cargo xtask web`);
    }
    if (cache) await cache.put(MODEL_URL, response.clone());
  }
  return { bytes: new Uint8Array(await response.arrayBuffer()), cached };
}

let generator = null;

async function start() {
  try {
    await init();
    const { bytes, cached } = await modelBytes();
    generator = new Generator(bytes);
    self.postMessage({ type: "ready", info: JSON.parse(generator.info()), bytes: bytes.length, cached });
  } catch (e) {
    self.postMessage({ type: "error", id: null, message: String(e && e.message ? e.message : e) });
  }
}

self.onmessage = (event) => {
  const msg = event.data;
  if (msg.type !== "generate" || !generator) return;
  const t0 = performance.now();
  try {
    const drawn = generator.generate(JSON.stringify(msg.settings), (step, total, start, len, pixels) => {
      self.postMessage({ type: "frame", id: msg.id, step, total, start, len, pixels, ms: performance.now() - t0 });
    });
    const pixels = drawn.pixels();
    const labels = Array.from(drawn.labels());
    const perRow = drawn.per_row();
    drawn.free();
    self.postMessage({ type: "done", id: msg.id, pixels, labels, perRow, ms: performance.now() - t0 });
  } catch (e) {
    self.postMessage({ type: "error", id: msg.id, message: String(e && e.message ? e.message : e) });
  }
};

start();
