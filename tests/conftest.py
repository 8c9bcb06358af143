"""Shared fixtures: the real model (loaded once), real servers on loopback, a signed Qiniu client."""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from PIL import Image
from qiniu import QiniuMacAuth
from qiniu.auth import QiniuMacRequestsAuth

from tusou.config import Settings
from tusou.embed import create_embedder
from tusou.embed.base import Embedder
from tusou.fetch import Fetcher
from tusou.service import Service
from tusou.store.keys import KeyStore
from tusou.store.sqlite import SQLiteStore

# One folder for the ONNX graph built from the weights, shared by the whole run.
MODEL_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "tusou-models"


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    settings = Settings(data=MODEL_CACHE.parent / "tusou-model-data")
    return create_embedder(settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadedServer:
    """The real ASGI app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class QiniuClient:
    """Calls tusou the way a Qiniu user does: requests + the official SDK's QiniuMacAuth."""

    def __init__(self, base_url: str, access_key: str, secret_key: str) -> None:
        self.base = base_url
        self.access_key, self.secret_key = access_key, secret_key
        self.auth = QiniuMacRequestsAuth(QiniuMacAuth(access_key, secret_key))
        self.session = requests.Session()

    def post(self, path: str, body: Any = None) -> requests.Response:
        data = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        return self.session.post(self.base + path, data=data, headers=headers, auth=self.auth, timeout=60)

    def get(self, path: str, params: dict[str, Any] | None = None) -> requests.Response:
        return self.session.get(self.base + path, params=params, auth=self.auth, timeout=60)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data=tmp_path / "data", fetch_allow=["127.0.0.1"])


class Tusou:
    """A running tusou: its settings, store, key store and HTTP address."""

    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        from tusou.api.app import create_app

        self.settings = settings
        settings.data.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteStore(settings.db_path, model_id=embedder.model_id, dim=embedder.dim)
        self.service = Service(settings, self.store, embedder, Fetcher(settings))
        self.keys = KeyStore(settings.data / "keys.db")
        self.server = ThreadedServer(create_app(settings, self.service, self.keys))

    def client(self, name: str = "") -> QiniuClient:
        key = self.keys.create(name)
        return QiniuClient(self.server.url, key.access_key, key.secret_key)

    def close(self) -> None:
        self.server.__exit__()
        self.service.close()
        self.store.close()
        self.keys.close()


@pytest.fixture
def tusou(settings: Settings, embedder: Embedder) -> Iterator[Tusou]:
    running = Tusou(settings, embedder)
    running.server.__enter__()
    yield running
    running.close()


@pytest.fixture
def client(tusou: Tusou) -> QiniuClient:
    return tusou.client("test")


class ImageServer:
    """Serves generated images over HTTP on loopback, for URL-based requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                body = files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def put(self, name: str, data: bytes) -> str:
        self.files["/" + name] = data
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


def data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


PHOTOS = Path(__file__).resolve().parent / "data" / "photos"


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Twelve small real photos of unrelated subjects (public domain / CC0; data/photos/CREDITS.md)."""
    return [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))]
