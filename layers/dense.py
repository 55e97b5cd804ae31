"""Affine projection y = x @ kernel (+ bias); kernel stored [in, out] (HF Linear stores [out, in])."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from layers import initializers, packing
from layers.dropout import dropout
from layers.base import Layer, weight_variable


class Dense(Layer):
    def __init__(self, in_dim: int, out_dim: int, use_bias: bool,
                 kernel_init: Callable, name: str | None = None):
        super().__init__(name=name)
        self.kernel = weight_variable(kernel_init, [in_dim, out_dim], "kernel")  # [in, out]
        if use_bias:
            self.bias = weight_variable(initializers.zeros, [out_dim], "bias")  # [out]

    def forward(self, weights: dict, x: tf.Tensor, dropout_seed: tf.Tensor | None = None) -> tf.Tensor:
        # x: [..., in] in the compute dtype; weights are cast to it (mixed precision).
        # weights: {"kernel" [in, out]} as trained, or a generation format (generation/weights.py):
        # {"kernel_t" [out, in] int8, "kernel_scale" [out]}, or {"kernel_t" [out, in] bfloat16
        # values held as their int16 bits (see read_after)}.
        if "kernel" in weights:
            y = matmul_rows(x, tf.cast(weights["kernel"], x.dtype))                       # [..., out]
        else:
            y = packed_product(x, weights["kernel_t"], weights.get("kernel_scale"))         # [..., out]
        if "bias" in weights:
            y = y + tf.cast(weights["bias"], x.dtype)
        if "lora" in weights:       # an adapter attached (layers/lora.py); dropout_seed: its input's
            y = y + low_rank_update(weights["lora"], x, dropout_seed)
        return y


def low_rank_update(adapter: dict, x: tf.Tensor, seed: tf.Tensor | None) -> tf.Tensor:
    """scale * dropout(x) @ A @ B (layers/lora.py): x [..., in] in the compute dtype -> [..., out].
    The float32 factors are cast like every weight (mixed precision); the two thin products cost
    2 * rank * (in + out) FLOPs per token."""
    x = dropout(x, adapter["dropout"], seed, 0)
    low = matmul_rows(x, tf.cast(adapter["a"], x.dtype))                                   # [..., r]
    return matmul_rows(low, tf.cast(adapter["b"], x.dtype)) * tf.cast(adapter["scale"], x.dtype)   # [..., out]


def packed_product(x: tf.Tensor, rows: tf.Tensor, scale: tf.Tensor | None) -> tf.Tensor:
    """x [..., in] @ a packed kernel (generation/weights.py): rows [out, in] int8 (with scale
    [out]) or bfloat16 held as int16 bits -> [..., out] in x's dtype.

    The rows are converted to x's dtype a block of output rows at a time (layers/packing.py:
    64 MiB of float32), each block read after the previous block's product (read_after), so a
    compiled step holds one converted block: the LM head of GPT-J 6B would otherwise be an
    826 MB float32 copy at every step. Each output channel is its own dot product, so blocks
    regroup outputs, not terms. [out, in] rows: XLA fuses the cast into a matrix-vector
    product, so a decode step reads the kernel's 1 or 2 bytes per weight, not a float32 copy's 4."""
    out_dim, in_dim = (int(n) for n in rows.shape)
    compiled = not tf.executing_eagerly()
    # Eager, one conversion of the whole kernel: eager ops free each block anyway, and TensorFlow's
    # own bfloat16 matmul (no oneDNN, an AVX2-only CPU's) crashed on a product with a row slice.
    step = packing.block_rows(in_dim) if compiled else out_dim
    parts, after = [], x
    for start in range(0, out_dim, step):
        block = rows if step >= out_dim else rows[start:start + step]                       # [n, in]
        if compiled:
            block = read_after(block, after)
        after = matmul_rows(x, tf.cast(as_float(block), x.dtype), transpose_kernel=True)     # [..., n]
        parts.append(after)
    y = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)                          # [..., out]
    if scale is not None:
        y = y * tf.cast(scale, x.dtype)                                                      # per output channel
    return y


def matmul_rows(x: tf.Tensor, kernel: tf.Tensor, transpose_kernel: bool = False) -> tf.Tensor:
    """x [..., in] @ kernel [in, out] -> [..., out] as one 2-D matmul over the flattened rows
    (transpose_kernel: kernel is [out, in], as the tied head's embedding table).

    A broadcast matmul of [b, s, in] by [in, out] differentiates into a batched [b, in, out]
    kernel gradient and a sum over b: b times the memory and one more pass, which for the LM
    head (out = vocab) is the largest tensor of a step. The bias is added after the reshape on
    purpose: MatMul + BiasAdd is rewritten into oneDNN's fused inner product, whose bfloat16
    kernel is a generic GEMM here rather than the AMX matmul (docs/runtime.md, compile paths)."""
    in_dim, out_dim = (kernel.shape[1], kernel.shape[0]) if transpose_kernel else tuple(kernel.shape)
    y = tf.matmul(tf.reshape(x, [-1, in_dim]), kernel, transpose_b=transpose_kernel)   # [n, out]
    if x.shape.rank is not None and x.shape[:-1].is_fully_defined():
        return tf.reshape(y, x.shape[:-1].as_list() + [out_dim])
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [out_dim]], 0))


def as_float(values: tf.Tensor) -> tf.Tensor:
    """Packed values as floats: int16 holds bfloat16 bits (see read_after); others are as they are."""
    return tf.bitcast(values, tf.bfloat16) if values.dtype == tf.int16 else values


def read_after(rows: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """`rows` unchanged, as a value computed from x: its conversion then waits for x.

    Compiled, the conversion of a packed kernel depends on its variable alone, so schedulers
    run it as early as they can: XLA:CPU's (which favours concurrency) and TF's executor both
    convert every kernel at the start of a call, which holds a float32 copy of the whole model
    at once (24 GB for GPT-J 6B in int8), and a decode loop would hoist the conversions out of
    itself. A data dependency is what every scheduler respects (XLA removes optimization
    barriers before it schedules): a select whose predicate comes from x, always true but not
    provably so (no value is both NaN and finite), fused into the conversion. The select must
    be an integer one: XLA:CPU computes a bfloat16 select in float32 by converting its operands,
    and that conversion of the variable alone would again be hoisted and run first. That is why
    the bfloat16 format keeps its kernels as int16 bits."""
    first = tf.reshape(x, [-1])[0]
    always = tf.logical_not(tf.logical_and(tf.math.is_nan(first), tf.math.is_finite(first)))
    return tf.where(always, rows, tf.zeros([], rows.dtype))
