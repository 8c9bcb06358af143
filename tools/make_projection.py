"""Fit the learned projection that maps lite0's centred 1280-d vectors to a compact width, and compare
candidates.

    python tools/make_projection.py --compare       # the comparison table (docs/score.md, ~30 min)
    python tools/make_projection.py --method pca --dim 384 --power 0 --shrink 0 --write   # what ships

Needs the evaluation sets that ``bench/eval_build.py`` builds (``python bench/quality.py --build``) under
``--eval-dir`` (default ``~/.cache/tusou-eval``).

**Fitting data.** Only the photos the centring mean is fitted on (``bench/quality.py`` ``fit_mean``): the
near-dup set's distractors and the galleries of both semantic sets (569 photos), plus ``--copies``
edited copies of each made here (``augment``: crop, downscale + JPEG, blur, brightness/contrast, colour
shift, grey, small rotation, border, caption, mirror, logo patch, and a combination), from a fixed seed.
The near-dup originals and queries, which the evaluation measures, are never fitted on.

**Methods** (on the centred unit vectors x, what ``score.postprocess`` gives without a projection):

- ``pca``: the top ``dim`` principal directions of the fitting vectors (photos and copies).
- ``pcaw``: the same, each direction scaled by ``(lambda + shrink * mean(lambda)) ** -power``
  (``--power 0.5`` is plain PCA-whitening, 0.25 a softer one; ``--shrink`` damps the small eigenvalues).
- ``pcas``: PCA directions weighted ``(lambda / (lambda + shrink * noise)) ** power``, noise = the
  variance the edited copies add along each direction.
- ``pca-photos``/``pcaw-photos``: as ``pca``/``pcaw``, fitted on the photos alone (not their copies).
- ``lw`` (learned whitening, Radenovic et al., "Fine-tuning CNN image retrieval with no human annotation",
  TPAMI 2018): whiten by the covariance of the differences between a photo's stored vector and its edited
  copies' query vectors (``+ shrink * mean`` eigenvalue on the diagonal, the directions an edit moves a
  vector along are shrunk), then rotate to the top ``dim`` principal directions of the whitened fitting
  vectors.

Every candidate becomes ``y = L2(x @ P + b)`` (``b = -mean @ P``, the fitting vectors' mean); the score
map is refitted for it exactly as ``bench/quality.py --calibrate`` fits it, and the metrics are read at
the refitted default (0.70) and 0.85. ``--write`` stores ``[P; b]`` as ``tusou/embed/data/<model>_
projection.npy`` (float16) and the refitted map in ``<model>_score.json``; the mean stays as it is, so
vectors stored before the projection convert exactly (``OnnxEmbedder.convert_from``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality as qb  # noqa: E402

from tusou.images import to_rgb  # noqa: E402

#: Bump when ``augment`` changes: the cached features of the copies are keyed by it.
AUG_VERSION = 1
SEED = 20261206
KINDS = (
    "crop",
    "downscale_jpeg",
    "blur",
    "brightness_contrast",
    "colour",
    "grey",
    "rotate",
    "border",
    "caption",
    "mirror",
    "logo",
    "combo",
)
WORDS = ("sample", "draft", "© photo", "2026", "copy", "shop", "preview", "tusou", "sale 50%", "hello")


# ------------------------------------------------------------------------------------------ edited copies


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _crop(img: Image.Image, r: random.Random, lo: float = 0.5, hi: float = 0.9) -> Image.Image:
    w, h = img.size
    area = r.uniform(lo, hi)
    aspect = r.uniform(0.75, 1.33)
    cw = max(8, min(w, round(w * (area * aspect) ** 0.5)))
    ch = max(8, min(h, round(h * (area / aspect) ** 0.5)))
    x0, y0 = r.randint(0, w - cw), r.randint(0, h - ch)
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _caption(
    img: Image.Image, r: random.Random, size_frac: tuple[float, float] = (0.05, 0.12)
) -> Image.Image:
    img = img.copy()
    w, h = img.size
    size = max(8, round(min(w, h) * r.uniform(*size_frac)))
    font = ImageFont.load_default(size=size)
    text = r.choice(WORDS)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
    x = r.randint(0, max(0, w - (x1 - x0)))
    y = r.randint(0, max(0, h - (y1 - y0)))
    colour = r.choice([(255, 255, 255), (0, 0, 0), (255, 0, 0), (255, 255, 0)])
    d.text((x, y), text, font=font, fill=colour)
    return img


def _scale(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(8, round(w * factor)), max(8, round(h * factor))), Image.Resampling.BILINEAR)


def augment(img: Image.Image, kind: str, r: random.Random) -> Image.Image:
    """One edited copy of ``img`` (RGB) of the given kind, its parameters drawn from ``r``."""
    img = to_rgb(img)
    w, h = img.size
    if kind == "crop":
        return _crop(img, r)
    if kind == "downscale_jpeg":
        return _jpeg(_scale(img, r.uniform(0.2, 0.6)), r.randint(20, 60))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(r.uniform(1.0, 3.5) * max(w, h) / 500))
    if kind == "brightness_contrast":
        img = ImageEnhance.Brightness(img).enhance(r.uniform(0.6, 1.4))
        return ImageEnhance.Contrast(img).enhance(r.uniform(0.6, 1.4))
    if kind == "colour":
        arr = np.asarray(img, dtype=np.float32)
        gains = np.array([r.uniform(0.7, 1.3) for _ in range(3)], dtype=np.float32)
        arr = arr * gains + np.array([r.uniform(-20, 20) for _ in range(3)], dtype=np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        return ImageEnhance.Color(img).enhance(r.uniform(0.5, 1.6))
    if kind == "grey":
        return ImageOps.grayscale(img).convert("RGB")
    if kind == "rotate":
        angle = r.choice((-1, 1)) * r.uniform(3, 15)
        return img.rotate(angle, Image.Resampling.BILINEAR, expand=r.random() < 0.5, fillcolor=(0, 0, 0))
    if kind == "border":
        b = max(1, round(min(w, h) * r.uniform(0.05, 0.2)))
        return ImageOps.expand(img, b, fill=r.choice([(255, 255, 255), (0, 0, 0), (128, 128, 128)]))
    if kind == "caption":
        return _caption(img, r)
    if kind == "mirror":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "logo":
        img = img.copy()
        side = max(4, round(min(w, h) * r.uniform(0.1, 0.25)))
        patch = Image.new("RGB", (side, side), tuple(r.randint(0, 255) for _ in range(3)))
        ImageDraw.Draw(patch).ellipse(
            (side // 5, side // 5, side - side // 5, side - side // 5), fill=(255, 255, 255)
        )
        img.paste(patch, (r.randint(0, w - side), r.randint(0, h - side)))
        return img
    if kind == "combo":
        img = _crop(img, r, 0.6, 0.9)
        img = _scale(img, r.uniform(0.3, 0.6))
        img = ImageEnhance.Brightness(img).enhance(r.uniform(0.75, 1.3))
        img = _caption(img, r, (0.06, 0.1))
        return _jpeg(img, r.randint(25, 50))
    raise ValueError(f"unknown edit {kind}")


def copy_kind(file: str, k: int) -> tuple[str, random.Random]:
    """The k-th copy of a photo: its edit (each photo gets every kind once per len(KINDS) copies, in a
    photo-specific order) and the random source of its parameters."""
    h = int(hashlib.sha256(f"{SEED}/{file}".encode()).hexdigest()[:8], 16)
    return KINDS[(h + k) % len(KINDS)], random.Random(f"{SEED}/{file}/{k}")


# ------------------------------------------------------------------------------------------ fitting data


class FitData:
    """Raw features of the fitting photos (stored-image views) and of their edited copies (``id`` view, the
    query's unrotated view)."""

    def __init__(self, rf: qb.RawFeatures, sets: dict[str, qb.EvalSet], copies: int) -> None:
        self.rf, self.copies = rf, copies
        self.parts: list[tuple[qb.EvalSet, list[dict[str, Any]]]] = []
        for name, s in sets.items():
            metas = [m for m in s.gallery if name != "neardup" or m["role"] == "distractor"]
            self.parts.append((s, metas))
        self.n = sum(len(m) for _, m in self.parts)

    def photos(self, views: Sequence[str]) -> np.ndarray:
        """(n, D) raw features of the photos, averaged over ``views`` as the stored vector is."""
        return np.concatenate([np.mean([self.rf.get(s, m, v) for v in views], axis=0) for s, m in self.parts])

    def edited(self) -> np.ndarray:
        """(n, copies, D) raw features of the edited copies."""
        out = []
        for s, metas in self.parts:
            files = [f"{qb.file_key(s, m)}#{k}" for m in metas for k in range(self.copies)]
            paths = {qb.file_key(s, m): s.path(m) for m in metas}

            def compute(f: str, paths: dict[str, Path] = paths) -> np.ndarray:
                base, k = f.rsplit("#", 1)
                kind, r = copy_kind(base, int(k))
                return self.rf.raw(augment(self.rf.opener(paths[base]), kind, r))

            key = (self.rf.model_id, "raw-edited", f"a{AUG_VERSION}-s{SEED}", s.name)
            feats = self.rf.cache.get(key, files, compute)
            out.append(feats.reshape(len(metas), self.copies, -1))
        return np.concatenate(out)


# ------------------------------------------------------------------------------------------ methods


def _eig(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, >= 0) and eigenvectors (columns) of a symmetric matrix."""
    lam, u = np.linalg.eigh(c.astype(np.float64))
    order = np.argsort(-lam)
    return np.maximum(lam[order], 0.0), u[:, order]


def fit(
    method: str, dim: int, photos: np.ndarray, edited: np.ndarray, power: float, shrink: float
) -> qb.Projection:
    """(P, b) for centred unit vectors: ``photos`` (n, D) stored vectors, ``edited`` (n, k, D) copies.
    ``pca-photos``/``pcaw-photos``: the principal directions of the photos alone (not their copies)."""
    allv = np.concatenate([photos, edited.reshape(-1, photos.shape[1])]).astype(np.float64)
    mu = allv.mean(axis=0)
    if method.endswith("-photos"):
        method, mu = method[: -len("-photos")], photos.astype(np.float64).mean(axis=0)
        allv = photos.astype(np.float64)
    if method in ("pca", "pcaw", "pcas"):
        lam, u = _eig(np.cov(allv - mu, rowvar=False))
        p = u[:, :dim]
        if method == "pcaw":
            p = p * (lam[:dim] + shrink * lam.mean()) ** -power
        elif method == "pcas":
            # Wiener-like weights: a direction's variance over photos against the variance an edit adds
            # along it; directions that edits move a lot are damped, none is amplified.
            diff = (edited - photos[:, None, :]).reshape(-1, photos.shape[1]).astype(np.float64)
            noise = np.mean((diff @ p) ** 2, axis=0)
            p = p * (lam[:dim] / (lam[:dim] + shrink * noise)) ** power
    elif method == "lw":
        diff = (edited - photos[:, None, :]).reshape(-1, photos.shape[1]).astype(np.float64)
        lam_s, u_s = _eig(diff.T @ diff / len(diff))
        whiten = u_s * (lam_s + shrink * lam_s.mean()) ** -0.5  # (D, D): Cs^-1/2 in Cs's basis
        z = (allv - mu) @ whiten
        lam_d, u_d = _eig(np.cov(z, rowvar=False))
        p = whiten @ u_d[:, :dim]
        if power:
            p = p * (lam_d[:dim] + 1e-12) ** -power
    else:
        raise ValueError(method)
    return p.astype(np.float32), (-mu @ p).astype(np.float32)


# ------------------------------------------------------------------------------------------ evaluation


def metrics(m: dict[str, Any], t_default: float) -> dict[str, Any]:
    """The comparison's figures for one evaluated configuration, with its score map refitted."""
    c = m["cos"]
    try:
        params = qb.fit_score_map(c, t_default)
    except SystemExit:  # e.g. one index view: exact copies score 1, the map's 0.98 knot cannot sit below
        params = None
    # The default's and 0.85's cosines, as fit_score_map places them.
    c_def, c_85 = (float(np.quantile(c["impostor_top"], p)) for p in (0.96, 0.999))
    ok, top, edit = c["top1_ok"], c["top1_cos"], c["edit"]
    acc = ok & (top >= c_def)
    by_edit = {e: float(np.mean(acc[edit == e])) for e in sorted(set(edit.tolist()))}
    worst = min(by_edit, key=lambda e: by_edit[e])
    # A stricter rule for comparison: the cosine 2 % of the best wrong images reach.
    c_98 = float(np.quantile(c["impostor_top"], 0.98))
    return {
        "r1": m["neardup"]["recall@1"],
        "accept": float(np.mean(acc)),
        "accept85": float(np.mean(ok & (top >= c_85))),
        "worst": (worst, by_edit[worst]),
        "combo": by_edit.get("combo"),
        "by_edit": by_edit,
        "nomatch": float(np.mean(c["nomatch_top"] >= c_def)),
        "nomatch85": float(np.mean(c["nomatch_top"] >= c_85)),
        "accept98": float(np.mean(ok & (top >= c_98))),
        "nomatch98": float(np.mean(c["nomatch_top"] >= c_98)),
        "sem": m["semantic"]["mAP"],
        "cut": m["semantic_cutouts"]["mAP"],
        "params": params,
    }


def row(name: str, dim: int, r: dict[str, Any]) -> str:
    w, wv = r["worst"]
    return (
        f"| {name} | {dim} | {r['r1']:.3f} | {r['accept']:.3f} | {r['combo']:.3f} | {w} {wv:.3f} | "
        f"{r['nomatch']:.2f} | {r['accept85']:.3f} ({r['nomatch85']:.2f}) | {r['accept98']:.3f} "
        f"({r['nomatch98']:.2f}) | {r['sem']:.3f} / {r['cut']:.3f} |"
    )


HEADER = (
    "| candidate | d | R@1 | correct accept @0.70 | combo @0.70 | worst edit @0.70 | no-match >= 0.70 "
    "| correct accept @0.85 (no-match) | correct accept @2 % impostors (no-match) "
    "| semantic mAP (sem / cutouts) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)

#: The comparison ``--compare`` runs: (name, method, power, shrink); each at every ``--dims``.
GRID: list[tuple[str, str, float, float]] = [
    ("PCA", "pca", 0.0, 0.0),
    ("PCA of the photos only", "pca-photos", 0.0, 0.0),
    ("PCA-whitening lambda^-0.05", "pcaw", 0.05, 0.0),
    ("PCA-whitening lambda^-0.1", "pcaw", 0.1, 0.0),
    ("PCA-whitening lambda^-0.15", "pcaw", 0.15, 0.0),
    ("PCA-whitening lambda^-0.25, shrink 1", "pcaw", 0.25, 1.0),
    ("PCA-whitening lambda^-0.5, shrink 10", "pcaw", 0.5, 10.0),
    ("PCA-whitening lambda^-0.25 of the photos only", "pcaw-photos", 0.25, 0.0),
    ("learned whitening, shrink 3", "lw", 0.0, 3.0),
    ("PCA, edit-noise weights (a=1)", "pcas", 1.0, 1.0),
    ("PCA, edit-noise weights (a=3)", "pcas", 1.0, 3.0),
    ("PCA, sqrt edit-noise weights (a=1)", "pcas", 0.5, 1.0),
    ("learned whitening, shrink 1, rescaled lambda^0.5", "lw", -0.5, 1.0),
    ("learned whitening, shrink 1, rescaled lambda^0.25", "lw", -0.25, 1.0),
    ("learned whitening, shrink 10", "lw", 0.0, 10.0),
    ("PCA-whitening lambda^-0.5", "pcaw", 0.5, 0.0),
    ("PCA-whitening lambda^-0.25", "pcaw", 0.25, 0.0),
    ("PCA-whitening lambda^-0.5, shrink 1", "pcaw", 0.5, 1.0),
    ("learned whitening, shrink 0.1", "lw", 0.0, 0.1),
    ("learned whitening, shrink 1", "lw", 0.0, 1.0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite0")
    ap.add_argument("--eval-dir", type=Path, default=Path("~/.cache/tusou-eval").expanduser())
    ap.add_argument("--data", type=Path, default=None, help="tusou data folder (model cache)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--copies", type=int, default=len(KINDS), help="edited copies per fitting photo")
    ap.add_argument("--compare", action="store_true", help="print the comparison table")
    ap.add_argument("--dims", default="128,192,256,384", help="with --compare: widths")
    ap.add_argument("--grid", nargs="*", default=[], help="with --compare: only these candidate names")
    ap.add_argument(
        "--index-views", default="", help="e.g. 'id' to compare without low64 (default: views.py)"
    )
    methods = ["pca", "pcaw", "pcas", "lw", "pca-photos", "pcaw-photos"]
    ap.add_argument("--method", default="pca", choices=methods, help="default: what ships")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--power", type=float, default=0.0, help="eigenvalue power (pcaw; lw: after rotation)")
    ap.add_argument("--shrink", type=float, default=0.0, help="added to the eigenvalues, x their mean")
    ap.add_argument("--write", action="store_true", help="write tusou/embed/data/<model>_projection.npy")
    ap.add_argument("--default-threshold", type=float, default=0.7)
    args = ap.parse_args()
    args.precision = "fp32"
    if args.data is None:
        args.data = args.eval_dir / "tusou-data"
    root = qb.ensure_sets(args.eval_dir, False)
    qb.POWER[0] = qb.score_mod.calibration(args.model).power
    model_id, raw, opener = qb.make_raw_fn(args)
    rf = qb.RawFeatures(model_id, raw, opener, qb.Cache(args.eval_dir / "emb"))
    sets = {n: qb.EvalSet(root, n) for n in qb.SETS}
    scorer = qb.load_scorer()
    mean = qb.score_mod.calibration(args.model).mean
    if mean is None:
        sys.exit(f"{args.model}: no centring mean ships; nothing to project")
    iv = tuple(args.index_views.split(",")) if args.index_views else qb.views_mod.INDEX_VIEWS
    qv = qb.views_mod.QUERY_VIEWS
    data = FitData(rf, sets, args.copies)
    t0 = time.perf_counter()
    photos = qb.centre(data.photos(iv), mean)
    edited = qb.centre(data.edited(), mean)
    print(
        f"fitting data: {data.n} photos x {args.copies} edited copies ({time.perf_counter() - t0:.0f}s); "
        f"index views {list(iv)}, query views {list(qv)}",
        file=sys.stderr,
    )

    if args.compare:
        print(f"\n## projections, {args.model} ({model_id}), index views {list(iv)}\n")
        print(HEADER)
        print(
            row("none (today)", mean.shape[0], metrics(qb.evaluate(rf, sets, scorer, iv, qv, mean), 0.7)),
            flush=True,
        )
        for d in [int(v) for v in args.dims.split(",")]:
            for name, method, power, shrink in GRID:
                if args.grid and name not in args.grid:
                    continue
                proj = fit(method, d, photos, edited, power, shrink)
                r = metrics(qb.evaluate(rf, sets, scorer, iv, qv, mean, proj), args.default_threshold)
                print(row(name, d, r), flush=True)
        return

    proj = fit(args.method, args.dim, photos, edited, args.power, args.shrink)
    # What ships is float16: evaluate exactly that.
    stacked = np.vstack([proj[0], proj[1][None, :]]).astype(np.float16)
    proj = (stacked[:-1].astype(np.float32), stacked[-1].astype(np.float32))
    m = qb.evaluate(rf, sets, scorer, iv, qv, mean, proj)
    r = metrics(m, args.default_threshold)
    print(HEADER)
    print(row(f"{args.method} power {args.power} shrink {args.shrink}", args.dim, r))
    print("\nper edit, correct accepts at the refitted default:")
    for e, v in sorted(r["by_edit"].items(), key=lambda kv: kv[1]):
        print(f"  {e}: {v:.3f}")
    print("\nfitted:", json.dumps(r["params"]))
    if args.write:
        out = ROOT / "tusou" / "embed" / "data"
        np.save(out / f"{args.model}_projection.npy", stacked)
        score_file = out / f"{args.model}_score.json"
        meta = json.loads(score_file.read_text())
        meta.update(r["params"])
        cmd = (
            f"python tools/make_projection.py --model {args.model} --method {args.method} --dim {args.dim} "
            f"--power {args.power} --shrink {args.shrink} --copies {args.copies} --write"
        )
        meta["projection"] = {
            "dim": args.dim,
            "method": args.method,
            "power": args.power,
            "shrink": args.shrink,
            "fitting_photos": data.n,
            "copies": args.copies,
            "augment_version": AUG_VERSION,
            "seed": SEED,
            "index_views": list(iv),
        }
        meta["fitted_by"] = cmd
        score_file.write_text(json.dumps(meta, indent=1) + "\n")
        print("wrote", out / f"{args.model}_projection.npy", score_file)


if __name__ == "__main__":
    main()
