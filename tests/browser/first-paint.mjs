// First paint of the dashboard with a large fleet, in Debian's headless
// Chromium (run by `scripts/bench dashboard`, not by the tests).
//
//   ADMIN_URL    http://127.0.0.1:PORT of the admin listener
//   ADMIN_TOKEN  the admin token (set as the session cookie)
//   SEARCH_ID    a device id to search for
//   CHROMIUM     browser binary [default: /usr/bin/chromium]
//
// Prints one JSON line: first_paint_ms (navigation start → the first page
// of rows and the fleet summary on screen), rows, summary, search_ms
// (typing SEARCH_ID → the table shows that one device), next_page_ms.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const ADMIN_URL = process.env.ADMIN_URL.replace(/\/$/, "");
const TOKEN = process.env.ADMIN_TOKEN;
const SEARCH_ID = process.env.SEARCH_ID;
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "pulsebell-paint-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  viewport: { width: 1280, height: 800 },
});
try {
  const url = new URL(ADMIN_URL);
  await context.addCookies([{ name: "pulsebell_admin", value: TOKEN, domain: url.hostname, path: "/", httpOnly: true, sameSite: "Strict" }]);
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);
  await page.goto(`${ADMIN_URL}/`, { waitUntil: "commit" });
  await page.waitForFunction(() => document.querySelectorAll("tr.device").length > 0 && /devices/.test(document.getElementById("summary").textContent));
  // Navigation start → now, measured by the page itself.
  const firstPaint = await page.evaluate(() => performance.now());
  const rows = await page.$$eval("tr.device", r => r.length);
  const summary = await page.textContent("#summary");

  let t = Date.now();
  await page.fill("#search", SEARCH_ID);
  await page.waitForFunction(id => {
    const r = [...document.querySelectorAll("tr.device")];
    return r.length >= 1 && r[0].dataset.id === id;
  }, SEARCH_ID);
  const searchMs = Date.now() - t;

  await page.fill("#search", "");
  await page.waitForFunction(n => document.querySelectorAll("tr.device").length === n, rows);
  const firstId = await page.$eval("tr.device", r => r.dataset.id);
  t = Date.now();
  await page.click("#next");
  await page.waitForFunction(id => {
    const r = document.querySelector("tr.device");
    return r && r.dataset.id !== id;
  }, firstId);
  const nextMs = Date.now() - t;
  console.log(JSON.stringify({ first_paint_ms: firstPaint, rows, summary, search_ms: searchMs, next_page_ms: nextMs }));
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
