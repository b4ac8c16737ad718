// Bundle verification (docs/BUNDLE.md sections 1-3): Ed25519 over manifest.json, then the manifest, then every
// listed file's size and sha256 (and, where the source can list its folder, that nothing else is there). The
// verified bytes are kept and are the only bytes the client uses: no file is read twice.

import { asBytes, fromBase64, sha256Hex, subtle, utf8Decode } from "./bytes.js";
import { BundleError, BundleFormatError, BundleSignatureError, BundleTampered } from "./errors.js";

export const FORMAT_VERSION = 4;
export const MANIFEST = "manifest.json";
export const SIGNATURE = "manifest.sig";
export const SIGNATURE_SIZE = 64;
export const MAX_MANIFEST_BYTES = 256 * 2 ** 20;
const MODEL_VERSION_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$/;
const SHA256_RE = /^[0-9a-f]{64}$/;
const ISO_RE = /^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?)?$/;
const REQUIRED = ["format_version", "model_version", "opset", "created", "files", "spec", "catalogue"];

/**
 * @typedef {{name: string, type: "file" | "dir" | "symlink" | "other"}} SourceEntry
 * @typedef {object} BundleSource
 * @property {string} describe  a label for messages (the folder or URL)
 * @property {boolean} canList  whether list() exists (a folder: yes; a URL: no)
 * @property {() => Promise<SourceEntry[]>} [list]  every entry under the folder, posix relative names
 * @property {(name: string, maxBytes: number) => Promise<Uint8Array | null>} read  a file's bytes (at most
 *   maxBytes + 1 of them), null when it does not exist; BundleTampered for a symlink or special file
 */

/**
 * The pinned Ed25519 public key: PEM SubjectPublicKeyInfo (text or bytes) or a WebCrypto CryptoKey.
 * @param {string | Uint8Array | ArrayBuffer | CryptoKey} source
 * @returns {Promise<CryptoKey>}
 */
export async function importPublicKey(source) {
  if (typeof CryptoKey !== "undefined" && source instanceof CryptoKey) {
    if (source.algorithm?.name !== "Ed25519" || source.type !== "public") {
      throw new BundleSignatureError(`the given CryptoKey is not an Ed25519 public key (${source.algorithm?.name})`);
    }
    return source;
  }
  let pem = source;
  if (typeof pem !== "string") {
    try {
      pem = utf8Decode(asBytes(/** @type {any} */ (source)));
    } catch {
      throw new BundleSignatureError("the public key must be PEM text (-----BEGIN PUBLIC KEY-----)");
    }
  }
  const m = /-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]+)-----END PUBLIC KEY-----/.exec(pem);
  const der = m && fromBase64(m[1].replace(/\s+/g, ""));
  if (!der) throw new BundleSignatureError("the given public key is not a PEM SubjectPublicKeyInfo (BEGIN PUBLIC KEY)");
  try {
    return await subtle().importKey("spki", der, { name: "Ed25519" }, false, ["verify"]);
  } catch (err) {
    throw new BundleSignatureError(`the given PEM is not an Ed25519 public key (${err.message})`);
  }
}

/** A verified bundle: its parsed manifest, its sha256 and the bytes of every listed file. */
export class VerifiedBundle {
  /** @param {string} where @param {any} data @param {string} sha256 @param {Map<string, Uint8Array>} files */
  constructor(where, data, sha256, files) {
    /** the source's label */
    this.where = where;
    /** the parsed manifest.json */
    this.data = data;
    /** the manifest's sha256 (hex): the bundle's identity */
    this.sha256 = sha256;
    this._files = files;
  }
  get modelVersion() { return this.data.model_version; }
  get formatVersion() { return this.data.format_version; }
  get spec() { return this.data.spec; }
  /** A listed file's verified bytes. @param {string} name */
  read(name) {
    const bytes = this._files.get(name);
    if (!bytes) throw new BundleFormatError(`${this.where}: the bundle has no file ${JSON.stringify(name)}`);
    return bytes;
  }
}

/**
 * Verify a bundle (docs/BUNDLE.md section 2): signature first, then the manifest, then every file.
 * @param {BundleSource} source
 * @param {string | Uint8Array | ArrayBuffer | CryptoKey} publicKey
 * @returns {Promise<VerifiedBundle>}
 */
