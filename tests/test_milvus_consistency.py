"""Reads after writes on a real Milvus server under the default Session consistency, and several clients
writing one group.

* Within one process: every write is visible to the next read, every time (no settling time, no retry):
  add, then search / list / get / count, alternating many times.
* Across processes: a second Python process writes; this one polls with Session reads and records how long
  each acknowledged write took to become visible here (printed; docs/scale.md states the bound). The
  test fails only if a write never shows up.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_store_contract import DIM, all_ids, unit
from tusou.store.base import NewImage

pytest_plugins = ["tests.store_backends"]

COLLECTION = "tusou_session"


@pytest.fixture(scope="module")
def session_store(milvus_server: Any) -> Iterator[Any]:
    from tusou.store.milvus import MilvusStore

    store = MilvusStore(milvus_server.uri, collection=COLLECTION, model_id="m", dim=DIM)
    assert store.consistency == "Session"  # the default
    yield store
    store.close()


def test_a_process_reads_its_own_writes_every_time(session_store: Any) -> None:
    s, t = session_store, "t-" + uuid.uuid4().hex[:12]
    rng = np.random.default_rng(21)
    s.create_group(t, "own", [])
    vectors = unit(rng, 60)
    for i, vec in enumerate(vectors):
        assert s.add_images(t, "own", [NewImage(f"x{i}", f"l{i}", {"i": i}, None, vec)]) == [None]
        assert [h.id for h in s.search(t, ["own"], vec[None, :], 1, 0.99)] == [f"x{i}"]
        assert s.get_image(t, "own", f"x{i}").desc == {"i": i}
        assert s.count(t, "own") == i + 1
        infos, _ = s.list_images(t, "own", "", 1000)
        assert [info.id for info in infos] == [f"x{j}" for j in range(i + 1)]
        if i % 3 == 0:
            assert s.update_image(t, "own", f"x{i}", label="new").label == "new"
            assert s.get_image(t, "own", f"x{i}").label == "new"
        if i % 5 == 4:
            assert s.delete_images(t, "own", [f"x{i}"]) == 1
            assert s.search(t, ["own"], vec[None, :], 1, 0.99) == []
            assert s.add_images(t, "own", [NewImage(f"x{i}", f"l{i}", {"i": i}, None, vec)]) == [None]
            assert [h.id for h in s.search(t, ["own"], vec[None, :], 1, 0.99)] == [f"x{i}"]
    s.remove_group(t, "own")
    assert "own" not in s.list_groups(t)


WRITER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from tusou.store.milvus import MilvusStore
    from tusou.store.base import NewImage

    uri, collection, tenant = sys.argv[1:4]
    dim, n = int(sys.argv[4]), int(sys.argv[5])
    store = MilvusStore(uri, collection=collection, model_id="m", dim=dim)
    rng = np.random.default_rng(5)
    for i in range(n):
        vec = rng.standard_normal(dim).astype(np.float32)
        vec /= np.linalg.norm(vec)
        assert store.add_images(tenant, "x", [NewImage(f"w{i}", "", None, None, vec)]) == [None]
        print(json.dumps({"i": i, "acked": time.time(), "vec": vec.tolist()}), flush=True)
        sys.stdin.readline()  # the reader has seen it: write the next
    store.close()
    """
)


def test_another_process_sees_writes_within_the_bound(session_store: Any, milvus_server: Any) -> None:
    s, t = session_store, "t-" + uuid.uuid4().hex[:12]
    s.create_group(t, "x", [])
    n = 20
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, milvus_server.uri, COLLECTION, t, str(DIM), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert writer.stdin is not None and writer.stdout is not None
    lags: list[float] = []
    try:
        for _ in range(n):
            line = json.loads(writer.stdout.readline())
            query = np.asarray(line["vec"], dtype=np.float32)[None, :]
            polls = 0
            while [h.id for h in s.search(t, ["x"], query, 1, 0.99)] != [f"w{line['i']}"]:
                polls += 1
                assert polls < 3000, f"write w{line['i']} of another process never became visible"
                time.sleep(0.002)
            lags.append((time.time() - line["acked"]) * 1000)
            writer.stdin.write("\n")
            writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    lags.sort()
    print(
        f"\n[milvus session] another process's write visible after: p50 {lags[len(lags) // 2]:.0f} ms, "
        f"max {lags[-1]:.0f} ms over {n} writes (proxy.timeTickInterval of the test server: 20 ms)"
    )


# --- many processes on one Milvus ------------------------------------------------------------------------


