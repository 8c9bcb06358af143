"""The operator-supplied CLIP-class model slot (model=clip), with a tiny model of the same shape made here.

The tiny model's image encoder is the mean colour of the picture; its text encoder sums a 3-d embedding per
token, where "red", "green" and "blue" point along the colour axes. So a working slot must rank a red
photo first for the word "red", through the real tokenizer, both ONNX sessions and the HTTP API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tests.conftest import QiniuClient, Tusou, data_uri, jpeg
from tusou.config import Settings
from tusou.embed import create_embedder
from tusou.embed.clip import ClipTokenizer, _byte_to_unicode

WORDS = ["red", "green", "blue"]
SIDE = 32


def tokenizer_spec() -> dict:
    """A CLIP-style BPE tokenizer.json whose merges build exactly WORDS (plus every byte symbol)."""
    chars = list(_byte_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    spec = {
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "end_of_word_suffix": "</w>"},
        "added_tokens": [],
    }
    for word in WORDS:
        while True:  # merge the first two symbols of the word as it tokenizes now, until it is one token
            syms = ClipTokenizer({**spec, "added_tokens": _specials(vocab)})._bpe(word)
            if len(syms) == 1:
                break
            merges.append(f"{syms[0]} {syms[1]}")
            vocab.setdefault(syms[0] + syms[1], len(vocab))
    spec["added_tokens"] = _specials(vocab)
    return spec


def _specials(vocab: dict[str, int]) -> list[dict]:
    return [
        {"id": len(vocab), "content": "<|startoftext|>"},
        {"id": len(vocab) + 1, "content": "<|endoftext|>"},
    ]


def make_model(folder: Path) -> None:
    spec = tokenizer_spec()
    vocab = spec["model"]["vocab"]
    (folder / "visual").mkdir(parents=True)
    (folder / "textual").mkdir()
    (folder / "textual" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "visual" / "preprocess_cfg.json").write_text(
        json.dumps({"size": [SIDE, SIDE], "mean": [0, 0, 0], "std": [1, 1, 1]})
    )
    (folder / "config.json").write_text(json.dumps({"embed_dim": 3, "text_cfg": {"context_length": 16}}))

    visual = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["embeddings"], axis=1),
        ],
        "tiny-visual",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 3])],
    )
    table = np.zeros((len(vocab) + 2, 3), dtype=np.float32)
    for axis, word in enumerate(WORDS):
        table[vocab[word + "</w>"], axis] = 1.0
    textual = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "text"], ["per_token"], axis=0),
            helper.make_node("ReduceSum", ["per_token", "axes"], ["embeddings"], keepdims=0),
        ],
        "tiny-textual",
        [helper.make_tensor_value_info("text", TensorProto.INT64, ["N", 16])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1]), "axes")],
    )
    for graph, path in ((visual, "visual/model.onnx"), (textual, "textual/model.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        (folder / path).write_bytes(model.SerializeToString())


def colour_photo(rgb: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 20, (48, 64, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture
def clip_tusou(tmp_path: Path) -> Iterator[Tusou]:
    make_model(tmp_path / "clip")
    settings = Settings(data=tmp_path / "data", model="clip", clip_dir=tmp_path / "clip")
    running = Tusou(settings, create_embedder(settings))
    running.server.__enter__()
    yield running
    running.close()


def search(client: QiniuClient, data: dict, **params: object) -> list[dict]:
    resp = client.post("/v1/image/groups/search", {"data": data, "params": {"groups": ["g"], **params}})
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]


def test_text_search_with_a_clip_model(clip_tusou: Tusou) -> None:
    client = clip_tusou.client()
    colours = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    photos = {name: colour_photo(rgb, i) for i, (name, rgb) in enumerate(colours.items())}
    body = {"data": [{"uri": data_uri(jpeg(img)), "attribute": {"id": name}} for name, img in photos.items()]}
    assert client.post("/v1/image/group/g/new", body).json()["errors"] == [None, None, None]

    for word in ("red", "Green!", "BLUE sky"):
        hits = search(client, {"text": word}, limit=3)
        assert [h["id"] for h in hits] == [word.lower().split()[0].strip("!")], (word, hits)
        assert 0.9 < hits[0]["score"] <= 1.0
    assert search(client, {"text": "purple"}, limit=3) == []  # no known token: a zero vector matches nothing
    everything = search(client, {"text": "red"}, limit=3, threshold=0)
    assert [h["id"] for h in everything][0] == "red" and len(everything) == 3
    assert search(client, {"text": "red"}, limit=3, threshold=0, filter={"desc.x": 1}) == []
    # The image encoder serves image search as any ONNX encoder does.
    hits = search(client, {"uri": data_uri(jpeg(colour_photo(colours["blue"], 9)))}, limit=1)
    assert [h["id"] for h in hits] == ["blue"]
    # No classifier, so no automatic tags.
    assert client.post("/v1/image/group/g/image", {"id": "red", "tags": True}).json()["tags"] == []


def test_tokenizer_matches_clip_conventions() -> None:
    spec = tokenizer_spec()
    tok = ClipTokenizer(spec, context_length=8)
    vocab = spec["model"]["vocab"]
    ids = tok(["Red  green", "red " * 20])
    sot, eot = len(vocab), len(vocab) + 1
    assert ids[0].tolist() == [sot, vocab["red</w>"], vocab["green</w>"], eot, 0, 0, 0, 0]
    assert ids[1][0] == sot and ids[1][-1] == eot and len(ids[1]) == 8  # truncated, end token kept
    # Unknown words fall back to byte symbols; punctuation is its own word.
    assert tok.encode("re!") == [vocab["r"], vocab["e</w>"], vocab["!</w>"]]


def test_bad_clip_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clip_dir"):
        create_embedder(Settings(data=tmp_path / "d", model="clip"))
    with pytest.raises(ValueError, match="visual/model.onnx"):
        create_embedder(Settings(data=tmp_path / "d", model="clip", clip_dir=tmp_path))
    make_model(tmp_path / "m")
    (tmp_path / "m" / "textual" / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="only CLIP's BPE"):
        create_embedder(Settings(data=tmp_path / "d", model="clip", clip_dir=tmp_path / "m"))
