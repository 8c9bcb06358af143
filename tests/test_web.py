"""The built-in web page: served at /; its in-browser signer (tusou/web/sign.js) signs as Qiniu's SDK does.

The signer is run under node, which has the same WebCrypto API as browsers; the pure-JS HMAC fallback (used
where browsers hide ``crypto.subtle``: plain http on a non-localhost host) is checked too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from tests.conftest import Tusou, data_uri, jpeg
from tusou.api.auth import DATE_FORMAT

ROOT = Path(__file__).resolve().parent.parent
SIGN_JS = ROOT / "tusou" / "web" / "sign.js"
VECTORS = json.loads((Path(__file__).parent / "data" / "signature-vectors.json").read_text())
NODE = shutil.which("node")

# Reads {"jobs": [...]} on stdin, answers one result per job on stdout. Each job runs with WebCrypto and
# again with it turned off, so both HMAC paths of sign.js are exercised.
DRIVER = r"""
const S = require(process.argv[1]);
const b64 = (u8) => Buffer.from(u8).toString("base64");
let input = "";
process.stdin.on("data", (c) => (input += c));
process.stdin.on("end", async () => {
  const out = [];
  for (const job of JSON.parse(input).jobs) {
    if (job.kind === "sts") {
      const data = S.stringToSign(job.method, job.path, job.query, job.host, job.headers, job.body);
      const js = await S.sign(job.sk, data, { noWebCrypto: true });
      out.push({ sts: b64(data), web: await S.sign(job.sk, data), js });
    } else if (job.kind === "hmac") {
      const key = Buffer.from(job.key, "base64"), data = Buffer.from(job.data, "base64");
      const js = await S.hmacSha1(key, data, { noWebCrypto: true });
      out.push({ web: b64(await S.hmacSha1(key, data)), js: b64(js) });
    } else if (job.kind === "request") {
      out.push(await S.signRequest(job.ak, job.sk, job.method, job.host, job.target,
                                   { headers: job.headers, body: job.body, date: job.date }));
    }
  }
  process.stdout.write(JSON.stringify(out));
});
"""


def run_node(jobs: list[dict[str, Any]]) -> list[Any]:
    if NODE is None:
        pytest.skip("node is not installed: the in-browser signer (tusou/web/sign.js) cannot be checked")
    proc = subprocess.run(
        [NODE, "-e", DRIVER, str(SIGN_JS)],
        input=json.dumps({"jobs": jobs}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------------------------------------
# The page


def test_page_is_served_without_auth(tusou: Tusou) -> None:
    resp = requests.get(tusou.server.url + "/", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.headers.get("X-Reqid")
    assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    page = resp.text
    assert "tusou" in page and "/static/sign.js" in page
    # Self-contained: no CDN or other origin is ever loaded by the page itself.
    assert "//cdn" not in page and 'src="http' not in page
    # The only <link> is the favicon, inline (so the browser never asks for /favicon.ico).
    icon = re.findall(r'<link rel="icon" href="data:image/svg\+xml,[^"]+">', page)
    assert re.findall(r"<link[^>]*>", page) == icon and len(icon) == 1

    script = requests.get(tusou.server.url + "/static/sign.js", timeout=30)
    assert script.status_code == 200
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert script.headers.get("X-Reqid")
    assert script.text == SIGN_JS.read_text("utf-8")

    # Additive: the Qiniu API description does not grow.
    paths = requests.get(tusou.server.url + "/openapi.json", timeout=30).json()["paths"]
    assert "/" not in paths and "/static/sign.js" not in paths


# --------------------------------------------------------------------------------------------------------
# The signer, byte for byte


QINIU_VECTORS = [v for v in VECTORS if v["scheme"] == "Qiniu"]


def test_js_signer_reproduces_every_qiniu_vector() -> None:
    assert QINIU_VECTORS
    jobs = []
    for v in QINIU_VECTORS:
        url = urlsplit(v["url"])
        jobs.append(
            {
                "kind": "sts",
                "method": v["method"],
                "path": url.path,
                "query": url.query,
                "host": url.netloc,
                "headers": v["headers_signed_by_sdk"],
                "body": v["body"],
                "sk": v["secret_key"],
            }
        )
    for v, got in zip(QINIU_VECTORS, run_node(jobs), strict=True):
        assert base64.b64decode(got["sts"]) == v["string_to_sign"].encode("utf-8"), v["name"]
        for path in ("web", "js"):
            assert f"Qiniu {v['access_key']}:{got[path]}" == v["authorization"], (v["name"], path)


def test_js_hmac_fallback_matches_python() -> None:
    # Lengths around SHA-1's 64-byte blocks and its 55/56-byte padding edge; keys shorter and longer than
    # a block (a long key is hashed first).
    cases = [
        (bytes(range(k)), bytes((i * 7) % 256 for i in range(n)))
        for k in (3, 64, 65, 200)
        for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000)
    ]
    jobs = [
        {"kind": "hmac", "key": base64.b64encode(k).decode(), "data": base64.b64encode(d).decode()}
        for k, d in cases
    ]
    for (key, data), got in zip(cases, run_node(jobs), strict=True):
        want = base64.b64encode(hmac.new(key, data, hashlib.sha1).digest()).decode()
        assert got["web"] == want and got["js"] == want, (len(key), len(data))


# --------------------------------------------------------------------------------------------------------
# End to end: what the page signs, the server accepts


def test_server_accepts_requests_signed_by_the_js_signer(tusou: Tusou, photos: list[Image.Image]) -> None:
    key = tusou.keys.create("web")
    host = urlsplit(tusou.server.url).netloc  # what the browser would have as location.host
    date = datetime.now(UTC).strftime(DATE_FORMAT)
    photo = data_uri(jpeg(photos[0]))
    json_ct = {"Content-Type": "application/json"}
    # The page's calls, in its order: create a group with an image (a non-ASCII label, so the UTF-8 body is
    # what is signed), list groups, count, page through, search with the same image (a large signed body).
    calls: list[tuple[str, str, dict[str, str], str | None]] = [
        (
            "POST",
            "/v1/image/group/web-g/new",
            json_ct,
            json.dumps(
                {"data": [{"uri": photo, "attribute": {"id": "p0", "label": "鞋子"}}]}, ensure_ascii=False
            ),
        ),
        ("GET", "/v1/image/group", {}, None),
        ("GET", "/v1/image/group/web-g/info", {}, None),
        ("GET", "/v1/image/group/web-g?marker=&limit=50", {}, None),
        (
            "POST",
            "/v1/image/groups/search",
            json_ct,
            json.dumps({"data": {"uri": photo}, "params": {"groups": ["web-g"], "limit": 5}}),
        ),
    ]
    jobs = [
        {
            "kind": "request",
            "ak": key.access_key,
            "sk": key.secret_key,
            "method": method,
            "host": host,
            "target": target,
            "headers": headers,
            "body": body,
            "date": date,
        }
        for method, target, headers, body in calls
    ]
    signed = run_node(jobs)
    answers = []
    for (method, target, _, body), headers in zip(calls, signed, strict=True):
        assert headers["X-Qiniu-Date"] == date
        assert headers["Authorization"].startswith(f"Qiniu {key.access_key}:")
        resp = requests.request(
            method,
            tusou.server.url + target,
            headers=headers,
            data=None if body is None else body.encode("utf-8"),
            timeout=120,
        )
        assert resp.status_code == 200, (target, resp.status_code, resp.text)
        answers.append(resp.json())

    assert answers[0] == {"errors": [None], "images": ["p0"]}
    assert answers[1]["result"] == ["web-g"]
    assert answers[2] == {"count": 1}
    assert [(i["id"], i["value"]["label"]) for i in answers[3]["result"]] == [("p0", "鞋子")]
    assert answers[4]["result"][0]["id"] == "p0"

    # The signature really is checked: one changed character is refused.
    headers = dict(signed[1])
    sig = headers["Authorization"]
    headers["Authorization"] = sig[:-2] + ("A=" if sig[-2] != "A" else "B=")
    resp = requests.get(tusou.server.url + "/v1/image/group", headers=headers, timeout=30)
    assert resp.status_code == 401


def test_api_docs_page_works_offline(tusou: Tusou) -> None:
    resp = requests.get(tusou.server.url + "/docs", timeout=30)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    # Nothing from another site (Swagger UI's CDN made the old /docs blank offline).
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', resp.text)
    assert "/openapi.json" in resp.text
    assert requests.get(tusou.server.url + "/redoc", timeout=30).status_code == 404
