"""tusou.onnx_graph writes the graphs the server builds at run time without importing onnx: the bytes must
parse to exactly what onnx.helper builds, and ONNX Runtime must run them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tusou import onnx_graph as g


def test_bytes_parse_to_what_onnx_helper_builds() -> None:
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    mine = g.model(
        [
            g.node("MatMul", ["x", "w"], ["y"]),
            g.node("ReduceMax", ["y"], ["m"], axes=[1, -1], keepdims=0),
            g.node("Cast", ["m"], ["c"], to=g.INT64),
        ],
        [g.value_info("x", g.FLOAT, ["N", 3]), g.value_info("q", g.UINT8, [None, 7])],
        [g.value_info("c", g.INT64, [None])],
        [g.tensor("w", weights), g.tensor("z", np.array(128, dtype=np.uint8))],
        name="probe",
        opset=17,
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("ReduceMax", ["y"], ["m"], axes=[1, -1], keepdims=0),
            helper.make_node("Cast", ["m"], ["c"], to=TensorProto.INT64),
        ],
        "probe",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("q", TensorProto.UINT8, [None, 7]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.INT64, [None])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"),
        ],
    )
    want = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    want.producer_name = "tusou"
    got = onnx.load_from_string(mine)
    assert got == want
    onnx.checker.check_model(got)


def test_onnx_runtime_runs_the_scan_graphs_it_builds() -> None:
    """The int8 scan's graphs against numpy: whole-row cosines from two parts, from one part, and the head
    bound (never below the cosine)."""
    from tusou.store.vector_index import _Scorer, _tail_norms

    rng = np.random.default_rng(0)
    head = rng.integers(0, 256, (50, 16), dtype=np.uint8)
    tail = rng.integers(0, 256, (50, 24), dtype=np.uint8)
    hcols = rng.integers(-63, 64, (16, 3), dtype=np.int8)
    tcols = rng.integers(-63, 64, (24, 3), dtype=np.int8)
    qinv = rng.uniform(0.1, 1, (1, 3)).astype(np.float32)
    rinv = rng.uniform(0.1, 1, 50).astype(np.float32)
    scorer = _Scorer()
    assert scorer._best is not None and scorer._best1 is not None and scorer._bound is not None
    rows = np.hstack([head, tail]).astype(np.float32) - 128
    cols = np.vstack([hcols, tcols]).astype(np.float32)
    want = (rows @ cols * qinv).max(axis=1) * rinv
    np.testing.assert_allclose(scorer.best(head, hcols, tail, tcols, qinv, rinv), want, rtol=1e-6)
    want1 = ((head.astype(np.float32) - 128) @ hcols.astype(np.float32) * qinv).max(axis=1) * rinv
    np.testing.assert_allclose(scorer.best(head, hcols, None, None, qinv, rinv), want1, rtol=1e-6)
    rtail = _tail_norms((tail.astype(np.int16) - 128).astype(np.int8))[:, None]
    qtail = (_tail_norms(tcols.T) * qinv[0])[None, :]
    bound = scorer.bound(head, hcols, qinv, rinv, rtail, qtail)
    assert np.all(bound >= want - 1e-6)


def test_serving_imports_no_onnx() -> None:
    """onnx (with ml_dtypes) costs ~1 s of every start: serving, the model and the store leave it unloaded."""
    code = (
        "import sys, numpy as np; import tusou.cli, tusou.api.app, tusou.service; "
        "from tusou.store.vector_index import _Scorer; _Scorer(); "
        "from tusou.embed import score; "
        "score._projector('lite0').run(None, {'x': np.zeros((1, 1280), np.float32)}); "
        "print('onnx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
    _ = ort  # the runtime itself is what serving needs
