// The encrypted store, format 3: round trip, header layout, wrong key, any changed byte, corrupt files, the
// passphrase key derivation and the file adapter's atomic write.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";

import {
  CorruptStore,
  EncryptedStore,
  FileStorage,
  HEADER_SIZE,
  MemoryStorage,
  UnsupportedStoreVersion,
  WebStorage,
  WrongKeyOrTampered,
  fileStore,
} from "../src/node.js";
import { tempDir } from "./fixture.js";

const KEY = Uint8Array.from({ length: 32 }, (_, i) => i);

function record() {
  return {
    items: [12, 7, 301],
    times: [1_700_000_000, 1_700_000_060, 1_700_003_600],
    state: {
      lru_state: { dtype: "float32", shape: [2, 3], data: Float32Array.of(0.5, -1, 2, 3.25, 0, -0.125) },
      state: { dtype: "float32", shape: [2], data: Float32Array.of(1, 2) },
    },
    weights: {
      "interests.proj": { dtype: "float64", shape: [1, 2], data: Float64Array.of(Math.PI, -Math.E) },
      "x.count": { dtype: "int64", shape: [2], data: BigInt64Array.of(-3n, 2n ** 40n) },
      "x.flags": { dtype: "bool", shape: [3], data: Uint8Array.of(1, 0, 1) },
      "x.int": { dtype: "int32", shape: [], data: Int32Array.of(-7) },
    },
    meta: { bundle: "ab".repeat(32), nested: { a: [1, "b"] } },
  };
}

test("a record survives the round trip; the header is the 44 bytes of section 6", async () => {
  const storage = new MemoryStorage();
  const store = new EncryptedStore(storage, { key: KEY });
  assert.equal(await store.exists(), false);
  assert.equal(await store.load(), null);
  await store.save(record());
  const blob = storage.bytes;
  assert.equal(HEADER_SIZE, 44);
  assert.equal(Buffer.from(blob.subarray(0, 13)).toString("latin1"), "TMEPSR-STORE\0");
  assert.deepEqual([...blob.subarray(13, 16)], [0, 3, 0]); // u16 BE version 3, kdf 0
  assert.deepEqual([...blob.subarray(16, 32)], new Array(16).fill(0)); // no salt for a raw key
  assert.deepEqual(await store.load(), record());
  await store.save(record());
  assert.notDeepEqual(storage.bytes.subarray(32, 44), blob.subarray(32, 44)); // a fresh nonce per save
});

test("a wrong key or any changed byte is WrongKeyOrTampered, and nothing is rewritten", async () => {
  const storage = new MemoryStorage();
  await new EncryptedStore(storage, { key: KEY }).save(record());
  const good = storage.bytes.slice();
  const other = KEY.map((b) => b ^ 0xff);
  await assert.rejects(new EncryptedStore(storage, { key: other }).load(), WrongKeyOrTampered);
  for (const offset of [16, 20, 40, 44, 60, good.length - 1]) { // salt, nonce, ciphertext, tag
    const bad = good.slice();
    bad[offset] ^= 1;
    await assert.rejects(new EncryptedStore(new MemoryStorage(bad), { key: KEY }).load(), WrongKeyOrTampered, `byte ${offset}`);
  }
  assert.deepEqual(storage.bytes, good);
  await assert.rejects(new EncryptedStore(storage, { passphrase: "pw" }).load(), /raw key protects the file/);
});

test("truncated, foreign, unknown-version and malformed stores are refused with their errors", async () => {
  const storage = new MemoryStorage();
  await new EncryptedStore(storage, { key: KEY }).save(record());
  const good = storage.bytes;
  const open = (bytes) => new EncryptedStore(new MemoryStorage(bytes), { key: KEY }).load();
  await assert.rejects(open(good.subarray(0, 30)), CorruptStore);
  const foreign = good.slice();
  foreign[0] = 0x58;
  await assert.rejects(open(foreign), /bad magic/);
  for (const [version, error] of [[2, UnsupportedStoreVersion], [4, UnsupportedStoreVersion], [0, CorruptStore]]) {
    const v = good.slice();
    v[14] = version;
    await assert.rejects(open(v), error);
  }
  const kdf = good.slice();
  kdf[15] = 9;
  await assert.rejects(open(kdf), /unknown key derivation/);
  // an authentic payload that is not a format-3 record
  const store = new EncryptedStore(new MemoryStorage(), { key: KEY });
  const header = { version: 3, kdf: 0, salt: new Uint8Array(16), nonce: new Uint8Array(12) };
  for (const payload of ['{"items": [1], "times": []}', "not json", '{"items":[],"times":[],"state":{},"weights":{"w":{"dtype":"float32","shape":[2],"data":"AAAA"}},"meta":{}}']) {
    const sealed = await store.seal(header, new TextEncoder().encode(payload));
    await assert.rejects(open(sealed), CorruptStore, payload);
  }
});

