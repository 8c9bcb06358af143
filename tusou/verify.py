"""Local-feature verification of search candidates (``TUSOU_VERIFY``, on by default).

A global CNN descriptor ranks an edited copy first almost always (neardup recall@1 0.996) but scores heavy
edits (crop + downscale + caption + JPEG, grayscale, colour shifts) anywhere in 0.4-0.85, where it also
scores other photos of the same landmark. With verification on, the service keeps ORB keypoints of every
image it stores (at most :data:`KEYPOINTS`, found on the image resized to a :data:`SIDE` px longer side),
and a search with an image checks its best :data:`CANDIDATES` candidates whose score is *ambiguous*
(:data:`LOW` <= score < :data:`VERIFIED`): it counts the keypoint matches (Lowe's ratio test) that agree on
one similarity transform (RANSAC), the *inliers*, and :func:`rescore` maps (score, inliers) to the answer:

* at least :data:`MIN_INLIERS`: a verified copy, the score becomes at least :data:`VERIFIED` (the
  near-duplicate band);
* fewer than :data:`REJECT_INLIERS`, for the query and for its mirror image, while both images have at
  least :data:`INFORMATIVE` keypoints: the geometry says "not a copy", and a score in the ambiguous band
  [:data:`BAND`, :data:`VERIFIED`) drops by :data:`DEMOTION` (below the default threshold, into "similar
  content");
* otherwise (too little evidence either way) the score is unchanged.

The score stays monotone in evidence: more inliers never lower it, a higher CNN score never lowers it. A
search without a candidate in the ambiguous band pays nothing (the query's keypoints are computed only when
one is to be checked). Measured on the dev near-dup set: docs/score.md ("Local-feature verification").

On by default (``TUSOU_VERIFY=false`` turns it off); needs OpenCV (``opencv-python-headless``, a dependency).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

KEYPOINTS = 300
SIDE = 320
CANDIDATES = 3
LOW = 0.4  # the least score worth checking; copies on the dev set score down to 0.44
VERIFIED = 0.85  # the near-duplicate band of docs/score.md
BAND = 0.70  # the default threshold: the ambiguous band is [BAND, VERIFIED)
MIN_INLIERS = 20  # wrong candidates scoring 0.4-0.85 on the dev set: 99.9th percentile 19, at most 25
REJECT_INLIERS = 6  # fewer: geometry contradicts a copy (copies on the dev set: 5th percentile 6)
INFORMATIVE = 0  # keypoints each image needs before a low inlier count counts as evidence
DEMOTION = 0.15  # the width of the ambiguous band: [0.70, 0.85) -> [0.55, 0.70)
RATIO = 0.8
STORED_EDGE_PX = 31  # ORB's default border (its patch size)
QUERY_EDGE_PX = 15  # dev combo copies (~100 px thumbnails upscaled to 320 px): accepted 0.938 -> 0.963
REPROJECTION_PX = 6.0


def _cv2():  # type: ignore[no-untyped-def]
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "TUSOU_VERIFY needs OpenCV: pip install opencv-python-headless (or set TUSOU_VERIFY=false)"
        ) from exc
    return cv2


def check_available() -> None:
    """Raises RuntimeError at start-up when verification is on but OpenCV is missing."""
    _cv2()


def keypoints(image: Image.Image, query: bool = False, mirrored: bool = False) -> bytes:
    """ORB keypoints of ``image`` (``mirrored``: of its mirror image), packed: count (uint32), float32 (x, y)
    per point, 32-byte descriptors. A ``query`` image's keypoints may lie closer to its edges
    (:data:`QUERY_EDGE_PX`): a small crop keeps more of its content; a stored image keeps ORB's default
    border, which finds fewer chance agreements."""
    cv2 = _cv2()
    grey = image.convert("L")
    if mirrored:
        grey = grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = SIDE / max(grey.size)
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    grey = grey.resize(size, Image.Resampling.BILINEAR)
    edge = QUERY_EDGE_PX if query else STORED_EDGE_PX
    orb = cv2.ORB_create(nfeatures=KEYPOINTS, edgeThreshold=edge)
    found, desc = orb.detectAndCompute(np.asarray(grey), None)
    if desc is None or not found:
        return np.uint32(0).tobytes()
    points = np.asarray([k.pt for k in found], dtype=np.float32)
    return np.uint32(len(found)).tobytes() + points.tobytes() + np.ascontiguousarray(desc, np.uint8).tobytes()


def _unpack(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = int(np.frombuffer(data[:4], np.uint32)[0])
    points = np.frombuffer(data[4 : 4 + 8 * n], np.float32).reshape(n, 2)
    desc = np.frombuffer(data[4 + 8 * n : 4 + 8 * n + 32 * n], np.uint8).reshape(n, 32)
    return points, desc


def count(data: bytes) -> int:
    """How many keypoints ``data`` (from :func:`keypoints`) holds."""
    return int(np.frombuffer(data[:4], np.uint32)[0])


def inliers(query: bytes, stored: bytes) -> int:
    """How many keypoint matches of the two images agree on one similarity transform."""
    cv2 = _cv2()
    (pa, da), (pb, db) = _unpack(query), _unpack(stored)
    if len(da) < 2 or len(db) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(da, db, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < 6:
        return 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX)
    return 0 if mask is None else int(mask.sum())


def ambiguous(score: float) -> bool:
    """Whether a candidate with this score is worth checking."""
    return LOW <= score < VERIFIED


def rescore(score: float, query: bytes, stored: bytes, mirrored: Callable[[], bytes | None]) -> float:
    """The score of a candidate after verification (see the module's docstring). Before a score is lowered,
    the query's mirror image (``mirrored()``; None if unknown: then nothing is lowered) is checked too: the
    CNN scores a mirrored copy like the original, which no similarity transform maps onto it."""
    if not ambiguous(score):
        return score
    n = inliers(query, stored)
    if n >= MIN_INLIERS:
        return max(score, VERIFIED)
    if n < REJECT_INLIERS and BAND <= score and min(count(query), count(stored)) >= INFORMATIVE:
        mirror = mirrored()
        if mirror is not None and inliers(mirror, stored) < REJECT_INLIERS:
            return score - DEMOTION
    return score


def check(
    scores: list[float],
    stored: Callable[[int], bytes | None],
    query: Callable[[], bytes],
    mirrored: Callable[[], bytes | None],
) -> list[float]:
    """``scores`` (a search's candidates, best first) after verification: each of the first
    :data:`CANDIDATES` that is :func:`ambiguous` and has keypoints (``stored(i)``; None for an image stored
    before verification was on: no evidence either way) is rescored against the query's keypoints
    (``query()`` and ``mirrored()``, each computed on its first need only: most searches check nothing).
    Not re-ranked."""
    out = list(scores)
    points: bytes | None = None
    mirror: list[bytes | None] = []
    def mirror_once() -> bytes | None:
        if not mirror:
            mirror.append(mirrored())
        return mirror[0]

    for i, score in enumerate(scores[:CANDIDATES]):
        if not ambiguous(score):
            continue
        kept = stored(i)
        if kept is None:
            continue
        if points is None:
            points = query()
        out[i] = rescore(score, points, kept, mirror_once)
    return out
