// The Recommender on onnxruntime-node: record/recommend, the store round trip, defined behaviour for bad input,
// and upgrades that fail keeping the bundle in use.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { before, test } from "node:test";

import * as ort from "onnxruntime-node";

import {
  BundleError,
  BundleSignatureError,
  BundleTampered,
  EncryptedStore,
  IncompatibleStore,
  MemoryStorage,
  OutOfOrderEvent,
  Recommender,
  RuntimeInputError,
  StoreError,
  StoreInUse,
  UnknownItem,
  WrongKeyOrTampered,
  fileStore,
} from "../src/node.js";
import { copyBundle, fixture, flipByte, tempDir } from "./fixture.js";

const KEY = Uint8Array.from({ length: 32 }, (_, i) => 255 - i);
let fx;
before(async () => {
  fx = await fixture();
});

function open(store, options = {}) {
  return Recommender.open({ bundle: fx.bundle, publicKey: fx.publicKey, store, ort, ...options });
}

async function replay(rec, events, n = events.length) {
  for (const [item, t] of events.slice(0, n)) await rec.record(item, t, { save: false });
  await rec.save();
}

test("cold start, record, recommend, and a restart from the store give the same recommendations", async () => {
  const file = path.join(tempDir(), "u.store");
  const rec = await open(fileStore(file, { key: KEY }));
  const cold = await rec.recommend(5); // empty history: the zero state still ranks every item
  assert.equal(cold.length, 5);
  assert.ok(cold.every((r) => Number.isFinite(r.score) && typeof r.title === "string"));
  assert.ok(cold.every((r, i) => i === 0 || cold[i - 1].score >= r.score));
  const events = fx.users[0].slice(0, 40);
  await replay(rec, events);
  const got = await rec.recommend(10);
  assert.equal(got.length, 10);
  const seen = new Set(events.map(([i]) => i));
  assert.ok(got.every((r) => !seen.has(r.item)));
  for (const r of got) {
    assert.ok(r.head >= 0 && r.head < 2);
    assert.ok(r.explanations.length <= 2 && r.explanations.length === r.explanationIds.length);
    assert.deepEqual(r.explanations, r.explanationIds.map((id) => rec._b.explanations[id]));
  }
  const wide = await rec.recommend(15); // wider than the step graph's ranking: from rank.onnx
  assert.equal(wide.length, 15);
  assert.deepEqual(wide.slice(0, 10).map((r) => [r.item, r.head]), got.map((r) => [r.item, r.head]));
  for (let i = 0; i < 10; i++) assert.ok(Math.abs(wide[i].score - got[i].score) < 1e-4);
  const unmasked = await rec.recommend(20, { excludeSeen: false });
  const masked = await rec.recommend(20);
  assert.ok(unmasked.every((r, i) => r.score >= masked[i].score - 1e-6)); // ranks over a superset
  assert.equal((await rec.recommend(3, { explanations: 0 }))[0].explanations.length, 0);
  const history = rec.history;
  await rec.close();
  await rec.close(); // idempotent
  await assert.rejects(rec.recommend(5), StoreError);

  const again = await open(fileStore(file, { key: KEY })); // state, history and seen items from the store
  assert.deepEqual(again.history, history);
  assert.deepEqual(await again.recommend(10), got);
  await again.syncHistory(history); // encoder.onnx gives the state the step graph rolled
  const synced = await again.recommend(10);
  assert.deepEqual(synced.map((r) => r.item), got.map((r) => r.item));
  for (let i = 0; i < 10; i++) assert.ok(Math.abs(synced[i].score - got[i].score) < 1e-4);
  await again.close();
});

