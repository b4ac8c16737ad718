// The client's one error hierarchy, mirroring client_sdk.errors / bundle / store / runtime of the Python SDK:
//
//   DeviceRuntimeError
//   |-- BundleError        (BundleSignatureError, BundleTampered, BundleFormatError)
//   |-- StoreError         (WrongKeyOrTampered, CorruptStore, StoreInUse, UnsupportedStoreVersion)
//   `-- RuntimeInputError  (UnknownItem, OutOfOrderEvent, IncompatibleStore)
//
// Each is raised before anything changes: the bundle in use, the store and the history stay as they were.

/** Base of every error the client raises on purpose. */
export class DeviceRuntimeError extends Error {
  /** @param {string} message @param {ErrorOptions} [options] */
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Base class of every error verifying a bundle. */
export class BundleError extends DeviceRuntimeError {}
/** The signature is missing, malformed, or does not match the manifest and the pinned key. */
export class BundleSignatureError extends BundleError {}
/** A file differs from the signed manifest, is missing, unlisted, a symlink or a special file. */
export class BundleTampered extends BundleError {}
/** Not a bundle, another format version, or a malformed manifest/spec/catalogue. */
export class BundleFormatError extends BundleError {}

/** Base class of every error reading or writing a store. */
export class StoreError extends DeviceRuntimeError {}
/** Authentication failed: wrong key or passphrase, or the file was modified. */
export class WrongKeyOrTampered extends StoreError {}
/** Truncated, not a store file, or a malformed header or payload. */
export class CorruptStore extends StoreError {}
/** Another writer (a second Recommender in this process) holds the store. */
export class StoreInUse extends StoreError {}
/** The file was written in a store format this client does not read. */
export class UnsupportedStoreVersion extends StoreError {}

/** An event or request the client refuses; nothing was changed. */
export class RuntimeInputError extends DeviceRuntimeError {}
/** The item id is not in the bundle's catalogue. */
export class UnknownItem extends RuntimeInputError {}
/** The event's timestamp is before the last recorded event's. */
export class OutOfOrderEvent extends RuntimeInputError {}
/** The store's history or personal weights do not fit this bundle. */
export class IncompatibleStore extends RuntimeInputError {}
