"""Copy one group between stores (``tusou migrate``): e.g. from the embedded store to Milvus.

Reads the source in its listing order, page by page, and writes the destination in batches, so memory
stays bounded whatever the group's size. Vectors are copied, never re-embedded, so both stores must hold
the same model's vectors (each store checks its model id when opened). Ids already in the destination are
reported as per-image errors by the destination and skipped, which makes an interrupted run safe to repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tusou.store.base import GroupNotFound, ImageNotFound, NewImage, Store


@dataclass
class MigrateResult:
    copied: int
    skipped: int  # already present in the destination (or refused there, e.g. group full)


def migrate(
    src: Store,
    dst: Store,
    tenant: str,
    group: str,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 500,
) -> MigrateResult:
    """Copy ``tenant``'s ``group`` from ``src`` to ``dst``; ``progress(done, total)`` after each batch."""
    total = src.count(tenant, group)
    try:
        dst.count(tenant, group)
    except GroupNotFound:
        dst.create_group(tenant, group, [])
    copied = skipped = 0
    marker = ""
    while True:
        page, marker = src.list_images(tenant, group, marker, min(batch, 1000))
        # An image deleted from the source between listing and reading is simply not copied.
        images = []
        for info in page:
            try:
                vector = src.get_vector(tenant, group, info.id)
            except ImageNotFound:  # deleted from the source meanwhile
                continue
            # "" is how stores return "no desc"; falsy descs such as 0 or [] are real values.
            desc = None if info.desc == "" else info.desc
            images.append(NewImage(info.id, info.label, desc, info.uri, vector))
        if images:
            results = dst.add_images(tenant, group, images)
            copied += sum(r is None for r in results)
            skipped += sum(r is not None for r in results)
        if progress is not None:
            progress(copied + skipped, total)
        if not marker:
            return MigrateResult(copied, skipped)
