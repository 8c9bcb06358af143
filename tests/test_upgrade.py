"""Upgrading a data folder's stored vectors to a new vector space (tusou/upgrade.py) on the embedded store.

A stand-in model maps 32-d vectors to 12-d ones (a fixed linear map, then unit length), as a projection
release does with lite0's 1280-d vectors: refused until asked, converted in place when asked, resumed after
an interruption (an exception, or kill -9 of a real process at random points), never served half-way.
The same through the real model and `python -m tusou` on a folder written by an earlier release is in
tests/test_upgrade_legacy.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tusou import reembed as reembeds
from tusou import upgrade as upgrades
from tusou.images import ImageError
from tusou.store.base import ImageNotFound, ModelMismatch, NewImage
from tusou.store.sqlite import SQLiteStore

OLD, NEW = "old-model/v1", "old-model/v1+projection"
OLD_DIM, NEW_DIM = 32, 12
MATRIX = np.random.default_rng(5).standard_normal((OLD_DIM, NEW_DIM)).astype(np.float32)


def project(rows: np.ndarray) -> np.ndarray:
    out = rows @ MATRIX
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def convert_from(model_id: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """What the projection release's embedder answers: a map from its unprojected identity only."""
    return project if model_id == OLD else None


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, OLD_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_old_folder(folder: Path, n: int = 300) -> dict[str, np.ndarray]:
    """A folder as the earlier release leaves it: two tenants, deletes, an update, index snapshots."""
    store = SQLiteStore(folder / "tusou.db", model_id=OLD, dim=OLD_DIM)
    vecs = unit(n, 1)
    store.create_group("t1", "a", [NewImage(f"a{i}", "l", {"i": i}, None, v) for i, v in enumerate(vecs)])
    store.create_group("t2", "a", [NewImage(f"b{i}", "m", None, f"http://x/{i}", vecs[i]) for i in range(5)])
    store.delete_images("t1", "a", [f"a{i}" for i in range(0, n, 10)])
    store.update_image("t1", "a", "a1", label="changed")
    store.close()  # writes the snapshots of the old width
    assert list((folder / "index").glob("g*.json"))
    return {f"a{i}": vecs[i] for i in range(n) if i % 10}


def stored_rows(folder: Path) -> dict[int, bytes]:
    with closing(sqlite3.connect(folder / "tusou.db")) as conn:  # closed: an open one marks the folder in use
        return dict(conn.execute("SELECT seq, vector FROM vectors"))


def meta(folder: Path) -> dict[str, str]:
    with closing(sqlite3.connect(folder / "tusou.db")) as conn:
        return dict(conn.execute("SELECT key, value FROM meta"))


def open_new(folder: Path, **kwargs: object) -> SQLiteStore:
    return SQLiteStore(folder / "tusou.db", model_id=NEW, dim=NEW_DIM, convert_from=convert_from, **kwargs)


def check_upgraded(store: SQLiteStore, old: dict[str, np.ndarray], added: int = 0) -> None:
    """Every image holds exactly its converted vector (converted once), and search answers with it."""
    for image_id, vec in old.items():
        assert np.allclose(store.get_vector("t1", "a", image_id), project(vec[None])[0], atol=1e-5)
    query = project(old["a3"][None])
    hits = store.search("t1", ["a"], query, 3, 0.0)
    assert hits[0].id == "a3" and hits[0].cosine == pytest.approx(1.0, abs=1e-5)
    assert store.count("t1", "a") == len(old) + added and store.count("t2", "a") == 5
    assert store.get_image("t1", "a", "a1").label == "changed"
    assert store.get_image("t2", "a", "b2").uri == "http://x/2"


