// The encrypted device store, format 3 (docs/BUNDLE.md section 6): a 44-byte header, then the AES-256-GCM
// ciphertext (tag appended) of a UTF-8 JSON payload, the header as associated data. Shared byte for byte
// with the Python runtime (client_sdk.store): a store one writes, the other reads.

import { asBytes, fromBase64, randomBytes, subtle, toBase64, utf8Decode, utf8Encode } from "./bytes.js";
import { CorruptStore, StoreError, StoreInUse, UnsupportedStoreVersion, WrongKeyOrTampered } from "./errors.js";

export const STORE_FORMAT_VERSION = 3;
export const MAGIC = utf8Encode("TMEPSR-STORE\0");
export const KDF_RAW = 0;
export const KDF_SCRYPT = 1;
export const KEY_SIZE = 32;
export const SALT_SIZE = 16;
export const NONCE_SIZE = 12;
export const TAG_SIZE = 16;
export const HEADER_SIZE = MAGIC.length + 2 + 1 + SALT_SIZE + NONCE_SIZE; // 44
export const SCRYPT = { N: 2 ** 15, r: 8, p: 1 };

/**
 * @typedef {"float32" | "float64" | "int32" | "int64" | "bool"} DType
 * @typedef {{dtype: DType, shape: number[], data: Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array}} NDArray
 * @typedef {{items: number[], times: number[], state: Record<string, NDArray>, weights: Record<string, NDArray>, meta: Record<string, any>}} DeviceRecord
 * @typedef {object} StorageAdapter  where the encrypted bytes live
 * @property {string} describe  a label for messages
 * @property {() => Promise<Uint8Array | null>} read  the file's bytes, null when there is none
 * @property {(bytes: Uint8Array) => Promise<void>} write  replace them atomically
 * @property {unknown} [lockKey]  identity of the underlying file for the writer lock (default: the adapter)
 */

const TYPED = {
  float32: Float32Array,
  float64: Float64Array,
  int32: Int32Array,
  int64: BigInt64Array,
  bool: Uint8Array,
};

/** An empty record: no history, no state, no personal weights. @returns {DeviceRecord} */
export function emptyRecord() {
  return { items: [], times: [], state: {}, weights: {}, meta: {} };
}

/** Storage in memory (tests, or an app that persists the bytes itself). */
export class MemoryStorage {
  /** @param {Uint8Array | null} [bytes] @param {string} [describe] */
  constructor(bytes = null, describe = "<memory store>") {
    this.bytes = bytes;
    this.describe = describe;
  }
  async read() {
    return this.bytes === null ? null : this.bytes.slice();
  }
  /** @param {Uint8Array} bytes */
  async write(bytes) {
    this.bytes = bytes.slice();
  }
}

/**
 * Storage in a Web Storage area (`localStorage` by default) under `name`, as base64. One setItem replaces the
 * value whole, so a save is atomic. localStorage holds about 5 MB per origin: enough for a history of tens of
 * thousands of events and the personal weights of a small model.
 */
export class WebStorage {
  /** @param {string} name @param {Storage} [area] */
  constructor(name, area = globalThis.localStorage) {
    if (!area) throw new TypeError("WebStorage needs a Storage area (window.localStorage)");
    this.name = name;
    this.area = area;
    this.describe = `localStorage[${JSON.stringify(name)}]`;
    this.lockKey = `webstorage:${name}`;
  }
  async read() {
    const text = this.area.getItem(this.name);
    if (text === null) return null;
    const bytes = fromBase64(text);
    if (!bytes) throw new CorruptStore(`${this.describe}: not base64`);
    return bytes;
  }
  /** @param {Uint8Array} bytes */
  async write(bytes) {
    this.area.setItem(this.name, toBase64(bytes));
  }
}

