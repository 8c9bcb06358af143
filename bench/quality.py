"""Retrieval quality of tusou's embedder on the evaluation sets that bench/eval_build.py builds.

    python bench/quality.py [--model lite0] [--eval-dir ~/.cache/tusou-eval] [--build] [--time 50]

Embeds the gallery and the queries of ``neardup``, ``semantic`` and ``semantic_cutouts`` with
``tusou.embed.create_embedder`` (``embed_images`` for the gallery, ``embed_queries`` for queries), searches
the way the service does (a stored vector scores the max cosine over the query's views, mapped to the 0..1
score, ranked by it), writes one results file per set under ``<eval-dir>/results/<model>/`` and prints a
table. Embeddings are cached on disk per (model_id, view/score configuration, file), so a rerun after a
change elsewhere takes seconds.

Calibration (``--calibrate``) is the other job of this script: it embeds every image once per single view
with centring switched off, then rebuilds what the service would compute for any view configuration in
numpy. That is how ``tusou/embed/data/<model>_mean.npy`` and ``<model>_score.json`` were fitted and how the
view choices in ``tusou/embed/views.py`` were compared (docs/score.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

import eval_score  # noqa: E402

from tusou.embed import score as score_mod  # noqa: E402
from tusou.embed import views as views_mod  # noqa: E402

SETS = ("neardup", "semantic", "semantic_cutouts")
TOPK = 100
NEAR_DUP_T = 0.85  # the threshold Qiniu clients commonly send


# --------------------------------------------------------------------------------------------- eval sets


def ensure_sets(eval_dir: Path, build: bool) -> Path:
    """The development half of the evaluation sets under ``<eval-dir>/out``, built by bench/eval_build.py
    (apt-get download of the Debian packages, unpacked in Python) when missing and ``build`` is set."""
    out = eval_dir / "out"
    if all((out / s / "gt.json").is_file() for s in SETS):
        return out
    cmd = [sys.executable, str(ROOT / "bench" / "eval_build.py"), "--eval-dir", str(eval_dir)]
    if not build:
        print("evaluation sets missing under", out, "- build them with --build, or run:", file=sys.stderr)
        print("  " + " ".join(cmd), file=sys.stderr)
        sys.exit(2)
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def load_scorer() -> ModuleType:
    return eval_score


class EvalSet:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / name
        self.gallery = sorted(json.loads((self.dir / "gallery.json").read_text()), key=lambda m: m["id"])
        self.queries = sorted(json.loads((self.dir / "queries.json").read_text()), key=lambda m: m["id"])
        self.gt: dict[str, list[str]] = json.loads((self.dir / "gt.json").read_text())
        loo = self.dir / "gt_loo.json"
        self.gt_loo: dict[str, list[str]] | None = json.loads(loo.read_text()) if loo.is_file() else None

    def path(self, meta: dict[str, Any]) -> Path:
        return self.dir / meta["file"]


# ------------------------------------------------------------------------------------------ embeddings


class Cache:
    """One .npz per (model_id, configuration, set, role): file name -> vector(s). Missing files are added."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(
        self, key: Sequence[str], files: Sequence[str], compute: Callable[[str], np.ndarray]
    ) -> np.ndarray:
        path = self.root.joinpath(*key).with_suffix(".npz")
        have: dict[str, np.ndarray] = {}
        if path.is_file():
            with np.load(path) as z:
                have = {k: z[k] for k in z.files}
        missing = [f for f in files if f not in have]
        if missing:
            t0 = time.perf_counter()
            for i, f in enumerate(missing, 1):
                have[f] = compute(f)
                if i % 200 == 0:
                    print(f"    {'/'.join(key)}: {i}/{len(missing)}", file=sys.stderr)
            dt = time.perf_counter() - t0
            print(
                f"    {'/'.join(key)}: embedded {len(missing)} in {dt:.1f}s "
                f"({1000 * dt / len(missing):.1f} ms each)",
                file=sys.stderr,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **have)
            tmp.replace(path)
        return np.stack([have[f] for f in files])


def config_signature(model_key: str) -> str:
    """Everything besides the weights that changes the stored/query vectors: views and the score data."""
    cal = score_mod.calibration(model_key)
    h = hashlib.sha256()
    h.update(repr((views_mod.INDEX_VIEWS, views_mod.QUERY_VIEWS)).encode())
    if cal.mean is not None:
        h.update(cal.mean.tobytes())
    return h.hexdigest()[:12]


def file_key(s: EvalSet, meta: dict[str, Any]) -> str:
    return f"{s.name}/{meta['file']}"


# ---------------------------------------------------------------------------------------------- search


def search(
    model_key: str, q: np.ndarray, g: np.ndarray, gids: Sequence[str], topk: int = TOPK
) -> list[list[list[Any]]]:
    """q: (n, v, d) query views, g: (m, d) stored vectors -> per query [[gid, score], ...] best first.

    Same rule as the service: a stored vector's cosine is its best over the query's views; rank by it.
    """
    cos = np.einsum("nvd,md->nvm", q, g).max(axis=1)
    sc = score_mod.score_from_cosine(model_key, cos)
    out = []
    for i in range(cos.shape[0]):
        order = np.argsort(-cos[i], kind="stable")[:topk]
        out.append([[gids[j], round(float(sc[i, j]), 6)] for j in order])
    return out


