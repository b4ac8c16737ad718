// The on-device recommender (docs/BUNDLE.md section 5), mirroring client_sdk.runtime.Recommender of the Python
// SDK: the same graphs, the same inputs, the same store, so both give the same recommendations.
//
// The onnxruntime module is injected (`ort`): onnxruntime-node, onnxruntime-web and onnxruntime-react-native
// share its API (InferenceSession.create, Tensor), and this file imports none of them.

import { gunzipStream, sha256Hex, utf8Decode, utf8Encode } from "./bytes.js";
import { verifyBundle } from "./bundle.js";
import {
  BundleFormatError,
  IncompatibleStore,
  OutOfOrderEvent,
  RuntimeInputError,
  StoreError,
  UnknownItem,
} from "./errors.js";
import { EncryptedStore, emptyRecord } from "./store.js";

export const MAX_TIMESTAMP = 2 ** 40; // unix seconds accepted (year 36,812); millisecond timestamps exceed it

/**
 * A timestamp as whole unix seconds in [0, 2**40), or a RuntimeInputError.
 * @param {unknown} timestamp @returns {number}
 */
export function unixSeconds(timestamp) {
  let t = timestamp;
  if (typeof t === "bigint") {
    if (t < 0n || t >= BigInt(MAX_TIMESTAMP)) {
      throw new RuntimeInputError(`timestamp must be whole unix seconds in [0, 2**40), got ${t}${millisecondsHint(Number(t))}`);
    }
    return Number(t);
  }
  if (typeof t !== "number") {
    throw new RuntimeInputError(`timestamp must be a number of unix seconds, got ${JSON.stringify(t) ?? String(t)}`);
  }
  if (!(Number.isFinite(t) && Number.isInteger(t) && t >= 0 && t < MAX_TIMESTAMP)) {
    throw new RuntimeInputError(`timestamp must be whole unix seconds in [0, 2**40), got ${t}${millisecondsHint(t)}`);
  }
  return t;
}

function millisecondsHint(value) {
  return MAX_TIMESTAMP <= value && value < 1000 * MAX_TIMESTAMP ? " (milliseconds? timestamps are unix seconds)" : "";
}

const size = (shape) => shape.reduce((a, b) => a * b, 1);
const atBatch1 = (shape) => shape.map((d) => (d === "batch" ? 1 : d));

/** sha256 hex of the item ids joined by "\n" (the store's meta.catalogue_sha). @param {string[]} ids */
export async function idsSha(ids) {
  return sha256Hex(utf8Encode(ids.join("\n")));
}

/** A typed array as Float32Array (a copy if it is another type). */
function float32(data) {
  if (data instanceof Float32Array) return data;
  return Float32Array.from(data, Number);
}

/**
 * The bundle's initial personal weights from the bytes of personal_init.bin, laid out as the personalize
 * inputs of `personalize` (spec.personalize) say: float32 at `offset` (little-endian, row-major), or, for the
 * "int8-rows" encoding, int8 at `offset` times a float32 scale per row (last axis) at `scales`.
 * @param {{inputs: Array<{name: string, shape: number[], offset: number, encoding?: string, scales?: number}>}} personalize
 * @param {Uint8Array} bytes
 * @returns {Record<string, Float32Array>}
 */
export function initialPersonal(personalize, bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = {};
  for (const v of personalize.inputs) {
    const count = size(v.shape);
    const encoding = v.encoding ?? "float32";
    const values = new Float32Array(count);
    if (encoding === "float32") {
      if (v.offset + 4 * count > bytes.length) throw new RangeError(`too short for ${v.name}`);
      for (let i = 0; i < count; i++) values[i] = view.getFloat32(v.offset + 4 * i, true);
    } else if (encoding === "int8-rows") {
      const row = v.shape.length ? v.shape[v.shape.length - 1] : 1;
      const rows = row ? count / row : 0;
      if (!Number.isInteger(v.scales) || v.offset + count > bytes.length || v.scales + 4 * rows > bytes.length) {
        throw new RangeError(`too short for ${v.name} (or no scales offset)`);
      }
      for (let r = 0; r < rows; r++) {
        const scale = view.getFloat32(v.scales + 4 * r, true);
        for (let j = 0; j < row; j++) values[r * row + j] = view.getInt8(v.offset + r * row + j) * scale; // float32 product
      }
    } else {
      throw new RangeError(`unknown encoding ${JSON.stringify(encoding)} of ${v.name}`);
    }
    out[v.name] = values;
  }
  return out;
}

