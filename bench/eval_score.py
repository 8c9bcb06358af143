#!/usr/bin/env python3
"""Score a retrieval run against a set made by bench/eval_build.py, or run a tiny baseline.

  python bench/eval_score.py score SETDIR RESULTS.json [--threshold T ...] [--gt gt_loo.json]
  python bench/eval_score.py baseline SETDIR [--out RESULTS.json] [--threshold T ...] [--gt gt_loo.json]

RESULTS.json is one JSON object: query id -> ranked list, best match first.
  {"q00001": [["g00042", 0.93], ["g00007", 0.41], ...], "q00002": [], ...}
Each entry is [gallery_id, score] (score: a number, higher = more similar, e.g. 0..1),
or a bare gallery id string when the system has no scores:
  {"q00001": ["g00042", "g00007", ...], ...}
The list order is the ranking (it is not re-sorted by score). Return at least 10
entries per query for recall@10, and more for a fair mAP on the semantic sets (the
scorer divides by the number of relevant gallery images). An empty list or a missing
query id means "no result" for that query. With --gt gt_loo.json (semantic sets) the
query ids are gallery ids and a query's own id is ignored in its list.

Printed metrics (JSON):
  recall@1/5/10, mAP        over the queries that have at least one relevant gallery image
  recall@1_by_edit          neardup: recall@1 for each edit type
  recall@1_by_class         semantic sets: recall@1 for each class
  micro_AP                  (scores needed) AP over all (query, gallery id, score) pairs pooled
                            and sorted by score, so confident answers to queries that have no
                            match count as errors (DISC21-style)
  threshold T (scores needed; --threshold, may be repeated):
    no_match_top_score>=T   share of queries with an empty ground truth whose first entry
                            has score >= T (false accepts at T)
    match_top1_correct_score>=T  share of queries with a match whose first entry is relevant
                            and has score >= T (correct accepts at T)
  check                     ids in RESULTS.json that are not in the set, missing queries,
                            rankings whose scores are not in descending order
"""

import argparse
import json
import os
import sys


def load(setdir, gt_name="gt.json"):
    gt = json.load(open(os.path.join(setdir, gt_name)))
    q = {m["id"]: m for m in json.load(open(os.path.join(setdir, "queries.json")))}
    g = {m["id"]: m for m in json.load(open(os.path.join(setdir, "gallery.json")))}
    return gt, q, g


def _entries(ranked):
    """-> list of (gallery_id, score or None), first occurrence of each id kept"""
    out, seen = [], set()
    for r in ranked or []:
        if isinstance(r, (list, tuple)):
            gid, s = r[0], (float(r[1]) if len(r) > 1 and r[1] is not None else None)
        else:
            gid, s = r, None
        if gid not in seen:
            seen.add(gid)
            out.append((gid, s))
    return out