def top_scores(res: dict[str, list[list[Any]]], ids: Iterable[str]) -> np.ndarray:
    return np.array([res[i][0][1] if res.get(i) else -1.0 for i in ids])


# ---------------------------------------------------------------------------------------------- report


def neardup_report(
    scorer: ModuleType, s: EvalSet, res: dict[str, Any], thresholds: Sequence[float]
) -> dict[str, Any]:
    m = scorer.score(str(s.dir), res, thresholds=list(thresholds))
    # Precision of "score >= T means a near-duplicate of the top hit": over every query whose top hit
    # passes T, the share whose top hit is the right image (no-match queries that pass count as wrong).
    # Pair precision: over every (query, gallery) pair with score >= T, the share that are true copies.
    prec: dict[str, Any] = {}
    for t in thresholds:
        acc = ok = pairs = pairs_ok = 0
        for qid, rel in s.gt.items():
            ents = res.get(qid) or []
            if ents and ents[0][1] >= t:
                acc += 1
                ok += ents[0][0] in rel
            for gid, sc in ents:
                if sc >= t:
                    pairs += 1
                    pairs_ok += gid in rel
        prec[str(t)] = {
            "top1_precision": round(ok / acc, 4) if acc else None,
            "pair_precision": round(pairs_ok / pairs, 4) if pairs else None,
            "accepted": acc,
        }
    m["precision"] = prec
    # Per edit: share of its queries whose top hit is right *and* passes T (what a thresholded client sees).
    edit = {q["id"]: q.get("edit") for q in s.queries}
    by: dict[str, dict[str, list[float]]] = {}
    for qid, rel in s.gt.items():
        if not rel:
            continue
        ents = res.get(qid) or []
        for t in thresholds:
            ok = bool(ents) and ents[0][0] in rel and ents[0][1] >= t
            by.setdefault(str(t), {}).setdefault(str(edit[qid]), []).append(float(ok))
    m["accept_by_edit"] = {t: {e: round(float(np.mean(v)), 4) for e, v in d.items()} for t, d in by.items()}
    m["duplicates_on_add"] = {str(t): duplicate_detection(s, res, t) for t in thresholds}
    return m


def duplicate_detection(s: EvalSet, res: dict[str, Any], t: float) -> dict[str, Any]:
    """new/add with params.duplicates at threshold ``t``, on the dev near-dup pairs: each query is a new
    image added to a group holding the gallery; it is reported when its best hit scores >= t (the service
    computes exactly this score: the query views against the stored vectors), with the best hit's id.
    Precision: reports naming a true original / all reports (no-copy queries that are reported count as
    wrong). Recall: copies reported with their original / all queries that have one."""
    reported = right = with_copy = false_on_new = no_copy = 0
    for qid, rel in s.gt.items():
        ents = res.get(qid) or []
        hit = bool(ents) and ents[0][1] >= t
        reported += hit
        right += hit and ents[0][0] in rel
        with_copy += bool(rel)
        no_copy += not rel
        false_on_new += hit and not rel
    return {
        "precision": round(right / reported, 4) if reported else None,
        "recall": round(right / with_copy, 4) if with_copy else None,
        "reported": reported,
        "pairs": with_copy,
        "no_copy_reported": round(false_on_new / no_copy, 4) if no_copy else None,
    }


def cluster_report(model_key: str, s: EvalSet, g: np.ndarray, qi: np.ndarray, t: float) -> dict[str, Any]:
    """``tusou duplicates`` on a group holding the gallery and every query (stored vectors compared with
    stored vectors, as the endpoint does), at threshold ``t``. The truth: a query and its original, and
    copies of the same photo (also of one not in the gallery), are near-duplicates; nothing else is.
    Pair precision: pairs >= t that are true; recall: (query, original) pairs >= t; cluster recall:
    queries put in their original's cluster."""
    from tusou.duplicates import clusters, pair

    ids = [m["id"] for m in s.gallery] + [m["id"] for m in s.queries]
    truth = {m["id"]: m["id"] for m in s.gallery}
    for m in s.queries:  # copies of one photo that is not in the gallery are near-duplicates of each other
        rel = s.gt.get(m["id"])
        truth[m["id"]] = rel[0] if rel else f"{m.get('package')}/{m.get('source', m['id'])}"
    vecs = np.vstack([g, qi]).astype(np.float32)
    cos = vecs @ vecs.T
    np.fill_diagonal(cos, -1.0)
    min_cos = score_mod.cosine_from_score(model_key, t)
    i, j = np.nonzero(np.triu(cos >= min_cos, 1))
    pairs = [pair(ids[a], ids[b], float(cos[a, b])) for a, b in zip(i.tolist(), j.tolist(), strict=True)]
    true_pairs = sum(truth[p.a] == truth[p.b] for p in pairs)
    wanted = {(q, rel[0]) for q, rel in s.gt.items() if rel}
    found = {(p.a, p.b) for p in pairs} | {(p.b, p.a) for p in pairs}
    where = {x: n for n, c in enumerate(clusters(pairs)) for x in c.images}
    together = sum(q in where and where.get(q) == where.get(o) for q, o in wanted)
    return {
        "pair_precision": round(true_pairs / len(pairs), 4) if pairs else None,
        "pair_recall": round(len(wanted & found) / len(wanted), 4),
        "cluster_recall": round(together / len(wanted), 4),
        "pairs": len(pairs),
    }


def fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(model: str, dt: float, nd: dict[str, Any], sem: dict[str, dict[str, Any]]) -> None:
    t_def = str(nd["default_threshold"])
    t85 = str(NEAR_DUP_T)
    rows = [
        ("neardup recall@1", nd["recall@1"]),
        ("neardup recall@5", nd["recall@5"]),
        ("neardup recall@10", nd["recall@10"]),
        ("neardup mAP", nd["mAP"]),
        ("neardup micro_AP", nd.get("micro_AP")),
        (f"no-match top score >= default {t_def}", nd["threshold"][t_def]["no_match_top_score>=T"]),
        (f"correct accept @ default {t_def}", nd["threshold"][t_def]["match_top1_correct_score>=T"]),
        (f"top-1 precision @ default {t_def}", nd["precision"][t_def]["top1_precision"]),
        (f"no-match top score >= {t85}", nd["threshold"][t85]["no_match_top_score>=T"]),
        (f"correct accept @ {t85}", nd["threshold"][t85]["match_top1_correct_score>=T"]),
        (f"top-1 precision @ {t85}", nd["precision"][t85]["top1_precision"]),
    ]
    for name, m in sem.items():
        rows.append((f"{name} mAP", m["mAP"]))
        rows.append((f"{name} recall@1", m["recall@1"]))
    print(
        f"\n## {model}  (views: index {list(views_mod.INDEX_VIEWS)}, query {list(views_mod.QUERY_VIEWS)}, "
        f"default threshold {t_def}; {dt:.0f}s)\n"
    )
    print("| metric | value |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {fmt(v)} |")
    acc = nd["accept_by_edit"]
    # recall@1 ranks only; "at T" also needs the top hit to score >= T, which is what an API client sees.
    print(f"\n| edit | recall@1 (rank only) | recall@1 at default {t_def} | recall@1 at {t85} |")
    print("|---|---|---|---|")
    for e, v in sorted(nd["recall@1_by_edit"].items(), key=lambda kv: (kv[1], acc[t_def][kv[0]])):
        print(f"| {e} | {v:.3f} | {acc[t_def][e]:.3f} | {acc[t85][e]:.3f} |")
    dup = nd["duplicates_on_add"]
    print("\nDuplicate detection on add (params.duplicates; each dev near-dup query added to the gallery)\n")
    print("| duplicate_threshold | precision | recall | reported | no-copy queries reported |")
    print("|---|---|---|---|---|")
    for t, d in dup.items():
        cells = [d["precision"], d["recall"], d["reported"], d["no_copy_reported"]]
        print(f"| {t} | " + " | ".join(fmt(c) for c in cells) + " |")
    if "clusters" in nd:
        print("\ntusou duplicates (gallery + every query in one group; stored vectors against each other)\n")
        print("| threshold | pair precision | pair recall (query, original) | cluster recall | pairs |")
        print("|---|---|---|---|---|")
        for t, d in nd["clusters"].items():
            cells = [d["pair_precision"], d["pair_recall"], d["cluster_recall"], d["pairs"]]
            print(f"| {t} | " + " | ".join(fmt(c) for c in cells) + " |")
    print()


# --------------------------------------------------------------------------------------- service path


def bench_embedder(args: argparse.Namespace) -> Any:
    """The embedder the command line names (model, precision, input size), as the service would build it."""
    from tusou.config import Settings
    from tusou.embed import create_embedder

    settings = Settings(
        data=args.data,
        model=args.model,
        threads=args.threads,
        model_precision=args.precision,
        model_input_size=args.input_size,
    )
    return create_embedder(settings)


