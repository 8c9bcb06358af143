"""Hostile tenants: each attack of issue 10 against a real server, with its figure and its bound.

    python bench/hostile.py [--only NAME ...] [--images 16] [--searches 4]

Starts ``python -m tusou serve`` on loopback on a scratch data folder (two access keys: the attacker's and
another tenant's), runs each attack bounded in time and request count, and prints one row per attack: the
figure measured, the bound from the issue's "Done when", and whether it holds. Memory is the server
process's RSS, sampled every 5 ms with psutil, as growth over its level before the attack. Exits 1 if any
bound is exceeded. ``tests/test_hostile_tenants.py`` runs short versions of the same attacks.

Nothing leaves the machine: the only servers are the tusou under test and loopback helpers started here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tusou`, `bench` and `tests` importable
    sys.path.insert(0, str(ROOT))

from bench.crash import ServeProcess, SignedClient, free_port  # noqa: E402
from bench.load import RssSampler  # noqa: E402

MB = 1024 * 1024
SIDE = 4999  # Qiniu's largest allowed side


# --- payloads: small files that decode big ------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes) -> bytes:
    """A valid PNG whose every row is ``row`` (filter byte included): megapixels in a few KB of zlib."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    packer = zlib.compressobj(9)
    parts = [packer.compress(row) for _ in range(height)]
    parts.append(packer.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=8)
def big_rgb_png(side: int = SIDE, shade: int = 0) -> bytes:
    """side x side 8-bit RGB (the issue's ~95 KB file that decodes to ~100 MB in Pillow)."""
    pixel = bytes(((37 + shade) % 256, (101 + shade) % 256, (211 + shade) % 256))
    return _png(side, side, 8, 2, b"\x00" + pixel * side)


@lru_cache(maxsize=8)
def big_grey16_png(side: int = SIDE, shade: int = 0) -> bytes:
    """side x side 16-bit grey (the issue's ~48 KB file whose old 16-bit path made 64-bit copies)."""
    value = struct.pack(">H", (0x9ABC + 97 * shade) % 65536)
    return _png(side, side, 16, 0, b"\x00" + value * side)


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


# --- the server under attack --------------------------------------------------------------------------------
@dataclass
class Tenants:
    server: ServeProcess
    attacker: SignedClient
    other: SignedClient
    attacker_key: tuple[str, str]
    other_key: tuple[str, str]

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)


