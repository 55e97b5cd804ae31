"""Stateless dropout: the mask depends only on a seed tensor, so a resumed run
draws the same masks as an uninterrupted one without checkpointing RNG state."""
from __future__ import annotations

import tensorflow as tf


def dropout(x: tf.Tensor, rate: float, seed: tf.Tensor | None, salt: int) -> tf.Tensor:
    """Drop with probability `rate` when `seed` ([2] int) is given; identity otherwise."""
    if rate == 0.0 or seed is None:
        return x
    layer_seed = tf.random.experimental.stateless_fold_in(seed, salt)
    return tf.nn.experimental.stateless_dropout(x, rate=rate, seed=layer_seed)
