"""Scale benchmark: one group filled to N images, searched and fed through the real HTTP API.

    python bench/scale.py [--n 500000] [--quick] [--dim 256] [--density sparse|dense|both] [--data DIR]
                          [--queries 30] [--store sqlite|milvus]

The embedded store (default), once per density (``--density both``, the default, prints two tables):

1. Base vectors: real embeddings (default model) of 300 photos (the evaluation gallery under
   ~/.cache/tusou-eval/out when present, else generated scenes from tests/imagegen.py). ``--dim D``
   projects every vector (stored rows, queries, the server's model) to D dimensions with a fixed random
   orthogonal matrix: a stand-in for a compact model, said so in the table.
2. Fill (skipped when the folder already holds the group at N; one folder per density,
   /tmp/tusou-scale-<n>[-<dim>d]-<density>): the base images themselves plus synthetic rows, each a
   perturbation of a mix of two base embeddings, inserted through ``SQLiteStore.add_images`` in batches of
   10,000 (no HTTP, no model). The noise is calibrated so that the median query has ~0.2 % (sparse) or
   ~3 % (dense: many rows around the queried items, like product shots on white) of the rows above the
   default threshold, whatever the base photos are. Reports fill time and rows/s and the close snapshot.
3. (a) In process: ``SQLiteStore.search`` with the real JPEG queries' four views at the default threshold,
   p50/p99/max for limit 1, 100, 10000, -1; the served answers (keys, order) against brute-force float32
   over every row (``--exact-queries`` queries, each limit); and queries with no match (noise and pattern
   images, kept where the exact scan finds nothing), limit 1 and -1: what a "no match" answer costs.
4. ``python -m tusou serve`` on the folder: time from process start to the first answered search;
   (b) HTTP search by a stored image's id (the photo the JPEG query was made from: one view, no model)
   and (c) HTTP search with the JPEG (its four-view embedding included), same limits; ingest img/s over
   HTTP with real JPEGs in batches of 1 and 32; the server's RSS (now and peak); disk use; load average.

``--store milvus``: the same questions with the group in Milvus (bench/scale_milvus.py: one density, the
recall of every limit against an exact scan, in-process Session and Strong timings, nprobe sweep, index
build time, the Milvus server's RSS and disk). A Milvus 2.3 standalone server is started on free loopback
ports in a temporary folder (bench/milvus_server.py, ``proxy.timeTickInterval`` from ``--milvus-tick-ms``)
and stopped at the end, unless ``--milvus-uri`` names one; ``--milvus-index`` (default IVF_FLAT) and
``--milvus-nprobe`` pick the collection's index and its search setting.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from qiniu import QiniuMacAuth
from qiniu.auth import QiniuMacRequestsAuth

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import imagegen  # noqa: E402
from tusou.config import Settings  # noqa: E402
from tusou.embed import create_embedder  # noqa: E402
from tusou.store.base import NewImage  # noqa: E402
from tusou.store.keys import KeyStore  # noqa: E402
from tusou.store.sqlite import SQLiteStore  # noqa: E402

PHOTOS = Path.home() / ".cache" / "tusou-eval" / "out"
GROUP = "big"


def jpeg_bytes(img: Image.Image, side: int = 640, quality: int = 88) -> bytes:
    img = img.convert("RGB")
    img.thumbnail((side, side))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def photos(count: int) -> list[bytes]:
    """JPEGs of real photos when the evaluation set is there, else of generated scenes."""
    files = sorted(PHOTOS.rglob("*.jpg"))[:count] if PHOTOS.is_dir() else []
    out = [jpeg_bytes(Image.open(f)) for f in files]
    seed = 0
    while len(out) < count:
        out.append(jpeg_bytes(imagegen.scene(seed, (640, 480))))
        seed += 1
    return out


def synthetic(
    base: np.ndarray,
    n: int,
    rng: np.random.Generator,
    noise_scale: float = 1.0,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """Rows near the base vectors: base[i] + mix * base[j] + noise; ``i`` drawn from ``pool`` when given
    (a dense catalogue: many rows around a few items), the noise's length scaled by ``noise_scale``."""
    i = rng.integers(0, len(base), n) if pool is None else pool[rng.integers(0, len(pool), n)]
    j = rng.integers(0, len(base), n)
    mix = rng.uniform(0.0, 0.7 if pool is None else 0.3, (n, 1)).astype(np.float32)
    noise = rng.standard_normal((n, base.shape[1]), dtype=np.float32)
    noise *= (rng.uniform(0.3, 0.8, (n, 1)) * noise_scale).astype(np.float32) / np.linalg.norm(
        noise, axis=1, keepdims=True
    )
    v = base[i] + mix * base[j] + noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def unrelated_jpegs(count: int) -> list[bytes]:
    """JPEGs unlike any photo or scene: pixel noise, smooth colour noise and stripes (seeded)."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        if i % 3 == 0:
            pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        elif i % 3 == 1:
            small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            pixels = np.asarray(small.resize((640, 480), Image.Resampling.BICUBIC))
        else:
            width = int(rng.integers(8, 60))
            band = (np.arange(640) // width) % 2
            colours = rng.integers(0, 256, (2, 3), dtype=np.uint8)
            pixels = np.broadcast_to(colours[band][None], (480, 640, 3)).copy()
        out.append(jpeg_bytes(Image.fromarray(pixels)))
    return out


def data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return int(fields["VmRSS"]) / 1024, int(fields["VmHWM"]) / 1024


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# --- the embedded store (sqlite): both densities, in-process / by-id / JPEG rows -----------------------

DENSITY_TARGET = {"sparse": 0.002, "dense": 0.03}  # median fraction of rows above the default threshold


class Projected:
    """The embedder with its vectors projected to ``dim`` by a fixed random orthogonal matrix (seed 0) and
    renormalised: a stand-in for a compact model until the shipped projection is there (``--dim``)."""

    def __init__(self, inner, dim: int) -> None:
        self.inner = inner
        rng = np.random.default_rng(0)
        q, _ = np.linalg.qr(rng.standard_normal((inner.dim, dim)))
        self.matrix = np.ascontiguousarray(q, dtype=np.float32)
        self.dim = dim
        self.model_id = f"{inner.model_id}+randproj{dim}"

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def project(self, v: np.ndarray) -> np.ndarray:
        out = v @ self.matrix
        return (out / np.linalg.norm(out, axis=-1, keepdims=True)).astype(np.float32)

    def embed_images(self, images):
        return self.project(self.inner.embed_images(images))

    def embed_images_tagged(self, images):
        vecs, probs = self.inner.embed_images_tagged(images)
        return self.project(vecs), probs

    def embed_queries(self, images):
        return self.project(self.inner.embed_queries(images))


def serve_projected(dim: int) -> None:
    """``tusou serve`` whose embedder is :class:`Projected` (the server half of ``--dim``)."""
    import tusou.embed

    original = tusou.embed.create_embedder
    tusou.embed.create_embedder = lambda settings: Projected(original(settings), dim)  # type: ignore[assignment]
    from tusou.cli import main as cli_main

    sys.argv = ["tusou", "serve"]
    cli_main()


def calibrate_noise(
    base: np.ndarray, queries: np.ndarray, floor: float, density: str
) -> tuple[float, np.ndarray | None]:
    """The noise scale (and pool) whose rows put the median query's matches near the density's target."""
    pool = None if density == "sparse" else np.arange(0, len(base), max(1, len(base) // len(queries)))
    target = DENSITY_TARGET[density]
    flat = queries.reshape(-1, queries.shape[-1])
    lo, hi = np.log(0.05), np.log(20.0)
    for _ in range(14):
        mid = (lo + hi) / 2
        rows = synthetic(base, 20_000, np.random.default_rng(7), float(np.exp(mid)), pool)
        sims = (rows @ flat.T).reshape(len(rows), len(queries), -1).max(axis=2)
        frac = float(np.median((sims >= floor).mean(axis=0)))
        if frac > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp((lo + hi) / 2)), pool


def sqlite_fill(
    args, data: Path, embedder, base_jpegs: list[bytes], queries: np.ndarray, density: str
) -> dict:
    keys = KeyStore(data / "keys.db")
    key = keys.list()[0] if keys.active_count() else keys.create("bench")
    keys.close()
    tenant = key.access_key
    report: dict = {}
    started = time.monotonic()
    store = SQLiteStore(
        data / "tusou.db", model_id=embedder.model_id, dim=embedder.dim, group_max_images=max(500_000, args.n)
    )
    report["open_s"] = time.monotonic() - started
    if GROUP in store.list_groups(tenant) and store.count(tenant, GROUP) >= args.n:
        store.close()
        return report
    base = embedder.embed_images([embedder.open_image(b) for b in base_jpegs])
    np.save(data / "bench-base.npy", base)
    floor = embedder.cosine_for_score(embedder.default_threshold)
    scale, pool = calibrate_noise(base, queries, floor, density)
    report["noise_scale"] = scale
    if GROUP not in store.list_groups(tenant):
        store.create_group(
            tenant, GROUP, [NewImage(f"photo-{i}", "photo", "", None, v) for i, v in enumerate(base)]
        )
    have = store.count(tenant, GROUP)
    # A fill resumed after an interruption continues with another seed (no repeat of the rows it has).
    rng = np.random.default_rng(0 if have <= len(base) else have)
    started, first = time.monotonic(), have
    while have < args.n:
        step = min(10_000, args.n - have)
        vectors = synthetic(base, step, rng, scale, pool)
        errors = store.add_images(
            tenant, GROUP, [NewImage(f"s{have + k}", "synthetic", "", None, v) for k, v in enumerate(vectors)]
        )
        if any(errors):
            raise RuntimeError(f"fill: {next(e for e in errors if e)}")
        have += step
        if have % 500_000 < step:
            elapsed = time.monotonic() - started
            print(
                f"  filled {have} in {elapsed:.0f}s ({have / elapsed:.0f} rows/s)",
                file=sys.stderr,
                flush=True,
            )
    report["fill_s"] = time.monotonic() - started
    report["fill_rows_s"] = (args.n - first) / max(report["fill_s"], 1e-9)
    report["fill_rows"] = args.n - first
    report["fill_load"] = os.getloadavg()
    started = time.monotonic()
    store.close()
    report["close_snapshot_s"] = time.monotonic() - started
    return report


def brute_force(store, gid: int, queries: np.ndarray, floor: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact float32 answers (every row above ``floor``, best first, ties by seq) for each query: every
    vector of the group read from SQLite in one sequential pass."""
    views = np.ascontiguousarray(queries.reshape(-1, queries.shape[-1]), dtype=np.float32)
    cursor = store._reader().execute(
        "SELECT v.seq, v.vector FROM images AS i JOIN vectors AS v ON v.seq = i.seq WHERE i.gid = ? "
        "ORDER BY i.seq",
        (gid,),
    )
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    while rows := cursor.fetchmany(50_000):
        keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        # einsum, as the store's re-rank: every product summed in the same order (bit-identical cosines)
        sims = np.einsum("ij,kj->ik", vecs, views).reshape(len(rows), len(queries), -1).max(axis=2)
        keep = (sims >= floor).any(axis=1)
        parts.append((keys[keep], sims[keep]))
    keys = np.concatenate([p[0] for p in parts])
    sims = np.concatenate([p[1] for p in parts])
    out = []
    for qi in range(len(queries)):
        keep = np.flatnonzero(sims[:, qi] >= floor)
        order = keep[np.lexsort((keys[keep], -sims[keep, qi]))]
        out.append((keys[order], sims[order, qi].astype(np.float32)))
    return out


