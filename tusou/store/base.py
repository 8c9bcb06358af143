"""The storage contract: one interface, several backends (embedded SQLite today, a distributed engine later).

A store keeps groups of images per tenant (an access key), each image with its vector and metadata, and
answers nearest-neighbour queries. It knows nothing of HTTP, images or models: vectors come in as unit
float32 rows and similarity goes out as cosine.
"""

from __future__ import annotations

import contextlib
import gc
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# The store's refusals are part of the one error hierarchy (tusou.errors); re-exported for the backends.
from tusou.errors import BadMarker as BadMarker
from tusou.errors import GroupExists as GroupExists
from tusou.errors import GroupNotFound as GroupNotFound
from tusou.errors import ImageNotFound as ImageNotFound
from tusou.errors import StoreError as StoreError
from tusou.store.filters import Filter


class ModelMismatch(Exception):
    """The data folder was indexed with another model; searching it with this one would be meaningless."""


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a search's answer is built: thousands of acyclic objects
    (hits, matches, strings), nothing for it to find. Otherwise building 16k hits ran ~50 collections, some
    over every object of the process (a third of the build's time); the new objects are seen once, by the
    first collection after."""
    if not gc.isenabled():  # off already (another search building, or the application's choice)
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


#: ``update_image(desc=KEEP)``: leave the desc unchanged (None is a real value: "no desc").
KEEP: Any = object()


@dataclass
class NewImage:
    id: str
    label: str
    desc: Any
    uri: str | None
    vector: np.ndarray
    #: Automatic tags, [[class index, probability], ...] (tusou.embed.concepts); None: not computed.
    tags: list[list[float]] | None = None


@dataclass
class ImageInfo:
    id: str
    label: str
    desc: Any
    uri: str | None
    tags: list[list[float]] | None = None


@dataclass(slots=True)  # slots: a 16k-hit answer builds its hits ~30 % faster
class Hit:
    group: str
    id: str
    label: str
    desc: Any
    uri: str | None
    cosine: float  # for search_tags: the evidence (0..1)
    tags: list[list[float]] | None = None


@dataclass
class ItemError:
    """A per-image failure inside a batch write (becomes an ``errors[]`` entry)."""

    code: int
    message: str


class Store(ABC):
    """All methods are safe to call from several threads."""

    @abstractmethod
    def create_group(self, tenant: str, group: str, images: Sequence[NewImage]) -> list[ItemError | None]:
        """Create ``group`` holding ``images``; raises GroupExists. Returns one result per image."""

    @abstractmethod
    def add_images(self, tenant: str, group: str, images: Sequence[NewImage]) -> list[ItemError | None]:
        """Add images to an existing group; a repeated id or a full group is a per-image error."""

    @abstractmethod
    def remove_group(self, tenant: str, group: str) -> None: ...

    @abstractmethod
    def delete_images(self, tenant: str, group: str, ids: Sequence[str]) -> int:
        """Delete the named images; unknown ids are ignored. Returns how many were deleted."""

    @abstractmethod
    def list_groups(self, tenant: str) -> list[str]: ...

    @abstractmethod
    def count(self, tenant: str, group: str) -> int: ...

    @abstractmethod
    def list_images(self, tenant: str, group: str, marker: str, limit: int) -> tuple[list[ImageInfo], str]:
        """A page in insertion order after ``marker``; returns the page and the next marker ('' at the end).

        Markers stay valid while other clients add and delete: a page never repeats or skips an image
        that existed throughout the listing.
        """

    @abstractmethod
    def get_image(self, tenant: str, group: str, image_id: str) -> ImageInfo: ...

    @abstractmethod
    def update_image(
        self, tenant: str, group: str, image_id: str, *, label: str | None = None, desc: Any = KEEP
    ) -> ImageInfo:
        """Change an image's label and/or desc (``KEEP`` leaves desc as it is); returns the new record.

        The vector, id, uri and listing position stay as they are.
        """

    @abstractmethod
    def get_vector(self, tenant: str, group: str, image_id: str) -> np.ndarray: ...

    @abstractmethod
    def search(
        self,
        tenant: str,
        groups: Sequence[str],
        queries: np.ndarray,
        limit: int,
        min_cosine: float,
        where: Filter | None = None,
    ) -> list[Hit]:
        """Best ``limit`` images over ``groups`` with cosine >= min_cosine, best first.

        ``queries`` is (v, dim): several views of one query; an image scores its best cosine over them.
        ``limit`` -1 means every match. ``where`` (tusou.store.filters) keeps only the images it matches,
        applied before the limit. Raises GroupNotFound for the first of ``groups`` that does not exist:
        callers need no separate check, and a backend with a read-consistency wait (Milvus) makes the
        check in the same round as the search.
        """

    def search_tags(
        self,
        tenant: str,
        groups: Sequence[str],
        classes: Sequence[int],
        limit: int,
        min_evidence: float,
        where: Filter | None = None,
    ) -> list[Hit]:
        """Keyword search: images whose stored tags put at least ``min_evidence`` of probability on
        ``classes`` (Hit.cosine = that sum, 0..1), best first, ties in insertion order."""
        raise StoreError("keyword search is not supported by this store", 400)

    def set_tags(self, tenant: str, group: str, tags: dict[str, list[list[float]]]) -> int:
        """Replace the tags of the named images (``tusou retag``); returns how many were updated."""
        raise StoreError("tags are not supported by this store", 400)

    def read_snapshot(self) -> contextlib.AbstractContextManager[None]:
        """A block whose reads may share one consistency wait (the Milvus store under Strong reads); a search
        by a stored image's id reads the vector and then searches inside one. Default: nothing to share."""
        return contextlib.nullcontext()

    @abstractmethod
    def totals(self) -> tuple[int, int]:
        """Groups and images, all tenants together (for /metrics): one cheap read, not a walk."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; a second call does nothing."""
