"""What the use cases take and give: typed requests and domain results, free of any wire format.

:mod:`tusou.api.qiniu` builds these from Qiniu's JSON and form bodies (with Qiniu's exact statuses and
messages for whatever does not fit) and renders the results back; :class:`tusou.service.Service` works on
them alone. Fields hold values that already passed the wire rules: ids are strings, limits are resolved.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, overload

import numpy as np

from tusou.duplicates import Cluster
from tusou.store.base import Hits, ImageInfo, ItemError
from tusou.store.filters import Filter

#: A value JSON can carry (an image's ``desc``).
JSONValue: TypeAlias = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]

__all__ = [
    "BatchResult",
    "DeleteImages",
    "Duplicate",
    "DuplicatePage",
    "FindDuplicates",
    "ImageInfo",
    "ImageRef",
    "ItemError",
    "JSONValue",
    "ListImages",
    "Match",
    "Matches",
    "NewImages",
    "NewItem",
    "Page",
    "SearchQuery",
    "UpdateImage",
]


@dataclass(frozen=True)
class NewItem:
    """One image of a new/add request, valid as far as the request itself can tell."""

    id: str | None  # None: the service generates one
    label: str
    desc: JSONValue
    uri: str


@dataclass(frozen=True)
class NewImages:
    """new and add: ``items`` index for index with the request; an ItemError is refused in place.

    Beyond Qiniu: ``duplicates`` ("report" or "refuse") asks for each image's near-duplicate, an image of
    the group or an earlier one of the same request scoring at least ``duplicate_threshold`` (None: the
    near-duplicate band, :data:`DUPLICATE_THRESHOLD`); "refuse" does not store such an image.
    """

    group: str
    items: list[NewItem | ItemError]
    duplicates: str | None = None
    duplicate_threshold: float | None = None


#: The least score of a near-duplicate (docs/score.md: no unrelated dev query reaches it).
DUPLICATE_THRESHOLD = 0.85


@dataclass(frozen=True)
class Duplicate:
    """The best near-duplicate of an added image: an image of the group, or of the same request."""

    id: str
    score: float


@dataclass(frozen=True)
class BatchResult:
    """Per item: its id (``""`` where it failed) and its error (None where it was stored).

    ``duplicates`` (only when the request asked): per item, its best near-duplicate or None.
    """

    images: list[str]
    errors: list[ItemError | None]
    duplicates: list[Duplicate | None] | None = None


@dataclass(frozen=True)
class ImageRef:
    group: str
    id: str
    with_tags: bool = False  # beyond Qiniu: the image call answers the automatic tags too


@dataclass(frozen=True)
class DeleteImages:
    group: str
    ids: list[str]


@dataclass(frozen=True)
class ListImages:
    group: str
    marker: str
    limit: int
    with_tags: bool = False  # beyond Qiniu: each listed value carries its automatic tags


@dataclass(frozen=True)
class Page:
    images: list[ImageInfo]
    marker: str  # "" after the last page


@dataclass(frozen=True)
class UpdateImage:
    """Change a stored image's label (None: keep) and/or desc (``keep_desc``: keep; None is a value)."""

    group: str
    id: str
    label: str | None
    desc: JSONValue
    keep_desc: bool


@dataclass(frozen=True)
class SearchQuery:
    """The best ``limit`` images over ``groups`` scoring at least the threshold.

    The query is an image (``uri``) or, beyond Qiniu, a stored image's vector (``by_id``); ``labels``
    (beyond Qiniu) keeps only hits with one of these labels. Also beyond Qiniu: ``text`` searches by a
    word instead (keyword search over the automatic tags; ``threshold`` is then the least evidence),
    ``where`` keeps only images that pass a filter on label and desc keys, inside the search, and
    ``with_tags`` returns each hit's tags.
    """

    groups: list[str]
    limit: int
    threshold: float | None  # None: the system default; a lower one is raised to it
    uri: str | None = None
    by_id: ImageRef | None = None
    labels: frozenset[str] | None = None
    text: str | None = None
    where: Filter | None = None
    with_tags: bool = False
    #: Beyond Qiniu: search with this part of the ``uri`` image, (x0, y0, x1, y1); fractions of the
    #: width and height when every value is <= 1, else pixels of the image as displayed.
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Match:
    """A search hit with its 0..1 score."""

    group: str
    id: str
    label: str
    desc: JSONValue
    uri: str | None
    score: float
    tags: list[list[float]] | None = None  # only filled when the query asked for them


class Matches(Sequence[Match]):
    """A search's answer in columns, best first (``Match`` for each hit, without an object per hit): the
    store's :class:`tusou.store.base.Hits` with their 0..1 ``scores`` (float64). ``tags``: None unless the
    query asked for them. The renderer (``tusou.api.qiniu.hits_body``) writes the body from the columns;
    indexing or iterating gives ``Match`` objects."""

    __slots__ = ("hits", "scores", "with_tags")

    def __init__(self, hits: Hits, scores: np.ndarray, with_tags: bool) -> None:
        self.hits, self.scores, self.with_tags = hits, scores, with_tags

    @classmethod
    def empty(cls) -> Matches:
        return cls(Hits.empty(), np.zeros(0), False)

    def __len__(self) -> int:
        return len(self.hits)

    @overload
    def __getitem__(self, i: int) -> Match: ...

    @overload
    def __getitem__(self, i: slice) -> Matches: ...

    def __getitem__(self, i: int | slice) -> Match | Matches:
        if isinstance(i, slice):
            return Matches(self.hits[i], self.scores[i], self.with_tags)
        i = range(len(self))[i]  # negative indexes, and IndexError past the end
        hits = self.hits
        return Match(
            hits.groups[i],
            hits.ids[i],
            hits.labels[i],
            hits.desc(i),
            hits.uris[i] or None,
            float(self.scores[i]),
            (hits.tag_list(i) or []) if self.with_tags else None,
        )

    def __iter__(self) -> Iterator[Match]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Matches({list(self)!r})"


@dataclass(frozen=True)
class FindDuplicates:
    """Beyond Qiniu: near-duplicate pairs among ``limit`` images of ``group`` after ``marker``, each
    image searched against the whole group at ``threshold`` (None: :data:`DUPLICATE_THRESHOLD`)."""

    group: str
    marker: str
    limit: int
    threshold: float | None


@dataclass(frozen=True)
class DuplicatePage:
    """The clusters of the pairs found from one page of images; ``marker`` "" after the last page."""

    clusters: list[Cluster]
    marker: str
    scanned: int
