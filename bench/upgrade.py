"""What `tusou upgrade` costs: stored vectors converted per second, and the disk before and after.

Fills an embedded store with N random unit rows of the old width (1280, lite0 before its projection) under
one model id, then opens it as a release whose embedder converts them (a fixed random linear map to
``--dim``, then unit length: the same arithmetic as a learned projection) with ``upgrade=True``, exactly the
path of ``tusou upgrade``. Prints one table; the load average is printed beside it (the machine is shared).

    PYTHONPATH=$PWD python bench/upgrade.py --n 50000 --dim 384
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from tusou.store.base import NewImage
from tusou.store.sqlite import SQLiteStore


def db_mb(folder: Path) -> float:
    with sqlite3.connect(folder / "tusou.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in folder.glob("tusou.db*")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="stored vectors")
    parser.add_argument("--old-dim", type=int, default=1280)
    parser.add_argument("--dim", type=int, default=384, help="width after the upgrade")
    parser.add_argument("--batch", type=int, default=1000, help="vectors per transaction")
    args = parser.parse_args()
    matrix = np.random.default_rng(0).standard_normal((args.old_dim, args.dim)).astype(np.float32)

    def convert(rows: np.ndarray) -> np.ndarray:
        out = rows @ matrix
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    with tempfile.TemporaryDirectory(prefix="tusou-upgrade-") as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        store = SQLiteStore(folder / "tusou.db", model_id="old", dim=args.old_dim)
        store.create_group("t", "g", [])
        rng = np.random.default_rng(1)
        for start in range(0, args.n, 5000):
            rows = rng.standard_normal((min(5000, args.n - start), args.old_dim)).astype(np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            store.add_images(
                "t", "g", [NewImage(f"i{start + i}", "", None, None, v) for i, v in enumerate(rows)]
            )
        store.close()
        fill_s, before = time.monotonic() - started, db_mb(folder)
        started = time.monotonic()
        store = SQLiteStore(
            folder / "tusou.db",
            model_id="new",
            dim=args.dim,
            convert_from=lambda model: convert if model == "old" else None,
            upgrade=True,
            upgrade_batch=args.batch,
        )
        opened_s = time.monotonic() - started
        store.close()
        done = store.upgraded
        assert done is not None
        after = db_mb(folder)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"| vectors | {args.old_dim}-d -> {args.dim}-d | upgrade s | vectors/s | open incl. index build s "
        f"| tusou.db before -> after | fill s | load average |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {done.rows} | batch {args.batch} | {done.seconds:.1f} | {done.rows / done.seconds:.0f} "
        f"| {opened_s:.1f} | {before:.0f} MB -> {after:.0f} MB | {fill_s:.0f} | {load} |"
    )


if __name__ == "__main__":
    main()
