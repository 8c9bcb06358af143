"""PIL image -> normalised NCHW float32, the way each model was trained/evaluated.

EfficientNet-Lite (the TensorFlow reference eval): shorter side to round(S / 0.875) with bicubic,
centre crop S x S, then ``(pixel - 127) / 128``. A user-supplied encoder gets CLIP-style preprocessing:
shorter side to S, centre crop, ``(pixel / 255 - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tusou.images import to_rgb

__all__ = ["Preprocessor", "clip_preprocessor", "lite_preprocessor"]

#: Fraction of the resized image the centre crop keeps (TF EfficientNet eval's CROP_PADDING = 32 at 224).
LITE_CROP_FRACTION = 0.875
#: Up to this aspect ratio (resized long side / S) the resize is done exactly as the reference does it.
_EXACT_MAX_RATIO = 4


@dataclass(frozen=True)
class Preprocessor:
    size: int  #: S: side of the square crop fed to the network
    crop_fraction: float  #: shorter side is resized to round(S / crop_fraction) before the centre crop
    mean: tuple[float, float, float]  #: per channel, in pixel units (0..255)
    std: tuple[float, float, float]  #: per channel, in pixel units

    @property
    def resize_short(self) -> int:
        return round(self.size / self.crop_fraction)

    def _geometry(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """Size of the resized image and the centre-crop box in it."""
        short = self.resize_short
        # Longer side truncated, crop offset rounded: torchvision's Resize/CenterCrop conventions, which
        # the reference features (tools/make_embed_reference.py) were computed with.
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        left, top = int(round((nw - self.size) / 2.0)), int(round((nh - self.size) / 2.0))
        return (nw, nh), (left, top, left + self.size, top + self.size)

    def crop(self, image: Image.Image) -> Image.Image:
        """The S x S RGB crop the network sees."""
        image = to_rgb(image)
        w, h = image.size
        (nw, nh), box = self._geometry(w, h)
        if max(nw, nh) <= _EXACT_MAX_RATIO * self.size:
            # Resize-then-crop, exactly. Resampling only the crop's source box (resize(box=...)) is about
            # twice as fast but differs by 1-2 levels on some pixels; bit-exactness with the reference keeps
            # the agreement test at 1e-4 meaningful, and the resize is a small part of the per-image cost.
            return image.resize((nw, nh), Image.Resampling.BICUBIC).crop(box)
        # A banner (30 x 4999 is allowed) would be resized to 256 x 42000 px (~80 ms) only to keep 224 x 224
        # of it: resample just the crop's source box instead (~2 ms). Same geometry and filter (Pillow still
        # reads the pixels around the box); not bit-identical, as Pillow rounds between its two passes.
        sx, sy = w / nw, h / nh
        src = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=src)

    def to_array(self, images: Sequence[Image.Image], out: np.ndarray | None = None) -> np.ndarray:
        """(n, 3, S, S) float32, normalised. ``out`` may be a preallocated array of that shape."""
        n = len(images)
        if out is None:
            out = np.empty((n, 3, self.size, self.size), dtype=np.float32)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        inv_std = (1.0 / np.asarray(self.std, dtype=np.float64)).astype(np.float32).reshape(3, 1, 1)
        for i, img in enumerate(images):
            chw = np.asarray(self.crop(img)).transpose(2, 0, 1)  # uint8 view, no copy
            # (x - mean) * (1/std), written straight into the batch in float32 (uint8 -> float32 is exact):
            # with std = 128 the reciprocal is exact, so this equals (x - 127) / 128. No float32 HWC
            # temporaries: a third of the cost of the older asarray(float32)/transpose/copy.
            np.subtract(chw, mean, out=out[i], dtype=np.float32)
            out[i] *= inv_std
        return out


def lite_preprocessor(size: int) -> Preprocessor:
    return Preprocessor(size, LITE_CROP_FRACTION, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0))


def clip_preprocessor(size: int, mean: Sequence[float], std: Sequence[float]) -> Preprocessor:
    """For user encoders: mean/std given on the 0..1 scale, as model cards state them."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need one value per RGB channel")
    m = (float(mean[0]) * 255.0, float(mean[1]) * 255.0, float(mean[2]) * 255.0)
    s = (float(std[0]) * 255.0, float(std[1]) * 255.0, float(std[2]) * 255.0)
    return Preprocessor(size, 1.0, m, s)
