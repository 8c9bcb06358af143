"""Storage backends behind one interface (:class:`tusou.store.base.Store`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tusou.config import Settings
from tusou.store.base import Store

if TYPE_CHECKING:
    from tusou.upgrade import ConvertFrom


def open_store(
    settings: Settings, *, model_id: str, dim: int, convert_from: ConvertFrom | None = None
) -> Store:
    """The store ``settings`` names. ``convert_from`` (the embedder's) lets the embedded store say that a
    folder of an older vector space can be upgraded (``tusou upgrade``) rather than re-embedded."""
    if settings.store == "milvus":
        # Imported here so the embedded default never needs pymilvus installed.
        from tusou.store.milvus import MilvusStore

        return MilvusStore(
            settings.milvus_uri,
            collection=settings.milvus_collection,
            model_id=model_id,
            dim=dim,
            group_max_images=settings.group_max_images,
            token=settings.milvus_token,
            user=settings.milvus_user,
            password=settings.milvus_password,
            consistency=settings.milvus_consistency,
            index=settings.milvus_index,
            nprobe=settings.milvus_nprobe,
            nlist=settings.milvus_nlist,
        )
    if settings.store != "sqlite":
        raise ValueError(f"unknown store {settings.store!r}: use sqlite or milvus")
    from tusou.store.sqlite import SQLiteStore

    return SQLiteStore(
        settings.db_path,
        model_id=model_id,
        dim=dim,
        group_max_images=settings.group_max_images,
        convert_from=convert_from,
    )
