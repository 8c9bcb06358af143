"""The contract between the model and the rest of tusou.

The service only ever sees an :class:`Embedder`: images in, unit vectors out, and a monotone map from cosine
similarity to Qiniu's 0..1 score. Everything model-specific (weights, ONNX graph, preprocessing) stays
behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image


class Embedder(Protocol):
    #: Stable identity of the vectors (model name + weights hash). Stored beside vectors so that a data
    #: folder indexed with one model is never silently searched with another.
    model_id: str
    #: Length of each vector.
    dim: int
    #: The calibrated system default threshold (a score in 0..1).
    default_threshold: float

    #: The shorter side the model's preprocessing resizes an image to: decoding may shrink a large image
    #: (JPEG draft, whole-factor reduce) as long as its shorter side stays at least twice this.
    min_short: int

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Vectors to index: float32 array (n, dim), each row L2-normalised."""
        ...

    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Query views: float32 array (n, v, dim), v >= 1 views per image (e.g. rotations), unit rows.

        Search scores a stored image by its best cosine over the v views.
        """
        ...

    def score(self, cosine: np.ndarray) -> np.ndarray:
        """Map cosine similarity (-1..1) to the 0..1 score the API returns; monotone non-decreasing."""
        ...

    def cosine_for_score(self, score: float) -> float:
        """Inverse of :meth:`score`: the smallest cosine whose score is >= ``score``."""
        ...
