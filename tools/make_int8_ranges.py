"""Fit the activation ranges that the int8 EfficientNet-Lite graph is quantized with.

    python tools/make_int8_ranges.py [--model lite0] [--images ~/.cache/tusou-eval/out/semantic/gallery]
                                     [--n 96]

Runs the fp32 graph (built from the installed weights) over the first ``--n`` photos of ``--images``
(sorted by path) in the views the server computes (index views and the query's quarter turns),
records every quantized tensor's min and max, and writes ``tusou/embed/data/<model>_int8_ranges.json``.
The default photos are the evaluation gallery that bench/eval_build.py builds (Debian-packaged
wallpapers, stamps and photos); the ranges are small data, committed, so users need no photos.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tusou.embed import views as _views  # noqa: E402
from tusou.embed.efficientnet import LITE_MODELS  # noqa: E402
from tusou.embed.onnx_model import GRAPH_VERSION, lite_onnx_path  # noqa: E402
from tusou.embed.preprocess import lite_preprocessor  # noqa: E402
from tusou.embed.quantize import collect_ranges, ranges_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite0", choices=sorted(LITE_MODELS))
    ap.add_argument("--images", type=Path, default=Path("~/.cache/tusou-eval/out/semantic/gallery"))
    ap.add_argument("--n", type=int, default=96, help="photos used")
    args = ap.parse_args()
    folder = args.images.expanduser()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    files = files[:: max(1, len(files) // args.n)][: args.n]  # spread over the whole (sorted) set
    if not files:
        sys.exit(f"no photos under {folder}")
    size = LITE_MODELS[args.model].image_size
    pre = lite_preprocessor(size)
    batches = []
    for p in files:
        img = Image.open(p).convert("RGB")
        img.thumbnail((1024, 1024))
        views = _views.index_views(img) + _views.query_views(img)
        batches.append(pre.to_array(views))
    with tempfile.TemporaryDirectory() as tmp:
        fp32, _ = lite_onnx_path(args.model, Path(tmp))
        ranges = collect_ranges(fp32, batches)
    out = ranges_path(args.model)
    meta = {
        "model": args.model,
        "graph_version": GRAPH_VERSION,
        "method": "minmax",
        "photos": len(files),
        "views_per_photo": int(batches[0].shape[0]),
        "ranges": {k: [round(lo, 6), round(hi, 6)] for k, (lo, hi) in sorted(ranges.items())},
    }
    out.write_text(json.dumps(meta, indent=0) + "\n")
    print(f"wrote {out}: {len(ranges)} tensors from {len(files)} photos of {folder}")


if __name__ == "__main__":
    main()
