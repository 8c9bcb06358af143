"""The model: .pth reading without torch, the ONNX graph against PyTorch, caching, the Embedder contract.

Reference features in tests/data/embed/ come from real PyTorch (tools/make_embed_reference.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import sys
import threading
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tusou.config import Settings
from tusou.embed import OnnxEmbedder, create_embedder, efficientnet, onnx_model, score, views
from tusou.embed.efficientnet import LITE_MODELS, build_efficientnet_lite
from tusou.embed.onnx_model import OnnxEncoder, lite_onnx_path, lite_weights_path
from tusou.embed.preprocess import lite_preprocessor
from tusou.embed.pth import PthError, load_state_dict

DATA = Path(__file__).resolve().parent / "data" / "embed"
META = json.loads((DATA / "reference.json").read_text())
TOL = 1e-4


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _images() -> list[Image.Image]:
    return [Image.open(DATA / name) for name in META["images"]]


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> OnnxEmbedder:
    return create_embedder(Settings(data=tmp_path_factory.mktemp("lite0"), model="lite0", threads=2))


# --- .pth reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_pth_matches_torch_save(name: str) -> None:
    expected = np.load(DATA / "tiny_expected.npz")
    got = load_state_dict(DATA / name)
    assert list(got) == list(expected.files)
    for key in expected.files:
        assert got[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_pth_reads_shipped_weights() -> None:
    sd = load_state_dict(lite_weights_path("lite0"))
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert all(v.flags.owndata or v.base is not None for v in sd.values())


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch /tmp/tusou-pwned",))


def _legacy_file(payload: bytes) -> bytes:
    head = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    return head + payload


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
@pytest.mark.parametrize("evil", [_Evil(), OrderedDict(x=_Evil()), {"a": [eval]}])
def test_pth_refuses_code(tmp_path: Path, fmt: str, evil: object) -> None:
    marker = Path("/tmp/tusou-pwned")
    marker.unlink(missing_ok=True)
    payload = pickle.dumps(evil, protocol=2)
    path = tmp_path / "evil.pth"
    if fmt == "legacy":
        path.write_bytes(_legacy_file(payload))
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
    with pytest.raises(PthError, match="refusing to load"):
        load_state_dict(path)
    assert not marker.exists()


def _crafted_pth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple, stride: tuple) -> Path:
    """A zip .pth holding one float tensor view with the given size/stride over a 4-element storage,
    written without torch by standing in fake ``torch`` modules while pickling."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args: object) -> None: ...

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch_mod.FloatStorage = FloatStorage  # type: ignore[attr-defined]
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):  # noqa: ANN204
            return (_rebuild_tensor_v2, (Storage(), 0, size, stride, False, OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(OrderedDict(w=Tensor()))
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", struct.pack("<4f", 1, 2, 3, 4))
    return path


def test_pth_crafted_view_in_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = load_state_dict(_crafted_pth(tmp_path, monkeypatch, (2, 2), (1, 2)))
    np.testing.assert_array_equal(sd["w"], [[1, 3], [2, 4]])


def test_pth_refuses_view_past_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as_strided would happily read whatever memory follows the 4 floats: must be refused.
    with pytest.raises(PthError, match="past the end"):
        load_state_dict(_crafted_pth(tmp_path, monkeypatch, (3, 3), (1000, 1)))


def test_pth_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(PthError):
        load_state_dict(path)
    # An allowed global used as something it is not (a storage type called like a function).
    path.write_bytes(_legacy_file(b"\x80\x02ctorch\nFloatStorage\n)R."))
    with pytest.raises(PthError):
        load_state_dict(path)


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_pth_damaged_files_fail_cleanly(tmp_path: Path, name: str) -> None:
    """Truncated or bit-flipped files either load or raise PthError: never another exception."""
    good = (DATA / name).read_bytes()
    rng = np.random.default_rng(11)
    path = tmp_path / name
    for i in range(150):
        bad = bytearray(good)
        if i % 3 == 0:
            bad = bad[: int(rng.integers(0, len(good)))]
        else:
            for pos in rng.integers(0, len(good), size=int(rng.integers(1, 4))):
                bad[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(bad))
        try:
            load_state_dict(path)
        except PthError:
            pass


# --- the ONNX graph against PyTorch ------------------------------------------------------------------


def _session(model: str, folder: Path) -> OnnxEncoder:
    sd = load_state_dict(lite_weights_path(model))
    assert META["models"][model]["weights_sha256"] == onnx_model.file_sha256(lite_weights_path(model))
    path = folder / f"{model}.onnx"
    path.write_bytes(build_efficientnet_lite(sd, model).SerializeToString())
    enc = OnnxEncoder(path, LITE_MODELS[model].image_size, threads=2)
    enc.load()
    return enc


@pytest.mark.parametrize("model", ["lite0", "lite1", "lite2"])
def test_graph_matches_pytorch(model: str, tmp_path: Path) -> None:
    enc = _session(model, tmp_path)
    ref = np.load(DATA / f"reference_{model}.npz")
    size = LITE_MODELS[model].image_size
    assert META["models"][model]["input_size"] == size

    # The network alone, on an input independent of Pillow.
    x = np.random.default_rng(META["synthetic_seed"]).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    got = enc.predict(x)
    assert got.shape == (2, 1280)
    assert np.abs(_unit(got) - _unit(ref["synthetic"])).max() < TOL
    np.testing.assert_allclose(got, ref["synthetic"], rtol=0, atol=1e-4)

    # Preprocessing is bit-identical to the reference's (else the crop hashes tell), then the network.
    pre = lite_preprocessor(size)
    batch = pre.to_array(_images())
    crops = [hashlib.sha256(c.tobytes()).hexdigest() for c in batch]
    assert crops == META["models"][model]["crop_sha256"], "preprocessing differs from the reference"
    got = enc.predict(batch)
    assert np.abs(_unit(got) - _unit(ref["images"])).max() < TOL
    np.testing.assert_allclose(got, ref["images"], rtol=0, atol=1e-4)


def test_graph_is_valid_onnx_with_dynamic_batch() -> None:
    m = build_efficientnet_lite(load_state_dict(lite_weights_path("lite0")), "lite0")
    onnx.checker.check_model(m, full_check=True)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    # BatchNorm folded away: only Conv, Clip, Add, the pooling head and the classifier (tags).
    ops = {n.op_type for n in m.graph.node}
    assert ops == {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Softmax"}
    assert [o.name for o in m.graph.output] == ["features", "probs"]


def test_graph_rejects_wrong_weights() -> None:
    sd = load_state_dict(lite_weights_path("lite0"))
    with pytest.raises(ValueError, match="blocks"):
        build_efficientnet_lite(sd, "lite1")


def test_embedder_features_match_pytorch(lite0: OnnxEmbedder) -> None:
    ref = np.load(DATA / "reference_lite0.npz")["images"]
    got = lite0.features(_images())
    assert np.abs(_unit(got) - _unit(ref)).max() < TOL


# --- the Embedder contract ---------------------------------------------------------------------------


def test_identity(lite0: OnnxEmbedder) -> None:
    sha = META["models"]["lite0"]["weights_sha256"]
    # Weights, then the vector space (calibration + index views) that stored vectors depend on.
    assert lite0.model_id.startswith(f"efficientnet-lite0@{sha[:12]}/v")
    # The shipped projection (score.project) gives the compact width; the network still gives 1280.
    assert lite0.dim == score.calibration("lite0").dim and lite0.dim <= 384 and lite0.feature_dim == 1280
    assert 0.0 <= lite0.default_threshold <= 1.0


def test_shapes_and_unit_norms(lite0: OnnxEmbedder) -> None:
    imgs = _images()
    v = lite0.embed_images(imgs)
    d = lite0.dim
    assert v.shape == (3, d) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    q = lite0.embed_queries(imgs)
    assert q.ndim == 3 and q.shape[0] == 3 and q.shape[2] == d and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=2), 1.0, atol=1e-5)
    assert lite0.embed_images([]).shape == (0, d)
    assert lite0.embed_queries([]).shape[0] == 0


#: The vector space today's release (before the projection) writes into a data folder for lite0 fp32.
UNPROJECTED_LITE0 = "efficientnet-lite0@579344248a93/v6d4c9d0c"


def test_convert_from_unprojected_vectors(lite0: OnnxEmbedder) -> None:
    """Vectors stored before the projection shipped (centred, 1280 wide) convert to exactly what
    embedding the same images gives now; no other identity converts."""
    assert lite0.unprojected_model_id == UNPROJECTED_LITE0
    assert lite0.model_id != UNPROJECTED_LITE0 and lite0.model_id.startswith("efficientnet-lite0@")
    imgs = _images()
    # What the release before the projection stored: index views' raw features averaged, then the root,
    # L2, minus the mean, L2 (computed here by hand, not through score.postprocess).
    raw = np.mean([lite0.features([views.VIEWS[v](im) for im in imgs]) for v in views.INDEX_VIEWS], axis=0)
    cal = score.calibration("lite0")
    assert cal.mean is not None
    old = _unit(_unit(np.sqrt(raw)) - cal.mean).astype(np.float32)
    convert = lite0.convert_from(UNPROJECTED_LITE0)
    assert convert is not None
    new = convert(old)
    assert new.shape == (3, lite0.dim) and new.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(new, lite0.embed_images(imgs), atol=1e-5)
    same = lite0.convert_from(lite0.model_id)
    assert same is not None
    np.testing.assert_array_equal(same(new), new)
    for other in (
        "efficientnet-lite0@579344248a93/v00000000",  # another mean or view set
        "efficientnet-lite0@000000000000/v6d4c9d0c",  # other weights
        "efficientnet-lite0@579344248a93-int8q1.b3f523af/v6d4c9d0c",  # int8 vectors, into an fp32 space
        "efficientnet-lite1@a/v6d4c9d0c",
        "",
    ):
        assert lite0.convert_from(other) is None, other


def test_deterministic(lite0: OnnxEmbedder) -> None:
    img = _images()[0]
    a = lite0.embed_images([img, img])
    b = lite0.embed_images([img])
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[0], b[0])
    # Batch composition (how many others share the ONNX call) must not move the vector measurably.
    c = lite0.embed_images([*_images(), *_images(), *_images(), *_images(), *_images(), img, img])
    np.testing.assert_allclose(c[-1], b[0], atol=1e-6)


