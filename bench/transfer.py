"""Moving data in and out: `tusou import` over HTTP, the server's own ingest, backup and restore at 100k rows.

    python bench/transfer.py [--images 1000] [--rows 100000] [--batch-size 32] [--concurrency 4] [--rounds 2]

1. Images: ``--images`` distinct JPEGs (quality 88, at most 320 px a side) made from the repository's 12
   photos in ``tests/data/photos``: the photos, then crops, mirrors, quarter turns and colour/brightness
   shifts of them (``tests/imagegen.photo_variants``), written to a folder.
2. Import over HTTP: a fresh ``python -m tusou serve`` subprocess (first-start key, embedded store), warmed
   with one import of the 12 photos; then ``python -m tusou import GROUP FOLDER`` as a user runs it
   (``--batch-size``/``--concurrency``), timed from process start to exit; every image must be counted.
3. The server's own ingest, in this process on the same machine (the HTTP server stopped first): the real
   ``Service`` (``build_service``: model, SQLite store, loader) fed the same images as data URIs through
   ``Service.add_images``, batches of ``--batch-size``, once from one thread and once from
   ``--concurrency`` threads (what the import command sends at once). No HTTP, no JSON, no signing.
   Steps 2 and 3 run ``--rounds`` times, interleaved (each on fresh folders), and the best round counts:
   on a shared machine other work only ever slows a round down.
4. Backup and restore of ``--rows`` rows: a real data folder (keys.db, tusou.db, index) filled through
   ``SQLiteStore.add_images`` in batches of 10,000 with synthetic rows: each vector a perturbed mixture of
   two real embeddings of the images of step 1 (photo-like neighbourhoods), an id ``s<n>``, a label out of
   20, a small JSON desc (``{"sku": n, "note": ...}``) and an http URI. Then ``tusou backup`` (while a
   ``tusou serve`` on that folder answers searches, as in production), ``tusou restore`` into a new folder,
   and ``tusou serve`` on the restored folder timed from process start to the first answered search (the
   index is rebuilt on that start). Sizes on disk (without the model cache) and the servers' RSS are
   printed for sizing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale import synthetic  # noqa: E402
from tests import imagegen  # noqa: E402
from tusou.client import Client, TusouError, data_uri  # noqa: E402
from tusou.config import Settings  # noqa: E402
from tusou.domain import NewImages, NewItem  # noqa: E402
from tusou.service import build_service  # noqa: E402
from tusou.store.base import NewImage  # noqa: E402
from tusou.store.keys import KeyStore  # noqa: E402
from tusou.store.sqlite import SQLiteStore  # noqa: E402

PHOTOS = ROOT / "tests" / "data" / "photos"


def make_images(folder: Path, count: int) -> list[Path]:
    photos = [Image.open(p) for p in sorted(PHOTOS.glob("*.jpg"))]
    folder.mkdir(parents=True)
    paths = []
    for n, img in enumerate(imagegen.photo_variants(photos, count, side=320)):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=88)
        path = folder / f"{n // 100:02d}" / f"img{n:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return int(fields["VmRSS"]) / 1024, int(fields["VmHWM"]) / 1024


def du_mb(path: Path) -> float:
    """Bytes on disk in MB, leaving out the model cache (``models/``, the same for any number of rows)."""
    if path.is_file():
        return path.stat().st_size / 1e6
    files = [f for f in path.rglob("*") if f.is_file() and "models" not in f.relative_to(path).parts[:1]]
    return sum(f.stat().st_size for f in files) / 1e6


class Server:
    """``python -m tusou serve`` on a data folder; its output goes to serve.log beside the folder."""

    def __init__(self, data: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / f"{data.name}-serve.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self.started = time.monotonic()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tusou", "serve", "--data", str(data), "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def first_key(self) -> tuple[str, str]:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if line.startswith("{"):
                    key = json.loads(line)
                    return key["access_key"], key["secret_key"]
            self.check()
            time.sleep(0.1)
        raise RuntimeError("no first key printed: " + self.log.read_text())

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError("tusou serve exited:\n" + self.log.read_text())

    def wait_until(self, ready: Callable[[], bool]) -> float:
        """Seconds from process start until ``ready()`` holds."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            self.check()
            try:
                if ready():
                    return time.monotonic() - self.started
            except TusouError:
                pass
            time.sleep(0.05)
        raise RuntimeError("tusou serve never got ready:\n" + self.log.read_text())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``python -m tusou ARGS`` as a user would; (wall seconds, the finished process)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tusou", *args], env=full_env, capture_output=True, text=True, timeout=3600
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"tusou {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return seconds, done


