"""Weight formats for generation: float32 as trained, bfloat16, or weight-only int8.

Decoding one token reads every weight of the blocks and the LM head once per step, so at
small batches its speed is the weights' bytes over memory bandwidth. The 16- and 8-bit
formats store each dense kernel as rows [out, in] in that format, which XLA reads directly
in its matrix-vector products (layers/dense.py):

    float32   the model's own variables (4 bytes per weight)
    bfloat16  kernels in bfloat16 (held as their int16 bits: layers.dense.read_after), math in
              bfloat16 with float32 LayerNorm, softmax and logits (model.mixed_precision's
              numerics; 2 bytes per weight)
    int8      kernels as int8 with one float32 scale per output channel, symmetric:
              scale = max |w[:, o]| / 127, q = round(w / scale), so |w - q * scale| <= scale / 2;
              math in float32 on the dequantized weights (1 byte per weight)

LayerNorms and biases stay float32 (a step reads a few vectors), and so does the embedding
table (a step reads one row), except in the bfloat16 format: its math gathers rows and casts
them to bfloat16, so a bfloat16 table gives the same values in half the bytes (413 MB less
for GPT-J 6B; `bfloat16_table`). `GenerationModel` is what the decoders call in place of a
GPTJModel.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import tensorflow as tf

from generation.config import WEIGHT_FORMATS
from layers.packing import block_rows
from layers.tree import flatten_weights
from model import GPTJModel


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


def pack_weights(tree, weight_format: str):
    """The model's weight tree with every dense kernel (a rank-2 "kernel") packed."""
    if isinstance(tree, list):
        return [pack_weights(t, weight_format) for t in tree]
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, value in tree.items():
        if isinstance(value, tf.Variable) and is_packed(name, value.shape.rank):
            out.update(pack_kernel(value, weight_format))
        elif isinstance(value, tf.Variable) and is_embedding_table(name, value.shape.rank) and weight_format == "bfloat16":
            out[name] = bfloat16_table(value)
        else:
            out[name] = pack_weights(value, weight_format)
    return out


def tree_bytes(tree: dict) -> int:
    """Bytes of every tensor in a weight tree."""
    return sum(t.shape.num_elements() * t.dtype.size for t in flatten_weights(tree).values())


class GenerationModel:
    """A GPTJModel's code over weights in one format: `.config`, `.empty_cache` and calls like
    the model's own, which is all the decoders use."""

    def __init__(self, model: GPTJModel, weight_format: str = "float32", weights: dict | None = None):
        """weights: the tree already in `weight_format` (generation/loading.py builds it from a
        checkpoint, over a model without variables); default: the model's own, packed here."""
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
        self.weight_format = weight_format
        self.model = model.with_compute_dtype("bfloat16") if weight_format == "bfloat16" else model
        if weights is None:
            tree = model.weights_tree()
            weights = tree if weight_format == "float32" else pack_weights(tree, weight_format)
        self.weights = weights

    @property
    def config(self):
        return self.model.config

    @property
    def weight_bytes(self) -> int:
        return tree_bytes(self.weights)

    def empty_cache(self, batch_size: int, cache_length: int):
        return self.model.empty_cache(batch_size, cache_length)

    def __call__(self, *args, **kwargs):
        # layers/dense.py reads each packed kernel after its input (read_after), a block at a time:
        # converted in the step that uses it, never the whole model at once.
        return self.model.forward(self.weights, *args, **kwargs)


def generation_model(model: GPTJModel, weight_format: str = "float32") -> GPTJModel | GenerationModel:
    """`model` itself for float32, else a GenerationModel in `weight_format`."""
    return model if weight_format == "float32" else GenerationModel(model, weight_format)