def test_a_convertible_folder_is_refused_untouched_until_the_upgrade_is_asked_for(tmp_path: Path) -> None:
    old = write_old_folder(tmp_path)
    before = stored_rows(tmp_path)
    with pytest.raises(ModelMismatch, match="tusou upgrade") as refused:
        open_new(tmp_path)
    assert "tusou backup" in str(refused.value) and OLD in str(refused.value)
    assert stored_rows(tmp_path) == before and meta(tmp_path)["model_id"] == OLD
    # The earlier release still opens it as it was.
    SQLiteStore(tmp_path / "tusou.db", model_id=OLD, dim=OLD_DIM).close()

    seen: list[tuple[int, int]] = []
    store = open_new(
        tmp_path, upgrade=True, upgrade_progress=lambda d, t: seen.append((d, t)), upgrade_batch=100
    )
    try:
        assert store.upgraded is not None and store.upgraded.rows == len(old) + 5
        assert seen[-1] == (len(old) + 5, len(old) + 5) and len(seen) == 3
        check_upgraded(store, old)
        # New images go in at the new width next to the converted ones.
        store.add_images("t1", "a", [NewImage("new", "n", None, None, project(unit(1, 9))[0])])
        assert store.search("t1", ["a"], project(unit(1, 9)), 1, 0.0)[0].id == "new"
    finally:
        store.close()
    assert meta(tmp_path)["model_id"] == NEW and meta(tmp_path)["dim"] == str(NEW_DIM)
    assert not [k for k in meta(tmp_path) if k.startswith("upgrade_")]
    assert {len(blob) for blob in stored_rows(tmp_path).values()} == {NEW_DIM * 4}
    # Opened again (from the new snapshots): the same answers, no second conversion.
    store = open_new(tmp_path)
    try:
        assert store.upgraded is None
        check_upgraded(store, old, added=1)
    finally:
        store.close()
    # The earlier release now refuses the folder instead of searching 12-d rows as 32-d ones.
    with pytest.raises(ModelMismatch):
        SQLiteStore(tmp_path / "tusou.db", model_id=OLD, dim=OLD_DIM)


def test_vectors_of_another_model_are_refused_naming_reembed(tmp_path: Path) -> None:
    write_old_folder(tmp_path)
    before = stored_rows(tmp_path)
    with pytest.raises(ModelMismatch, match="tusou reembed"):
        # Another model's embedder: it converts nothing stored under OLD.
        SQLiteStore(tmp_path / "tusou.db", model_id="other-model", dim=NEW_DIM, convert_from=lambda m: None)
    with pytest.raises(ModelMismatch, match="tusou reembed"):  # a model with no conversions at all
        SQLiteStore(tmp_path / "tusou.db", model_id=NEW, dim=NEW_DIM, upgrade=True)
    assert stored_rows(tmp_path) == before and meta(tmp_path)["model_id"] == OLD


def test_an_interrupted_upgrade_is_never_served_half_way_and_finishes_on_the_next_start(
    tmp_path: Path,
) -> None:
    old = write_old_folder(tmp_path)
    calls = 0

    def failing(model_id: str) -> Callable[[np.ndarray], np.ndarray] | None:
        def convert(rows: np.ndarray) -> np.ndarray:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("power cut")
            return project(rows)

        return convert if model_id == OLD else None

    with pytest.raises(RuntimeError, match="power cut"):
        SQLiteStore(
            tmp_path / "tusou.db",
            model_id=NEW,
            dim=NEW_DIM,
            convert_from=failing,
            upgrade=True,
            upgrade_batch=100,
        )
    state = meta(tmp_path)
    assert state["model_id"].startswith(upgrades.UPGRADING) and int(state["upgrade_seq"]) > 0
    assert {len(b) for b in stored_rows(tmp_path).values()} == {NEW_DIM * 4, OLD_DIM * 4}
    assert not list((tmp_path / "index").glob("g*"))  # the old-width snapshots are gone
    # Neither the earlier release nor another model serves a half-converted folder.
    with pytest.raises(ModelMismatch):
        SQLiteStore(tmp_path / "tusou.db", model_id=OLD, dim=OLD_DIM)
    with pytest.raises(ModelMismatch, match="interrupted"):
        SQLiteStore(tmp_path / "tusou.db", model_id="third", dim=NEW_DIM, convert_from=convert_from)
    # The next start of this release finishes it, even without being asked again.
    store = open_new(tmp_path)
    try:
        assert store.upgraded is not None and 0 < store.upgraded.rows < len(old) + 5
        check_upgraded(store, old)
    finally:
        store.close()