def test_sequence_numbers_are_unique_across_clients(session_store: Any, milvus_server: Any) -> None:
    from tusou.store.milvus import MilvusStore, SeqSource

    other = MilvusStore(milvus_server.uri, collection=COLLECTION, model_id="m", dim=DIM)
    try:
        sources = [SeqSource(session_store._alloc_timestamp), SeqSource(other._alloc_timestamp)]
        with ThreadPoolExecutor(4) as pool:
            batches = list(pool.map(lambda i: sources[i % 2].take(1 + (i * 97) % 1500), range(40)))
    finally:
        other.close()
    seqs = [seq for batch in batches for seq in batch]
    assert len(seqs) == len(set(seqs)) and all(0 < seq < 2**63 and seq % 4 == 0 for seq in seqs)
    assert all(batch == sorted(batch) for batch in batches)


UPDATER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from tusou.store.milvus import MilvusStore
    from tusou.store.base import NewImage

    uri, collection, tenant = sys.argv[1:4]
    dim = int(sys.argv[4])
    store = MilvusStore(uri, collection=collection, model_id="m", dim=dim)
    v = np.random.default_rng(32).standard_normal((30, dim)).astype(np.float32)
    own = v / np.linalg.norm(v, axis=1, keepdims=True)
    print("ready", flush=True)
    sys.stdin.readline()
    labels = []
    for i in range(0, 30, 3):
        batch = [NewImage(f"b{j}", "b", None, None, own[j]) for j in range(i, i + 3)]
        assert store.add_images(tenant, "both", batch) == [None] * 3
        for k in range(4):
            label = f"b-{i}-{k}"
            store.update_image(tenant, "both", f"s{k}", label=label, desc={"by": "b"})
            labels.append(label)
        store.update_image(tenant, "both", f"b{i}", label="b!")
    print(json.dumps(labels), flush=True)
    store.close()
    """
)


def test_two_processes_adding_and_updating_one_group_lose_nothing(
    session_store: Any, milvus_server: Any
) -> None:
    """This process and a second Python process each add 30 images to one group in batches of 3, and
    after each batch both update the same 4 shared images (and one of their own)."""
    s, t = session_store, "t-" + uuid.uuid4().hex[:12]
    rng = np.random.default_rng(31)
    shared = unit(rng, 4)
    s.create_group(t, "both", [NewImage(f"s{i}", "", None, None, v) for i, v in enumerate(shared)])
    own = {"a": unit(rng, 30), "b": unit(np.random.default_rng(32), 30)}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    other = subprocess.Popen(
        [sys.executable, "-c", UPDATER, milvus_server.uri, COLLECTION, t, str(DIM)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert other.stdin is not None and other.stdout is not None
    written: list[str] = []
    try:
        assert other.stdout.readline().strip() == "ready"
        other.stdin.write("\n")
        other.stdin.flush()
        for i in range(0, 30, 3):
            batch = [NewImage(f"a{j}", "a", None, None, own["a"][j]) for j in range(i, i + 3)]
            assert s.add_images(t, "both", batch) == [None] * 3
            for k in range(4):  # both processes update the shared images at once
                label = f"a-{i}-{k}"
                s.update_image(t, "both", f"s{k}", label=label, desc={"by": "a"})
                written.append(label)
            s.update_image(t, "both", f"a{i}", label="a!")
        written += json.loads(other.stdout.readline())
        assert other.wait(timeout=120) == 0
    finally:
        if other.poll() is None:
            other.kill()
    assert len(written) == 80
    # Checked at Strong: a Session read waits only for this process's writes, not the other's last ones.
    from tusou.store.milvus import MilvusStore

    uri = milvus_server.uri
    strong = MilvusStore(uri, collection=COLLECTION, model_id="m", dim=DIM, consistency="Strong")
    with contextlib.closing(strong) as s:
        expected = [f"s{i}" for i in range(4)] + [f"{n}{j}" for n in "ab" for j in range(30)]
        listed = all_ids(s, t, "both")
        assert sorted(listed) == sorted(expected)
        # Two updates of one image at the same instant can both write its next version (two rows, one
        # primary key); the one that sees the other's copy writes its row once more, which removes both.
        assert s.count(t, "both") == len(expected)
        for i in range(4):
            info = s.get_image(t, "both", f"s{i}")
            assert info.label in written and info.desc == {"by": info.label[0]}
            assert [h.id for h in s.search(t, ["both"], shared[i][None, :], 1, 0.99)] == [f"s{i}"]
        for name in "ab":
            for j in range(30):
                assert s.get_image(t, "both", f"{name}{j}").label == (f"{name}!" if j % 3 == 0 else name)
                hits = s.search(t, ["both"], own[name][j][None, :], 1, 0.99)
                assert [h.id for h in hits] == [f"{name}{j}"]


@pytest.mark.parametrize(
    ("updates_since", "counts", "kept"),
    [(1, [2, 1], "late"), (2, [2], "early1")],
    ids=["same-next-version", "replaced-twice-since"],
)
def test_an_update_from_a_stale_read_leaves_the_image_counted_once(
    session_store: Any, monkeypatch: pytest.MonkeyPatch, updates_since: int, counts: list[int], kept: str
) -> None:
    """The races made deterministic: an update read version v, and meanwhile this process updated the
    image ``updates_since`` times.

    * 1: both write v+1 (two rows under one primary key). The late update sees the copy and writes its
      row once more: one row, the late update's label.
    * 2 (another process's Session read can be that old): it writes v+1 beside v+2, the newer version.
      It sees v+2 stand after its key and deletes its own row only: one row, the newer update's label,
      as if the late update had come first.
    Either way count(*) is exact."""
    s, t = session_store, "t-" + uuid.uuid4().hex[:12]
    vecs = unit(np.random.default_rng(43), 2)
    s.create_group(t, "race", [NewImage(f"r{i}", "old", None, None, v) for i, v in enumerate(vecs)])
    read_before = s._image_row(t, "race", "r0", s._row_fields)
    for n in range(updates_since):
        assert s.update_image(t, "race", "r0", label=f"early{n}").label == f"early{n}"
    seen: list[int] = []
    count_rows = s._rows_under
    with monkeypatch.context() as patch:
        patch.setattr(s, "_image_row", lambda *args: dict(read_before))  # read before the others wrote
        patch.setattr(s, "_rows_under", lambda *args: seen.append(count_rows(*args)) or seen[-1])
        assert s.update_image(t, "race", "r0", label="late").label == "late"
    assert seen == counts  # the extra row was there, and was settled
    assert s.count(t, "race") == 2 and all_ids(s, t, "race") == ["r0", "r1"]
    assert s.get_image(t, "race", "r0").label == kept
    assert [(h.id, h.label) for h in s.search(t, ["race"], vecs[0][None, :], -1, 0.99)] == [("r0", kept)]


def test_retagging_while_an_update_of_the_same_image_lands_leaves_it_counted_once(
    session_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tusou retag`` (set_tags) rewrites rows as update_image does, with the same settle: a retag that
    read an image before an update wrote writes the same next version; it sees the copy and writes its row
    once more. One row per image, count exact, the new tags kept; the image retagged alongside, untouched
    by the race, is rewritten once."""
    s, t = session_store, "t-" + uuid.uuid4().hex[:12]
    vecs = unit(np.random.default_rng(44), 3)
    s.create_group(t, "retag", [NewImage(f"r{i}", "old", None, None, v) for i, v in enumerate(vecs)])
    read_before = s._rows_by_ids(t, "retag", ["r0", "r1"], s._row_fields)
    assert s.update_image(t, "retag", "r0", label="first").label == "first"
    copies: list[int] = []
    count_copies = s._rows_under
    with monkeypatch.context() as patch:
        patch.setattr(s, "_rows_by_ids", lambda *args: [dict(r) for r in read_before])  # read before "first"
        patch.setattr(s, "_rows_under", lambda *args: copies.append(count_copies(*args)) or copies[-1])
        assert s.set_tags(t, "retag", {"r0": [[3, 0.9]], "r1": [[4, 0.8]]}) == 2
    assert copies[:2] == [3, 2]  # the batch held a copy, r0's key held it
    assert copies[-1] == 1  # and it was settled
    assert s.count(t, "retag") == 3 and all_ids(s, t, "retag") == ["r0", "r1", "r2"]
    assert s.get_image(t, "retag", "r0").tags == [[3, 0.9]]
    assert s.get_image(t, "retag", "r1").tags == [[4, 0.8]]
    assert [h.id for h in s.search(t, ["retag"], vecs[0][None, :], -1, 0.99)] == ["r0"]


def test_an_update_interrupted_between_its_two_writes_loses_nothing(
    session_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, t = session_store, "t-" + uuid.uuid4().hex[:12]
    vecs = unit(np.random.default_rng(41), 3)
    s.create_group(t, "crash", [NewImage(f"c{i}", "old", {"n": i}, None, v) for i, v in enumerate(vecs)])

    def crash(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("process killed")

    with monkeypatch.context() as patch:
        patch.setattr(s, "_delete_seqs", crash)  # the new version is written, the old one not deleted
        with pytest.raises(ConnectionError):
            s.update_image(t, "crash", "c1", label="new")
    # Both versions are stored (count, a count(*) of rows, sees both until the next update of the image);
    # every other read shows the image once, as its newer version.
    assert all_ids(s, t, "crash") == ["c0", "c1", "c2"] and s.count(t, "crash") == 4
    assert s.get_image(t, "crash", "c1").label == "new"
    assert [(h.id, h.label) for h in s.search(t, ["crash"], vecs[1][None, :], -1, 0.99)] == [("c1", "new")]
    # The next update removes the stale version.
    assert s.update_image(t, "crash", "c1", label="newer").label == "newer"
    assert s.count(t, "crash") == 3 and all_ids(s, t, "crash") == ["c0", "c1", "c2"]
    assert s.get_image(t, "crash", "c1").desc == {"n": 1}