test("bad input has defined behaviour and changes nothing", async () => {
  const rec = await open(new EncryptedStore(new MemoryStorage(), { key: KEY }));
  const ids = rec.catalogueIds;
  assert.equal(ids.length, 9724);
  assert.equal(await rec.record(ids[0], 1000), true);
  await assert.rejects(rec.record("no-such-item", 2000), UnknownItem);
  await assert.rejects(rec.record({ id: 1 }, 2000), UnknownItem);
  await assert.rejects(rec.record(ids[1], 999), OutOfOrderEvent);
  assert.equal(await rec.record(ids[0], 1000), false); // the same event again is ignored
  for (const [bad, message] of [
    [1_700_000_000_000, /milliseconds/],
    [-5, /\[0, 2\*\*40\)/],
    [2 ** 62, /2\*\*40/],
    [NaN, /NaN/],
    [1500.5, /whole/],
    ["1500", /number of unix seconds/],
    [true, /number of unix seconds/],
    [undefined, /number of unix seconds/],
    [-1n, /\[0, 2\*\*40\)/],
  ]) {
    await assert.rejects(rec.record(ids[1], bad), (err) => err instanceof RuntimeInputError && message.test(err.message), String(bad));
  }
  assert.deepEqual(rec.history, [[ids[0], 1000]]);
  assert.equal(await rec.record(ids[1], 1500n), true); // a BigInt is fine
  assert.equal(await rec.record(Number(ids[2]), 1500), true); // a numeric id is its string
  for (const k of [0, 21, -1, 2.5, "5", null, NaN]) {
    await assert.rejects(rec.recommend(k), /k must be in 1\.\.20/, String(k));
  }
  await assert.rejects(rec.recommend(5, { explanations: -1 }), RuntimeInputError);
  await assert.rejects(rec.syncHistory([[ids[0], 5], [ids[1], 4]]), OutOfOrderEvent);
  await assert.rejects(rec.syncHistory([[ids[0], 5], ["nope", 6]]), UnknownItem);
  assert.equal(rec.history.length, 3);
  await rec.close();

  await assert.rejects(open(new EncryptedStore(new MemoryStorage(), { key: KEY }), { onBackwards: "bogus" }), /onBackwards/);
  const storage = new MemoryStorage();
  const lenient = await open(new EncryptedStore(storage, { key: KEY }), { onUnknown: "ignore", onBackwards: "clamp" });
  assert.equal(await lenient.record("no-such-item", 3000), false);
  await lenient.record(ids[0], 3000);
  assert.equal(await lenient.record(ids[2], 10), true); // clamped to the last event's time
  assert.deepEqual(lenient.history.at(-1), [ids[2], 3000]);
  await assert.rejects(lenient.syncHistory([["no-such-item", 3]]), UnknownItem); // strict even when ignoring
  await assert.rejects(open(new EncryptedStore(storage, { key: KEY })), StoreInUse); // one writer per store
  await lenient.close();
  const reopened = await open(new EncryptedStore(storage, { key: KEY }));
  assert.equal(reopened.history.length, 2);
  await reopened.close();
});

test("a tampered store or a wrong key fails at open without rewriting the file", async () => {
  const file = path.join(tempDir(), "u.store");
  const rec = await open(fileStore(file, { key: KEY }));
  await replay(rec, fx.users[1], 5);
  await rec.close();
  const good = fs.readFileSync(file);
  await assert.rejects(open(fileStore(file, { key: new Uint8Array(32) })), WrongKeyOrTampered);
  flipByte(file, good.length - 20);
  const bad = fs.readFileSync(file);
  await assert.rejects(open(fileStore(file, { key: KEY })), /wrong key or passphrase, or the file was modified/);
  assert.deepEqual(fs.readFileSync(file), bad);
  // personal weights of another model do not fit the bundle
  const foreign = new EncryptedStore(new MemoryStorage(), { key: KEY });
  await foreign.save({ items: [], times: [], state: {}, weights: { "interests.proj": { dtype: "float32", shape: [1], data: new Float32Array(1) } }, meta: {} });
  await assert.rejects(open(foreign), IncompatibleStore);
  const beyond = new EncryptedStore(new MemoryStorage(), { key: KEY });
  await beyond.save({ items: [99999], times: [5], state: {}, weights: {}, meta: {} });
  await assert.rejects(open(beyond), /beyond this catalogue/);
});

test("a failed upgrade keeps the bundle in use; a good one re-encodes the history", async () => {
  const rec = await open(new EncryptedStore(new MemoryStorage(), { key: KEY }));
  await replay(rec, fx.users[2], 30);
  const before = await rec.recommend(5);
  const sha = rec.manifest.sha256;
  const bad = copyBundle(fx.bundle, path.join(tempDir(), "bad"));
  flipByte(path.join(bad, "step.onnx"), 200);
  await assert.rejects(rec.upgrade(bad, fx.publicKey), BundleTampered);
  assert.equal(rec.manifest.sha256, sha);
  assert.deepEqual(await rec.recommend(5), before);
  const { publicKey } = await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
  await assert.rejects(rec.upgrade(fx.bundle, publicKey), BundleSignatureError);
  await assert.rejects(rec.upgrade(path.join(tempDir(), "none"), fx.publicKey), BundleError);
  assert.deepEqual(await rec.recommend(5), before);
  assert.equal(await rec.record(fx.users[2][30][0], fx.users[2][30][1]), true); // still works
  const history = rec.history;
  const good = copyBundle(fx.bundle, path.join(tempDir(), "good"));
  await rec.upgrade(good, fx.publicKey);
  assert.deepEqual(rec.history, history);
  assert.equal(rec.modelVersion, "v1");
  assert.equal((await rec.recommend(5)).length, 5);
  await rec.close();
});