/** Default scrypt: node:crypto where it exists (Node, Electron, Deno), else a clear error. */
async function defaultScrypt(passphrase, salt) {
  if (!globalThis.process?.versions?.node) {
    throw new StoreError(
      "passphrase stores need scrypt (node:crypto.scrypt), which this platform (a browser, React Native) does " +
        "not have: use a raw 32-byte key from the platform keystore, or pass options.scrypt",
    );
  }
  const { scrypt } = await import(/* webpackIgnore: true */ "node:crypto");
  return new Promise((resolve, reject) =>
    scrypt(utf8Encode(passphrase), salt, KEY_SIZE,
      { ...SCRYPT, maxmem: 256 * SCRYPT.N * SCRYPT.r }, (err, key) => (err ? reject(err) : resolve(new Uint8Array(key)))),
  );
}

const HELD = new Set(); // lock keys of the stores a Recommender of this process holds

/**
 * One AES-256-GCM encrypted store, keyed by a raw 32-byte key or a passphrase (scrypt, salt in the header).
 */
export class EncryptedStore {
  /**
   * @param {StorageAdapter} storage
   * @param {{key?: Uint8Array, passphrase?: string,
   *   scrypt?: (passphrase: string, salt: Uint8Array) => Promise<Uint8Array>}} options
   */
  constructor(storage, options = {}) {
    if (!storage || typeof storage.read !== "function" || typeof storage.write !== "function") {
      throw new TypeError("storage must be a storage adapter with read() and write()");
    }
    const { key, passphrase } = options;
    if ((key === undefined) === (passphrase === undefined)) throw new TypeError("give exactly one of key and passphrase");
    if (key !== undefined && (!(key instanceof Uint8Array) || key.length !== KEY_SIZE)) {
      throw new TypeError(`key must be ${KEY_SIZE} raw bytes (a Uint8Array)`);
    }
    if (passphrase !== undefined && (typeof passphrase !== "string" || !passphrase)) {
      throw new TypeError("passphrase must be a non-empty string");
    }
    this.storage = storage;
    this._key = key;
    this._passphrase = passphrase;
    this._scrypt = options.scrypt ?? defaultScrypt;
    /** @type {[Uint8Array, Uint8Array] | null} */
    this._derived = null; // (salt, key) of the last scrypt derivation
  }

  get describe() {
    return this.storage.describe;
  }

  /** Whether the store holds a file (it may still fail to load). */
  async exists() {
    return (await this.storage.read()) !== null;
  }

  /** Read, authenticate and decode; null when there is no file. @returns {Promise<DeviceRecord | null>} */
  async load() {
    const blob = await this.storage.read();
    if (blob === null) return null;
    return this.open(blob);
  }

  /** Authenticate and decode store bytes. @param {Uint8Array} blob @returns {Promise<DeviceRecord>} */
  async open(blob) {
    blob = asBytes(blob);
    const header = parseHeader(blob, this.describe);
    const key = await this._keyFor(header);
    let payload;
    try {
      payload = new Uint8Array(
        await subtle().decrypt(
          { name: "AES-GCM", iv: header.nonce, additionalData: blob.subarray(0, HEADER_SIZE), tagLength: 128 },
          key,
          blob.subarray(HEADER_SIZE),
        ),
      );
    } catch {
      throw new WrongKeyOrTampered(`${this.describe}: wrong key or passphrase, or the file was modified`);
    }
    return decodePayload(payload, this.describe);
  }

  /** Validate, encrypt and atomically replace the file; nothing is written if validation fails. @param {DeviceRecord} record */
  async save(record) {
    const payload = encodePayload(record);
    const raw = this._passphrase === undefined;
    const header = {
      version: STORE_FORMAT_VERSION,
      kdf: raw ? KDF_RAW : KDF_SCRYPT,
      salt: raw ? new Uint8Array(SALT_SIZE) : await this._saltForSave(),
      nonce: randomBytes(NONCE_SIZE),
    };
    await this.storage.write(await this.seal(header, payload));
  }

  /** @param {{version: number, kdf: number, salt: Uint8Array, nonce: Uint8Array}} header @param {Uint8Array} payload */
  async seal(header, payload) {
    const head = packHeader(header);
    const key = await this._keyFor(header);
    const ct = new Uint8Array(
      await subtle().encrypt({ name: "AES-GCM", iv: header.nonce, additionalData: head, tagLength: 128 }, key, payload),
    );
    const out = new Uint8Array(head.length + ct.length);
    out.set(head);
    out.set(ct, head.length);
    return out;
  }