def run_service(args: argparse.Namespace, root: Path) -> None:
    emb = bench_embedder(args)
    key = emb.model_key  # with its variant (int8, input size): the score map it uses
    sig = config_signature(key)
    cache = Cache(args.eval_dir / "emb")
    scorer = load_scorer()
    suffix = ("" if args.precision == "fp32" else f"-{args.precision}") + (
        f"-{args.input_size}px" if args.input_size else ""
    )
    out_dir = args.eval_dir / "results" / (args.model + suffix)
    out_dir.mkdir(parents=True, exist_ok=True)
    thr = emb.default_threshold
    t0 = time.perf_counter()
    sem: dict[str, dict[str, Any]] = {}
    nd: dict[str, Any] = {}
    words: list[dict[str, Any]] = []
    for name in args.sets:
        s = EvalSet(root, name)
        gfiles = [file_key(s, m) for m in s.gallery]
        gids = [m["id"] for m in s.gallery]
        gpath = {file_key(s, m): s.path(m) for m in s.gallery + s.queries}

        # Decoded the way the service decodes uploads (reduced-scale JPEG decode, EXIF orientation).
        def index_vec(f: str, gpath: dict[str, Path] = gpath) -> np.ndarray:
            return emb.embed_images([emb.open_image(gpath[f].read_bytes())])[0]

        def query_vec(f: str, gpath: dict[str, Path] = gpath) -> np.ndarray:
            return emb.embed_queries([emb.open_image(gpath[f].read_bytes())])[0]

        g = cache.get((emb.model_id, sig, name, "index"), gfiles, index_vec)
        qfiles = [file_key(s, m) for m in s.queries]
        q = cache.get((emb.model_id, sig, name, "query"), qfiles, query_vec)
        res = dict(zip([m["id"] for m in s.queries], search(key, q, g, gids), strict=True))
        (out_dir / f"{name}.json").write_text(json.dumps(res))
        if name == "neardup":
            nd = neardup_report(scorer, s, res, [thr, NEAR_DUP_T])
            nd["default_threshold"] = thr
            if args.clusters:
                # tusou duplicates compares stored vectors: the queries' index vectors too.
                qi = cache.get((emb.model_id, sig, name, "query-index"), qfiles, index_vec)
                nd["clusters"] = {str(t): cluster_report(key, s, g, qi, t) for t in (thr, NEAR_DUP_T)}
            (out_dir / "neardup.metrics.json").write_text(json.dumps(nd, indent=1))
        else:
            sem[name] = scorer.score(str(s.dir), res)
            if s.gt_loo is not None:
                # Leave-one-out: every gallery image queried (with its query views) against the rest.
                ql = cache.get((emb.model_id, sig, name, "query"), gfiles, query_vec)
                res_loo = dict(zip(gids, search(key, ql, g, gids), strict=True))
                (out_dir / f"{name}.loo.json").write_text(json.dumps(res_loo))
                sem[name + " (gt_loo)"] = scorer.score(str(s.dir), res_loo, gt_name="gt_loo.json")
            words += keyword_report(emb, cache, s, gpath)
    if nd:
        print_table(f"{args.model} ({emb.model_id})", time.perf_counter() - t0, nd, sem)
    if words:
        print_words(words, sem)
        (out_dir / "keywords.json").write_text(json.dumps(words, ensure_ascii=False, indent=1))
    print(f"results: {out_dir}")
    if args.time:
        time_queries(emb, key, root, args.time)


# ------------------------------------------------------------------------------------- keyword search

#: Class words per semantic set: (English, Chinese, the set labels that are relevant). "animal" covers
#: the fish, mammal and bird photos too (they are animals). Rows marked False are reported, not targets:
#: ImageNet-1k has no class below these concepts for most of their photos (2 flowers, no monuments).
WORDS: dict[str, list[tuple[str, str, frozenset[str], bool]]] = {
    "semantic": [
        ("animal", "动物", frozenset({"animal", "fish"}), True),
        ("fish", "鱼", frozenset({"fish"}), True),
        ("hand tool", "手工具", frozenset({"hand_tool"}), True),
        ("monument", "纪念碑", frozenset({"monument"}), False),
    ],
    "semantic_cutouts": [
        ("animal", "动物", frozenset({"mammal", "bird"}), True),
        ("mammal", "哺乳动物", frozenset({"mammal"}), True),
        ("bird", "鸟", frozenset({"bird"}), True),
        ("flower", "花", frozenset({"flower"}), False),
    ],
}
TOP = 10


def keyword_report(emb: Any, cache: Cache, s: EvalSet, gpath: dict[str, Path]) -> list[dict[str, Any]]:
    """Keyword search as the service runs it, on every photo of a semantic set (gallery + queries): the
    stored tags (top classes, tusou.embed.concepts.tags), evidence = summed probability over the word's
    classes, ranked best first (ties in set order), the default threshold applied. Precision@10 divides by
    10; AP is over the whole ranked answer (images below the threshold are not returned, so they count as
    misses)."""
    from tusou.embed import concepts

    table = concepts.load()
    metas = s.gallery + s.queries
    files = [file_key(s, m) for m in metas]

    def probs(f: str) -> np.ndarray:
        _, p = emb.embed_images_tagged([emb.open_image(gpath[f].read_bytes())])
        return p[0]

    tags = [table.tags(p) for p in cache.get((emb.model_id, "probs", s.name), files, probs)]
    labels = [m["label"] for m in metas]
    rows = []
    for en, zh, relevant, target in WORDS.get(s.name, []):
        for lang, word in (("en", en), ("zh", zh)):
            classes = table.resolve(word)
            ev = np.array([concepts.evidence(t, classes) for t in tags])
            order = [i for i in np.argsort(-ev, kind="stable") if ev[i] >= concepts.TEXT_THRESHOLD]
            rel = [labels[i] in relevant for i in order]
            n_rel = sum(lab in relevant for lab in labels)
            hits, ap = 0, 0.0
            for rank, ok in enumerate(rel, 1):
                if ok:
                    hits += 1
                    ap += hits / rank
            rows.append(
                {
                    "set": s.name,
                    "word": word,
                    "lang": lang,
                    "target": target,
                    "classes": len(classes),
                    "relevant": n_rel,
                    "returned": len(order),
                    "p@10": sum(rel[:TOP]) / TOP,
                    "AP": ap / n_rel if n_rel else 0.0,
                }
            )
    return rows


