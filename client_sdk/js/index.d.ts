// Types of tme-psr-client (the platform-neutral entry point "tme-psr-client" and the Node one
// "tme-psr-client/node", which adds directorySource, FileStorage, fileStore, readPublicKey and a Recommender
// that also takes a bundle folder's path).

/** The onnxruntime module the caller injects: onnxruntime-node, onnxruntime-web or onnxruntime-react-native. */
export type OrtModule = {
  InferenceSession: { create(model: Uint8Array, options?: Record<string, unknown>): Promise<any> };
  Tensor: new (type: string, data: any, dims: readonly number[]) => any;
};

export class DeviceRuntimeError extends Error {}
export class BundleError extends DeviceRuntimeError {}
export class BundleSignatureError extends BundleError {}
export class BundleTampered extends BundleError {}
export class BundleFormatError extends BundleError {}
export class StoreError extends DeviceRuntimeError {}
export class WrongKeyOrTampered extends StoreError {}
export class CorruptStore extends StoreError {}
export class StoreInUse extends StoreError {}
export class UnsupportedStoreVersion extends StoreError {}
export class RuntimeInputError extends DeviceRuntimeError {}
export class UnknownItem extends RuntimeInputError {}
export class OutOfOrderEvent extends RuntimeInputError {}
export class IncompatibleStore extends RuntimeInputError {}

// ---------------------------------------------------------------- bundles
export const FORMAT_VERSION: 3;
export type PublicKeySource = string | Uint8Array | ArrayBuffer | CryptoKey;
export interface SourceEntry {
  name: string;
  type: "file" | "dir" | "symlink" | "other";
}
/** Where a bundle's files come from. */
export interface BundleSource {
  describe: string;
  /** Whether list() exists: a folder can be listed (unlisted files are refused), a URL cannot. */
  canList: boolean;
  list?(): Promise<SourceEntry[]>;
  /** A file's bytes (at most maxBytes + 1 of them), null when it does not exist. */
  read(name: string, maxBytes: number): Promise<Uint8Array | null>;
}
export class VerifiedBundle {
  readonly where: string;
  /** The parsed manifest.json. */
  readonly data: Record<string, any>;
  /** The manifest's sha256 (hex): the bundle's identity. */
  readonly sha256: string;
  readonly modelVersion: string;
  readonly formatVersion: number;
  readonly spec: Record<string, any>;
  /** A listed file's verified bytes. */
  read(name: string): Uint8Array;
}
export function importPublicKey(source: PublicKeySource): Promise<CryptoKey>;
export function verifyBundle(source: BundleSource, publicKey: PublicKeySource): Promise<VerifiedBundle>;
/** A bundle over HTTP(S), relative to baseUrl; cannot list the folder. */
export function urlSource(baseUrl: string | URL, options?: { fetch?: typeof fetch; init?: RequestInit }): BundleSource;
/** A bundle held in memory (file name -> bytes); listed, so extra files are refused. */
export function memorySource(files: Map<string, Uint8Array> | Record<string, Uint8Array>, describe?: string): BundleSource;

// ---------------------------------------------------------------- the store
export const STORE_FORMAT_VERSION: 3;
export const HEADER_SIZE: 44;
export const KEY_SIZE: 32;
export type DType = "float32" | "float64" | "int32" | "int64" | "bool";
export interface NDArray {
  dtype: DType;
  shape: number[];
  data: Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array;
}
export interface DeviceRecord {
  items: number[];
  times: number[];
  state: Record<string, NDArray>;
  weights: Record<string, NDArray>;
  meta: Record<string, any>;
}
export function emptyRecord(): DeviceRecord;
/** Where the encrypted bytes live. */
export interface StorageAdapter {
  describe: string;
  read(): Promise<Uint8Array | null>;
  /** Replace the bytes atomically. */
  write(bytes: Uint8Array): Promise<void>;
  /** Identity of the underlying file for the writer lock (default: the adapter object). */
  lockKey?: unknown;
}
export class MemoryStorage implements StorageAdapter {
  constructor(bytes?: Uint8Array | null, describe?: string);
  bytes: Uint8Array | null;
  describe: string;
  read(): Promise<Uint8Array | null>;
  write(bytes: Uint8Array): Promise<void>;
}
/** localStorage (or another Web Storage area), base64. */
export class WebStorage implements StorageAdapter {
  constructor(name: string, area?: Pick<Storage, "getItem" | "setItem">);
  describe: string;
  read(): Promise<Uint8Array | null>;
  write(bytes: Uint8Array): Promise<void>;
}
export interface StoreKey {
  /** A raw 32-byte key. */
  key?: Uint8Array;
  /** A passphrase (scrypt N=2^15, r=8, p=1): node:crypto.scrypt by default, else options.scrypt. */
  passphrase?: string;
  scrypt?: (passphrase: string, salt: Uint8Array) => Promise<Uint8Array>;
}
export class EncryptedStore {
  constructor(storage: StorageAdapter, options: StoreKey);
  readonly storage: StorageAdapter;
  readonly describe: string;
  exists(): Promise<boolean>;
  load(): Promise<DeviceRecord | null>;
  save(record: DeviceRecord): Promise<void>;
  writerLock(): { release(): void };
}

