// The page: controls, the canvas that shows the digits forming, the final grid and its PNG.
// The model runs in worker.js; this file only draws. `window.ddpm` carries the last run's
// figures for the browser test (web/test/browser.mjs).

const $ = (id) => document.getElementById(id);
const view = $("view");
const native = $("native");
const status = $("status");
const worker = new Worker(new URL("worker.js", import.meta.url), { type: "module" });

// Ten digits a row: a class button draws ten of that class, "all ten" one of each.
const PER_ROW = 10;
let info = null;
let run = 0;
let current = null;
const ddpm = (window.ddpm = { ready: false, runs: [], errors: [] });

function setState(state, text) {
  document.body.dataset.state = state;
  if (text !== undefined) status.textContent = text;
}

// Theme: the system's unless the reader picked one (remembered).
const root = document.documentElement;
const savedTheme = localStorage.getItem("ddpm-theme");
if (savedTheme) root.dataset.theme = savedTheme;
$("theme").addEventListener("click", () => {
  const dark = root.dataset.theme
    ? root.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  root.dataset.theme = dark ? "light" : "dark";
  localStorage.setItem("ddpm-theme", root.dataset.theme);
});

$("guidance").addEventListener("input", () => {
  $("guidance-value").textContent = Number($("guidance").value).toFixed(2);
});
$("reseed").addEventListener("click", () => {
  $("seed").value = String(Math.floor(Math.random() * 1e6));
});

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  select.appendChild(o);
}

function setup(i) {
  info = i;
  const [c, h, w] = i.dims;
  if (c !== 1) throw new Error(`the page draws one-channel digits; this model has ${c} channels`);
  view.width = PER_ROW * w * 3;
  view.height = h * 3;
  native.width = PER_ROW * w;
  native.height = h;
  const classes = $("classes");
  i.classes.forEach((name, k) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = name;
    b.dataset.class = String(k);
    b.title = `draw ten of class ${name}`;
    classes.appendChild(b);
  });
  const all = document.createElement("button");
  all.type = "button";
  all.textContent = "all ten";
  all.dataset.class = "all";
  all.title = "draw one of each class";
  classes.appendChild(all);
  classes.addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (b && !b.disabled) generate(b.dataset.class, b);
  });
  for (const s of i.samplers) option($("sampler"), s, s);
  $("sampler").value = i.sampler;
  for (const s of i.spacings) option($("spacing"), s, s);
  $("spacing").value = i.spacing;
  $("steps").value = String(i.steps);
  if (i.w_range) {
    $("guidance").min = String(i.w_range[0]);
    $("guidance").max = String(i.w_range[1]);
  }
  $("guidance-value").textContent = Number($("guidance").value).toFixed(2);
  const kind = i.distilled
    ? `a distilled student (w is an input: one network call per step, w in [${i.w_range[0]}, ${i.w_range[1]}])`
    : "a guided model (two network calls per step)";
  $("model-info").textContent =
    `Model: ${kind}; default ${i.sampler}, ${i.steps} steps, ${i.spacing} spacing: ` +
    `${i.calls_per_digit} network calls per digit.`;
}

function busy(on) {
  for (const b of $("classes").querySelectorAll("button")) b.disabled = on;
}

// Grayscale [len, 1, h, w] pixels into the canvas, cell by cell from `start`, at `scale`.
function paint(canvas, pixels, start, len, scale) {
  const [, h, w] = info.dims;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const cell = document.createElement("canvas");
  cell.width = w;
  cell.height = h;
  const cctx = cell.getContext("2d");
  for (let k = 0; k < len; k++) {
    for (let p = 0; p < h * w; p++) {
      const v = pixels[k * h * w + p];
      img.data[4 * p] = v;
      img.data[4 * p + 1] = v;
      img.data[4 * p + 2] = v;
      img.data[4 * p + 3] = 255;
    }
    cctx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(cell, (start + k) * w * scale, 0, w * scale, h * scale);
  }
}

function generate(cls, button) {
  for (const b of $("classes").querySelectorAll("button")) b.classList.toggle("active", b === button);
  const settings = {
    class: cls,
    n: cls === "all" ? 1 : PER_ROW,
    guidance: Number($("guidance").value),
    seed: Number($("seed").value),
    sampler: $("sampler").value,
    steps: Number($("steps").value),
    spacing: $("spacing").value,
    // One digit at a time: the first shows as soon as it is done (the deterministic
    // samplers draw the same digits whatever the batch).
    batch: 1,
  };
  const id = ++run;
  current = { id, settings, t0: performance.now(), firstDigitMs: null };
  view.getContext("2d").clearRect(0, 0, view.width, view.height);
  $("download").hidden = true;
  $("timing").textContent = "";
  busy(true);
  setState("running", `Drawing ${cls === "all" ? "one of each class" : `ten of class ${info.classes[cls]}`}…`);
  worker.postMessage({ type: "generate", id, settings });
}

worker.onmessage = (event) => {
  const m = event.data;
  if (m.type === "ready") {
    setup(m.info);
    ddpm.ready = true;
    ddpm.model = { bytes: m.bytes, cached: m.cached, info: m.info };
    setState("ready", "Pick a class.");
    return;
  }
  if (m.type === "error") {
    ddpm.errors.push(m.message);
    busy(false);
    setState("error", `Error: ${m.message}`);
    return;
  }
  if (!current || m.id !== current.id) return;
  if (m.type === "frame") {
    paint(view, m.pixels, m.start, m.len, 3);
    if (m.step + 1 === m.total && m.start === 0 && current.firstDigitMs === null) {
      current.firstDigitMs = performance.now() - current.t0;
    }
  } else if (m.type === "done") {
    const ms = performance.now() - current.t0;
    paint(view, m.pixels, 0, m.labels.length || PER_ROW, 3);
    paint(native, m.pixels, 0, m.labels.length || PER_ROW, 1);
    const calls = info.distilled ? current.settings.steps : 2 * current.settings.steps;
    $("timing").textContent =
      `First digit ${(current.firstDigitMs / 1000).toFixed(2)} s, the row of ten ${(ms / 1000).toFixed(2)} s ` +
      `(${calls} network calls per digit; ${current.settings.sampler}, ${current.settings.steps} steps, ` +
      `w = ${current.settings.guidance}, seed ${current.settings.seed}).`;
    native.toBlob((blob) => {
      const a = $("download");
      if (a.href) URL.revokeObjectURL(a.href);
      a.href = URL.createObjectURL(blob);
      a.hidden = false;
    }, "image/png");
    ddpm.runs.push({
      settings: current.settings,
      labels: m.labels,
      firstDigitMs: current.firstDigitMs,
      rowMs: ms,
      workerMs: m.ms,
    });
    busy(false);
    setState("done", "Done. Pick a class to draw again.");
  }
};
worker.onerror = (e) => {
  ddpm.errors.push(String(e.message));
  setState("error", `Error: ${e.message}`);
};
