"""Local-feature verification of search candidates (``TUSOU_VERIFY=true``; off by default).

A global CNN descriptor ranks an edited copy first almost always (neardup recall@1 0.996) but often scores
heavy edits (crop + downscale + caption + JPEG, grayscale, colour shifts) in the ambiguous 0.3-0.85 band.
With verification on, the service keeps ORB keypoints of every image it stores (at most
:data:`KEYPOINTS`, found on the image resized to a :data:`SIDE` px longer side; ~40 KB per image, in
``keypoints.db`` beside the store), and a search with an image checks its best :data:`CANDIDATES`
candidates scoring at least :data:`LOW`: when at least :data:`MIN_INLIERS` keypoint matches (Lowe's ratio
test) agree on one similarity transform (RANSAC), the candidate is a verified copy and scores at least
:data:`VERIFIED`, the near-duplicate band. The score stays monotone in evidence: verification only ever
raises a score. Measured on the dev near-dup set: docs/score.md ("Local-feature verification").

Needs OpenCV (``pip install 'tusou[verify]'``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

KEYPOINTS = 1000
SIDE = 512
CANDIDATES = 3
LOW = 0.3
MIN_INLIERS = 40  # wrong candidates on the dev set: at most 40 inliers, 99th percentile 16
VERIFIED = 0.85
RATIO = 0.8
REPROJECTION_PX = 6.0


def _cv2():  # type: ignore[no-untyped-def]
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("TUSOU_VERIFY needs OpenCV: pip install 'tusou[verify]'") from exc
    return cv2


def check_available() -> None:
    """Raises RuntimeError at start-up when verification is on but OpenCV is missing."""
    _cv2()


def keypoints(image: Image.Image) -> bytes:
    """ORB keypoints of ``image``, packed: count (uint32), float32 (x, y) per point, 32-byte descriptors."""
    cv2 = _cv2()
    grey = image.convert("L")
    scale = SIDE / max(grey.size)
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    grey = grey.resize(size, Image.Resampling.BILINEAR)
    found, desc = cv2.ORB_create(nfeatures=KEYPOINTS).detectAndCompute(np.asarray(grey), None)
    if desc is None or not found:
        return np.uint32(0).tobytes()
    points = np.asarray([k.pt for k in found], dtype=np.float32)
    return np.uint32(len(found)).tobytes() + points.tobytes() + np.ascontiguousarray(desc, np.uint8).tobytes()


def _unpack(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = int(np.frombuffer(data[:4], np.uint32)[0])
    points = np.frombuffer(data[4 : 4 + 8 * n], np.float32).reshape(n, 2)
    desc = np.frombuffer(data[4 + 8 * n : 4 + 8 * n + 32 * n], np.uint8).reshape(n, 32)
    return points, desc


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


def verified(query: bytes, stored: bytes) -> bool:
    return inliers(query, stored) >= MIN_INLIERS
