"""The use cases of tusou: what each API call does, independent of HTTP and of Qiniu's wire format.

The HTTP layer (``tusou.api``) turns requests into the typed requests of :mod:`tusou.domain` and calls
these methods from worker threads; they turn URIs into images (``tusou.images``), images into vectors
(``tusou.embed``) and keep or search them (``tusou.store``), and return domain objects. A request that
cannot be served raises a :class:`tusou.errors.QiniuError` (the store's and the image loader's are ones);
per-image failures in a batch become ``BatchResult.errors`` entries instead.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from tusou import verify
from tusou.batching import Batcher, FairPool
from tusou.config import Settings
from tusou.domain import (
    DUPLICATE_THRESHOLD,
    BatchResult,
    DeleteImages,
    Duplicate,
    DuplicatePage,
    FindDuplicates,
    ImageInfo,
    ImageRef,
    ItemError,
    ListImages,
    Matches,
    NewImages,
    NewItem,
    Page,
    SearchQuery,
    UpdateImage,
)
from tusou.duplicates import clusters, pair
from tusou.embed import concepts
from tusou.embed.base import Embedder
from tusou.errors import GroupExists, ImageNotFound, QiniuError
from tusou.fetch import Fetcher, load_image
from tusou.files import tighten_tree
from tusou.images import ImageError, PixelBudget
from tusou.store.base import KEEP, Hits, NewImage, Store
from tusou.thumbs import ThumbStore, make_thumbnail

#: The most near-duplicates one image is paired with by ``Service.duplicates`` (bounds each search).
DUPLICATE_NEIGHBOURS = 32
#: Ids of one delete request handed to the stores at once (Service.delete_images).
DELETE_CHUNK = 1000

#: model=clip: the least text-image cosine a keyword search hit needs unless the query sets a threshold.
CLIP_TEXT_THRESHOLD = 0.2

T = TypeVar("T")


class Observer:
    """What the service reports as it works (metrics hook). The default does nothing."""

    def embedded(self, purpose: str, count: int, seconds: float) -> None:
        """``count`` images went through the model in one call (``purpose``: "index" or "query")."""

    def image_failed(self, error: ImageError) -> None:
        """An image could not be fetched or decoded (a per-image error, or a failed search query)."""


class Service:
    def __init__(self, settings: Settings, store: Store, embedder: Embedder, fetcher: Fetcher) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.fetcher = fetcher
        self.observer = Observer()
        self.budget = PixelBudget(settings.decode_max_pixels, settings.decode_wait_s)
        # Small pictures of stored images for the web page (tusou/thumbs.py); None when turned off.
        self.thumbs = ThumbStore(settings.data / "thumbs.db") if settings.thumbnails else None
        # Keypoints per stored image for verification (tusou/verify.py), in a file of the thumbnails' format.
        self.keypoints: ThumbStore | None = None
        # Order the writes of a group's images with those of their pictures (_write, delete_images,
        # remove_group): a lock per (tenant, group) while in use, so other groups' writes go on meanwhile.
        self._pictures_locks: weakref.WeakValueDictionary[tuple[str, str], Any]
        self._pictures_locks = weakref.WeakValueDictionary()
        self._pictures_guard = threading.Lock()
        if settings.verify:
            verify.check_available()
            self.keypoints = ThumbStore(settings.data / "keypoints.db")
        cpus = os.cpu_count() or 1
        # Images of a new/add: downloads on their own threads, a few per tenant at once, so one tenant's
        # slow URLs hold only its own share; inline (data:) images on others, so they never wait behind
        # anybody's downloads. Both serve tenants in turn; each thread decodes, embeds, and drops its image.
        self._fetches = FairPool(settings.fetch_max_concurrent, settings.fetch_max_per_tenant, "fetch")
        self._decodes = FairPool(2 * cpus, cpus, "decode")
        # Automatic tags need the classifier's output, which only the built-in graphs have.
        self.tagging = bool(settings.tags and getattr(embedder, "has_classes", False))
        # Indexing runs one worker per core (throughput); queries one worker whose calls use every core.
        self._embed_images = Batcher(
            self._timed(self._embed_tagged if self.tagging else embedder.embed_images, "index"),
            max(1, settings.embed_batch // 2),
            "embed-index",
            workers=os.cpu_count() or 1,
        )
        self._embed_queries = Batcher(
            self._timed(embedder.embed_queries, "query"), settings.embed_batch, "embed-query"
        )
        self.default_threshold = (
            settings.default_threshold
            if settings.default_threshold is not None
            else float(embedder.default_threshold)
        )

    def _timed(
        self, fn: Callable[[list[Any]], np.ndarray], purpose: str
    ) -> Callable[[list[Any]], np.ndarray]:
        def run(items: list[Any]) -> np.ndarray:
            start = time.perf_counter()
            result = fn(items)
            self.observer.embedded(purpose, len(items), time.perf_counter() - start)
            return result

        return run

    def _embed_tagged(self, images: list[Any]) -> np.ndarray:
        """Vectors and class probabilities side by side, (n, dim + classes): one array for the Batcher."""
        vecs, probs = self.embedder.embed_images_tagged(images)  # type: ignore[attr-defined]
        if probs is None:
            return np.asarray(vecs)
        return np.hstack([vecs, probs])

    def tags_for(self, rows: np.ndarray) -> list[list[list[float]] | None]:
        """Stored tags of each row of ``_embed_tagged``'s output (None where there are no probabilities)."""
        dim = self.embedder.dim
        if rows.ndim != 2 or rows.shape[1] <= dim:
            return [None] * len(rows)
        table = concepts.load()
        return [table.tags(row[dim:]) for row in rows]

    def close(self) -> None:
        """Stop the workers and close the store (the service owns it from here on)."""
        self._fetches.close()
        self._decodes.close()
        self._embed_images.close()
        self._embed_queries.close()
        if self.thumbs is not None:
            self.thumbs.close()
        if self.keypoints is not None:
            self.keypoints.close()
        self.store.close()

    def health(self) -> None:
        """Raises if the store cannot answer a trivial read."""
        self.store.list_groups("")  # "" is never an access key: this reads no one's data

    # --- writes --------------------------------------------------------------------------------------
    def new_group(self, tenant: str, request: NewImages) -> BatchResult:
        groups = self.store.list_groups(tenant)
        if request.group in groups:
            raise GroupExists(request.group)
        cap = self.settings.max_groups_per_key
        if cap and len(groups) >= cap:
            # Checked before the write, not under the store's lock: racing creates may pass it together,
            # which a bound on memory (not an exact quota) can afford.
            raise QiniuError(400, f"too many groups: {cap} at most per access key")

        def create(images: list[NewImage]) -> list[ItemError | None]:
            # Images were sent and none could be stored: no group either, so the same request can simply be
            # sent again (an empty group would answer "group already exists"). `data: []` still creates one.
            if request.items and not images:
                return []
            return self.store.create_group(tenant, request.group, images)

        return self._write(tenant, request, create, in_group=False)

    def add_images(self, tenant: str, request: NewImages) -> BatchResult:
        self.store.count(tenant, request.group)  # fail fast on an unknown group, before fetching
        return self._write(
            tenant, request, lambda images: self.store.add_images(tenant, request.group, images)
        )

    def _write(
        self,
        tenant: str,
        request: NewImages,
        commit: Callable[[list[NewImage]], list[ItemError | None]],
        in_group: bool = True,
    ) -> BatchResult:
        group, items = request.group, request.items
        uris = [it.uri if isinstance(it, NewItem) else None for it in items]
        vectors = self._vectors_and_pictures(tenant, uris, queries=request.duplicates is not None)
        errors: list[ItemError | None] = [None] * len(items)
        ready: list[tuple[int, NewItem, np.ndarray]] = []
        pictures: list[bytes | None] = []
        views: list[tuple[np.ndarray, bytes | None, bytes | None] | None] = []
        keypoints: list[bytes | None] = []
        for i, (item, loaded) in enumerate(zip(items, vectors, strict=True)):
            if isinstance(item, ItemError):
                errors[i] = item
            elif isinstance(loaded, ImageError):
                errors[i] = ItemError(loaded.status, loaded.message)
            elif loaded is not None:
                ready.append((i, item, loaded[0]))
                pictures.append(loaded[1])
                views.append(loaded[2])
                keypoints.append(loaded[3])
        # With tags on, each row is the vector followed by the class probabilities (_embed_tagged).
        dim = self.embedder.dim
        new_ids = [item.id if item.id is not None else uuid.uuid4().hex for _, item, _ in ready]
        duplicates: list[Duplicate | None] | None = None
        if request.duplicates is not None:
            duplicates = [None] * len(items)
            found = self._duplicates(tenant, request, in_group, ready, new_ids, views)
            keep = []
            for row, ((i, _, _), dup) in enumerate(zip(ready, found, strict=True)):
                duplicates[i] = dup
                if dup is not None and request.duplicates == "refuse":
                    errors[i] = ItemError(409, f"near-duplicate of image {dup.id}")
                else:
                    keep.append(row)
            ready = [ready[row] for row in keep]
            pictures = [pictures[row] for row in keep]
            keypoints = [keypoints[row] for row in keep]
            new_ids = [new_ids[row] for row in keep]
        tags = self.tags_for(np.stack([row for _, _, row in ready])) if self.tagging and ready else None
        new_images = [
            NewImage(
                new_ids[row],
                item.label,
                item.desc,
                item.uri if not item.uri.startswith("data:") else None,
                np.ascontiguousarray(vector[:dim]),
                tags[row] if tags is not None else None,
            )
            for row, (_, item, vector) in enumerate(ready)
        ]
        # Under the group's _pictures lock from the commit until the pictures are kept: a delete of the same
        # ids cannot run in between (it left the deleted image's thumbnail and keypoints behind, for good).
        with self._pictures(tenant, group):
            results = commit(new_images)
            ids = [""] * len(items)
            stored: list[tuple[str, bytes]] = []
            stored_keypoints: list[tuple[str, bytes]] = []
            for (i, _, _), new_image, result, picture, points in zip(
                ready, new_images, results, pictures, keypoints, strict=True
            ):
                if result is None:
                    ids[i] = new_image.id
                    if picture is not None:
                        stored.append((new_image.id, picture))
                    if points is not None:
                        stored_keypoints.append((new_image.id, points))
                else:
                    errors[i] = result
            # After the images are stored: a crash between leaves an image without a picture, not the reverse.
            if self.thumbs is not None:
                self.thumbs.put_after_images(tenant, group, stored)
            if self.keypoints is not None:
                self.keypoints.put_after_images(tenant, group, stored_keypoints)
        return BatchResult(ids, errors, duplicates)

    def _duplicates(
        self,
        tenant: str,
        request: NewImages,
        in_group: bool,
        ready: list[tuple[int, NewItem, np.ndarray]],
        ids: list[str],
        views: list[tuple[np.ndarray, bytes | None, bytes | None] | None],
    ) -> list[Duplicate | None]:
        """Each ready image's best near-duplicate: the group's best hit for its query views (exactly what a
        search with it would score, verification included when it is on), or an earlier image of the same
        request that is being stored, if that scores higher. With "refuse", a refused image is no candidate
        for later ones (its duplicate is)."""
        floor = max(
            request.duplicate_threshold if request.duplicate_threshold is not None else DUPLICATE_THRESHOLD,
            self.default_threshold,
        )
        min_cosine = self.embedder.cosine_for_score(floor)
        dim = self.embedder.dim
        earlier: list[tuple[str, np.ndarray]] = []
        found: list[Duplicate | None] = []
        for (_, _, vector), image_id, viewed in zip(ready, ids, views, strict=True):
            assert viewed is not None
            query, seen, mirror = viewed
            best: tuple[str, float] | None = None
            if in_group:
                hits, scores = self._scored(
                    tenant, [request.group], query, 1, min_cosine, verifying=seen is not None
                )
                if seen is not None:
                    hits, scores = self._checked(tenant, hits, scores, _given(seen), _given(mirror))
                if len(hits) and scores[0] >= floor:
                    best = (hits.ids[0], float(scores[0]))
            if earlier:
                cosines = (query @ np.stack([v for _, v in earlier]).T).max(axis=0)
                j = int(np.argmax(cosines))
                score = float(self.embedder.score(cosines[j : j + 1].astype(np.float32))[0])
                if cosines[j] >= min_cosine and score >= floor and (best is None or score > best[1]):
                    best = (earlier[j][0], score)
            if best is not None:
                found.append(Duplicate(best[0], best[1]))
                if request.duplicates == "refuse":
                    continue
            else:
                found.append(None)
            earlier.append((image_id, np.ascontiguousarray(vector[:dim])))
        return found

    def _scored(
        self,
        tenant: str,
        groups: list[str],
        queries: np.ndarray,
        limit: int,
        min_cosine: float,
        where: Any = None,
        labels: Collection[str] | None = None,
        verifying: bool = True,
    ) -> tuple[Hits, np.ndarray]:
        """The store's best hits for ``queries`` with their scores (float64), best first; with verification
        on (and ``verifying``: the query has an image), enough of them for :meth:`_checked` (its first
        ``verify.CANDIDATES``, down to ``verify.LOW``) whatever the limit asks. With ``labels`` only down to
        ``verify.BAND``: that search asks for every hit above the cut (the label filter comes after), and on
        a big group far more images score above ``verify.LOW`` than above it."""
        extra = () if where is None else (where,)
        if self.keypoints is not None and verifying and not labels:
            # Only the first CANDIDATES hits are checked, and a hit under the cut that is not among them is
            # dropped anyway: the cut's answer is enough once it has CANDIDATES hits, else the best
            # CANDIDATES down to LOW hold it. (Every hit down to LOW cost a 500k group's search up to
            # ~100k rows re-ranked and read, for an answer of a few.)
            if 0 < limit < verify.CANDIDATES:
                # Verification raises a candidate to VERIFIED at most and never checks one above it: when
                # the asked hits all score VERIFIED or more, no candidate under them can overtake them and
                # the answer stands without fetching more. (Fetching CANDIDATES > 1 hits takes the exact
                # scan wherever many rows match: ~450 ms at 5M rows for a limit=1 search.)
                hits = self.store.search(tenant, groups, queries, limit, min_cosine, *extra)
                scores = self._scores(hits)
                if len(hits) == limit and float(scores.min()) >= verify.VERIFIED:
                    return hits, scores
            limit = limit if limit == -1 else max(limit, verify.CANDIDATES)
            hits = self.store.search(tenant, groups, queries, limit, min_cosine, *extra)
            if len(hits) < verify.CANDIDATES:
                low = min(min_cosine, self.embedder.cosine_for_score(verify.LOW))
                hits = self.store.search(tenant, groups, queries, verify.CANDIDATES, low, *extra)
            return hits, self._scores(hits)
        if self.keypoints is not None and verifying:
            min_cosine = min(min_cosine, self.embedder.cosine_for_score(verify.BAND))
            limit = limit if limit == -1 else max(limit, verify.CANDIDATES)
        hits = self.store.search(tenant, groups, queries, -1 if labels else limit, min_cosine, *extra)
        hits = _labelled(hits, labels, limit)
        return hits, self._scores(hits)

    def _scores(self, hits: Hits) -> np.ndarray:
        """The 0..1 scores of ``hits``' cosines (float64: the values compare with a threshold as Python
        floats do)."""
        return self.embedder.score(np.asarray(hits.cosines, dtype=np.float32)).astype(np.float64)

    def _checked(
        self,
        tenant: str,
        hits: Hits,
        scores: np.ndarray,
        points: Callable[[], bytes],
        mirrored: Callable[[], bytes | None],
    ) -> tuple[Hits, np.ndarray]:
        """``hits`` rescored by verification (``verify.check``) against the query's keypoints (``points()``,
        ``mirrored()``: computed on their first need only) and ranked again."""
        keypoints = self.keypoints
        assert keypoints is not None
        groups, ids = hits.groups, hits.ids
        checked = verify.check(
            scores.tolist(),
            lambda i: keypoints.get(tenant, groups[i], [ids[i]]).get(ids[i]),
            points,
            mirrored,
        )
        order = sorted(range(len(hits)), key=lambda i: -checked[i])  # stable: ties keep the search's order
        return hits.take(order), np.asarray([checked[i] for i in order], dtype=np.float64)

    def _load(self, tenant: str, uri: str, full_size: bool = False) -> Image.Image:
        """A uri -> RGB image shrunk to what the model needs (``full_size``: not shrunk), decoded inside the
        server's pixel budget. A download runs on the fetch threads in ``tenant``'s turn; an inline image
        right here."""
        min_short = None if full_size else self.embedder.min_short
        try:
            if _is_url(uri):
                return self._fetches.run(
                    tenant, lambda: load_image(uri, self.fetcher, min_short, self.budget)
                )
            return load_image(uri, self.fetcher, min_short, self.budget)
        except ImageError as exc:
            self.observer.image_failed(exc)
            raise

    def _vectors(self, tenant: str, uris: list[str | None]) -> list[np.ndarray | ImageError | None]:
        """One index vector per uri (None stays None)."""
        loaded = self._vectors_and_pictures(tenant, uris, pictures=False)
        return [v[0] if isinstance(v, tuple) else v for v in loaded]

    def _vectors_and_pictures(
        self, tenant: str, uris: list[str | None], pictures: bool = True, queries: bool = False
    ) -> list[_Loaded | ImageError | None]:
        """One index vector per uri (None stays None), with its thumbnail when those are kept and wanted,
        its query views when ``queries`` (duplicate detection; with its keypoints as a query's and its
        mirror image's when keypoints are kept), and its keypoints when those are kept and pictures are
        wanted. Each image is embedded as soon as it is decoded and dropped right after, so a request never
        holds its whole batch decoded."""
        keep = pictures and self.thumbs is not None
        points = pictures and self.keypoints is not None

        def one(uri: str) -> _Loaded | ImageError:
            try:
                image = load_image(uri, self.fetcher, self.embedder.min_short, self.budget)
            except ImageError as exc:
                self.observer.image_failed(exc)
                return exc
            vector: np.ndarray = self._embed_images([image], tenant)[0]
            views = None
            if queries:
                seen = verify.keypoints(image, query=True) if points else None
                mirrored = verify.keypoints(image, query=True, mirrored=True) if points else None
                views = (self._embed_queries([image], tenant)[0], seen, mirrored)
            return (
                vector,
                make_thumbnail(image) if keep else None,
                views,
                verify.keypoints(image) if points else None,
            )

        futures = [
            None if uri is None else (self._fetches if _is_url(uri) else self._decodes).submit(
                tenant, lambda uri=uri: one(uri)  # type: ignore[misc]
            )
            for uri in uris
        ]
        return [None if future is None else future.result() for future in futures]

    def _query_vectors(self, tenant: str, query: SearchQuery) -> tuple[np.ndarray, Image.Image | None]:
        """(v, dim): the views of the query image, or the stored image's vector as one view; and the query
        image itself when verification is on (its keypoints are computed only if a candidate needs them)."""
        if query.by_id is not None:
            return self.store.get_vector(tenant, query.by_id.group, query.by_id.id)[None, :], None
        if query.uri is None:
            raise QiniuError(406, "empty uri")
        pixels = query.box is not None and max(query.box) > 1
        image = self._load(tenant, query.uri, full_size=pixels)
        if query.box is not None:
            image = _crop(image, query.box, pixels)
        queries: np.ndarray = self._embed_queries([image], tenant)[0]
        return queries, image if self.keypoints is not None else None

    def totals(self) -> tuple[int, int]:
        """Groups and images in the store, all tenants together (for /metrics)."""
        return self.store.totals()

    def _pictures(self, tenant: str, group: str) -> Any:
        """The lock of this group's image and picture writes (gone once no request holds it)."""
        with self._pictures_guard:
            lock = self._pictures_locks.get((tenant, group))
            if lock is None:
                lock = self._pictures_locks[(tenant, group)] = threading.Lock()
            return lock

    def remove_group(self, tenant: str, group: str) -> None:
        # Pictures first (none for an unknown group): a crash between leaves images without pictures only.
        with self._pictures(tenant, group):
            if self.thumbs is not None:
                self.thumbs.drop_group(tenant, group)
            if self.keypoints is not None:
                self.keypoints.drop_group(tenant, group)
            self.store.remove_group(tenant, group)

    def delete_images(self, tenant: str, request: DeleteImages) -> int:
        # A chunk at a time: the store, thumbnails and keypoints each delete under one write lock shared by
        # every tenant, and one request may name millions of ids; whole, it held the others' writes for as
        # long. Each id is gone once its chunk returns (a crash midway leaves the rest, as a retry expects).
        ids = request.ids
        deleted = 0
        for start in range(0, max(1, len(ids)), DELETE_CHUNK):  # once even for [] (checks the group)
            chunk = ids[start : start + DELETE_CHUNK]
            with self._pictures(tenant, request.group):
                if self.thumbs is not None:
                    self.thumbs.delete(tenant, request.group, chunk)
                if self.keypoints is not None:
                    self.keypoints.delete(tenant, request.group, chunk)
                deleted += self.store.delete_images(tenant, request.group, chunk)
        return deleted

    def thumbnails(self, tenant: str, request: DeleteImages) -> dict[str, bytes]:
        """The kept thumbnails (JPEG) of these images of a group; images without one are left out."""
        self.store.count(tenant, request.group)  # an unknown group: the store's usual error
        if self.thumbs is None:
            return {}
        return self.thumbs.get(tenant, request.group, request.ids)

    def update_image(self, tenant: str, request: UpdateImage) -> ImageInfo:
        """Change a stored image's label and/or desc (beyond Qiniu); its vector stays."""
        desc = KEEP if request.keep_desc else request.desc
        return self.store.update_image(tenant, request.group, request.id, label=request.label, desc=desc)

    # --- reads ---------------------------------------------------------------------------------------
    def list_groups(self, tenant: str) -> list[str]:
        return self.store.list_groups(tenant)

    def group_count(self, tenant: str, group: str) -> int:
        return self.store.count(tenant, group)

    def make_missing_thumbnails(
        self, tenant: str, group: str, progress: Callable[[int, int, int], None] | None = None
    ) -> dict[str, int]:
        """Thumbnails for a group's images that have none, from their stored URIs (``tusou thumbs``): images
        stored before thumbnails existed, or while they were off. Only the picture is made (no embedding).

        Returns counts: ``made``, ``had`` (already had one), ``no_uri`` (added from data URIs: tusou keeps no
        copy of those, so they get a picture only when added again), ``failed`` (fetch or decode failed).
        """
        if self.thumbs is None:
            raise QiniuError(400, "thumbnails are turned off (TUSOU_THUMBNAILS=false)")
        thumbs = self.thumbs
        total = self.store.count(tenant, group)
        counts = {"made": 0, "had": 0, "no_uri": 0, "failed": 0}

        def picture(uri: str) -> bytes | None:
            try:
                return make_thumbnail(self._load(tenant, uri))
            except ImageError:
                return None

        marker = ""
        while True:
            page, marker = self.store.list_images(tenant, group, marker, 200)
            have = thumbs.get(tenant, group, [info.id for info in page])
            counts["had"] += len(have)
            missing = [info for info in page if info.id not in have]
            todo = [info for info in missing if info.uri]
            counts["no_uri"] += len(missing) - len(todo)
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="thumbs") as pool:
                made = list(pool.map(picture, [info.uri or "" for info in todo]))
            thumbs.put(tenant, group, [(i.id, jpeg) for i, jpeg in zip(todo, made, strict=True) if jpeg])
            counts["made"] += sum(1 for jpeg in made if jpeg)
            counts["failed"] += sum(1 for jpeg in made if not jpeg)
            if progress is not None:
                progress(sum(counts.values()), total, counts["made"])
            if not marker:
                return counts

    def retag(
        self, tenant: str, group: str, progress: Callable[[int, int, int], None] | None = None
    ) -> dict[str, int]:
        """Recompute the automatic tags of a group's images from their stored URIs (``tusou retag``).

        Images added from data URIs have no stored URI (tusou keeps only the vector), so they cannot be
        retagged and keep the tags they have (none, if added before tags existed); re-add them to tag them.
        Returns counts: ``tagged``, ``no_uri`` (data-URI images), ``failed`` (fetch or decode failed).
        """
        if not self.tagging:
            raise QiniuError(400, "tags need a built-in model (lite0/1/2) with tags enabled")
        total = self.store.count(tenant, group)
        counts = {"tagged": 0, "no_uri": 0, "failed": 0}
        marker = ""
        while True:
            page, marker = self.store.list_images(tenant, group, marker, 200)
            with_uri = [info for info in page if info.uri]
            counts["no_uri"] += len(page) - len(with_uri)
            loaded = self._vectors(tenant, [info.uri for info in with_uri])
            ok = [(info, v) for info, v in zip(with_uri, loaded, strict=True) if isinstance(v, np.ndarray)]
            counts["failed"] += len(with_uri) - len(ok)
            if ok:
                tags = self.tags_for(np.stack([v for _, v in ok]))
                counts["tagged"] += self.store.set_tags(
                    tenant,
                    group,
                    {info.id: t for (info, _), t in zip(ok, tags, strict=True) if t is not None},
                )
            if progress is not None:
                progress(sum(counts.values()), total, counts["tagged"])
            if not marker:
                return counts

    def _search_clip_text(self, tenant: str, query: SearchQuery, text_encoder: Any) -> Matches:
        """Keyword search with a CLIP-class model (model=clip): the text's vector against the stored image
        vectors. The score is the cosine (clipped to 0..1); ``threshold`` is the least cosine, default
        :data:`CLIP_TEXT_THRESHOLD` (text-image cosines of CLIP models sit far below image-image ones)."""
        assert query.text is not None
        vec = text_encoder.embed([query.text])
        floor = CLIP_TEXT_THRESHOLD if query.threshold is None else query.threshold
        limit = -1 if query.labels else query.limit
        hits = self.store.search(tenant, query.groups, vec, limit, floor, query.where)
        return _text_matches(hits, query, lambda cosine: round(min(1.0, max(0.0, cosine)), 6))

    def duplicates(self, tenant: str, request: FindDuplicates) -> DuplicatePage:
        """Near-duplicate pairs among one page of a group's images (beyond Qiniu), clustered.

        Each listed image's stored vector is searched against the whole group, as a search by its id
        would be, for at most :data:`DUPLICATE_NEIGHBOURS` others scoring at least the threshold: one
        bounded index search per image. Pairs found from this page are joined into clusters (union-find);
        a caller walking every page joins all pairs again (``tusou.client.Client.duplicates``).
        """
        floor = max(
            request.threshold if request.threshold is not None else DUPLICATE_THRESHOLD,
            self.default_threshold,
        )
        min_cosine = self.embedder.cosine_for_score(floor)
        images, marker = self.store.list_images(tenant, request.group, request.marker, request.limit)
        found = []
        for info in images:
            try:
                vector = self.store.get_vector(tenant, request.group, info.id)
            except ImageNotFound:  # deleted since the page was read
                continue
            hits = self.store.search(
                tenant, [request.group], vector[None, :], DUPLICATE_NEIGHBOURS + 1, min_cosine
            )
            others = [hit for hit in hits if hit.id != info.id][:DUPLICATE_NEIGHBOURS]
            scores = self.embedder.score(np.asarray([hit.cosine for hit in others], dtype=np.float32))
            found += [
                pair(info.id, hit.id, round(float(score), 6))
                for hit, score in zip(others, scores.tolist(), strict=True)
                if score >= floor
            ]
        return DuplicatePage(clusters(found), marker, len(images))

    def list_images(self, tenant: str, request: ListImages) -> Page:
        images, marker = self.store.list_images(tenant, request.group, request.marker, request.limit)
        return Page(images, marker)

    def get_image(self, tenant: str, ref: ImageRef) -> ImageInfo:
        return self.store.get_image(tenant, ref.group, ref.id)

    def search(self, tenant: str, query: SearchQuery) -> Matches:
        """Qiniu's search: the best ``limit`` images over ``groups`` scoring at least the threshold."""
        if query.text is not None:
            return self.search_text(tenant, query)
        # One consistency wait for the whole search on Milvus under Strong reads (a search by a stored id
        # reads the vector, then searches; verification searches once more).
        with self.store.read_snapshot():
            return self._search_image(tenant, query)

    def _search_image(self, tenant: str, query: SearchQuery) -> Matches:
        floor = (
            self.default_threshold
            if query.threshold is None
            else max(query.threshold, self.default_threshold)
        )
        try:
            queries, image = self._query_vectors(tenant, query)
        except QiniuError:
            # A missing searched group is the answer even when the query image is bad too (as before the
            # check moved into the search); only this failure path pays for a separate check.
            for group in query.groups:
                self.store.count(tenant, group)
            raise
        min_cosine = self.embedder.cosine_for_score(floor)
        # A label filter applies to every match (exact), then the limit. The store checks that the groups
        # exist in the same call (on Milvus, in the same consistency round as the search).
        hits, scores = self._scored(
            tenant, query.groups, queries, query.limit, min_cosine, query.where, query.labels,
            verifying=image is not None,
        )
        if image is not None:
            hits, scores = self._checked(
                tenant,
                hits,
                scores,
                lambda: verify.keypoints(image, query=True),
                lambda: verify.keypoints(image, query=True, mirrored=True),
            )
        # The inverse map is approximate at the boundary; the score decides (vectorised: the answer stays
        # in columns up to the response body).
        passing = scores >= floor
        if not passing.all():
            kept = np.flatnonzero(passing)
            hits, scores = hits.take(kept), scores[kept]
        return Matches(hits[: query.limit], scores[: query.limit], query.with_tags)

    def search_text(self, tenant: str, query: SearchQuery) -> Matches:
        """Keyword search (beyond Qiniu): images whose automatic tags give the word's concepts at least
        ``threshold`` of evidence (default :data:`tusou.embed.concepts.TEXT_THRESHOLD`), best first.

        The score is the evidence itself: the classifier's summed probability for the classes the word
        covers (docs/words.md). A word that names no known concept finds nothing.
        """
        for group in query.groups:
            self.store.count(tenant, group)
        assert query.text is not None
        text_encoder = getattr(self.embedder, "text_encoder", None)
        if text_encoder is not None:
            return self._search_clip_text(tenant, query, text_encoder)
        classes = concepts.load().resolve(query.text)
        if not classes:
            return Matches.empty()
        floor = concepts.TEXT_THRESHOLD if query.threshold is None else query.threshold
        hits = self.store.search_tags(
            tenant, query.groups, sorted(classes), -1 if query.labels else query.limit, floor, query.where
        )
        return _text_matches(hits, query, lambda evidence: round(evidence, 4))