def score(setdir, results, ks=(1, 5, 10), thresholds=(), gt_name="gt.json"):
    gt, qmeta, gmeta = load(setdir, gt_name)
    loo = not set(gt) <= set(qmeta)  # leave-one-out protocol: query ids are gallery ids
    meta = gmeta if loo else qmeta
    rec = {k: [] for k in ks}
    aps, per_key, pairs = [], {}, []
    top_nomatch, top_match = [], []  # (score, is relevant) of each query's first entry, None if empty
    n_pos = 0
    has_scores = True
    unsorted = missing = 0
    for qid, rel in gt.items():
        if qid not in results:
            missing += 1
        ents = [e for e in _entries(results.get(qid)) if not (loo and e[0] == qid)]
        if any(s is None for _, s in ents):
            has_scores = False
        sc = [s for _, s in ents if s is not None]
        if any(b > a for a, b in zip(sc, sc[1:], strict=False)):
            unsorted += 1
        ids = [gid for gid, _ in ents]
        pairs += [(s, gid in rel) for gid, s in ents if s is not None]
        n_pos += len(rel)
        first = ents[0] if ents else None  # (gallery id, score)
        if not rel:
            top_nomatch.append((first[1], False) if first else None)
            continue
        rel = set(rel)
        top_match.append((first[1], first[0] in rel) if first else None)
        for k in ks:
            rec[k].append(1.0 if rel & set(ids[:k]) else 0.0)
        hits, ap = 0, 0.0
        for i, gid in enumerate(ids, 1):
            if gid in rel:
                hits += 1
                ap += hits / i
        aps.append(ap / len(rel))
        m = meta.get(qid, {})
        key = m.get("edit") or m.get("label")
        per_key.setdefault(key, []).append(1.0 if rel & set(ids[:1]) else 0.0)
    out = {"queries": len(gt), "queries_scored": len(aps), "queries_without_match": len(top_nomatch)}
    for k in ks:
        out[f"recall@{k}"] = round(sum(rec[k]) / max(1, len(rec[k])), 4)
    out["mAP"] = round(sum(aps) / max(1, len(aps)), 4)
    if pairs and has_scores:
        pairs.sort(key=lambda p: -p[0])
        tp, ap, prev_r = 0, 0.0, 0.0
        for i, (_, ok) in enumerate(pairs, 1):
            if ok:
                tp += 1
                r = tp / n_pos
                ap += (r - prev_r) * (tp / i)
                prev_r = r
        out["micro_AP"] = round(ap, 4)
    by = "edit" if any("edit" in m for m in meta.values()) else "class"
    out["recall@1_by_" + by] = {
        k: round(sum(v) / len(v), 4) for k, v in sorted(per_key.items(), key=lambda kv: str(kv[0]))
    }
    if thresholds:
        th = {}
        for t in thresholds:
            d = {}
            if has_scores:
                if top_nomatch:
                    d["no_match_top_score>=T"] = round(
                        sum(1 for e in top_nomatch if e and e[0] >= t) / len(top_nomatch), 4
                    )
                if top_match:
                    d["match_top1_correct_score>=T"] = round(
                        sum(1 for e in top_match if e and e[1] and e[0] >= t) / len(top_match), 4
                    )
            else:
                d["error"] = "results carry no scores"
            th[str(t)] = d
        out["threshold"] = th
    unknown_q = sorted(set(results) - set(gt))
    unknown_g = sorted({gid for r in results.values() for gid, _ in _entries(r)} - set(gmeta))
    out["check"] = {
        "missing_queries": missing,
        "unknown_query_ids": len(unknown_q),
        "unknown_gallery_ids": len(unknown_g),
        "rankings_not_sorted_by_score": unsorted,
    }
    return out


def baseline(setdir, topk=100, loo=False):
    import numpy as np
    from PIL import Image

    _, qmeta, gmeta = load(setdir)

    def desc(path):
        im = Image.open(path)
        im.draft("RGB", (128, 128))
        im = im.convert("RGB")
        g = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel()
        g -= g.mean()
        g /= np.linalg.norm(g) + 1e-6
        h = np.asarray(im.resize((64, 64), Image.BILINEAR), dtype=np.int32) // 64
        hist = np.bincount((h[..., 0] * 16 + h[..., 1] * 4 + h[..., 2]).ravel(), minlength=64).astype(
            np.float32
        )
        hist = np.sqrt(hist / hist.sum())
        return np.concatenate([g, 0.7 * hist])

    gids = sorted(gmeta)
    G = np.stack([desc(os.path.join(setdir, gmeta[i]["file"])) for i in gids])
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    res = {}
    queries = (
        [(i, G[n]) for n, i in enumerate(gids)]
        if loo
        else [(q, desc(os.path.join(setdir, qmeta[q]["file"]))) for q in sorted(qmeta)]
    )
    for qid, v in queries:
        s = G @ (v / np.linalg.norm(v))
        top = [i for i in np.argsort(-s, kind="stable") if not (loo and gids[i] == qid)][:topk]
        res[qid] = [[gids[i], round(float(s[i]), 5)] for i in top]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score RESULTS.json")
    s.add_argument("setdir")
    s.add_argument("results")
    b = sub.add_parser("baseline", help="thumbnail + colour histogram baseline (needs numpy)")
    b.add_argument("setdir")
    b.add_argument("--out", help="also write the baseline's RESULTS.json here")
    for p in (s, b):
        p.add_argument(
            "--threshold",
            type=float,
            action="append",
            default=[],
            help="score threshold T for the accept / false-accept rates (repeatable)",
        )
        p.add_argument(
            "--gt",
            default="gt.json",
            help="ground-truth file in SETDIR: gt.json (default) or gt_loo.json (semantic sets)",
        )
    a = ap.parse_args()
    if a.cmd == "score":
        res = json.load(open(a.results))
    else:
        res = baseline(a.setdir, loo=a.gt != "gt.json")
        if a.out:
            json.dump(res, open(a.out, "w"))
    print(
        json.dumps(score(a.setdir, res, thresholds=a.threshold, gt_name=a.gt), indent=1, ensure_ascii=False)
    )


if __name__ == "__main__":
    sys.exit(main())
