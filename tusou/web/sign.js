/* Qiniu request signatures for the browser (and node, for tests).
 *
 * Mirrors tusou/api/auth.py (qiniu_string_to_sign / sign_qiniu) and the official SDK, byte for byte:
 *
 *   METHOD SP path ["?" query] LF "Host: " host [LF "Content-Type: " ct]
 *   {LF X-Qiniu-Name ": " value} LF LF [body unless ct is absent or application/octet-stream]
 *
 *   Authorization: Qiniu AK:urlsafe_base64(hmac_sha1(SK, that))   (padding kept)
 *
 * Loaded as a plain <script> it defines the global `QiniuSign`; under node `require()` returns the same object.
 * HMAC uses WebCrypto when it is there. Browsers only expose `crypto.subtle` in secure contexts (https or
 * localhost), and tusou is often opened as http://server-ip:8000/, so a small pure-JS HMAC-SHA1 stands in
 * there rather than leaving the page unable to sign anything.
 */
(function (root, factory) {
  "use strict";
  const api = factory();
  if (typeof module === "object" && module.exports) {
    module.exports = api;
  } else {
    root.QiniuSign = api;
  }
})(typeof self !== "undefined" ? self : globalThis, function () {
  "use strict";

  const OCTET = "application/octet-stream";
  const X_QINIU = "x-qiniu-";
  const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

  /* The bytes a wire string stands for: latin-1 when it can be (what fetch sends for header values, and what
   * the server's _wire() assumes), else UTF-8 (what the SDKs sign for real Unicode). */
  function wire(s) {
    s = String(s);
    let latin1 = true;
    for (let i = 0; i < s.length; i++) {
      if (s.charCodeAt(i) > 0xff) {
        latin1 = false;
        break;
      }
    }
    if (!latin1) return new TextEncoder().encode(s);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  function bodyBytes(body) {
    if (body === undefined || body === null) return new Uint8Array(0);
    if (typeof body === "string") return new TextEncoder().encode(body);
    if (body instanceof Uint8Array) return body;
    if (body instanceof ArrayBuffer) return new Uint8Array(body);
    throw new TypeError("body must be a string, Uint8Array or ArrayBuffer");
  }

  /* x-qiniu-date -> X-Qiniu-Date; a name with a non-token character stays as written (as the SDK / Go). */
  function canonicalHeaderName(name) {
    if (!name || !TOKEN.test(name)) return name;
    let out = "";
    let upper = true;
    for (const ch of name) {
      out += upper ? ch.toUpperCase() : ch.toLowerCase();
      upper = ch === "-";
    }
    return out;
  }

  function concat(parts) {
    let n = 0;
    for (const p of parts) n += p.length;
    const out = new Uint8Array(n);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  /* The exact bytes to sign. `headers` is a plain object, names in any case; first occurrence of a name wins. */
  function stringToSign(method, path, query, host, headers, body) {
    const lower = {};
    for (const [k, v] of Object.entries(headers || {})) {
      const key = k.toLowerCase();
      if (!(key in lower)) lower[key] = [k, String(v)];
    }
    const ct = lower["content-type"] ? lower["content-type"][1] : "";
    let head = method + " " + path + (query ? "?" + query : "") + "\nHost: " + host;
    if (ct) head += "\nContent-Type: " + ct;
    const xq = [];
    for (const [key, [name, value]] of Object.entries(lower)) {
      if (key.startsWith(X_QINIU) && key.length > X_QINIU.length) xq.push([canonicalHeaderName(name), value]);
    }
    // Sorted by name, then value, as the server (Python tuples) and Go's SDK do; code-unit order equals
    // code-point order for the ASCII names a header can have.
    xq.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
    for (const [name, value] of xq) head += "\n" + name + ": " + value;
    head += "\n\n";
    const data = bodyBytes(body);
    const signsBody = Boolean(ct) && ct !== OCTET && data.length > 0;
    return signsBody ? concat([wire(head), data]) : wire(head);
  }

  // ---- HMAC-SHA1 -------------------------------------------------------------------------------------------

  function subtle() {
    const c = typeof globalThis !== "undefined" ? globalThis.crypto : undefined;
    return c && c.subtle && typeof c.subtle.importKey === "function" ? c.subtle : null;
  }

  function sha1(bytes) {
    const ml = bytes.length;
    const padded = new Uint8Array(((ml + 8) >> 6) * 64 + 64);
    padded.set(bytes);
    padded[ml] = 0x80;
    const view = new DataView(padded.buffer);
    // Message length in bits, big-endian 64-bit; the high word covers lengths past 512 MB.
    view.setUint32(padded.length - 8, Math.floor(ml / 0x20000000));
    view.setUint32(padded.length - 4, (ml * 8) >>> 0);
    let h0 = 0x67452301;
    let h1 = 0xefcdab89;
    let h2 = 0x98badcfe;
    let h3 = 0x10325476;
    let h4 = 0xc3d2e1f0;
    const w = new Uint32Array(80);
    for (let off = 0; off < padded.length; off += 64) {
      for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + i * 4);
      for (let i = 16; i < 80; i++) {
        const x = w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16];
        w[i] = (x << 1) | (x >>> 31);
      }
      let a = h0;
      let b = h1;
      let c = h2;
      let d = h3;
      let e = h4;
      for (let i = 0; i < 80; i++) {
        let f;
        let k;
        if (i < 20) {
          f = (b & c) | (~b & d);
          k = 0x5a827999;
        } else if (i < 40) {
          f = b ^ c ^ d;
          k = 0x6ed9eba1;
        } else if (i < 60) {
          f = (b & c) | (b & d) | (c & d);
          k = 0x8f1bbcdc;
        } else {
          f = b ^ c ^ d;
          k = 0xca62c1d6;
        }
        const t = (((a << 5) | (a >>> 27)) + f + e + k + w[i]) >>> 0;
        e = d;
        d = c;
        c = (b << 30) | (b >>> 2);
        b = a;
        a = t;
      }
      h0 = (h0 + a) >>> 0;
      h1 = (h1 + b) >>> 0;
      h2 = (h2 + c) >>> 0;
      h3 = (h3 + d) >>> 0;
      h4 = (h4 + e) >>> 0;
    }
    const out = new Uint8Array(20);
    const ov = new DataView(out.buffer);
    [h0, h1, h2, h3, h4].forEach((h, i) => ov.setUint32(i * 4, h));
    return out;
  }

  function hmacSha1Js(key, data) {
    if (key.length > 64) key = sha1(key);
    const ipad = new Uint8Array(64 + data.length);
    const opad = new Uint8Array(64 + 20);
    for (let i = 0; i < 64; i++) {
      const k = i < key.length ? key[i] : 0;
      ipad[i] = k ^ 0x36;
      opad[i] = k ^ 0x5c;
    }
    ipad.set(data, 64);
    opad.set(sha1(ipad), 64);
    return sha1(opad);
  }

  async function hmacSha1(key, data, options) {
    const s = options && options.noWebCrypto ? null : subtle();
    if (!s) return hmacSha1Js(key, data);
    const k = await s.importKey("raw", key, { name: "HMAC", hash: "SHA-1" }, false, ["sign"]);
    return new Uint8Array(await s.sign("HMAC", k, data));
  }

  function urlsafeBase64(bytes) {
    let bin = "";
    for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_"); // padding kept, like every SDK
  }

  /* urlsafe_base64(hmac_sha1(secretKey, data)); `data` is a Uint8Array from stringToSign. */
  async function sign(secretKey, data, options) {
    return urlsafeBase64(await hmacSha1(new TextEncoder().encode(secretKey), data, options));
  }

  /* "20240101T000000Z" for a Date (UTC). */
  function qiniuDate(date) {
    return (date || new Date()).toISOString().replace(/\.\d+Z$/, "Z").replace(/[-:]/g, "");
  }

  /* The headers to send: `headers` plus X-Qiniu-Date (unless date === false) and Authorization.
   * `target` is what goes on the wire after the host: "/path?query", already percent-encoded.
   * No Content-Type is added: send and sign exactly the one you set (a GET needs none). */
  async function signRequest(accessKey, secretKey, method, host, target, opts) {
    opts = opts || {};
    const out = Object.assign({}, opts.headers || {});
    if (opts.date !== false) {
      for (const k of Object.keys(out)) if (k.toLowerCase() === "x-qiniu-date") delete out[k];
      out["X-Qiniu-Date"] = typeof opts.date === "string" ? opts.date : qiniuDate(opts.date);
    }
    const q = target.indexOf("?");
    const path = q < 0 ? target : target.slice(0, q);
    const query = q < 0 ? "" : target.slice(q + 1);
    const data = stringToSign(method.toUpperCase(), path || "/", query, host, out, opts.body);
    out.Authorization = "Qiniu " + accessKey + ":" + (await sign(secretKey, data, opts));
    return out;
  }

  return { canonicalHeaderName, stringToSign, sign, signRequest, qiniuDate, hmacSha1, sha1 };
});
