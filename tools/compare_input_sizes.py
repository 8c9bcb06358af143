"""Dev-set quality of lite0 with some views run at a smaller network input (the table in docs/score.md,
"Input size").

    python tools/compare_input_sizes.py [--precision fp32|int8] [--configs NAME ...]

A view written ``<view>@<S>`` is the view of views.py (``id``, ``low64``, ``r90``, ...) fed to the
network built for an S x S input (``build_efficientnet_lite(..., image_size=S)``, the lite preprocessing
at S: shorter side to round(S / 0.875), centre crop S); ``<view>@<S>c`` instead keeps the model's own
scale (shorter side 256) and crops the centre S x S. Plain names run at 224. Raw features are cached
under ``<eval-dir>/emb`` like ``bench/quality.py --calibrate``'s; every configuration is scored in numpy
with the shipped mean and projection, as the service computes it (index views averaged, the best cosine
over the query views).

Columns: neardup recall@1 and mAP, the worst edit and the five weakest (recall@1 by edit), semantic mAP
(semantic / cutouts) and leave-one-out mAP, correct accepts at the cosine that 3.5 % of the best wrong
images reach (the rule the score map's default is fitted by, bench/quality.py DEFAULT_QUANTILE) with
the share of no-match queries above it, correct accepts where 5 % and 3 % of the no-match queries pass,
and at the shipped lite0 map's default (0.70): correct accepts, the combo edit's, the no-match share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality as Q  # noqa: E402

from tusou.embed import score as S  # noqa: E402
from tusou.embed import views as V  # noqa: E402
from tusou.embed.efficientnet import build_efficientnet_lite  # noqa: E402
from tusou.embed.onnx_model import GRAPH_VERSION, OnnxEncoder, lite_weights_path  # noqa: E402
from tusou.embed.preprocess import Preprocessor, lite_preprocessor  # noqa: E402
from tusou.embed.pth import load_state_dict  # noqa: E402

R4 = ("id", "r90", "r180", "r270")


def at(size: int, names: tuple[str, ...] = R4) -> tuple[str, ...]:
    return tuple(f"{n}@{size}" for n in names)


#: name -> (index views, query views)
CONFIGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "today: id+low64 ; R4": (("id", "low64"), R4),
    "id ; R4 (no low view)": (("id",), R4),
    "id+low64@64 ; R4": (("id", "low64@64"), R4),
    "id+low64@96 ; R4": (("id", "low64@96"), R4),
    "id+low64@128 ; R4": (("id", "low64@128"), R4),
    "id+low64@160 ; R4": (("id", "low64@160"), R4),
    "id+low64@176 ; R4": (("id", "low64@176"), R4),
    "id+low64@192 ; R4": (("id", "low64@192"), R4),
    "id+low64@128c ; R4": (("id", "low64@128c"), R4),
    "id+low64@160c ; R4": (("id", "low64@160c"), R4),
    "id+low48@160 ; R4": (("id", "low48@160"), R4),
    "id+low80@160 ; R4": (("id", "low80@160"), R4),
    "id+low64 ; id,rot@160": (("id", "low64"), ("id", *at(160, R4[1:]))),
    "id+low64 ; id,rot@128": (("id", "low64"), ("id", *at(128, R4[1:]))),
    "id+low64@160 ; id,rot@160": (("id", "low64@160"), ("id", *at(160, R4[1:]))),
    "all @192 (id@192+low64@192 ; R4@192)": (at(192, ("id", "low64")), at(192)),
    "id@192+low64@160 ; R4@192": (("id@192", "low64@160"), at(192)),
    "id@192+low64@128 ; R4@192": (("id@192", "low64@128"), at(192)),
    "id@192+low64@160 ; id@192,rot@160": (("id@192", "low64@160"), ("id@192", *at(160, R4[1:]))),
    "all @176": (at(176, ("id", "low64")), at(176)),
    "all @160": (at(160, ("id", "low64")), at(160)),
}


class SizedFeatures(Q.RawFeatures):
    """RawFeatures whose ``<view>@<S>`` views run through a graph built for S x S inputs."""

    def __init__(self, *a: Any, precision: str, work: Path) -> None:
        super().__init__(*a)
        self.precision, self.work = precision, work
        self.state = load_state_dict(lite_weights_path("lite0"))
        self.encoders: dict[int, OnnxEncoder] = {}

    def encoder(self, size: int) -> OnnxEncoder:
        if size not in self.encoders:
            path = self.work / f"lite0-{size}.onnx"
            if not path.exists():
                path.write_bytes(build_efficientnet_lite(self.state, "lite0", size).SerializeToString())
            if self.precision == "int8":
                from tusou.embed.quantize import quantize_lite

                q = self.work / f"lite0-{size}-int8.onnx"
                if not q.exists():
                    quantize_lite(path, "lite0", q, size, GRAPH_VERSION)
                path = q
            enc = OnnxEncoder(path, size, 1)
            enc.load()
            self.encoders[size] = enc
        return self.encoders[size]

    def get(self, s: Q.EvalSet, metas: Any, view: str) -> np.ndarray:
        if "@" not in view:
            return super().get(s, metas, view)
        base, spec = view.split("@")
        crop = spec.endswith("c")
        size = int(spec.rstrip("c"))
        pre = Preprocessor(size, size / 256, (127.0,) * 3, (128.0,) * 3) if crop else lite_preprocessor(size)
        paths = {Q.file_key(s, m): s.path(m) for m in metas}

        def compute(f: str) -> np.ndarray:
            image = V.VIEWS[base](self.opener(paths[f]))
            return self.encoder(size).predict(pre.to_array([image]))[0]

        files = [Q.file_key(s, m) for m in metas]
        return self.cache.get((self.model_id, "raw", view, s.name), files, compute)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--configs", nargs="*", default=None, help="substrings of the names to run")
    ap.add_argument("--eval-dir", type=Path, default=Path("~/.cache/tusou-eval").expanduser())
    ap.add_argument("--work", type=Path, default=Path("/tmp/tusou-input-sizes"), help="graphs built here")
    a = ap.parse_args()
    for side in (48, 80):  # low-resolution views of other sides than views.py's low64
        V.VIEWS.setdefault(f"low{side}", lambda im, side=side: V._low_res(im, side))
    a.work.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        data=a.eval_dir / "tusou-data", model="lite0", threads=1, precision=a.precision, input_size=None
    )
    model_id, raw, opener = Q.make_raw_fn(args)
    rf = SizedFeatures(model_id, raw, opener, Q.Cache(a.eval_dir / "emb"), precision=a.precision, work=a.work)
    root = Q.ensure_sets(a.eval_dir, False)
    sets = {n: Q.EvalSet(root, n) for n in Q.SETS}
    scorer = Q.load_scorer()
    cal = S.calibration("lite0")
    assert cal.projection is not None and cal.bias is not None
    proj = (cal.projection, cal.bias)
    cut = S.cosine_from_score("lite0", 0.70)
    print(f"## {model_id}: views at other input sizes\n")
    print(
        "| config | R@1 | mAP | worst edit | 5 weakest | sem mAP | loo mAP "
        "| CA at 3.5 % impostors (no-match) "
        "| CA at no-match 5 % / 3 % | at lite0's 0.70: CA, combo, no-match |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (iv, qv) in CONFIGS.items():
        if a.configs and not any(c in name for c in a.configs):
            continue
        m = Q.evaluate(rf, sets, scorer, iv, qv, cal.mean, proj)
        c = m["cos"]
        ops = []
        for share in (0.05, 0.03):
            at_share = float(np.quantile(c["nomatch_top"], 1 - share))
            ops.append(f"{float(np.mean(c['top1_ok'] & (c['top1_cos'] > at_share))):.3f}")
        ok = c["top1_ok"] & (c["top1_cos"] >= cut)
        combo = ok[c["edit"] == "combo"]
        nomatch = float(np.mean(c["nomatch_top"] >= cut))
        shipped = f"{float(np.mean(ok)):.3f}, {float(np.mean(combo)):.3f}, {nomatch:.2f}"
        print(f"{Q.summarise(name, m)} {' / '.join(ops)} | {shipped} |", flush=True)


if __name__ == "__main__":
    main()
