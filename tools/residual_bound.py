"""How much of a group the scan's exact bounds by list leave to score (a measurement; the server uses the
angle bound, VectorIndex._angle_window).

    python tools/residual_bound.py [/tmp/tusou-scale-500000-sparse] [--group g1]

For a row x in the IVF list with centroid c and a query view q:

* residual (Cauchy-Schwarz): q.x = q.c + q.(x - c) <= q.c + |q| |x - c|;
* angle (the triangle inequality on the sphere, what the server uses): the angle between q and x is at
  least |angle(q, c) - angle(x, c)|, so q.x <= |q| |x| cos(angle(q, c) - angle(x, c)).

A row whose bound is under the default threshold for every view cannot be in the answer, exactly. This
prints the share of rows each bound leaves for the bench's JPEG queries (with matches: 4 views, and their
first view alone, as a search by a stored id) and for its no-match queries (noise and pattern images,
bench/scale.py's ``unrelated_jpegs``), using the rows' angles as the index stores them. It reads a data
folder that bench/scale.py filled, without writing to it.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scale  # noqa: E402
from tusou.config import Settings  # noqa: E402
from tusou.embed import create_embedder  # noqa: E402
from tusou.store.vector_index import VectorIndex, _products  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default="/tmp/tusou-scale-500000-sparse", type=Path)
    parser.add_argument("--group", default="g1", help="the snapshot name of the group (g<gid>)")
    args = parser.parse_args()
    embedder = create_embedder(Settings(data=args.data))
    index = VectorIndex.load(args.data / "index", args.group, embedder.dim, None)
    if index is None or index._centroids is None:
        raise SystemExit(f"{args.data}: no trained index snapshot named {args.group}")
    if index.angles_due():
        index.fill_angles()  # a snapshot of an earlier format: in memory only
    live = np.flatnonzero(index._inv[: index._n] > 0)
    centroids = index._centroids.astype(np.float32)
    assign = index._assign[live].astype(np.int64)
    residual = np.empty(len(live), dtype=np.float32)
    for start in range(0, len(live), 50_000):
        part = slice(start, start + 50_000)
        _, rows = index._float_rows(live[part])
        residual[part] = np.linalg.norm(rows - centroids[assign[part]], axis=1)
    floor = embedder.cosine_for_score(embedder.default_threshold)
    angle = np.degrees(index._angle[live])
    print(f"{len(live):,} rows, {len(centroids):,} lists, default threshold at cosine {floor:.4f}")
    print(f"|x - c|: p5/p50/p95 {np.percentile(residual, [5, 50, 95]).round(3).tolist()}")
    print(f"angle(x, c), degrees: p5/p50/p95 {np.percentile(angle, [5, 50, 95]).round(1).tolist()}")
    jpegs = scale.photos(300)
    matching = [scale.jpeg_bytes(scale.Image.open(io.BytesIO(jpegs[i])), 480, 70) for i in range(0, 300, 20)]
    with_match = embedder.embed_queries([embedder.open_image(b) for b in matching])
    sets = {
        "JPEG queries with matches, 4 views": with_match,
        "the same, first view": [q[:1] for q in with_match],
        "no-match queries, 4 views": embedder.embed_queries(
            [embedder.open_image(b) for b in scale.unrelated_jpegs(6)]
        ),
    }
    print("\n| queries | residual bound leaves, p50 (max) | angle bound leaves, p50 (max) |\n|---|---|---|")
    for name, queries in sets.items():
        by_residual, by_angle = [], []
        for views in queries:
            views = np.asarray(views, dtype=np.float32)
            best = (views @ centroids.T).max(axis=0)  # each list's best q.c over the query's views
            by_residual.append(float(np.mean(residual >= floor - best[assign])))
            window = index._angle_window(views, _products(views, index._centroids), floor)
            assert window is not None
            by_angle.append(len(index._within(0, index._n, window)) / index._n)
        print(
            f"| {name} | {np.median(by_residual):.1%} ({max(by_residual):.1%}) "
            f"| {np.median(by_angle):.1%} ({max(by_angle):.1%}) |"
        )


if __name__ == "__main__":
    main()
