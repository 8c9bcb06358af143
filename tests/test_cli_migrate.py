"""`tusou migrate`: copy groups from the embedded store to a real Milvus server with their vectors."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from click.testing import CliRunner
from PIL import Image

from tusou.cli import main
from tusou.config import Settings
from tusou.embed import create_embedder
from tusou.store import open_store
from tusou.store.base import NewImage
from tusou.store.keys import KeyStore

if TYPE_CHECKING:  # imported for real by pytest_plugins: an earlier import skips its assert rewriting
    from .store_backends import MilvusProcess

pytest_plugins = ["tests.store_backends"]


def test_migrate_copies_every_group_of_every_key(
    tmp_path: Path, photos: list[Image.Image], milvus_server: MilvusProcess
) -> None:
    data = tmp_path / "data"
    settings = Settings(data=data)
    embedder = create_embedder(settings)
    vectors = embedder.embed_images(photos[:5])
    keys = KeyStore(data / "keys.db")
    alice, bob = keys.create("alice").access_key, keys.create("bob").access_key
    src = open_store(settings, model_id=embedder.model_id, dim=embedder.dim)
    src.create_group(alice, "shop", [NewImage(f"p{i}", "x", {"i": i}, None, vectors[i]) for i in range(3)])
    src.create_group(bob, "shop", [NewImage("b0", "", None, "http://example.com/b0.jpg", vectors[4])])
    src.close()

    server = milvus_server.uri
    collection = f"migrated_{uuid.uuid4().hex[:8]}"
    args = ["migrate", "--data", str(data), "--milvus-uri", server, "--milvus-collection", collection]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["group"], r["copied"], r["skipped"]) for r in lines) == [("shop", 1, 0), ("shop", 3, 0)]
    # Run again: nothing is copied twice.
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert [json.loads(x)["copied"] for x in again.stdout.splitlines() if x.startswith("{")] == [0, 0]

    dst = open_store(
        Settings(data=data, store="milvus", milvus_uri=server, milvus_collection=collection),
        model_id=embedder.model_id,
        dim=embedder.dim,
    )
    try:
        assert dst.count(alice, "shop") == 3 and dst.count(bob, "shop") == 1
        page, _ = dst.list_images(alice, "shop", "", 10)
        assert [(p.id, p.desc) for p in page] == [("p0", {"i": 0}), ("p1", {"i": 1}), ("p2", {"i": 2})]
        assert dst.get_image(bob, "shop", "b0").uri == "http://example.com/b0.jpg"
        hits = dst.search(alice, ["shop"], vectors[1][None, :], 1, 0.5)
        assert [h.id for h in hits] == ["p1"] and np.isclose(hits[0].cosine, 1.0, atol=1e-4)
    finally:
        dst.close()
