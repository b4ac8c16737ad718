#!/usr/bin/env node
// Latency of record + recommend(10) per event through the JavaScript client on onnxruntime-node, one thread,
// the store not written per event: simulations/bench_runtime.py runs it beside the Python runtime on the same
// bundle and events and reports the ratio.
//
//   node bin/bench.mjs BUNDLE_DIR PUBLIC_KEY_PEM EVENTS_JSON    (EVENTS_JSON: {"items": [app ids], "times": [s]})
//     -> {"median_us", "p99_us", "open_s", "peak_rss_mb"}

import * as fs from "node:fs";

import * as ort from "onnxruntime-node";

import { EncryptedStore, MemoryStorage, Recommender, readPublicKey } from "../src/node.js";

const [bundle, keyFile, eventsFile] = process.argv.slice(2);
const events = JSON.parse(fs.readFileSync(eventsFile, "utf8"));
const store = new EncryptedStore(new MemoryStorage(), { key: new Uint8Array(32) });

let t0 = performance.now();
const rec = await Recommender.open({ bundle, publicKey: await readPublicKey(keyFile), store, ort, threads: 1 });
const openS = (performance.now() - t0) / 1000;
const us = [];
let peak = process.memoryUsage().rss;
for (let i = 0; i < events.items.length; i++) {
  t0 = performance.now();
  await rec.record(events.items[i], events.times[i], { save: false });
  await rec.recommend(10);
  us.push((performance.now() - t0) * 1000);
  if (i % 100 === 0) peak = Math.max(peak, process.memoryUsage().rss);
}
await rec.close();

/** numpy's default percentile: linear interpolation between the closest ranks. */
function percentile(sorted, p) {
  const at = (sorted.length - 1) * p;
  const lo = Math.floor(at);
  return sorted[lo] + (sorted[Math.min(lo + 1, sorted.length - 1)] - sorted[lo]) * (at - lo);
}
us.sort((a, b) => a - b);
process.stdout.write(
  JSON.stringify({ median_us: percentile(us, 0.5), p99_us: percentile(us, 0.99), open_s: openS, peak_rss_mb: peak / 2 ** 20 }),
);
