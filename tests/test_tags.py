"""Automatic tags: the classifier output of the ONNX graph, the WordNet concept data, words -> classes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tusou.config import Settings
from tusou.embed import OnnxEmbedder, concepts, create_embedder
from tusou.embed.onnx_model import lite_onnx_path, lite_weights_path
from tusou.embed.pth import load_state_dict

PHOTOS = Path(__file__).resolve().parent / "data" / "photos"


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> OnnxEmbedder:
    return create_embedder(Settings(data=tmp_path_factory.mktemp("lite0"), model="lite0", threads=2))


@pytest.fixture(scope="module")
def tagged(lite0: OnnxEmbedder) -> dict[str, list[list[float]]]:
    c = concepts.load()
    files = sorted(PHOTOS.glob("*.jpg"))
    _, probs = lite0.embed_images_tagged([lite0.open_image(f.read_bytes()) for f in files])
    assert probs is not None
    names = [f.name.split("-", 1)[1].removesuffix(".jpg") for f in files]
    return {name: c.tags(row) for name, row in zip(names, probs, strict=True)}


def test_probs_are_the_checkpoint_classifier_on_the_features(lite0: OnnxEmbedder) -> None:
    sd = load_state_dict(lite_weights_path("lite0"))
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (3, 3, 224, 224)).astype(np.float32)
    feats, probs = lite0.encoder.predict_with_probs(x)
    assert probs is not None and probs.shape == (3, 1000)
    logits = feats.astype(np.float64) @ sd["_fc.weight"].astype(np.float64).T + sd["_fc.bias"]
    expect = np.exp(logits - logits.max(axis=1, keepdims=True))
    expect /= expect.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expect, atol=1e-5)
    # The features output is unchanged by the second output.
    np.testing.assert_array_equal(feats, lite0.encoder.predict(x))


def test_graph_cache_key_names_the_graph_version(tmp_path: Path) -> None:
    path, _ = lite_onnx_path("lite0", tmp_path)
    assert re.search(r"-g2\.onnx$", path.name), path.name


def test_tagged_vectors_equal_untagged(lite0: OnnxEmbedder) -> None:
    imgs = [lite0.open_image(f.read_bytes()) for f in sorted(PHOTOS.glob("*.jpg"))[:5]]
    vecs, probs = lite0.embed_images_tagged(imgs)
    np.testing.assert_array_equal(vecs, lite0.embed_images(imgs))
    assert probs is not None and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_real_photos_get_the_right_tags(tagged: dict[str, list[list[float]]]) -> None:
    c = concepts.load()
    top = {name: c.name(int(t[0][0])) for name, t in tagged.items()}
    assert top["hammer8"] == "hammer"
    assert top["chicken"] == "hen"
    assert top["koala"] == "koala"
    assert top["volleyball"] == "volleyball"
    for tags in tagged.values():
        probs = [p for _, p in tags]
        assert probs == sorted(probs, reverse=True) and len(tags) <= concepts.TAG_TOP
        assert all(p >= concepts.TAG_MIN_P for p in probs)


@pytest.mark.parametrize(
    ("word", "yes", "no"),
    [
        ("animal", {"koala", "chicken", "cat", "fish19"}, {"hammer8", "volleyball", "spoons"}),
        ("动物", {"koala", "chicken", "cat", "fish19"}, {"hammer8", "volleyball"}),
        ("fish", {"fish19"}, {"koala", "hammer8", "cat"}),
        ("鱼", {"fish19"}, {"koala", "hammer8"}),
        ("hand tool", {"hammer8"}, {"fish19", "koala", "volleyball"}),
        ("Hand-Tools", {"hammer8"}, {"fish19"}),
        ("手工具", {"hammer8"}, {"cat"}),
        ("cats", {"cat"}, {"koala", "chicken"}),
        ("bird", {"chicken"}, {"cat", "fish19"}),
    ],
)
def test_words_find_hyponyms(
    tagged: dict[str, list[list[float]]], word: str, yes: set[str], no: set[str]
) -> None:
    c = concepts.load()
    classes = c.resolve(word)
    assert classes, word
    for name in yes:
        assert concepts.evidence(tagged[name], classes) >= 0.3, (word, name, tagged[name])
    for name in no:
        assert concepts.evidence(tagged[name], classes) < 0.1, (word, name)


def test_concept_data() -> None:
    c = concepts.load()
    assert c.n_classes == 1000
    ids = [n.synset for n in c.nodes[:1000]]
    assert ids == sorted(ids) and ids[0] == "n01440764" and ids[-1] == "n15075141"
    # Every class reaches WordNet's root; hand tools are under "tool" and "hand tool".
    root = c.match("entity")
    assert len(root) == 1 and len(c.classes_below(root[0])) == 1000
    assert len(c.resolve("hand tool")) >= 5 and c.resolve("hand tool") <= c.resolve("tool")
    assert c.resolve("golden retriever") <= c.resolve("dog") <= c.resolve("animal")
    assert c.resolve("狗") == c.resolve("dog")
    assert c.resolve("no such thing") == frozenset()
    doc = json.loads(concepts.DATA.read_text(encoding="utf-8"))
    assert "wordnet-base" in doc["about"]
    licence = concepts.DATA.with_name("LICENSE-wordnet.txt").read_text(encoding="utf-8")
    assert "Princeton University" in licence


def test_describe_names_classes() -> None:
    c = concepts.load()
    hammer = c.match("hammer")[0]
    (entry,) = c.describe([[hammer, 0.85]])
    assert entry == {"id": "n03481172", "name": "hammer", "name_zh": "锤子", "score": 0.85}
