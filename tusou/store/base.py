"""The storage contract: one interface, several backends (embedded SQLite today, a distributed engine later).

A store keeps groups of images per tenant (an access key), each image with its vector and metadata, and
answers nearest-neighbour queries. It knows nothing of HTTP, images or models: vectors come in as unit
float32 rows and similarity goes out as cosine.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, overload

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


def load_desc(text: str | None) -> Any:
    """A desc from its stored compact JSON text (None, or the text of "": the empty string)."""
    if text is None or text == '""':  # the usual desc, "": no JSON to parse
        return ""
    if text[:1] == '"' and "\\" not in text:
        # A plain string (the usual desc): our JSON text with no escape is the string between its quotes.
        return text[1:-1]
    return json.loads(text)


def load_tags(text: str | None) -> list[list[float]] | None:
    """Automatic tags from their stored JSON text (None: none computed)."""
    return None if text is None else json.loads(text)


def gatherer(rows: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A function that picks ``rows`` from a column, ``[column[i] for i in rows]``, in one C call where
    there are two rows or more: one ``itemgetter``, built once for all the columns of an answer (~25 %
    faster than an index per hit)."""
    if len(rows) > 1:
        return itemgetter(*rows)
    return lambda column: [column[i] for i in rows]


class Hits(Sequence[Hit]):
    """A search's answer in columns, best first: the i-th hit is ``groups[i]``, ``ids[i]``, ... with
    ``cosines[i]`` (a numpy array; for ``search_tags`` the evidence). No object per hit: a 10,000-hit answer
    goes from the store to the response body as these columns (``Hit`` objects are made only when indexed
    or iterated, for callers that want one hit at a time).

    ``json``: ``descs`` and ``tags`` hold each value's stored compact JSON text as ``json.dumps(value,
    ensure_ascii=False, separators=(",", ":"))`` wrote it (None: no desc, which reads as "", or no tags);
    else the values themselves."""

    __slots__ = ("cosines", "descs", "groups", "ids", "json", "labels", "tags", "uris")

    def __init__(
        self,
        groups: Sequence[str],
        ids: Sequence[str],
        labels: Sequence[str],
        descs: Sequence[Any],
        uris: Sequence[str | None],
        cosines: np.ndarray,
        tags: Sequence[Any],
        json: bool,
    ) -> None:
        self.groups, self.ids, self.labels, self.descs = groups, ids, labels, descs
        self.uris, self.cosines, self.tags, self.json = uris, cosines, tags, json

    @classmethod
    def of(cls, hits: Iterable[Hit]) -> Hits:
        """Columns of ``Hit`` objects (a store that builds its answer hit by hit)."""
        listed = list(hits)
        return cls(
            [h.group for h in listed],
            [h.id for h in listed],
            [h.label for h in listed],
            [h.desc for h in listed],
            [h.uri for h in listed],
            np.asarray([h.cosine for h in listed], dtype=np.float64),
            [h.tags for h in listed],
            json=False,
        )

    @classmethod
    def empty(cls) -> Hits:
        return cls([], [], [], [], [], np.zeros(0, dtype=np.float32), [], json=True)

    def __len__(self) -> int:
        return len(self.ids)

    def desc(self, i: int) -> Any:
        return load_desc(self.descs[i]) if self.json else self.descs[i]

    def tag_list(self, i: int) -> list[list[float]] | None:
        return load_tags(self.tags[i]) if self.json else self.tags[i]  # type: ignore[no-any-return]

    @overload
    def __getitem__(self, i: int) -> Hit: ...

    @overload
    def __getitem__(self, i: slice) -> Hits: ...

    def __getitem__(self, i: int | slice) -> Hit | Hits:
        if isinstance(i, slice):
            return Hits(
                self.groups[i], self.ids[i], self.labels[i], self.descs[i], self.uris[i], self.cosines[i],
                self.tags[i], self.json,
            )
        i = range(len(self))[i]  # negative indexes, and IndexError past the end
        return Hit(
            self.groups[i],
            self.ids[i],
            self.labels[i],
            self.desc(i),
            self.uris[i],
            float(self.cosines[i]),
            self.tag_list(i),
        )

    def __iter__(self) -> Iterator[Hit]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same hits (a list of ``Hit`` included)."""
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Hits({list(self)!r})"

    def take(self, rows: Sequence[int] | np.ndarray) -> Hits:
        """The hits at ``rows``, in that order."""
        picked = rows.tolist() if isinstance(rows, np.ndarray) else list(rows)
        get = gatherer(picked)
        return Hits(
            get(self.groups),
            get(self.ids),
            get(self.labels),
            get(self.descs),
            get(self.uris),
            self.cosines[np.asarray(picked, dtype=np.intp)],
            get(self.tags),
            self.json,
        )


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
    ) -> Hits:
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
    ) -> Hits:
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
