"""EfficientNet-Lite as an ONNX graph, built from a state dict with ``onnx.helper``.

The layer layout follows ``efficientnet-lite-pytorch`` 0.1.0 (lukemelas' EfficientNet-PyTorch adapted to
Lite: ReLU6, no squeeze-excitation, stem and head not scaled, TensorFlow "SAME" padding). The graph has
two outputs: the features (stem, MBConv blocks, 1x1 head conv, global average pool -> (N, 1280)), which
become the search vectors, and the ImageNet classifier's softmax probabilities (``_fc`` on the features,
-> (N, 1000)), which become the automatic tags (``tusou.embed.concepts``). The classifier costs about
0.3 % of the network's multiply-adds.

Every BatchNorm is folded into the convolution before it (inference only): one Conv+Clip per layer, which
ONNX Runtime fuses further, instead of Conv+BatchNorm+Clip. The folding is done in float64 and rounded
once to float32, so the graph agrees with the unfolded PyTorch model to ~1e-6 relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = ["LITE_MODELS", "LiteSpec", "build_efficientnet_lite", "lite_blocks"]

INPUT_NAME = "pixels"
OUTPUT_NAME = "features"
#: Second output: softmax over the checkpoint's classes (ImageNet-1k, in the order of its synset ids).
PROBS_NAME = "probs"
#: Opset 17: Clip takes min/max as inputs; supported by every ONNX Runtime tusou allows (>= 1.17).
OPSET = 17
#: ONNX IR version 8 is what opset 17 was released with; pinning it keeps the file loadable by older runtimes.
IR_VERSION = 8

_BN_EPS = 1e-3  # batch_norm_epsilon of every EfficientNet(-Lite) checkpoint (TensorFlow's default)


@dataclass(frozen=True)
class LiteSpec:
    name: str
    width: float
    depth: float
    image_size: int


LITE_MODELS: dict[str, LiteSpec] = {
    "lite0": LiteSpec("lite0", 1.0, 1.0, 224),
    "lite1": LiteSpec("lite1", 1.0, 1.1, 240),
    "lite2": LiteSpec("lite2", 1.1, 1.2, 260),
}

# Base stages of EfficientNet-Lite (efficientnet_lite_builder.py): repeats, kernel, stride, expand ratio.
_STAGES = [(1, 3, 1, 1), (2, 3, 2, 6), (2, 5, 2, 6), (3, 3, 2, 6), (3, 5, 1, 6), (4, 5, 2, 6), (1, 3, 1, 6)]


@dataclass(frozen=True)
class _Block:
    kernel: int
    stride: int
    expand: int


def lite_blocks(spec: LiteSpec) -> list[_Block]:
    """The MBConv blocks in order. Lite keeps the first and last stage at one block ("fix_head_stem")."""
    blocks: list[_Block] = []
    for i, (repeats, kernel, stride, expand) in enumerate(_STAGES):
        n = repeats if i in (0, len(_STAGES) - 1) else int(math.ceil(spec.depth * repeats))
        blocks.append(_Block(kernel, stride, expand))
        blocks.extend(_Block(kernel, 1, expand) for _ in range(n - 1))
    return blocks


def _same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TensorFlow SAME padding as the reference computes it for a fixed input size: the odd pixel goes
    at the bottom/right. Returns ONNX pads [top, left, bottom, right] and the output size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    lo, hi = total // 2, total - total // 2
    return [lo, lo, hi, hi], out


class _GraphBuilder:
    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self._n = 0

    def _get(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ValueError(f"weights lack {key}: not an EfficientNet-Lite state dict")
        self.used.add(key)
        return np.asarray(self.state[key])

    def _name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def conv_bn(
        self, x: str, conv: str, bn: str, *, stride: int, size: int, groups: int = 1, relu6: bool = True
    ) -> tuple[str, int]:
        """Conv (no bias) followed by BatchNorm, folded into one Conv with bias; optional ReLU6."""
        from onnx import helper, numpy_helper

        w = self._get(f"{conv}.weight").astype(np.float64)
        gamma, beta = self._get(f"{bn}.weight"), self._get(f"{bn}.bias")
        mean, var = self._get(f"{bn}.running_mean"), self._get(f"{bn}.running_var")
        self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + _BN_EPS)
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = (beta.astype(np.float64) - mean.astype(np.float64) * scale).astype(np.float32)
        kernel = w.shape[-1]
        pads, out_size = _same_pads(size, kernel, stride)
        wname, bname = f"{conv}.w", f"{conv}.b"
        self.inits += [numpy_helper.from_array(wf, wname), numpy_helper.from_array(bf, bname)]
        y = self._name(conv.replace(".", "_") or "conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, wname, bname],
                [y],
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=pads,
                group=groups,
            )
        )
        if relu6:
            z = self._name("relu6")
            self.nodes.append(helper.make_node("Clip", [y, "zero", "six"], [z]))
            y = z
        return y, out_size


def build_efficientnet_lite(
    state: dict[str, np.ndarray], model: str, image_size: int | None = None
) -> onnx.ModelProto:
    """ONNX graph: ``pixels`` float32 (N, 3, S, S), normalised -> ``features`` float32 (N, 1280) and, when
    the state dict has the classifier, ``probs`` float32 (N, classes).

    ``state`` is the checkpoint's state dict; its shapes decide channel counts, ``model`` (lite0/1/2)
    decides the strides and, unless ``image_size`` is given, the input size S. The network is fully
    convolutional up to its global pooling, so the same weights run at any S (TF "SAME" padding is
    computed for the S given); a smaller S costs about (S / 224)^2 of the multiply-adds.
    """
    # Imported here, not at the top: serving never builds the graph (it is cached), and importing onnx
    # costs about a second of every start.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = LITE_MODELS[model]
    blocks = lite_blocks(spec)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    if n_blocks != len(blocks):
        raise ValueError(f"weights have {n_blocks} blocks, efficientnet-{model} has {len(blocks)}")

    g = _GraphBuilder(state)
    g.inits += [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    side = image_size or spec.image_size
    x, size = g.conv_bn(INPUT_NAME, "_conv_stem", "_bn0", stride=2, size=side)
    for i, blk in enumerate(blocks):
        p = f"_blocks.{i}"
        inp = x
        if blk.expand != 1:
            x, _ = g.conv_bn(x, f"{p}._expand_conv", f"{p}._bn0", stride=1, size=size)
        channels = state[f"{p}._depthwise_conv.weight"].shape[0]
        if state[f"{p}._depthwise_conv.weight"].shape[-1] != blk.kernel:
            raise ValueError(f"{p}: kernel size differs from efficientnet-{model}")
        x, size = g.conv_bn(
            x, f"{p}._depthwise_conv", f"{p}._bn1", stride=blk.stride, size=size, groups=channels
        )
        x, _ = g.conv_bn(x, f"{p}._project_conv", f"{p}._bn2", stride=1, size=size, relu6=False)
        # Residual only where shapes allow it (id_skip is on for every Lite block).
        in_channels = state[f"{p}._expand_conv.weight"].shape[1] if blk.expand != 1 else channels
        out_channels = state[f"{p}._project_conv.weight"].shape[0]
        if blk.stride == 1 and in_channels == out_channels:
            y = g._name("add")
            g.nodes.append(helper.make_node("Add", [x, inp], [y]))
            x = y
    x, size = g.conv_bn(x, "_conv_head", "_bn1", stride=1, size=size)
    pooled = g._name("gap")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
    g.nodes.append(helper.make_node("Flatten", [pooled], [OUTPUT_NAME], axis=1))
    dim = state["_conv_head.weight"].shape[0]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", dim])]
    if "_fc.weight" in state:
        fc_w = np.asarray(g._get("_fc.weight"), dtype=np.float32)  # (classes, dim)
        fc_b = np.asarray(g._get("_fc.bias"), dtype=np.float32)
        g.inits += [
            numpy_helper.from_array(np.ascontiguousarray(fc_w.T), "_fc.wT"),
            numpy_helper.from_array(fc_b, "_fc.b"),
        ]
        g.nodes.append(helper.make_node("Gemm", [OUTPUT_NAME, "_fc.wT", "_fc.b"], ["logits"]))
        g.nodes.append(helper.make_node("Softmax", ["logits"], [PROBS_NAME], axis=1))
        outputs.append(helper.make_tensor_value_info(PROBS_NAME, TensorProto.FLOAT, ["N", fc_w.shape[0]]))

    unused = set(state) - g.used
    if unused:
        raise ValueError(f"weights hold tensors the graph does not use: {sorted(unused)[:5]}")

    graph = helper.make_graph(
        g.nodes,
        f"efficientnet-{model}-features",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, side, side])],
        outputs,
        initializer=g.inits,
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tusou", ir_version=IR_VERSION
    )
    onnx.checker.check_model(m)
    return m
