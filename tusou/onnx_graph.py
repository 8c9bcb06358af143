"""Small ONNX graphs serialized without the ``onnx`` package.

The server builds a few tiny graphs at run time (the int8 scan, the vector projection) and hands the bytes
to ONNX Runtime. Importing ``onnx`` for that costs about a second of every start on this machine (its
``ml_dtypes`` dependency alone takes 0.8-1.2 s to import), a third of the 3 s start budget of a 500k
group; the few messages these graphs need are written here directly in protobuf's wire format
(``tests/test_onnx_graph.py`` checks the bytes parse to what ``onnx.helper`` builds).

Only what the graphs need: nodes with int and ints attributes, float/int tensors as raw data, inputs and
outputs with fixed or named dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# TensorProto.DataType
FLOAT = 1
UINT8 = 2
INT8 = 3
INT32 = 6
INT64 = 7
_DTYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.uint8): UINT8, np.dtype(np.int8): INT8,
           np.dtype(np.int32): INT32, np.dtype(np.int64): INT64}  # fmt: skip
# AttributeProto.AttributeType
_ATTR_INT = 2
_ATTR_INTS = 7


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints: two's complement over 64 bits, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode())


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: int | Sequence[int]) -> bytes:
    """A NodeProto; attributes are ints or lists of ints."""
    out = b"".join(_str(1, name) for name in inputs) + b"".join(_str(2, name) for name in outputs)
    out += _str(4, op_type)
    for name, value in attrs.items():
        if isinstance(value, int):
            attr = _str(1, name) + _int(3, value) + _int(20, _ATTR_INT)
        else:
            attr = _str(1, name) + b"".join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)
        out += _bytes(5, attr)
    return out


def tensor(name: str, array: np.ndarray) -> bytes:
    """A TensorProto holding ``array`` as raw (little-endian) data."""
    array = np.asarray(array)  # not ascontiguousarray: it turns a scalar into shape (1,); tobytes is C order
    out = b"".join(_int(1, d) for d in array.shape) + _int(2, _DTYPES[array.dtype]) + _str(8, name)
    return out + _bytes(9, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def value_info(name: str, elem_type: int, shape: Sequence[int | str | None]) -> bytes:
    """A ValueInfoProto: a tensor of ``elem_type`` whose dims are sizes, names, or None (unknown)."""
    dims = b""
    for d in shape:
        if d is None:
            dims += _bytes(1, b"")
        elif isinstance(d, str):
            dims += _bytes(1, _str(2, d))
        else:
            dims += _bytes(1, _int(1, d))
    tensor_type = _int(1, elem_type) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def model(
    nodes: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    initializers: Sequence[bytes] = (),
    *,
    name: str = "graph",
    opset: int = 13,
    ir_version: int = 8,
) -> bytes:
    """A serialized ModelProto (default opset domain ``opset``) that ONNX Runtime can load."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _str(2, name)
    graph += b"".join(_bytes(5, t) for t in initializers)
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    opset_id = _str(1, "") + _int(2, opset)
    return _int(1, ir_version) + _str(2, "tusou") + _bytes(7, graph) + _bytes(8, opset_id)
