"""An int8 EfficientNet-Lite: the fp32 graph quantized with ONNX Runtime's static quantization.

QDQ format, per-channel int8 weights, uint8 activations, on the convolutions and residual adds only: the
global average pool, the features output and the classifier stay float, so a vector is not rounded to
256 levels at the end. EfficientNet-Lite was designed for this (ReLU6, no squeeze-excite).

The activation ranges are not measured at run time: they ship as ``data/<model>_int8_ranges.json``
(tensor name -> [min, max]), fitted once by ``tools/make_int8_ranges.py`` on photos, and applied as
ONNX Runtime tensor overrides. Quantizing therefore needs no images and gives the same graph on every
machine. The tensor names are the ones ``build_efficientnet_lite`` gives, so the ranges are tied to
``GRAPH_VERSION``; the file records it and a mismatch is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..files import sha256_file as file_sha256

__all__ = ["QUANT_OPS", "collect_ranges", "lite_int8_path", "quantize_lite", "ranges_path", "ranges_sha"]

log = logging.getLogger(__name__)

#: Operators quantized (a Clip, ReLU6, is folded into the range of the conv before it). Everything after
#: the last 1x1 conv (pool, flatten, classifier) stays float.
QUANT_OPS = ["Conv", "Clip", "Add"]
#: Layers left in float: the stem and the first two blocks see normalised pixels and the widest
#: activations (block 0's depthwise output spans about +-100 before ReLU6); quantizing them cost the most
#: agreement with fp32 of any layer group (docs/score.md).
FLOAT_PREFIXES = ("_conv_stem", "_blocks_0__", "_blocks_1__")
#: 7-bit weights: CPUs without VNNI multiply uint8 x int8 with 16-bit saturating adds (vpmaddubsw),
#: which full-range weights overflow; the reduced range avoids it on every x86 CPU.
REDUCE_RANGE = True
#: Bumped whenever the settings above change the int8 graph (part of its cache key and model identity).
QUANT_VERSION = 1


def ranges_path(model: str) -> Path:
    return Path(str(resources.files("tusou.embed") / "data" / f"{model}_int8_ranges.json"))


def ranges_sha(model: str) -> str:
    """sha256 of the shipped ranges: part of the int8 graph's cache key and of the model identity."""
    return hashlib.sha256(ranges_path(model).read_bytes()).hexdigest()


def _load_ranges(model: str, graph_version: int) -> dict[str, tuple[float, float]]:
    path = ranges_path(model)
    if not path.is_file():
        raise ValueError(f"no int8 calibration ranges for {model} ({path.name}); use model_precision=fp32")
    meta = json.loads(path.read_text())
    if meta.get("graph_version") != graph_version:
        raise ValueError(
            f"{path.name} was fitted on graph version {meta.get('graph_version')}, the graph is now "
            f"{graph_version}: rerun tools/make_int8_ranges.py"
        )
    return {k: (float(v[0]), float(v[1])) for k, v in meta["ranges"].items()}


class _Reader:
    """A CalibrationDataReader over a list of (n, 3, S, S) float32 batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.input_name: x}


def _quantize(
    fp32: Path, out: Path, batches: Sequence[np.ndarray], overrides: dict[str, object], exclude: list[str]
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .efficientnet import INPUT_NAME

    quantize_static(
        str(fp32),
        str(out),
        _Reader(INPUT_NAME, batches),  # type: ignore[arg-type]
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANT_OPS,
        nodes_to_exclude=exclude,
        per_channel=True,
        reduce_range=REDUCE_RANGE,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"TensorQuantOverrides": overrides} if overrides else {},
    )


def collect_ranges(fp32: Path, batches: Sequence[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Min/max of every tensor the quantizer calibrates, over ``batches`` (what the tool ships)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from .efficientnet import INPUT_NAME

    with tempfile.TemporaryDirectory(prefix="tusou-calib-") as tmp:
        cal = create_calibrator(
            str(fp32),
            QUANT_OPS,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        cal.collect_data(_Reader(INPUT_NAME, batches))  # type: ignore[arg-type]
        data = cal.compute_data()
    out: dict[str, tuple[float, float]] = {}
    for name, td in data.data.items():
        lo, hi = (np.asarray(v, dtype=np.float64).item() for v in td.range_value)
        out[name] = (lo, hi)
    return out


def quantize_lite(fp32: Path, model: str, out: Path, image_size: int, graph_version: int) -> None:
    """Write the int8 graph of the fp32 graph ``fp32`` to ``out``, with the shipped ranges."""
    import onnx

    ranges = _load_ranges(model, graph_version)
    overrides: dict[str, object] = {
        n: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for n, (lo, hi) in ranges.items()
    }
    # The calibration pass itself only has to visit every tensor once; the overrides decide the ranges.
    probe = [np.zeros((1, 3, image_size, image_size), dtype=np.float32)]
    m = onnx.load(str(fp32))
    exclude = []
    for i, node in enumerate(m.graph.node):
        node.name = f"n{i}_{node.output[0]}"  # the builder leaves nodes unnamed; exclusion goes by name
        tensor = node.input[0] if node.op_type == "Clip" else node.output[0]
        if tensor.startswith(FLOAT_PREFIXES):
            exclude.append(node.name)
    with tempfile.TemporaryDirectory(prefix="tusou-quant-") as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(m, str(named))
        root = logging.getLogger()
        root.addFilter(_drop_preprocess_advice)
        try:
            _quantize(named, out, probe, overrides, exclude)
        finally:
            root.removeFilter(_drop_preprocess_advice)


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantizer logs, on the root logger, a warning advising its model pre-processing
    (shape inference for dynamic shapes); the built graph has static shapes, so it is only noise."""
    return "pre-processing" not in record.getMessage()


def lite_int8_path(model: str, fp32: Path, graph_version: int, image_size: int) -> tuple[Path, str]:
    """Path of the cached int8 graph quantized from the fp32 graph ``fp32`` (built now if missing or
    corrupt, checked by its ``.sha256`` like the fp32 cache), and the tag it adds to the model identity."""
    if not ranges_path(model).is_file():
        raise ValueError(f"no int8 calibration ranges ship for {model}; use model_precision=fp32")
    tag = f"int8q{QUANT_VERSION}.{ranges_sha(model)[:8]}"
    path = fp32.with_name(f"{fp32.stem}-{tag}.onnx")
    sum_path = path.with_name(path.name + ".sha256")
    try:
        ok = path.is_file() and file_sha256(path) == sum_path.read_text().strip()
    except OSError:
        ok = False
    if ok:
        return path, tag
    log.info("quantizing %s to int8", fp32.name)
    with tempfile.TemporaryDirectory(prefix="tusou-quant-") as tmp:
        tmp_out = Path(tmp) / "int8.onnx"
        quantize_lite(fp32, model, tmp_out, image_size, graph_version)
        data = tmp_out.read_bytes()
    atomic_write(path, data)
    atomic_write(sum_path, (hashlib.sha256(data).hexdigest() + "\n").encode())
    return path, tag
