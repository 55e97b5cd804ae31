"""Host arrays that TensorFlow can adopt without copying.

`tf.convert_to_tensor(ndarray)` keeps two extra copies of the data alive until the consuming
op has run; for a 400 MB embedding that triples peak memory. TF adopts a NumPy buffer through
DLPack without a copy when the buffer is 64-byte aligned, so conversion allocates its arrays
that way and hands them over with `as_tensor`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def aligned_copy(array: np.ndarray, dtype=None) -> np.ndarray:
    """`array` (any layout, e.g. a transposed view) copied, and cast to `dtype` if given,
    into an aligned C-contiguous buffer."""
    out = aligned_empty(array.shape, dtype or array.dtype)
    np.copyto(out, array, casting="unsafe")
    return out


def as_tensor(array: np.ndarray) -> tf.Tensor:
    """A tf.Tensor sharing `array`'s memory when possible (the array must not change afterwards)."""
    import tensorflow as tf      # here, so the readers (and the CLIs' --help) do not load TensorFlow

    if (array.flags.c_contiguous and array.flags.writeable and array.size
            and array.ctypes.data % ALIGNMENT == 0):
        if array.dtype == ml_dtypes.bfloat16:   # NumPy's DLPack knows no bfloat16: share the bits as uint16
            return tf.bitcast(tf.experimental.dlpack.from_dlpack(array.view(np.uint16).__dlpack__()), tf.bfloat16)
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.convert_to_tensor(array)


def as_array(tensor: tf.Tensor) -> np.ndarray:
    """A read-only NumPy view of a host (CPU) tensor without copying, through DLPack
    (`tensor.numpy()` copies: for a 450 MB gradient that is half a second and the memory twice)."""
    array = np.from_dlpack(tensor)
    array.flags.writeable = False
    return array
