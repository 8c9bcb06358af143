"""The Milvus half of bench/scale.py (``python bench/scale.py --store milvus ...``): one group of N images
in a Milvus collection, searched in process and through ``tusou serve``.

1. Base vectors, queries and the catalogue's density as for the embedded store (bench/scale.py): 300 photo
   embeddings, the JPEG queries made from 30 of them, synthetic rows whose noise puts the median query's
   matches near the density's share of rows (``--density sparse``: ~0.2 %, the default here).
   ``--dim D`` projects every vector to D dimensions with a fixed random orthogonal matrix, a stand-in for
   a compact model (said so in the table).
2. Fill (skipped when the collection already holds the group at N): ``MilvusStore`` column inserts of
   10,000 rows, without the duplicate-id reads (``_add_unchecked``: the ids are new), printing rows/s;
   then one ``flush`` and the wait until every sealed segment is indexed (index build time).
3. The exact answer of every query: every row at or above the default threshold, by brute-force float32
   over all N rows (the rows are generated again from the same seed, never read back).
4. (a) ``MilvusStore.search`` in process, Session reads (the store's own time): p50/p99/max for limit 1,
   100, 10000, -1, and recall of each against the exact answer; limit=1 with Strong reads too (the
   consistency wait); for IVF indexes, recall and p50 of limit=-1 for several ``nprobe``.
5. ``tusou serve`` on the collection: (b) HTTP search by a stored image's id (one view, no model), (c) HTTP
   search with the JPEG (its four-view embedding included), same limits; ingest over HTTP; RSS of tusou
   and of the Milvus server, Milvus's disk, segments; load average beside every timing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scale
from PIL import Image
from scale import (
    GROUP,
    LIMITS,
    Projected,
    Searcher,
    Server,
    du_mb,
    http_timings,
    ingest_rates,
    pct,
    rss_mb,
    synthetic,
)

from tusou.config import Settings
from tusou.embed import create_embedder
from tusou.store.base import NewImage
from tusou.store.keys import KeyStore

FILL_BATCH = 10_000
NPROBES = (4, 8, 16)
# The segment layout counts as settled once unchanged (and fully indexed) this long: Milvus looks for
# segments to merge (compaction) about once a minute.
SETTLED_S = 150


def open_store(args: argparse.Namespace, embedder, consistency: str = "Session"):
    from tusou.store.milvus import MilvusStore

    return MilvusStore(
        args.milvus_uri,
        collection=args.milvus_collection,
        model_id=embedder.model_id,
        dim=embedder.dim,
        consistency=consistency,
        index=args.milvus_index,
        nprobe=args.milvus_nprobe,
        nlist=args.milvus_nlist,
        group_max_images=max(500_000, args.n + 10_000),
    )


def rows_of(base: np.ndarray, n: int, scale_: float, pool):
    """(first id number, vectors) of the synthetic rows, in the fill's order, from a fixed seed."""
    rng = np.random.default_rng(0)
    for start in range(0, n, FILL_BATCH):
        yield start, synthetic(base, min(FILL_BATCH, n - start), rng, scale_, pool)


def wait_indexed(store, timeout_s: float) -> dict:
    started = time.monotonic()
    info: dict = {}
    while time.monotonic() - started < timeout_s:
        info = store.client.describe_index(store.images, "vec")
        if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("indexed_rows", 0)) >= int(
            info.get("total_rows", 0)
        ):
            break
        time.sleep(2)
    # Then until the query node serves every row from sealed segments (not growing ones, scanned apart).
    total = int(info.get("total_rows", 0))
    while time.monotonic() - started < timeout_s:
        loaded = store.client.list_loaded_segments(store.images)
        if sum(int(seg.num_rows) for seg in loaded if str(seg.state) in ("3", "Sealed")) >= total:
            break
        time.sleep(2)
    # Then until compaction has merged what it will (small sealed segments into ones up to the segment
    # size) and the merged segments are indexed and loaded: the same loaded segments for SETTLED_S.
    layout, since = None, time.monotonic()
    while time.monotonic() - started < timeout_s:
        info = store.client.describe_index(store.images, "vec")
        now = sorted(int(seg.segment_id) for seg in store.client.list_loaded_segments(store.images))
        if now != layout or int(info.get("pending_index_rows", 0)) > 0:
            layout, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLED_S:
            break
        time.sleep(5)
    return info


