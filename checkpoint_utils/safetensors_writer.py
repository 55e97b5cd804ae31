"""Write a .safetensors file one tensor (or one slice of a tensor) at a time.

The `safetensors` library's `save_file` takes every tensor of a file at once, and its NumPy
side rejects bfloat16. Writing a multi-GB checkpoint tensor by tensor keeps memory near one
chunk: the header (every name, dtype, shape and byte range) is known up front, so it is
written first and the raw bytes follow in header order (the layout safetensors_reader reads).
"""
from __future__ import annotations

import json
import math
import struct
from typing import Iterable

import numpy as np

from checkpoint_utils.safetensors_reader import DTYPES

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_ALIGNMENT = 8     # the data section starts on an 8-byte boundary, as the library writes it


def tensor_nbytes(shape: tuple[int, ...], dtype) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


class SafetensorsWriter:
    """with SafetensorsWriter(path, {name: (shape, dtype)}) as w: w.write(name, chunks) per tensor,
    in the order given; chunks are C-ordered pieces of the tensor (e.g. blocks of rows)."""

    def __init__(self, path: str, tensors: dict[str, tuple[tuple[int, ...], np.dtype]],
                 metadata: dict[str, str] | None = None):
        header, offset = {}, 0
        for name, (shape, dtype) in tensors.items():
            if np.dtype(dtype) not in _NAMES:
                raise ValueError(f"tensor {name!r}: dtype {np.dtype(dtype)} cannot be stored in safetensors")
            size = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header = {"__metadata__": metadata, **header}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % _HEADER_ALIGNMENT)
        self._pending = list(tensors.items())
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        if not self._pending or self._pending[0][0] != name:
            expected = self._pending[0][0] if self._pending else "nothing"
            raise ValueError(f"tensors go in header order: got {name!r}, expected {expected}")
        _, (shape, dtype) = self._pending.pop(0)
        written = 0
        for chunk in chunks:
            if chunk.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r}: chunk dtype {chunk.dtype} != {np.dtype(dtype)}")
            self._file.write(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data)
            written += chunk.nbytes
        if written != tensor_nbytes(shape, dtype):
            raise ValueError(f"tensor {name!r}: wrote {written} bytes, shape {list(shape)} needs "
                             f"{tensor_nbytes(shape, dtype)}")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._file.close()
        if kind is None and self._pending:
            raise ValueError(f"{len(self._pending)} tensor(s) not written, e.g. {self._pending[0][0]!r}")