def _given(value: T) -> Callable[[], T]:
    """A function that returns ``value`` (a keypoint set already computed, where one computed on demand
    may be passed)."""
    return lambda: value


#: What ``_vectors_and_pictures`` loads per image: index vector, thumbnail, (query views, keypoints as a
#: query's, its mirror image's) for duplicate detection, keypoints to keep.
_Loaded = tuple[np.ndarray, bytes | None, tuple[np.ndarray, bytes | None, bytes | None] | None, bytes | None]


def _text_matches(hits: Hits, query: SearchQuery, score: Callable[[float], float]) -> Matches:
    """A keyword search's answer: ``labels`` keeps hits before ``limit`` counts them (the store was asked
    for every hit when labels are given), each hit scored by ``score`` of its cosine or evidence."""
    kept = _labelled(hits, query.labels, query.limit)
    scores = np.asarray([score(c) for c in kept.cosines.tolist()], dtype=np.float64)
    return Matches(kept, scores, query.with_tags)


def _labelled(hits: Hits, labels: Collection[str] | None, limit: int) -> Hits:
    """``hits`` whose label is one of ``labels`` (all of them when no labels are asked), at most ``limit``:
    the label filter applies to every match before the limit counts (the store was asked for every hit)."""
    if not labels:
        return hits
    rows = [i for i, label in enumerate(hits.labels) if label in labels]
    return hits.take(rows[:limit] if limit >= 0 else rows)




