"""How much of a group an exact list-level bound would leave to scan (a measurement for the next step of
the no-match scan, not used by the server).

    python tools/residual_bound.py [/tmp/tusou-scale-500000-sparse] [--group g1]

For unit vectors, a row x in the IVF list with centroid c satisfies q.x = q.c + q.(x - c) <= q.c + |x - c|.
A row whose residual norm |x - c| is under ``floor - q.c`` (the best view's q.c) therefore cannot reach
the default threshold, exactly. With rows sorted by residual norm inside each list, those rows are a
suffix of the list, and a scan could skip them. This prints the residual norms' spread and the share of
rows the bound leaves for the bench's JPEG queries (with matches) and for its no-match queries (noise and
pattern images, bench/scale.py's ``unrelated_jpegs``). It reads a data folder that bench/scale.py filled.
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
from tusou.store.vector_index import VectorIndex  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default="/tmp/tusou-scale-500000-sparse", type=Path)
    parser.add_argument("--group", default="g1", help="the snapshot name of the group (g<gid>)")
    args = parser.parse_args()
    embedder = create_embedder(Settings(data=args.data))
    index = VectorIndex.load(args.data / "index", args.group, embedder.dim, None)
    if index is None or index._centroids is None:
        raise SystemExit(f"{args.data}: no trained index snapshot named {args.group}")
    live = np.flatnonzero(index._inv[: index._n] > 0)
    centroids = index._centroids.astype(np.float32)
    assign = index._assign[live].astype(np.int64)
    residual = np.empty(len(live), dtype=np.float32)
    for start in range(0, len(live), 50_000):
        part = slice(start, start + 50_000)
        residual[part] = np.linalg.norm(index._gather_float(live[part]) - centroids[assign[part]], axis=1)
    floor = embedder.cosine_for_score(embedder.default_threshold)
    print(f"{len(live):,} rows, {len(centroids):,} lists, default threshold at cosine {floor:.4f}")
    p5, p50, p95, top = np.percentile(residual, [5, 50, 95, 100])
    print(f"residual norm |x - c|: p5 {p5:.3f}, p50 {p50:.3f}, p95 {p95:.3f}, max {top:.3f}")
    jpegs = scale.photos(300)
    matching = [scale.jpeg_bytes(scale.Image.open(io.BytesIO(jpegs[i])), 480, 70) for i in range(0, 300, 20)]
    sets = {"JPEG queries (with matches)": matching, "no-match queries": scale.unrelated_jpegs(6)}
    print("\n| queries | rows the bound leaves, p50 | max |\n|---|---|---|")
    for name, images in sets.items():
        queries = embedder.embed_queries([embedder.open_image(b) for b in images])
        shares = []
        for views in queries:
            best = (views @ centroids.T).max(axis=0)  # each list's best q.c over the query's views
            shares.append(float(np.mean(residual >= floor - best[assign])))
        print(f"| {name} | {np.median(shares):.1%} | {max(shares):.1%} |")


if __name__ == "__main__":
    main()
