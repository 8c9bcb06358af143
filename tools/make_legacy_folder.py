"""Write tests/data/legacy/: a data folder as a released tusou leaves it on disk, for the upgrade tests.

Run from the repository root at the release to freeze (it records ``git rev-parse HEAD``):

    PYTHONPATH=$PWD python tools/make_legacy_folder.py

It starts the real server (``python -m tusou serve``) on a new folder, writes through the HTTP API as a user
would (two access keys, three groups, images added by http URL and by data URI, one image deleted, one
label and desc updated), records the answers of a few searches, stops the server cleanly (SIGTERM: the
index snapshots are written, as after an operator's stop) and packs the folder, without the model cache,
into ``folder.tar.gz``. ``expected.json`` holds the keys, the model identity, the port the image URLs
name (a test serves tests/data/photos again and rewrites that port) and the recorded answers.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from tusou.client import Client, Image, data_uri

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data" / "photos"
OUT = ROOT / "tests" / "data" / "legacy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query_jpeg(photo: str, size: tuple[int, int], quality: int) -> bytes:
    """A query: a photo shrunk and re-compressed (what ``QUERIES`` names; the tests rebuild it)."""
    out = io.BytesIO()
    PILImage.open(PHOTOS / photo).convert("RGB").resize(size).save(out, "JPEG", quality=quality)
    return out.getvalue()


def cropped_jpeg(photo: str, keep: float) -> bytes:
    """The centre ``keep`` of a photo: a stored near-duplicate, so that searches rank two hits."""
    image = PILImage.open(PHOTOS / photo).convert("RGB")
    w, h = image.size
    dx, dy = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    out = io.BytesIO()
    image.crop((dx, dy, w - dx, h - dy)).save(out, "JPEG", quality=85)
    return out.getvalue()


#: Near-duplicate queries: (photo, size, JPEG quality, groups searched with the first key).
QUERIES: list[dict[str, Any]] = [
    {"photo": "01-windmill15.jpg", "size": [200, 150], "quality": 50, "groups": ["shop", "misc"]},
    {"photo": "05-koala.jpg", "size": [240, 180], "quality": 60, "groups": ["shop"]},
    {"photo": "06-chicken.jpg", "size": [160, 120], "quality": 40, "groups": ["shop", "misc"]},
    {"photo": "10-spoons.jpg", "size": [200, 150], "quality": 50, "groups": ["misc"]},
    # The deleted image: must find nothing of it.
    {"photo": "02-hammer8.jpg", "size": [200, 150], "quality": 50, "groups": ["shop"]},
]


def hits_json(hits: list[Any]) -> list[dict[str, Any]]:
    return [{"id": h.id, "group": h.group, "label": h.label, "score": h.score} for h in hits]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, default=ROOT / ".pytest_cache" / "tusou-model-data" / "models"
    )
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="tusou-legacy-"))
    data = work / "data"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(PHOTOS))
    photos_http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=photos_http.serve_forever, daemon=True).start()
    photo_port = photos_http.server_address[1]
    env = dict(
        os.environ,
        TUSOU_DATA=str(data),
        TUSOU_MODEL_DIR=str(args.model_dir),
        TUSOU_FETCH_ALLOW='["127.0.0.1"]',
        PYTHONUNBUFFERED="1",
    )
    run = functools.partial(subprocess.run, env=env, check=True, capture_output=True, text=True)
    keys = [
        json.loads(run([sys.executable, "-m", "tusou", "keys", "create", "--name", name]).stdout)
        for name in ("shop-a", "shop-b")
    ]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tusou", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        a = Client(url, keys[0]["access_key"], keys[0]["secret_key"])
        b = Client(url, keys[1]["access_key"], keys[1]["secret_key"])
        deadline = time.monotonic() + 300
        while True:
            try:
                a.health()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)

        def http_uri(name: str) -> str:
            return f"http://127.0.0.1:{photo_port}/{name}"

        def photo(name: str, by_url: bool, label: str, desc: Any = None) -> Image:
            uri = http_uri(name) if by_url else data_uri(PHOTOS / name)
            return Image(uri, id=name.split(".")[0], label=label, desc=desc)

        shop = [
            photo("00-zimniPalace.jpg", True, "building", {"sku": 1}),
            photo("01-windmill15.jpg", True, "building", {"sku": 2}),
            photo("02-hammer8.jpg", True, "tool"),
            photo("03-fish19.jpg", False, "animal"),
            photo("04-operaHouse.jpg", True, "building"),
            photo("05-koala.jpg", False, "animal", {"sku": 5}),
            photo("06-chicken.jpg", True, "animal"),
            Image(
                data_uri(cropped_jpeg("01-windmill15.jpg", 0.7)), id="01-windmill15-crop", label="building"
            ),
            Image(data_uri(cropped_jpeg("06-chicken.jpg", 0.6)), id="06-chicken-crop", label="animal"),
        ]
        for result in (a.new_group("shop", shop[:4]), a.add_images("shop", shop[4:])):
            assert not result.failed, result.errors
        assert not a.new_group(
            "misc", [photo("10-spoons.jpg", True, "tool"), photo("11-bulb.jpg", False, "")]
        ).failed
        # The same group name under the other key: tenants never see each other's images.
        assert not b.new_group(
            "shop", [photo("07-giraffe.jpg", True, "animal"), photo("08-cat.jpg", True, "cat")]
        ).failed
        a.delete_images("shop", ["02-hammer8"])
        a.update_image("shop", "05-koala", label="koala", desc={"sku": 55})
        answers = []
        for q in QUERIES:
            uri = data_uri(query_jpeg(q["photo"], tuple(q["size"]), q["quality"]))
            answers.append({**q, "hits": hits_json(a.search(q["groups"], uri, limit=10))})
        by_id = hits_json(a.search(["shop"], image_id="01-windmill15", limit=10))
        other = hits_json(b.search(["shop"], data_uri(query_jpeg("08-cat.jpg", (200, 150), 50)), limit=10))
        health = a.health()
        listing = {
            "a": {g: [[i.id, i.label, i.desc] for i in a.iter_images(g)] for g in a.list_groups()},
            "b": {g: [[i.id, i.label, i.desc] for i in b.iter_images(g)] for g in b.list_groups()},
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        photos_http.shutdown()
    shutil.rmtree(data / "models", ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with tarfile.open(OUT / "folder.tar.gz", "w:gz") as tar:
        for path in sorted(data.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(data)), recursive=False)
    expected = {
        "commit": commit,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "how": "tools/make_legacy_folder.py: python -m tusou serve, writes through the HTTP API, SIGTERM",
        "model": health.get("model"),
        "photo_port": photo_port,
        "keys": keys,
        "listing": listing,
        "queries": answers,
        "by_id": {"group": "shop", "id": "01-windmill15", "hits": by_id},
        "tenant_b": {"photo": "08-cat.jpg", "size": [200, 150], "quality": 50, "hits": other},
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    shutil.rmtree(work)
    print(json.dumps({k: expected[k] for k in ("commit", "model", "photo_port")}))
    for q in answers:
        print(q["photo"], [(h["id"], round(h["score"], 4)) for h in q["hits"]])


if __name__ == "__main__":
    main()