  /** Take the store's writer lock (one Recommender per store in this process). @returns {{release(): void}} */
  writerLock() {
    const id = this.storage.lockKey ?? this.storage;
    if (HELD.has(id)) {
      throw new StoreInUse(`${this.describe}: another writer has this store open (close that Recommender first)`);
    }
    HELD.add(id);
    let held = true;
    return {
      release() {
        if (held) HELD.delete(id);
        held = false;
      },
    };
  }

  async _keyFor(header) {
    let key;
    if (header.kdf === KDF_RAW) {
      if (this._key === undefined) {
        throw new WrongKeyOrTampered(`${this.describe}: the header says a raw key protects the file, but a passphrase was given`);
      }
      key = this._key;
    } else {
      if (this._passphrase === undefined) {
        throw new WrongKeyOrTampered(`${this.describe}: the header says a passphrase protects the file, but a raw key was given`);
      }
      if (this._derived === null || !equalBytes(this._derived[0], header.salt)) {
        this._derived = [header.salt.slice(), asBytes(await this._scrypt(this._passphrase, header.salt))];
      }
      key = this._derived[1];
    }
    return subtle().importKey("raw", key, { name: "AES-GCM" }, false, ["encrypt", "decrypt"]);
  }

  async _saltForSave() {
    if (this._derived !== null) return this._derived[0];
    try {
      const blob = await this.storage.read();
      if (blob !== null) {
        const header = parseHeader(blob, this.describe);
        if (header.kdf === KDF_SCRYPT) return header.salt;
      }
    } catch {
      // unreadable: a fresh salt
    }
    return randomBytes(SALT_SIZE);
  }
}

