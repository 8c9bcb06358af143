"""Scale benchmark: one group filled to N images, searched and fed through the real HTTP API.

    python bench/scale.py [--n 500000] [--quick] [--data DIR] [--queries 30] [--store sqlite|milvus]

1. Base vectors: real embeddings (default model) of a few hundred photos (the evaluation gallery under
   ~/.cache/tusou-eval/out when present, else generated scenes from tests/imagegen.py).
2. Fill (skipped when DIR already holds the group at N): the base images themselves plus synthetic rows,
   each a perturbation of a mix of two base embeddings (photo-like: neighbours at cosine 0.5-0.9, not
   uniform noise), inserted through ``SQLiteStore.add_images`` in batches of 10,000 (no HTTP, no model).
   Reports fill time (SQLite + HNSW build) and the snapshot written by ``close()``.
3. In-process, on the same store: recall of the approximate (graph) path against the exact scan, and of
   the exact path (int8 screen + float32 re-rank) against brute-force float32 over every row.
4. ``python -m tusou serve`` on the folder: time from process start to the first answered search; search
   p50/p99 over HTTP with real JPEG queries for limit 1, 100, 10000, -1 (default threshold); ingest img/s
   over HTTP with real JPEGs in batches of 1 and 32; the server's RSS (now and peak); disk use.

``--store milvus``: the same, with the group in Milvus. A Milvus 2.3 standalone server is started on free
loopback ports in a temporary folder (bench/milvus_server.py, ``proxy.timeTickInterval`` from
``--milvus-tick-ms``) and stopped at the end, unless ``--milvus-uri`` names one. ``--milvus-index``
FLAT (default) or HNSW picks the collection's index (``bench_scale_<n>_<index>``). Step 2 goes through
``MilvusStore.add_images`` (then one ``flush`` and the wait for the index, so searches run on sealed,
indexed segments); step 3 becomes recall@10 against brute force and in-process search latency with
Session and with Strong reads (what the consistency wait costs); step 4 runs ``tusou serve`` with
``TUSOU_STORE=milvus`` (reads at ``--milvus-consistency``, default Session) and also reports the Milvus
server's RSS.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
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


def synthetic(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    i = rng.integers(0, len(base), n)
    j = rng.integers(0, len(base), n)
    mix = rng.uniform(0.0, 0.7, (n, 1)).astype(np.float32)
    noise = rng.standard_normal((n, base.shape[1]), dtype=np.float32)
    noise *= rng.uniform(0.3, 0.8, (n, 1)).astype(np.float32) / np.linalg.norm(noise, axis=1, keepdims=True)
    v = base[i] + mix * base[j] + noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


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


def open_store(args: argparse.Namespace, data: Path, embedder, consistency: str = "Session"):
    if args.store == "milvus":
        from tusou.store.milvus import MilvusStore

        return MilvusStore(
            args.milvus_uri,
            collection=args.milvus_collection,
            model_id=embedder.model_id,
            dim=embedder.dim,
            consistency=consistency,
            index=args.milvus_index,
        )
    return SQLiteStore(data / "tusou.db", model_id=embedder.model_id, dim=embedder.dim)


def fill(
    args: argparse.Namespace, data: Path, embedder, base_jpegs: list[bytes], kept: list | None = None
) -> dict:
    """Fill the group to args.n; with ``kept``, append (ids, vectors) of every row written."""
    keys = KeyStore(data / "keys.db")
    key = keys.list()[0] if keys.active_count() else keys.create("bench")
    keys.close()
    report: dict = {}
    started = time.monotonic()
    store = open_store(args, data, embedder)
    report["open_s"] = time.monotonic() - started
    tenant = key.access_key
    if GROUP in store.list_groups(tenant) and store.count(tenant, GROUP) >= args.n:
        store.close()
        return report
    base = embedder.embed_images([embedder.open_image(b) for b in base_jpegs])
    np.save(data / "bench-base.npy", base)
    if GROUP not in store.list_groups(tenant):
        store.create_group(
            tenant, GROUP, [NewImage(f"photo-{i}", "photo", "", None, v) for i, v in enumerate(base)]
        )
        if kept is not None:
            kept.append(([f"photo-{i}" for i in range(len(base))], base))
    rng = np.random.default_rng(0)
    have = store.count(tenant, GROUP)
    started = time.monotonic()
    while have < args.n:
        step = min(10_000, args.n - have)
        vectors = synthetic(base, step, rng)
        errors = store.add_images(
            tenant, GROUP, [NewImage(f"s{have + k}", "synthetic", "", None, v) for k, v in enumerate(vectors)]
        )
        if any(errors):
            raise RuntimeError(f"fill: {next(e for e in errors if e)}")
        if kept is not None:
            kept.append(([f"s{have + k}" for k in range(step)], vectors))
        have += step
        if have % 50_000 < step:
            print(f"  filled {have} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    report["fill_s"] = time.monotonic() - started
    started = time.monotonic()
    if args.store == "milvus":
        store.client.flush(store.images)  # seal the growing segments: searches then run on sealed ones
        report["milvus_index_wait_s"] = milvus_wait_indexed(store)
    store.close()  # sqlite: writes the snapshot
    report["close_snapshot_s"] = time.monotonic() - started
    return report


def recall(args: argparse.Namespace, data: Path, embedder, query_jpegs: list[bytes]) -> dict:
    keys = KeyStore(data / "keys.db")
    tenant = keys.list()[0].access_key
    keys.close()
    report: dict = {}
    started = time.monotonic()
    store = SQLiteStore(data / "tusou.db", model_id=embedder.model_id, dim=embedder.dim)
    report["reopen_in_process_s"] = time.monotonic() - started
    index = store._indexes[store._gids[(tenant, GROUP)]]
    real = embedder.embed_queries([embedder.open_image(b) for b in query_jpegs])
    base = np.load(data / "bench-base.npy")
    held_out = synthetic(base, len(query_jpegs), np.random.default_rng(12345))[:, None, :]
    found = {}
    for name, queries in (("photo", real), ("synthetic", held_out)):
        hits1 = hits10 = 0
        ann_ms = []
        for q in queries:
            exact = index.search(q, 10, -1.0, exact=True)[0]
            t = time.perf_counter()
            approx = index.search(q, 10, -1.0, exact=False)[0]
            ann_ms.append((time.perf_counter() - t) * 1000)
            hits1 += int(approx[:1].tolist() == exact[:1].tolist())
            hits10 += len(set(approx.tolist()) & set(exact.tolist()))
        found[name] = (hits1 / len(queries), hits10 / (10 * len(queries)), pct(ann_ms, 50))
    report["ann_recall"] = found
    # What a search actually returns (auto path choice) against the exact scan, at the default threshold:
    # the graph where it is safe, the scan where the graph would miss matches.
    floor = embedder.cosine_for_score(embedder.default_threshold)
    served = {}
    for limit in (1, 10, 100):
        got = want = 0
        for q in real:
            truth = index.search(q, limit, floor, exact=True)[0].tolist()
            answer = index.search(q, limit, floor)[0].tolist()
            want += len(truth)
            got += len(set(answer) & set(truth))
        served[limit] = got / want if want else 1.0
    report["served_recall"] = served
    # The exact path against brute-force float32 over every row (read back from SQLite in chunks).
    all_keys = index.keys()
    all_keys.sort()
    complete = []
    sims = []
    for start in range(0, len(all_keys), 50_000):
        k, rows = store._fetch_vectors(all_keys[start : start + 50_000])
        sims.append((k, (rows @ real[:5].reshape(-1, rows.shape[1]).T).reshape(len(k), 5, -1).max(axis=2)))
    keys_all = np.concatenate([s[0] for s in sims])
    sim_all = np.concatenate([s[1] for s in sims])
    for qi in range(5):
        truth = keys_all[np.argsort(-sim_all[:, qi], kind="stable")[:10_000]]
        got, cos = index.search(real[qi], 10_000, -1.0, exact=True)
        complete.append(len(set(got.tolist()) & set(truth.tolist())) / len(truth))
    report["exact_path_recall_at_10000"] = float(np.mean(complete))
    report["int8_abs_err_max"] = int8_error(index, store, real[:5])
    for ix in store._indexes.values():  # read-only use: nothing to snapshot on close
        ix.dirty = 0
    store.close()
    return report


def milvus_wait_indexed(store, timeout_s: float = 300.0) -> float:
    """Wait until the sealed segments are indexed, so timings are not taken during the build."""
    started = time.monotonic()
    names = store.client.list_indexes(store.images) or ["vec"]
    while time.monotonic() - started < timeout_s:
        info = store.client.describe_index(store.images, names[0])
        if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("indexed_rows", 0)) >= int(
            info.get("total_rows", 0)
        ):
            break
        time.sleep(0.5)
    time.sleep(2.0)  # let the query node take the indexed segments over
    return time.monotonic() - started


def milvus_exactness(
    args: argparse.Namespace, data: Path, embedder, query_jpegs: list[bytes], kept: list
) -> dict:
    """Top 10 from Milvus against brute-force float32 over the rows written; in-process search latency."""
    keys = KeyStore(data / "keys.db")
    tenant = keys.list()[0].access_key
    keys.close()
    real = embedder.embed_queries([embedder.open_image(b) for b in query_jpegs])
    report: dict = {}
    if kept:
        ids = np.asarray([i for chunk, _ in kept for i in chunk])
        vectors = np.concatenate([v for _, v in kept]).astype(np.float32)
        store = open_store(args, data, embedder)
        same = []
        worst = 0.0
        for q in real[:5]:
            sims = (vectors @ q.reshape(-1, vectors.shape[1]).T).max(axis=1)
            truth = ids[np.argsort(-sims, kind="stable")[:10]]
            hits = store.search(tenant, [GROUP], q, 10, -1.0)
            same.append(len({h.id for h in hits} & set(truth.tolist())) / 10)
            worst = max(worst, abs(hits[0].cosine - float(sims.max())))
        store.close()
        report["milvus_recall_at_10_vs_brute_force"] = float(np.mean(same))
        report["milvus_top1_cosine_err"] = worst
    for consistency in ("Session", "Strong"):
        store = open_store(args, data, embedder, consistency)
        for q in real[:3]:  # warm-up, untimed
            store.search(tenant, [GROUP], q, 100, -1.0)
        for limit in (1, 100):
            times = []
            for q in real:
                t = time.perf_counter()
                store.search(tenant, [GROUP], q, limit, -1.0)
                times.append((time.perf_counter() - t) * 1000)
            report[f"inproc_{consistency}_limit_{limit}"] = (pct(times, 50), pct(times, 99))
        store.close()
    return report


def int8_error(index, store, queries: np.ndarray) -> float:
    """Largest |int8 cosine - float32 cosine| over the top 1000 rows of a few queries."""
    fetch, index.fetch = index.fetch, None
    try:
        worst = 0.0
        for q in queries:
            keys, approx = index.search(q, 1000, -1.0, exact=True)
            k, rows = store._fetch_vectors(keys)
            exact = (rows @ q.T).max(axis=1)
            worst = max(worst, float(np.abs(exact - approx[: len(k)]).max()))
        return worst
    finally:
        index.fetch = fetch


class Server:
    def __init__(self, data: Path, port: int, extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, TUSOU_DATA=str(data), TUSOU_PORT=str(port), PYTHONUNBUFFERED="1")
        env.update(extra_env or {})
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tusou", "serve"],
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


def serve_bench(
    args: argparse.Namespace,
    data: Path,
    query_jpegs: list[bytes],
    ingest_jpegs: list[bytes],
    extra_env: dict[str, str] | None = None,
) -> dict:
    keys = KeyStore(data / "keys.db")
    key = keys.list()[0]
    keys.close()
    session = requests.Session()
    auth = QiniuMacRequestsAuth(QiniuMacAuth(key.access_key, key.secret_key))
    report: dict = {}
    port = 18000 + os.getpid() % 1000
    server = Server(data, port, extra_env)

    def search(jpeg: bytes, limit: int) -> requests.Response:
        body = {"data": {"uri": data_uri(jpeg)}, "params": {"groups": [GROUP], "limit": limit}}
        return session.post(server.url + "/v1/image/groups/search", json=body, auth=auth, timeout=120)

    try:
        while True:
            try:
                if search(query_jpegs[0], 1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.05)
            if server.proc.poll() is not None:
                raise RuntimeError("server exited; see serve.log")
        report["start_to_first_search_s"] = time.monotonic() - server.started
        for limit in (1, 100, 10_000, -1):
            times = []
            returned = []
            for jpeg in query_jpegs:
                t = time.perf_counter()
                resp = search(jpeg, limit)
                times.append((time.perf_counter() - t) * 1000)
                assert resp.status_code == 200, resp.text
                returned.append(len(resp.json()["result"]))
            report[f"search_limit_{limit}"] = (pct(times, 50), pct(times, 99), float(np.median(returned)))
        session.post(server.url + "/v1/image/group/ingest/new", json={"data": []}, auth=auth, timeout=60)
        for batch in (1, 32):
            todo = ingest_jpegs[: max(batch * 4, 32)]
            t = time.perf_counter()
            for start in range(0, len(todo), batch):
                body = {"data": [{"uri": data_uri(b)} for b in todo[start : start + batch]]}
                resp = session.post(
                    server.url + "/v1/image/group/ingest/add", json=body, auth=auth, timeout=600
                )
                assert resp.status_code == 200, resp.text
            report[f"ingest_batch_{batch}_img_s"] = len(todo) / (time.perf_counter() - t)
        report["server_rss_mb"], report["server_peak_rss_mb"] = rss_mb(server.proc.pid)
        session.post(server.url + "/v1/image/group/ingest/remove", auth=auth, timeout=60)
    finally:
        server.stop()
    return report


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
    parser.add_argument("--milvus-collection", default=None, help="default bench_scale_<n>")
    parser.add_argument(
        "--milvus-tick-ms", type=int, default=20, help="proxy.timeTickInterval of the started server"
    )
    parser.add_argument("--milvus-index", choices=("FLAT", "HNSW"), default="FLAT")
    parser.add_argument("--milvus-consistency", choices=("Session", "Strong"), default="Session")
    args = parser.parse_args()
    if args.quick:
        args.n, args.queries = 20_000, min(args.queries, 15)
    suffix = "-milvus" if args.store == "milvus" else ""
    data = args.data or Path(f"/tmp/tusou-scale-{args.n}{suffix}")
    data.mkdir(parents=True, exist_ok=True)
    if args.store == "milvus":
        default_name = f"bench_scale_{args.n}_{args.milvus_index.lower()}"
        args.milvus_collection = args.milvus_collection or default_name
        with contextlib.ExitStack() as stack:
            if args.milvus_uri is None:
                from milvus_server import milvus_server

                base = Path(tempfile.mkdtemp(prefix="tusou-scale-milvus-"))
                server = stack.enter_context(milvus_server(base, args.milvus_tick_ms))
                args.milvus_uri, args.milvus_pid = server.uri, server.pid
                args.milvus_base, args.milvus_start_s = server.base, server.start_s
            run(args, data)
    else:
        run(args, data)


def run(args: argparse.Namespace, data: Path) -> None:
    embedder = create_embedder(Settings(data=data))
    jpegs = photos(300 + 64)
    base_jpegs, ingest_jpegs = jpegs[:300], jpegs[300:] + jpegs[:64]
    # Queries: base photos, re-encoded smaller (a near-duplicate of a stored image).
    query_jpegs = [
        jpeg_bytes(Image.open(io.BytesIO(b)), side=480, quality=70)
        for b in base_jpegs[:: max(1, 300 // args.queries)]
    ][: args.queries]
    report: dict = {"n": args.n, "store": args.store}
    if args.store == "milvus":
        milvus_pid = getattr(args, "milvus_pid", None)
        report["milvus_uri"], report["milvus_collection"] = args.milvus_uri, args.milvus_collection
        report["milvus_index"], report["milvus_consistency"] = args.milvus_index, args.milvus_consistency
        if milvus_pid:
            report["milvus_tick_ms"] = args.milvus_tick_ms
            report["milvus_start_s"] = args.milvus_start_s
        kept: list = []
        report.update(fill(args, data, embedder, base_jpegs, kept if args.n <= 200_000 else None))
        if not args.skip_recall:
            report.update(milvus_exactness(args, data, embedder, query_jpegs, kept))
        del kept
        env = {
            "TUSOU_STORE": "milvus",
            "TUSOU_MILVUS_URI": args.milvus_uri,
            "TUSOU_MILVUS_COLLECTION": args.milvus_collection,
            "TUSOU_MILVUS_CONSISTENCY": args.milvus_consistency,
            "TUSOU_MILVUS_INDEX": args.milvus_index,
        }
        report.update(serve_bench(args, data, query_jpegs, ingest_jpegs, env))
        if milvus_pid:
            report["milvus_rss_mb"], report["milvus_peak_rss_mb"] = rss_mb(milvus_pid)
            report["milvus_disk_mb"] = du_mb(args.milvus_base)
        report["disk_mb"] = du_mb(data)
    else:
        report.update(fill(args, data, embedder, base_jpegs))
        if not args.skip_recall:
            report.update(recall(args, data, embedder, query_jpegs))
        report.update(serve_bench(args, data, query_jpegs, ingest_jpegs))
        report["disk_mb"] = du_mb(data)
        report["index_mb"] = du_mb(data / "index")
    print(json.dumps(report, indent=1, default=str), file=sys.stderr)
    (data / "scale-report.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


def print_search_rows(r: dict) -> None:
    for limit in (1, 100, 10_000, -1):
        p50, p99, returned = r[f"search_limit_{limit}"]
        print(
            f"| search limit={limit} p50 / p99 (HTTP, query embedding included) | "
            f"{p50:.0f} / {p99:.0f} ms ({returned:.0f} hits) |"
        )


def print_table(r: dict) -> None:
    if r.get("store") == "milvus":
        print_milvus_table(r)
        return
    print(f"\n## scale: {r['n']:,} images in one group, {os.cpu_count()} cores\n")
    print("| measure | value |\n|---|---|")
    print_search_rows(r)
    if "ann_recall" in r:
        for name, (r1, r10, ms) in r["ann_recall"].items():
            print(
                f"| graph vs exact, {name} queries: recall@1 / recall@10, graph search | "
                f"{r1:.3f} / {r10:.3f}, {ms:.2f} ms |"
            )
        if "served_recall" in r:
            cells = " / ".join(f"{v:.3f}" for v in r["served_recall"].values())
            label = "served search vs exact, default threshold, limit 1 / 10 / 100 (photo queries)"
            print(f"| {label} | {cells} |")
        print(
            f"| exact path (int8 scan + f32 re-rank) vs brute-force f32, top 10000 | "
            f"{r['exact_path_recall_at_10000']:.4f} |"
        )
        print(f"| max int8 cosine error (top 1000 of 5 queries) | {r['int8_abs_err_max']:.4f} |")
    for batch in (1, 32):
        print(f"| ingest over HTTP, batch {batch} | {r[f'ingest_batch_{batch}_img_s']:.1f} img/s |")
    print(f"| process start to first answered search | {r['start_to_first_search_s']:.2f} s |")
    print(f"| server RSS now / peak | {r['server_rss_mb']:.0f} / {r['server_peak_rss_mb']:.0f} MB |")
    print(f"| disk (whole folder / index snapshots) | {r['disk_mb']:.0f} / {r['index_mb']:.0f} MB |")
    if "fill_s" in r:
        print(
            f"| fill (SQLite + HNSW, internal path) / snapshot at close | "
            f"{r['fill_s']:.0f} s / {r['close_snapshot_s']:.1f} s |"
        )


def print_milvus_table(r: dict) -> None:
    tick = f", proxy.timeTickInterval {r['milvus_tick_ms']} ms" if "milvus_tick_ms" in r else ""
    print(
        f"\n## scale: {r['n']:,} images in one group, Milvus store ({r.get('milvus_index', 'FLAT')} index, "
        f"{r.get('milvus_consistency', 'Strong')} reads over HTTP{tick}), "
        f"{os.cpu_count()} cores\n"
    )
    print("| measure | value |\n|---|---|")
    print_search_rows(r)
    for consistency in ("Session", "Strong"):
        for limit in (1, 100):
            key = f"inproc_{consistency}_limit_{limit}"
            if key in r:
                print(
                    f"| MilvusStore.search in-process, {consistency}, limit={limit} p50 / p99 | "
                    f"{r[key][0]:.1f} / {r[key][1]:.1f} ms |"
                )
    if "milvus_recall_at_10_vs_brute_force" in r:
        print(
            f"| {r.get('milvus_index', 'FLAT')} vs brute force, recall@10 / top-1 cosine err (5 queries) | "
            f"{r['milvus_recall_at_10_vs_brute_force']:.3f} / {r['milvus_top1_cosine_err']:.1e} |"
        )
    for batch in (1, 32):
        print(f"| ingest over HTTP, batch {batch} | {r[f'ingest_batch_{batch}_img_s']:.1f} img/s |")
    print(f"| tusou process start to first answered search | {r['start_to_first_search_s']:.2f} s |")
    print(f"| tusou RSS now / peak | {r['server_rss_mb']:.0f} / {r['server_peak_rss_mb']:.0f} MB |")
    if "milvus_rss_mb" in r:
        print(
            f"| Milvus server RSS now / peak | {r['milvus_rss_mb']:.0f} / {r['milvus_peak_rss_mb']:.0f} MB |"
        )
        print(
            f"| Milvus server start (to healthy) / disk | "
            f"{r['milvus_start_s']:.1f} s / {r['milvus_disk_mb']:.0f} MB |"
        )
    if "fill_s" in r:
        print(
            f"| fill (MilvusStore.add_images, internal path) / flush at the end | "
            f"{r['fill_s']:.0f} s / {r['close_snapshot_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
