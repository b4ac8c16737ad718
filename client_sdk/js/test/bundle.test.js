// Bundle verification: a signed bundle opens; a changed file, an unlisted file, a symlink, a changed manifest,
// another key or another format version is refused with its typed error.

import assert from "node:assert/strict";
import { createHash, webcrypto } from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { before, test } from "node:test";

import {
  BundleError,
  BundleFormatError,
  BundleSignatureError,
  BundleTampered,
  directorySource,
  memorySource,
  urlSource,
  verifyBundle,
} from "../src/node.js";
import { copyBundle, fileEntry, fixture, flipByte, resign, tempDir } from "./fixture.js";

let fx;
before(async () => {
  fx = await fixture();
});

function copy() {
  return copyBundle(fx.bundle, path.join(tempDir(), "bundle"));
}

async function otherPublicKeyPem() {
  const { publicKey } = await webcrypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
  const der = Buffer.from(await webcrypto.subtle.exportKey("spki", publicKey));
  return `-----BEGIN PUBLIC KEY-----\n${der.toString("base64")}\n-----END PUBLIC KEY-----\n`;
}

test("a signed bundle verifies; its id is the manifest's sha256; the bytes used are the bytes hashed", async () => {
  const v = await verifyBundle(directorySource(fx.bundle), fx.publicKey);
  const raw = fs.readFileSync(path.join(fx.bundle, "manifest.json"));
  assert.equal(v.sha256, createHash("sha256").update(raw).digest("hex"));
  assert.equal(v.formatVersion, 4);
  assert.equal(v.modelVersion, "v1");
  assert.deepEqual(Buffer.from(v.read("step.onnx")), fs.readFileSync(path.join(fx.bundle, "step.onnx")));
  assert.throws(() => v.read("nope.onnx"), BundleFormatError);
});

test("a changed file is refused", async () => {
  const dir = copy();
  flipByte(path.join(dir, "weights.bin"), 100);
  await assert.rejects(verifyBundle(directorySource(dir), fx.publicKey), BundleTampered);
  const short = copy();
  fs.truncateSync(path.join(short, "rank.onnx"), 10);
  await assert.rejects(verifyBundle(directorySource(short), fx.publicKey), /truncated or replaced/);
  const missing = copy();
  fs.rmSync(path.join(missing, "catalogue.json.gz"));
  await assert.rejects(verifyBundle(directorySource(missing), fx.publicKey), /missing/);
});

test("an unlisted file, a symlink or a special entry is refused", async () => {
  const extra = copy();
  fs.writeFileSync(path.join(extra, "notes.txt"), "hello");
  await assert.rejects(verifyBundle(directorySource(extra), fx.publicKey), /not in the signed manifest/);
  const nested = copy();
  fs.mkdirSync(path.join(nested, "sub"));
  fs.writeFileSync(path.join(nested, "sub", "x.onnx"), "x");
  await assert.rejects(verifyBundle(directorySource(nested), fx.publicKey), BundleTampered);
  const linked = copy();
  const target = path.join(tempDir(), "step.onnx");
  fs.renameSync(path.join(linked, "step.onnx"), target);
  fs.symlinkSync(target, path.join(linked, "step.onnx")); // same bytes, but a symlink
  await assert.rejects(verifyBundle(directorySource(linked), fx.publicKey), /not a regular file/);
});

test("a changed manifest, a missing or short signature, or another key is refused", async () => {
  const changed = copy();
  const file = path.join(changed, "manifest.json");
  fs.writeFileSync(file, fs.readFileSync(file, "utf8").replace('"model_version": "v1"', '"model_version": "v9"'));
  await assert.rejects(verifyBundle(directorySource(changed), fx.publicKey), BundleSignatureError);
  await assert.rejects(verifyBundle(directorySource(fx.bundle), await otherPublicKeyPem()), /another key signed it/);
  const unsigned = copy();
  fs.rmSync(path.join(unsigned, "manifest.sig"));
  await assert.rejects(verifyBundle(directorySource(unsigned), fx.publicKey), /not signed/);
  const short = copy();
  fs.writeFileSync(path.join(short, "manifest.sig"), Buffer.alloc(63));
  await assert.rejects(verifyBundle(directorySource(short), fx.publicKey), /63 bytes/);
  await assert.rejects(verifyBundle(directorySource(fx.bundle), "not a key"), BundleSignatureError);
  await assert.rejects(verifyBundle(directorySource(tempDir()), fx.publicKey), /not a bundle/);
});

test("a signed bundle of another format, or with a malformed manifest, is refused", async () => {
  const old = copy();
  resign(fx, old, (m) => {
    m.format_version = 2;
  });
  await assert.rejects(verifyBundle(directorySource(old), fx.publicKey), /format 2.*re-export/);
  const bad = copy();
  resign(fx, bad, (m) => {
    m.files["step.onnx"].sha256 = "XYZ";
  });
  await assert.rejects(verifyBundle(directorySource(bad), fx.publicKey), BundleFormatError);
  const escape = copy();
  resign(fx, escape, (m) => {
    m.files["../step.onnx"] = m.files["step.onnx"];
  });
  await assert.rejects(verifyBundle(directorySource(escape), fx.publicKey), /invalid file name/);
  // a re-signed manifest that lists an added file accepts it: the key holder decides what is in a bundle
  const added = copy();
  fs.writeFileSync(path.join(added, "notes.txt"), "hello");
  resign(fx, added, (m) => {
    m.files["notes.txt"] = fileEntry(path.join(added, "notes.txt"));
  });
  assert.equal((await verifyBundle(directorySource(added), fx.publicKey)).modelVersion, "v1");
});

test("a URL source verifies every listed file but cannot see unlisted ones", async () => {
  const dir = copy();
  fs.writeFileSync(path.join(dir, "notes.txt"), "hello"); // not detectable without a listing
  const fetchFile = async (url) => {
    const file = path.join(dir, decodeURIComponent(new URL(url).pathname.replace(/^\/b\//, "")));
    if (!fs.existsSync(file)) return new Response("no", { status: 404 });
    return new Response(fs.readFileSync(file));
  };
  const source = urlSource("http://127.0.0.1:1/b", { fetch: fetchFile });
  assert.equal((await verifyBundle(source, fx.publicKey)).modelVersion, "v1");
  flipByte(path.join(dir, "encoder.onnx"), 7);
  await assert.rejects(verifyBundle(source, fx.publicKey), BundleTampered);
  const failing = urlSource("http://127.0.0.1:1/b", { fetch: async () => new Response("", { status: 500 }) });
  await assert.rejects(verifyBundle(failing, fx.publicKey), BundleError);
});

test("a memory source is listed: extra entries are refused", async () => {
  const files = new Map(fs.readdirSync(fx.bundle).map((n) => [n, new Uint8Array(fs.readFileSync(path.join(fx.bundle, n)))]));
  assert.equal((await verifyBundle(memorySource(files), fx.publicKey)).modelVersion, "v1");
  files.set("extra.bin", new Uint8Array(3));
  await assert.rejects(verifyBundle(memorySource(files), fx.publicKey), /not in the signed manifest/);
});
