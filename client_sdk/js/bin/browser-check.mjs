#!/usr/bin/env node
// Drive the demo page in a headless Chromium (puppeteer-core; never downloads a browser) and print what it
// rendered as JSON: tests/test_js_client.py compares it with the Python runtime.
//
//   node bin/browser-check.mjs REQUEST_JSON
//   {"bundle": DIR, "public_key": PEM_FILE, "history": [[item id, unix seconds], ...], "chromium": PATH?}
//   -> {"first": recs after loading the history, "clicked": [item, t], "second": recs after clicking the first
//       recommendation, "reloaded": recs after a page reload (from the encrypted localStorage store)}
//
// The browser is $CHROMIUM, else request.chromium, else /usr/bin/chromium.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import puppeteer from "puppeteer-core";

import { serve } from "../demo/serve.mjs";

const request = JSON.parse(fs.readFileSync(process.argv[2] ?? 0, "utf8"));
const executablePath = process.env.CHROMIUM || request.chromium || "/usr/bin/chromium";
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "tmepsr-demo-"));
const historyFile = path.join(tmp, "history.json");
fs.writeFileSync(historyFile, JSON.stringify(request.history ?? []));

const server = await serve({ bundle: request.bundle, publicKey: request.public_key, history: historyFile });
const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  userDataDir: path.join(tmp, "profile"),
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
});
const logs = [];
try {
  const page = await browser.newPage();
  page.on("console", (msg) => logs.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (err) => logs.push(`pageerror: ${err.message}`));
  const rendered = async (n) => {
    await page.waitForFunction(
      (n) => document.body.dataset.error || Number(document.body.dataset.renders ?? 0) >= n,
      { timeout: 120_000 },
      n,
    );
    const error = await page.evaluate(() => document.body.dataset.error);
    if (error) throw new Error(`the demo page failed: ${error}\n${logs.join("\n")}`);
    return page.$$eval("li.rec", (lis) =>
      lis.map((li) => ({
        item: li.dataset.item,
        score: Number(li.dataset.score),
        head: Number(li.dataset.head),
        explanation_ids: JSON.parse(li.dataset.explanationIds),
        title: li.querySelector(".title").textContent,
        why: li.querySelector(".why").textContent,
        head_text: li.querySelector(".head").textContent,
      })),
    );
  };
  await page.goto(server.url, { waitUntil: "load" });
  const first = await rendered(1);
  await page.click("li.rec button");
  const second = await rendered(2);
  const clicked = await page.evaluate(() => window.demo.history.at(-1));
  await page.reload({ waitUntil: "load" });
  const reloaded = await rendered(1);
  const status = await page.$eval("#status", (el) => el.textContent);
  process.stdout.write(JSON.stringify({ first, clicked, second, reloaded, status, logs }));
} finally {
  await browser.close();
  await server.close();
  fs.rmSync(tmp, { recursive: true, force: true });
}
