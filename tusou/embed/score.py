"""Post-processing of raw features and the cosine -> 0..1 score map.

STUB: replaced by the calibrated version (see docs/score.md once written).
"""

from __future__ import annotations

import numpy as np


def postprocess(model_key: str, features: np.ndarray) -> np.ndarray:
    """Raw pooled features (n, d) -> unit vectors (n, d) float32."""
    feats = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def score_from_cosine(model_key: str, cosine: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(cosine, dtype=np.float32), 0.0, 1.0)


def cosine_from_score(model_key: str, score: float) -> float:
    return float(score)


def default_threshold(model_key: str) -> float:
    return 0.5