def import_over_http(args: argparse.Namespace, work: Path, folder: Path, round_: int, report: dict) -> None:
    server = Server(work / f"serve{round_}")
    group = f"bench{round_}"
    try:
        access, secret = server.first_key()
        with Client(server.url, access, secret) as api:
            server.wait_until(lambda: api.health().get("status") == "ok")
            env = {"TUSOU_SERVER": server.url, "TUSOU_ACCESS_KEY": access, "TUSOU_SECRET_KEY": secret}
            cli("import", "warm", str(PHOTOS), "--json", env=env)  # model sessions and caches warm
            seconds, done = cli(
                "import",
                group,
                str(folder),
                "--json",
                "--batch-size",
                str(args.batch_size),
                "--concurrency",
                str(args.concurrency),
                "--failures",
                str(work / "failures.jsonl"),
                env=env,
            )
            summary = json.loads(done.stdout)
            if summary["added"] != args.images or api.count(group) != args.images:
                raise RuntimeError(f"import did not add every image: {summary}")
            report.setdefault("import_img_s", []).append(args.images / seconds)
            report["import_rss_mb"] = rss_mb(server.proc.pid)
    finally:
        server.stop()


def ingest_in_process(
    args: argparse.Namespace, work: Path, paths: list[Path], round_: int, report: dict
) -> tuple[np.ndarray, str, int]:
    """The server's own ingest (Service.add_images); the images' embeddings, model id and dim for step 4."""
    service = build_service(Settings(data=work / f"inproc{round_}"))
    uris = [data_uri(p) for p in paths]
    size = args.batch_size
    try:
        tenant = "bench"
        warm = [NewItem(None, "", None, data_uri(p)) for p in sorted(PHOTOS.glob("*.jpg"))]
        service.new_group(tenant, NewImages("warm", warm))

        def batches(group: str) -> list[NewImages]:
            return [
                NewImages(
                    group,
                    [NewItem(f"{group}-{i + k}", "", None, u) for k, u in enumerate(uris[i : i + size])],
                )
                for i in range(0, len(uris), size)
            ]

        for threads, group in ((1, "one"), (args.concurrency, "many")):
            service.new_group(tenant, NewImages(group, []))
            todo = batches(group)
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(lambda request: service.add_images(tenant, request), todo))
            seconds = time.perf_counter() - started
            if any(e for r in results for e in r.errors) or service.store.count(tenant, group) != len(uris):
                raise RuntimeError(f"in-process ingest into {group} failed")
            report.setdefault(f"inproc_{threads}_img_s", []).append(len(uris) / seconds)
        started = time.perf_counter()
        images = [service.embedder.open_image(p.read_bytes()) for p in paths[:300]]
        base: np.ndarray = service.embedder.embed_images(images)
        report.setdefault("embed_only_img_s", []).append(len(images) / (time.perf_counter() - started))
        return base, service.embedder.model_id, service.embedder.dim
    finally:
        service.close()


def fill(
    args: argparse.Namespace, data: Path, model: tuple[np.ndarray, str, int], report: dict
) -> tuple[str, str]:
    data.mkdir(parents=True)
    keys = KeyStore(data / "keys.db")
    key = keys.create("bench")
    keys.close()
    base, model_id, dim = model
    store = SQLiteStore(data / "tusou.db", model_id=model_id, dim=dim)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    store.create_group(key.access_key, "big", [])
    have = 0
    while have < args.rows:
        step = min(10_000, args.rows - have)
        vectors = synthetic(base, step, rng).astype(np.float32, copy=False)
        rows = [
            NewImage(
                f"s{have + k}",
                f"label{(have + k) % 20}",
                {"sku": have + k, "note": "synthetic row"},
                f"https://cdn.example.com/images/s{have + k}.jpg",
                v,
            )
            for k, v in enumerate(vectors)
        ]
        if any(store.add_images(key.access_key, "big", rows)):
            raise RuntimeError("fill failed")
        have += step
    store.close()  # writes the index snapshot
    report["fill_s"] = time.perf_counter() - started
    return key.access_key, key.secret_key


