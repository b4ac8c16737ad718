// Byte helpers shared by the bundle and the store: WebCrypto, hex, base64, UTF-8, gzip. Platform-neutral
// (Node >= 20, browsers, React Native with a WebCrypto polyfill); no Node module is imported here.

/** @returns {SubtleCrypto} */
export function subtle() {
  const s = globalThis.crypto?.subtle;
  if (!s) {
    throw new Error(
      "WebCrypto (globalThis.crypto.subtle) is not available: use Node >= 20, a browser in a secure context " +
        "(https or localhost), or install a WebCrypto polyfill with Ed25519 and AES-GCM (React Native)",
    );
  }
  return s;
}

/** Cryptographically random bytes. @param {number} n */
export function randomBytes(n) {
  const out = new Uint8Array(n);
  globalThis.crypto.getRandomValues(out);
  return out;
}

/** A view of `data` as a Uint8Array (no copy). @param {ArrayBuffer|ArrayBufferView} data */
export function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  throw new TypeError(`expected bytes (Uint8Array or ArrayBuffer), got ${Object.prototype.toString.call(data)}`);
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/** Lowercase hex. @param {Uint8Array} bytes */
export function toHex(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += HEX[bytes[i]];
  return s;
}

/** sha256 as 64 lowercase hex digits. @param {Uint8Array} bytes */
export async function sha256Hex(bytes) {
  return toHex(new Uint8Array(await subtle().digest("SHA-256", bytes)));
}

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_INDEX = new Int16Array(128).fill(-1);
for (let i = 0; i < 64; i++) B64_INDEX[B64.charCodeAt(i)] = i;

/** Standard base64 with padding. @param {Uint8Array} bytes */
export function toBase64(bytes) {
  const parts = [];
  let s = "";
  const n = bytes.length;
  let i = 0;
  for (; i + 2 < n; i += 3) {
    const v = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
    s += B64[v >> 18] + B64[(v >> 12) & 63] + B64[(v >> 6) & 63] + B64[v & 63];
    if (s.length > 8192) {
      parts.push(s);
      s = "";
    }
  }
  if (i < n) {
    const v = (bytes[i] << 16) | ((i + 1 < n ? bytes[i + 1] : 0) << 8);
    s += B64[v >> 18] + B64[(v >> 12) & 63] + (i + 1 < n ? B64[(v >> 6) & 63] : "=") + "=";
  }
  parts.push(s);
  return parts.join("");
}

/** Decode standard base64 (padding required, no whitespace); null if malformed. @param {string} text */
export function fromBase64(text) {
  if (typeof text !== "string" || text.length % 4 !== 0) return null;
  let pad = 0;
  if (text.endsWith("==")) pad = 2;
  else if (text.endsWith("=")) pad = 1;
  const out = new Uint8Array((text.length / 4) * 3 - pad);
  let o = 0;
  for (let i = 0; i < text.length; i += 4) {
    const q = [0, 1, 2, 3].map((j) => {
      const c = text.charCodeAt(i + j);
      if (c === 61 && i + 4 === text.length && j >= 4 - pad) return 0; // "=" padding
      return c < 128 ? B64_INDEX[c] : -1;
    });
    if (q.some((v) => v < 0)) return null;
    const v = (q[0] << 18) | (q[1] << 12) | (q[2] << 6) | q[3];
    out[o++] = v >> 16;
    if (o < out.length) out[o++] = (v >> 8) & 255;
    if (o < out.length) out[o++] = v & 255;
  }
  return out;
}

const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true });

/** Strict UTF-8 decoding (throws TypeError on invalid bytes). @param {Uint8Array} bytes */
export function utf8Decode(bytes) {
  return STRICT_UTF8.decode(bytes);
}

/** @param {string} text */
export function utf8Encode(text) {
  return new TextEncoder().encode(text);
}

/** gunzip with the platform's DecompressionStream (browsers, Node >= 18). @param {Uint8Array} bytes */
export async function gunzipStream(bytes) {
  if (typeof DecompressionStream === "undefined") {
    throw new Error(
      "this platform has no DecompressionStream to read catalogue.json.gz: pass a gunzip function " +
        "(bytes -> Promise<Uint8Array>) in the options",
    );
  }
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}