#: The least side, in pixels of the decoded image, of a query's box (data.box).
BOX_MIN_SIDE = 16


def _crop(image: Image.Image, box: tuple[float, float, float, float], pixels: bool) -> Image.Image:
    """The part of ``image`` in ``box`` (pixels, or fractions of each side), clipped to the image."""
    w, h = image.size
    x0, y0, x1, y1 = box if pixels else (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    left, top = max(0, round(x0)), max(0, round(y0))
    right, bottom = min(w, round(x1)), min(h, round(y1))
    if left >= w or top >= h:
        raise QiniuError(400, f"invalid box: outside the image ({w}x{h})")
    if right - left < BOX_MIN_SIDE or bottom - top < BOX_MIN_SIDE:
        raise QiniuError(400, f"invalid box: smaller than {BOX_MIN_SIDE}x{BOX_MIN_SIDE} pixels")
    return image.crop((left, top, right, bottom))


def _is_url(uri: str) -> bool:
    return uri.lstrip()[:8].lower().startswith(("http://", "https://"))


def build_service(settings: Settings) -> Service:
    """Wire the real pieces together: model, store and fetcher from ``settings``."""
    from tusou.embed import create_embedder
    from tusou.store import open_store

    tighten_tree(settings.data)
    embedder = create_embedder(settings)
    convert_from = getattr(embedder, "convert_from", None)  # vectors of an older space (tusou upgrade)
    store = open_store(settings, model_id=embedder.model_id, dim=embedder.dim, convert_from=convert_from)
    return Service(settings, store, embedder, Fetcher(settings))