def inproc_bench(args, data: Path, embedder, queries: np.ndarray) -> dict:
    """(a) the store's own search, in process: SQLiteStore.search with the query's views, default threshold;
    and the served answers against an exact float32 scan."""
    keys = KeyStore(data / "keys.db")
    tenant = keys.list()[0].access_key
    keys.close()
    report: dict = {}
    # The no-match queries' embeddings first: searches timed right after the model ran were slower (500k
    # sparse, no match limit=1: 17.0 against 6.7 ms; ONNX Runtime does not spin: the cause is not traced).
    strangers = embedder.embed_queries([embedder.open_image(b) for b in unrelated_jpegs(6)])
    started = time.monotonic()
    store = SQLiteStore(
        data / "tusou.db", model_id=embedder.model_id, dim=embedder.dim, group_max_images=max(500_000, args.n)
    )
    report["reopen_in_process_s"] = time.monotonic() - started
    index = store._indexes[store._gids[(tenant, GROUP)]]
    floor = embedder.cosine_for_score(embedder.default_threshold)
    report["floor"] = floor
    for q in queries[:2]:  # warm-up, untimed
        store.search(tenant, [GROUP], q, 10, floor)
    for limit in LIMITS:
        times, returned = [], []
        for q in queries:
            t = time.perf_counter()
            hits = store.search(tenant, [GROUP], q, limit, floor)
            times.append((time.perf_counter() - t) * 1000)
            returned.append(len(hits))
        report[f"inproc_limit_{limit}"] = (
            pct(times, 50),
            pct(times, 99),
            max(times),
            float(np.median(returned)),
        )
    # Queries with no match: images unlike the catalogue's (the exact scan below keeps those with no row
    # above the threshold). The lists find nothing for them and the search falls back to the exact scan:
    # what a "no match" answer costs.
    stranger_times: dict[int, list[float]] = {1: [], -1: []}
    stranger_hits: dict[int, list[int]] = {1: [], -1: []}
    for q in strangers:
        for limit, times in stranger_times.items():
            t = time.perf_counter()
            served = store.search(tenant, [GROUP], q, limit, floor)
            times.append((time.perf_counter() - t) * 1000)
            stranger_hits[limit].append(len(served))
    # Served answers (keys, order, float cosines) against brute-force float32 over every row.
    n_exact = min(len(queries), args.exact_queries)
    truth = brute_force(
        store, store._gids[(tenant, GROUP)], np.concatenate([queries[:n_exact], strangers]), floor
    )
    truth, stranger_truth = truth[:n_exact], truth[n_exact:]
    lone = [i for i, (keys_found, _) in enumerate(stranger_truth) if len(keys_found) == 0]
    report["nomatch_queries"] = (len(lone), len(strangers))
    for limit, times in stranger_times.items():
        kept = [times[i] for i in lone] or [float("nan")]
        hits = [stranger_hits[limit][i] for i in lone] or [0]
        served = float(np.median(hits))
        report[f"inproc_nomatch_limit_{limit}"] = (pct(kept, 50), pct(kept, 99), max(kept), served)
    # Every noise/pattern query's served answer (those with a match too) against the exact scan.
    strangers_same = 0
    for q, (t_keys, _) in zip(strangers, stranger_truth, strict=True):
        for limit in (1, -1):
            got_keys, _ = index.search(q, limit, floor)
            strangers_same += int(np.array_equal(got_keys, t_keys if limit < 0 else t_keys[:limit]))
    report["nomatch_served_identical"] = (strangers_same, 2 * len(strangers))
    same = ties = total = 0
    worst_cos = 0.0
    for qi in range(n_exact):
        t_keys, t_cos = truth[qi]
        for limit in LIMITS:
            got_keys, got_cos = index.search(queries[qi], limit, floor)
            want_keys = t_keys if limit < 0 else t_keys[:limit]
            want_cos = t_cos if limit < 0 else t_cos[:limit]
            total += 1
            if len(got_keys) != len(want_keys):
                continue
            same += int(bool(np.all(got_keys == want_keys)))
            if len(got_cos):
                worst_cos = max(worst_cos, float(np.abs(got_cos - want_cos).max()))
            # Equal up to float32 rounding: where the keys differ, both lists hold cosines equal to 1e-6
            # (two rows whose products round differently in a different summation order), and every key
            # given has its exact cosine.
            exact = dict(zip(t_keys.tolist(), t_cos.tolist(), strict=True))
            ties += int(
                bool(np.all(np.abs(got_cos - want_cos) <= 1e-6))
                and all(
                    abs(exact.get(k, -9.0) - c) <= 1e-6
                    for k, c in zip(got_keys.tolist(), got_cos.tolist(), strict=True)
                )
            )
    report["served_identical"] = (same, total)
    report["served_identical_up_to_ties"] = ties
    report["served_cos_err"] = worst_cos
    report["matches_median"] = float(np.median([len(t[0]) for t in truth]))
    report["matches_min"] = int(min(len(t[0]) for t in truth))
    for ix in store._indexes.values():  # read-only use: nothing to snapshot on close
        ix.dirty = 0
    store.close()
    return report


