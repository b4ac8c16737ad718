#!/usr/bin/env node
// A tiny static server for the demo page, on 127.0.0.1 only (a secure context: WebCrypto works there).
//
//   node demo/serve.mjs --bundle DIR --public-key PEM_FILE [--history EVENTS_JSON] [--port 8080]
//
// Serves /demo/ (this folder), /src/ (the client), /ort/ (onnxruntime-web's dist from node_modules: no CDN),
// /bundle/ (the bundle folder), /key.pem (the pinned public key: a real app ships it inside the app) and
// /history.json (a user's [item id, unix seconds] events, or [] for a new user). Prints one JSON line,
// {"url": ...}, when listening.

import * as fs from "node:fs";
import * as http from "node:http";
import * as path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.resolve(here, "..");

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".wasm": "application/wasm",
  ".pem": "text/plain; charset=utf-8",
};

/**
 * Start the server. @param {{bundle: string, publicKey: string, history?: string, port?: number}} options
 * @returns {Promise<{url: string, close: () => Promise<void>}>}
 */
export async function serve({ bundle, publicKey, history, port = 0 }) {
  const roots = {
    "/demo/": here,
    "/src/": path.join(pkg, "src"),
    "/ort/": path.join(pkg, "node_modules", "onnxruntime-web", "dist"),
    "/bundle/": path.resolve(bundle),
  };
  const files = { "/key.pem": path.resolve(publicKey) };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://127.0.0.1");
    let pathname;
    try {
      pathname = decodeURIComponent(url.pathname);
    } catch {
      return send(res, 400, "bad path");
    }
    if (pathname === "/" || pathname === "/demo") {
      res.writeHead(302, { location: "/demo/" });
      return res.end();
    }
    if (pathname === "/favicon.ico") {
      res.writeHead(204);
      return res.end();
    }
    if (pathname === "/history.json") {
      const body = history ? fs.readFileSync(history) : "[]";
      return send(res, 200, body, "application/json");
    }
    let file = files[pathname];
    if (!file) {
      const prefix = Object.keys(roots).find((p) => pathname.startsWith(p));
      if (!prefix) return send(res, 404, "not found");
      const root = roots[prefix];
      file = path.resolve(root, `.${pathname.slice(prefix.length - 1)}`);
      if (file !== root && !file.startsWith(root + path.sep)) return send(res, 403, "forbidden");
      if (pathname.endsWith("/")) file = path.join(file, "index.html");
    }
    fs.stat(file, (err, stat) => {
      if (err || !stat.isFile()) return send(res, 404, "not found");
      res.writeHead(200, {
        "content-type": TYPES[path.extname(file)] ?? "application/octet-stream", // never a content-encoding
        "content-length": stat.size,
        "cache-control": "no-store",
      });
      fs.createReadStream(file).pipe(res);
    });
  });
  await new Promise((resolve) => server.listen(port, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${server.address().port}/demo/`;
  const close = () =>
    new Promise((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections(); // keep-alive connections would hold close() open
    });
  return { url, close };
}

function send(res, status, body, type = "text/plain; charset=utf-8") {
  res.writeHead(status, { "content-type": type });
  res.end(body);
}

function args(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-(\w)/g, (_, c) => c.toUpperCase());
    out[key] = argv[i + 1];
  }
  return out;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const a = args(process.argv.slice(2));
  if (!a.bundle || !a.publicKey) {
    console.error("usage: node demo/serve.mjs --bundle DIR --public-key PEM_FILE [--history EVENTS_JSON] [--port N]");
    process.exit(2);
  }
  const { url } = await serve({ ...a, port: Number(a.port ?? 8080) });
  console.log(JSON.stringify({ url }));
}
