"""Aligned host arrays are adopted by TensorFlow without a copy; others are converted."""
import numpy as np
import tensorflow as tf

from checkpoint_utils.host_arrays import ALIGNMENT, aligned_copy, aligned_empty, as_tensor


def test_aligned_arrays_are_shared_not_copied():
    array = aligned_empty((3, 5), np.float32)
    assert array.ctypes.data % ALIGNMENT == 0 and array.flags.c_contiguous
    array[...] = np.arange(15).reshape(3, 5)
    tensor = as_tensor(array)
    array[0, 0] = 99.0  # the tensor sees the write: same memory
    assert tensor.numpy()[0, 0] == 99.0 and tensor.dtype == tf.float32


def test_other_arrays_convert_by_value():
    base = np.arange(13, dtype=np.float32)
    unaligned = base[1:] if base[1:].ctypes.data % ALIGNMENT else base[2:]
    readonly = np.arange(4, dtype=np.float32)
    readonly.flags.writeable = False
    for array in (unaligned, readonly, np.zeros((0, 3), np.float32)):
        np.testing.assert_array_equal(as_tensor(array).numpy(), array)


def test_aligned_copy_of_a_transposed_view_with_cast():
    source = np.arange(6, dtype=np.float16).reshape(2, 3)
    copy = aligned_copy(source.T, np.float32)
    assert copy.dtype == np.float32 and copy.flags.c_contiguous and copy.ctypes.data % ALIGNMENT == 0
    np.testing.assert_array_equal(copy, source.T.astype(np.float32))
