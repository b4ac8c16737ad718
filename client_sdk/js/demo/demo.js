// The demo page: verify the bundle with WebCrypto, run it on onnxruntime-web (wasm, one thread, served from
// node_modules), show the user's recommendations with their explanations and driving interest head, and record
// a click as an event (then re-render). The store lives in localStorage, encrypted.
//
// Demo only: the store key is random and kept in localStorage next to the store it protects; a real app keeps
// it in the platform keystore (or derives it from the user's passphrase on a platform with scrypt).

import * as ort from "/ort/ort.wasm.min.mjs";
import { EncryptedStore, Recommender, WebStorage, urlSource } from "/src/index.js";

ort.env.wasm.numThreads = 1; // no SharedArrayBuffer needed (no cross-origin isolation)
ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.proxy = false;

const $ = (id) => document.getElementById(id);

function storeKey() {
  let hex = localStorage.getItem("tmepsr-demo-key");
  if (!hex) {
    const key = crypto.getRandomValues(new Uint8Array(32));
    hex = Array.from(key, (b) => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem("tmepsr-demo-key", hex);
  }
  return Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16));
}

async function render(rec) {
  const recs = await rec.recommend(10, { explanations: 2 });
  const list = $("recs");
  list.replaceChildren(
    ...recs.map((r) => {
      const li = document.createElement("li");
      li.className = "rec";
      li.dataset.item = r.item;
      li.dataset.score = String(r.score);
      li.dataset.head = String(r.head);
      li.dataset.explanationIds = JSON.stringify(r.explanationIds);
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = r.title;
      const head = document.createElement("span");
      head.className = "head";
      head.textContent = `interest ${r.head}`;
      head.title = "the interest head that drives this recommendation";
      const why = document.createElement("div");
      why.className = "why";
      why.textContent = r.explanations.length ? `because: ${r.explanations.join(", ")}` : "";
      const button = document.createElement("button");
      button.textContent = "watch";
      button.addEventListener("click", () => click(rec, r.item));
      li.append(title, " ", head, button, why);
      return li;
    }),
  );
  const history = rec.history;
  $("history-count").textContent = `${history.length} events`;
  $("history").replaceChildren(
    ...history.slice(-20).reverse().map(([item, t]) => {
      const li = document.createElement("li");
      li.textContent = `${rec.catalogueTitles[rec.catalogueIds.indexOf(item)] ?? item} (${new Date(t * 1000).toISOString().slice(0, 10)})`;
      return li;
    }),
  );
  window.demo.history = history;
  window.demo.renders += 1;
  document.body.dataset.renders = String(window.demo.renders);
}

async function click(rec, item) {
  const last = rec.history.at(-1)?.[1] ?? 0;
  const now = Math.max(Math.floor(Date.now() / 1000), last); // whole unix seconds, never before the last event
  try {
    await rec.record(item, now);
    await render(rec);
  } catch (err) {
    fail(err);
  }
}

function fail(err) {
  console.error(err);
  $("status").textContent = `${err.name}: ${err.message}`;
  $("status").className = "error";
  document.body.dataset.error = `${err.name}: ${err.message}`;
}

async function main() {
  window.demo = { renders: 0, history: [] };
  const params = new URLSearchParams(location.search);
  if (params.has("reset")) localStorage.removeItem("tmepsr-demo-store");
  const publicKey = await (await fetch("/key.pem")).text(); // a real app pins the key in its own code
  const store = new EncryptedStore(new WebStorage("tmepsr-demo-store"), { key: storeKey() });
  const rec = await Recommender.open({ bundle: urlSource("/bundle/"), publicKey, store, ort, executionProviders: ["wasm"] });
  window.demo.recommender = rec;
  if (rec.history.length === 0) {
    const events = await (await fetch("/history.json")).json();
    if (events.length) await rec.syncHistory(events);
  }
  $("status").textContent = `Bundle ${rec.modelVersion} verified (${rec.manifest.sha256.slice(0, 12)}), ${rec.catalogueIds.length} items.`;
  await render(rec);
}

main().catch(fail);
