"""Stateless dropout whose mask is the same bits on every compile path and device.

A dropout call's seed is `fold_seed([runconfig.seed, step], batch slice, layer, site)`: the
runtime folds in the slice of the global batch (runtime/steps.dropout_seed), the model the layer
(0: the embedding, i + 1: block i) and the layer its site. Seeds carry no RNG state, so a resumed
run draws the masks an uninterrupted one would.

Two choices make the masks identical in eager code, graph mode and XLA (standard steps, weight
streaming's compiled pieces and their recomputation in the backward pass):
- the algorithm is named (Philox), never "auto_select", which lets each device or compiler pick;
- the mask compares raw 32-bit draws with an integer threshold. `tf.random.stateless_uniform`
  floats are not the same bits everywhere: from one Philox draw, TensorFlow's kernels keep the
  low 23 bits as the mantissa and XLA the high 23 (so `tf.nn.experimental.stateless_dropout`
  drops other elements under XLA), while the integer draws agree bit for bit.
"""
from __future__ import annotations

import tensorflow as tf

RNG_ALG = "philox"

# sites: the dropout calls of one layer
EMBEDDING = 0           # the embedding output
ATTENTION_PROBS = 1     # attention probabilities
ATTENTION_OUTPUT = 2    # the attention output, before the residual sum
MLP_OUTPUT = 3          # the MLP output, before the residual sum


def fold_seed(seed: tf.Tensor, *indices: tf.Tensor | int) -> tf.Tensor:
    """[2] int64 seed with each index folded in, in order: every step of the derivation."""
    for index in indices:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(index, tf.int64), alg=RNG_ALG)
    return seed


def keep_mask(shape, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """bool mask of `shape`, True with probability 1 - rate (to 2^-32): Philox's int32 draws, uniform
    over [-2^31, 2^31), kept at or above the threshold that leaves `rate` of them below it."""
    threshold = min(-2 ** 31 + round(rate * 2 ** 32), 2 ** 31 - 1)
    bits = tf.random.stateless_uniform(shape, seed=seed, minval=None, maxval=None, dtype=tf.int32,
                                       alg=RNG_ALG)
    return bits >= threshold


def dropout(x: tf.Tensor, rate: float, seed: tf.Tensor | None, site: int) -> tf.Tensor:
    """Drop with probability `rate` the elements of x (kept ones scaled by 1 / (1 - rate)) when the
    layer's `seed` ([2] int64) is given; identity otherwise. site: this call within the layer."""
    if rate == 0.0 or seed is None:
        return x
    keep = keep_mask(tf.shape(x), rate, fold_seed(seed, site))
    return tf.where(keep, x * tf.cast(1.0 / (1.0 - rate), x.dtype), tf.zeros_like(x))