def test_query_of_indexed_image_scores_high(lite0: OnnxEmbedder) -> None:
    imgs = _images()
    stored = lite0.embed_images(imgs)
    queries = lite0.embed_queries(imgs)
    best = (queries @ stored.T).max(axis=1)  # (n, stored): best over views
    assert (np.argmax(best, axis=1) == np.arange(3)).all()
    scores = lite0.score(best.diagonal())
    assert (scores >= lite0.default_threshold).all()
    assert lite0.cosine_for_score(0.0) <= lite0.cosine_for_score(1.0)


def test_extreme_aspect_ratio_is_fast_and_close() -> None:
    pre = lite_preprocessor(224)
    src = _images()[0].convert("RGB").resize((60, 4999), Image.Resampling.BICUBIC)  # a smooth banner
    (nw, nh), box = pre._geometry(*src.size)
    exact = np.asarray(src.resize((nw, nh), Image.Resampling.BICUBIC).crop(box), np.float32)
    fast = pre.to_array([src])[0].transpose(1, 2, 0) * 128 + 127
    assert np.abs(fast - exact).mean() < 0.5 and np.abs(fast - exact).max() <= 8


def test_modes_and_alpha(lite0: OnnxEmbedder) -> None:
    img = _images()[0]
    rgba = img.convert("RGBA")
    clear = Image.new("RGBA", img.size, (0, 0, 0, 0))
    v = lite0.features([img, rgba, img.convert("L"), img.convert("P"), clear])
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)
    # A fully transparent image is white, not black.
    white = lite0.features([Image.new("RGB", img.size, "white")])
    np.testing.assert_allclose(v[4], white[0], atol=1e-6)


