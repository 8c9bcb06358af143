"""`tusou import`, `copy`, `groups`, `info`, `search` against real servers over HTTP, with real photos."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from tests import imagegen
from tests.conftest import PHOTOS, ImageServer, Tusou, jpeg
from tusou.cli import main
from tusou.client import Client, data_uri
from tusou.client import Image as NewImage
from tusou.config import Settings
from tusou.embed.base import Embedder

ROOT = Path(__file__).resolve().parent.parent
PHOTO_FILES = sorted(PHOTOS.glob("*.jpg"))
FOLDER_SIZE = 200


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 real photos: the repo's 12, then crops/flips/turns/colour shifts of them, in nested folders."""
    root = tmp_path_factory.mktemp("photos")
    photos = [Image.open(p) for p in PHOTO_FILES]
    for n, img in enumerate(imagegen.photo_variants(photos, FOLDER_SIZE)):
        sub = root / f"set{n % 3}" / ("deep" if n % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{PHOTO_FILES[n % len(PHOTO_FILES)].stem}-{n:03d}.jpg").write_bytes(jpeg(img, 85))
    (root / "notes.txt").write_text("not an image: left alone")
    return root


def folder_ids(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}


@pytest.fixture
def api(tusou: Tusou) -> Iterator[Client]:
    key = tusou.keys.create("cli")
    with Client(tusou.server.url, key.access_key, key.secret_key) as client:
        yield client


def env_for(api: Client, **extra: str) -> dict[str, str]:
    return {
        "TUSOU_SERVER": api.server,
        "TUSOU_ACCESS_KEY": api.access_key,
        "TUSOU_SECRET_KEY": api._secret_key,
        **extra,
    }


def cli(api: Client, *args: str, stdin: str | None = None, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env_for(api, **env), input=stdin, catch_exceptions=False)


def test_import_folder_every_image_searchable(api: Client, photo_folder: Path, tmp_path: Path) -> None:
    result = cli(api, "import", "album", str(photo_folder), "--json", "--failures", str(tmp_path / "f.jsonl"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary | {"seconds": 0} == {"added": 200, "skipped": 0, "failed": 0, "reasons": {}, "seconds": 0}
    assert "import album: 200/200" in result.stderr  # plain progress lines when not on a terminal
    assert not (tmp_path / "f.jsonl").exists()

    ids = folder_ids(photo_folder)
    listed = [img.id for img in api.iter_images("album", page_size=64)]
    assert len(listed) == FOLDER_SIZE and set(listed) == ids

    # The folder holds ~17 crops/flips of each photo, all near-duplicates of one another: a sibling may
    # outscore the image itself by a few thousandths (tiny 160 px variants, projected vectors), so each
    # image must be among its first hits, with a near-duplicate score, and every first hit of its photo.
    def found(image_id: str) -> tuple[str, list[str], float]:
        hits = api.search("album", data_uri(photo_folder / image_id), limit=3)
        mine = [h.score for h in hits if h.id == image_id]
        return image_id, [h.id for h in hits], mine[0] if mine else 0.0

    def photo_of(image_id: str) -> str:
        return image_id.split("/")[-1].rsplit("-", 1)[0]

    with ThreadPoolExecutor(16) as pool:  # the server batches concurrent queries through the model
        misses = [
            (want, got, score)
            for want, got, score in pool.map(found, sorted(ids))
            if score < 0.85 or {photo_of(g) for g in got} != {photo_of(want)}
        ]
    assert misses == []

    # The read commands, on the same group.
    assert cli(api, "groups").stdout.splitlines() == ["album"]
    assert json.loads(cli(api, "info", "album", "--json").stdout) == {"group": "album", "count": 200}
    koala = next(i for i in sorted(ids) if "koala" in i)
    table = cli(api, "search", "album", str(photo_folder / koala), "--limit", "3").stdout.splitlines()
    assert table[0].split() == ["score", "id", "label", "desc"] and table[1].split()[1] == koala
    rows = json.loads(cli(api, "search", "album", str(photo_folder / koala), "--json", "--limit", "3").stdout)
    assert rows[0]["id"] == koala and rows[0]["score"] > 0.9 and len(rows) <= 3


def served(image_server: ImageServer) -> str:
    return f"http://127.0.0.1:{image_server.httpd.server_address[1]}"


def count_or_zero(api: Client, group: str) -> int:
    try:
        return api.count(group)
    except Exception:
        return 0


def test_import_killed_halfway_resumes_exactly_once(api: Client, photo_folder: Path, tmp_path: Path) -> None:
    env = dict(os.environ, **env_for(api))
    args = [sys.executable, "-m", "tusou", "import", "resumed", str(photo_folder), "--batch-size", "8"]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while count_or_zero(api, "resumed") < 60:
        assert first.poll() is None and time.monotonic() < deadline, (
            first.stdout.read() if first.stdout else ""
        )
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    at_kill = api.count("resumed")
    assert 60 <= at_kill < FOLDER_SIZE  # really killed halfway, not after the end

    second = subprocess.run(
        [*args, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["failed"] == 0 and summary["added"] + summary["skipped"] == FOLDER_SIZE
    assert summary["skipped"] >= at_kill
    listed = [img.id for img in api.iter_images("resumed")]
    assert len(listed) == FOLDER_SIZE == len(set(listed)) == api.count("resumed")
    assert set(listed) == folder_ids(photo_folder)


def test_manifest_with_bad_rows(api: Client, tmp_path: Path, image_server: ImageServer) -> None:
    (tmp_path / "imgs").mkdir()
    for p in PHOTO_FILES[:3]:
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    rows = [
        json.dumps({"uri": "imgs/" + PHOTO_FILES[0].name, "id": "a", "label": "palace", "desc": {"n": 1}}),
        json.dumps({"uri": data_uri(PHOTO_FILES[1]), "id": "b"}),
        json.dumps({"uri": image_server.put("c.jpg", PHOTO_FILES[2].read_bytes()), "id": "c", "label": "x"}),
        "{not json",
        json.dumps({"id": "no-uri"}),
        json.dumps({"uri": "imgs/" + PHOTO_FILES[2].name}),
        json.dumps({"uri": "imgs/missing.jpg", "id": "gone"}),
        json.dumps({"uri": "data:application/octet-stream;base64,aGVsbG8gd29ybGQ=", "id": "text"}),
        json.dumps({"uri": served(image_server) + "/404.jpg", "id": "http404"}),
        json.dumps({"uri": data_uri(PHOTO_FILES[1]), "id": "b"}),
    ]
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    failures = tmp_path / "failed.jsonl"
    result = cli(api, "import", "m", str(manifest), "--failures", str(failures))
    assert result.exit_code == 1, result.output
    assert "added 3, skipped 0 (already there), failed 7" in result.stdout
    written = [json.loads(line) for line in failures.read_text().splitlines()]
    by_where = {f["where"]: (f["id"], f["message"]) for f in written}
    assert by_where == {
        "list.jsonl:4": (None, "invalid json"),
        "list.jsonl:5": ("no-uri", "missing uri"),
        "list.jsonl:6": (None, "missing id"),
        "list.jsonl:7": ("gone", "file not found"),
        "list.jsonl:8": ("text", "not an image: unknown format"),
        "list.jsonl:9": ("http404", "fetch failed: http 404"),
        "list.jsonl:10": ("b", "duplicate id in source"),
    }
    assert "1 failed: fetch failed: http 404" in result.stdout
    assert api.count("m") == 3
    assert (api.get_image("m", "a").label, api.get_image("m", "a").desc) == ("palace", {"n": 1})

    # The same kind of rows as CSV on stdin (paths relative to the working folder): "a" is skipped now.
    imgs = tmp_path / "imgs"
    csv_text = (
        "uri,id,label,desc\n"
        f'{imgs / PHOTO_FILES[0].name},a,palace,"{{""n"": 1}}"\n'
        f"{imgs / PHOTO_FILES[2].name},d,koala,plain text\n"
        ",e,,\n"
    )
    again = cli(api, "import", "m", "-", "--json", "--failures", str(failures), stdin=csv_text)
    assert again.exit_code == 1
    assert json.loads(again.stdout) | {"seconds": 0} == {
        "added": 1,
        "skipped": 1,
        "failed": 1,
        "reasons": {"missing uri": 1},
        "seconds": 0,
    }
    assert api.get_image("m", "d").desc == "plain text"


def test_missing_keys_or_source_is_a_usage_error(api: Client, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["groups"], env={"TUSOU_ACCESS_KEY": "", "TUSOU_SECRET_KEY": ""})
    assert result.exit_code == 2 and "TUSOU_ACCESS_KEY" in result.output
    missing = cli(api, "import", "g", str(PHOTOS), str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
    (tmp_path / "headless.csv").write_text("photo.jpg,1\n", encoding="utf-8")
    headless = cli(api, "import", "g", str(tmp_path / "headless.csv"))
    assert headless.exit_code == 2 and "needs a header row" in headless.output
    # A source that cannot be read stops the command before anything reaches the server: no empty group.
    assert api.list_groups() == []
    wrong = cli(api, "info", "g", TUSOU_SECRET_KEY="wrong")
    assert wrong.exit_code == 1 and "401 bad token" in wrong.output


def test_copy_of_a_missing_group_creates_nothing(api: Client) -> None:
    """A mistyped source group is the source's error, and the destination is left as it was."""
    from_env = {"TUSOU_FROM_ACCESS_KEY": api.access_key, "TUSOU_FROM_SECRET_KEY": api._secret_key}
    args = ["copy", "nosuch", "moved", "--from", api.server, "--uri-template", "https://cdn.example/{id}"]
    result = cli(api, *args, **from_env)
    assert result.exit_code == 1 and "400 group nosuch not exists" in result.output
    assert api.list_groups() == []


def test_copy_between_servers(
    api: Client, tmp_path: Path, embedder: Embedder, image_server: ImageServer
) -> None:
    ids = [p.name for p in PHOTO_FILES] + ["猫 cat/2.jpg"]
    files = [*PHOTO_FILES, PHOTO_FILES[8]]
    images = []
    for n, (image_id, path) in enumerate(zip(ids, files, strict=True)):
        image_server.put("cdn/" + quote(image_id, safe="/"), path.read_bytes())
        desc = {"sku": n, "note": "中文"} if n % 3 else None
        images.append(NewImage(data_uri(path), id=image_id, label=f"label{n % 4}", desc=desc))
    api.new_group("catalogue", images)
    template = served(image_server) + "/cdn/{id}"

    destination = Tusou(Settings(data=tmp_path / "dst", fetch_allow=["127.0.0.1"]), embedder)
    destination.server.__enter__()
    try:
        key = destination.keys.create()
        with Client(destination.server.url, key.access_key, key.secret_key) as dst:
            from_env = {"TUSOU_FROM_ACCESS_KEY": api.access_key, "TUSOU_FROM_SECRET_KEY": api._secret_key}
            args = ["copy", "catalogue", "moved", "--from", api.server, "--uri-template", template, "--json"]
            env = env_for(dst, **from_env)
            result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout)["added"] == len(ids)

            def listing(client: Client, group: str) -> list[tuple[str, str, object]]:
                return sorted((i.id, i.label, i.desc) for i in client.iter_images(group))

            assert listing(dst, "moved") == listing(api, "catalogue")
            for path in PHOTO_FILES[::3]:
                uri = data_uri(path)
                want = [
                    (h.id, h.label, h.desc, round(h.score, 4)) for h in api.search("catalogue", uri, limit=5)
                ]
                got = [(h.id, h.label, h.desc, round(h.score, 4)) for h in dst.search("moved", uri, limit=5)]
                assert got == want and want

            rerun = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
            assert rerun.exit_code == 0 and json.loads(rerun.stdout)["skipped"] == len(ids)
            assert dst.count("moved") == len(ids)
    finally:
        destination.close()


def test_no_server_says_it_is_still_trying(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection is tried again for a while (a restarting server); the command says so at once
    instead of waiting silently, and then fails with the error."""
    import tusou.cli_data
    from tests.conftest import free_port

    class Quick(Client):  # the command's own retries, with waits of milliseconds
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, backoff_s=0.001, max_backoff_s=0.002, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tusou.cli_data, "Client", Quick)
    env = {"TUSOU_ACCESS_KEY": "ak", "TUSOU_SECRET_KEY": "sk"}
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["groups", "--server", url], env=env)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"cannot connect to {url}") and "trying again" in lines[0]
    assert lines[1].startswith(f"error: cannot connect to {url}")
