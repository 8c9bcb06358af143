"""`tusou backup` of a live data folder while the server writes, and `tusou restore`, through the CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from click.testing import CliRunner, Result

from tests import imagegen
from tests.conftest import Tusou, jpeg
from tusou.cli import main
from tusou.client import Client, Image, TusouError, data_uri
from tusou.config import Settings
from tusou.embed.base import Embedder


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def image(seed: int) -> str:
    return data_uri(jpeg(imagegen.scene(seed, (96, 96)), 85))


def test_backup_during_writes_restores_every_acknowledged_image(
    tusou: Tusou, embedder: Embedder, tmp_path: Path
) -> None:
    key = tusou.keys.create("backup")
    api = Client(tusou.server.url, key.access_key, key.secret_key)
    api.new_group("live", [Image(image(0), id="0")])
    acked: dict[str, float] = {"0": time.monotonic()}  # id -> when its add was answered
    stop = threading.Event()
    errors: list[Exception] = []

    def writer(first: int) -> None:
        seed = first
        while not stop.is_set() and seed < first + 60:
            try:
                result = api.add_images("live", [Image(image(seed), id=str(seed))])
            except TusouError as exc:
                errors.append(exc)
                return
            if result.errors == [None]:
                acked[str(seed)] = time.monotonic()
            seed += 1

    writers = [threading.Thread(target=writer, args=(start,)) for start in (1000, 2000)]
    for thread in writers:
        thread.start()
    while len(acked) < 12:
        time.sleep(0.01)
    backup_started = time.monotonic()
    taken = run("backup", str(tmp_path / "bk"), "--data", str(tusou.settings.data), "--json")
    while len(acked) < 30 and all(t.is_alive() for t in writers):  # writes go on after the backup too
        time.sleep(0.01)
    stop.set()
    for thread in writers:
        thread.join()
    assert taken.exit_code == 0, taken.output
    assert not errors
    before = sorted(i for i, when in acked.items() if when < backup_started)
    summary = json.loads(taken.stdout)
    assert len(before) <= summary["images"] < len(acked)

    restored = run("restore", str(tmp_path / "bk"), "--data", str(tmp_path / "restored"))
    assert restored.exit_code == 0, restored.output
    server = Tusou(Settings(data=tmp_path / "restored"), embedder)
    server.server.__enter__()
    try:
        # The same key: keys.db came back too. The index is rebuilt on this first start.
        with Client(server.server.url, key.access_key, key.secret_key) as back:
            assert back.count("live") == summary["images"]
            listed = {img.id for img in back.iter_images("live")}
            assert set(before) <= listed <= set(acked)
            for image_id in before:
                seed = int(image_id)
                hits = back.search("live", image(seed), limit=1)
                assert hits and hits[0].id == image_id and hits[0].score > 0.9, image_id
    finally:
        server.close()
        api.close()


def test_damaged_or_partial_backup_is_refused(tusou: Tusou, tmp_path: Path) -> None:
    key = tusou.keys.create()
    with Client(tusou.server.url, key.access_key, key.secret_key) as api:
        api.new_group("g", [Image(image(n), id=str(n)) for n in range(3)])
    good = tmp_path / "good"
    assert run("backup", str(good), "--data", str(tusou.settings.data)).exit_code == 0
    assert run("backup", str(good), "--data", str(tusou.settings.data)).exit_code == 1  # not over a backup

    def damaged(name: str, change: str) -> Path:
        copy = tmp_path / name
        copy.mkdir()
        for f in good.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        if change == "flip":
            db = bytearray((copy / "tusou.db").read_bytes())
            db[len(db) // 2] ^= 0xFF
            (copy / "tusou.db").write_bytes(bytes(db))
        elif change == "truncate":
            (copy / "keys.db").write_bytes((copy / "keys.db").read_bytes()[:4096])
        elif change == "no-manifest":
            (copy / "MANIFEST.json").unlink()
        elif change == "bad-manifest":
            (copy / "MANIFEST.json").write_text('{"format": "tusou-backup", "vers')
        return copy

    cases = {
        "flip": "tusou.db fails its checksum",
        "truncate": "keys.db has the wrong size",
        "no-manifest": "not a complete backup",
        "bad-manifest": "MANIFEST.json is damaged",
    }
    for change, message in cases.items():
        target = tmp_path / f"data-{change}"
        result = run("restore", str(damaged(change, change)), "--data", str(target))
        assert result.exit_code == 1 and message in result.output, (change, result.output)
        assert not (target / "tusou.db").exists() and not (target / "keys.db").exists()

    assert run("restore", str(good), "--data", str(tmp_path / "ok")).exit_code == 0
    again = run("restore", str(good), "--data", str(tmp_path / "ok"))
    assert again.exit_code == 1 and "already holds tusou data" in again.output
    manifest = json.loads((good / "MANIFEST.json").read_text())
    assert (manifest["groups"], manifest["images"]) == (1, 3)