/**
 * One verified bundle, loaded: catalogue, sessions and the personal inputs of each graph.
 * @typedef {object} Loaded
 * @property {import("./bundle.js").VerifiedBundle} manifest
 * @property {any} spec
 * @property {string[]} itemIds
 * @property {string[]} titles
 * @property {string[]} explanations
 * @property {Map<string, number>} index
 * @property {Record<string, any>} sessions
 * @property {Record<string, Record<string, any>>} personal  graph -> its personal input tensors
 * @property {string} catalogueSha
 * @property {Uint8Array} weights  weights.bin (kept alive with the sessions)
 */

/** @returns {Promise<Loaded>} */
async function load(ort, manifest, personalWeights, options) {
  const { spec } = manifest;
  const where = manifest.where;
  const catalogueName = manifest.data.catalogue;
  let catalogue;
  try {
    const raw = manifest.read(catalogueName);
    const text = catalogueName.endsWith(".gz") ? await (options.gunzip ?? gunzipStream)(raw) : raw;
    catalogue = JSON.parse(utf8Decode(text));
  } catch (err) {
    throw new BundleFormatError(`${where}: ${catalogueName} is not a gzip-compressed JSON catalogue (${err.message})`);
  }
  if (!Array.isArray(catalogue?.item_ids)) throw new BundleFormatError(`${where}: the catalogue has no item_ids list`);
  const itemIds = catalogue.item_ids.map(String);
  if (itemIds.length !== spec.num_items) {
    throw new IncompatibleStore(`catalogue has ${itemIds.length} items, the graphs ${spec.num_items}`);
  }
  const titles = Array.isArray(catalogue.titles) && catalogue.titles.length ? catalogue.titles.map(String) : itemIds;
  const explanations = Array.isArray(catalogue.explanations) ? catalogue.explanations.map(String) : [];

  // personalize.onnx's inputs: the store's personal weights, else personal_init.bin (section 4.1, 4.4)
  const init = manifest.read(spec.personalize.initial);
  const expected = new Map(spec.personalize.inputs.map((v) => [v.name, v.shape]));
  const wrong = Object.keys(personalWeights).filter(
    (name) => !expected.has(name) || JSON.stringify(expected.get(name)) !== JSON.stringify(personalWeights[name].shape),
  );
  if (wrong.length) {
    throw new IncompatibleStore(`the store's personal weights do not fit this bundle's model (e.g. ${JSON.stringify(wrong.slice(0, 3))})`);
  }
  let initial;
  try {
    initial = initialPersonal(spec.personalize, init);
  } catch (err) {
    throw new BundleFormatError(`${where}: ${spec.personalize.initial}: ${err.message}`);
  }
  const feeds = {};
  for (const v of spec.personalize.inputs) {
    const stored = personalWeights[v.name];
    feeds[v.name] = new ort.Tensor("float32", stored ? float32(stored.data) : initial[v.name], v.shape);
  }

  const weights = manifest.read(spec.weights);
  const sessionOptions = {
    executionProviders: options.executionProviders,
    intraOpNumThreads: options.threads,
    interOpNumThreads: 1,
    graphOptimizationLevel: "all",
    logSeverityLevel: 3,
    externalData: [{ path: spec.weights, data: weights }],
    ...options.sessionOptions,
  };
  if (sessionOptions.executionProviders === undefined) delete sessionOptions.executionProviders;
  const create = async (file, extra) => {
    const opts = { ...sessionOptions, ...extra };
    try {
      if (options.createSession) return await options.createSession(file, manifest.read(file), opts);
      return await ort.InferenceSession.create(manifest.read(file), opts);
    } catch (err) {
      throw new BundleFormatError(`${where}: onnxruntime cannot load ${file} (${err.message})`);
    }
  };
  const sessions = {};
  try {
    const personalize = await create(spec.personalize.file, {});
    let values;
    try {
      values = await personalize.run(feeds);
    } catch (err) {
      throw new BundleFormatError(`${where}: ${spec.personalize.file} failed on the personal weights (${err.message})`);
    } finally {
      await personalize.release?.();
    }
    const personal = {};
    for (const [g, graph] of Object.entries(spec.graphs)) {
      sessions[g] = await create(graph.file, { freeDimensionOverrides: { batch: 1 } });
      personal[g] = {};
      for (const name of graph.personal) {
        if (!values[name]) throw new BundleFormatError(`${where}: ${spec.personalize.file} has no output ${name}`);
        personal[g][name] = values[name];
      }
    }
    return {
      manifest, spec, itemIds, titles, explanations, sessions, personal, weights,
      index: new Map(itemIds.map((id, n) => [id, n])),
      catalogueSha: await idsSha(itemIds),
    };
  } catch (err) {
    await releaseSessions(sessions);
    throw err;
  }
}