def backup_restore(
    args: argparse.Namespace, work: Path, model: tuple[np.ndarray, str, int], report: dict
) -> None:
    data = work / "big"
    access, secret = fill(args, data, model, report)
    report["data_mb"] = du_mb(data)
    report["db_mb"] = du_mb(data / "tusou.db")
    query = data_uri(sorted(PHOTOS.glob("*.jpg"))[5])

    def searched(api: Client) -> Callable[[], bool]:
        return lambda: isinstance(api.search("big", query, limit=10), list)

    server = Server(data)
    stop = threading.Event()
    answered = [0]
    try:
        with Client(server.url, access, secret) as api:
            report["start_s"] = server.wait_until(searched(api))
            report["serve_rss_mb"] = rss_mb(server.proc.pid)

            def searcher() -> None:
                while not stop.is_set():
                    api.search("big", query, limit=10)
                    answered[0] += 1

            load = threading.Thread(target=searcher)
            load.start()
            try:
                report["backup_s"], done = cli("backup", str(work / "backup"), "--data", str(data), "--json")
            finally:
                stop.set()
                load.join()
            report["searches_during_backup"] = answered[0]
            report["backup_images"] = json.loads(done.stdout)["images"]
            report["backup_mb"] = du_mb(work / "backup")
    finally:
        server.stop()
    if report["backup_images"] != args.rows:
        raise RuntimeError(f"backup holds {report['backup_images']} rows, not {args.rows}")

    report["restore_s"], _ = cli("restore", str(work / "backup"), "--data", str(work / "restored"))
    restored = Server(work / "restored")
    try:
        with Client(restored.url, access, secret) as api:
            report["restored_start_s"] = restored.wait_until(searched(api))
            if api.count("big") != args.rows:
                raise RuntimeError("the restored server does not hold every row")
            report["restored_rss_mb"] = rss_mb(restored.proc.pid)
    finally:
        restored.stop()
    report["restored_data_mb"] = du_mb(work / "restored")


def print_table(args: argparse.Namespace, r: dict) -> None:
    n = f"{args.rows:,}"

    def mb(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.0f} / {pair[1]:.0f} MB"

    def rate(key: str) -> str:
        values = r[key]
        rounds = ", ".join(f"{v:.1f}" for v in values)
        return f"{max(values):.1f} img/s (rounds: {rounds})"

    threads = args.concurrency
    rows = [
        (
            f"`tusou import` over HTTP, {args.images} images, batch {args.batch_size}, "
            f"concurrency {args.concurrency}, wall time of the command",
            rate("import_img_s"),
        ),
        ("server's own ingest in-process (`Service.add_images`), 1 thread", rate("inproc_1_img_s")),
        (f"server's own ingest in-process, {threads} threads", rate(f"inproc_{threads}_img_s")),
        ("model alone (`embed_images`, 300 images, one call)", rate("embed_only_img_s")),
        ("server RSS after the import (now / peak)", mb(r["import_rss_mb"])),
        (f"fill {n} synthetic rows (`SQLiteStore.add_images`, index snapshot)", f"{r['fill_s']:.1f} s"),
        (f"data folder / tusou.db at {n} rows", f"{r['data_mb']:.0f} / {r['db_mb']:.0f} MB"),
        (f"`tusou serve` start to first answered search, {n} rows", f"{r['start_s']:.1f} s"),
        (f"server RSS, {n} rows loaded (now / peak)", mb(r["serve_rss_mb"])),
        (
            f"`tusou backup`, {n} rows, server answering searches",
            f"{r['backup_s']:.1f} s ({r['backup_mb']:.0f} MB; "
            f"{r['searches_during_backup']} searches answered meanwhile)",
        ),
        ("`tusou restore` (verify sizes, checksums, quick_check; copy)", f"{r['restore_s']:.1f} s"),
        (
            "`tusou serve` on the restored folder to first answered search (index rebuilt)",
            f"{r['restored_start_s']:.1f} s",
        ),
        (
            "restored folder; server RSS (now / peak)",
            f"{r['restored_data_mb']:.0f} MB; {mb(r['restored_rss_mb'])}",
        ),
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n## tusou transfer benchmark ({os.cpu_count()} cores; load average at the end {load})\n")
    print("| measure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000, help="images imported over HTTP")
    parser.add_argument("--rows", type=int, default=100_000, help="rows backed up and restored")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="ingest rounds (the best one shown first)")
    parser.add_argument(
        "--keep", type=Path, help="work in this (new) folder and keep it, instead of a temporary one"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tusou-transfer-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report: dict = {}
        print(f"making {args.images} images from {PHOTOS} ...", file=sys.stderr, flush=True)
        paths = make_images(work / "images", args.images)
        for round_ in range(args.rounds):  # interleaved, so that a busy spell of the machine hits both
            print(f"round {round_ + 1}: import over HTTP ...", file=sys.stderr, flush=True)
            import_over_http(args, work, work / "images", round_, report)
            print(f"round {round_ + 1}: in-process ingest ...", file=sys.stderr, flush=True)
            model = ingest_in_process(args, work, paths, round_, report)
        print(f"backup and restore of {args.rows} rows ...", file=sys.stderr, flush=True)
        backup_restore(args, work, model, report)
        print_table(args, report)
        print("\n" + json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    main()
