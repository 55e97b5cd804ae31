"""Read one tensor of a .safetensors file at a time, into exactly its own memory.

The `safetensors` library memory-maps the whole file (touched pages stay resident while
it is open) and its NumPy loader rejects bfloat16. Conversion must keep peak memory near
the largest tensor and accept bf16 checkpoints, so we read the documented layout directly:
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes. Parity with the library is tested.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from checkpoint_utils.host_arrays import aligned_empty

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 << 20


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) != 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > _MAX_HEADER:
                    raise ValueError(f"header length {header_len} is implausible")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); "
                             "re-download or re-export it") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._data_start = 8 + header_len
        size = os.path.getsize(path)
        for name, entry in self.entries.items():
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            if self._data_start + entry["data_offsets"][1] > size:
                raise ValueError(f"{path} is truncated: tensor {name!r} ends past the end of the "
                                 "file; re-download it")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        array = aligned_empty(self.shape(name), self.dtype(name))
        if array.nbytes != end - begin:
            raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape "
                             f"{list(array.shape)} {entry['dtype']}; the file is corrupt")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            view = memoryview(array.reshape(-1).view(np.uint8))
            if f.readinto(view) != array.nbytes:
                raise ValueError(f"{self.path} is truncated inside tensor {name!r}; re-download it")
        return array
