// tme-psr JavaScript client: platform-neutral entry point (browsers, React Native, Node). Node's folder
// bundle source and file store are in "tme-psr-client/node".

export * from "./errors.js";
export { verifyBundle, importPublicKey, urlSource, memorySource, VerifiedBundle, FORMAT_VERSION } from "./bundle.js";
export {
  EncryptedStore,
  MemoryStorage,
  WebStorage,
  emptyRecord,
  STORE_FORMAT_VERSION,
  HEADER_SIZE,
  KEY_SIZE,
} from "./store.js";
export { Recommender, unixSeconds, idsSha, initialPersonal, MAX_TIMESTAMP } from "./recommender.js";
