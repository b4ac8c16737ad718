#!/usr/bin/env node
// Drive the JavaScript client on onnxruntime-node from a JSON request (a file argument, or stdin) and print
// JSON results: the parity checks against the Python runtime (tests/test_js_client.py) use it.
//
//   {"command": "replay", "bundle": DIR, "public_key": PEM_FILE, "k": 10, "explanations": 3,
//    "users": [[[item id, unix seconds], ...], ...]}
//     -> {"users": [[{"items", "scores", "heads", "explanation_ids"} per event], ...], "seconds": s}
//        (one Recommender on an in-memory store, syncHistory([]) before each user; recommend(k) after every event)
//   {"command": "store", "bundle": DIR, "public_key": PEM_FILE, "store": FILE, "key": HEX | "passphrase": P,
//    "events": [[item id, t], ...], "k": 10}
//     -> opens the store (a new one, or one the Python runtime wrote), records `events` (saving after each),
//        prints {"history", "recommend": [{item, score, head, explanation_ids}], "record": the decoded store}

import * as fs from "node:fs";

import * as ort from "onnxruntime-node";

import { MemoryStorage, EncryptedStore, Recommender, fileStore, readPublicKey } from "../src/node.js";

const text = process.argv[2] ? fs.readFileSync(process.argv[2], "utf8") : fs.readFileSync(0, "utf8");
const request = JSON.parse(text);
const publicKey = await readPublicKey(request.public_key);
const k = request.k ?? 10;
const explanations = request.explanations ?? 2;

const view = (recs) => ({
  items: recs.map((r) => r.item),
  scores: recs.map((r) => r.score),
  heads: recs.map((r) => r.head),
  explanation_ids: recs.map((r) => r.explanationIds),
});

function arrays(group) {
  return Object.fromEntries(
    Object.entries(group).map(([name, a]) => [name, { dtype: a.dtype, shape: a.shape, data: Array.from(a.data, Number) }]),
  );
}

const started = performance.now();
let result;
if (request.command === "replay") {
  const users = [];
  const store = new EncryptedStore(new MemoryStorage(), { key: new Uint8Array(32) });
  const rec = await Recommender.open({ bundle: request.bundle, publicKey, store, ort });
  for (const events of request.users) {
    await rec.syncHistory([]); // an empty history: the zero state, as a new device
    const out = [];
    for (const [item, t] of events) {
      await rec.record(item, t, { save: false });
      out.push(view(await rec.recommend(k, { explanations })));
    }
    users.push(out);
  }
  await rec.close();
  result = { users };
} else if (request.command === "store") {
  const options = request.passphrase ? { passphrase: request.passphrase } : { key: Uint8Array.from(Buffer.from(request.key, "hex")) };
  const store = fileStore(request.store, options);
  const rec = await Recommender.open({ bundle: request.bundle, publicKey, store, ort });
  const opened = { history: rec.history, recommend: view(await rec.recommend(k, { explanations })) };
  for (const [item, t] of request.events ?? []) await rec.record(item, t);
  const recs = await rec.recommend(k, { explanations });
  const history = rec.history;
  await rec.close();
  const saved = await fileStore(request.store, options).load();
  result = { opened, history, recommend: view(recs), record: { ...saved, state: arrays(saved.state), weights: arrays(saved.weights) } };
} else {
  throw new Error(`unknown command ${JSON.stringify(request.command)}`);
}
result.seconds = (performance.now() - started) / 1000;
process.stdout.write(JSON.stringify(result));
