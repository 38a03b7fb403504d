// The browser test of the page (run by `cargo xtask web --test`): opens the served page in
// headless Chromium, clicks a class, waits for the row of ten, takes a screenshot and writes
// what the Rust side checks (crates/ddpm-web/tests/browser.rs) to OUTDIR/result.json: the
// drawn digits' pixels read back from the page's canvas, the timings, the page's weight, and
// every console error and uncaught exception.
//
//   node web/test/browser.mjs URL OUTDIR [CLASS]
import { chromium } from "playwright-core";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [url, out, cls = "7"] = process.argv.slice(2);
if (!url || !out) {
  console.error("usage: node web/test/browser.mjs URL OUTDIR [CLASS]");
  process.exit(2);
}
mkdirSync(out, { recursive: true });
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
// A fresh profile every run; the flags keep Chromium off the network it cannot reach here.
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const consoleErrors = [];
const pageErrors = [];
const failedRequests = [];
let pageBytes = 0;
const bytesByFile = {};
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("requestfailed", (r) => failedRequests.push(`${r.url()}: ${r.failure()?.errorText}`));
  // Every response the page and its worker fetch, by size: the page's weight.
  page.context().on("response", async (r) => {
    try {
      const body = await r.body();
      pageBytes += body.length;
      bytesByFile[new URL(r.url()).pathname] = body.length;
    } catch (_) {
      // Redirects and aborted requests have no body.
    }
  });
  const t0 = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => window.ddpm && (window.ddpm.ready || window.ddpm.errors.length), null, {
    timeout: 120_000,
  });
  const loadMs = Date.now() - t0;
  const loadErrors = await page.evaluate(() => window.ddpm.errors);
  if (loadErrors.length) throw new Error(`the page did not load its model: ${loadErrors.join("; ")}`);
  await page.click(`#classes button[data-class="${cls}"]`);
  await page.waitForFunction(() => window.ddpm.runs.length > 0 || window.ddpm.errors.length, null, {
    timeout: 300_000,
  });
  const state = await page.evaluate(() => ({
    run: window.ddpm.runs[0] || null,
    errors: window.ddpm.errors,
    model: window.ddpm.model,
  }));
  if (!state.run) throw new Error(`the page failed: ${state.errors.join("; ")}`);
  await page.screenshot({ path: join(out, "page.png"), fullPage: true });
  const grid = await page.evaluate(() => {
    const c = document.getElementById("native");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    const gray = [];
    for (let i = 0; i < d.length; i += 4) gray.push(d[i]);
    return { width: c.width, height: c.height, gray };
  });
  // The first visit's weight, before the reload below fetches the page (not the model) again.
  const firstVisitBytes = pageBytes;
  const firstVisitFiles = { ...bytesByFile };
  // A reload must take the model from the Cache API, not the network.
  await page.reload();
  await page.waitForFunction(() => window.ddpm && (window.ddpm.ready || window.ddpm.errors.length), null, {
    timeout: 120_000,
  });
  const cachedOnReload = await page.evaluate(() => Boolean(window.ddpm.model && window.ddpm.model.cached));
  const result = {
    url,
    class: cls,
    chromium: browser.version(),
    settings: state.run.settings,
    labels: state.run.labels,
    modelLoadMs: loadMs,
    firstDigitMs: state.run.firstDigitMs,
    rowMs: state.run.rowMs,
    pageBytes: firstVisitBytes,
    bytesByFile: firstVisitFiles,
    modelCached: state.model.cached,
    modelCachedOnReload: cachedOnReload,
    width: grid.width,
    height: grid.height,
    pixels: grid.gray,
    consoleErrors,
    pageErrors,
    failedRequests,
  };
  writeFileSync(join(out, "result.json"), JSON.stringify(result));
  console.log(
    `browser: ${result.chromium}; model loaded in ${loadMs} ms; first digit ${Math.round(result.firstDigitMs)} ms, ` +
      `row of ten ${Math.round(result.rowMs)} ms; page ${firstVisitBytes} bytes; ` +
      `${consoleErrors.length} console errors, ${pageErrors.length} uncaught exceptions`,
  );
} finally {
  await browser.close();
}
if (consoleErrors.length || pageErrors.length || failedRequests.length) {
  console.error("console errors:", consoleErrors, "uncaught:", pageErrors, "failed requests:", failedRequests);
  process.exit(1);
}