def print_words(rows: list[dict[str, Any]], sem: dict[str, dict[str, Any]]) -> None:
    from tusou.embed import concepts

    print(f"\n## keyword search (data.text), default threshold {concepts.TEXT_THRESHOLD}\n")
    print("| set | word | lang | ImageNet classes | relevant photos | returned | precision@10 | AP |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mark = "" if r["target"] else " (not a target)"
        print(
            f"| {r['set']} | {r['word']}{mark} | {r['lang']} | {r['classes']} | {r['relevant']} | "
            f"{r['returned']} | {r['p@10']:.2f} | {r['AP']:.3f} |"
        )
    print(
        "\n| set | image-query mAP (gt / gt_loo) | text-query mAP en | text-query mAP zh | min p@10 en / zh |"
    )
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(r["set"] for r in rows):
        t = [r for r in rows if r["set"] == name and r["target"]]
        en = [r for r in t if r["lang"] == "en"]
        zh = [r for r in t if r["lang"] == "zh"]
        img = (
            sem.get(name, {}).get("mAP", float("nan")),
            sem.get(name + " (gt_loo)", {}).get("mAP", float("nan")),
        )
        print(
            f"| {name} | {img[0]:.3f} / {img[1]:.3f} | {np.mean([r['AP'] for r in en]):.3f} | "
            f"{np.mean([r['AP'] for r in zh]):.3f} | {min(r['p@10'] for r in en):.2f} / "
            f"{min(r['p@10'] for r in zh):.2f} |"
        )
    print()


def time_queries(emb: Any, key: str, root: Path, n: int) -> None:
    """End-to-end query cost as the service pays it: decode, views, embed, search a 513-image gallery."""
    s = EvalSet(root, "neardup")
    g = np.stack([emb.embed_images([emb.open_image(s.path(m).read_bytes())])[0] for m in s.gallery[:64]])
    g = np.tile(g, (8, 1))[: len(s.gallery)]
    data = [s.path(m).read_bytes() for m in s.queries[:n]]
    emb.embed_queries([emb.open_image(data[0])])  # warm-up
    t0 = time.perf_counter()
    for b in data:
        q = emb.embed_queries([emb.open_image(b)])
        search(key, q, g, [str(i) for i in range(len(g))], topk=10)
    qt = (time.perf_counter() - t0) / n
    gdata = [s.path(m).read_bytes() for m in s.gallery[:n]]
    t0 = time.perf_counter()
    for b in gdata:
        emb.embed_images([emb.open_image(b)])
    it = (time.perf_counter() - t0) / n
    print(
        f"timing ({n} images, threads={os.cpu_count()}): query end-to-end {1000 * qt:.1f} ms "
        f"({len(views_mod.QUERY_VIEWS)} views), index {1000 * it:.1f} ms/image "
        f"({len(views_mod.INDEX_VIEWS)} views)"
    )


# --------------------------------------------------------------------------------------- calibration

#: Candidate configurations: (name, index views, query views).
R4 = ("id", "r90", "r180", "r270")
CANDIDATES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("plain", ("id",), ("id",)),
    ("idx-mirror", ("id", "hflip"), ("id",)),
    ("idx-low64", ("id", "low64"), ("id",)),
    ("q-mirror", ("id",), ("id", "hflip")),
    ("q-rot4", ("id",), R4),
    ("q-rot4+mirror (5 views)", ("id",), (*R4, "hflip")),
    ("idx-mirror + q-rot4", ("id", "hflip"), R4),
    ("idx-low64 + q-rot4", ("id", "low64"), R4),
    ("idx-mirror+low64 + q-rot4", ("id", "hflip", "low64"), R4),
]


def make_raw_fn(
    args: argparse.Namespace,
) -> tuple[str, Callable[[Image.Image], np.ndarray], Callable[[Path], Image.Image]]:
    """(model_id, image -> raw feature of exactly that image, path -> decoded image), from the embedder."""
    emb = bench_embedder(args)
    args.model_key = emb.model_key  # with its variant (int8, input size): the score map it is fitted for
    # Raw features depend on the weights and graph only, not on post-processing: key their cache by the
    # model part of the identity (before "/v<vector space>"), so a new mean or projection reuses them.
    base_id = emb.model_id.split("/")[0]
    return base_id, lambda img: emb.features([img])[0], lambda p: emb.open_image(p.read_bytes())


class RawFeatures:
    """Uncentred per-view features of every image of the sets, cached on disk."""

    def __init__(
        self,
        model_id: str,
        raw: Callable[[Image.Image], np.ndarray],
        opener: Callable[[Path], Image.Image],
        cache: Cache,
    ) -> None:
        self.model_id, self.raw, self.opener, self.cache = model_id, raw, opener, cache

    def get(self, s: EvalSet, metas: Sequence[dict[str, Any]], view: str) -> np.ndarray:
        """(n, d) raw features of ``view`` of each image."""
        files = [file_key(s, m) for m in metas]
        paths = {file_key(s, m): s.path(m) for m in metas}

        def compute(f: str) -> np.ndarray:
            return self.raw(views_mod.VIEWS[view](self.opener(paths[f])))

        return self.cache.get((self.model_id, "raw", view, s.name), files, compute)


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


#: Exponent of the power normalisation being evaluated (``--power``); score.postprocess reads it from json.
POWER = [0.5]


def powered(f: np.ndarray) -> np.ndarray:
    return np.power(np.maximum(f, 0.0), POWER[0]) if POWER[0] != 1.0 else f


#: A projection being evaluated: (matrix (D, d), bias (d,)), applied as score.project does.
Projection = tuple[np.ndarray, np.ndarray]


