"""What an idle pause between searches costs: the same search, back to back and after a pause.

    python bench/pauses.py [--n 500000] [--density dense] [--limit 10000] [--pauses 0,0.01,0.1]
                           [--rounds 6] [--data DIR]

Reads a folder that ``bench/scale.py`` filled (default /tmp/tusou-scale-<n>-<density>; run that first).
In this process, through the service as the server calls it: a search by a stored image's id (15 of the
base photos, ``photo-<i>``) at ``--limit``, then its Qiniu body (``qiniu.hits_body``), timed together.
Each round runs every pause once, in turn (so drift in the machine's load spreads over all of them);
before each search the process sleeps for the pause. A control with no tusou code in it, summing an
8 MB float32 array, runs after each search with the same pause before it.

Why: a server answers requests with idle moments between them (the client reads and parses the answer,
the next request has not come), while an in-process loop searches back to back. On this kind of machine
(a 2-core VM) memory-bound work after an idle moment runs slower: caches the other tenants of the host
used meanwhile. This bench says how much of the gap between ``bench/scale.py``'s in-process and HTTP
figures that is (docs/index.md, "What bounds these figures").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tusou.api import qiniu  # noqa: E402
from tusou.config import Settings  # noqa: E402
from tusou.domain import ImageRef, SearchQuery  # noqa: E402
from tusou.service import build_service  # noqa: E402
from tusou.store.keys import KeyStore  # noqa: E402

GROUP = "big"  # bench/scale.py's group
IDS = [f"photo-{i}" for i in range(0, 300, 20)]


def timed(fn: object, pause: float) -> float:
    """ms of ``fn()`` after sleeping ``pause`` seconds."""
    if pause:
        time.sleep(pause)
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--density", choices=("sparse", "dense"), default="dense")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--pauses", default="0,0.01,0.1", help="seconds, comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    data = args.data or Path(f"/tmp/tusou-scale-{args.n}-{args.density}")
    if not (data / "keys.db").exists():
        sys.exit(
            f"{data}: no bench folder; fill it first: "
            f"python bench/scale.py --n {args.n} --density {args.density}"
        )
    pauses = [float(p) for p in args.pauses.split(",")]
    keys = KeyStore(data / "keys.db")
    tenant = keys.list()[0].access_key
    keys.close()
    service = build_service(Settings(data=data))
    control = np.random.default_rng(0).random(2_000_000, dtype=np.float32)

    def search(image_id: str) -> None:
        query = SearchQuery(groups=[GROUP], limit=args.limit, threshold=None, by_id=ImageRef(GROUP, image_id))
        qiniu.hits_body(service.search(tenant, query))

    try:
        for image_id in IDS:  # warm-up: the first large answers after an open read cold rows
            search(image_id)
        hits = len(
            service.search(tenant, SearchQuery([GROUP], args.limit, None, by_id=ImageRef(GROUP, IDS[0]))).hits
        )
        searches: dict[float, list[float]] = {p: [] for p in pauses}
        sums: dict[float, list[float]] = {p: [] for p in pauses}
        load_before = os.getloadavg()
        for r in range(args.rounds):
            for pause in pauses if r % 2 == 0 else pauses[::-1]:
                for image_id in IDS:
                    searches[pause].append(timed(lambda i=image_id: search(i), pause))
                    sums[pause].append(timed(control.sum, pause))
        load_after = os.getloadavg()
    finally:
        service.close()
    print(
        f"#### pauses: {data.name}, search by stored id, limit={args.limit} ({hits} hits), "
        f"{args.rounds} rounds x {len(IDS)} ids, load {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print()
    print("| pause before each | search + body p50 / p90 ms | control: 8 MB sum p50 / p90 ms |")
    print("|---|---|---|")
    for pause in pauses:
        s, c = searches[pause], sums[pause]
        print(
            f"| {pause * 1000:g} ms | {np.percentile(s, 50):.1f} / {np.percentile(s, 90):.1f} "
            f"| {np.percentile(c, 50):.3f} / {np.percentile(c, 90):.3f} |"
        )


if __name__ == "__main__":
    main()