UPGRADE_SCRIPT = """
import sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from test_upgrade import NEW, NEW_DIM, OLD, project
from tusou.store.sqlite import SQLiteStore

def slow(rows):
    time.sleep(0.004)
    return project(rows)

def progress(done, total):
    print(done, total, flush=True)

SQLiteStore({db!r}, model_id=NEW, dim=NEW_DIM, convert_from=lambda m: slow if m == OLD else None,
            upgrade=True, upgrade_progress=progress, upgrade_batch=20).close()
print("done", flush=True)
"""


def test_kill_9_at_random_points_of_an_upgrade_then_a_restart_finishes_it(tmp_path: Path) -> None:
    old = write_old_folder(tmp_path, n=2000)
    total = len(old) + 5
    script = UPGRADE_SCRIPT.format(tests=str(Path(__file__).parent), db=str(tmp_path / "tusou.db"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), *sys.path]))
    rng = np.random.default_rng(3)
    progressed = []
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # one batch committed in this run
        time.sleep(float(rng.uniform(0.0, 0.15)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert first.strip() and first.split()[1] == str(total), first
        state = meta(tmp_path)
        if state["model_id"] == NEW:
            break  # it finished before the kill
        assert state["model_id"].startswith(upgrades.UPGRADING)
        progressed.append(int(state["upgrade_seq"]))
        with pytest.raises(ModelMismatch):  # never served as the earlier release's folder
            SQLiteStore(tmp_path / "tusou.db", model_id=OLD, dim=OLD_DIM)
    assert len(progressed) >= 2 and progressed == sorted(progressed), progressed
    store = open_new(tmp_path)
    try:
        check_upgraded(store, old)
    finally:
        store.close()
    assert {len(b) for b in stored_rows(tmp_path).values()} == {NEW_DIM * 4}


# --- tusou reembed (tusou/reembed.py) -----------------------------------------------------------------------


class OtherModel:
    """A model whose vectors no conversion reaches: a 12-d vector per image, from its pixels."""

    model_id, dim = "other-model", NEW_DIM

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.stack([np.asarray(img, dtype=np.float32).reshape(-1)[:NEW_DIM] + 1 for img in images])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def picture(uri: str) -> Image.Image:
    """What a URI 'http://x/<i>' serves: a picture made from i; 'http://x/gone' is a 404."""
    if uri.endswith("gone"):
        raise ImageError("fetch_http_status", "image fetch failed: HTTP 404")
    i = int(uri.rsplit("/", 1)[1])
    return Image.fromarray(np.random.default_rng(i).integers(0, 255, (2, NEW_DIM // 2, 3), dtype=np.uint8))


def write_uri_folder(folder: Path) -> None:
    """The earlier model's folder: 40 images by URL in two groups, one by data URI, one whose URL is gone."""
    store = SQLiteStore(folder / "tusou.db", model_id=OLD, dim=OLD_DIM)
    vecs = unit(42, 2)
    store.create_group(
        "t1", "a", [NewImage(f"a{i}", "l", {"i": i}, f"http://x/{i}", vecs[i]) for i in range(30)]
    )
    store.create_group(
        "t2", "b", [NewImage(f"b{i}", "m", None, f"http://x/{i}", vecs[i]) for i in range(30, 40)]
    )
    store.add_images("t1", "a", [NewImage("inline", "l", None, None, vecs[40])])
    store.add_images("t2", "b", [NewImage("lost", "m", {"sku": 1}, "http://x/gone", vecs[41])])
    store.close()


def test_reembed_lists_what_it_cannot_fetch_keeps_the_old_format_until_all_are_done_and_resumes(
    tmp_path: Path,
) -> None:
    write_uri_folder(tmp_path)
    model = OtherModel()
    before = stored_rows(tmp_path)
    loads: list[str] = []
    cut: list[str] = []

    def counting(uri: str) -> Image.Image:
        loads.append(uri)
        if len(loads) == 17 and not cut:
            cut.append(uri)
            raise RuntimeError("power cut")  # an interruption in the middle of a batch
        return picture(uri)

    with pytest.raises(RuntimeError, match="power cut"):
        reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", model, counting, batch=8, workers=1)
    # Nothing switched: the old vectors and model, which the earlier release still opens.
    assert stored_rows(tmp_path) == before and meta(tmp_path)["reembed_to"] == "other-model"
    SQLiteStore(tmp_path / "tusou.db", model_id=OLD, dim=OLD_DIM).close()
    with pytest.raises(ModelMismatch, match="tusou reembed"):
        SQLiteStore(tmp_path / "tusou.db", model_id="other-model", dim=NEW_DIM)

    loads.clear()
    seen: list[tuple[int, int, int]] = []
    result = reembeds.reembed(
        tmp_path / "tusou.db",
        tmp_path / "index",
        model,
        counting,
        batch=8,
        workers=2,
        progress=lambda *p: seen.append(p),
    )
    assert (
        result.earlier == 16 and result.embedded == 40 - 16 and len(loads) == 42 - 16 - 1
    )  # 'inline' has none
    assert not result.switched and result.remaining == 2 and seen[-1] == (42, 42, 2)
    assert {(f.group, f.id, f.uri) for f in result.failed} == {
        ("a", "inline", None),
        ("b", "lost", "http://x/gone"),
    }
    lost = next(f for f in result.failed if f.id == "lost")
    assert "404" in lost.reason and lost.desc == {"sku": 1} and lost.access_key == "t2"
    assert "data: URI" in next(f for f in result.failed if f.id == "inline").reason
    assert stored_rows(tmp_path) == before

    # Again without --drop-failed: only the two are tried, nothing switches.
    loads.clear()
    again = reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", model, picture, workers=1)
    assert again.embedded == 0 and again.earlier == 40 and len(again.failed) == 2 and not again.switched

    dropped: list[str] = []
    last = reembeds.reembed(
        tmp_path / "tusou.db",
        tmp_path / "index",
        model,
        picture,
        drop_failed=True,
        drop=lambda failed: dropped.extend(f.id for f in failed),
    )
    assert last.switched and last.dropped == 2 and sorted(dropped) == ["inline", "lost"]
    out = tmp_path / "failures.jsonl"
    reembeds.write_failures(out, last.failed, dropped=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["id"] for line in lines} == {"inline", "lost"} and all(line["dropped"] for line in lines)
    assert {"uri", "id", "label", "desc"} <= set(lines[0])  # an import manifest
    assert meta(tmp_path)["model_id"] == "other-model" and "reembed_to" not in meta(tmp_path)
    store = SQLiteStore(tmp_path / "tusou.db", model_id="other-model", dim=NEW_DIM)
    try:
        assert store.count("t1", "a") == 30 and store.count("t2", "b") == 10
        for i in (0, 29):
            expected = model.embed_images([picture(f"http://x/{i}")])[0]
            assert np.allclose(store.get_vector("t1", "a", f"a{i}"), expected, atol=1e-6)
            assert store.search("t1", ["a"], expected[None], 1, 0.0)[0].id == f"a{i}"
        with pytest.raises(ImageNotFound):
            store.get_image("t2", "b", "lost")
    finally:
        store.close()
    # Nothing left to do: a further run changes nothing.
    assert reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", model, picture).embedded == 0


def test_reembed_of_some_groups_waits_for_the_rest_before_switching(tmp_path: Path) -> None:
    write_uri_folder(tmp_path)
    model = OtherModel()
    first = reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", model, picture, groups=[("t1", "a")])
    assert first.embedded == 30 and [f.id for f in first.failed] == ["inline"] and first.remaining == 12
    assert not first.switched and meta(tmp_path)["model_id"] == OLD
    # drop_failed cannot switch while another group is not done.
    second = reembeds.reembed(
        tmp_path / "tusou.db", tmp_path / "index", model, picture, groups=[("t1", "a")], drop_failed=True
    )
    assert not second.switched and second.dropped == 0
    rest = reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", model, picture, drop_failed=True)
    assert rest.switched and rest.embedded == 10 and rest.dropped == 2


def test_an_upgrade_after_an_unfinished_reembed_drops_the_vectors_kept_aside(tmp_path: Path) -> None:
    write_uri_folder(tmp_path)
    partial = reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", OtherModel(), picture)
    assert not partial.switched and partial.embedded == 40
    open_new(tmp_path, upgrade=True).close()  # the folder converts after all
    with closing(sqlite3.connect(tmp_path / "tusou.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM reembed").fetchone()[0] == 0
    assert "reembed_to" not in meta(tmp_path) and meta(tmp_path)["model_id"] == NEW


def test_a_folder_open_in_a_running_server_is_not_rewritten(tmp_path: Path) -> None:
    write_uri_folder(tmp_path)
    running = SQLiteStore(tmp_path / "tusou.db", model_id=OLD, dim=OLD_DIM)  # the earlier release, serving
    try:
        before = stored_rows(tmp_path)
        with pytest.raises(upgrades.FolderInUse, match="stop it first"):
            upgrades.ensure_not_in_use(tmp_path / "tusou.db")
        with pytest.raises(upgrades.FolderInUse):
            reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", OtherModel(), picture)
        assert stored_rows(tmp_path) == before and "reembed_to" not in meta(tmp_path)
    finally:
        running.close()
    upgrades.ensure_not_in_use(tmp_path / "tusou.db")  # stopped: free


def test_reembed_refuses_a_folder_half_way_through_an_upgrade(tmp_path: Path) -> None:
    write_old_folder(tmp_path)
    with closing(sqlite3.connect(tmp_path / "tusou.db")) as conn:
        conn.execute("UPDATE meta SET value = 'upgrading:a -> b' WHERE key = 'model_id'")
        conn.commit()
    with pytest.raises(ModelMismatch, match="tusou upgrade"):
        reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", OtherModel(), picture)


def test_milvus_refuses_a_collection_of_the_old_vectors_and_the_way_out_works(tmp_path: Path) -> None:
    """A Milvus collection's width is fixed: refused with the way out, which is an upgraded embedded folder
    copied into a new collection (tusou migrate), shown here on the Milvus Lite test double."""
    pytest.importorskip("milvus_lite")
    from tests.milvus_lite import LiteMilvusStore
    from tusou.store.migrate import migrate

    lite = str(tmp_path / "lite.db")
    old = write_old_folder(tmp_path / "data")
    store = LiteMilvusStore(lite, collection="images", model_id=OLD, dim=OLD_DIM)
    store.create_group("t1", "a", [NewImage("a1", "l", None, None, old["a1"])])
    store.close()
    with pytest.raises(ModelMismatch, match="new collection") as refused:
        LiteMilvusStore(lite, collection="images", model_id=NEW, dim=NEW_DIM)
    assert "tusou migrate" in str(refused.value) and "tusou upgrade" in str(refused.value)

    src = open_new(tmp_path / "data", upgrade=True)
    dst = LiteMilvusStore(lite, collection="images_v2", model_id=NEW, dim=NEW_DIM)
    try:
        assert migrate(src, dst, "t1", "a").copied == len(old)
        hits = dst.search("t1", ["a"], project(old["a3"][None]), 1, 0.5)
        assert [h.id for h in hits] == ["a3"] and hits[0].cosine == pytest.approx(1.0, abs=1e-4)
    finally:
        src.close()
        dst.close()


def test_reembed_holds_the_folder_until_it_has_switched(tmp_path: Path) -> None:
    """A server started while tusou reembed runs would serve the old vectors from memory over a database
    that switches under it: reembed holds the folder's lock (which tusou serve checks) from start to end."""
    from tusou.store.sqlite import folder_in_use

    write_uri_folder(tmp_path)
    held: list[bool] = []

    def progress(done: int, total: int, failed: int) -> None:
        held.append(folder_in_use(tmp_path / "tusou.db"))

    result = reembeds.reembed(
        tmp_path / "tusou.db", tmp_path / "index", OtherModel(), picture, progress=progress, drop_failed=True
    )
    assert result.switched and held and all(held)
    assert not folder_in_use(tmp_path / "tusou.db")  # given back at the end
    store = SQLiteStore(tmp_path / "tusou.db", model_id="other-model", dim=NEW_DIM)
    try:
        with pytest.raises(reembeds.FolderInUse):  # and the other way round: not while a store has it
            reembeds.reembed(tmp_path / "tusou.db", tmp_path / "index", OtherModel(), picture)
    finally:
        store.close()
