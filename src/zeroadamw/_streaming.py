"""Write ``torch.save`` and safetensors files one tensor at a time (bounded memory), without extra dependencies.

``TorchSaveStreamWriter`` produces the same zip archive ``torch.save`` does (``data/<key>`` storage records, a
protocol-2 ``data.pkl`` whose tensors are ``torch._utils._rebuild_tensor_v2`` of persistent storage ids), but
writes each tensor's bytes as soon as it is given, so the caller can free it; ``torch.load(..., weights_only=True)``
reads the result. ``SafetensorsStreamWriter`` writes the safetensors layout (u64 header length, JSON header,
raw little-endian data) with the header computed up front from the declared shapes and dtypes.
"""

from __future__ import annotations

import collections
import ctypes
import io
import json
import os
import pickle
import sys

import torch
from torch import Tensor

__all__ = ["TorchSaveStreamWriter", "SafetensorsStreamWriter"]


def _raw_bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


class _TensorRef:
    __slots__ = ("key", "dtype", "shape", "numel")

    def __init__(self, key: str, dtype: torch.dtype, shape: torch.Size) -> None:
        self.key, self.dtype, self.shape = key, dtype, tuple(shape)
        self.numel = 1
        for s in self.shape:
            self.numel *= s


class _StorageRef:
    __slots__ = ("ref",)

    def __init__(self, ref: _TensorRef) -> None:
        self.ref = ref


_STORAGE_TYPES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
}


def _storage_type(dtype: torch.dtype):
    """The legacy typed-storage class torch.save names in its pickle (``torch.FloatStorage`` for float32...)."""
    return getattr(torch, _STORAGE_TYPES[dtype])


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            r = obj.ref
            return ("storage", _storage_type(r.dtype), r.key, "cpu", r.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _TensorRef):
            return (torch._utils._rebuild_tensor_v2,
                    (_StorageRef(obj), 0, obj.shape, _contiguous_stride(obj.shape), False, collections.OrderedDict()))
        return NotImplemented


class TorchSaveStreamWriter:
    """``w.tensor(t)`` writes ``t`` now and returns a placeholder to put in the object; ``w.finish(obj)`` writes
    the pickle of ``obj`` (placeholders become tensors) and closes the archive."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = os.fspath(path)
        self._tmp = self._path + ".part"
        self._zip = torch._C.PyTorchFileWriter(self._tmp)
        self._n = 0
        self._done = False

    def tensor(self, t: Tensor) -> _TensorRef:
        ref = _TensorRef(str(self._n), t.dtype, t.shape)
        self._n += 1
        data = _raw_bytes(t)
        self._zip.write_record(f"data/{ref.key}", data, len(data))
        return ref

    def finish(self, obj) -> None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        pkl = buf.getvalue()
        self._zip.write_record("data.pkl", pkl, len(pkl))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", "64", 2)
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        del self._zip
        os.replace(self._tmp, self._path)
        self._done = True

    def __enter__(self) -> "TorchSaveStreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self._zip = None
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsStreamWriter:
    """Declare every tensor (name -> (shape, dtype)) up front, then ``write`` them in that order."""

    def __init__(self, path: str | os.PathLike, spec: dict[str, tuple[list[int], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors is little-endian; writing it on a big-endian machine is not supported")
        self._path = os.fspath(path)
        self._tmp = self._path + ".part"
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order = []
        for name, (shape, dtype) in spec.items():
            if dtype not in _ST_DTYPES:
                raise TypeError(f"safetensors has no dtype for {dtype} ({name})")
            n = 1
            for s in shape:
                n *= s
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape), dtype, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
        self._f = open(self._tmp, "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, t: Tensor) -> None:
        want, shape, dtype, nbytes = self._order[self._next]
        if name != want or tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"expected {want} {shape} {dtype}, got {name} {tuple(t.shape)} {t.dtype}")
        data = _raw_bytes(t)
        if len(data) != nbytes:
            raise ValueError(f"{name}: {len(data)} bytes, expected {nbytes}")
        self._f.write(data)
        self._next += 1

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._f.close()
        if exc_type is None and self._next == len(self._order):
            os.replace(self._tmp, self._path)
        elif os.path.exists(self._tmp):
            os.remove(self._tmp)
            if exc_type is None:
                raise ValueError(f"only {self._next} of {len(self._order)} declared tensors were written")
