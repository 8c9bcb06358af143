"""Which views of an image are embedded for indexing and for querying.

STUB: returns the image itself; robustness work (rotations, mirror) replaces it.
"""

from __future__ import annotations

from PIL import Image


def index_views(image: Image.Image) -> list[Image.Image]:
    """Views averaged into the one stored vector of an image."""
    return [image]


def query_views(image: Image.Image) -> list[Image.Image]:
    """Views a query is searched with; a stored image scores its best cosine over them."""
    return [image]