async function releaseSessions(sessions) {
  for (const s of Object.values(sessions)) {
    try {
      await s.release?.();
    } catch {
      // already released
    }
  }
}

/** A stored history carries over to a bundle whose catalogue it was recorded with or grew from. */
async function checkHistory(items, meta, loaded) {
  const size = meta.catalogue_size;
  if (size !== undefined && size !== null && (await idsSha(loaded.itemIds.slice(0, size))) !== meta.catalogue_sha) {
    throw new IncompatibleStore(
      "the stored history was recorded against another item catalogue; call syncHistory() with the events' source item ids",
    );
  }
  if (items.some((i) => i >= loaded.itemIds.length)) {
    throw new IncompatibleStore(`stored history has item ids beyond this catalogue (${loaded.itemIds.length} items)`);
  }
}

/**
 * @typedef {{item: string, title: string, score: number, head: number, explanations: string[], explanationIds: number[]}} Recommendation
 */

/** Top-k recommendations with explanations for the device's user, from a verified bundle. */
export class Recommender {
  /** @private */
  constructor(ort, loaded, store, record, lock, options) {
    this._ort = ort;
    this._b = loaded;
    this._store = store;
    this._rec = record;
    this._lock = lock;
    this._options = options;
    this.onUnknown = options.onUnknown;
    this.onBackwards = options.onBackwards;
    this._items = [...record.items];
    this._times = [...record.times];
    this._seen = new Uint8Array(loaded.itemIds.length);
    for (const i of this._items) this._seen[i] = 1;
    this._ranking = null;
    this._queue = Promise.resolve();
    this._states = {};
    this._state = new Float32Array(loaded.spec.d_model);
  }

  /** How a string bundle argument is resolved (the Node entry point maps paths to folders). @protected */
  static _source(bundle) {
    if (typeof bundle === "string" || bundle instanceof URL) {
      throw new TypeError(
        "bundle must be a bundle source: urlSource(url) in a browser, directorySource(path) from tme-psr-client/node",
      );
    }
    return bundle;
  }

  /**
   * Verify the bundle against the pinned public key, then load it with the personal weights and history in
   * the store (an empty history and the bundle's initial weights if the store has no file yet).
   * @param {import("../index.d.ts").OpenOptions} options
   * @returns {Promise<Recommender>}
   */
  static async open(options) {
    const { bundle, publicKey, store, ort } = options ?? {};
    const opts = Recommender._options(options);
    if (!(store instanceof EncryptedStore)) throw new TypeError("store must be an EncryptedStore");
    if (!ort?.InferenceSession || !ort?.Tensor) {
      throw new TypeError("ort must be an onnxruntime module (onnxruntime-node, onnxruntime-web or onnxruntime-react-native)");
    }
    const manifest = await verifyBundle(this._source(bundle), publicKey);
    const lock = store.writerLock();
    let loaded = null;
    try {
      const record = (await store.load()) ?? emptyRecord();
      loaded = await load(ort, manifest, record.weights, opts);
      await checkHistory(record.items, record.meta, loaded);
      const rec = new this(ort, loaded, store, record, lock, opts);
      if (rec._storedStateFits()) rec._setStates(record.state);
      else await rec._reencode();
      return rec;
    } catch (err) {
      if (loaded) await releaseSessions(loaded.sessions);
      lock.release();
      throw err;
    }
  }

