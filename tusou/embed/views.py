"""Which views of an image are embedded for indexing and for querying.

Two cheap fixes for what the CNN feature is not invariant to, chosen on the evaluation sets
(docs/score.md, ``python bench/quality.py --calibrate``):

- index time: the stored vector is the mean of the raw features of the image and of a 64 px thumbnail
  of it (``low64``). Blurred, downscaled and recompressed copies lose fine texture, which moves their
  feature a long way; a stored vector halfway towards "the same picture without detail" meets them
  much closer, while unrelated images gain nothing. Costs one more forward pass per indexed image and
  no memory. (The mirror view is not needed: EfficientNet-Lite's pooled feature is already nearly
  mirror-invariant, hflip recall@1 is 1.0 without it.)
- query time: the query is searched in its four quarter turns and each stored image scores its best
  cosine over them, so copies rotated by 90/180/270 degrees are found. Costs 3 more forward passes per
  query; more views also give unrelated images more chances to score high, which the score calibration
  accounts for (it is fitted on the max over these views).

``INDEX_VIEWS`` / ``QUERY_VIEWS`` name the views; they are read at call time, so changing them here (or
assigning them at start-up) is all it takes. The score calibration in ``data/`` was fitted for the
values below: refit (``bench/quality.py --calibrate --write``) after changing them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from tusou.images import to_rgb

_T = Image.Transpose

#: Short side of the ``low64`` thumbnail view.
LOW_RES_SIDE = 64


def _low_res(image: Image.Image, side: int = LOW_RES_SIDE) -> Image.Image:
    """The image shrunk (area average) so its shorter side is ``side`` px; the model's resize then
    scales it back up, so the network sees the same picture without fine detail."""
    w, h = image.size
    scale = side / min(w, h)
    if scale >= 1.0:
        return image
    # Flatten on white first, as the preprocessing does for the full image: resizing would otherwise smear
    # the arbitrary colour of transparent pixels into the picture.
    image = to_rgb(image)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BOX)


#: Named views: the dihedral group of the square (quarter turns, each with and without mirroring) and a
#: low-resolution copy.
VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "id": lambda im: im,
    "hflip": lambda im: im.transpose(_T.FLIP_LEFT_RIGHT),
    "r90": lambda im: im.transpose(_T.ROTATE_90),
    "r180": lambda im: im.transpose(_T.ROTATE_180),
    "r270": lambda im: im.transpose(_T.ROTATE_270),
    "hflip_r90": lambda im: im.transpose(_T.TRANSPOSE),
    "hflip_r180": lambda im: im.transpose(_T.FLIP_TOP_BOTTOM),
    "hflip_r270": lambda im: im.transpose(_T.TRANSVERSE),
    "low64": _low_res,
}

INDEX_VIEWS: tuple[str, ...] = ("id", "low64")
QUERY_VIEWS: tuple[str, ...] = ("id", "r90", "r180", "r270")


def make_views(image: Image.Image, names: Sequence[str]) -> list[Image.Image]:
    """The named views of ``image``, in order."""
    return [VIEWS[n](image) for n in names]


_QUARTER_TURNS = {"id": 0, "r90": 1, "r180": 2, "r270": 3}


def quarter_turns(names: Sequence[str]) -> list[int] | None:
    """Counter-clockwise quarter turns for views that are all plain rotations, else None.

    Rotating an image and then centre-cropping it equals centre-cropping and then rotating the crop, so
    such views can share one preprocessing pass (the model input is rotated instead of the image).
    """
    if all(n in _QUARTER_TURNS for n in names):
        return [_QUARTER_TURNS[n] for n in names]
    return None


def index_views(image: Image.Image) -> list[Image.Image]:
    """Views averaged into the one stored vector of an image."""
    return make_views(image, INDEX_VIEWS)


def query_views(image: Image.Image) -> list[Image.Image]:
    """Views a query is searched with; a stored image scores its best cosine over them."""
    return make_views(image, QUERY_VIEWS)