def fill(args, data: Path, embedder, base: np.ndarray, scale_: float, pool) -> dict:
    keys = KeyStore(data / "keys.db")
    key = keys.list()[0] if keys.active_count() else keys.create("bench")
    keys.close()
    tenant = key.access_key
    report: dict = {}
    store = open_store(args, embedder)
    try:
        if GROUP in store.list_groups(tenant) and store.count(tenant, GROUP) >= args.n + len(base):
            return report
        if GROUP not in store.list_groups(tenant):
            store.create_group(
                tenant, GROUP, [NewImage(f"photo-{i}", "photo", "", None, v) for i, v in enumerate(base)]
            )
        have = store.count(tenant, GROUP) - len(base)
        started = time.monotonic()
        for start, vectors in rows_of(base, args.n, scale_, pool):
            if start + len(vectors) <= have:
                continue  # written by an earlier, interrupted run
            images = [NewImage(f"s{start + k}", "synthetic", "", None, v) for k, v in enumerate(vectors)]
            if have > 0 and start < have + 2 * FILL_BATCH:
                # Resuming: the interrupted run may have written part of these (and a fresh process's count
                # may trail its last writes), so the checked path, which refuses ids already there.
                errors = [e for e in store.add_images(tenant, GROUP, images) if e and e.code != 400]
            else:
                errors = store._add_unchecked(tenant, GROUP, images)
            if any(errors):
                raise RuntimeError(f"fill: {next(e for e in errors if e)}")
            done = start + len(vectors)
            if done % 100_000 < FILL_BATCH:
                elapsed = time.monotonic() - started
                print(
                    f"  filled {done} in {elapsed:.0f}s ({(done - max(have, 0)) / elapsed:.0f} rows/s, "
                    f"load {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
        report["fill_s"] = time.monotonic() - started
        report["fill_rows_s"] = (args.n - max(have, 0)) / max(report["fill_s"], 1e-9)
        report["fill_load"] = os.getloadavg()
        started = time.monotonic()
        store.client.flush(store.images)
        report["flush_s"] = time.monotonic() - started
        info = wait_indexed(store, args.milvus_index_timeout)
        report["index_s"] = time.monotonic() - started
        report["index_info"] = {k: info.get(k) for k in ("indexed_rows", "total_rows", "pending_index_rows")}
        report["index_load"] = os.getloadavg()
    finally:
        store.close()
    return report


def exact_answers(base, n, scale_, pool, queries: np.ndarray, floor: float) -> list[dict[str, float]]:
    """Per query (views stacked as (q, v, dim)): every id at or above ``floor``, with its best cosine."""
    flat = queries.reshape(-1, queries.shape[-1])
    views = queries.shape[1]
    out: list[dict[str, float]] = [{} for _ in range(len(queries))]

    def take(ids_of, rows: np.ndarray) -> None:
        sims = (rows @ flat.T).reshape(len(rows), len(queries), views).max(axis=2)
        for r, q in zip(*np.nonzero(sims >= floor), strict=True):
            out[q][ids_of(r)] = float(sims[r, q])

    take(lambda r: f"photo-{r}", base)
    for start, rows in rows_of(base, n, scale_, pool):
        take(lambda r, start=start: f"s{start + r}", rows)
    return out


def ranked(truth: dict[str, float]) -> list[str]:
    return sorted(truth, key=lambda i: -truth[i])


def recall_of(got: list[str], truth: dict[str, float], limit: int) -> tuple[int, int]:
    """(found, wanted): of the exact answer's first ``limit`` (all for -1), how many came back; a returned
    id whose cosine ties the exact answer's last counts (ties may order either way)."""
    order = ranked(truth)
    want = order if limit < 0 else order[:limit]
    if not want:
        return 0, 0
    last = truth[want[-1]]
    ok = sum(1 for i in got[: len(want)] if i in truth and truth[i] >= last - 1e-6)
    return min(ok, len(want)), len(want)


def inproc(args, data: Path, embedder, queries, truths, by_vectors, by_truths, floor) -> dict:
    keys = KeyStore(data / "keys.db")
    tenant = keys.list()[0].access_key
    keys.close()
    report: dict = {}
    store = open_store(args, embedder)
    try:
        for q in queries[:3]:  # warm-up
            store.search(tenant, [GROUP], q, 10, floor)
        for name, qs, ts in (("inproc", queries, truths), ("inproc_id", by_vectors, by_truths)):
            for limit in LIMITS:
                times, returned = [], []
                found = wanted = 0
                for q, truth in zip(qs, ts, strict=True):
                    t = time.perf_counter()
                    hits = store.search(tenant, [GROUP], q, limit, floor)
                    times.append((time.perf_counter() - t) * 1000)
                    returned.append(len(hits))
                    f, w = recall_of([h.id for h in hits], truth, limit)
                    found, wanted = found + f, wanted + w
                report[f"{name}_limit_{limit}"] = (
                    pct(times, 50),
                    pct(times, 99),
                    max(times),
                    float(np.median(returned)),
                )
                report[f"{name}_recall_{limit}"] = (found, wanted)
        report["inproc_load"] = os.getloadavg()
        if store.index_type.startswith("IVF"):
            for nprobe in NPROBES:
                store.nprobe = nprobe
                times = []
                found = wanted = found_id = wanted_id = 0
                for q, truth in zip(queries, truths, strict=True):
                    t = time.perf_counter()
                    hits = store.search(tenant, [GROUP], q, -1, floor)
                    times.append((time.perf_counter() - t) * 1000)
                    f, w = recall_of([h.id for h in hits], truth, -1)
                    found, wanted = found + f, wanted + w
                for q, truth in zip(by_vectors, by_truths, strict=True):
                    f, w = recall_of([h.id for h in store.search(tenant, [GROUP], q, -1, floor)], truth, -1)
                    found_id, wanted_id = found_id + f, wanted_id + w
                ones, ones_id = [], []
                top = [0, 0, 0, 0]  # limit=1 recall: found, wanted (4 views), found, wanted (1 view)
                for at, (qs, ts, spent) in enumerate(
                    ((queries, truths, ones), (by_vectors, by_truths, ones_id))
                ):
                    for q, truth in zip(qs, ts, strict=True):
                        t = time.perf_counter()
                        hits = store.search(tenant, [GROUP], q, 1, floor)
                        spent.append((time.perf_counter() - t) * 1000)
                        f, w = recall_of([h.id for h in hits], truth, 1)
                        top[2 * at], top[2 * at + 1] = top[2 * at] + f, top[2 * at + 1] + w
                report[f"nprobe_{nprobe}"] = (pct(times, 50), found, wanted, pct(ones, 50))
                report[f"nprobe_{nprobe}_id_recall"] = (found_id, wanted_id)
                report[f"nprobe_{nprobe}_limit_1"] = (pct(ones_id, 50), *top, os.getloadavg()[0])
    finally:
        store.close()
    strong = open_store(args, embedder, "Strong")
    try:
        times = []
        for q in queries:
            t = time.perf_counter()
            strong.search(tenant, [GROUP], q, 1, floor)
            times.append((time.perf_counter() - t) * 1000)
        report["inproc_strong_limit_1"] = (pct(times, 50), pct(times, 99), max(times))
    finally:
        strong.close()
    return report


def serve(args, data: Path, query_jpegs, ingest_jpegs, by_ids: list[str]) -> dict:
    searcher = Searcher(data)
    report: dict = {}
    env = {
        "TUSOU_STORE": "milvus",
        "TUSOU_MILVUS_URI": args.milvus_uri,
        "TUSOU_MILVUS_COLLECTION": args.milvus_collection,
        "TUSOU_MILVUS_CONSISTENCY": args.milvus_consistency,
        "TUSOU_MILVUS_INDEX": args.milvus_index,
        "TUSOU_MILVUS_NPROBE": str(args.milvus_nprobe),
        "TUSOU_MILVUS_NLIST": str(args.milvus_nlist),
        "TUSOU_GROUP_MAX_IMAGES": str(max(500_000, args.n + 10_000)),
    }
    server = Server(data, 18000 + os.getpid() % 1000, env, projected_dim=args.dim or None)

    try:
        report["start_to_first_search_s"] = searcher.first_answer(server, query_jpegs[0])
        report.update(http_timings(searcher, by_ids, query_jpegs, server.proc.pid))
        report.update(ingest_rates(searcher, ingest_jpegs))
        report["server_rss_mb"], report["server_peak_rss_mb"] = rss_mb(server.proc.pid)
    finally:
        server.stop()
    return report


def segments(args) -> tuple[int, list[int], list[str]]:
    """Loaded segments, their rows, and the collection's indexes (field: type)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=args.milvus_uri)
    try:
        loaded = client.list_loaded_segments(args.milvus_collection)
        indexes = [
            f"{name}: {client.describe_index(args.milvus_collection, name).get('index_type')}"
            for name in client.list_indexes(args.milvus_collection)
        ]
        return len(loaded), sorted(int(s.num_rows) for s in loaded), indexes
    finally:
        client.close()


def run_milvus(args: argparse.Namespace) -> None:
    density = args.density[0]
    data = args.data or Path(f"/tmp/tusou-scale-{args.n}-milvus")
    data.mkdir(parents=True, exist_ok=True)
    embedder = create_embedder(Settings(data=data))
    if args.dim and args.dim != embedder.dim:
        embedder = Projected(embedder, args.dim)
    else:
        args.dim = 0
    jpegs = scale.photos(300 + 64)
    base_jpegs, ingest_jpegs = jpegs[:300], jpegs[300:] + jpegs[:64]
    step = max(1, 300 // args.queries)
    query_jpegs = [
        scale.jpeg_bytes(Image.open(io.BytesIO(b)), side=480, quality=70) for b in base_jpegs[::step]
    ][: args.queries]
    by_ids = [f"photo-{i}" for i in range(0, 300, step)][: args.queries]
    queries = embedder.embed_queries([embedder.open_image(b) for b in query_jpegs])
    base = embedder.embed_images([embedder.open_image(b) for b in base_jpegs])
    by_vectors = base[[int(i.split("-")[1]) for i in by_ids]][:, None, :]
    floor = embedder.cosine_for_score(embedder.default_threshold)
    scale_, pool = scale.calibrate_noise(base, queries, floor, density)
    name = f"bench_scale_{args.n}_{embedder.dim}d_{density}_{args.milvus_index.lower()}"
    args.milvus_collection = args.milvus_collection or name
    report: dict = {
        "n": args.n,
        "store": "milvus",
        "density": density,
        "dim": embedder.dim,
        "model_id": embedder.model_id,
        "projected": bool(args.dim),
        "milvus_index": args.milvus_index,
        "milvus_nprobe": args.milvus_nprobe,
        "milvus_nlist": args.milvus_nlist,
        "milvus_consistency": args.milvus_consistency,
        "floor": floor,
        "noise_scale": scale_,
    }
    with contextlib.ExitStack() as stack:
        milvus_pid = None
        if args.milvus_uri is None:
            from milvus_server import milvus_server

            base_dir = Path(tempfile.mkdtemp(prefix="tusou-scale-milvus-"))
            server = stack.enter_context(
                milvus_server(base_dir, args.milvus_tick_ms, args.milvus_segment_mb)
            )
            report["milvus_segment_mb"] = args.milvus_segment_mb
            args.milvus_uri, milvus_pid = server.uri, server.pid
            report["milvus_tick_ms"], report["milvus_start_s"] = args.milvus_tick_ms, server.start_s
        report["milvus_collection"] = args.milvus_collection
        report.update(fill(args, data, embedder, base, scale_, pool))
        if milvus_pid:
            report["milvus_rss_after_fill_mb"], report["milvus_peak_rss_mb"] = rss_mb(milvus_pid)
        started = time.monotonic()
        truths = exact_answers(base, args.n, scale_, pool, queries, floor)
        by_truths = exact_answers(base, args.n, scale_, pool, by_vectors, floor)
        report["exact_scan_s"] = time.monotonic() - started
        report["matches_median"] = float(np.median([len(t) for t in truths]))
        report["matches_min"] = min(len(t) for t in truths)
        report["segments"] = segments(args)
        report.update(inproc(args, data, embedder, queries, truths, by_vectors, by_truths, floor))
        report.update(serve(args, data, query_jpegs, ingest_jpegs, by_ids))
        if milvus_pid:
            report["milvus_rss_mb"], report["milvus_peak_rss_mb"] = rss_mb(milvus_pid)
            report["milvus_disk_mb"] = du_mb(server.base)
    print(json.dumps(report, indent=1, default=str), file=sys.stderr)
    (data / f"scale-report-{args.milvus_collection}.json").write_text(
        json.dumps(report, indent=1, default=str)
    )
    print_table(report)


def print_table(r: dict) -> None:
    proj = " (randomly projected to this width by --dim: not the shipped model)" if r["projected"] else ""
    index = r["milvus_index"] + (
        f", {r.get('milvus_nlist', 128)} lists per segment, nprobe {r['milvus_nprobe']}"
        if r["milvus_index"].startswith("IVF")
        else ""
    )
    if "milvus_segment_mb" in r:
        index += f"; segments up to {r['milvus_segment_mb']} MB"
    print(
        f"\n## scale: {r['n']:,} images in one group on Milvus ({index}; {r['milvus_consistency']} reads), "
        f"{r['density']} catalogue (median {r['matches_median']:.0f}, min {r['matches_min']} matches per "
        f"query above the default threshold), dim {r['dim']}{proj}, {os.cpu_count()} cores\n"
    )
    print("| measure | p50 / p99 / max | hits (median) | recall vs exact scan |\n|---|---|---|---|")
    rows = (
        ("inproc", "(a) MilvusStore.search in process, Session (4 query views)"),
        ("inproc_id", "(a') MilvusStore.search in process, Session, a stored photo's vector (1 view)"),
        ("http_id", "(b) HTTP search by stored image id (1 view, no model)"),
        ("http_jpeg", "(c) HTTP search with a JPEG (4-view query embedding included)"),
    )
    for prefix, label in rows:
        for limit in LIMITS:
            p50, p99, worst, returned = r[f"{prefix}_limit_{limit}"]
            rec = r.get(f"{prefix}_recall_{limit}")
            cell = f"{rec[0] / max(rec[1], 1):.4f} ({rec[0]}/{rec[1]})" if rec else ""
            print(
                f"| {label}, limit={limit} | {p50:.1f} / {p99:.1f} / {worst:.1f} ms | {returned:.0f} | "
                f"{cell} |"
            )
    print("\n| measure | value |\n|---|---|")
    p50, p99, worst = r["inproc_strong_limit_1"]
    print(
        f"| MilvusStore.search in process, Strong, limit=1 p50 / p99 / max | "
        f"{p50:.1f} / {p99:.1f} / {worst:.1f} ms |"
    )
    for nprobe in NPROBES:
        if f"nprobe_{nprobe}" in r:
            ms, found, wanted, one = (*r[f"nprobe_{nprobe}"], None)[:4]
            fid, wid = r.get(f"nprobe_{nprobe}_id_recall", (0, 0))
            print(
                f"| nprobe {nprobe} (every-match bands: {nprobe * 8}): limit=-1 recall 4 views / 1 view, "
                f"p50 4 views; limit=1 p50 (4 views) | {found / max(wanted, 1):.4f} / "
                f"{fid / max(wid, 1):.4f}, {ms:.0f} ms; " + (f"{one:.1f} ms |" if one is not None else "- |")
            )
            if f"nprobe_{nprobe}_limit_1" in r:
                one_id, f4, w4, f1, w1, load = r[f"nprobe_{nprobe}_limit_1"]
                print(
                    f"| nprobe {nprobe}: limit=1 recall 4 views / 1 view; p50 1 view (load) | "
                    f"{f4 / max(w4, 1):.4f} / {f1 / max(w1, 1):.4f}; {one_id:.1f} ms ({load:.1f}) |"
                )
    if "fill_s" in r:
        print(
            f"| fill (MilvusStore column inserts of {FILL_BATCH:,}, no duplicate-id reads) | "
            f"{r['fill_s']:.0f} s ({r['fill_rows_s']:.0f} rows/s, load {r['fill_load'][0]:.1f}) |"
        )
        print(
            f"| flush + index build of the sealed segments | {r['index_s']:.0f} s "
            f"({r['n'] / max(r['index_s'], 1e-9):.0f} rows/s, load {r['index_load'][0]:.1f}) |"
        )
    count, rows_, *indexes = r["segments"]
    print(
        f"| sealed segments loaded (rows) | {count} ({min(rows_, default=0):,} - {max(rows_, default=0):,}) |"
    )
    if indexes:
        print(f"| indexes | {', '.join(indexes[0])} |")
    for batch in (1, 32):
        print(f"| ingest over HTTP, batch {batch} | {r[f'ingest_batch_{batch}_img_s']:.1f} img/s |")
    print(f"| tusou process start to first answered search | {r['start_to_first_search_s']:.2f} s |")
    print(f"| tusou RSS now / peak | {r['server_rss_mb']:.0f} / {r['server_peak_rss_mb']:.0f} MB |")
    if "milvus_rss_mb" in r:
        print(
            f"| Milvus RSS after fill / now / peak | {r.get('milvus_rss_after_fill_mb', 0):.0f} / "
            f"{r['milvus_rss_mb']:.0f} / {r['milvus_peak_rss_mb']:.0f} MB |"
        )
        print(
            f"| Milvus disk / start to healthy | {r['milvus_disk_mb']:.0f} MB / {r['milvus_start_s']:.1f} s |"
        )
    print(
        f"| load average (1 min): in-process / HTTP by id / HTTP JPEG | {r['inproc_load'][0]:.1f} / "
        f"{r['http_id_load'][0]:.1f} / {r['http_jpeg_load'][0]:.1f} |"
    )


if __name__ == "__main__":
    sys.exit(
        "bench/scale_milvus.py is the Milvus half of bench/scale.py: "
        "run python bench/scale.py --store milvus (its --help lists the options)"
    )