  static _options(o = {}) {
    const onUnknown = o.onUnknown ?? "error";
    const onBackwards = o.onBackwards ?? "error";
    if (!["error", "ignore"].includes(onUnknown) || !["error", "clamp"].includes(onBackwards)) {
      throw new RuntimeInputError(
        `onUnknown must be 'error' or 'ignore' and onBackwards 'error' or 'clamp', got ${JSON.stringify(onUnknown)}, ${JSON.stringify(onBackwards)}`,
      );
    }
    const threads = o.threads ?? 1;
    if (!Number.isInteger(threads) || threads < 0) throw new RuntimeInputError(`threads must be an integer >= 0, got ${threads}`);
    return {
      onUnknown, onBackwards, threads,
      executionProviders: o.executionProviders,
      sessionOptions: o.sessionOptions ?? {},
      gunzip: o.gunzip,
      createSession: o.createSession,
    };
  }

  /** Run `fn` after every call before it (the API is async: calls never interleave). */
  _serial(fn) {
    const next = this._queue.then(() => {
      if (this._lock === null) throw new StoreError(`${this._store.describe}: this Recommender was closed; open the store again`);
      return fn();
    });
    this._queue = next.catch(() => {});
    return next;
  }

  /**
   * Switch to a new bundle (new shared weights, perhaps a grown catalogue). It is verified and loaded
   * completely before the switch; on any error the bundle in use stays in use and nothing changes. The
   * history is re-encoded with the new weights and the store saved.
   */
  upgrade(bundle, publicKey) {
    return this._serial(async () => {
      const manifest = await verifyBundle(this.constructor._source(bundle), publicKey);
      const loaded = await load(this._ort, manifest, this._rec.weights, this._options);
      try {
        await checkHistory(this._items, this._rec.meta, loaded);
      } catch (err) {
        await releaseSessions(loaded.sessions);
        throw err;
      }
      const old = this._b;
      const saved = [this._seen, this._states, this._state, this._ranking];
      this._b = loaded;
      this._seen = new Uint8Array(loaded.itemIds.length);
      for (const i of this._items) this._seen[i] = 1;
      try {
        await this._reencode();
      } catch (err) {
        this._b = old;
        [this._seen, this._states, this._state, this._ranking] = saved;
        await releaseSessions(loaded.sessions);
        throw err;
      }
      await releaseSessions(old.sessions);
      await this._save();
    });
  }

  /** The verified manifest in use. */
  get manifest() {
    return this._b.manifest;
  }

  /** The bundle's model_version. */
  get modelVersion() {
    return this._b.manifest.modelVersion;
  }

  /** The catalogue's item ids (what record() accepts), in dense-id order. */
  get catalogueIds() {
    return this._b.itemIds;
  }

  /** The catalogue's titles, in the order of catalogueIds. */
  get catalogueTitles() {
    return this._b.titles;
  }

  /** The recorded events as [item id, unix seconds], oldest first. @returns {Array<[string, number]>} */
  get history() {
    return this._items.map((i, n) => [this._b.itemIds[i], this._times[n]]);
  }

  /**
   * Add one event and update the recurrent state with one run of step.onnx; resolves to false if the event
   * was ignored (an unknown item with onUnknown "ignore", or a repeat of the last event). `save: false`
   * defers writing the store (call save()), e.g. when replaying many events.
   * @param {string | number} item @param {number | bigint} timestamp @param {{save?: boolean}} [options]
   * @returns {Promise<boolean>}
   */
  record(item, timestamp, { save = true } = {}) {
    return this._serial(async () => {
      let t = unixSeconds(timestamp);
      const dense = this._dense(item, false);
      if (dense === null) return false;
      const items = this._items;
      const times = this._times;
      const last = times.length ? times[times.length - 1] : null;
      if (last !== null && t < last) {
        if (this.onBackwards === "error") {
          throw new OutOfOrderEvent(
            `event (${JSON.stringify(item)}, ${t}) is before the last recorded event (${last}); ` +
              "events must arrive in time order (or open with onBackwards: 'clamp')",
          );
        }
        t = last;
      }
      if (items.length && items[items.length - 1] === dense && last === t) return false;
      const b = this._b;
      const T = this._ort.Tensor;
      const wasSeen = this._seen[dense];
      this._seen[dense] = 1;
      this._ranking = null;
      const feeds = {
        item: new T("int64", BigInt64Array.of(BigInt(dense)), [1]),
        timestamp: new T("int64", BigInt64Array.of(BigInt(t)), [1]),
        exclude: new T("bool", this._seen, [1, this._seen.length]),
        ...this._stateFeeds(),
        ...b.personal.step,
      };
      let out;
      try {
        out = await b.sessions.step.run(feeds);
      } catch (err) {
        this._seen[dense] = wasSeen;
        throw err;
      }
      for (const name of Object.keys(b.spec.states)) this._states[name] = Float32Array.from(out[`next_${name}`].data);
      this._state = Float32Array.from(out.state.data);
      this._ranking = ranking(out);
      items.push(dense);
      times.push(t);
      if (save) await this._save();
      return true;
    });
  }

