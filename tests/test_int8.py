"""The opt-in int8 model (TUSOU_MODEL_PRECISION=int8): built offline from the installed weights and the
shipped calibration ranges, close to fp32, still finding near-duplicates, and never mixed with fp32 data."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tusou.config import Settings
from tusou.embed import OnnxEmbedder, create_embedder
from tusou.embed.base import Embedder

from .conftest import MODEL_CACHE, QiniuClient, Tusou, data_uri, free_port, jpeg

#: Measured on the repo photos (docs/score.md): index vectors >= 0.989, query views >= 0.973.
MIN_INDEX_COSINE = 0.98
MIN_QUERY_COSINE = 0.96


@pytest.fixture(scope="module")
def int8() -> OnnxEmbedder:
    # The same model folder as the session's fp32 embedder: the fp32 graph is built once, then quantized.
    return create_embedder(Settings(data=MODEL_CACHE.parent / "tusou-model-data", model_precision="int8"))


def test_int8_graph_is_its_own_model(int8: OnnxEmbedder, embedder: Embedder) -> None:
    assert "int8" in int8.model_id and "int8" not in embedder.model_id
    assert int8.encoder.path != Path(embedder.encoder.path)
    assert int8.encoder.path.is_file() and Path(str(int8.encoder.path) + ".sha256").is_file()
    assert int8.dim == embedder.dim
    # Far smaller than the fp32 file: the weights are int8.
    assert int8.encoder.path.stat().st_size < 0.6 * Path(embedder.encoder.path).stat().st_size


def test_int8_converts_only_its_own_unprojected_vectors(int8: OnnxEmbedder, embedder: Embedder) -> None:
    """The projection is shared post-processing: an int8 folder from before it converts to the int8
    space, never to fp32's (and fp32's never to int8's)."""
    assert isinstance(embedder, OnnxEmbedder)
    old_int8, old_fp32 = int8.unprojected_model_id, embedder.unprojected_model_id
    assert old_int8 is not None and old_fp32 is not None and "int8" in old_int8 and old_int8 != old_fp32
    assert int8.convert_from(old_fp32) is None and embedder.convert_from(old_int8) is None
    convert = int8.convert_from(old_int8)
    assert convert is not None
    rng = np.random.default_rng(3)
    old = rng.normal(size=(5, int8.feature_dim)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    new = convert(old)
    assert new.shape == (5, int8.dim) and new.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-5)


def test_int8_rebuilds_a_corrupt_cache(tmp_path: Path, int8: OnnxEmbedder) -> None:
    models = tmp_path / "models"
    first = create_embedder(Settings(data=tmp_path, model_precision="int8"))
    path = first.encoder.path
    assert path.parent == models
    path.write_bytes(path.read_bytes()[:1000])  # a truncated file fails its checksum and is rebuilt
    again = create_embedder(Settings(data=tmp_path, model_precision="int8"))
    assert again.encoder.path == path and path.stat().st_size > 1000
    photo = Image.new("RGB", (300, 200), (40, 120, 200))
    np.testing.assert_allclose(again.embed_images([photo]), int8.embed_images([photo]), atol=1e-5)


def test_int8_without_ranges_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no int8 calibration ranges ship for lite1"):
        create_embedder(Settings(data=tmp_path, model="lite1", model_precision="int8"))
    with pytest.raises(ValueError, match="for the built-in lite models only"):
        create_embedder(Settings(data=tmp_path, model="onnx", onnx_path=tmp_path, model_precision="int8"))


def test_int8_vectors_agree_with_fp32(
    int8: OnnxEmbedder, embedder: Embedder, photos: list[Image.Image]
) -> None:
    a, b = embedder.embed_images(photos), int8.embed_images(photos)
    assert float((a * b).sum(axis=1).min()) >= MIN_INDEX_COSINE
    qa, qb = embedder.embed_queries(photos), int8.embed_queries(photos)
    assert float((qa * qb).sum(axis=2).min()) >= MIN_QUERY_COSINE
    # Not the same vectors either: the test would pass on an fp32 graph under another name otherwise.
    assert float((a * b).sum(axis=1).max()) < 0.99999


def _edits(img: Image.Image) -> list[Image.Image]:
    w, h = img.size
    crop = img.crop((w // 12, h // 12, w - w // 12, h - h // 12))
    small = img.resize((max(1, w // 3), max(1, h // 3)))
    recompressed = Image.open(io.BytesIO(jpeg(img, quality=35))).convert("RGB")
    return [crop, small, recompressed, img.transpose(Image.Transpose.ROTATE_90)]


def test_int8_near_duplicates_rank_first(int8: OnnxEmbedder, photos: list[Image.Image]) -> None:
    gallery = int8.embed_images(photos)
    for i, photo in enumerate(photos):
        edits = _edits(photo)
        queries = int8.embed_queries(edits)  # (edits, views, dim)
        cos = np.einsum("qvd,gd->qgv", queries, gallery).max(axis=2)
        assert list(cos.argmax(axis=1)) == [i] * len(edits)
        scores = int8.score(cos[:, i])
        assert float(scores.min()) >= int8.default_threshold


def test_fp32_data_folder_refuses_int8(tmp_path: Path, embedder: Embedder, photos: list[Image.Image]) -> None:
    settings = Settings(data=tmp_path / "data")
    running = Tusou(settings, embedder)  # fp32, the default
    with running.server:
        client = running.client("t")
        r = client.post("/v1/image/group/g/new", {"data": [{"uri": data_uri(jpeg(photos[0]))}]})
        assert r.status_code == 200, r.text
    running.close()

    env = dict(
        os.environ,
        TUSOU_MODEL_PRECISION="int8",
        TUSOU_MODEL_DIR=str(MODEL_CACHE.parent / "tusou-model-data" / "models"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tusou", "serve", "--data", str(settings.data), "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "was indexed with model efficientnet-lite0@" in out and "-int8" in out, out[-2000:]

    # The refusal leaves the folder as it was: fp32 still opens it and finds the image.
    running = Tusou(settings, embedder)
    with running.server:
        again = QiniuClient(running.server.url, client.access_key, client.secret_key)
        assert again.get("/v1/image/group/g/info").json() == {"count": 1}
    running.close()