@contextmanager
def serve(folder: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[Tenants]:
    """A real ``tusou serve`` on loopback with two tenants' keys, stopped afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    port = free_port()
    full_env = {"TUSOU_RATE_LIMIT_PER_S": "0", **(env or {})}
    server = ServeProcess(data, port, folder / "serve.log", env=full_env)
    try:
        server.wait_ready(timeout)
        attacker_key = server.first_key()
        out = subprocess.run(
            [sys.executable, "-m", "tusou", "keys", "create", "--name", "other", "--data", str(data)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, **full_env),
        ).stdout
        created = json.loads(out.strip().splitlines()[-1])
        other_key = (created["access_key"], created["secret_key"])
        yield Tenants(
            server,
            SignedClient(server.url, *attacker_key, timeout=timeout),
            SignedClient(server.url, *other_key, timeout=timeout),
            attacker_key,
            other_key,
        )
    finally:
        server.stop()


def warm_up(t: Tenants, group: str = "warm") -> None:
    """Create both tenants' groups and run one add and one search, so the model and the store are loaded."""
    from bench.crash import image_uri

    for client in (t.attacker, t.other):
        resp = client.post(
            f"/v1/image/group/{group}/new", {"data": [{"uri": image_uri(1), "attribute": {"id": "w"}}]}
        )
        assert resp.status_code == 200, resp.text
        resp = client.post(
            "/v1/image/groups/search", {"data": {"uri": image_uri(2)}, "params": {"groups": [group]}}
        )
        assert resp.status_code == 200, resp.text


# --- attacks ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    attack: str
    figure: float
    bound: float
    unit: str
    note: str = ""

    @property
    def holds(self) -> bool:
        return self.figure <= self.bound


def _peak_growth(t: Tenants, action: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``action`` while sampling the server's RSS; (peak growth in MB over the level before, result)."""
    before = t.rss()
    with RssSampler(t.pid) as sampler:
        result = action()
    return (sampler.peak - before) / MB, result


def attack_pixel_batch(
    t: Tenants, images: int = 16, group: str = "warm"
) -> tuple[Row, list[requests.Response]]:
    """One add with ``images`` PNGs of 4999x4999 pixels, ~95 KB each."""
    data = [
        {"uri": data_uri(big_rgb_png(shade=i % 4)), "attribute": {"id": f"big-{i}"}} for i in range(images)
    ]
    growth, resp = _peak_growth(t, lambda: t.attacker.post(f"/v1/image/group/{group}/add", {"data": data}))
    body = resp.json() if resp.status_code == 200 else {}
    ok = sum(1 for e in body.get("errors", []) if e is None)
    note = f"status {resp.status_code}, {ok}/{images} images added"
    return Row(f"{images} PNGs of 4999x4999 in one add: peak RSS growth", growth, 600, "MB", note), [resp]


def attack_grey16_searches(
    t: Tenants, searches: int = 4, group: str = "warm"
) -> tuple[Row, list[requests.Response]]:
    """``searches`` concurrent searches, each with one 16-bit grey 4999x4999 PNG."""
    bodies = [
        {"data": {"uri": data_uri(big_grey16_png(shade=i))}, "params": {"groups": [group]}}
        for i in range(searches)
    ]

    def run() -> list[requests.Response]:
        with ThreadPoolExecutor(searches) as pool:
            return list(pool.map(lambda b: t.attacker.post("/v1/image/groups/search", b), bodies))

    growth, responses = _peak_growth(t, run)
    statuses = sorted({r.status_code for r in responses})
    note = f"statuses {statuses}"
    return Row(
        f"{searches} concurrent 16-bit 4999x4999 searches: peak RSS growth", growth, 600, "MB", note
    ), responses


# --- the table ----------------------------------------------------------------------------------------------
def print_table(rows: list[Row], extra: list[str] | None = None) -> None:
    width = max(len(r.attack) for r in rows)
    print(f"{'attack'.ljust(width)} | {'figure':>10} | {'bound':>8} | holds | note")
    print(f"{'-' * width}-|-{'-' * 10}-|-{'-' * 8}-|-------|------")
    for r in rows:
        fig = f"{r.figure:.2f} {r.unit}"
        bnd = f"{r.bound:g} {r.unit}"
        print(f"{r.attack.ljust(width)} | {fig:>10} | {bnd:>8} | {'yes' if r.holds else 'NO':>5} | {r.note}")
    for line in extra or []:
        print(line)


ATTACKS = ("pixels", "grey16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=ATTACKS, help="Run only these attacks.")
    parser.add_argument("--images", type=int, default=16, help="PNGs in the pixel-batch add.")
    parser.add_argument("--searches", type=int, default=4, help="Concurrent 16-bit searches.")
    args = parser.parse_args()
    chosen = set(args.only or ATTACKS)
    rows: list[Row] = []
    responses: list[requests.Response] = []
    with tempfile.TemporaryDirectory(prefix="tusou-hostile-") as tmp:
        folder = Path(tmp)
        # Memory attacks each on a fresh server, so one's leftovers do not hide the next one's growth.
        if "pixels" in chosen:
            with serve(folder / "pixels") as t:
                warm_up(t)
                row, got = attack_pixel_batch(t, args.images)
                rows.append(row)
                responses += got
        if "grey16" in chosen:
            with serve(folder / "grey16") as t:
                warm_up(t)
                row, got = attack_grey16_searches(t, args.searches)
                rows.append(row)
                responses += got
    rows.append(Row("responses with status 500", sum(r.status_code == 500 for r in responses), 0, ""))
    rows.append(Row("responses without X-Reqid", sum("X-Reqid" not in r.headers for r in responses), 0, ""))
    print(f"tusou hostile-tenant bench: {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores")
    print_table(rows)
    sys.exit(0 if all(r.holds for r in rows) else 1)


if __name__ == "__main__":
    main()