// ---------------------------------------------------------------- the recommender
export const MAX_TIMESTAMP: number;
export function unixSeconds(timestamp: unknown): number;
export function idsSha(ids: string[]): Promise<string>;
/** The initial personal weights from personal_init.bin (float32, or "int8-rows" with per-row scales). */
export function initialPersonal(
  personalize: { inputs: Array<{ name: string; shape: number[]; offset: number; encoding?: string; scales?: number }> },
  bytes: Uint8Array,
): Record<string, Float32Array>;

export interface Recommendation {
  /** The catalogue's item id. */
  item: string;
  title: string;
  score: number;
  /** The interest head whose term is the item's score. */
  head: number;
  /** Explanation texts, most likely first. */
  explanations: string[];
  /** Their ids in the catalogue's explanation vocabulary. */
  explanationIds: number[];
}
export interface OpenOptions {
  /** A bundle source (urlSource, memorySource, directorySource); the Node entry point also takes a folder path. */
  bundle: BundleSource | string;
  /** The pinned Ed25519 public key (PEM SubjectPublicKeyInfo or a CryptoKey). */
  publicKey: PublicKeySource;
  store: EncryptedStore;
  ort: OrtModule;
  onUnknown?: "error" | "ignore";
  onBackwards?: "error" | "clamp";
  /** intraOpNumThreads of the sessions (default 1). */
  threads?: number;
  /** Execution providers (default: the package's own, cpu for node, wasm for web). */
  executionProviders?: unknown[];
  /** Extra onnxruntime session options, merged last. */
  sessionOptions?: Record<string, unknown>;
  /**
   * Make one graph's session instead of `ort.InferenceSession.create(bytes, options)`: `file` is the graph's
   * name in the bundle, `bytes` its verified bytes, `options` the session options (with externalData). For a
   * binding without in-memory external data, create it from the verified bundle folder's path instead.
   */
  createSession?: (file: string, bytes: Uint8Array, options: Record<string, unknown>) => Promise<any>;
  /** gunzip for catalogue.json.gz where DecompressionStream is missing (React Native). */
  gunzip?: (bytes: Uint8Array) => Promise<Uint8Array>;
}
export class Recommender {
  static open(options: OpenOptions): Promise<Recommender>;
  readonly onUnknown: "error" | "ignore";
  readonly onBackwards: "error" | "clamp";
  readonly manifest: VerifiedBundle;
  readonly modelVersion: string;
  readonly catalogueIds: string[];
  readonly catalogueTitles: string[];
  /** The recorded events as [item id, unix seconds], oldest first. */
  readonly history: Array<[string, number]>;
  upgrade(bundle: BundleSource | string, publicKey: PublicKeySource): Promise<void>;
  record(item: string | number, timestamp: number | bigint, options?: { save?: boolean }): Promise<boolean>;
  recommend(k?: number, options?: { explanations?: number; excludeSeen?: boolean }): Promise<Recommendation[]>;
  syncHistory(
    events: Iterable<[string | number, number | bigint] | { item: string | number; timestamp: number | bigint }>,
  ): Promise<void>;
  save(): Promise<void>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------- Node only ("tme-psr-client/node")
export function directorySource(dir: string): BundleSource;
export class FileStorage implements StorageAdapter {
  constructor(file: string);
  readonly path: string;
  describe: string;
  read(): Promise<Uint8Array | null>;
  write(bytes: Uint8Array): Promise<void>;
}
export function fileStore(file: string, options: StoreKey): EncryptedStore;
export function readPublicKey(file: string): Promise<string>;
