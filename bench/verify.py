"""Local-feature verification of search candidates, measured before it is built into the service.

    python bench/verify.py [--eval-dir ~/.cache/tusou-eval] [--k 3] [--min-inliers 15]

Reads the service-path results of ``bench/quality.py`` (``<eval-dir>/results/lite0/neardup.json``: each dev
near-dup query's best gallery images with their scores) and checks the top ``k`` candidates scoring at
least ``--low`` with ORB keypoints and a RANSAC similarity transform (OpenCV; ``pip install
opencv-python-headless``). A candidate is *verified* when at least ``--min-inliers`` matches agree on one
transform. Printed per edit kind, for the service as it is and for two rules:

* **boost**: a verified candidate scores at least 0.85 (the near-duplicate band); others keep their score.
* **boost + demote**: also, an unverified candidate in the ambiguous band [0.70, 0.85) drops below 0.70.

Nothing here changes the service; it tells whether the rule is worth the keypoint data it would need.

    python bench/verify.py --service [--sets neardup,semantic] [--time 200]

runs the service's own rule instead (``tusou.verify.check``: its keypoints, candidates, bands and inlier
counts) on the results of ``bench/quality.py`` for each set: the metrics without and with verification,
correct accepts per edit kind, the time verification adds per search (p50/p90/mean) and, on ``--time``
gallery images, the keypoints' share of the ingest time per image (docs/score.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

try:
    import cv2
except ImportError:  # pragma: no cover
    sys.exit("bench/verify.py needs OpenCV: pip install 'opencv-python-headless>=4.10,<5'")

SIDE = 512  # images are resized so that their longer side is this many pixels (tiny queries upscaled)
BAND = (0.70, 0.85)


def features(path: Path, orb: Any) -> tuple[Any, Any]:
    im = ImageOps.exif_transpose(Image.open(path)).convert("L")
    scale = SIDE / max(im.size)
    im = im.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR
    )
    keypoints, desc = orb.detectAndCompute(np.asarray(im), None)
    pts = np.float32([k.pt for k in keypoints]) if keypoints else np.zeros((0, 2), np.float32)
    return pts, desc


def inliers(a: tuple[Any, Any], b: tuple[Any, Any], matcher: Any, ratio: float) -> int:
    (pa, da), (pb, db) = a, b
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return 0
    good = [
        m
        for m, n in (p for p in matcher.knnMatch(da, db, k=2) if len(p) == 2)
        if m.distance < ratio * n.distance
    ]
    if len(good) < 6:
        return 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=6.0)
    return int(mask.sum()) if mask is not None else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-dir", type=Path, default=Path("~/.cache/tusou-eval").expanduser())
    ap.add_argument("--model", default="lite0")
    ap.add_argument("--k", type=int, default=3, help="candidates verified per query")
    ap.add_argument("--low", type=float, default=0.3, help="least score of a candidate worth verifying")
    ap.add_argument("--min-inliers", type=int, nargs="+", default=[15, 25, 40])
    ap.add_argument("--ratio", type=float, default=0.8, help="Lowe's ratio test")
    ap.add_argument("--features", type=int, default=1000, help="ORB keypoints per query image")
    ap.add_argument("--stored-features", type=int, default=0, help="ORB keypoints per gallery image")
    ap.add_argument(
        "--service", action="store_true", help="run tusou/verify.py itself with its settings (and time it)"
    )
    ap.add_argument("--min-short", type=int, default=256, help="with --service: lite0's resize_short")
    ap.add_argument("--sets", default="neardup,semantic", help="with --service: result sets to rescore")
    ap.add_argument("--data", type=Path, default=None, help="with --service: tusou data folder (model cache)")
    ap.add_argument("--time", type=int, default=200, help="with --service: images timed for ingest/search")
    ap.add_argument(
        "--http",
        action="store_true",
        help="time two servers (TUSOU_VERIFY false / true) over HTTP: ingest img/s and search latency",
    )
    ap.add_argument("--queries", type=int, default=300, help="with --http: dev near-dup queries searched")
    ap.add_argument("--rounds", type=int, default=2, help="with --http: ingest rounds per server")
    ap.add_argument(
        "--lookup-rows", type=int, default=0, help="with --http: also time keypoint reads, a file of N rows"
    )
    args = ap.parse_args()
    root = args.eval_dir.expanduser() / "out" / "neardup"
    res_path = args.eval_dir.expanduser() / "results" / args.model / "neardup.json"
    if not res_path.is_file():
        sys.exit(f"{res_path} missing: run python bench/quality.py --model {args.model} --sets neardup first")
    res: dict[str, list[list[Any]]] = json.loads(res_path.read_text())
    gt: dict[str, list[str]] = json.loads((root / "gt.json").read_text())
    queries = {m["id"]: m for m in json.loads((root / "queries.json").read_text())}
    gallery = {m["id"]: m for m in json.loads((root / "gallery.json").read_text())}
    orb = cv2.ORB_create(nfeatures=args.features)
    # What the index would keep per stored image: fewer keypoints bound the data kept with each record.
    orb_stored = cv2.ORB_create(nfeatures=args.stored_features or args.features)
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    cache: dict[str, tuple[Any, Any]] = {}

    def feats(image_id: str) -> tuple[Any, Any]:
        if image_id not in cache:
            meta = queries.get(image_id) or gallery[image_id]
            cache[image_id] = features(root / meta["file"], orb if image_id in queries else orb_stored)
        return cache[image_id]

    if args.service:
        service(args)
        return
    if args.http:
        over_http(args)
        return

    def check(qid: str, gid: str) -> int:
        return inliers(feats(qid), feats(gid), matcher, args.ratio)

    t0 = time.perf_counter()
    found: dict[str, dict[str, int]] = {}  # query -> candidate -> inliers
    for qid, ents in res.items():
        found[qid] = {gid: check(qid, gid) for gid, s in ents[: args.k] if s >= args.low}
    dt = time.perf_counter() - t0
    checks = sum(len(v) for v in found.values())
    true_inl = np.array([n for q, c in found.items() for g, n in c.items() if g in gt.get(q, [])])
    false_inl = np.array([n for q, c in found.items() for g, n in c.items() if g not in gt.get(q, [])])
    print(
        f"\n{checks} verifications ({1000 * dt / max(checks, 1):.1f} ms each incl. keypoints), k={args.k}, "
        f"ratio {args.ratio}, ORB keypoints at {SIDE} px: {args.features} per query, "
        f"{args.stored_features or args.features} per stored image\n"
    )
    for name, arr in (("true (query, original)", true_inl), ("wrong candidates", false_inl)):
        qs = np.percentile(arr, [1, 5, 50, 95, 99]).round(1).tolist() if len(arr) else []
        print(f"inliers, {name}: n={len(arr)} p1/p5/p50/p95/p99 {qs} max {arr.max() if len(arr) else '-'}")
    for min_inliers in args.min_inliers:
        report(res, gt, queries, found, min_inliers)


def service(args: argparse.Namespace) -> None:
    """tusou/verify.py itself (``verify.check``, the service's rule) on the results of bench/quality.py,
    images decoded as the service decodes uploads; prints what it changes and what it costs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import eval_score  # type: ignore[import-not-found]

    from tusou import verify
    from tusou.config import Settings
    from tusou.embed import create_embedder
    from tusou.images import decode_image
    from tusou.thumbs import make_thumbnail

    eval_dir = args.eval_dir.expanduser()
    emb = create_embedder(Settings(data=args.data or eval_dir / "tusou-data", model=args.model))
    default = emb.default_threshold
    print(
        f"tusou/verify.py: ORB {verify.KEYPOINTS} keypoints at {verify.SIDE} px, {verify.CANDIDATES} "
        f"candidates scoring [{verify.LOW}, {verify.VERIFIED}); verified >= {verify.MIN_INLIERS} inliers; "
        f"< {verify.REJECT_INLIERS} inliers in [{verify.BAND}, {verify.VERIFIED}) drops by {verify.DEMOTION}"
    )
    timing: dict[str, list[float]] = {}
    for name in args.sets.split(","):
        root = eval_dir / "out" / name
        res_path = eval_dir / "results" / args.model / f"{name}.json"
        if not res_path.is_file():
            sys.exit(f"{res_path} missing: run python bench/quality.py --model {args.model} --sets {name}")
        res: dict[str, list[list[Any]]] = json.loads(res_path.read_text())
        queries = {m["id"]: m for m in json.loads((root / "queries.json").read_text())}
        gallery = {m["id"]: m for m in json.loads((root / "gallery.json").read_text())}
        packed: dict[str, bytes] = {}

        def stored_points(
            image_id: str, root: Path = root, gallery: dict[str, Any] = gallery, packed: dict = packed
        ) -> bytes:
            # What ingest computes and keeps (timed in the ingest table below).
            if image_id not in packed:
                image = decode_image((root / gallery[image_id]["file"]).read_bytes(), args.min_short)
                packed[image_id] = verify.keypoints(image)
            return packed[image_id]

        after: dict[str, list[list[Any]]] = {}
        spent: list[float] = []
        checking: list[bool] = []
        mirrors: list[bool] = []
        for qid, ents in res.items():
            image = decode_image((root / queries[qid]["file"]).read_bytes(), args.min_short)
            for gid, _ in ents[: verify.CANDIDATES]:
                stored_points(gid)
            computed: list[bool] = []

            def query_points(image: Any = image, computed: list[bool] = computed) -> bytes:
                computed.append(True)
                return verify.keypoints(image, query=True)

            def mirrored(image: Any = image, mirrors: list[bool] = mirrors) -> bytes:
                mirrors.append(True)
                return verify.keypoints(image, query=True, mirrored=True)

            start = time.perf_counter()
            kept = [packed[g] if g in packed else None for g, _ in ents[: verify.CANDIDATES]]
            scores = verify.check([s for _, s in ents], kept.__getitem__, query_points, mirrored)
            spent.append(time.perf_counter() - start)
            checking.append(bool(computed))
            ranked = sorted(zip([g for g, _ in ents], scores, strict=True), key=lambda e: -e[1])
            after[qid] = [[g, round(s, 6)] for g, s in ranked]
        timing[name] = spent
        ms = 1000 * np.asarray(spent)
        print(
            f"\n{name}: {len(res)} searches, {np.mean(checking):.0%} check a candidate ({len(mirrors)} "
            f"also the mirror image); added time per "
            f"search p50 {np.percentile(ms, 50):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, "
            f"mean {ms.mean():.1f} ms"
        )
        before_m = eval_score.score(str(root), res, thresholds=(default, verify.VERIFIED))
        after_m = eval_score.score(str(root), after, thresholds=(default, verify.VERIFIED))
        print("| metric | without | with verification |")
        print("|---|---|---|")
        for key in ("recall@1", "mAP"):
            print(f"| {key} | {before_m[key]:.3f} | {after_m[key]:.3f} |")
        for t in (default, verify.VERIFIED):
            for key, label in (
                ("match_top1_correct_score>=T", "correct accepts"),
                ("no_match_top_score>=T", "no-match queries passing"),
            ):
                b, a = before_m["threshold"][str(t)].get(key), after_m["threshold"][str(t)].get(key)
                if b is not None:
                    print(f"| {label} @ {t} | {b:.3f} | {a:.3f} |")
        if any("edit" in m for m in queries.values()):
            report_edits(res, after, json.loads((root / "gt.json").read_text()), queries, default)
    if args.time:
        ingest_cost(args, emb, eval_dir, verify, decode_image, make_thumbnail)


def over_http(args: argparse.Namespace) -> None:
    """Two servers (``python -m tusou serve``), verification off and on, fed the same dev gallery: ingest
    img/s (batches of 16, rounds alternating between the servers) and search latency over the same dev
    near-dup queries (alternating too, so both see the same machine load)."""
    import os
    import signal
    import subprocess
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tusou.client import Client, data_uri
    from tusou.store.keys import KeyStore

    eval_dir = args.eval_dir.expanduser()
    root = eval_dir / "out" / "neardup"
    gallery = [(root / m["file"]).read_bytes() for m in json.loads((root / "gallery.json").read_text())]
    queries = sorted(json.loads((root / "queries.json").read_text()), key=lambda m: m["id"])
    step = max(1, len(queries) // args.queries)
    picked = [(root / m["file"]).read_bytes() for m in queries[::step][: args.queries]]
    model_dir = args.data or eval_dir / "tusou-data"
    servers: dict[str, tuple[subprocess.Popen[bytes], Client]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for n, (name, flag) in enumerate((("off", "false"), ("on", "true"))):
                data = Path(tmp) / name
                data.mkdir()
                keys = KeyStore(data / "keys.db")
                key = keys.create("bench")
                keys.close()
                port = 19000 + os.getpid() % 500 * 2 + n
                env = dict(
                    os.environ,
                    TUSOU_DATA=str(data),
                    TUSOU_PORT=str(port),
                    TUSOU_VERIFY=flag,
                    TUSOU_MODEL_DIR=str(model_dir / "models"),
                )
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tusou", "serve"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(data / "serve.log", "a"),  # noqa: SIM115
                )
                servers[name] = (proc, Client(f"http://127.0.0.1:{port}", key.access_key, key.secret_key))
            for name, (proc, client) in servers.items():
                for _ in range(600):
                    if proc.poll() is not None:
                        sys.exit(f"the {name} server exited: see its serve.log")
                    try:
                        client.list_groups()
                        break
                    except Exception:
                        time.sleep(0.2)
            ingest: dict[str, list[float]] = {"off": [], "on": []}
            ingest_cpu: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds):
                for name, (proc, client) in servers.items():
                    client.new_group(f"r{r}")
                    start, used = time.perf_counter(), _cpu_s(proc.pid)
                    for i in range(0, len(gallery), 16):
                        out = client.add_images(f"r{r}", [data_uri(b) for b in gallery[i : i + 16]])
                        assert not out.failed, out.failed
                    ingest[name].append(len(gallery) / (time.perf_counter() - start))
                    ingest_cpu[name].append(1000 * (_cpu_s(proc.pid) - used) / len(gallery))
            spent: dict[str, list[float]] = {"off": [], "on": []}
            spent_cpu: dict[str, list[float]] = {"off": [], "on": []}
            for jpeg in picked:
                uri = data_uri(jpeg)
                for name, (proc, client) in servers.items():
                    start, used = time.perf_counter(), _cpu_s(proc.pid)
                    client.search(["r0"], uri, limit=10)
                    spent[name].append(1000 * (time.perf_counter() - start))
                    spent_cpu[name].append(1000 * (_cpu_s(proc.pid) - used))
        finally:
            for proc, client in servers.values():
                client.close()
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        print(
            f"\nover HTTP, one server each, group of {len(gallery)} dev gallery images, "
            f"load average {os.getloadavg()[0]:.1f} at the end"
        )
        print(
            "| TUSOU_VERIFY | ingest img/s (batches of 16, each round) | server CPU ms per image | "
            "search p50 | p90 | mean | server CPU ms per search: p50 | mean |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in ("off", "on"):
            ms, cpu = np.asarray(spent[name]), np.asarray(spent_cpu[name])
            rates = " / ".join(f"{x:.1f}" for x in ingest[name])
            per_image = " / ".join(f"{x:.1f}" for x in ingest_cpu[name])
            print(
                f"| {name} | {rates} | {per_image} | {np.percentile(ms, 50):.1f} ms | "
                f"{np.percentile(ms, 90):.1f} ms | {ms.mean():.1f} ms | {np.percentile(cpu, 50):.1f} | "
                f"{cpu.mean():.1f} |"
            )
        if args.lookup_rows:
            lookups(args.lookup_rows, Path(tmp))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used: steadier than wall time on a shared
    machine."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lookups(rows: int, folder: Path) -> None:
    """Keypoint reads (the three a search may make) from a keypoints file of ``rows`` images of 300
    keypoints each: the part of verification's cost that grows with a group."""
    from tusou import verify
    from tusou.thumbs import ThumbStore

    size = 4 + 40 * verify.KEYPOINTS
    store = ThumbStore(folder / "keypoints.db")
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    for first in range(0, rows, 5000):
        store.put("t", "big", ((f"{i:09d}", blob) for i in range(first, min(rows, first + 5000))))
    filled = time.perf_counter() - start
    times = []
    for _ in range(300):
        ids = [f"{i:09d}" for i in rng.integers(0, rows, 3)]
        t = time.perf_counter()
        for image_id in ids:
            store.get("t", "big", [image_id])
        times.append(1000 * (time.perf_counter() - t))
    store.close()
    print(
        f"\nkeypoints.db with {rows} images ({size * rows / 1e9:.1f} GB, filled in {filled:.0f} s): "
        f"3 random reads p50 {np.percentile(times, 50):.2f} ms, p99 {np.percentile(times, 99):.2f} ms"
    )


def report_edits(
    before: dict[str, list[list[Any]]],
    after: dict[str, list[list[Any]]],
    gt: dict[str, list[str]],
    queries: dict[str, dict[str, Any]],
    default: float,
) -> None:
    """Correct accepts (top hit right and scoring at least T) per edit kind, and precision of what passes."""
    edits = sorted({str(queries[q].get("edit")) for q in gt if gt[q]})
    print(f"\n| edit | @ {default} without | @ {default} with | @ 0.85 without | @ 0.85 with |")
    print("|---|---|---|---|---|")
    rows = []
    for e in [*edits, "all"]:
        qids = [q for q in gt if gt[q] and (e == "all" or str(queries[q].get("edit")) == e)]
        cells = [
            float(np.mean([_accepts(_top(res[q]), gt[q], t) for q in qids]))
            for t in (default, 0.85)
            for res in (before, after)
        ]
        rows.append((e, cells))
    for e, cells in sorted(rows, key=lambda r: (r[0] == "all", r[1][1])):
        print(f"| {e} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    cells = []
    for t in (default, 0.85):
        for res in (before, after):
            passing = [q for q in gt if _top(res[q]) is not None and _top(res[q])[1] >= t]  # type: ignore[index]
            cells.append(np.mean([_accepts(_top(res[q]), gt[q], t) for q in passing]) if passing else 1.0)
    print("| precision of passing top hits | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


def _top(ents: list[list[Any]]) -> tuple[str, float] | None:
    return (ents[0][0], float(ents[0][1])) if ents else None


def ingest_cost(
    args: argparse.Namespace, emb: Any, eval_dir: Path, verify: Any, decode: Any, thumb: Any
) -> None:
    """Per image, what ingest does (decode, index embedding, thumbnail) and what verification adds
    (keypoints), timed in turn on the same images; and per search, decode + query embedding."""
    root = eval_dir / "out" / "neardup"
    files = [root / m["file"] for m in json.loads((root / "gallery.json").read_text())][: args.time]
    qfiles = [root / m["file"] for m in json.loads((root / "queries.json").read_text())][: args.time]
    ingest, points, search = [], [], []
    for path in files:
        start = time.perf_counter()
        image = decode(path.read_bytes(), args.min_short)
        emb.embed_images([image])
        thumb(image)
        middle = time.perf_counter()
        verify.keypoints(image)
        points.append(time.perf_counter() - middle)
        ingest.append(middle - start)
    for path in qfiles:
        start = time.perf_counter()
        emb.embed_queries([decode(path.read_bytes(), args.min_short)])
        search.append(time.perf_counter() - start)
    a, b = 1000 * np.median(ingest), 1000 * np.median(points)
    print(
        f"\ningest, {len(files)} dev gallery images one at a time: decode + embed + thumbnail p50 {a:.1f} ms,"
        " "
        f"keypoints p50 {b:.1f} ms (+{100 * b / a:.0f} % time per image: img/s x {a / (a + b):.2f})"
    )
    q = 1000 * np.median(search)
    print(f"search, {len(qfiles)} dev queries: decode + query views embedded p50 {q:.1f} ms")


def report(
    res: dict[str, list[list[Any]]],
    gt: dict[str, list[str]],
    queries: dict[str, dict[str, Any]],
    found: dict[str, dict[str, int]],
    min_inliers: int,
) -> None:
    final: dict[str, dict[str, tuple[str, float] | None]] = {"service": {}, "boost": {}, "boost+demote": {}}
    for qid, ents in res.items():
        checked = found[qid]
        final["service"][qid] = (ents[0][0], ents[0][1]) if ents else None
        for rule in ("boost", "boost+demote"):
            rescored = []
            for gid, s in ents[: max(len(checked), 1)]:
                if checked.get(gid, 0) >= min_inliers:
                    s = max(s, BAND[1])
                elif rule == "boost+demote" and gid in checked and BAND[0] <= s < BAND[1]:
                    s = BAND[0] - 0.01
                rescored.append((gid, s))
            rescored.sort(key=lambda e: -e[1])  # stable: ties keep the service's order
            final[rule][qid] = rescored[0] if rescored else None
    edits = sorted({str(queries[q].get("edit")) for q in gt if gt[q]})
    for t in BAND:
        print(
            f"\n| edit: correct accept at {t}, min inliers {min_inliers} | service | boost | boost + demote |"
        )
        print("|---|---|---|---|")
        rows: dict[str, list[float]] = {}
        for e in [*edits, "all"]:
            qids = [q for q in gt if gt[q] and (e == "all" or str(queries[q].get("edit")) == e)]
            rows[e] = []
            for rule in final:
                ok = [_accepts(final[rule][q], gt[q], t) for q in qids]
                rows[e].append(float(np.mean(ok)))
        for e, v in sorted(rows.items(), key=lambda kv: (kv[0] == "all", kv[1][0])):
            print(f"| {e} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
        none = [q for q in gt if not gt[q]]
        fa = [np.mean([bool(final[r][q]) and final[r][q][1] >= t for q in none]) for r in final]  # type: ignore[index]
        print("| no-match queries passing (lower is better) | " + " | ".join(f"{x:.3f}" for x in fa) + " |")
        # Precision of what passes (= duplicate detection on add at this threshold): right top hit / passing.
        prec = []
        for r in final:
            passing = [q for q in gt if final[r][q] is not None and final[r][q][1] >= t]  # type: ignore[index]
            prec.append(np.mean([_accepts(final[r][q], gt[q], t) for q in passing]) if passing else 1.0)
        print("| precision of passing top hits | " + " | ".join(f"{x:.3f}" for x in prec) + " |")


def _accepts(top: tuple[str, float] | None, relevant: list[str], t: float) -> bool:
    return top is not None and top[0] in relevant and top[1] >= t


if __name__ == "__main__":
    main()
