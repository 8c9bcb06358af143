"""Clusters of near-duplicates from scored pairs (union-find), shared by the server and the client.

``tusou duplicates GROUP`` and ``POST /v1/image/group/<group>/duplicates`` find pairs by searching each
image's stored vector against its group at the near-duplicate threshold (at most a fixed number of
neighbours per image, so the work is bounded: one index search per image); the pairs are then joined into
connected components here. A page of the endpoint clusters the pairs it found; the client joins the
pairs of every page again, so clusters that span pages come out whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    a: str  # a < b
    b: str
    score: float


@dataclass(frozen=True)
class Cluster:
    """Images that are near-duplicates of one another, directly or through others; ``pairs`` best first."""

    images: list[str]
    pairs: list[Pair]


def pair(a: str, b: str, score: float) -> Pair:
    return Pair(a, b, score) if a < b else Pair(b, a, score)


def clusters(pairs: Iterable[Pair]) -> list[Cluster]:
    """Connected components of the pairs (the best score kept for a pair seen twice): the largest first,
    then by their first id; ids sorted within a cluster."""
    best: dict[tuple[str, str], float] = {}
    for p in pairs:
        key = (p.a, p.b) if p.a < p.b else (p.b, p.a)
        best[key] = max(best.get(key, p.score), p.score)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in best:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for x in parent:
        members.setdefault(find(x), []).append(x)
    edges: dict[str, list[Pair]] = {}
    for (a, b), score in best.items():
        edges.setdefault(find(a), []).append(Pair(a, b, score))
    out = [
        Cluster(sorted(ids), sorted(edges[root], key=lambda p: (-p.score, p.a, p.b)))
        for root, ids in members.items()
    ]
    out.sort(key=lambda c: (-len(c.images), c.images[0]))
    return out
