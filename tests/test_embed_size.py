"""TUSOU_MODEL_INPUT_SIZE: the built-in model run at another input side is a model of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from pydantic import ValidationError

from tests.conftest import MODEL_CACHE
from tusou.config import Settings
from tusou.embed import OnnxEmbedder, create_embedder
from tusou.embed.efficientnet import build_efficientnet_lite
from tusou.embed.onnx_model import lite_weights_path
from tusou.embed.pth import load_state_dict

DATA = Path(__file__).resolve().parent / "data" / "embed"
PHOTOS = sorted((Path(__file__).resolve().parent / "data" / "photos").glob("*.jpg"))[:3]


def _settings(**kw: object) -> Settings:
    # The session's model folder: the native graph is built once for every test file.
    return Settings(data=MODEL_CACHE.parent / "tusou-model-data", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def native() -> OnnxEmbedder:
    return create_embedder(_settings())


@pytest.fixture(scope="module")
def small() -> OnnxEmbedder:
    return create_embedder(_settings(model_input_size=192))


def _images() -> list[Image.Image]:
    assert PHOTOS, "tests/data/photos has no photos"
    return [Image.open(p).convert("RGB") for p in PHOTOS]


def test_another_input_size_is_another_vector_space(native: OnnxEmbedder, small: OnnxEmbedder) -> None:
    assert small.model_id != native.model_id and "-192px/" in small.model_id
    # Scores through its own map where one ships (score.variant), else lite0's.
    assert native.model_key == "lite0" and small.model_key == "lite0-192px"
    assert small.encoder.path != native.encoder.path and small.encoder.path.is_file()
    assert Path(str(small.encoder.path) + ".sha256").is_file()
    assert small.encoder.image_size == small.index_encoder.image_size == 192
    assert small.min_short == round(192 / 0.875) and small.dim == native.dim
    # Stored vectors of one size never convert into the other's space (tusou reembed does that).
    assert small.convert_from(native.model_id) is None and native.convert_from(small.model_id) is None
    imgs = _images()
    a, b = native.embed_images(imgs), small.embed_images(imgs)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = np.sum(a * b, axis=1)
    # The same pictures seen by the same weights at 192 px: close, but not the same vectors.
    assert np.all(cos > 0.9) and np.all(cos < 0.9999), cos
    q = small.embed_queries(imgs)
    assert q.shape == (len(imgs), 4, small.dim)
    # Each image's query view "id" finds its own stored vector best.
    best = np.einsum("nvd,md->nvm", q, b).max(axis=1).argmax(axis=1)
    assert list(best) == list(range(len(imgs)))


def test_graph_at_another_size_is_the_same_network() -> None:
    """The graph built for 192 px computes what the 224 px graph computes on a 192 px input (the "SAME"
    pads of every stride-2 layer agree when all its input sides are even, as for any multiple of 32)."""
    state = load_state_dict(lite_weights_path("lite0"))
    g192 = build_efficientnet_lite(state, "lite0", 192)
    dims = g192.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 192, 192]
    g224 = build_efficientnet_lite(state, "lite0")
    for d in g224.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"  # symbolic: the 224 graph's own pads, run at 192
    x = np.random.default_rng(0).standard_normal((2, 3, 192, 192)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    outs = [
        ort.InferenceSession(g.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
            ["features"], {"pixels": x}
        )[0]
        for g in (g192, g224)
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_int8_at_another_size(small: OnnxEmbedder) -> None:
    int8 = create_embedder(_settings(model_input_size=192, model_precision="int8"))
    assert "int8" in int8.model_id and "-192px/" in int8.model_id and int8.model_id != small.model_id
    assert int8.model_key == "lite0-int8-192px"
    assert int8.encoder.image_size == 192
    imgs = _images()
    cos = np.sum(int8.embed_images(imgs) * small.embed_images(imgs), axis=1)
    assert np.all(cos > 0.95), cos


@pytest.mark.parametrize("size", [95, 200, 480, 0])
def test_input_size_setting_refuses_odd_sizes(size: int) -> None:
    with pytest.raises(ValidationError):
        Settings(model_input_size=size)


def test_input_size_is_for_the_built_in_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_input_size"):
        create_embedder(
            Settings(data=tmp_path, model="onnx", onnx_path=tmp_path / "x.onnx", model_input_size=192)
        )