test("invalid records are not saved", async () => {
  const storage = new MemoryStorage();
  const store = new EncryptedStore(storage, { key: KEY });
  const nan = record();
  nan.state.state.data[0] = NaN;
  await assert.rejects(store.save(nan), /NaN/);
  await assert.rejects(store.save({ ...record(), times: [1, 2] }), /differ in length/);
  await assert.rejects(store.save({ ...record(), times: [1, 2.5, 3] }), /whole numbers/);
  assert.equal(storage.bytes, null);
  assert.throws(() => new EncryptedStore(storage, { key: new Uint8Array(16) }), /32 raw bytes/);
  assert.throws(() => new EncryptedStore(storage, {}), /exactly one/);
});

test("a passphrase store uses scrypt with the salt in the header, kept across saves", async () => {
  const storage = new MemoryStorage();
  const store = new EncryptedStore(storage, { passphrase: "correct horse" });
  await store.save(record());
  assert.equal(storage.bytes[15], 1);
  const salt = storage.bytes.slice(16, 32);
  assert.ok(salt.some((b) => b !== 0));
  assert.deepEqual(await new EncryptedStore(storage, { passphrase: "correct horse" }).load(), record());
  await assert.rejects(new EncryptedStore(storage, { passphrase: "wrong" }).load(), WrongKeyOrTampered);
  await assert.rejects(new EncryptedStore(storage, { key: KEY }).load(), /passphrase protects the file/);
  await store.save(record());
  assert.deepEqual(storage.bytes.slice(16, 32), salt);
  const noScrypt = new EncryptedStore(new MemoryStorage(), {
    passphrase: "x",
    scrypt: async () => {
      throw new Error("no scrypt here");
    },
  });
  await assert.rejects(noScrypt.save(record()), /no scrypt here/);
});

test("the file adapter writes atomically (temp file in the same folder, then rename)", async () => {
  const dir = tempDir();
  const file = path.join(dir, "user.store");
  const store = fileStore(file, { key: KEY });
  assert.equal(await store.load(), null);
  await store.save(record());
  await store.save(record());
  assert.deepEqual(fs.readdirSync(dir), ["user.store"]); // no temp file left
  assert.deepEqual(await fileStore(file, { key: KEY }).load(), record());
  const before = fs.readFileSync(file);
  await assert.rejects(fileStore(file, { key: new Uint8Array(32) }).load(), WrongKeyOrTampered);
  assert.deepEqual(fs.readFileSync(file), before);
  assert.equal(new FileStorage(file).describe, file);
});

test("the Web Storage adapter keeps the bytes as base64", async () => {
  const area = new Map();
  const storage = new WebStorage("tmepsr", { getItem: (k) => area.get(k) ?? null, setItem: (k, v) => area.set(k, v) });
  const store = new EncryptedStore(storage, { key: KEY });
  await store.save(record());
  assert.match(area.get("tmepsr"), /^[A-Za-z0-9+/]+=*$/);
  assert.deepEqual(await store.load(), record());
});

test("personal_init.bin: float32 arrays and int8 rows with a float32 scale per row", async () => {
  const { initialPersonal } = await import("../src/node.js");
  const bytes = new Uint8Array(4 * 2 + 6 + 2 * 4);
  const view = new DataView(bytes.buffer);
  view.setFloat32(0, 1.5, true);
  view.setFloat32(4, -2.25, true);
  Int8Array.from([1, -2, 127, -127, 0, 3]).forEach((q, i) => view.setInt8(8 + i, q));
  view.setFloat32(14, 0.5, true);
  view.setFloat32(18, 0.1, true);
  const spec = {
    inputs: [
      { name: "a", shape: [2], offset: 0 },
      { name: "b", shape: [2, 3], offset: 8, encoding: "int8-rows", scales: 14 },
    ],
  };
  const got = initialPersonal(spec, bytes);
  assert.deepEqual([...got.a], [1.5, -2.25]);
  const s = Math.fround(0.1);
  assert.deepEqual([...got.b], [0.5, -1, 63.5, -127 * s, 0, 3 * s].map(Math.fround));
  assert.throws(() => initialPersonal({ inputs: [{ name: "c", shape: [9], offset: 0 }] }, bytes), /too short/);
  assert.throws(() => initialPersonal({ inputs: [{ name: "c", shape: [1], offset: 0, encoding: "zip" }] }, bytes), /unknown encoding/);
});
