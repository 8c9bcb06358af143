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

from bench.crash import ServeProcess as Server
from bench.crash import SignedClient, image_uri
from tests.conftest import MODEL_CACHE, QiniuClient, data_uri, free_port, jpeg
from tusou.config import Settings


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


def test_a_second_process_on_the_folder_leaves_the_running_server_intact(tmp_path: Path) -> None:
    """`tusou thumbs` is safe while the server runs, and a second `tusou serve` on the same folder is refused.

    Before the folder lock, the second process loaded the server's last snapshot and appended the rows added
    since into the server's own float32 side file at the slots the server had used for other rows (here:
    after a delete): the server then scored image 3 with image 4's vector, for good (its next snapshot named
    the file)."""
    data, log, port = tmp_path / "data", tmp_path / "serve.log", free_port()
    env = {
        "TUSOU_RATE_LIMIT_PER_S": "0",
        "TUSOU_MODEL_DIR": str(Settings(data=MODEL_CACHE.parent / "tusou-model-data").model_cache),
    }

    def entry(seed: int) -> dict:
        return {"uri": image_uri(seed), "attribute": {"id": f"i{seed}", "label": "x"}}

    server = Server(data, port, log, env)
    try:
        server.wait_ready()
        client = SignedClient(server.url, *server.first_key())
        assert client.post("/v1/image/group/g/new", {"data": [entry(1)]}).status_code == 200
        server.stop()  # a clean stop writes the group's snapshot
        server = Server(data, port, log, env)
        server.wait_ready()
        client.base = server.url
        # Rows after the snapshot, one of them deleted: the side file holds 2, 3, 4 in turn.
        added = client.post("/v1/image/group/g/add", {"data": [entry(s) for s in (2, 3, 4)]})
        assert added.status_code == 200
        assert client.post("/v1/image/group/g/delete", {"images": ["i2"]}).status_code == 200

        def best(seed: int) -> tuple[str, float]:
            query = {"data": {"uri": image_uri(seed)}, "params": {"groups": ["g"], "limit": 1}}
            hit = client.post("/v1/image/groups/search", query).json()["result"][0]
            return hit["id"], hit["score"]

        before = {seed: best(seed) for seed in (1, 3, 4)}
        assert [hit for hit, _ in before.values()] == ["i1", "i3", "i4"]

        cli_env = dict(os.environ, TUSOU_DATA=str(data), **env)
        thumbs = subprocess.run(
            [sys.executable, "-m", "tusou", "thumbs", "g"], env=cli_env, capture_output=True, text=True
        )
        assert thumbs.returncode == 0, thumbs.stderr
        assert {seed: best(seed) for seed in (1, 3, 4)} == before
        second = subprocess.run(
            [sys.executable, "-m", "tusou", "serve", "--port", str(free_port())],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert "is in use by another tusou process" in second.stderr
        assert {seed: best(seed) for seed in (1, 3, 4)} == before
        server.stop()
        server = Server(data, port, log, env)
        server.wait_ready()
        client.base = server.url
        assert {seed: best(seed) for seed in (1, 3, 4)} == before
    finally:
        server.stop()
