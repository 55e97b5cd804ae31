"""Dense kernels and the token table in the 16- and 8-bit weight formats (what layers/dense.py
and layers/embedding.py compute with), packed from float32, bfloat16 or float16 values a block
of output channels at a time: generation (generation/weights.py, generation/loading.py) and
LoRA's frozen base (model.LoraModel) hold their weights this way.

    bfloat16  kernels as rows [out, in] of bfloat16 values held as their int16 bits
              (layers.dense.read_after); the table [V, D] likewise
    int8      kernels as rows [out, in] int8 with one float32 scale per output channel,
              symmetric: scale = max |w[:, o]| / 127, q = round(w / scale), so
              |w - q * scale| <= scale / 2
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import tensorflow as tf

from layers.packing import block_rows


def quantize_int8(kernel: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """kernel [in, out] float -> (rows [out, in] int8, scale [out] float32), per output channel."""
    kernel = tf.convert_to_tensor(kernel, tf.float32)
    scale = tf.reduce_max(tf.abs(kernel), axis=0) / 127.0                                  # [out]
    safe = tf.where(scale > 0, scale, 1.0)                                                  # all-zero columns
    rows = tf.cast(tf.clip_by_value(tf.round(tf.transpose(kernel) / safe[:, None]), -127, 127), tf.int8)
    return rows, scale


def quantize_int8_host(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_int8 in NumPy on a host array [in, out] (float32, bfloat16 or float16): the
    same bits (the same float32 max, division by 127 and by the scale, round half to even and
    clip, each exactly rounded in both), without TensorFlow ops over the float32 copy."""
    kernel = kernel.astype(np.float32)                                                     # [in, out]
    scale = np.abs(kernel).max(axis=0) / np.float32(127.0)                                 # [out]
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.rint(np.divide(kernel, safe, out=kernel))                                       # [in, out]
    return transpose_host(np.clip(q, -127, 127, out=q).astype(np.int8)), scale


def bfloat16_bits_host(array: np.ndarray) -> np.ndarray:
    """A host array's values in bfloat16, as their int16 bits; float32 and float16 round to
    nearest even, as TensorFlow's cast does."""
    if array.dtype != ml_dtypes.bfloat16:
        array = array.astype(np.float32).astype(ml_dtypes.bfloat16)
    return array.view(np.int16)


def transpose_host(array: np.ndarray) -> np.ndarray:
    """A 2-D integer array transposed into memory of its own: TensorFlow's transpose, 3-4x
    NumPy's strided copy for 1- and 2-byte elements."""
    return tf.transpose(array).numpy()


def dequantize_int8(rows: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """(rows [out, in] int8, scale [out]) -> kernel [in, out] float32 (what the int8 format computes with)."""
    return tf.transpose(tf.cast(rows, tf.float32) * scale[:, None])


# Float32 bytes of output channels converted at a time: the transient of packing one kernel.
PACK_BLOCK_BYTES = 16 << 20


def pack_kernel(kernel, weight_format: str, block_bytes: int | None = None) -> dict:
    """One dense kernel [in, out] (a variable, tensor or host array; float32, bfloat16 or float16)
    in `weight_format` (see the module docstring), converted `block_bytes` of float32 output
    channels at a time into the packed variables. Each output channel is packed on its own (one
    row, one scale), so blocks give the bits the whole kernel would, while the transient is one
    block rather than a float32 copy of the kernel (the LM head's is 826 MB for GPT-J 6B). A
    host array (the loaders' case: generation/loading.py) is converted in NumPy."""
    in_dim, out_dim = (int(n) for n in kernel.shape)
    step = block_rows(in_dim, block_bytes or PACK_BLOCK_BYTES)
    # bfloat16 as its bits (layers.dense.read_after). The rows gather on the host and become a
    # variable once: a slice assignment per block copies the whole variable every time.
    rows = np.empty([out_dim, in_dim], np.int16 if weight_format == "bfloat16" else np.int8)  # [out, in]
    host = isinstance(kernel, np.ndarray)
    scales = []
    for start in range(0, out_dim, step):
        part = kernel[:, start:start + step]                                                # [in, n]
        if host and weight_format == "bfloat16":
            packed = transpose_host(bfloat16_bits_host(part))                              # [n, in]
        elif host:
            packed, scale = quantize_int8_host(part)                                        # [n, in], [n]
            scales.append(scale)
        elif weight_format == "bfloat16":
            part = tf.convert_to_tensor(part)
            if part.dtype != tf.bfloat16:         # float16 via float32, as a float32 model would cast it
                part = tf.cast(part, tf.float32)
            packed = tf.bitcast(tf.cast(tf.transpose(part), tf.bfloat16), tf.int16).numpy()
        else:
            packed, scale = quantize_int8(tf.cast(part, tf.float32))
            packed, scale = packed.numpy(), scale.numpy()
            scales.append(scale)
        rows[start:start + step] = packed
        part = packed = None                              # this block's memory, before the next one
    packed = {"kernel_t": tf.Variable(rows, trainable=False, name="kernel_t")}
    rows = None
    if weight_format == "int8":
        packed["kernel_scale"] = tf.Variable(np.concatenate(scales), trainable=False, name="kernel_scale")
    return packed


def is_embedding_table(path: str, rank: int) -> bool:
    return path.rsplit("/", 1)[-1] == "embeddings" and rank == 2


def bfloat16_table(table) -> tf.Variable:
    """The bfloat16 format's token table [V, D] (from a variable, tensor or host array), rounded
    to nearest even as the compute dtype's cast rounds each gathered row, held as its int16
    bits (layers.dense.as_float: XLA:CPU converts a bfloat16 gather's table to float32)."""
    if isinstance(table, np.ndarray):
        return tf.Variable(bfloat16_bits_host(table), trainable=False, name="embeddings")
    return tf.Variable(tf.bitcast(tf.cast(table, tf.bfloat16), tf.int16), trainable=False, name="embeddings")


def is_packed(path: str, rank: int) -> bool:
    """Whether the weight at `path` (a weights_tree path) is a dense kernel, which the 16- and
    8-bit formats pack (the bfloat16 format's embedding table: `bfloat16_table`)."""
    return path.rsplit("/", 1)[-1] == "kernel" and rank == 2
