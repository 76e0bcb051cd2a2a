// Drives the Pulsebell dashboard in Debian's headless Chromium with
// playwright-core (no browser download). Run by the Rust test
// `dashboard_in_a_real_browser` (tests/tests/operators.rs), which starts a
// collector and two agents and passes:
//
//   ADMIN_URL     http://127.0.0.1:PORT of the admin listener
//   ADMIN_TOKEN   the admin token
//   ARTIFACT_DIR  where fleet.png and device.png go
//   LAB_DEVICE    the device tagged `lab` (the one that gets killed)
//   OTHER_DEVICE  the untagged device
//   CHROMIUM      browser binary [default: /usr/bin/chromium]
//   PROFILE_DIR   a fresh profile directory [default: a new temp dir]
//
// Protocol on stdout: `READY_TO_KILL <device>` once both rows are online
// and the tag filter works; the Rust side then stops that agent and this
// script waits for the row to turn offline without a reload. Also prints
// `PAGE_LOAD_MS ...` and, at the very end, `DASHBOARD_OK`. Exit 0 on success.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`environment variable ${name} is not set`);
  return v;
};
const ADMIN_URL = env("ADMIN_URL").replace(/\/$/, "");
const TOKEN = env("ADMIN_TOKEN");
const ARTIFACT_DIR = env("ARTIFACT_DIR");
const LAB = env("LAB_DEVICE");
const OTHER = env("OTHER_DEVICE");
const CHROMIUM = env("CHROMIUM", "/usr/bin/chromium");
const PROFILE_DIR = process.env.PROFILE_DIR || fs.mkdtempSync(path.join(os.tmpdir(), "pulsebell-chromium-"));
const TIMEOUT = 20_000;

const log = (...args) => console.log(...args);
function check(cond, message) {
  if (!cond) throw new Error("check failed: " + message);
}
const row = id => `tr.device[data-id="${id}"]`;

fs.mkdirSync(ARTIFACT_DIR, { recursive: true });
fs.mkdirSync(PROFILE_DIR, { recursive: true });

// The whole run may not take longer than this.
const guard = setTimeout(() => {
  console.error("dashboard.mjs: giving up after 150 s");
  process.exit(3);
}, 150_000);