def centre(f: np.ndarray, mean: np.ndarray | None, proj: Projection | None = None) -> np.ndarray:
    """score.postprocess with a given mean and projection: power, L2, minus mean, L2 (no mean: plain L2),
    then with ``proj`` = (P, b): times P, plus b, L2."""
    if mean is None:
        return l2(f)
    x = l2(l2(powered(f)) - mean)
    return x if proj is None else l2(x @ proj[0] + proj[1])


def vectors(
    rf: RawFeatures,
    s: EvalSet,
    metas: Sequence[dict[str, Any]],
    names: Sequence[str],
    mean: np.ndarray | None,
    average: bool,
    proj: Projection | None = None,
) -> np.ndarray:
    """What the embedder computes: index views' raw features averaged, then post-processed -> (n, d);
    query views post-processed one by one and stacked -> (n, v, d)."""
    per_view = [rf.get(s, metas, v) for v in names]
    if average:
        return centre(np.mean(per_view, axis=0), mean, proj)
    return np.stack([centre(f, mean, proj) for f in per_view], axis=1)


def max_cos(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.einsum("nvd,md->nvm", q, g).max(axis=1)


def ranked(cos: np.ndarray, gids: Sequence[str], topk: int = TOPK) -> list[list[list[Any]]]:
    out = []
    for i in range(cos.shape[0]):
        order = np.argsort(-cos[i], kind="stable")[:topk]
        out.append([[gids[j], float(cos[i, j])] for j in order])
    return out


def fit_mean(rf: RawFeatures, sets: dict[str, EvalSet]) -> np.ndarray:
    """Mean of a generic photo collection: neardup distractors + both semantic galleries, each image with
    its mirror (so the mean itself is mirror-symmetric). L2-normed features, as postprocess centres them."""
    parts = []
    for name, s in sets.items():
        metas = [m for m in s.gallery if name != "neardup" or m["role"] == "distractor"]
        for v in ("id", "hflip"):
            parts.append(rf.get(s, metas, v))
    return l2(powered(np.concatenate(parts))).mean(axis=0).astype(np.float32)


def evaluate(
    rf: RawFeatures,
    sets: dict[str, EvalSet],
    scorer: ModuleType,
    iv: Sequence[str],
    qv: Sequence[str],
    mean: np.ndarray | None,
    proj: Projection | None = None,
) -> dict[str, Any]:
    """Metrics and the cosine samples the score map is fitted on, for one view configuration (and,
    with ``proj``, a projection after the centring)."""
    out: dict[str, Any] = {}
    for name, s in sets.items():
        gids = [m["id"] for m in s.gallery]
        g = vectors(rf, s, s.gallery, iv, mean, True, proj)
        q = vectors(rf, s, s.queries, qv, mean, False, proj)
        cos = max_cos(q, g)
        res = dict(zip([m["id"] for m in s.queries], ranked(cos, gids), strict=True))
        out[name] = scorer.score(str(s.dir), res)
        if name == "neardup":
            col = {gid: j for j, gid in enumerate(gids)}
            rel = np.zeros_like(cos, dtype=bool)
            for i, m in enumerate(s.queries):
                for gid in s.gt[m["id"]]:
                    rel[i, col[gid]] = True
            has = rel.any(axis=1)
            out["cos"] = {
                "match": cos[rel],  # query vs its original
                "nomatch_top": cos[~has].max(axis=1),
                "impostor_top": np.where(rel, -2.0, cos).max(axis=1),  # best wrong image, every query
                "unrelated": cos[~rel],
                # per query with a match: is its top hit right, and the top cosine
                "top1_ok": rel[has][np.arange(has.sum()), cos[has].argmax(axis=1)],
                "top1_cos": cos[has].max(axis=1),
                "edit": np.array([str(m.get("edit")) for m in s.queries])[has],
                # an exact copy of a stored image queried as is (below 1 when index views are averaged)
                "identical": np.sum(vectors(rf, s, s.gallery, ("id",), mean, True, proj) * g, axis=1),
            }
        elif s.gt_loo is not None:
            ql = vectors(rf, s, s.gallery, qv, mean, False, proj)
            cl = max_cos(ql, g)
            np.fill_diagonal(cl, -2.0)
            res_loo = dict(zip(gids, ranked(cl, gids), strict=True))
            out[name + " (gt_loo)"] = scorer.score(str(s.dir), res_loo, gt_name="gt_loo.json")
            labels = np.array([m["label"] for m in s.gallery])
            same = labels[:, None] == labels[None, :]
            off = ~np.eye(len(gids), dtype=bool)
            out.setdefault("cos_sem", {"same": [], "diff": []})
            out["cos_sem"]["same"].append(cl[same & off])
            out["cos_sem"]["diff"].append(cl[~same])
    return out


#: Quantile of the best wrong image's cosine (every neardup query) that the default threshold is put at.
#: 0.96 until 2026-12-06; the 384-d projection then let 0.06 of the no-match queries through (0.03
#: before it), and 0.965 brings that back for ~0.002 of correct accepts (docs/score.md).
DEFAULT_QUANTILE = 0.965


def fit_score_map(c: dict[str, Any], t_default: float) -> dict[str, Any]:
    """Knots of the piecewise-linear cosine -> score map (see docs/score.md for the reasoning).

    - median unrelated pair -> 0.05, 99th percentile of unrelated pairs -> 0.30: unrelated photos land low;
    - the default threshold's cosine: the :data:`DEFAULT_QUANTILE` (96.5th percentile) of the best *wrong*
      image of every neardup query (1300 samples: the 100 no-match queries and the best impostor of the
      1200 others), so that about 3.5 % of no-match queries pass it -> ``t_default``;
    - 0.85: the largest best-wrong-image cosine seen (the 99.9th percentile), so a client threshold of 0.85
      admits (almost) no impostor at all;
    - 0.98: the median cosine of an exact copy of a stored image, so "the same image" typically reads as
      ~0.98 although averaging the index views keeps its cosine below 1;
    - cosine 1 -> 1.
    """
    imp = c["impostor_top"]
    c_lo = float(np.quantile(c["unrelated"], 0.5))
    c_u = float(np.quantile(c["unrelated"], 0.99))
    c_def = float(np.quantile(imp, DEFAULT_QUANTILE))
    c_85 = float(np.quantile(imp, 0.999))
    c_same = float(np.quantile(c["identical"], 0.5))
    # Keep the map strictly increasing even if exact copies sit close to the 0.85 cut.
    c_same = max(c_same, c_85 + 0.5 * (1.0 - c_85) * 0.5)
    cos_knots = [-1.0, c_lo, c_u, c_def, c_85, c_same, 1.0]
    score_knots = [0.0, 0.05, 0.30, t_default, 0.85, 0.98, 1.0]
    if np.any(np.diff(cos_knots) <= 0):
        raise SystemExit(f"knots not increasing: {cos_knots}")
    r = lambda v: round(v, 4)  # noqa: E731
    return {
        "cos_knots": [r(v) for v in cos_knots],
        "score_knots": score_knots,
        "default_threshold": t_default,
    }


def summarise(name: str, m: dict[str, Any]) -> str:
    nd = m["neardup"]
    by = nd["recall@1_by_edit"]
    weak = sorted(by.items(), key=lambda kv: kv[1])[:5]
    sem = m["semantic"]["mAP"], m["semantic_cutouts"]["mAP"]
    c = m["cos"]
    # Correct accepts at the cosine that ~3.5 % of the best wrong images reach (how the default is fitted).
    c_def = float(np.quantile(c["impostor_top"], DEFAULT_QUANTILE))
    ca = float(np.mean(c["top1_ok"] & (c["top1_cos"] >= c_def)))
    nm = float(np.mean(c["nomatch_top"] >= c_def))
    loo = m["semantic (gt_loo)"]["mAP"], m["semantic_cutouts (gt_loo)"]["mAP"]
    return (
        f"| {name} | {nd['recall@1']:.3f} | {nd['mAP']:.3f} | {min(by.values()):.3f} | "
        + ", ".join(f"{e} {v:.2f}" for e, v in weak)
        + f" | {sem[0]:.3f} / {sem[1]:.3f} | {loo[0]:.3f} / {loo[1]:.3f} | {ca:.3f} ({nm:.2f}) |"
    )


def run_calibrate(args: argparse.Namespace, root: Path) -> None:
    model_id, raw, opener = make_raw_fn(args)
    rf = RawFeatures(model_id, raw, opener, Cache(args.eval_dir / "emb"))
    sets = {n: EvalSet(root, n) for n in SETS}
    scorer = load_scorer()
    print(f"\n## view configurations, {args.model} ({model_id}); power {POWER[0]}, centred\n")
    print(
        "| config | R@1 | mAP | worst edit | 5 weakest edits | semantic mAP (sem / cutouts) | gt_loo mAP "
        "| correct accept at 3.5 % impostors (no-match share) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    cal = score_mod.calibration(args.model)
    # A variant of the model (int8, another input size) keeps the family's mean and projection (they are
    # part of every stored vector's space); only its score map is fitted, and written under "variants".
    variant = score_mod.variant(args.model_key)
    mean = fit_mean(rf, sets) if not variant or cal.mean is None else cal.mean
    # The shipped projection (tools/make_projection.py) was fitted on vectors centred with the shipped
    # mean; it is applied wherever that mean is, so the map below is fitted for the vectors served.
    proj = None if cal.projection is None or cal.bias is None else (cal.projection, cal.bias)
    if proj is not None and (cal.mean is None or not np.allclose(cal.mean, mean, atol=1e-3)):
        sys.exit("the refitted mean differs from the shipped one: refit the projection (make_projection.py)")
    if proj is not None and cal.mean is not None:
        # Same mean up to float rounding (features computed another day differ in the last bits): keep the
        # shipped one, bit for bit. Its bytes are part of every folder's vector-space identity, so a
        # rewritten file would make every data folder refuse to start.
        mean = cal.mean
    if proj is not None:
        print(f"(projected to {cal.dim} dimensions with tusou/embed/data/{args.model}_projection.npy)\n")
    for name, iv, qv in CANDIDATES:
        if (args.configs or variant) and name not in args.configs:
            continue
        print(summarise(name, evaluate(rf, sets, scorer, iv, qv, mean, proj)), flush=True)
    chosen = views_mod.INDEX_VIEWS, views_mod.QUERY_VIEWS
    if not variant:
        print(summarise("plain, uncentred", evaluate(rf, sets, scorer, ("id",), ("id",), None)))
    if POWER[0] != 1.0 and not variant:
        p, POWER[0] = POWER[0], 1.0
        print(summarise("chosen views, no power", evaluate(rf, sets, scorer, *chosen, fit_mean(rf, sets))))
        POWER[0] = p

    iv, qv = views_mod.INDEX_VIEWS, views_mod.QUERY_VIEWS
    m = evaluate(rf, sets, scorer, iv, qv, mean, proj)
    print(summarise("chosen (views.py)", m))
    c = m["cos"]
    params = fit_score_map(c, args.default_threshold)
    q = lambda a, p: float(np.quantile(a, p))  # noqa: E731
    sem_same = np.concatenate(m["cos_sem"]["same"])
    sem_diff = np.concatenate(m["cos_sem"]["diff"])
    print(f"\n## cosine samples for views in tusou/embed/views.py (index {iv}, query {qv})\n")
    print("| sample | n | p1 | p5 | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|---|---|")
    for label, a in [
        ("exact copy of a stored image", c["identical"]),
        ("near-dup pair (query, its original)", c["match"]),
        ("best wrong image, no-match queries", c["nomatch_top"]),
        ("best wrong image, all queries", c["impostor_top"]),
        ("unrelated pair (neardup)", c["unrelated"]),
        ("same class (semantic gt_loo)", sem_same),
        ("different class (semantic gt_loo)", sem_diff),
    ]:
        print(
            f"| {label} | {a.size} | "
            + " | ".join(f"{q(a, p):.3f}" for p in (0.01, 0.05, 0.5, 0.95, 0.99))
            + f" | {a.max():.3f} |"
        )
    print("\nfitted:", json.dumps(params))
    if args.write and variant:
        path = ROOT / "tusou" / "embed" / "data" / f"{args.model}_score.json"
        meta = json.loads(path.read_text())
        flags = (" --precision int8" if args.precision != "fp32" else "") + (
            f" --input-size {args.input_size}" if args.input_size else ""
        )
        meta.setdefault("variants", {})[variant] = {
            **params,
            "model_id": model_id,
            "fitted_by": f"python bench/quality.py --model {args.model}{flags} --calibrate --write",
        }
        path.write_text(json.dumps(meta, indent=1) + "\n")
        print(f"wrote the {variant} score map into", path)
    elif args.write:
        data = ROOT / "tusou" / "embed" / "data"
        data.mkdir(exist_ok=True)
        if proj is None:  # with a projection the mean is the one it was fitted on (kept above)
            np.save(data / f"{args.model}_mean.npy", mean.astype(np.float16))
        old = data / f"{args.model}_score.json"
        meta = {
            **params,
            "power": POWER[0],
            "model_id": model_id,
            "views": {"index": list(iv), "query": list(qv)},
            "fitted_by": f"python bench/quality.py --model {args.model} --calibrate --write",
        }
        if proj is not None:  # keep the record of how the projection was fitted
            meta["projection"] = json.loads(old.read_text()).get("projection")
        if old.is_file() and "variants" in json.loads(old.read_text()):  # fitted on this mean: refit them
            meta["variants"] = json.loads(old.read_text())["variants"]
        (data / f"{args.model}_score.json").write_text(json.dumps(meta, indent=1) + "\n")
        written = [data / f"{args.model}_mean.npy"] if proj is None else []
        print("wrote", *written, data / f"{args.model}_score.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite0")
    ap.add_argument("--eval-dir", type=Path, default=Path("~/.cache/tusou-eval").expanduser())
    ap.add_argument(
        "--build", action="store_true", help="fetch (apt-get download) and build the sets if missing"
    )
    ap.add_argument("--data", type=Path, default=None, help="tusou data folder (model cache)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="TUSOU_MODEL_PRECISION")
    ap.add_argument(
        "--input-size", type=int, default=None, help="TUSOU_MODEL_INPUT_SIZE (default: the model's own)"
    )
    ap.add_argument("--time", type=int, default=0, metavar="N", help="also time N queries end to end")
    ap.add_argument(
        "--sets",
        default=",".join(SETS),
        help="comma-separated sets to run (keyword search: the semantic ones)",
    )
    ap.add_argument(
        "--clusters", action="store_true", help="also evaluate tusou duplicates on neardup (slower)"
    )
    ap.add_argument("--calibrate", action="store_true", help="fit mean/score data and compare views")
    ap.add_argument("--write", action="store_true", help="with --calibrate: write tusou/embed/data files")
    ap.add_argument("--configs", nargs="*", default=[], help="with --calibrate: only these candidates")
    ap.add_argument("--default-threshold", type=float, default=0.7, help="with --calibrate: its score")
    ap.add_argument("--power", type=float, default=0.5, help="with --calibrate: power normalisation")
    args = ap.parse_args()
    args.eval_dir = args.eval_dir.expanduser()
    args.sets = [s for s in args.sets.split(",") if s]
    if args.data is None:
        args.data = args.eval_dir / "tusou-data"
    root = ensure_sets(args.eval_dir, args.build)
    if args.calibrate:
        POWER[0] = args.power
        run_calibrate(args, root)
    else:
        run_service(args, root)


if __name__ == "__main__":
    main()