def test_thread_safe(lite0: OnnxEmbedder) -> None:
    imgs = _images()
    expected = lite0.embed_images(imgs)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                results.append(lite0.embed_images(imgs))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 12
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-6)


def test_open_image_drafts_large_jpeg(lite0: OnnxEmbedder) -> None:
    big = _images()[0].convert("RGB").resize((2000, 1500), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    img = lite0.open_image(buf.getvalue())
    assert min(img.size) >= lite0.pre.resize_short and img.size[0] < 2000  # decoded at 1/4 scale
    full = Image.open(io.BytesIO(buf.getvalue()))
    cos = float(_unit(lite0.features([img]))[0] @ _unit(lite0.features([full]))[0])
    assert cos > 0.99


# --- the ONNX cache ----------------------------------------------------------------------------------


def test_cache_reused_and_rebuilt_when_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Settings(data=tmp_path).model_cache
    path, wsha = lite_onnx_path("lite0", cache)
    assert path.is_file() and wsha == META["models"]["lite0"]["weights_sha256"]
    first = path.read_bytes()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    calls = []
    real_build = efficientnet.build_efficientnet_lite

    def counting_build(*a: object, **kw: object) -> onnx.ModelProto:
        calls.append(1)
        return real_build(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_model, "build_efficientnet_lite", counting_build)
    assert lite_onnx_path("lite0", cache)[0] == path
    assert calls == []  # reused

    path.write_bytes(first[: len(first) // 2])  # a torn write
    assert lite_onnx_path("lite0", cache)[0] == path
    assert calls == [1] and path.read_bytes() == first

    flipped = bytearray(first)
    flipped[len(flipped) // 2] ^= 0xFF  # silent corruption inside a weight
    path.write_bytes(bytes(flipped))
    lite_onnx_path("lite0", cache)
    assert calls == [1, 1] and path.read_bytes() == first

    path.with_name(path.name + ".sha256").unlink()  # crash between the two renames
    lite_onnx_path("lite0", cache)
    assert calls == [1, 1, 1]

    emb = create_embedder(Settings(data=tmp_path, model="lite0"))
    assert calls == [1, 1, 1] and emb.feature_dim == 1280


# --- a user-supplied encoder -------------------------------------------------------------------------


def _tiny_encoder(path: Path, size: int | str, half: bool = False) -> np.ndarray:
    """(N,3,S,S) -> GlobalAveragePool -> (N,3) @ W(3,8) -> (N,8); plus an unused 4-D output first."""
    w = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    ft = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", ft, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 3, 1, 1]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 8]),
        ],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return w


@pytest.mark.parametrize("size_dim,half", [(32, False), ("S", False), (32, True)])
def test_user_onnx(tmp_path: Path, size_dim: int | str, half: bool) -> None:
    path = tmp_path / "enc.onnx"
    w = _tiny_encoder(path, size_dim, half)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    settings = Settings(
        data=tmp_path, model="onnx", onnx_path=path, onnx_input_size=32, onnx_mean=mean, onnx_std=std
    )
    emb = create_embedder(settings)
    assert emb.dim == 8 and emb.model_id.startswith("onnx@")
    img = _images()[0]
    feats = emb.features([img])

    # Expected: shorter side to 32, centre crop, (x/255 - mean)/std, channel means @ W.
    rgb = img.convert("RGB")
    nw, nh = int(32 * rgb.width / rgb.height), 32
    crop = rgb.resize((nw, nh), Image.Resampling.BICUBIC).crop(((nw - 32) // 2, 0, (nw - 32) // 2 + 32, 32))
    x = (np.asarray(crop, np.float32) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(feats[0], x.mean(axis=(0, 1)) @ w, rtol=1e-2 if half else 1e-4, atol=1e-3)

    v = emb.embed_images(_images())
    assert v.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert emb.embed_queries(_images()).shape[::2] == (3, 8)

    # Same file, other normalisation: other vectors, so another model_id.
    other = create_embedder(settings.model_copy(update={"onnx_mean": (0.4, 0.4, 0.4)}))
    assert other.model_id != emb.model_id


def test_user_onnx_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="onnx_path"):
        create_embedder(Settings(data=tmp_path, model="onnx"))
    with pytest.raises(ValueError, match="not a file"):
        create_embedder(Settings(data=tmp_path, model="onnx", onnx_path=tmp_path / "missing.onnx"))
    path = tmp_path / "enc.onnx"
    _tiny_encoder(path, 32)
    with pytest.raises(ValueError, match="input size"):
        create_embedder(Settings(data=tmp_path, model="onnx", onnx_path=path, onnx_input_size=64))
    with pytest.raises(ValueError, match="unknown model"):
        create_embedder(Settings(data=tmp_path, model="resnet"))
