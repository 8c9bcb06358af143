"""A data folder written by an earlier release (tests/data/legacy) opens and answers after the upgrade.

Everything goes through the real interface: ``python -m tusou upgrade``/``reembed``/``serve`` on a copy of
the folder, HTTP requests signed with the folder's own keys, the real model, the answers compared with
those the earlier release gave (tests/data/legacy/expected.json).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import MODEL_CACHE, ImageServer, QiniuClient, data_uri, free_port
from tests.test_restart import ServeProcess
from tusou.embed.base import Embedder

LEGACY = Path(__file__).parent / "data" / "legacy"
PHOTOS = Path(__file__).parent / "data" / "photos"
EXPECTED: dict[str, Any] = json.loads((LEGACY / "expected.json").read_text())
# The model cache the session's embedder fixture fills: the processes started here reuse its ONNX graphs.
MODELS = MODEL_CACHE.parent / "tusou-model-data" / "models"


def unpack(folder: Path, photo_url: str | None = None) -> Path:
    """A copy of the legacy folder; with ``photo_url``, its image URLs point there (not the recorded port)."""
    data = folder / "data"
    with tarfile.open(LEGACY / "folder.tar.gz") as tar:
        # The "data" filter where this Python has it (3.11.4+); the archive is the repository's own.
        tar.extractall(data, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if photo_url is not None:
        old = f"http://127.0.0.1:{EXPECTED['photo_port']}"
        with closing(sqlite3.connect(data / "tusou.db")) as conn:  # closed: open, it marks the folder in use
            conn.execute("UPDATE images SET uri = replace(uri, ?, ?) WHERE uri IS NOT NULL", (old, photo_url))
            conn.commit()
    return data


def tusou(
    data: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    full = dict(os.environ, TUSOU_DATA=str(data), TUSOU_MODEL_DIR=str(MODELS), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "tusou", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def stored_model(data: Path) -> str:
    with closing(sqlite3.connect(f"file:{data / 'tusou.db'}?mode=ro", uri=True)) as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'model_id'").fetchone()[0])


def query_uri(q: dict[str, Any]) -> str:
    """The recorded query image, rebuilt as tools/make_legacy_folder.py made it."""
    out = io.BytesIO()
    Image.open(PHOTOS / q["photo"]).convert("RGB").resize(tuple(q["size"])).save(
        out, "JPEG", quality=q["quality"]
    )
    return data_uri(out.getvalue())


def clients(url: str) -> tuple[QiniuClient, QiniuClient]:
    a, b = EXPECTED["keys"]
    return QiniuClient(url, a["access_key"], a["secret_key"]), QiniuClient(
        url, b["access_key"], b["secret_key"]
    )


def search(client: QiniuClient, groups: list[str], data: dict[str, Any]) -> list[dict[str, Any]]:
    answer = client.post("/v1/image/groups/search", {"data": data, "params": {"groups": groups, "limit": 10}})
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]


def listing(client: QiniuClient) -> dict[str, list[list[Any]]]:
    out = {}
    for group in client.get("/v1/image/group").json()["result"]:
        page = client.get(f"/v1/image/group/{group}").json()
        out[group] = [
            [i["id"], i.get("value", {}).get("label", ""), i.get("value", {}).get("desc", "")]
            for i in page["result"]
        ]
    return out


def check_answers(
    url: str, dropped: frozenset[str] = frozenset(), added: tuple[str, ...] = (), new_group: str = ""
) -> None:
    """The folder's contents and the earlier release's answers: the same top hit for every query, every
    near-duplicate it scored >= 0.85 still found, nothing deleted coming back. ``dropped``: images no
    longer there; ``added``: ids added to group shop since; ``new_group``: a group added since."""
    a, b = clients(url)
    want = {g: [row for row in rows if row[0] not in dropped] for g, rows in EXPECTED["listing"]["a"].items()}
    want["shop"] += [[image_id, "", ""] for image_id in added]
    found = listing(a)
    found.pop(new_group, None)
    assert found == want
    assert listing(b) == EXPECTED["listing"]["b"]
    for group, rows in want.items():
        assert a.get(f"/v1/image/group/{group}/info").json() == {"count": len(rows)}
    for q in EXPECTED["queries"]:
        hits = search(a, q["groups"], {"uri": query_uri(q)})
        recorded = [h for h in q["hits"] if h["id"] not in dropped]
        assert [h["id"] for h in hits[:1]] == [h["id"] for h in recorded[:1]], (q["photo"], hits)
        found = {h["id"] for h in hits}
        assert {h["id"] for h in recorded if h["score"] >= 0.85} <= found, (q["photo"], hits)
        assert "02-hammer8" not in found
    by_id = search(a, ["shop"], {"id": "01-windmill15"})
    assert by_id[0]["id"] == "01-windmill15" and by_id[0]["score"] >= 0.97
    tenant_b = EXPECTED["tenant_b"]
    assert [h["id"] for h in search(b, ["shop"], {"uri": query_uri(tenant_b)})][:1] == ["08-cat"]


def serve(data: Path, env: dict[str, str] | None = None) -> ServeProcess:
    server = ServeProcess(data, free_port(), {"TUSOU_MODEL_DIR": str(MODELS), **(env or {})})
    server.wait_ready()
    return server


def stop(server: ServeProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=60)


def test_the_legacy_folder_upgrades_and_answers_as_before(tmp_path: Path, embedder: Embedder) -> None:
    data = unpack(tmp_path)
    convertible = stored_model(data) != embedder.model_id
    if convertible:
        # This release's vectors differ: serve refuses the folder, untouched, and names the command.
        refused = tusou(data, "serve", "--port", str(free_port()))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "tusou upgrade" in refused.stderr and "tusou backup" in refused.stderr
        assert "Traceback" not in refused.stderr
        # So do the commands that open the folder themselves (here: the copy to Milvus, refused first).
        copy = tusou(data, "migrate", "--milvus-uri", "http://127.0.0.1:9")
        assert copy.returncode == 1 and "tusou upgrade" in copy.stderr and "Traceback" not in copy.stderr
        assert stored_model(data) == EXPECTED["model"]
        # While the earlier release still serves the folder, the upgrade refuses to touch it.
        from tusou.store.sqlite import SQLiteStore

        running = SQLiteStore(data / "tusou.db", model_id=EXPECTED["model"], dim=1280)
        try:
            busy = tusou(data, "upgrade")
        finally:
            running.close()
        assert busy.returncode == 1 and "stop it first" in busy.stderr, busy.stderr
        assert stored_model(data) == EXPECTED["model"]
    done = tusou(data, "upgrade", "--backup", str(tmp_path / "backup"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if convertible:
        assert summary["from"] == EXPECTED["model"] and summary["to"] == embedder.model_id
        assert summary["vectors"] == sum(len(rows) for rows in EXPECTED["listing"]["a"].values()) + 2
        assert (tmp_path / "backup" / "MANIFEST.json").is_file()
    else:
        assert summary["vectors"] == 0  # the same vector space: nothing to convert
    assert stored_model(data) == embedder.model_id

    server = serve(data)
    try:
        check_answers(server.url)
        a, _ = clients(server.url)
        out = io.BytesIO()
        Image.open(PHOTOS / "09-volleyball.jpg").save(out, "JPEG")
        add = a.post(
            "/v1/image/group/shop/add",
            {"data": [{"uri": data_uri(out.getvalue()), "attribute": {"id": "new"}}]},
        )
        assert add.status_code == 200 and add.json()["errors"] == [None], add.text
        assert search(a, ["shop"], {"id": "new"})[0]["id"] == "new"
    finally:
        stop(server)
    # Restarted (from the snapshots of the new width): the same answers.
    server = serve(data)
    try:
        check_answers(server.url, added=("new",))
    finally:
        stop(server)


def test_kill_9_during_the_upgrade_then_the_next_start_finishes_it(
    tmp_path: Path, embedder: Embedder
) -> None:
    data = unpack(tmp_path)
    convert = getattr(embedder, "convert_from", lambda _: None)(EXPECTED["model"])
    if stored_model(data) == embedder.model_id or convert is None:
        pytest.skip("this release reads the legacy folder's vectors as they are: there is nothing to upgrade")
    # More rows of the legacy format (as the earlier release's store writes them), so there is time to kill.
    import numpy as np

    from tusou.store.base import NewImage
    from tusou.store.sqlite import SQLiteStore

    old_dim = 1280
    store = SQLiteStore(data / "tusou.db", model_id=EXPECTED["model"], dim=old_dim)
    rows = np.random.default_rng(1).standard_normal((3000, old_dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    tenant = EXPECTED["keys"][0]["access_key"]
    store.create_group(tenant, "bulk", [NewImage(f"r{i}", "", None, None, v) for i, v in enumerate(rows)])
    store.close()
    env = dict(os.environ, TUSOU_DATA=str(data), TUSOU_MODEL_DIR=str(MODELS))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tusou", "upgrade", "--batch", "20"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    seq = 0
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with closing(sqlite3.connect(f"file:{data / 'tusou.db'}?mode=ro", uri=True, timeout=5)) as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'upgrade_seq'").fetchone()
            seq = int(row[0]) if row else 0
        except sqlite3.OperationalError:
            seq = 0
        if seq > 0:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert seq > 0 and stored_model(data).startswith("upgrading:"), "the kill came before the upgrade began"
    # The earlier release's model is refused; this release's next start finishes the upgrade and serves.
    server = serve(data)
    try:
        check_answers(server.url, new_group="bulk")
        a, _ = clients(server.url)
        assert a.get("/v1/image/group/bulk/info").json() == {"count": 3000}
        hits = search(a, ["bulk"], {"id": "r7"})
        assert hits[0]["id"] == "r7"
    finally:
        stop(server)
    assert stored_model(data) == embedder.model_id
    with closing(sqlite3.connect(data / "tusou.db")) as conn:
        widths = {n for (n,) in conn.execute("SELECT DISTINCT length(vector) FROM vectors")}
        r7 = conn.execute(
            "SELECT vector FROM vectors JOIN images USING (seq) WHERE image_id = 'r7'"
        ).fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    assert widths == {embedder.dim * 4}
    assert free == 0  # the pages the 1280-d rows held went back to the file system
    # Converted exactly once: the stored row is the conversion of the original one.
    assert np.allclose(np.frombuffer(r7, dtype=np.float32), convert(rows[7:8])[0], atol=1e-5)


def test_reembed_of_the_legacy_folder_with_another_model_and_a_failing_uri(tmp_path: Path) -> None:
    photos = ImageServer()
    try:
        for path in sorted(PHOTOS.glob("*.jpg")):
            if path.name != "04-operaHouse.jpg":  # its URL now answers 404
                url = photos.put(path.name, path.read_bytes())
        data = unpack(tmp_path, url.rsplit("/", 1)[0])
        # The int8 model: other vectors, which no conversion reaches.
        env = {"TUSOU_MODEL_PRECISION": "int8", "TUSOU_FETCH_ALLOW": '["127.0.0.1"]'}
        refused = tusou(data, "serve", "--port", str(free_port()), env=env)
        assert refused.returncode == 1 and "tusou reembed" in refused.stderr, refused.stderr

        # kill -9 once two images are committed (one image per commit), then run it again: it carries on.
        proc = subprocess.Popen(
            [sys.executable, "-m", "tusou", "reembed", "--batch", "1", "--workers", "1"],
            env=dict(os.environ, TUSOU_DATA=str(data), TUSOU_MODEL_DIR=str(MODELS), **env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        done, deadline = 0, time.monotonic() + 180
        db = f"file:{data / 'tusou.db'}?mode=ro"
        while proc.poll() is None and done < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # between reads the folder is free: the command's in-use check gets its lock
            try:
                with closing(sqlite3.connect(db, uri=True, timeout=5)) as conn:
                    done = conn.execute("SELECT COUNT(*) FROM reembed").fetchone()[0]
            except sqlite3.OperationalError:  # the table is not there yet
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert done >= 2 and stored_model(data) == EXPECTED["model"]

        failures = tmp_path / "failed.jsonl"
        first = tusou(data, "reembed", "--failures", str(failures), env=env)
        assert first.returncode == 1, first.stderr
        summary = json.loads(first.stdout.strip().splitlines()[-1])
        listed = {line["id"]: line for line in map(json.loads, failures.read_text().splitlines())}
        inline = {"03-fish19", "05-koala", "01-windmill15-crop", "06-chicken-crop", "11-bulb"}
        assert set(listed) == inline | {"04-operaHouse"}
        assert "424" in listed["04-operaHouse"]["reason"] and listed["04-operaHouse"]["group"] == "shop"
        assert listed["05-koala"]["desc"] == {"sku": 55} and "data: URI" in listed["05-koala"]["reason"]
        assert summary["switched"] is False and summary["failed"] == 6
        assert summary["earlier"] >= 2 and summary["earlier"] + summary["embedded"] == 6, summary
        assert "--drop-failed" in first.stderr and "reembed:" in first.stderr
        assert stored_model(data) == EXPECTED["model"]  # nothing switched

        # Run again: the six already done are skipped; dropping the rest switches the folder.
        second = tusou(data, "reembed", "--failures", str(failures), "--drop-failed", env=env)
        assert second.returncode == 0, second.stderr
        summary = json.loads(second.stdout.strip().splitlines()[-1])
        assert summary == {**summary, "earlier": 6, "embedded": 0, "dropped": 6, "switched": True}
        assert summary["current"] is False
        assert stored_model(data) != EXPECTED["model"]
        # Once more: the folder is current, and the command says so instead of a bare "switched": false.
        again = tusou(data, "reembed", "--failures", str(failures), env=env)
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout.strip().splitlines()[-1])
        assert summary == {**summary, "embedded": 0, "switched": False, "current": True}
        assert "nothing to re-embed" in again.stderr
        server = serve(data, env)
        try:
            check_answers(server.url, dropped=frozenset(listed))
        finally:
            stop(server)
    finally:
        photos.close()