LIMITS = (1, 100, 10_000, -1)


class Searcher:
    """Signed Qiniu search requests to a bench server, with the data folder's first key."""

    def __init__(self, data: Path) -> None:
        keys = KeyStore(data / "keys.db")
        key = keys.list()[0]
        keys.close()
        self.session = requests.Session()
        self.auth = QiniuMacRequestsAuth(QiniuMacAuth(key.access_key, key.secret_key))
        self.url = ""

    def post(self, body: dict) -> requests.Response:
        return self.session.post(self.url + "/v1/image/groups/search", json=body, auth=self.auth, timeout=300)

    def first_answer(self, server: Server, jpeg: bytes) -> float:
        """Seconds from the server's start to its first answered search (polled)."""
        self.url = server.url
        while True:
            try:
                if self.post(self.by_jpeg(jpeg, 1)).status_code == 200:
                    return time.monotonic() - server.started
            except requests.ConnectionError:
                time.sleep(0.05)
            if server.proc.poll() is not None:
                raise RuntimeError("server exited; see serve.log")

    @staticmethod
    def by_jpeg(jpeg: bytes, limit: int) -> dict:
        return {"data": {"uri": data_uri(jpeg)}, "params": {"groups": [GROUP], "limit": limit}}

    @staticmethod
    def by_id(image_id: str, limit: int) -> dict:
        return {"data": {"id": image_id, "group": GROUP}, "params": {"groups": [GROUP], "limit": limit}}


