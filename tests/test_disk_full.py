"""A data folder whose disk refuses writes: the real server answers in Qiniu's format (never a 500), loses
nothing it acknowledged, and is whole again once the disk takes writes.

The refusal comes from the process's file size limit (RLIMIT_FSIZE: a write past it fails, as on a full
disk; Python ignores SIGXFSZ), so no mount or privilege is needed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.crash import SignedClient, image_uri
from tests.conftest import MODEL_CACHE, free_port
from tusou.config import Settings
from tusou.errors import StoreError
from tusou.thumbs import ThumbStore


class LimitedServer:
    """``tusou serve`` whose files may grow to ``limit`` bytes (None: no limit); its output is drained."""

    def __init__(self, data: Path, port: int, limit: int | None) -> None:
        env = dict(
            os.environ,
            TUSOU_DATA=str(data),
            TUSOU_PORT=str(port),
            TUSOU_RATE_LIMIT_PER_S="0",
            TUSOU_MODEL_DIR=str(Settings(data=MODEL_CACHE.parent / "tusou-model-data").model_cache),
            PYTHONUNBUFFERED="1",
        )

        def set_limit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tusou", "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=set_limit,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.lines)
            try:
                if requests.get(self.url + "/v1/image/group", timeout=1).status_code == 401:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError("tusou serve did not answer")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def key(self) -> tuple[str, str]:
        line = next(line for line in self.lines if line.startswith('{"access_key"'))
        key = json.loads(line)
        return key["access_key"], key["secret_key"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _state(client: SignedClient) -> dict[str, Any]:
    listed = client.get("/v1/image/group/g", {"limit": 1000}).json()["result"]
    found = {}
    for entry in listed:
        query = {"data": {"id": entry["id"], "group": "g"}, "params": {"groups": ["g"], "limit": 1}}
        hit = client.post("/v1/image/groups/search", query).json()["result"][0]
        found[entry["id"]] = hit["id"] == entry["id"] and hit["score"] >= 0.95
    return {
        "ids": [entry["id"] for entry in listed],
        "count": client.get("/v1/image/group/g/info").json()["count"],
        "found": found,
    }


def test_a_full_disk_refuses_writes_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Room for the keys and the first images, not for the group's float32 side file (1.5 MB at its first
    # size: the index goes on without it) nor for many images.
    server = LimitedServer(data, free_port(), 1_200_000)
    try:
        key = server.key()
        client = SignedClient(server.url, *key)
        assert client.post("/v1/image/group/g/new", {"data": []}).status_code == 200
        acked: list[str] = []
        refused: list[tuple[int, Any]] = []
        for n in range(1, 200):
            body = {"data": [{"uri": image_uri(n, 160), "attribute": {"id": f"i{n}", "label": "x"}}]}
            resp = client.post("/v1/image/group/g/add", body)
            if resp.status_code == 200:
                assert resp.json()["images"] == [f"i{n}"]
                acked.append(f"i{n}")
            else:
                refused.append((resp.status_code, resp.json()))
                if len(refused) == 5:
                    break
        assert acked and refused, server.lines[-20:]
        assert all(status in (503, 507) and set(body) == {"error"} for status, body in refused), refused
        # Reads go on, and the images the server acknowledged are whole: listed, counted and searchable.
        before = _state(client)
        assert before["ids"] == acked and before["count"] == len(acked)
        assert all(before["found"].values()), before
    finally:
        server.stop()

    server = LimitedServer(data, free_port(), None)
    try:
        client = SignedClient(server.url, *key)
        assert _state(client) == before
        body = {"data": [{"uri": image_uri(1000, 160), "attribute": {"id": "again"}}]}
        assert client.post("/v1/image/group/g/add", body).json()["images"] == ["again"]
        after = _state(client)
        assert after["ids"] == [*acked, "again"] and all(after["found"].values())
    finally:
        server.stop()


def test_a_thumbnail_store_whose_commit_fails_stays_usable(tmp_path: Path) -> None:
    """A COMMIT refused by the disk used to leave the connection inside its transaction: every later write of
    thumbnails (or keypoints) failed, so every add answered 500 after storing its images."""
    store = ThumbStore(tmp_path / "thumbs.db")
    try:
        store.put("t", "g", [("a", b"a" * 1000)])
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        wal = tmp_path / "thumbs.db-wal"
        resource.setrlimit(resource.RLIMIT_FSIZE, (wal.stat().st_size + 20_000, hard))
        try:
            # Pictures of images already stored: a lost one is no error. Anywhere else (tusou thumbs) it is.
            store.put_after_images("t", "g", [("b", os.urandom(300_000))])
            with pytest.raises(StoreError) as refused:
                store.put("t", "g", [("b2", os.urandom(300_000))])
            assert refused.value.status in (503, 507)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        store.put("t", "g", [("c", b"c")])
        assert store.get("t", "g", ["a", "b", "b2", "c"]) == {"a": b"a" * 1000, "c": b"c"}
    finally:
        store.close()
