"""Keyword search (data.text) and filtered search latency in one big group of the embedded store.

    python bench/keyword_speed.py [--n 100000]

Fills one SQLite group with N images (16-d random vectors: the vector part is not what is measured here),
each with 5 automatic tags on random classes (probabilities 0.5, 0.2, 0.1, 0.05, 0.02) and a desc whose
``shard`` is the image number mod 100, then times ``SQLiteStore.search_tags`` (limit 10, threshold 0.1)
for words covering few to all classes, without and with a filter matching 1 % of the group, and a
filtered vector search. Prints a table; numbers depend on the machine (best of 3 runs each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tusou.embed import concepts  # noqa: E402
from tusou.store.base import NewImage  # noqa: E402
from tusou.store.filters import parse_filter  # noqa: E402
from tusou.store.sqlite import SQLiteStore  # noqa: E402


def best_ms(fn: object, runs: int = 3) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        n = len(fn())  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return 1000 * min(times), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tusou-kw-"))
    store = SQLiteStore(folder / "t.db", model_id="m", dim=16)
    store.create_group("t", "g", [])
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(args.n, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    t0 = time.perf_counter()
    for start in range(0, args.n, 10_000):
        batch = []
        for i in range(start, min(args.n, start + 10_000)):
            classes = rng.choice(1000, 5, replace=False)
            tags = [[int(c), p] for c, p in zip(classes, (0.5, 0.2, 0.1, 0.05, 0.02), strict=True)]
            batch.append(NewImage(f"i{i}", "c", {"shard": i % 100}, None, vecs[i], tags))
        store.add_images("t", "g", batch)
    print(f"filled {args.n} images in {time.perf_counter() - t0:.0f} s\n")
    table = concepts.load()
    one_pct = parse_filter({"desc.shard": 7})
    print("| query | classes | filter | ms | hits |\n|---|---|---|---|---|")
    for word in ("hand tool", "dog", "animal", "entity"):
        classes = sorted(table.resolve(word))
        for where in (None, one_pct):
            ms, n = best_ms(lambda c=classes, w=where: store.search_tags("t", ["g"], c, 10, 0.1, w))
            print(f"| text {word!r} | {len(classes)} | {'1 %' if where else '-'} | {ms:.0f} | {n} |")
    ms, n = best_ms(lambda: store.search("t", ["g"], vecs[5][None, :], 10, -1.0, one_pct))
    print(f"| image (vector) | - | 1 % | {ms:.0f} | {n} |")
    store.close()


if __name__ == "__main__":
    main()