  /**
   * Replace the history (e.g. after a restore) with `events` ([item id, unix seconds] pairs or {item,
   * timestamp} objects), which must be in time order and known to the catalogue; re-encode it and save.
   * Nothing changes on error.
   * @param {Iterable<[string | number, number] | {item: string | number, timestamp: number}>} events
   */
  syncHistory(events) {
    return this._serial(async () => {
      const dense = [];
      const times = [];
      for (const event of events) {
        const [item, ts] = Array.isArray(event) ? event : [event?.item, event?.timestamp];
        const d = this._dense(item, true);
        const t = unixSeconds(ts);
        if (times.length && t < times[times.length - 1]) {
          throw new OutOfOrderEvent(`events are not in time order at (${JSON.stringify(item)}, ${t})`);
        }
        dense.push(d);
        times.push(t);
      }
      const saved = [this._items, this._times, this._seen, this._states, this._state, this._ranking];
      this._items = dense;
      this._times = times;
      this._seen = new Uint8Array(this._b.itemIds.length);
      for (const i of dense) this._seen[i] = 1;
      try {
        await this._reencode();
      } catch (err) {
        [this._items, this._times, this._seen, this._states, this._state, this._ranking] = saved;
        throw err;
      }
      await this._save();
    });
  }

  /**
   * The top-k items for the current state, each with score, title, driving interest head and its first
   * `explanations` explanation texts (and their ids).
   * @param {number} [k] @param {{explanations?: number, excludeSeen?: boolean}} [options]
   * @returns {Promise<Recommendation[]>}
   */
  recommend(k = 10, { explanations = 2, excludeSeen = true } = {}) {
    return this._serial(async () => {
      const b = this._b;
      const topK = b.spec.top_k;
      if (typeof k !== "number" || !Number.isInteger(k) || k < 1 || k > topK) {
        throw new RuntimeInputError(`k must be in 1..${topK} (the bundle's top_k), got ${JSON.stringify(k) ?? String(k)}`);
      }
      if (typeof explanations !== "number" || !Number.isInteger(explanations) || explanations < 0) {
        throw new RuntimeInputError(`explanations must be an integer >= 0, got ${explanations}`);
      }
      let r = excludeSeen ? this._ranking : null;
      if (r === null || k > r.width) {
        const T = this._ort.Tensor;
        const exclude = excludeSeen ? this._seen : new Uint8Array(this._seen.length);
        const feeds = {
          state: new T("float32", this._state, [1, this._state.length]),
          exclude: new T("bool", exclude, [1, exclude.length]),
          ...b.personal.rank,
        };
        for (const input of b.spec.graphs.rank.inputs) {  // the recurrent states it reads (explanation_history)
          const s = b.spec.states[input.name];
          if (s) feeds[input.name] = new T("float32", this._states[input.name], [1, ...s.shape]);
        }
        const out = await b.sessions.rank.run(feeds);
        r = ranking(out);
        if (excludeSeen) this._ranking = r;
      }
      const result = [];
      const E = r.numExplanations;
      for (let i = 0; i < k; i++) {
        const score = r.scores[i];
        if (score === -Infinity) continue; // fewer than k unseen items
        const item = Number(r.items[i]);
        const ids = [];
        if (r.explanations) {
          for (let e = 0; e < Math.min(explanations, E); e++) {
            const id = Number(r.explanations[i * E + e]);
            if (id >= 0) ids.push(id);
          }
        }
        result.push({
          item: b.itemIds[item],
          title: b.titles[item],
          score,
          head: Number(r.heads[i]),
          explanations: ids.map((id) => b.explanations[id]),
          explanationIds: ids,
        });
      }
      return result;
    });
  }

  /** Write history, recurrent state and personal weights to the encrypted store (atomically). */
  save() {
    return this._serial(() => this._save());
  }