export async function verifyBundle(source, publicKey) {
  if (!source || typeof source.read !== "function") {
    throw new TypeError("bundle must be a bundle source (directorySource(path) in Node, urlSource(url) in a browser)");
  }
  const key = await importPublicKey(publicKey);
  const where = source.describe;
  const raw = await readSignedManifest(source, key);
  const data = parseManifest(raw, where);
  const files = await checkFiles(source, data.files);
  return new VerifiedBundle(where, data, await sha256Hex(raw), files);
}

/** @param {BundleSource} source @param {CryptoKey} key */
async function readSignedManifest(source, key) {
  const where = source.describe;
  const sig = await source.read(SIGNATURE, SIGNATURE_SIZE);
  const raw = await source.read(MANIFEST, MAX_MANIFEST_BYTES);
  if (raw === null) throw new BundleFormatError(`${where}: no ${MANIFEST} (not a bundle)`);
  if (sig === null) throw new BundleSignatureError(`${where}: no ${SIGNATURE} (the bundle is not signed)`);
  if (raw.length > MAX_MANIFEST_BYTES) {
    throw new BundleFormatError(`${where}: ${MANIFEST} is larger than ${MAX_MANIFEST_BYTES} bytes`);
  }
  if (sig.length !== SIGNATURE_SIZE) {
    throw new BundleSignatureError(`${where}: ${SIGNATURE} has ${sig.length} bytes, an Ed25519 signature has 64`);
  }
  let ok;
  try {
    ok = await subtle().verify({ name: "Ed25519" }, key, sig, raw);
  } catch (err) {
    throw new BundleSignatureError(`${where}: the signature could not be checked (${err.message})`);
  }
  if (!ok) {
    throw new BundleSignatureError(
      `${where}: the signature does not match ${MANIFEST} and the pinned key ` +
        "(the manifest was modified, or another key signed it)",
    );
  }
  return raw;
}

const isInt = (v) => typeof v === "number" && Number.isSafeInteger(v);
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

/** Decode and validate the signed manifest bytes. @param {Uint8Array} raw @param {string} where */
export function parseManifest(raw, where) {
  let data;
  try {
    data = JSON.parse(utf8Decode(raw));
  } catch (err) {
    throw new BundleFormatError(`${where}: ${MANIFEST} is not valid UTF-8 JSON (${err.message})`);
  }
  if (!isObject(data)) throw new BundleFormatError(`${where}: ${MANIFEST} is not a JSON object`);
  const version = data.format_version;
  if (!isInt(version) || version < 1) {
    throw new BundleFormatError(`${where}: format_version must be a positive integer, got ${JSON.stringify(version)}`);
  }
  if (version !== FORMAT_VERSION) {
    throw new BundleFormatError(
      `${where}: bundle format ${version}; this client reads format ${FORMAT_VERSION} only ` +
        (version < FORMAT_VERSION ? "(re-export the model: tmepsr export)" : "(update the client)"),
    );
  }
  const missing = REQUIRED.filter((f) => !(f in data));
  if (missing.length) throw new BundleFormatError(`${where}: ${MANIFEST} lacks ${JSON.stringify(missing)}`);
  const { model_version: mv, opset, created, files, catalogue, dataset } = data;
  if (typeof mv !== "string" || !MODEL_VERSION_RE.test(mv)) {
    throw new BundleFormatError(`${where}: invalid model_version ${JSON.stringify(mv)}`);
  }
  if (!isInt(opset) || opset < 1) throw new BundleFormatError(`${where}: opset must be a positive integer`);
  if (typeof created !== "string" || !ISO_RE.test(created) || Number.isNaN(Date.parse(created.replace(" ", "T")))) {
    throw new BundleFormatError(`${where}: created is not an ISO-8601 time: ${JSON.stringify(created)}`);
  }
  if (dataset !== undefined && typeof dataset !== "string") {
    throw new BundleFormatError(`${where}: dataset (informational) must be a string`);
  }
  if (!isObject(files)) throw new BundleFormatError(`${where}: files must be an object of name -> {sha256, bytes}`);
  for (const [name, entry] of Object.entries(files)) {
    const parts = name.split("/");
    if (name === MANIFEST || name === SIGNATURE || name.includes("\\") || parts.some((p) => p === "" || p === "." || p === "..")) {
      throw new BundleFormatError(`${where}: invalid file name ${JSON.stringify(name)} in the manifest`);
    }
    if (!isObject(entry) || typeof entry.sha256 !== "string" || !SHA256_RE.test(entry.sha256) || !isInt(entry.bytes) || entry.bytes < 0) {
      throw new BundleFormatError(`${where}: files[${JSON.stringify(name)}] must be {"sha256": 64 hex digits, "bytes": int >= 0}`);
    }
  }
  if (typeof catalogue !== "string" || !(catalogue in files)) {
    throw new BundleFormatError(`${where}: catalogue must name a listed file, got ${JSON.stringify(catalogue)}`);
  }
  checkSpec(data.spec, files, where);
  return data;
}