const context = await chromium.launchPersistentContext(PROFILE_DIR, {
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1280, height: 800 },
});
const pageErrors = [];
let failed = false;
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", e => pageErrors.push(String(e)));
  page.on("console", m => {
    if (m.type() === "error") log(`console error: ${m.text()}`);
  });
  page.on("response", r => {
    if (r.status() >= 400) log(`HTTP ${r.status()} ${r.request().method()} ${new URL(r.url()).pathname}`);
  });

  // 1. Sign in.
  await page.goto(`${ADMIN_URL}/`);
  check(new URL(page.url()).pathname === "/login", `/ without a cookie must lead to /login, got ${page.url()}`);
  await page.fill("#token", "wrong-token");
  await Promise.all([page.waitForLoadState("load"), page.click('button[type="submit"]')]);
  check((await page.content()).includes("not the admin token"), "a wrong token is refused with a message");
  await page.goto(`${ADMIN_URL}/login`);
  await page.fill("#token", TOKEN);
  await Promise.all([page.waitForURL(`${ADMIN_URL}/`), page.click('button[type="submit"]')]);
  await page.waitForLoadState("load");

  // 2. The fleet: both devices online.
  for (const id of [LAB, OTHER]) {
    await page.waitForSelector(`${row(id)}[data-state="online"]`);
    const cell = page.locator(`${row(id)} td.state`);
    check((await cell.textContent()).trim() === "online", `${id}: state cell says online`);
    check(await cell.evaluate(el => el.classList.contains("online")), `${id}: state cell has class online`);
  }
  const timing = await page.evaluate(() => {
    const n = performance.getEntriesByType("navigation")[0];
    return {
      ttfb: n.responseStart - n.startTime,
      dcl: n.domContentLoadedEventEnd - n.startTime,
      load: n.loadEventEnd - n.startTime,
      bytes: n.transferSize,
      fleetVisibleBy: performance.now(),
    };
  });
  log(
    `PAGE_LOAD_MS load=${timing.load.toFixed(1)} domcontentloaded=${timing.dcl.toFixed(1)} ` +
      `ttfb=${timing.ttfb.toFixed(1)} transfer_bytes=${timing.bytes} fleet_rows_seen_by=${timing.fleetVisibleBy.toFixed(0)}`,
  );
  const summary = await page.textContent("#summary");
  check(/2 devices · 2 online/.test(summary), `summary says 2 devices, 2 online: "${summary}"`);
  await page.waitForSelector("#live.on");

  // 3. The tag filter, kept across live re-renders.
  const ids = () => page.$$eval("tr.device", rows => rows.map(r => r.dataset.id).sort());
  check(JSON.stringify(await ids()) === JSON.stringify([LAB, OTHER].sort()), "both rows listed");
  const tags = await page.$$eval("select#tag option", options => options.map(o => o.value));
  check(tags.includes("lab") && tags.includes(""), `tag options: ${JSON.stringify(tags)}`);
  await page.selectOption("select#tag", "lab");
  await page.waitForFunction(lab => {
    const rows = [...document.querySelectorAll("tr.device")].map(r => r.dataset.id);
    return rows.length === 1 && rows[0] === lab;
  }, LAB);
  // Wait for the next live update (after the first page, the stream sends
  // only the rows that changed: the lab device's pulses).
  const seen = await page.evaluate(() => window.__events);
  await page.waitForFunction(n => window.__events > n, seen);
  check(JSON.stringify(await ids()) === JSON.stringify([LAB]), "the filter holds after a live update");
  check((await page.inputValue("select#tag")) === "lab", "the select still shows lab");

  // 4. Kill the lab device: its row turns offline, live, without a reload.
  let navigations = 0;
  page.on("framenavigated", f => {
    if (f === page.mainFrame()) navigations++;
  });
  await page.evaluate(() => (window.__sameDocument = "still here"));
  log(`READY_TO_KILL ${LAB}`);
  await page.waitForSelector(`${row(LAB)}[data-state="offline"]`, { timeout: 30_000 });
  const cell = page.locator(`${row(LAB)} td.state`);
  check((await cell.textContent()).trim() === "offline", "state cell says offline");
  check(await cell.evaluate(el => el.classList.contains("offline")), "state cell has class offline");
  check(navigations === 0, `no navigation while waiting (got ${navigations})`);
  check((await page.evaluate(() => window.__sameDocument)) === "still here", "the page was not reloaded");
  check((await page.inputValue("select#tag")) === "lab", "the filter is still lab");
  await page.waitForFunction(() => /1 online · 1 offline/.test(document.getElementById("summary").textContent));

  // Back to all devices for the screenshot: one online, one offline.
  await page.selectOption("select#tag", "");
  await page.waitForSelector(`${row(OTHER)}[data-state="online"]`);
  await page.waitForSelector(`${row(LAB)}[data-state="offline"]`);
  await page.screenshot({ path: path.join(ARTIFACT_DIR, "fleet.png"), fullPage: true });

  // 5. The device page: history chart and live state.
  await page.click(`${row(OTHER)} a`);
  await page.waitForFunction(id => location.hash === "#/device/" + encodeURIComponent(id), OTHER);
  await page.waitForSelector("svg.chart");
  const charts = await page.$$eval("svg.chart", s => s.length);
  check(charts >= 3, `cpu, memory and load charts (got ${charts})`);
  const paths = await page.$$eval("svg.chart path", ps => ps.map(p => p.getAttribute("d")));
  check(paths.every(d => d && !/NaN|Infinity/.test(d)), `chart paths are finite: ${JSON.stringify(paths)}`);
  // Something is drawn: the average line spans the chart, even when the
  // device has a single (the open) minute of history.
  const widths = await page.$$eval("svg.chart", svgs =>
    svgs.map(svg => {
      const line = svg.querySelectorAll("path")[1];
      return line ? line.getBBox().width / svg.viewBox.baseVal.width : 0;
    }),
  );
  check(widths.every(w => w > 0.5), `each chart draws a line across it (width fractions ${JSON.stringify(widths)})`);
  check((await page.textContent("#device-state")).trim() === "online", "device page shows online");
  check((await page.textContent("main h2")).includes(OTHER), "device page names the device");

  // 6. Ringing an action from the device page: the form posts with the
  // session's CSRF token and follows the bell to its end.
  page.on("dialog", d => d.accept());
  await page.waitForSelector("form.action");
  const actions = await page.$$eval("form.action strong", s => s.map(x => x.textContent));
  check(actions.includes("ping"), `the device's actions are listed: ${JSON.stringify(actions)}`);
  const ping = actions.indexOf("ping");
  await page.click(`form.action[data-i="${ping}"] button[type="submit"]`);
  await page.waitForFunction(() => /succeeded/.test(document.getElementById("progress").textContent), null, { timeout: 20_000 });
  log("device page rang ping:", (await page.textContent("#progress")).trim());
  // The same request without the CSRF token is refused, though the cookie
  // goes with it: what a cross-site form could send.
  const forged = await page.evaluate(async id => {
    const r = await fetch("/v1/bells", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ device: id, action: "ping" }) });
    return r.status;
  }, OTHER);
  check(forged === 403, `a POST without the CSRF token is refused (got ${forged})`);
  await page.screenshot({ path: path.join(ARTIFACT_DIR, "device.png"), fullPage: true });

  // The killed device's page too: offline, with the events that say so.
  await page.goto(`${ADMIN_URL}/#/device/${encodeURIComponent(LAB)}`);
  await page.waitForFunction(id => {
    const h2 = document.querySelector("main h2");
    return h2 && h2.firstChild.textContent.trim() === id && document.querySelector("svg.chart");
  }, LAB);
  check((await page.textContent("#device-state")).trim() === "offline", "the lab device's page shows offline");

  check(navigations >= 1, "navigation is observed at all");
  check(pageErrors.length === 0, `no uncaught page errors: ${JSON.stringify(pageErrors)}`);
  log("DASHBOARD_OK");
} catch (e) {
  failed = true;
  console.error(e && e.stack ? e.stack : String(e));
  if (pageErrors.length) console.error("page errors:", pageErrors);
  try {
    const page = context.pages()[0];
    if (page) await page.screenshot({ path: path.join(ARTIFACT_DIR, "failure.png"), fullPage: true });
  } catch {}
} finally {
  await context.close();
  clearTimeout(guard);
}
process.exit(failed ? 1 : 0);
