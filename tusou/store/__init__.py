"""Storage backends behind one interface (:class:`tusou.store.base.Store`)."""

from __future__ import annotations

from tusou.config import Settings
from tusou.store.base import Store


def open_store(settings: Settings, *, model_id: str, dim: int) -> Store:
    from tusou.store.sqlite import SQLiteStore

    return SQLiteStore(
        settings.db_path, model_id=model_id, dim=dim, group_max_images=settings.group_max_images
    )
