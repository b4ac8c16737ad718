// Node entry point: everything of the platform-neutral one, plus a bundle folder source (it lists the folder,
// so unlisted files and symlinks are refused) and a file storage with atomic writes (temp file in the same
// folder, fsync, rename, fsync the folder). `Recommender.open({bundle: "/path/to/bundle", ...})` takes a path.

import { randomBytes as nodeRandomBytes } from "node:crypto";
import * as fs from "node:fs/promises";
import * as path from "node:path";

import { BundleTampered, CorruptStore } from "./errors.js";
import { EncryptedStore } from "./store.js";
import { Recommender as BaseRecommender } from "./recommender.js";

export * from "./index.js";

/**
 * A bundle folder on disk.
 * @param {string} dir
 * @returns {import("./bundle.js").BundleSource}
 */
export function directorySource(dir) {
  const root = path.resolve(dir);
  return {
    describe: root,
    canList: true,
    async list() {
      const out = [];
      const walk = async (rel) => {
        let entries;
        try {
          entries = await fs.readdir(path.join(root, rel), { withFileTypes: true });
        } catch (err) {
          if (rel === "" && err.code === "ENOENT") return;
          throw err;
        }
        for (const e of entries) {
          const name = rel ? `${rel}/${e.name}` : e.name;
          if (e.isDirectory()) {
            out.push({ name, type: "dir" });
            await walk(name);
          } else {
            out.push({ name, type: e.isFile() ? "file" : e.isSymbolicLink() ? "symlink" : "other" });
          }
        }
      };
      await walk("");
      return out;
    },
    async read(name, maxBytes) {
      const file = path.join(root, ...name.split("/"));
      let stat;
      try {
        stat = await fs.lstat(file);
      } catch (err) {
        if (err.code === "ENOENT" || err.code === "ENOTDIR") return null;
        throw err;
      }
      if (!stat.isFile()) throw new BundleTampered(`${file}: not a regular file (symlinks and special files are refused)`);
      const fh = await fs.open(file, fs.constants?.O_RDONLY ?? "r");
      try {
        // read at most maxBytes + 1 bytes: a longer file is refused by the size check without reading it all
        const want = Math.min(stat.size, maxBytes + 1);
        const buf = new Uint8Array(want);
        let got = 0;
        while (got < want) {
          const { bytesRead } = await fh.read(buf, got, want - got, got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
        return got === want ? buf : buf.subarray(0, got);
      } finally {
        await fh.close();
      }
    },
  };
}

/** A store file on disk, replaced atomically on each save. */
export class FileStorage {
  /** @param {string} file */
  constructor(file) {
    this.path = path.resolve(file);
    this.describe = this.path;
    this.lockKey = `file:${this.path}`;
  }
  async read() {
    try {
      return new Uint8Array(await fs.readFile(this.path));
    } catch (err) {
      if (err.code === "ENOENT") return null;
      if (err.code === "EISDIR") throw new CorruptStore(`${this.path}: a folder, not a store file`);
      throw err;
    }
  }
  /** @param {Uint8Array} bytes */
  async write(bytes) {
    const dir = path.dirname(this.path);
    await fs.mkdir(dir, { recursive: true });
    const tmp = path.join(dir, `.${path.basename(this.path)}.${nodeRandomBytes(6).toString("hex")}.tmp`);
    let fh = await fs.open(tmp, "wx", 0o600);
    try {
      await fh.writeFile(bytes);
      await fh.sync();
      await fh.close();
      fh = null;
      await fs.rename(tmp, this.path);
    } catch (err) {
      await fh?.close().catch(() => {});
      await fs.unlink(tmp).catch(() => {});
      throw err;
    }
    if (process.platform !== "win32") {
      const d = await fs.open(dir, "r");
      try {
        await d.sync();
      } finally {
        await d.close();
      }
    }
  }
}

/**
 * An encrypted store file: `fileStore(path, {key})` (a raw 32-byte key) or `fileStore(path, {passphrase})`.
 * @param {string} file @param {{key?: Uint8Array, passphrase?: string}} options
 */
export function fileStore(file, options) {
  return new EncryptedStore(new FileStorage(file), options);
}

/** The PEM text of a public key file. @param {string} file */
export async function readPublicKey(file) {
  return fs.readFile(file, "utf8");
}

/** The Recommender, with bundle folders given by path. */
export class Recommender extends BaseRecommender {
  static _source(bundle) {
    return typeof bundle === "string" ? directorySource(bundle) : super._source(bundle);
  }
}
