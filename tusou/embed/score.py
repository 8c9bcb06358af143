"""Post-processing of raw features and the cosine -> 0..1 score map.

How the numbers in ``data/`` were fitted, and what they buy, is in ``docs/score.md``.

Pipeline for a known model (``lite0``/``lite1``/``lite2``)::

    raw pooled features --sqrt--> --L2--> x --(x - mean)--> --L2--> c                  (centre)
    c --(c @ P + b)--> --L2--> unit vector, d = 384 dimensions instead of 1280       (project)
    cosine of two unit vectors --piecewise-linear, monotone--> score 0..1            (score_from_cosine)

``postprocess`` is ``project(centre(features))``. The projection ``P``, ``b`` (lite0 only; lite1/lite2
have none and keep 1280-d centred vectors) is fitted by ``tools/make_projection.py``: why this one and what
it costs or buys is in docs/score.md, "The projection".

Why the square root ("power normalisation", exponent ``power`` in the json): a few channels that fire
strongly on one salient object dominate the pooled vector; the root evens them out, so the cosine weighs
the whole picture more. Measured: semantic mAP +0.03, correct accepts at the default threshold +0.01.

Why centre: the pooled features come out of a ReLU6, so every component is >= 0 and any two photos share a
large common direction: uncentred, unrelated photos of the dev set have a median cosine of 0.17 (99th
percentile 0.39). Subtracting the mean of (L2-normed) features of a generic photo collection removes that
shared direction, so unrelated photos land near 0 and the cosine spends its range on what differs. The
mean is a fixed dataset statistic (``data/<key>_mean.npy``), never updated from the user's images, so
stored vectors stay valid.

Unknown model keys (a user-supplied ONNX encoder) get plain L2 and a generic map (``_GENERIC``): we know
nothing about their feature statistics, so the score is the clipped cosine and the default threshold is a
conservative guess that the operator should override (``TUSOU_DEFAULT_THRESHOLD``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

_KEY_RE = re.compile(r"^(?:efficientnet[-_]?)?(lite[0-4])", re.IGNORECASE)


@dataclass(frozen=True)
class Calibration:
    """Everything model-specific about scores; one per model family."""

    #: Mean of L2-normed (powered) raw features of a generic photo collection, or None for plain L2.
    mean: np.ndarray | None
    #: Exponent applied to the (non-negative) raw features before anything else; 1 = none.
    power: float
    #: Knots of the piecewise-linear cosine -> score map; both strictly increasing, from -1 to 1 in cosine.
    cos_knots: tuple[float, ...]
    score_knots: tuple[float, ...]
    default_threshold: float
    #: Learned linear projection applied to the centred unit vectors, (D, d) with d < D, or None; then
    #: ``bias`` (d,) is added and the result L2-normed (``project``). See docs/score.md, "The projection".
    projection: np.ndarray | None = None
    bias: np.ndarray | None = None

    @property
    def dim(self) -> int | None:
        """Width of the vectors ``postprocess`` returns when a projection ships, else None (= input's)."""
        return None if self.projection is None else int(self.projection.shape[1])


# Unknown encoder: score = clipped cosine. 0.9 as the default is deliberately strict: with an uncentred
# encoder unrelated photos often reach a cosine of 0.5-0.7, and a default that is too low cannot be
# undone by clients (Qiniu raises a lower client threshold to the system default).
_GENERIC = Calibration(
    mean=None,
    power=1.0,
    cos_knots=(-1.0, 0.0, 1.0),
    score_knots=(0.0, 0.0, 1.0),
    default_threshold=0.9,
)


def family(model_key: str) -> str | None:
    """``"lite0"`` for ``"lite0"``, ``"lite0-57934424"``, ``"efficientnet-lite0..."``; None if unknown."""
    m = _KEY_RE.match(model_key.strip())
    return m.group(1).lower() if m else None


def variant(model_key: str) -> str:
    """What follows the family in a model key: ``"int8-192px"`` for ``"lite0-int8-192px"``, ``""`` for
    ``"lite0"``. The built-in model run in int8 or at another input size (``model_key`` of
    :func:`tusou.embed.create_embedder`) shares the family's mean and projection, but its cosines spread a
    little differently: ``<family>_score.json`` may carry its own score map under ``"variants"``."""
    m = _KEY_RE.match(model_key.strip())
    return model_key.strip()[m.end() :].strip("-").lower() if m else ""


def _check_knots(cos_knots: tuple[float, ...], score_knots: tuple[float, ...]) -> None:
    c, s = np.asarray(cos_knots), np.asarray(score_knots)
    if len(c) != len(s) or len(c) < 2:
        raise ValueError("cos_knots and score_knots must have the same length >= 2")
    if c[0] != -1.0 or c[-1] != 1.0 or np.any(np.diff(c) <= 0):
        raise ValueError("cos_knots must increase strictly from -1 to 1")
    if s[0] < 0.0 or s[-1] != 1.0 or np.any(np.diff(s) < 0):
        raise ValueError("score_knots must be non-decreasing within 0..1 and end at 1")


@cache
def calibration(model_key: str) -> Calibration:
    """The calibration for a model key; the generic one when no data files ship for it."""
    fam = family(model_key)
    if fam is None:
        return _GENERIC
    data = resources.files("tusou.embed") / "data"
    params_file = data / f"{fam}_score.json"
    if not params_file.is_file():
        return _GENERIC
    params = json.loads(params_file.read_text())
    knots = params.get("variants", {}).get(variant(model_key), params)
    mean = None
    mean_file = data / f"{fam}_mean.npy"
    if mean_file.is_file():
        with mean_file.open("rb") as f:
            mean = np.load(f).astype(np.float32).reshape(-1)
    projection = bias = None
    proj_file = data / f"{fam}_projection.npy"
    if mean is not None and proj_file.is_file():
        with proj_file.open("rb") as f:
            # (D + 1, d): rows 0..D-1 are the matrix, the last row is the bias (the fit's mean, projected).
            stacked = np.load(f).astype(np.float32)
        if stacked.ndim != 2 or stacked.shape[0] != mean.shape[0] + 1:
            raise ValueError(f"{proj_file.name}: shape {stacked.shape}, expected ({mean.shape[0] + 1}, d)")
        projection, bias = np.ascontiguousarray(stacked[:-1]), np.ascontiguousarray(stacked[-1])
    cal = Calibration(
        mean=mean,
        power=float(params.get("power", 1.0)),
        cos_knots=tuple(float(v) for v in knots["cos_knots"]),
        score_knots=tuple(float(v) for v in knots["score_knots"]),
        default_threshold=float(knots["default_threshold"]),
        projection=projection,
        bias=bias,
    )
    _check_knots(cal.cos_knots, cal.score_knots)
    return cal


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def postprocess(model_key: str, features: np.ndarray) -> np.ndarray:
    """Raw pooled features (n, D) -> unit vectors (n, d) float32: ``project(centre(features))``; d = D
    unless a projection ships."""
    feats = np.asarray(features, dtype=np.float32)
    cal = calibration(model_key)
    # Features of another length (e.g. a custom encoder whose name happens to start with "lite0") get
    # plain L2 rather than a mean broadcast into nonsense.
    if cal.mean is None or feats.shape[-1] != cal.mean.shape[0]:
        return _l2(feats).astype(np.float32, copy=False)
    return project(model_key, centre(model_key, feats))


def centre(model_key: str, features: np.ndarray) -> np.ndarray:
    """Raw pooled features (n, D) -> centred unit vectors (n, D): power, L2, minus the mean, L2 (plain L2
    without a mean or for another width). The vectors stored before a projection shipped."""
    feats = np.asarray(features, dtype=np.float32)
    cal = calibration(model_key)
    if cal.mean is None or feats.shape[-1] != cal.mean.shape[0]:
        return _l2(feats).astype(np.float32, copy=False)
    if cal.power != 1.0:
        # EfficientNet-Lite pools ReLU6 outputs, so features are >= 0; the clip only guards rounding.
        feats = np.power(np.maximum(feats, 0.0), cal.power)
    return _l2(_l2(feats) - cal.mean).astype(np.float32, copy=False)


def project(model_key: str, centred: np.ndarray) -> np.ndarray:
    """Centred unit vectors (n, D) -> the model's final unit vectors: ``L2(x @ P + b)`` with the shipped
    projection, or the input (as float32) when none ships.

    This is the only step after centring, so vectors stored before a projection shipped (the centred
    ones) map exactly onto what embedding the same image now gives (``OnnxEmbedder.convert_from``).
    """
    x = np.ascontiguousarray(centred, dtype=np.float32)
    cal = calibration(model_key)
    if cal.projection is None or cal.bias is None:
        return x
    if len(x) == 0:
        return np.zeros((0, cal.projection.shape[1]), dtype=np.float32)
    y = _projector(model_key).run(None, {"x": x.reshape(-1, cal.projection.shape[0])})[0]
    return _l2(y.reshape(*x.shape[:-1], -1)).astype(np.float32, copy=False)


@cache
def _projector(model_key: str) -> Any:
    """A one-thread ONNX Runtime session computing ``x @ P + b`` for the model's projection.

    Not numpy: its OpenBLAS spreads even a one-row product over every core, and on a busy 2-core server
    that turned 0.3 ms into 20-90 ms (measured, load average ~18) beside the model's own threads. ONNX
    Runtime's single-threaded GEMM is also batch-independent (an image's vector does not depend on what
    else shared its batch; float32 BLAS rounds a one-row and a many-row product differently).
    """
    import onnxruntime as ort

    from tusou import onnx_graph as g  # not onnx: importing it costs ~1 s of every start

    cal = calibration(model_key)
    assert cal.projection is not None and cal.bias is not None
    d_in, d_out = cal.projection.shape
    model = g.model(
        [g.node("MatMul", ["x", "P"], ["xp"]), g.node("Add", ["xp", "b"], ["y"])],
        [g.value_info("x", g.FLOAT, ["N", d_in])],
        [g.value_info("y", g.FLOAT, ["N", d_out])],
        [g.tensor("P", cal.projection), g.tensor("b", cal.bias)],
        name="tusou_projection",
        opset=17,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def score_from_cosine(model_key: str, cosine: np.ndarray) -> np.ndarray:
    """Monotone non-decreasing map of cosine (-1..1) to the 0..1 score; same shape as ``cosine``."""
    cal = calibration(model_key)
    c = np.clip(np.asarray(cosine, dtype=np.float64), -1.0, 1.0)
    return np.interp(c, cal.cos_knots, cal.score_knots).astype(np.float32)


def cosine_from_score(model_key: str, score: float) -> float:
    """The smallest cosine whose score is >= ``score``: ``cos >= cosine_from_score(s)`` iff ``score >= s``.

    Search uses it to turn a score threshold into a cosine cut before mapping. Scores <= the lowest
    knot map to -1 (everything passes); scores > 1 to just above 1 (nothing passes).
    """
    cal = calibration(model_key)
    c, s = cal.cos_knots, cal.score_knots
    if score <= s[0]:
        return -1.0
    if score > s[-1]:
        return float(np.nextafter(1.0, 2.0))
    # First knot segment whose upper score reaches the target; on a flat segment that's its right end.
    for i in range(1, len(c)):
        if s[i] >= score:
            if s[i] == s[i - 1]:
                return float(c[i - 1])
            t = (score - s[i - 1]) / (s[i] - s[i - 1])
            cos = c[i - 1] + t * (c[i] - c[i - 1])
            # float rounding must not make score_from_cosine(cos) fall below the target.
            while (
                float(score_from_cosine(model_key, np.asarray(cos, dtype=np.float32))) < score and cos < 1.0
            ):
                cos = float(np.nextafter(np.float32(cos), np.float32(2.0)))
            return float(cos)
    return 1.0  # pragma: no cover - unreachable: s[-1] == 1 >= score


def default_threshold(model_key: str) -> float:
    """The calibrated system default score threshold (see docs/score.md)."""
    return calibration(model_key).default_threshold
