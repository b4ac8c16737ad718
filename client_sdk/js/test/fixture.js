// The tests' fixture: a signed bundle of a tiny random model on movielens-latest-small, built by the Python SDK
// (make_bundle.py). Built once and cached in the temp folder under a hash of the code that makes it; set
// TMEPSR_JS_FIXTURE to a folder make_bundle.py already wrote to use that one, PYTHON to choose the interpreter.

import { execFileSync } from "node:child_process";
import { createHash, createPrivateKey, sign } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "../../..");
const SOURCES = [
  "client_sdk/js/test/make_bundle.py",
  ...fs.readdirSync(path.join(REPO, "shared_model/export")).filter((f) => f.endsWith(".py")).sort().map((f) => `shared_model/export/${f}`),
  "shared_model/graph_io.py",
  "server/publish.py",
  "server/release.py",
  "tests/helpers.py",
];

export function python() {
  if (process.env.PYTHON) return process.env.PYTHON;
  const venv = path.join(REPO, ".venv", "bin", "python");
  return fs.existsSync(venv) ? venv : "python3";
}

function build(dir) {
  execFileSync(python(), [path.join(here, "make_bundle.py"), dir], { stdio: ["ignore", "ignore", "inherit"], cwd: REPO });
}

/** @returns {Promise<{dir: string, bundle: string, publicKey: string, privateKey: string, passphrase: string, users: Array<Array<[string, number]>>}>} */
export async function fixture() {
  let dir = process.env.TMEPSR_JS_FIXTURE;
  if (!dir) {
    const h = createHash("sha256");
    for (const f of SOURCES) h.update(fs.readFileSync(path.join(REPO, f)));
    dir = path.join(os.tmpdir(), `tmepsr-js-fixture-${h.digest("hex").slice(0, 16)}`);
    if (!fs.existsSync(path.join(dir, "fixture.json"))) {
      const lock = `${dir}.lock`;
      let mine = false;
      try {
        fs.mkdirSync(lock);
        mine = true;
      } catch {
        // another test process builds it: wait for it
      }
      if (mine) {
        try {
          const tmp = `${dir}.tmp-${process.pid}`;
          fs.rmSync(tmp, { recursive: true, force: true });
          build(tmp);
          fs.rmSync(dir, { recursive: true, force: true });
          fs.renameSync(tmp, dir);
        } finally {
          fs.rmSync(lock, { recursive: true, force: true });
        }
      } else {
        const deadline = Date.now() + 600_000;
        while (!fs.existsSync(path.join(dir, "fixture.json"))) {
          if (Date.now() > deadline || !fs.existsSync(lock)) {
            if (fs.existsSync(path.join(dir, "fixture.json"))) break;
            throw new Error(`the fixture build in ${lock} did not finish`);
          }
          await new Promise((r) => setTimeout(r, 500));
        }
      }
    }
  }
  const info = JSON.parse(fs.readFileSync(path.join(dir, "fixture.json"), "utf8"));
  return {
    dir,
    bundle: path.resolve(dir, info.bundle),
    publicKey: fs.readFileSync(path.resolve(dir, info.public_key), "utf8"),
    privateKey: fs.readFileSync(path.resolve(dir, info.private_key), "utf8"),
    passphrase: info.passphrase,
    users: info.users,
  };
}

const made = [];
process.on("exit", () => {
  for (const dir of made) fs.rmSync(dir, { recursive: true, force: true });
});

/** A fresh temp folder, removed when the test process exits. */
export function tempDir(prefix = "tmepsr-js-test-") {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  made.push(dir);
  return dir;
}

/** Copy a bundle folder. */
export function copyBundle(src, dest) {
  fs.cpSync(src, dest, { recursive: true });
  return dest;
}

/** Flip one bit of a file at `offset`. */
export function flipByte(file, offset) {
  const data = fs.readFileSync(file);
  data[offset] ^= 1;
  fs.writeFileSync(file, data);
}

/** Rewrite a bundle's manifest with `edit` and sign it again with the fixture's private key. */
export function resign(fx, dir, edit) {
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));
  edit(manifest);
  const text = Buffer.from(sortedJson(manifest));
  fs.writeFileSync(path.join(dir, "manifest.json"), text);
  const key = createPrivateKey({ key: fx.privateKey, passphrase: fx.passphrase });
  fs.writeFileSync(path.join(dir, "manifest.sig"), sign(null, text, key));
}

/** Re-hash a file into the manifest entry. */
export function fileEntry(file) {
  const data = fs.readFileSync(file);
  return { bytes: data.length, sha256: createHash("sha256").update(data).digest("hex") };
}

function sortedJson(value) {
  if (Array.isArray(value)) return `[${value.map(sortedJson).join(", ")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}: ${sortedJson(value[k])}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}
