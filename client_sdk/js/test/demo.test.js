// The demo's static server: bundle bytes as they are (no content-encoding), nothing outside its folders, and a
// urlSource over real HTTP verifies the bundle it serves.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as http from "node:http";
import * as path from "node:path";
import { before, test } from "node:test";

import { serve } from "../demo/serve.mjs";
import { BundleTampered, urlSource, verifyBundle } from "../src/node.js";
import { copyBundle, fixture, flipByte, tempDir } from "./fixture.js";

let fx;
before(async () => {
  fx = await fixture();
});

function rawGet(url, pathname) {
  const { port } = new URL(url);
  return new Promise((resolve, reject) => {
    http.get({ host: "127.0.0.1", port, path: pathname }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    }).on("error", reject);
  });
}

test("the demo server serves the bundle unchanged and nothing outside its folders", async () => {
  const bundle = copyBundle(fx.bundle, path.join(tempDir(), "bundle"));
  const keyFile = path.join(tempDir(), "key.pem");
  fs.writeFileSync(keyFile, fx.publicKey);
  const server = await serve({ bundle, publicKey: keyFile });
  try {
    const base = new URL("/", server.url);
    const gz = await fetch(new URL("/bundle/catalogue.json.gz", base));
    assert.equal(gz.headers.get("content-encoding"), null);
    assert.deepEqual(Buffer.from(await gz.arrayBuffer()), fs.readFileSync(path.join(bundle, "catalogue.json.gz")));
    assert.equal(await (await fetch(new URL("/key.pem", base))).text(), fx.publicKey);
    assert.deepEqual(await (await fetch(new URL("/history.json", base))).json(), []);
    assert.equal((await fetch(new URL("/ort/ort.wasm.min.mjs", base))).status, 200);
    assert.equal((await fetch(new URL("/src/index.js", base))).status, 200);
    assert.equal(await rawGet(server.url, "/bundle/..%2f..%2fkey.pem"), 403);
    assert.equal(await rawGet(server.url, "/src/../package.json"), 404);
    assert.equal(await rawGet(server.url, "/etc/passwd"), 404);

    const source = urlSource(new URL("/bundle/", base));
    assert.equal((await verifyBundle(source, fx.publicKey)).modelVersion, "v1");
    flipByte(path.join(bundle, "rank.onnx"), 50);
    await assert.rejects(verifyBundle(source, fx.publicKey), BundleTampered);
  } finally {
    await server.close();
  }
});