  /**
   * Release the store's writer lock and the onnxruntime sessions; what was recorded with save: false since
   * the last save() is not written. Idempotent; any later call is a StoreError.
   */
  async close() {
    if (this._lock === null) return;
    try {
      await this._queue;
    } finally {
      if (this._lock !== null) {
        this._lock.release();
        this._lock = null;
        await releaseSessions(this._b.sessions);
      }
    }
  }

  async _save() {
    const spec = this._b.spec;
    const state = {};
    for (const [name, s] of Object.entries(spec.states)) {
      state[name] = { dtype: "float32", shape: [...s.shape], data: Float32Array.from(this._states[name]) };
    }
    state.state = { dtype: "float32", shape: [spec.d_model], data: Float32Array.from(this._state) };
    const record = {
      items: [...this._items],
      times: [...this._times],
      state,
      weights: this._rec.weights,
      meta: {
        ...this._rec.meta,
        bundle: this._b.manifest.sha256,
        catalogue_sha: this._b.catalogueSha,
        catalogue_size: this._b.itemIds.length,
      },
    };
    await this._store.save(record);
    this._rec = record;
  }

  _dense(item, strict) {
    const key = typeof item === "string" || typeof item === "number" || typeof item === "bigint" ? String(item) : null;
    const dense = key === null ? undefined : this._b.index.get(key);
    if (dense === undefined) {
      if (strict || this.onUnknown === "error") {
        throw new UnknownItem(`item ${JSON.stringify(item) ?? String(item)} is not in the bundle's catalogue (${this._b.itemIds.length} items)`);
      }
      return null;
    }
    return dense;
  }

  _stateFeeds() {
    const T = this._ort.Tensor;
    const feeds = {};
    for (const [name, s] of Object.entries(this._b.spec.states)) feeds[name] = new T("float32", this._states[name], [1, ...s.shape]);
    return feeds;
  }

  _storedStateFits() {
    const { state, meta } = this._rec;
    const spec = this._b.spec;
    const names = [...Object.keys(spec.states), "state"].sort();
    return (
      meta.bundle === this._b.manifest.sha256 &&
      JSON.stringify(Object.keys(state).sort()) === JSON.stringify(names) &&
      Object.entries(spec.states).every(([name, s]) => JSON.stringify(state[name].shape) === JSON.stringify(s.shape)) &&
      state.state.data.length === spec.d_model
    );
  }

  _setStates(values) {
    for (const [name, s] of Object.entries(this._b.spec.states)) {
      this._states[name] = values[name] ? Float32Array.from(values[name].data, Number) : new Float32Array(size(s.shape));
    }
    this._state = values.state ? Float32Array.from(values.state.data, Number) : new Float32Array(this._b.spec.d_model);
    this._ranking = null;
  }

  /** Recurrent state from the history's last max_events events through encoder.onnx. */
  async _reencode() {
    const b = this._b;
    const spec = b.spec;
    if (!this._items.length) {
      this._setStates({});
      return;
    }
    const M = spec.max_events;
    const n = Math.min(M, this._items.length);
    const items = new BigInt64Array(M);
    const timestamps = new BigInt64Array(M);
    const mask = new Uint8Array(M);
    const off = this._items.length - n;
    for (let j = 0; j < n; j++) {
      items[M - n + j] = BigInt(this._items[off + j]);
      timestamps[M - n + j] = BigInt(this._times[off + j]);
      mask[M - n + j] = 1;
    }
    const T = this._ort.Tensor;
    const out = await b.sessions.encoder.run({
      items: new T("int64", items, [1, M]),
      timestamps: new T("int64", timestamps, [1, M]),
      mask: new T("bool", mask, [1, M]),
      ...b.personal.encoder,
    });
    const values = {};
    for (const name of [...Object.keys(spec.states), "state"]) values[name] = { data: out[name].data };
    this._setStates(values);
  }
}

/** The ranking outputs of a step or rank run, at batch 1. */
function ranking(out) {
  const width = out.top_items.dims[1];
  const expl = out.top_explanations;
  return {
    width,
    items: out.top_items.data,
    scores: out.top_scores.data,
    heads: out.top_heads.data,
    explanations: expl ? expl.data : null,
    numExplanations: expl ? expl.dims[2] : 0,
  };
}