/** The spec (section 3) has what the client drives the graphs with. */
function checkSpec(spec, files, where) {
  const bad = (what) => new BundleFormatError(`${where}: spec: ${what}`);
  if (!isObject(spec)) throw bad("not an object");
  if (spec.format !== FORMAT_VERSION) throw bad(`format must be ${FORMAT_VERSION}, got ${JSON.stringify(spec.format)}`);
  for (const k of ["num_items", "d_model", "num_heads", "top_k", "step_top_k", "num_explanations_out", "max_events"]) {
    if (!isInt(spec[k]) || spec[k] < (k === "num_explanations_out" ? 0 : 1)) throw bad(`${k} must be a positive integer`);
  }
  if (spec.step_top_k > spec.top_k) throw bad("step_top_k exceeds top_k");
  const listed = (name, what) => {
    if (typeof name !== "string" || !(name in files)) throw bad(`${what} must name a listed file, got ${JSON.stringify(name)}`);
  };
  listed(spec.weights, "weights");
  if (!isObject(spec.states) || !("lru_state" in spec.states)) throw bad("states must hold lru_state");
  for (const [name, s] of Object.entries(spec.states)) {
    if (!isObject(s) || !Array.isArray(s.shape) || !s.shape.every((d) => isInt(d) && d >= 0) || s.dtype !== "float32") {
      throw bad(`states.${name} must be {"shape": [ints], "dtype": "float32"}`);
    }
  }
  const values = (list, what) => {
    if (!Array.isArray(list)) throw bad(`${what} must be a list`);
    for (const v of list) {
      const dimsOk = Array.isArray(v?.shape) && v.shape.every((d) => d === "batch" || (isInt(d) && d >= 0));
      if (!isObject(v) || typeof v.name !== "string" || !dimsOk || !["int64", "float32", "bool"].includes(v.dtype)) {
        throw bad(`${what} entries must be {"name", "shape", "dtype"}`);
      }
    }
  };
  if (!isObject(spec.graphs)) throw bad("graphs must be an object");
  for (const g of ["step", "rank", "encoder"]) {
    const graph = spec.graphs[g];
    if (!isObject(graph)) throw bad(`graphs.${g} is missing`);
    listed(graph.file, `graphs.${g}.file`);
    values(graph.inputs, `graphs.${g}.inputs`);
    values(graph.outputs, `graphs.${g}.outputs`);
    if (!Array.isArray(graph.personal) || !graph.personal.every((n) => typeof n === "string")) {
      throw bad(`graphs.${g}.personal must be a list of names`);
    }
  }
  const p = spec.personalize;
  if (!isObject(p)) throw bad("personalize is missing");
  listed(p.file, "personalize.file");
  listed(p.initial, "personalize.initial");
  values(p.inputs, "personalize.inputs");
  values(p.outputs, "personalize.outputs");
  for (const v of p.inputs) {
    if (!isInt(v.offset) || v.offset < 0 || v.dtype !== "float32") throw bad(`personalize.inputs ${v.name}: needs a float32 dtype and a byte offset`);
    const encoding = v.encoding ?? "float32";
    if (encoding === "int8-rows" ? !(isInt(v.scales) && v.scales >= 0) : encoding !== "float32") {
      throw bad(`personalize.inputs ${v.name}: encoding must be "float32", or "int8-rows" with a scales offset`);
    }
  }
}