def server_costs(pid: int) -> tuple[int, float]:
    """The server process's minor page faults so far and its kernel CPU seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def http_timings(searcher: Searcher, by_ids: list[str], query_jpegs: list[bytes], pid: int) -> dict:
    """p50/p99/max ms and median hits per limit, for searches by stored id and with a JPEG; and the
    server's page faults and kernel time per search by id (fresh pages for a search's arrays show there)."""
    report: dict = {}
    by_id = [partial(searcher.by_id, i) for i in by_ids]
    by_jpeg = [partial(searcher.by_jpeg, j) for j in query_jpegs]
    for kind, bodies in (("id", by_id), ("jpeg", by_jpeg)):
        searcher.post(bodies[0](10))  # warm-up
        for limit in LIMITS:
            times, returned = [], []
            faults, kernel = server_costs(pid)
            for make in bodies:
                body = make(limit)
                t = time.perf_counter()
                resp = searcher.post(body)
                times.append((time.perf_counter() - t) * 1000)
                assert resp.status_code == 200, resp.text
                returned.append(len(resp.json()["result"]))
            now_faults, now_kernel = server_costs(pid)
            report[f"http_{kind}_costs_{limit}"] = (
                (now_faults - faults) / len(bodies),
                (now_kernel - kernel) * 1000 / len(bodies),
            )
            report[f"http_{kind}_limit_{limit}"] = (
                pct(times, 50),
                pct(times, 99),
                max(times),
                float(np.median(returned)),
            )
        report[f"http_{kind}_load"] = os.getloadavg()
    return report


def ingest_rates(searcher: Searcher, jpegs: list[bytes]) -> dict:
    """img/s of HTTP adds in batches of 1 and 32, into a scratch group removed afterwards."""
    report: dict = {}
    url, session, auth = searcher.url, searcher.session, searcher.auth
    session.post(url + "/v1/image/group/ingest/new", json={"data": []}, auth=auth, timeout=60)
    for batch in (1, 32):
        todo = jpegs[: max(batch * 4, 32)]
        t = time.perf_counter()
        for start in range(0, len(todo), batch):
            body = {"data": [{"uri": data_uri(b)} for b in todo[start : start + batch]]}
            resp = session.post(url + "/v1/image/group/ingest/add", json=body, auth=auth, timeout=600)
            assert resp.status_code == 200, resp.text
        report[f"ingest_batch_{batch}_img_s"] = len(todo) / (time.perf_counter() - t)
    session.post(url + "/v1/image/group/ingest/remove", auth=auth, timeout=60)
    return report


def sqlite_serve_bench(
    args, data: Path, query_jpegs: list[bytes], ingest_jpegs: list[bytes], by_ids: list[str]
) -> dict:
    """(b) HTTP search by a stored image's id (no model), (c) HTTP search with a JPEG (query embedding
    included); start to first search, ingest, RSS."""
    searcher = Searcher(data)
    report: dict = {}
    port = 18000 + os.getpid() % 1000
    env = {"TUSOU_GROUP_MAX_IMAGES": str(max(500_000, args.n + 1000))}
    server = Server(data, port, env, projected_dim=args.dim if args.dim else None)
    try:
        # The first start on a folder may build the model's ONNX cache; the second is a plain restart.
        report["first_start_to_first_search_s"] = searcher.first_answer(server, query_jpegs[0])
        server.stop()
        server = Server(data, port, env, projected_dim=args.dim if args.dim else None)
        report["start_to_first_search_s"] = searcher.first_answer(server, query_jpegs[0])
        report["start_load"] = os.getloadavg()
        report.update(http_timings(searcher, by_ids, query_jpegs, server.proc.pid))
        report["search_load"] = os.getloadavg()
        report.update(ingest_rates(searcher, ingest_jpegs))
        report["server_rss_mb"], report["server_peak_rss_mb"] = rss_mb(server.proc.pid)
    finally:
        server.stop()
    return report


def run_sqlite(args: argparse.Namespace, embedder, base_jpegs, ingest_jpegs, query_jpegs) -> None:
    if args.dim and args.dim != embedder.dim:
        embedder = Projected(embedder, args.dim)
    else:
        args.dim = 0
    queries = embedder.embed_queries([embedder.open_image(b) for b in query_jpegs])
    # (b) queries: the stored photos the JPEG queries were made from (one view each, no model).
    step = max(1, 300 // args.queries)
    by_ids = [f"photo-{i}" for i in range(0, 300, step)][: args.queries]
    for density in args.density:
        tag = f"{args.n}" + (f"-{args.dim}d" if args.dim else "") + f"-{density}"
        data = args.data or Path(f"/tmp/tusou-scale-{tag}")
        if len(args.density) > 1 and args.data:
            data = args.data / density
        data.mkdir(parents=True, exist_ok=True)
        report: dict = {
            "n": args.n,
            "store": "sqlite",
            "density": density,
            "dim": embedder.dim,
            "model_id": embedder.model_id,
            "projected": bool(args.dim),
            "data": str(data),
        }
        report.update(sqlite_fill(args, data, embedder, base_jpegs, queries, density))
        report.update(inproc_bench(args, data, embedder, queries))
        report.update(sqlite_serve_bench(args, data, query_jpegs, ingest_jpegs, by_ids))
        report["disk_mb"] = du_mb(data)
        report["index_mb"] = du_mb(data / "index") if (data / "index").is_dir() else 0.0
        print(json.dumps(report, indent=1, default=str), file=sys.stderr)
        (data / "scale-report.json").write_text(json.dumps(report, indent=1, default=str))
        print_sqlite_table(report)


def print_sqlite_table(r: dict) -> None:
    proj = " (randomly projected to this width by --dim: not the shipped model)" if r["projected"] else ""
    print(
        f"\n## scale: {r['n']:,} images in one group, {r['density']} catalogue "
        f"(median {r['matches_median']:.0f}, min {r['matches_min']} matches per query above the default "
        f"threshold), dim {r['dim']}{proj}, {os.cpu_count()} cores\n"
    )
    print("| measure | p50 / p99 / max | hits (median) |\n|---|---|---|")
    rows = (
        ("inproc", "(a) store search in process (SQLiteStore.search, 4 query views)"),
        ("http_id", "(b) HTTP search by stored image id (1 view, no model)"),
        ("http_jpeg", "(c) HTTP search with a JPEG (4-view query embedding included)"),
    )
    for prefix, label in rows:
        for limit in LIMITS:
            p50, p99, worst, returned = r[f"{prefix}_limit_{limit}"]
            print(f"| {label}, limit={limit} | {p50:.1f} / {p99:.1f} / {worst:.1f} ms | {returned:.0f} |")
    lone, tried = r.get("nomatch_queries", (0, 0))
    for limit in (1, -1):
        if f"inproc_nomatch_limit_{limit}" in r:
            p50, p99, worst, served = r[f"inproc_nomatch_limit_{limit}"]
            print(
                f"| (a) a query with no match ({lone} of {tried} noise/pattern images), limit={limit} | "
                f"{p50:.1f} / {p99:.1f} / {worst:.1f} ms | {served:.0f} |"
            )
    print("\n| measure | value |\n|---|---|")
    same, total = r["served_identical"]
    print(
        f"| served answers vs an exact float32 scan of every row, default threshold, limits 1/100/10000/-1: "
        f"identical keys and order / identical up to float32 rounding ties (cosines equal to 1e-6) | "
        f"{same} of {total} / {r['served_identical_up_to_ties']} of {total} "
        f"(max cosine difference {r['served_cos_err']:.1e}) |"
    )
    if "nomatch_served_identical" in r:
        same, total = r["nomatch_served_identical"]
        print(
            f"| the noise/pattern queries' served answers vs an exact float32 scan, limits 1/-1: identical "
            f"keys | {same} of {total} |"
        )
    for batch in (1, 32):
        print(f"| ingest over HTTP, batch {batch} | {r[f'ingest_batch_{batch}_img_s']:.1f} img/s |")
    print(
        f"| process start to first answered search (HTTP, JPEG): restart / first start on the folder | "
        f"{r['start_to_first_search_s']:.2f} / {r['first_start_to_first_search_s']:.2f} s |"
    )
    print(f"| reopen in process (SQLiteStore(), snapshot load) | {r['reopen_in_process_s']:.2f} s |")
    print(f"| server RSS now / peak | {r['server_rss_mb']:.0f} / {r['server_peak_rss_mb']:.0f} MB |")
    if "http_id_costs_10000" in r:
        costs = [r[f"http_id_costs_{limit}"] for limit in LIMITS]
        print(
            "| the server's page faults / kernel CPU ms per search, (b) limit=1/100/10000/-1 | "
            + ", ".join(f"{faults:.0f} / {kernel:.1f}" for faults, kernel in costs)
            + " |"
        )
    print(f"| disk (whole folder / index snapshots) | {r['disk_mb']:.0f} / {r['index_mb']:.0f} MB |")
    if "fill_s" in r:
        print(
            f"| fill (SQLiteStore.add_images, batches of 10,000) / snapshot at close | "
            f"{r['fill_s']:.0f} s ({r['fill_rows_s']:.0f} rows/s, load {r['fill_load'][0]:.1f}) / "
            f"{r['close_snapshot_s']:.1f} s |"
        )
    print(
        f"| load average (1 min) at start / after searches | {r['start_load'][0]:.1f} / "
        f"{r['search_load'][0]:.1f} |"
    )


class Server:
    def __init__(
        self, data: Path, port: int, extra_env: dict[str, str] | None = None, projected_dim: int | None = None
    ) -> None:
        env = dict(os.environ, TUSOU_DATA=str(data), TUSOU_PORT=str(port), PYTHONUNBUFFERED="1")
        env.update(extra_env or {})
        self.started = time.monotonic()
        command = [sys.executable, "-m", "tusou", "serve"]
        if projected_dim:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-projected", str(projected_dim)]
        self.proc = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(data / "serve.log", "a"),  # noqa: SIM115
        )
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--quick", action="store_true", help="N=20000 and fewer queries: a few minutes")
    parser.add_argument("--data", type=Path, default=None, help="data folder (kept between runs)")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument("--store", choices=("sqlite", "milvus"), default="sqlite")
    parser.add_argument(
        "--milvus-uri", default=None, help="an existing Milvus server (default: start one on loopback)"
    )
    parser.add_argument(
        "--milvus-collection", default=None, help="default bench_scale_<n>_<dim>d_<density>_<index>"
    )
    parser.add_argument(
        "--milvus-tick-ms", type=int, default=20, help="proxy.timeTickInterval of the started server"
    )
    parser.add_argument("--milvus-index", choices=("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8"), default="IVF_FLAT")
    parser.add_argument(
        "--milvus-nprobe", type=int, default=8, help="IVF lists searched per segment (8x for every match)"
    )
    parser.add_argument(
        "--milvus-nlist", type=int, default=1024, help="IVF lists per segment of the bench's new collection"
    )
    parser.add_argument(
        "--milvus-segment-mb",
        type=int,
        default=4096,
        help="dataCoord.segment.maxSize of the started server (Milvus's default: 512)",
    )
    parser.add_argument(
        "--milvus-index-timeout", type=float, default=7200, help="seconds to wait for the index build"
    )
    parser.add_argument("--milvus-consistency", choices=("Session", "Strong"), default="Session")
    parser.add_argument(
        "--dim",
        type=int,
        default=0,
        help="project the model's vectors to this width (random orthogonal)",
    )
    parser.add_argument(
        "--density",
        choices=("sparse", "dense", "both"),
        default="both",
        help="which catalogue(s); milvus: the first (sparse for both)",
    )
    parser.add_argument("--exact-queries", type=int, default=5, help="queries checked against brute force")
    parser.add_argument("--serve-projected", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_projected:
        serve_projected(args.serve_projected)
        return
    args.density = ("sparse", "dense") if args.density == "both" else (args.density,)
    if args.quick:
        args.n, args.queries = 20_000, min(args.queries, 15)
    if args.store == "milvus":
        from scale_milvus import run_milvus

        run_milvus(args)
        return
    run(args, args.data or Path(f"/tmp/tusou-scale-{args.n}"))


def run(args: argparse.Namespace, data: Path) -> None:
    embedder = create_embedder(Settings(data=data))
    jpegs = photos(300 + 64)
    base_jpegs, ingest_jpegs = jpegs[:300], jpegs[300:] + jpegs[:64]
    # Queries: base photos, re-encoded smaller (a near-duplicate of a stored image).
    query_jpegs = [
        jpeg_bytes(Image.open(io.BytesIO(b)), side=480, quality=70)
        for b in base_jpegs[:: max(1, 300 // args.queries)]
    ][: args.queries]
    run_sqlite(args, embedder, base_jpegs, ingest_jpegs, query_jpegs)


if __name__ == "__main__":
    main()
