"""The real `tusou serve` process: first-start key, and answers that survive kill -9 and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from PIL import Image

from tests.conftest import QiniuClient, data_uri, free_port, jpeg


class ServeProcess:
    def __init__(self, data: Path, port: int, extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, TUSOU_DATA=str(data), TUSOU_PORT=str(port), PYTHONUNBUFFERED="1")
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tusou", "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.first_lines: list[str] = []

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "tusou serve exited: " + (self.proc.stdout.read() if self.proc.stdout else "")
                )
            try:
                if requests.get(self.url + "/v1/image/group", timeout=1).status_code == 401:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError("tusou serve did not answer")

    def read_key(self) -> dict[str, str]:
        assert self.proc.stdout is not None
        for _ in range(5):
            line = self.proc.stdout.readline()
            self.first_lines.append(line)
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"no key printed: {self.first_lines}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def snapshot(client: QiniuClient, query_uri: str) -> dict:
    search = {"data": {"uri": query_uri}, "params": {"groups": ["a", "b"], "limit": -1, "threshold": 0}}
    return {
        "groups": client.get("/v1/image/group").json(),
        "info": [client.get(f"/v1/image/group/{g}/info").json() for g in ("a", "b")],
        "list": [client.get(f"/v1/image/group/{g}", {"limit": 2}).json() for g in ("a", "b")],
        "image": client.post("/v1/image/group/a/image", {"id": "a1"}).json(),
        "search": client.post("/v1/image/groups/search", search).json(),
    }


def test_serve_prints_a_first_key_and_survives_kill_9(tmp_path: Path, photos: list[Image.Image]) -> None:
    data, port = tmp_path / "data", free_port()
    server = ServeProcess(data, port)
    try:
        key = server.read_key()
        server.wait_ready()
        client = QiniuClient(server.url, key["access_key"], key["secret_key"])
        entries = [
            {"uri": data_uri(jpeg(photos[i])), "attribute": {"id": f"a{i}", "label": "x", "desc": {"i": i}}}
            for i in range(4)
        ]
        assert client.post("/v1/image/group/a/new", {"data": entries}).status_code == 200
        assert client.post("/v1/image/group/b/new", {"data": entries[:2]}).status_code == 200
        assert client.post("/v1/image/group/a/delete", {"images": ["a0"]}).status_code == 200
        query = data_uri(jpeg(photos[1].resize((200, 150)), 50))
        before = snapshot(client, query)
        assert before["info"] == [{"count": 3}, {"count": 2}]
        assert before["search"]["result"][0]["id"] == "a1"
        server.kill()

        # The key printed on first start is kept; no second key is created.
        server = ServeProcess(data, port)
        server.wait_ready()
        assert snapshot(client, query) == before
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert server.proc.stdout is not None
    assert "access_key" not in server.proc.stdout.read()