/** Check listing (where possible), then every file's size and sha256; the verified bytes by name. */
async function checkFiles(source, files) {
  const where = source.describe;
  if (source.canList) {
    const present = new Map();
    for (const entry of await source.list()) {
      if (entry.name !== MANIFEST && entry.name !== SIGNATURE && entry.type !== "dir") present.set(entry.name, entry.type);
    }
    const unlisted = [...present.keys()].filter((n) => !(n in files)).sort();
    if (unlisted.length) throw new BundleTampered(`${where}: files not in the signed manifest: ${JSON.stringify(unlisted)}`);
    const missing = Object.keys(files).filter((n) => !present.has(n)).sort();
    if (missing.length) throw new BundleTampered(`${where}: files listed in the manifest are missing: ${JSON.stringify(missing)}`);
    for (const [name, type] of present) {
      if (type !== "file") throw new BundleTampered(`${where}/${name}: not a regular file (symlinks and special files are refused)`);
    }
  }
  const out = new Map();
  for (const [name, entry] of Object.entries(files)) {
    const bytes = await source.read(name, entry.bytes);
    if (bytes === null) throw new BundleTampered(`${where}: ${name} is listed in the manifest but missing`);
    if (bytes.length !== entry.bytes) {
      const got = bytes.length > entry.bytes ? `more than ${entry.bytes}` : `${bytes.length}`;
      throw new BundleTampered(`${where}/${name}: ${got} bytes, the manifest says ${entry.bytes} (truncated or replaced)`);
    }
    if ((await sha256Hex(bytes)) !== entry.sha256) {
      throw new BundleTampered(`${where}/${name}: sha256 differs from the signed manifest (the file was modified)`);
    }
    out.set(name, bytes);
  }
  return out;
}

/**
 * A bundle served over HTTP(S) (a browser, React Native): files are fetched relative to `baseUrl`. A URL
 * cannot be listed, so an extra file next to the bundle is not detected (every listed file is still checked).
 * @param {string | URL} baseUrl  the bundle folder's URL (a trailing slash is added)
 * @param {{fetch?: typeof fetch, init?: RequestInit}} [options]
 * @returns {BundleSource}
 */
export function urlSource(baseUrl, options = {}) {
  const doFetch = options.fetch ?? globalThis.fetch;
  if (typeof doFetch !== "function") throw new TypeError("urlSource needs fetch (pass options.fetch)");
  const base = new URL(String(baseUrl).replace(/\/?$/, "/"), globalThis.location?.href);
  return {
    describe: base.href.replace(/\/$/, ""),
    canList: false,
    async read(name, maxBytes) {
      const url = new URL(name.split("/").map(encodeURIComponent).join("/"), base);
      let response;
      try {
        response = await doFetch(url.href, options.init);
      } catch (err) {
        throw new BundleError(`${url.href}: could not be fetched (${err.message})`);
      }
      if (response.status === 404) return null;
      if (!response.ok) throw new BundleError(`${url.href}: HTTP ${response.status}`);
      const length = Number(response.headers.get("content-length"));
      if (Number.isFinite(length) && length > maxBytes && !response.headers.get("content-encoding")) {
        await response.body?.cancel();
        return new Uint8Array(maxBytes + 1); // too long: refused by the size check without downloading it
      }
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

/**
 * A bundle held in memory: a map (or object) of file name -> bytes, e.g. unpacked from an app asset. It can be
 * listed, so extra files are refused.
 * @param {Map<string, Uint8Array> | Record<string, Uint8Array>} files
 * @param {string} [describe]
 * @returns {BundleSource}
 */
export function memorySource(files, describe = "<memory bundle>") {
  const map = files instanceof Map ? files : new Map(Object.entries(files));
  return {
    describe,
    canList: true,
    async list() {
      return [...map.keys()].map((name) => ({ name, type: "file" }));
    },
    async read(name, maxBytes) {
      const bytes = map.get(name);
      if (bytes === undefined) return null;
      const b = asBytes(bytes);
      return b.length > maxBytes ? b.subarray(0, maxBytes + 1) : b;
    },
  };
}