function equalBytes(a, b) {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/** @param {{version: number, kdf: number, salt: Uint8Array, nonce: Uint8Array}} h */
export function packHeader(h) {
  const out = new Uint8Array(HEADER_SIZE);
  out.set(MAGIC);
  let o = MAGIC.length;
  out[o++] = (h.version >> 8) & 255;
  out[o++] = h.version & 255;
  out[o++] = h.kdf;
  out.set(h.salt, o);
  out.set(h.nonce, o + SALT_SIZE);
  return out;
}

/** @param {Uint8Array} blob @param {string} where */
export function parseHeader(blob, where) {
  if (blob.length < HEADER_SIZE) {
    throw new CorruptStore(`${where}: ${blob.length} bytes is shorter than a store header (${HEADER_SIZE} bytes)`);
  }
  if (!equalBytes(blob.subarray(0, MAGIC.length), MAGIC)) throw new CorruptStore(`${where}: not a tme-psr store (bad magic)`);
  const version = (blob[MAGIC.length] << 8) | blob[MAGIC.length + 1];
  const kdf = blob[MAGIC.length + 2];
  if (version < 1) throw new CorruptStore(`${where}: invalid format version ${version}`);
  if (version > STORE_FORMAT_VERSION) {
    throw new UnsupportedStoreVersion(`${where}: store format ${version} is newer than this client reads (${STORE_FORMAT_VERSION})`);
  }
  if (version < STORE_FORMAT_VERSION) {
    throw new UnsupportedStoreVersion(
      `${where}: store format ${version} (a numpy payload) is read by the Python runtime only; ` +
        "open and save it once there (it rewrites it as format 3), or call syncHistory on a new store",
    );
  }
  if (kdf !== KDF_RAW && kdf !== KDF_SCRYPT) throw new CorruptStore(`${where}: unknown key derivation ${kdf}`);
  const s = MAGIC.length + 3;
  return { version, kdf, salt: blob.slice(s, s + SALT_SIZE), nonce: blob.slice(s + SALT_SIZE, s + SALT_SIZE + NONCE_SIZE) };
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

/** The payload bytes of a record (validated). @param {DeviceRecord} record */
export function encodePayload(record) {
  const { items, times } = record;
  const ints = (name, v) => {
    const arr = Array.from(v ?? [], (x) => (typeof x === "bigint" ? Number(x) : x));
    if (!arr.every((x) => Number.isSafeInteger(x) && x >= 0)) throw new RangeError(`${name} must be whole numbers in [0, 2**53)`);
    return arr;
  };
  const payload = {
    items: ints("items", items),
    times: ints("times", times),
    state: encodeGroup("state", record.state ?? {}),
    weights: encodeGroup("weights", record.weights ?? {}),
    meta: record.meta ?? {},
  };
  if (payload.items.length !== payload.times.length) {
    throw new RangeError(`items (${payload.items.length}) and times (${payload.times.length}) differ in length`);
  }
  if (!isObject(payload.meta)) throw new TypeError("meta must be a plain object");
  let text;
  try {
    text = JSON.stringify(payload);
  } catch (err) {
    throw new TypeError(`meta is not JSON-serialisable: ${err.message}`);
  }
  return utf8Encode(text);
}

function encodeGroup(group, tensors) {
  const out = {};
  for (const [name, value] of Object.entries(tensors)) {
    if (!name) throw new TypeError(`${group}: names must be non-empty strings`);
    const { dtype, shape, data } = value;
    const T = TYPED[dtype];
    if (!T || !(data instanceof T)) throw new TypeError(`${group}[${name}]: dtype ${dtype} with a ${data?.constructor?.name}`);
    if (!Array.isArray(shape) || shape.reduce((a, b) => a * b, 1) !== data.length) {
      throw new RangeError(`${group}[${name}]: shape ${JSON.stringify(shape)} does not hold ${data.length} values`);
    }
    if ((dtype === "float32" || dtype === "float64") && !data.every(Number.isFinite)) {
      throw new RangeError(`${group}[${name}] contains NaN or Inf`);
    }
    out[name] = { dtype, shape: [...shape], data: toBase64(asBytes(data)) };
  }
  return out;
}

/** A record from payload bytes. @param {Uint8Array} payload @param {string} where @returns {DeviceRecord} */
export function decodePayload(payload, where) {
  const bad = (what) => new CorruptStore(`${where}: unreadable payload (${what})`);
  let data;
  try {
    data = JSON.parse(utf8Decode(payload));
  } catch (err) {
    throw bad(err.message);
  }
  const keys = ["items", "meta", "state", "times", "weights"];
  if (!isObject(data) || Object.keys(data).sort().join() !== keys.join()) {
    throw bad(`the payload must be an object with exactly ${JSON.stringify(keys)}`);
  }
  const { items, times, meta } = data;
  const intList = (v) => Array.isArray(v) && v.every((x) => Number.isSafeInteger(x) && x >= 0);
  if (!intList(items) || !intList(times) || items.length !== times.length) {
    throw bad("items/times are not two lists of whole numbers in [0, 2**53) of the same length");
  }
  if (!isObject(meta)) throw bad("meta is not a JSON object");
  return {
    items,
    times,
    state: decodeGroup(data.state, "state", bad),
    weights: decodeGroup(data.weights, "weights", bad),
    meta,
  };
}

function decodeGroup(group, label, bad) {
  if (!isObject(group)) throw bad(`${label} is not an object`);
  const out = {};
  for (const [name, entry] of Object.entries(group)) {
    const T = TYPED[entry?.dtype];
    const exact = isObject(entry) && Object.keys(entry).sort().join() === "data,dtype,shape";
    if (!name || !exact || !T || typeof entry.data !== "string" || !Array.isArray(entry.shape) || !entry.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw bad(`${label}[${JSON.stringify(name)}] is not {dtype, shape, data}`);
    }
    const bytes = fromBase64(entry.data);
    const count = entry.shape.reduce((a, b) => a * b, 1);
    if (!bytes || bytes.length !== count * T.BYTES_PER_ELEMENT) {
      throw bad(`${label}[${JSON.stringify(name)}]: data does not hold shape ${JSON.stringify(entry.shape)}`);
    }
    const values = new T(bytes.buffer, bytes.byteOffset, count);
    if ((entry.dtype === "float32" || entry.dtype === "float64") && !values.every(Number.isFinite)) {
      throw bad(`${label}[${JSON.stringify(name)}] contains NaN or Inf`);
    }
    out[name] = { dtype: entry.dtype, shape: entry.shape, data: values };
  }
  return out;
}
